"""The all-pairs device-to-device matrix: a working set migrated from each device to each other device.

With two devices or more, ``dmamig bench`` adds one task per ordered pair of devices ``(a, b)``. The task builds
a machine of all the sweep's devices with the sweep's topology (:class:`~dmamig.Topology`; on CUDA what the
runtime reports), measures the pair's copy ceiling on it (:meth:`~dmamig.backends.base.Backend.pair_ceiling`:
a direct peer copy, or the copy staged through host memory where the pair has no peer access), then migrates
the working set from device ``a`` to device ``b`` with ``mm.migrate`` in copy mode (the migrating thread
copies) and in no-copy mode (the DMA engine copies), with the kernel's batching. Each repetition starts on
device ``a``: an untimed no-copy migration brings the pages back after every timed one.

Every timed migration is verified: every page migrated and lies on device ``b``, every page's checksum equals
its source's, and the DMA engine's counters say the copy went the way the topology says (no-copy: all bytes
over the peer link, or all staged through host memory; copy: no DMA at all). The working set is read back
once at the end, and no frame may leak. The ratio of each pair divides by the ceiling of that pair, measured
in the same task, on the same machine.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..sweep.tasks import ProgressFn, Task
from .pairs_figures import PAIR_FOLIO, PairSample, pair_record
from .parsing import PAGE_SIZE, folio_order
from .scenarios import BenchSettings
from .verify import check, random_bytes, range_pfns, verify_no_leak, verify_pages, verify_result

__all__ = [
    "MAX_PAIR_DEVICES",
    "PairScenario",
    "check_pair_bytes",
    "pair_options",
    "pair_scenarios",
    "pair_tasks",
    "parse_device_count",
    "run_pair",
]

#: Most devices the matrix spans (56 ordered pairs).
MAX_PAIR_DEVICES = 8
_MODES = ("copy", "nocopy")


@dataclass(frozen=True)
class PairScenario:
    """One ordered device pair: what :func:`run_pair` runs for a ``"pairs"`` task.

    Attributes
    ----------
    src, dst : int
        Source and destination device (not node) ids.
    devices : int
        Devices of the machine the pair runs on (the sweep's).
    pair_bytes : int
        The working set migrated.
    channels : int
        DMA channels per device of the no-copy migration.
    """

    src: int
    dst: int
    devices: int
    pair_bytes: int
    channels: int

    @property
    def id(self) -> str:
        """The task's id, e.g. ``pairs/d0-d3``; its records append the mode (``/copy``, ``/nocopy/ch2``)."""
        return f"pairs/d{self.src}-d{self.dst}"

    def record_id(self, mode: str) -> str:
        """The id of the record of ``mode``, e.g. ``pairs/d0-d3/nocopy/ch2``."""
        return f"{self.id}/{mode}" + (f"/ch{self.channels}" if mode == "nocopy" else "")

    @property
    def pages(self) -> int:
        """Base pages of the working set."""
        return self.pair_bytes // PAGE_SIZE


def check_pair_bytes(nbytes: int) -> int:
    """``nbytes`` if it is a usable pair working set: a positive whole number of 2 MiB folios.

    Raises
    ------
    ValueError
        Saying what a usable size looks like.
    """
    if nbytes <= 0 or nbytes % PAIR_FOLIO:
        raise ValueError(f"{nbytes} bytes is not a whole number of 2 MiB folios (the pairs migrate 2 MiB "
                         f"folios); use e.g. 16M or 256M")
    return nbytes


def parse_device_count(text: str) -> int:
    """Parse ``--devices``: a whole number from 1 to :data:`MAX_PAIR_DEVICES`.

    Raises
    ------
    ValueError
        Saying what is allowed.
    """
    n = MAX_PAIR_DEVICES
    word = str(text).strip()
    if not (word.isascii() and word.isdigit()) or not 1 <= int(word) <= n:
        raise ValueError(f"{text!r} is not a device count; use a whole number from 1 to {n} ({n} devices: "
                         f"{n * (n - 1)} ordered pairs)")
    return int(text)


def pair_options(backend: str, gpus: int, devices: int, topology: str | None, pair_total: int | None,
                 no_pairs: bool, check_gpus: bool = True) -> dict[str, Any]:
    """The :class:`~dmamig.bench.scenarios.BenchSettings` fields that ``--topology``, ``--pair-total`` and
    ``--no-pairs`` set, for a sweep of ``devices`` devices on ``backend`` with ``gpus`` GPUs visible.

    Raises
    ------
    ValueError
        A usage error, naming the option: more devices than GPUs on cuda (unless not ``check_gpus``), a
        topology on cuda, for one device, or ``dgx1`` for other than 8 devices; a pair size without pairs.
    """
    over: dict[str, Any] = {}
    if backend == "cuda" and check_gpus and devices > gpus:
        raise ValueError(f"argument --devices: {devices} devices, but {gpus} GPU(s) are visible on the cuda "
                         f"backend; use --devices {max(gpus, 1)} or fewer (or --backend cpu to emulate more)")
    if topology is not None:
        if backend == "cuda":
            raise ValueError("argument --topology: a cpu-backend setting; on cuda the runtime reports the GPUs' "
                             "topology (dmamig info shows it); drop --topology")
        if topology == "dgx1" and devices != 8:  # before the general rule: dgx1 has exactly one right answer
            raise ValueError(f"argument --topology: dgx1 has 8 devices; use --devices 8, not {devices}")
        if devices < 2:
            raise ValueError(f"argument --topology: needs --devices 2 or more (a topology links devices); got "
                             f"{devices} device")
        over["topology"] = topology
    if pair_total is not None:
        if devices < 2 or no_pairs:
            raise ValueError("argument --pair-total: sizes the device pairs, which need --devices 2 or more and "
                             "no --no-pairs")
        over["pair_bytes"] = pair_total
    if no_pairs:
        over["pairs"] = False
    return over


def pair_scenarios(settings: BenchSettings) -> list[PairScenario]:
    """Every ordered pair of distinct devices, source-major (empty with one device or without ``pairs``).

    No-copy uses the sweep's largest channel count.
    """
    n = settings.devices
    if not settings.pairs or n < 2:
        return []
    ch = max(settings.channels)
    return [PairScenario(a, b, n, settings.pair_bytes, ch) for a in range(n) for b in range(n) if a != b]


def pair_tasks(settings: BenchSettings) -> list[Task]:
    """One task per :func:`pair_scenarios` entry, each with two records (copy, no-copy). They need no
    direction ceiling: each measures its pair's own, on its own machine."""
    reps = settings.warmup + settings.repeat
    return [Task(sc.id, f"device {sc.src} -> device {sc.dst}", "pairs", len(_MODES) * reps, (), sc, 4000 + i)
            for i, sc in enumerate(pair_scenarios(settings))]


# -- running one pair ------------------------------------------------------------------------------------------

def _node_of(m: Any, device: int) -> int:
    return next(n.id for n in m.nodes if n.kind == "device" and n.device == device)


def _ceiling(m: Any, sc: PairScenario, staged: bool, repeat: int) -> tuple[float, str]:
    """Best seconds of the pair's plain copy on ``m``'s backend, and how it was measured."""
    secs = float(m.backend.pair_ceiling(sc.src, sc.dst, sc.pair_bytes, repeat=repeat))
    route = (f"staged through host memory ({'pinned, ' if m.backend_name == 'cuda' else ''}two copies per "
             f"chunk)" if staged else "direct peer copy")
    how = "cudaMemcpyPeerAsync/cudaMemcpyAsync, CUDA events" if m.backend_name == "cuda" else "np.copyto"
    return secs, f"device {sc.src} -> device {sc.dst}, {route}, {how}, best of {repeat}"


def _check_route(stats: Any, sc: PairScenario, mode: str, staged: bool, what: str) -> None:
    """The DMA counters of one timed migration: the way the topology says, every byte once."""
    if mode == "copy":
        check(stats.bytes == 0 and stats.peer_bytes == 0 and stats.staged_bytes == 0, what,
              f"copy migration submitted {stats.bytes} bytes to the DMA engine; the migrating thread copies")
        return
    want = (0, sc.pair_bytes) if staged else (sc.pair_bytes, 0)
    got = (stats.peer_bytes, stats.staged_bytes)
    check(got == want, what, f"the DMA engine copied {got[0]} bytes peer-to-peer and staged {got[1]} through "
                             f"host memory; the topology says {'staged' if staged else 'peer'}: expected "
                             f"{want[0]} peer and {want[1]} staged")
    check((stats.staged_runs > 0) == staged and (stats.peer_runs > 0) == (not staged), what,
          f"{stats.peer_runs} peer and {stats.staged_runs} staged runs for a "
          f"{'staged' if staged else 'peer'} pair")


def run_pair(sc: PairScenario, settings: BenchSettings, progress: ProgressFn, seed: int) -> list[dict[str, Any]]:
    """Run one device pair (a ``"pairs"`` task): its ceiling, then copy and no-copy migration; two records.

    Raises
    ------
    VerificationError
        A page that did not migrate, lies on another node or holds other bytes; DMA counters that do not
        follow the topology; a leaked frame.
    """
    from ..flags import MigrateMode
    from ..machine import Machine
    from ..migrate.options import FAITHFUL

    pages, nbytes = sc.pages, sc.pair_bytes
    room = (-(-pages // 512) + 1) * 512  # whole 2 MiB blocks and a spare one, as every bench machine has
    m = Machine(host_pages=room, device_pages=room, devices=sc.devices, page_size=PAGE_SIZE,
                backend=settings.backend, channels=sc.channels, topology=settings.machine_topology(sc.devices),
                dma_poll_us=settings.machine_poll())
    try:
        topo = m.topology
        staged, link = topo.staged(sc.src, sc.dst), topo.link(sc.src, sc.dst)
        src, dst = _node_of(m, sc.src), _node_of(m, sc.dst)
        repeat = max(3, settings.repeat)
        ceiling = _ceiling(m, sc, staged, repeat)
        samples: dict[str, list[PairSample]] = {mode: [] for mode in _MODES}
        mm = m.address_space()
        try:
            addr = mm.mmap(nbytes, order=folio_order(PAIR_FOLIO))
            data = random_bytes(nbytes, seed)
            mm.write(addr, data)
            res = mm.migrate(addr, nbytes, src, engine=m.dma)
            verify_result(res, pages, f"{sc.id}: populate device {sc.src}")
            ref = np.asarray(m.dma.checksum(range_pfns(mm, addr, pages)))
            for mode in _MODES:
                engine = m.dma if mode == "nocopy" else None
                for rep in range(settings.warmup + settings.repeat):
                    what = f"{sc.id} {mode}, repetition {rep + 1}"
                    verify_pages(m, range_pfns(mm, addr, pages), src, None, what)
                    m.dma.reset_stats()
                    c0, t0 = time.thread_time_ns(), time.perf_counter_ns()
                    res = mm.migrate(addr, nbytes, dst, mode=MigrateMode.SYNC, engine=engine, options=FAITHFUL)
                    wall, cpu = time.perf_counter_ns() - t0, time.thread_time_ns() - c0
                    stats = m.dma.stats
                    verify_result(res, pages, what)
                    ran = getattr(res, "options", None)
                    check(ran is None or ran == FAITHFUL, what, f"ran with {ran}, not the kernel's batching")
                    verify_pages(m, range_pfns(mm, addr, pages), dst, ref, what)
                    _check_route(stats, sc, mode, staged, what)
                    if rep >= settings.warmup:
                        samples[mode].append(PairSample(wall, cpu, res, stats))
                    back = mm.migrate(addr, nbytes, src, engine=m.dma)  # untimed: the next one starts on src
                    verify_result(back, pages, f"{what}, back to device {sc.src}")
                    progress(f"device {sc.src} -> device {sc.dst} {mode}", 1)
            got = mm.read(addr, nbytes)
            bad = np.flatnonzero(got != data)
            check(bad.size == 0, sc.id, f"read-back: {bad.size} bytes differ from the bytes written (first at "
                                        f"offset {bad[:1].tolist()})")
        finally:
            mm.close()
        verify_no_leak(m, sc.id)
    finally:
        m.close()
    where = {"src_device": sc.src, "dst_device": sc.dst, "link": link, "peer": not staged, "staged": staged,
             "topology": topo.name}
    return [pair_record(sc, mode, samples[mode], ceiling, where) for mode in _MODES]
