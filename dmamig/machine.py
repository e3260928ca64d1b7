"""Machine: the emulated computer — memory nodes, struct pages, a backend, a DMA engine and vmstat."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ._arrays import add_at, distinct
from ._validate import as_pfn_array, check_node, check_positive_int
from .backends import open_backend
from .errors import InvalidArgument, OutOfMemory
from .fault import FaultPoints
from .flags import MigrateMode, PageFlag
from .nodes import MAX_ORDER, Node, NodeMap
from .pages import PageArray
from .topology import ROUTE_STAGED, Topology, node_routes, resolve_topology

if TYPE_CHECKING:
    from .dma import DmaEngine
    from .migrate import MigrateResult
    from .migrate.options import MigrateOptions
    from .mm import AddressSpace, MemObject

__all__ = ["Machine"]

#: Most frames a node may have (1 TiB of 4 KiB pages): struct-page state costs tens of bytes per frame.
MAX_NODE_PAGES = 1 << 28
#: Most nodes (host nodes and devices): the pfn-to-node table holds node ids in one signed byte.
MAX_NODES = 127

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
)


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
        non-present device-private entry, every CPU access migrates the page back (or fails), and a pin
        migrates device pages back first, as a ``FOLL_LONGTERM`` pin does.
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
    """

    def __init__(self, host_pages: int = 8192, device_pages: int = 8192, devices: int = 1,
                 page_size: int = 4096, backend: str = "auto", channels: int = 4,
                 device_memory: str = "coherent", host_nodes: Sequence[Any] | None = None,
                 topology: Topology | None = None):
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
        self._backend = open_backend(backend)
        try:
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
                frames = self._backend.alloc_frames(kind, dev, count, self._page_size)
                nodes.append(Node(nid, kind, dev, base, count, frames))
                base += count
        except Exception:
            self._backend.close()
            raise
        self._nodes = tuple(nodes)
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
        self.changed = threading.Condition(self.lock)
        self._objects: dict[int, MemObject] = {}
        self._object_ids = itertools.count(1)
        self._spaces: list[AddressSpace] = []
        self._vmstat = dict.fromkeys(VMSTAT_COUNTERS, 0)
        self._dma: DmaEngine | None = None
        self._faults = FaultPoints()
        self._page_refs: dict[int, int] = {}  # references taken with get_page, by folio head
        self._closed = False

    # -- read-only properties --------------------------------------------------------------------------------
    backend = property(lambda self: self._backend, doc="The backend object that owns the frames.")
    backend_name = property(lambda self: self._backend.name, doc='"cpu" or "cuda".')
    page_size = property(lambda self: self._page_size, doc="Bytes per base page.")
    nodes = property(lambda self: self._nodes, doc="Tuple of Node; nodes[0] is host RAM.")
    access_cost = property(lambda self: self._access_cost,
                           doc="Relative cost per byte a CPU access pays on each node (host tiers as given in "
                               "``host_nodes``; 1.0 for node 0 and devices by default).")
    host_node_ids = property(lambda self: tuple(n.id for n in self._nodes if n.kind == "host"),
                             doc="Ids of the host memory nodes (tiers), fastest first as given.")
    device_private = property(lambda self: self._device_private,
                              doc='True when device memory is device-private (``device_memory="private"``).')
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

    @property
    def faults(self) -> FaultPoints:
        """The machine's fault points (``alloc``, ``dma_submit``, ``dma_copy``, ``dma_complete``,
        ``channel_crash``); see :mod:`dmamig.fault`."""
        return self._faults

    @property
    def dma(self) -> DmaEngine:
        """The device DMA engine (created on first use)."""
        if self._dma is None:
            self._check_open()
            from .dma import DmaEngine

            self._dma = DmaEngine(nodes=self._nodes, nodemap=self.nodemap, backend=self._backend,
                                  page_size=self._page_size, channels=self._channels, faults=self._faults,
                                  on_submit=self.pages.note_written, topology=self._topology)
        return self._dma

    # -- address spaces --------------------------------------------------------------------------------------
    def address_space(self) -> AddressSpace:
        """Create a new, empty address space (a process)."""
        self._check_open()
        from .mm import AddressSpace

        mm = AddressSpace(self)
        with self.lock:
            self._spaces.append(mm)
        return mm

    def register_object(self, obj: MemObject) -> int:
        """Give an address-space object (anon or shared memory) its ``mapping`` id."""
        oid = next(self._object_ids)
        self._objects[oid] = obj
        return oid

    def unregister_object(self, oid: int) -> None:
        self._objects.pop(oid, None)

    def object(self, oid: int) -> MemObject:
        """The object whose ``mapping`` id is ``oid``."""
        return self._objects[oid]

    def object_or_none(self, oid: int) -> MemObject | None:
        """The object whose ``mapping`` id is ``oid``, or None once it was released."""
        return self._objects.get(oid)

    def forget_space(self, mm: AddressSpace) -> None:
        if mm in self._spaces:
            self._spaces.remove(mm)

    # -- frames ------------------------------------------------------------------------------------------------
    def node_of_pfns(self, pfns: np.ndarray) -> np.ndarray:
        """Node id of each pfn."""
        return self.nodemap.node_of(pfns)

    def alloc_folios(self, node: int, count: int, order: int = 0) -> np.ndarray:
        """Allocate up to ``count`` folios of ``order`` on ``node`` (caller holds the lock); return head pfns.

        Each folio comes back with refcount 1 and clean state. Fewer than ``count`` come back when the node is
        short of (contiguous) frames.
        """
        nd = self._nodes[node]
        if self._faults.armed:  # an injected allocation failure at folio k returns the k folios before it
            count = self._faults.allowed("alloc", int(count), self._page_size << order)
        heads = nd.allocator.alloc(count, order) + nd.base_pfn
        if heads.size:
            self.pages.prep_new(heads, order)
        return heads

    def free_folios(self, heads: np.ndarray) -> None:
        """Return whole folios to their nodes' allocators (caller holds the lock)."""
        heads = np.asarray(heads, dtype=np.int64)
        if heads.size == 0:
            return
        pfns = self.pages.expand(heads)
        self.pages.reset(pfns)
        self.free_frames(pfns)

    def free_frames(self, pfns: np.ndarray) -> None:
        """Return base frames already reset to the free state to their nodes' allocators (lock held)."""
        nid, frame = self.nodemap.locate(pfns)
        nodes = distinct(nid)
        if len(nodes) == 1:
            self._nodes[nodes[0]].allocator.free(frame)
            return
        for n in nodes:
            self._nodes[n].allocator.free(frame[nid == n])

    def put_folios(self, heads: np.ndarray, refs: np.ndarray | int = 1, unique: bool = False) -> None:
        """Drop references on folios and free those whose refcount reaches zero (caller holds the lock).

        ``unique=True`` promises that ``heads`` has no repeats (a faster path).
        """
        heads = np.asarray(heads, dtype=np.int64)
        if heads.size == 0:
            return
        add_at(self.pages.refcount, heads, -np.asarray(refs), unique)
        dead = heads[self.pages.refcount[heads] <= 0]
        if not unique:
            dead = np.unique(dead)
        if dead.size:
            if (self.pages.refcount[dead] < 0).any():
                raise RuntimeError(f"refcount underflow on pfns {dead[self.pages.refcount[dead] < 0][:8]}")
            self.free_folios(dead)

    def frames_of(self, pfns: np.ndarray) -> list[tuple[int, np.ndarray, np.ndarray]]:
        """Group pfns by node: ``[(node_id, positions, frame_indices), ...]``."""
        nid, frame = self.nodemap.locate(np.asarray(pfns, dtype=np.int64))
        out = []
        for n in distinct(nid):
            pos = np.flatnonzero(nid == n)
            out.append((n, pos, frame[pos]))
        return out

    def read_pfns(self, pfns: np.ndarray) -> np.ndarray:
        """Host copy of the frames at ``pfns``, shape ``(len(pfns), page_size)``."""
        out = np.empty((len(pfns), self._page_size), dtype=np.uint8)
        for n, pos, frame in self.frames_of(pfns):
            out[pos] = self._backend.read_frames(self._nodes[n].frames, frame)
        return out

    def write_pfns(self, pfns: np.ndarray, data: np.ndarray) -> None:
        """Store ``data`` (``(len(pfns), page_size)`` uint8) into the frames at ``pfns``."""
        for n, pos, frame in self.frames_of(pfns):
            self._backend.write_frames(self._nodes[n].frames, frame, data[pos])
        self.pages.note_written(pfns)

    def zero_pfns(self, pfns: np.ndarray) -> None:
        """Zero the frames at ``pfns``."""
        for n, _pos, frame in self.frames_of(pfns):
            self._backend.zero_frames(self._nodes[n].frames, frame)
        self.pages.note_written(pfns)

    def copy_folios(self, src_heads: np.ndarray, dst_heads: np.ndarray) -> None:
        """Copy folios on the calling thread (the CPU copy path), grouped by node pair."""
        if src_heads.size:
            nr = self.pages.nr_pages(src_heads)
            self._copy_runs(src_heads, dst_heads, nr)
            self.pages.note_written(dst_heads if (nr == 1).all() else self.pages.expand(dst_heads))

    def copy_pages(self, src_pfns: np.ndarray, dst_pfns: np.ndarray) -> None:
        """Copy base pages on the calling thread, ``src_pfns[i]`` to ``dst_pfns[i]``."""
        if src_pfns.size:
            self._copy_runs(src_pfns, dst_pfns, np.ones(src_pfns.size, dtype=np.int64))
            self.pages.note_written(dst_pfns)

    def _copy_runs(self, src: np.ndarray, dst: np.ndarray, nr: np.ndarray) -> None:
        """``nr[i]`` frames from ``src[i]`` to ``dst[i]``, one backend call per (source, destination) node pair."""
        snid, sframe = self.nodemap.locate(src)
        dnid, dframe = self.nodemap.locate(dst)
        s0, d0 = int(snid[0]), int(dnid[0])
        if (snid == s0).all() and (dnid == d0).all():  # one node pair: the common case
            self._copy_pair(s0, sframe, d0, dframe, nr)
            return
        pair = snid * len(self._nodes) + dnid
        for p in distinct(pair):
            sel = pair == p
            s, d = divmod(p, len(self._nodes))
            self._copy_pair(s, sframe[sel], d, dframe[sel], nr[sel])

    def _copy_pair(self, s: int, sframe: np.ndarray, d: int, dframe: np.ndarray, nr: np.ndarray) -> None:
        # Devices without peer access: the backend stages the copy through host memory (only then is the
        # keyword passed, so backends that predate staging keep working for every other pair).
        if self._staged[s][d]:
            self._backend.copy_folios(self._nodes[s].frames, sframe, self._nodes[d].frames, dframe, nr, staged=True)
        else:
            self._backend.copy_folios(self._nodes[s].frames, sframe, self._nodes[d].frames, dframe, nr)

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
            heads = self.alloc_folios(node, count, order)
            if heads.size < count:
                self.free_folios(heads)
                raise OutOfMemory(f"node {node} has only {heads.size} free order-{order} blocks, {count} requested")
            pfns = self.pages.expand(heads)
            self.zero_pfns(pfns)
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
            self.put_folios(heads)

    def migrate_pages(self, pfns: Any, node: int, mode: MigrateMode = MigrateMode.SYNC,
                      dst_pfns: Any = None, options: MigrateOptions | None = None) -> MigrateResult:
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

        Returns
        -------
        MigrateResult
            Per-page status of ``pfns`` (``0`` or ``-errno``) and counters.
        """
        from .migrate.core import migrate_pfns

        self._check_open()
        return migrate_pfns(self, pfns, node, mode, dst_pfns, options)

    # -- controls that emulate the rest of the kernel ---------------------------------------------------------
    def _head(self, pfn: int) -> int:
        pfn = int(as_pfn_array(self, "pfn", np.array([pfn]))[0])
        return int(self.pages.head[pfn])

    def lock_page(self, pfn: int, blocking: bool = True) -> bool:
        """Lock the folio of ``pfn`` (PG_locked), as another kernel path would; return False if busy."""
        head = self._head(pfn)
        with self.changed:
            while self.pages.test(head, PageFlag.LOCKED):
                if not blocking:
                    return False
                self.changed.wait()
            self.pages.set(head, PageFlag.LOCKED)
        return True

    def unlock_page(self, pfn: int) -> None:
        """Unlock the folio of ``pfn`` and wake waiters."""
        head = self._head(pfn)
        with self.changed:
            if not self.pages.test(head, PageFlag.LOCKED):
                raise InvalidArgument(f"pfn {pfn} is not locked")
            self.pages.clear(head, PageFlag.LOCKED)
            self.changed.notify_all()

    def start_writeback(self, pfn: int, blocking: bool = True) -> bool:
        """Start writeback on the folio of ``pfn`` (PG_writeback), as the kernel does: under the folio lock.

        A folio that a migration holds locked cannot start writeback until the migration lets it go: with
        ``blocking`` the call waits for the lock, otherwise it returns False at once. Returns True once
        writeback has started.
        """
        head = self._head(pfn)
        with self.changed:
            while self.pages.test(head, PageFlag.LOCKED):
                if not blocking:
                    return False
                self.changed.wait()
            self.pages.set(head, PageFlag.WRITEBACK)
            self.changed.notify_all()
        return True

    def end_writeback(self, pfn: int) -> None:
        """End writeback on the folio of ``pfn`` and wake waiters."""
        self.clear_page_flags(pfn, PageFlag.WRITEBACK)

    def set_page_flags(self, pfn: int, flags: PageFlag) -> None:
        """Set page flags on the folio of ``pfn`` (referenced, active, dirty, unevictable, ...)."""
        self._change_flags(pfn, flags, self.pages.set)

    def clear_page_flags(self, pfn: int, flags: PageFlag) -> None:
        """Clear page flags on the folio of ``pfn`` and wake waiters."""
        self._change_flags(pfn, flags, self.pages.clear)

    def _change_flags(self, pfn: int, flags: PageFlag, change: Any) -> None:
        head = self._head(pfn)
        flags = PageFlag(flags)
        if flags & (PageFlag.HEAD | PageFlag.ISOLATED | PageFlag.LOCKED):
            raise InvalidArgument("HEAD, ISOLATED and LOCKED are managed by the core; use lock_page and "
                                  "unlock_page for LOCKED")
        with self.changed:
            change(head, flags)
            self.changed.notify_all()

    def page_flags(self, pfn: int) -> PageFlag:
        """Flags of the folio containing ``pfn``."""
        head = self._head(pfn)
        with self.lock:
            return PageFlag(int(self.pages.flags[head]))

    def get_page(self, pfn: int) -> None:
        """Take a transient reference on the folio of ``pfn`` (a speculative lookup or short GUP)."""
        head = self._head(pfn)
        with self.lock:
            if self.pages.refcount[head] <= 0:
                raise InvalidArgument(f"pfn {pfn} is free; only an in-use page can be referenced")
            self.pages.refcount[head] += 1
            self._page_refs[head] = self._page_refs.get(head, 0) + 1

    def put_page(self, pfn: int) -> None:
        """Drop a reference taken with :meth:`get_page`; the folio is freed if it was the last one."""
        head = self._head(pfn)
        with self.changed:
            held = self._page_refs.get(head, 0)
            if held <= 0:
                raise InvalidArgument(f"pfn {pfn} holds no reference taken with get_page to drop")
            if held == 1:
                del self._page_refs[head]
            else:
                self._page_refs[head] = held - 1
            self.put_folios(np.array([head]))
            self.changed.notify_all()

    def set_page_cpupid(self, pfn: int, cpupid: int) -> None:
        """Set the folio's ``last_cpupid`` (NUMA-balancing hint) as a fault on a CPU would."""
        head = self._head(pfn)
        with self.lock:
            self.pages.last_cpupid[head] = cpupid

    def page_state(self, pfn: int) -> dict:
        """A dict snapshot of the struct page of ``pfn`` and its folio head, for inspection and tests."""
        p = int(as_pfn_array(self, "pfn", np.array([pfn]))[0])
        with self.lock:
            pg = self.pages
            h = int(pg.head[p])
            return {
                "pfn": p, "head": h, "node": int(self.nodemap.node_of(np.array([p]))[0]),
                "flags": PageFlag(int(pg.flags[h])), "refcount": int(pg.refcount[h]),
                "mapcount": int(pg.mapcount[p]), "mapping": int(pg.mapping[p]), "index": int(pg.index[p]),
                "private": int(pg.private[h]), "last_cpupid": int(pg.last_cpupid[h]),
                "memcg": int(pg.memcg[h]), "order": int(pg.order[h]),
            }

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

