"""Machine: the emulated computer — memory nodes, struct pages, a backend, a DMA engine and vmstat."""

from __future__ import annotations

import collections
import itertools
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from .arguments import as_pfn_array, check_node, check_positive_int
from .backends import open_backend
from .backends.cuda.memory import HOST_MAPPED, check_device_frames
from .balloon import Balloon
from .cost_model import CostModel, load_model
from .dma import DmaEngine
from .errors import InvalidArgument, OutOfMemory
from .fault_injection import FaultPoints
from .filemap import File, Filesystem, PageCache
from .flags import MigrateMode, MigrateReason
from .frames import Frames
from .migrate.core import demote_folios, migrate_misplaced_folio, migrate_pfns
from .migrate.result import MigrateEvent
from .mm import AddressSpace
from .nodes import MAX_ORDER, Node, NodeMap
from .page_controls import PageControls
from .pages import PageArray
from .topology import ROUTE_STAGED, Topology, node_routes, resolve_topology

if TYPE_CHECKING:
    from .migrate import MigrateResult
    from .migrate.options import MigrateOptions
    from .vma import MemObject

__all__ = ["Machine"]

#: Most frames a node may have (1 TiB of 4 KiB pages): struct-page state costs tens of bytes per frame.
MAX_NODE_PAGES = 1 << 28
#: Most nodes (host nodes and devices): the pfn-to-node table holds node ids in one signed byte.
MAX_NODES = 127
#: Longest DMA poll window a machine accepts (microseconds): one second.
MAX_POLL_US = 1e6

#: vmstat counters the migration core maintains (names as in /proc/vmstat).
VMSTAT_COUNTERS = (
    "pgmigrate_success",
    "pgmigrate_fail",
    "pgmigrate_no_copy",
    "pgmigrate_dma_fallback",
    "thp_migration_success",
    "thp_migration_fail",
    "thp_migration_split",
    "migrate_tlb_flush",
    "pgfault",
    "migrate_to_ram",
    "migrate_vma_success",  # MigrateVma counts these instead of pgmigrate_*, as migrate_device.c counts none
    "migrate_vma_fail",
    "numa_pages_migrated",  # the counters of migration reasons (MigrateReason)
    "pgpromote_success",
    "pgdemote_direct",
    "pgdemote_kswapd",
    "numa_hint_faults",  # NUMA balancing's hint faults (do_numa_page), and those on the faulting CPU's node
    "numa_hint_faults_local",
)
#: ``mm_migrate_pages`` events kept (:attr:`Machine.migrate_events`); older ones are dropped.
MIGRATE_EVENTS_KEPT = 4096


class _Changed(threading.Condition):
    """The machine's ``changed`` condition, which keeps count of the threads asleep on it: a migration notifies
    it after every batch it moves, and a notification with nobody asleep is then one test."""

    def __init__(self, lock: threading.RLock) -> None:
        super().__init__(lock)
        #: Threads in :meth:`wait` (read and written under the lock).
        self.sleepers = 0

    def wait(self, timeout: float | None = None) -> bool:
        self.sleepers += 1
        try:
            return super().wait(timeout)
        finally:
            self.sleepers -= 1

    def notify_all(self) -> None:
        if self.sleepers:
            super().notify_all()


def _host_tiers(host_pages: int, host_nodes: Sequence[Any] | None) -> tuple[list[int], list[float]]:
    """Frame counts and access costs of the host nodes from ``host_pages`` or ``host_nodes``."""
    if host_nodes is None:
        return [host_pages], [1.0]
    if isinstance(host_nodes, (str, bytes)) or not isinstance(host_nodes, Sequence) or not host_nodes:
        raise InvalidArgument(f"host_nodes must be a non-empty sequence of frame counts or (frames, cost) "
                              f"pairs, got {host_nodes!r}")
    sizes, costs = [], []
    for i, entry in enumerate(host_nodes):
        pages, cost = (entry, 1.0 if i == 0 else 2.0) if not isinstance(entry, (tuple, list)) else tuple(entry)
        check_positive_int(f"host_nodes[{i}] frames", pages)
        if pages > MAX_NODE_PAGES:
            raise InvalidArgument(f"host_nodes[{i}] must have at most {MAX_NODE_PAGES} frames, got {pages}")
        if isinstance(cost, bool) or not isinstance(cost, (int, float)) or not cost > 0:
            raise InvalidArgument(f"host_nodes[{i}] cost must be a number > 0, got {cost!r}")
        sizes.append(int(pages))
        costs.append(float(cost))
    return sizes, costs


class Machine:
    """An emulated machine: host RAM (node 0) and ``devices`` device nodes, each a frame buffer.

    Parameters
    ----------
    host_pages, device_pages : int
        Base-page frames on the host node and on each device node.
    devices : int
        Number of device nodes (GPUs); node ``i`` (1-based) is device ``i - 1``.
    page_size : int
        Bytes per base page: a power of two, at least 64.
    backend : {"auto", "cpu", "cuda"}
        Where frames live; ``"auto"`` picks CUDA when a GPU is usable (``DMAMIG_BACKEND`` overrides).
    channels : int
        DMA channels of ``m.dma``.
    device_memory : {"coherent", "private"}
        How the CPU sees device memory. ``coherent`` (the default): the CPU can address it; an access
        brings device pages back when it can and accesses them in place when it cannot. ``private``
        (``MEMORY_DEVICE_PRIVATE``): the CPU cannot address it; a CPU page-table entry of a device page is a
        non-present device-private entry, every CPU access faults it back with the owner's ``migrate_to_ram``
        (a ``MigrateVma`` of the faulting page) or fails, and so does any pin. Device-coherent pages are
        pinned in place, except by a long-term pin (``migrate_device_coherent_folio``).
    host_nodes : sequence, optional
        Tiered host memory: one entry per host node, either a frame count or ``(frames, cost)`` with the
        node's relative cost per byte accessed (e.g. ``[(4096, 1.0), (16384, 2.5)]``: DRAM then CXL). Host
        nodes are numbered first (node 0 is host RAM), devices after them. CPU accesses use slow host nodes
        in place; first touch allocates on node 0. ``None`` (the default) is one host node of ``host_pages``.
    topology : Topology, optional
        Peer access and links between the devices (:class:`~dmamig.topology.Topology`). Copies between devices
        with peer access are direct; without it they are staged through host memory (DMA channels and the
        migrating thread's copy alike). CPU backend: this setting, by default ``Topology.nvswitch(devices)``
        (every pair NVLink with peer access: what the CPU backend always did). CUDA backend: read from the
        runtime; a topology given there can only take peer access away (those pairs are then staged, e.g. to
        measure staging on peer-capable GPUs), asking for peer access the GPUs lack is an error, and its link
        classes are not used.
    dma_poll_us : float, optional
        Microseconds a wait for a DMA copy polls its completion before sleeping, as the kernel's
        ``dma_sync_wait()`` polls a copy engine (default :data:`~dmamig.dma.channel.DEFAULT_POLL_US`); on the
        CPU backend a channel's worker also watches its doorbell that long after its last job, as a copy engine
        does. ``0`` makes every wait sleep at once (CUDA: in ``eventSynchronize``) and CPU channels sleep
        between jobs, so that each submission pays the host's thread wake-ups: an experiment setting.
    cost_model : CostModel, str or path, optional
        An experiment setting: a cost model (:mod:`dmamig.cost_model`; a preset's name such as ``"zen3-ptdma"``,
        or a preset file) that charges each operation of every migration to a modelled clock. Results then
        carry ``modelled`` beside their measured time, labelled with the model's name. ``None`` (the default):
        nothing is modelled.
    dma_engine : {"launch", "persistent"}, optional
        What consumes the DMA rings on CUDA: ``"launch"`` (the default), one kernel launch per submission, or
        ``"persistent"``, an experiment setting: a consumer kernel per device that stays resident until its rings
        go idle (refused, with the reason, under a kernel watchdog, without cooperative launch or under MPS; and
        on the CPU backend, whose polling channels already are persistent consumers).
    device_frames : {"device", "host-mapped"}, optional
        Where device nodes' frames live on CUDA: ``"device"`` (the default), device memory; or
        ``"host-mapped"``, an experiment setting: pinned host memory mapped into the devices' address space, which
        the migrating CPU copies with its memcpy in copy mode, as it can copy into device memory over a
        cache-coherent link (Grace Hopper C2C). On a card on PCIe it is a proxy for that link, not device memory:
        the copy baseline ``cpu`` of ``dmamig bench --copy-baseline cpu``. Refused on the CPU backend, whose device
        frames already are host memory that the migrating CPU copies.
    """

    def __init__(self, host_pages: int = 8192, device_pages: int = 8192, devices: int = 1,
                 page_size: int = 4096, backend: str = "auto", channels: int = 4,
                 device_memory: str = "coherent", host_nodes: Sequence[Any] | None = None,
                 topology: Topology | None = None, dma_poll_us: float | None = None,
                 cost_model: CostModel | str | None = None, dma_engine: str | None = None,
                 device_frames: str | None = None):
        self._cost_model = None if cost_model is None else load_model(cost_model)
        host_sizes, host_costs = _host_tiers(host_pages, host_nodes)
        host_pages = host_sizes[0]
        check_positive_int("host_pages", host_pages)
        check_positive_int("device_pages", device_pages)
        for name, value in (("host_pages", host_pages), ("device_pages", device_pages)):
            if value > MAX_NODE_PAGES:
                raise InvalidArgument(f"{name} must be at most {MAX_NODE_PAGES} (2**28) frames per node, got {value}")
        if not isinstance(devices, (int, np.integer)) or isinstance(devices, bool) or devices < 0:
            raise InvalidArgument(f"devices must be an integer >= 0, got {devices!r}")
        if len(host_sizes) + devices > MAX_NODES:
            raise InvalidArgument(f"a machine has at most {MAX_NODES} nodes (host nodes and devices together), "
                                  f"got {len(host_sizes)} host nodes and {devices} devices")
        if topology is not None and not isinstance(topology, Topology):
            raise InvalidArgument(f"topology must be a dmamig.Topology (e.g. Topology.nvswitch({devices})), got "
                                  f"{type(topology).__name__}")
        check_positive_int("page_size", page_size)
        if page_size < 64 or page_size & (page_size - 1):
            raise InvalidArgument(f"page_size must be a power of two >= 64, got {page_size}")
        check_positive_int("channels", channels)
        if device_memory not in ("coherent", "private"):
            raise InvalidArgument(f"device_memory must be 'coherent' or 'private', got {device_memory!r}")
        self._device_private = device_memory == "private"
        if dma_poll_us is not None and (isinstance(dma_poll_us, bool) or not isinstance(dma_poll_us, (int, float))
                                        or not 0 <= dma_poll_us <= MAX_POLL_US):
            raise InvalidArgument(f"dma_poll_us must be a number of microseconds from 0 to {MAX_POLL_US:g}, or None "
                                  f"for the default; got {dma_poll_us!r}")
        device_frames = "device" if device_frames is None else check_device_frames(device_frames)
        self._backend = open_backend(backend)
        if device_frames == HOST_MAPPED and self._backend.name != "cuda":
            self._backend.close()
            # Asking for it there would record an experiment that changed nothing.
            raise InvalidArgument(f"device_frames={HOST_MAPPED!r} is a CUDA backend setting: the "
                                  f"{self._backend.name} backend's device frames already are host memory that the "
                                  f"migrating CPU copies; leave device_frames unset there")
        self._device_frames = device_frames
        if dma_poll_us is not None:
            self._backend.poll_us = float(dma_poll_us)
        try:
            if dma_engine is not None:
                self._backend.set_dma_engine(dma_engine)
            self._topology = resolve_topology(self._backend, int(devices), topology)
        except Exception:
            self._backend.close()
            raise
        self._backend.topology = self._topology
        self._page_size = int(page_size)
        self._channels = int(channels)
        nodes = []
        base = 0
        try:
            # Host nodes come first (node 0 is always host RAM), then the devices.
            nh = len(host_sizes)
            for nid in range(nh + devices):
                kind = "host" if nid < nh else "device"
                count = int(host_sizes[nid] if nid < nh else device_pages)
                dev = -1 if nid < nh else nid - nh
                # A device node stays a device node (its kind, its device id) wherever its frames live.
                where = device_frames if kind == "device" else kind
                frames = self._backend.alloc_frames(where, dev, count, self._page_size)
                nodes.append(Node(nid, kind, dev, base, count, frames))
                base += count
        except Exception:
            self._backend.close()
            raise
        self._nodes = tuple(nodes)
        self._host_node_ids = tuple(n.id for n in nodes if n.kind == "host")
        self._access_cost = tuple(host_costs) + (1.0,) * devices
        # Per node: True for device memory, which a CPU access brings back to host RAM (host tiers are not).
        self.device_node_mask = np.array([n.kind == "device" for n in nodes], dtype=bool)
        self.nodemap = NodeMap(self._nodes)
        # Per (source node, destination node): whether copies between them are staged through host memory.
        self._staged = (node_routes([n.device for n in nodes], self._topology) == ROUTE_STAGED).tolist()
        self.pages = PageArray(base)
        # The machine-wide metadata lock (page tables, struct pages, allocators). Data copies of a migration run
        # outside it; accessors that meet a migration entry wait on `changed` until the migration finishes.
        self.lock = threading.RLock()
        self.changed = _Changed(self.lock)
        self._objects: dict[int, MemObject] = {}
        # Mapping ids of the objects whose folios migrate through their own callback, and of those whose pages
        # are non-LRU movable pages (kept as arrays for the migration core's vectorized lookups).
        self.callback_object_ids = np.empty(0, dtype=np.int64)
        self.movable_object_ids = np.empty(0, dtype=np.int64)
        self._object_ids = itertools.count(1)
        self._spaces: list[AddressSpace] = []
        self._vmstat = dict.fromkeys(VMSTAT_COUNTERS, 0)
        self._migrate_events: collections.deque[MigrateEvent | tuple[Any, ...]] = \
            collections.deque(maxlen=MIGRATE_EVENTS_KEPT)
        self._dma: DmaEngine | None = None
        self._faults = FaultPoints()
        #: The frames by pfn: folio allocation and freeing, frame I/O, the migrating thread's CPU copy.
        self.frames = Frames(self._backend, self._nodes, self._page_size, self._faults, self._staged, self.nodemap,
                             self.pages)
        #: Per-page controls for tests and drivers: the page lock, writeback, flags, references, page_state.
        self.page_controls = PageControls(self)
        self.page_cache = PageCache(self)  # files and their page cache (the flusher starts with the first file)
        self._closed = False

    # -- read-only properties --------------------------------------------------------------------------------
    backend = property(lambda self: self._backend, doc="The backend object that owns the frames.")
    backend_name = property(lambda self: self._backend.name, doc='"cpu" or "cuda".')

    @property
    def dma_poll_us(self) -> float:
        """Microseconds a wait for a DMA copy polls before sleeping (and CPU channels watch their doorbells);
        0 when waits sleep at once (and CPU channels between jobs, as where the polling loop cannot run)."""
        return float(self._backend.poll_us) if self._backend.polling else 0.0
    page_size = property(lambda self: self._page_size, doc="Bytes per base page.")
    nodes = property(lambda self: self._nodes, doc="Tuple of Node; nodes[0] is host RAM.")
    access_cost = property(lambda self: self._access_cost,
                           doc="Relative cost per byte a CPU access pays on each node (host tiers as given in "
                               "``host_nodes``; 1.0 for node 0 and devices by default).")
    host_node_ids = property(lambda self: self._host_node_ids,
                             doc="Ids of the host memory nodes (tiers), fastest first as given.")
    device_private = property(lambda self: self._device_private,
                              doc='True when device memory is device-private (``device_memory="private"``).')
    cost_model = property(lambda self: self._cost_model,
                          doc="The :class:`~dmamig.cost_model.CostModel` that models every migration's time, or "
                              "None (the experiment setting ``cost_model=``).")
    device_frames = property(lambda self: self._device_frames,
                             doc='Where device nodes\' frames live: ``"device"`` or ``"host-mapped"`` (the '
                                 'experiment setting ``device_frames=``).')
    topology = property(lambda self: self._topology,
                        doc="The devices' :class:`~dmamig.topology.Topology`: peer access and link per pair.")

    @property
    def vmstat(self) -> dict[str, int]:
        """A snapshot of the migration counters (pgmigrate_success, pgmigrate_fail, thp_migration_*, ...)."""
        with self.lock:
            return dict(self._vmstat)

    def count_event(self, name: str, n: int = 1) -> None:
        """Add ``n`` to the vmstat counter ``name`` (caller holds the lock)."""
        self._vmstat[name] += int(n)

    def count_events(self, names: tuple[str, ...], counts: Sequence[int]) -> None:
        """Add ``counts[i]`` to the vmstat counter ``names[i]``, for each ``i`` (caller holds the lock)."""
        vmstat = self._vmstat
        for name, n in zip(names, counts):
            if n:
                vmstat[name] += int(n)

    @property
    def faults(self) -> FaultPoints:
        """The machine's fault points (``alloc``, ``dma_submit``, ``dma_copy``, ``dma_complete``,
        ``channel_crash``); see :mod:`dmamig.fault_injection`."""
        return self._faults

    @property
    def dma_started(self) -> bool:
        """Whether the DMA engine exists yet (reading :attr:`dma` creates it)."""
        return self._dma is not None

    @property
    def dma(self) -> DmaEngine:
        """The device DMA engine (created on first use)."""
        if self._dma is None:
            self._check_open()
            self._dma = DmaEngine(nodes=self._nodes, nodemap=self.nodemap, backend=self._backend,
                                  page_size=self._page_size, channels=self._channels, faults=self._faults,
                                  content=self.pages, topology=self._topology)
        return self._dma

    # -- address spaces --------------------------------------------------------------------------------------
    def address_space(self) -> AddressSpace:
        """Create a new, empty address space (a process)."""
        self._check_open()
        mm = AddressSpace(self)
        with self.lock:
            self._spaces.append(mm)
        return mm

    @property
    def address_spaces(self) -> tuple[AddressSpace, ...]:
        """The open address spaces, oldest first."""
        with self.lock:
            return tuple(self._spaces)

    @property
    def objects(self) -> tuple[MemObject, ...]:
        """The live memory objects (anonymous and shared memory that some VMA maps), oldest first."""
        with self.lock:
            return tuple(self._objects.values())

    def register_object(self, obj: MemObject) -> int:
        """Give an address-space object (anon or shared memory, a file, a balloon) its ``mapping`` id."""
        oid = next(self._object_ids)
        self._objects[oid] = obj
        if obj.migrate_callback:
            self._index_callback_objects()
        return oid

    def unregister_object(self, oid: int) -> None:
        obj = self._objects.pop(oid, None)
        if obj is not None and obj.migrate_callback:
            self._index_callback_objects()

    def _index_callback_objects(self) -> None:
        objs = self._objects.items()
        self.callback_object_ids = np.array([oid for oid, o in objs if o.migrate_callback], dtype=np.int64)
        self.movable_object_ids = np.array([oid for oid, o in objs if o.movable], dtype=np.int64)

    def object(self, oid: int) -> MemObject:
        """The object whose ``mapping`` id is ``oid``."""
        return self._objects[oid]

    def object_or_none(self, oid: int) -> MemObject | None:
        """The object whose ``mapping`` id is ``oid``, or None once it was released."""
        return self._objects.get(oid)

    def forget_space(self, mm: AddressSpace) -> None:
        if mm in self._spaces:
            self._spaces.remove(mm)

    # -- files ------------------------------------------------------------------------------------------------
    def open(self, path: Any = None, size: int | None = None, fs: Filesystem | str = "generic",
             writable: bool = True, create: bool = True) -> File:
        """Open a real file on disk through this machine's page cache.

        Parameters
        ----------
        path : str or os.PathLike, optional
            The file; ``None`` creates a new one in a temporary folder removed at :meth:`close`.
        size : int, optional
            Truncate or extend the file to this many bytes first.
        fs : Filesystem or str
            The filesystem model (:data:`~dmamig.filemap.FILESYSTEMS`: ``"generic"`` with
            ``filemap_migrate_folio``, ``"buffer"``, ``"blockdev"``, ``"no-callback"``, ``"unaudited"``).
        writable : bool
            Open for writing (``O_RDWR``); ``False`` opens read-only, and only private or read-only mappings
            of it may be made.
        create : bool
            Create the file when it does not exist.

        Returns
        -------
        File
            ``pread``, ``pwrite``, ``fsync``, ``ftruncate``, ``close``; map it with
            ``mm.mmap(length, file=f, offset=0, shared=True)``.

        Raises InvalidArgument for a bad path, a directory, a read-only file opened for writing, or a file that
        does not exist (or vanished) without ``create``.
        """
        self._check_open()
        return self.page_cache.open(path, size, fs, writable, create)

    def balloon(self, pages: int = 0, node: int = 0) -> Balloon:
        """A balloon device (non-LRU movable pages with ``movable_ops``), inflated by ``pages`` pages of ``node``.

        Its pages migrate with :meth:`migrate_pages` like any others, through the driver's callbacks; a
        no-copy migration of them fails with ``-EINVAL``, as ``balloon_page_migrate`` refused it.
        """
        self._check_open()
        with self.lock:
            b = Balloon(self)
        if pages:
            b.inflate(pages, node)
        return b

    def node_page_state(self, node: int) -> dict[str, int]:
        """The page-cache counters of ``node``: ``nr_file_pages`` (shared memory included), ``nr_file_dirty``,
        ``nr_writeback`` and ``nr_shmem``."""
        return self.page_cache.node_page_state(check_node(self, "node", node))

    # -- the driver-level API ----------------------------------------------------------------------------------
    def alloc_pages(self, node: int, count: int, order: int = 0) -> np.ndarray:
        """Allocate ``count`` folios of ``order`` on ``node`` for a driver; return their head pfns.

        The folios are owned by the caller (refcount 1, not on any LRU list) until passed to
        :meth:`migrate_pages` as destinations or freed with :meth:`put_pages`.

        Raises
        ------
        InvalidArgument
            Unknown node, non-positive count, order outside ``0..MAX_ORDER``.
        OutOfMemory
            The node has fewer than ``count`` free (contiguous) blocks; nothing is allocated then.
        """
        self._check_open()
        check_node(self, "node", node)
        check_positive_int("count", count)
        if not isinstance(order, (int, np.integer)) or isinstance(order, bool) or not 0 <= order <= MAX_ORDER:
            raise InvalidArgument(f"order must be an integer in 0..{MAX_ORDER}, got {order!r}")
        with self.lock:
            heads = self.frames.alloc_folios(node, count, order)
            if heads.size < count:
                self.frames.free_folios(heads)
                raise OutOfMemory(f"node {node} has only {heads.size} free order-{order} blocks, {count} requested")
            pfns = self.pages.expand(heads)
            self.frames.zero_pfns(pfns)
        return heads

    def put_pages(self, pfns: np.ndarray) -> None:
        """Free folios obtained from :meth:`alloc_pages` (their head pfns).

        Allowed after :meth:`close` too: a driver racing the machine's close still gives its frames back.
        """
        heads = as_pfn_array(self, "pfns", pfns)
        with self.lock:
            pages = self.pages
            bad = heads[(pages.head[heads] != heads) | (pages.refcount[heads] != 1) | (pages.mapcount[heads] != 0)
                        | (pages.mapping[heads] != -1)]
            if bad.size:
                raise InvalidArgument(f"pfns {bad[:8].tolist()} are not driver-owned folio heads from alloc_pages")
            self.frames.put_folios(heads)

    def migrate_pages(self, pfns: Any, node: int, mode: MigrateMode = MigrateMode.SYNC,
                      dst_pfns: Any = None, options: MigrateOptions | None = None,
                      reason: MigrateReason = MigrateReason.MR_SYSCALL) -> MigrateResult:
        """Migrate the folios containing ``pfns`` to ``node``, like the kernel's ``migrate_pages()``.

        Parameters
        ----------
        pfns : array of int
            Pages to migrate; a pfn inside a large folio selects the whole folio.
        node : int
            Target node.
        mode : MigrateMode
            ``ASYNC``, ``SYNC_LIGHT`` or ``SYNC``, optionally ``| NO_COPY``.
        dst_pfns : array of int, optional
            With ``NO_COPY``: destination folio heads from :meth:`alloc_pages`, one per source folio, whose
            content the caller already copied. migrate_pages takes ownership: destinations of failed folios are
            freed. A folio retried after its source was remapped gets a fresh CPU copy (the caller's copy may
            be stale by then).
        options : MigrateOptions, optional
            Batching; ``None`` is the kernel's. Other settings are experiments.
        reason : MigrateReason
            Why the pages migrate (``MR_SYSCALL`` by default): recorded in :attr:`migrate_events`, counted by its
            own vmstat counters, and deciding the rules :class:`~dmamig.flags.MigrateReason` lists.

        Returns
        -------
        MigrateResult
            Per-page status of ``pfns`` (``0`` or ``-errno``) and counters.
        """
        self._check_open()
        return migrate_pfns(self, pfns, node, mode, dst_pfns, options, reason)

    def migrate_misplaced_folio(self, pfn: int, node: int) -> MigrateResult:
        """Move the folio holding ``pfn`` to ``node`` as NUMA balancing does after a hint fault: one folio,
        ``ASYNC``, ``MR_NUMA_MISPLACED`` (never split: a large folio without a destination fails).

        Counts ``numa_pages_migrated``, and ``pgpromote_success`` for a move into the top tier (the first host
        node) from below it.
        """
        self._check_open()
        return migrate_misplaced_folio(self, pfn, node)

    def demote_folios(self, pfns: Any, kswapd: bool = False, engine: DmaEngine | None = None) -> MigrateResult:
        """Demote the folios holding ``pfns`` (all on one host node) as reclaim does (``demote_folio_list``).

        They move to the next tier down (the host node after theirs in ``host_nodes``), ``ASYNC``, with
        ``MR_DEMOTION``; a folio that finds no frame there takes one on another lower tier
        (``alloc_demote_folio``), never on its own tier or above, and nothing is reclaimed to make room.

        Parameters
        ----------
        pfns : array_like of int
            Pages of the folios to demote, all on one host node that has a tier below it.
        kswapd : bool
            ``True`` for kswapd's background reclaim (counts ``pgdemote_kswapd``); ``False`` for direct reclaim
            in the allocating task (``pgdemote_direct``).
        engine : DmaEngine, optional
            ``m.dma``: the DMA engine copies each batch and the core moves state only (no-copy migration, as
            the DMA batch-offload RFC would for any ``migrate_pages()`` caller); ``None``: the CPU copies, as
            the kernel does.

        Returns
        -------
        MigrateResult
        """
        self._check_open()
        return demote_folios(self, pfns, bool(kswapd), engine)

    @property
    def migrate_events(self) -> list[MigrateEvent]:
        """The last :data:`MIGRATE_EVENTS_KEPT` ``migrate_pages()`` calls, oldest first, each as the kernel's
        ``mm_migrate_pages`` tracepoint records it (a CPU fault bringing device pages back is not one)."""
        with self.lock:
            kept = self._migrate_events
            if kept and type(kept[-1]) is tuple:  # records since the last read become events, once
                kept = self._migrate_events = collections.deque(
                    (ev if type(ev) is MigrateEvent else MigrateEvent(*ev) for ev in kept), maxlen=kept.maxlen)
            return list(kept)

    def record_migration(self, succeeded: int, failed: int, thp_succeeded: int, thp_failed: int, thp_split: int,
                         large_folio_split: int, mode: MigrateMode, reason: MigrateReason) -> None:
        """Add one call's ``mm_migrate_pages`` record to :attr:`migrate_events`, the fields of a
        :class:`~dmamig.migrate.result.MigrateEvent` (the core does, holding the lock). Kept as a tuple, made an
        event when first read (every migration call records one; a reader may tell events apart by identity)."""
        self._migrate_events.append((succeeded, failed, thp_succeeded, thp_failed, thp_split, large_folio_split,
                                     mode, reason))

    # -- life cycle ---------------------------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise InvalidArgument("this Machine is closed")

    def close(self) -> None:
        """Close every address space, stop the DMA engine and release the backend. Idempotent."""
        if self._closed:
            return
        for mm in list(self._spaces):
            mm.close()
        self.page_cache.close()
        if self._dma is not None:
            self._dma.close()
        self._backend.close()
        self._closed = True

    def __enter__(self) -> Machine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"Machine(backend={self.backend_name!r}, page_size={self.page_size}, "
                f"nodes={[n.total_pages for n in self._nodes]})")

