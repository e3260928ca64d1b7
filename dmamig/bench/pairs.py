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

Records: a pair record has every field a bench record has (kind ``pairs``, direction ``d2d``; ``gbps`` is the
working set over the median wall time of one migration from ``src_device`` to ``dst_device``), and says where
it ran: the link class, peer access or staged, and the topology's name. ``ceiling_gbps`` is that pair's own
ceiling (``ceiling_route``: peer or staged). The report shows the pairs as matrices, and the plots as heat
maps: one cell per ordered pair, source device per row, destination per column, each annotated with its
figure and its link class (NV nvlink, PS pcie-switch, PH pcie-host); pairs without peer access are hatched and
starred. Colour scales start at zero.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..migrate.options import FAITHFUL
from ..sweep.tasks import ProgressFn, Task
from ..topology import LINK_CODES, Topology
from .naming import format_size
from .plots import pyplot
from .settings import PAGE_SIZE, BenchSettings, folio_order
from .timing import timed_call, timing_fields
from .verify import check, random_bytes, range_pfns, verify_no_leak, verify_pages, verify_result

__all__ = [
    "MAX_PAIR_DEVICES",
    "PAIR_FOLIO",
    "PairSample",
    "PairScenario",
    "add_pair_speedups",
    "check_pair_bytes",
    "pair_groups",
    "pair_matrix",
    "pair_options",
    "pair_record",
    "pair_scenarios",
    "pair_table",
    "pair_tasks",
    "pair_topology",
    "pairs_of",
    "parse_device_count",
    "plot_pair_gbps",
    "plot_pair_ratio",
    "run_pair",
    "write_pair_plots",
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
    """The :class:`~dmamig.bench.settings.BenchSettings` fields that ``--topology``, ``--pair-total`` and
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
                dma_poll_us=settings.machine_poll(), dma_engine=settings.machine_dma_engine())
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
                    res, wall, cpu = timed_call(mm.migrate, addr, nbytes, dst, mode=MigrateMode.SYNC, engine=engine,
                                                options=FAITHFUL)
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


#: Folio size every pair migrates: PMD-sized folios, one per kernel batch, so that the figure is the link's.
PAIR_FOLIO = 2 << 20
_CHANNELS_WORDS = {1: "1 DMA channel"}


@dataclass
class PairSample:
    """One timed migration of a pair: wall and migrating-thread CPU time, its result and the DMA counters."""

    wall: int
    cpu: int
    result: Any
    stats: Any


def _channels(n: int) -> str:
    return _CHANNELS_WORDS.get(n, f"{n} DMA channels")


def pair_record(sc: Any, mode: str, samples: list[PairSample], ceiling: tuple[float, str],
                where: dict[str, Any]) -> dict[str, Any]:
    """The record of one mode of a :class:`~dmamig.bench.pairs.PairScenario` from its timed samples.

    Parameters
    ----------
    sc : PairScenario
        The pair.
    mode : str
        ``"copy"`` or ``"nocopy"``.
    samples : list of PairSample
        The timed repetitions.
    ceiling : tuple
        Best seconds of the pair's plain copy, and how it was measured.
    where : dict
        ``src_device``, ``dst_device``, ``link``, ``peer``, ``staged``, ``topology``.
    """
    pages, nbytes = sc.pages, sc.pair_bytes
    ceil_s, method = ceiling
    ceil_gbps = nbytes / ceil_s / 1e9 if ceil_s > 0 else 0.0
    timing = timing_fields(nbytes, pages, [s.wall for s in samples], [s.cpu for s in samples],
                           [getattr(s.result, "phase_ns", None) or {} for s in samples], ceil_gbps, method)
    last = samples[-1]
    how = "copy" if mode == "copy" else f"no-copy, {_channels(sc.channels)}"
    route = "staged through host memory" if where["staged"] else f"peer, {where['link']}"
    rec: dict[str, Any] = {
        "id": sc.record_id(mode),
        "name": f"device {sc.src} -> device {sc.dst} ({route}), 2M folios, {how}",
        "kind": "pairs",
        "mode": mode,
        "direction": "d2d",
        "direction_name": f"device {sc.src}->device {sc.dst}",
        "layout": "",
        "folio_bytes": PAIR_FOLIO,
        "folio_order": (PAIR_FOLIO // PAGE_SIZE).bit_length() - 1,
        "channels": sc.channels if mode == "nocopy" else None,
        "options": FAITHFUL.as_dict(),
        "batching": "faithful",
        "bytes": nbytes,
        "pages": pages,
        **timing,
        "ceiling_route": "staged" if where["staged"] else "peer",
        "ceiling_seconds": ceil_s,
        "nr_succeeded": int(last.result.nr_succeeded),
        "nr_failed": int(last.result.nr_failed),
        "nr_thp_split": int(getattr(last.result, "nr_thp_split", 0)),
        "dma_peer_bytes": int(last.stats.peer_bytes),
        "dma_staged_bytes": int(last.stats.staged_bytes),
        "verified": True,
    }
    rec.update(where)
    return rec


def add_pair_speedups(records: list[dict[str, Any]]) -> None:
    """Fill ``speedup_vs_copy`` (and ``speedup_vs``, ``speedup_vs_faithful_copy``) of every no-copy pair
    record: its GB/s over the copy record of the same pair (both run the kernel's batching)."""
    copies = {(r["src_device"], r["dst_device"]): r for r in records
              if r["kind"] == "pairs" and r["mode"] == "copy"}
    for r in records:
        if r["kind"] != "pairs" or r["mode"] != "nocopy":
            continue
        base = copies.get((r["src_device"], r["dst_device"]))
        if base is not None and base["gbps"] > 0:
            r["speedup_vs_copy"] = r["speedup_vs_faithful_copy"] = r["gbps"] / base["gbps"]
            r["speedup_vs"] = base["id"]


# -- matrices --------------------------------------------------------------------------------------------------

def pairs_of(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The pair records among ``records``."""
    return [r for r in records if r["kind"] == "pairs"]


def pair_matrix(records: list[dict[str, Any]], field: str) -> list[list[Any]]:
    """``out[a][b]``: ``field`` of the record of the pair ``(a, b)`` among ``records`` (one mode), ``None``
    where there is none (the diagonal, pairs that did not run). Sized by the largest device id seen."""
    n = 1 + max((max(r["src_device"], r["dst_device"]) for r in records), default=-1)
    out: list[list[Any]] = [[None] * n for _ in range(n)]
    for r in records:
        out[r["src_device"]][r["dst_device"]] = r.get(field)
    return out


def pair_topology(records: list[dict[str, Any]], source: str = "setting") -> Topology | None:
    """The topology the pair records ran on, rebuilt from their link and peer fields (``None`` without a
    complete matrix); ``source`` says where the records' machines had it from."""
    recs = pairs_of(records)
    if not recs:
        return None
    links, peer = pair_matrix(recs, "link"), pair_matrix(recs, "peer")
    n = len(links)
    if any(links[a][b] is None for a in range(n) for b in range(n) if a != b):
        return None
    return Topology(links, [[a == b or bool(peer[a][b]) for b in range(n)] for a in range(n)],
                    name=recs[0].get("topology") or "custom", source=source)


def pair_groups(records: list[dict[str, Any]]) -> list[tuple[str, list[dict[str, Any]]]]:
    """The pair records by mode (copy first, then no-copy by channel count), titled."""
    out = []
    keys = sorted({(r["mode"] != "copy", r.get("channels") or 0) for r in records})
    for nocopy, ch in keys:
        rows = [r for r in records if (r["mode"] != "copy", r.get("channels") or 0) == (nocopy, ch)]
        out.append((f"no-copy, {_channels(ch)}" if nocopy else "copy", rows))
    return out


def pair_table(records: list[dict[str, Any]]) -> list[Any]:
    """What the report prints of the pair records: per mode a rich table, the matrix of GB/s and ratio to
    the pair's ceiling (source device per row, destination per column; ``*`` staged through host memory), then
    the ceilings with each pair's link class, then a line saying how to read them (empty without pairs)."""
    from rich.table import Table

    recs = pairs_of(records)
    if not recs:
        return []
    tables = []
    size = ", ".join(sorted({f"{r['bytes'] >> 20} MiB" for r in recs}))
    for title, rows in pair_groups(recs):
        gbps, ratio, staged = (pair_matrix(rows, f) for f in ("gbps", "ceiling_ratio", "staged"))
        ok = all(r["verified"] for r in rows)
        t = Table(title=f"Device pairs, {title}: GB/s, x the pair's ceiling"
                        + ("" if ok else " [red]UNVERIFIED records[/red]"), title_justify="left")
        t.add_column("from \\ to", justify="left")
        n = len(gbps)
        for b in range(n):
            t.add_column(f"d{b}", justify="right", no_wrap=True)
        for a in range(n):
            cells = []
            for b in range(n):
                if gbps[a][b] is None:
                    cells.append("-")
                    continue
                x = "" if ratio[a][b] is None else f" {ratio[a][b]:.2f}x"
                cells.append(f"{gbps[a][b]:.2f}{x}{'*' if staged[a][b] else ''}")
            t.add_row(f"d{a}", *cells)
        tables.append(t)
    first = pair_groups(recs)[0][1]
    ceil, link, staged = (pair_matrix(first, f) for f in ("ceiling_gbps", "link", "staged"))
    t = Table(title="Device pair ceilings: link, GB/s", title_justify="left")
    t.add_column("from \\ to", justify="left")
    for b in range(len(ceil)):
        t.add_column(f"d{b}", justify="right", no_wrap=True)
    for a in range(len(ceil)):
        t.add_row(f"d{a}", *("-" if ceil[a][b] is None else
                             f"{LINK_CODES.get(link[a][b], '?')}{'*' if staged[a][b] else ''} {ceil[a][b]:.2f}"
                             for b in range(len(ceil))))
    tables.append(t)
    tables.append(f"Device pairs: {size} of 2M folios each, the kernel's batching; rows: source device, columns: "
                  f"destination; * no peer access, copies staged through host memory; NV nvlink, PS pcie-switch, "
                  f"PH pcie-host; each pair's ceiling is its plain copy (peer, or staged), measured in its task")
    return tables


_STAGED_WORDS = "hatched, *: no peer access, copies staged through host memory"
_LINK_WORDS = "NV nvlink, PS pcie-switch, PH pcie-host"


def _context(doc: dict[str, Any], recs: list[dict[str, Any]]) -> str:
    s, m = doc["settings"], doc["machine"]
    gpus = sorted({g["name"] for g in m.get("gpus") or []})
    where = f"{m['backend']} backend" + (f" ({', '.join(gpus)})" if gpus else "")
    topo = (m.get("topology") or {}).get("name") or recs[0].get("topology") or "?"
    sizes = "/".join(format_size(b) for b in sorted({r["bytes"] for r in recs}))
    reps = f"median of {s['repeat']} repetitions" if s["repeat"] > 1 else "1 repetition"
    return f"{where}, topology {topo}, {sizes} per pair in 2M folios, kernel's batching, {reps}"


def _heatmap(ax: Any, recs: list[dict[str, Any]], field: str, vmax: float, fmt: str, cmap: str) -> Any:
    """Draw one matrix of ``field`` on ``ax``; return the image (for a colour bar)."""
    import numpy as np

    values = pair_matrix(recs, field)
    link, staged = pair_matrix(recs, "link"), pair_matrix(recs, "staged")
    n = len(values)
    grid = np.array([[np.nan if v is None else float(v) for v in row] for row in values], dtype=float)
    import matplotlib

    colors = matplotlib.colormaps[cmap].with_extremes(bad="#eeeeee")  # the diagonal and missing pairs
    img = ax.imshow(np.ma.masked_invalid(grid), cmap=colors, vmin=0.0, vmax=vmax or 1.0)
    small = 8 if n <= 4 else 7
    for a in range(n):
        for b in range(n):
            v = values[a][b]
            if v is None:
                ax.text(b, a, "-" if a == b else "n/a", ha="center", va="center", fontsize=small, color="#888888")
                continue
            if staged[a][b]:
                ax.add_patch(_hatch(a, b))
            dark = float(v) / (vmax or 1.0) < 0.55  # viridis is dark at the bottom of its scale
            color = "white" if dark else "black"
            ax.text(b, a - 0.12, fmt.format(v), ha="center", va="center", fontsize=small + 1, color=color,
                    fontweight="bold")
            code = LINK_CODES.get(link[a][b], "?") + ("*" if staged[a][b] else "")
            ax.text(b, a + 0.25, code, ha="center", va="center", fontsize=small - 1, color=color)
    ticks = list(range(n))
    ax.set_xticks(ticks, [f"d{i}" for i in ticks])
    ax.set_yticks(ticks, [f"d{i}" for i in ticks])
    ax.set_xlabel("destination device")
    ax.set_ylabel("source device")
    ax.tick_params(length=0)
    return img


def _hatch(a: int, b: int) -> Any:
    from matplotlib.patches import Rectangle

    return Rectangle((b - 0.5, a - 0.5), 1, 1, fill=False, hatch="///", edgecolor="#ffffff80", linewidth=0)


def _panels(doc: dict[str, Any], path: Path, plan: list[tuple[str, list[dict[str, Any]], str, str]], fmt: str,
            title: str) -> None:
    """One heat map per ``(label, records, field, scale)`` of ``plan``, side by side; panels of one ``scale``
    (a colour-bar label) share a colour scale from zero and one colour bar."""
    plt = pyplot()
    recs = [r for _, rs, _, _ in plan for r in rs]
    n = 1 + max(max(r["src_device"], r["dst_device"]) for r in recs)
    side = max(3.4, 0.5 * n + 1.0)
    scales = list(dict.fromkeys(scale for *_, scale in plan))
    # Constrained layout places the three-line title and colour bars that span several panels.
    fig, axes = plt.subplots(1, len(plan), figsize=(side * len(plan) + 1.4 * len(scales), side + 0.9),
                             squeeze=False, layout="constrained")
    # Ratios keep 1 (the ceiling) on their scale, so that a pair far below its ceiling looks it.
    top = {k: max([1.0 if any(f == "ceiling_ratio" for _, _, f, sk in plan if sk == k) else 1e-9,
                   *(r.get(f) or 0.0 for _, rs, f, sk in plan if sk == k for r in rs)]) for k in scales}
    images: dict[str, tuple[Any, list[Any]]] = {}
    for ax, (label, rows, field, scale) in zip(axes[0], plan, strict=True):
        img = _heatmap(ax, rows, field, top[scale], fmt, "viridis")
        ax.set_title(label, fontsize=10)
        images.setdefault(scale, (img, []))[1].append(ax)
    for scale, (img, axs) in images.items():
        fig.colorbar(img, ax=axs, shrink=0.85, pad=0.03).set_label(scale)
    # Wrapped to the figure's width (about 7.5 pixels a character at this size): a small matrix is narrow.
    width = int(fig.get_figwidth() * fig.dpi / 7.5)
    lines = [title, _context(doc, recs), f"{_LINK_WORDS}; {_STAGED_WORDS}"]
    fig.suptitle("\n".join(textwrap.fill(line, width) for line in lines), fontsize=10)
    fig.savefig(path, dpi=100, bbox_inches="tight", pad_inches=0.15)  # square panels: keep every label
    plt.close(fig)


def plot_pair_gbps(doc: dict[str, Any], path: Path) -> None:
    """GB/s of every device pair in each mode (one colour scale), and each pair's ceiling (its own scale)."""
    groups = pair_groups(pairs_of(doc["scenarios"]))
    unit = "GB/s, median (scale starts at 0)"
    plan = [(f"migration, {label}", rows, "gbps", unit) for label, rows in groups]
    plan.append(("ceiling: plain copy of the pair", groups[0][1], "ceiling_gbps", "ceiling GB/s, best (from 0)"))
    _panels(doc, path, plan, "{:.2f}",
            "Device-to-device migration, GB/s per ordered pair; right: each pair's copy ceiling (same task)")


def plot_pair_ratio(doc: dict[str, Any], path: Path) -> None:
    """Each pair's GB/s over its own ceiling (peer copy, or staged where there is no peer access), per mode."""
    unit = "x the pair's ceiling (scale starts at 0)"
    plan = [(f"migration, {label}", rows, "ceiling_ratio", unit)
            for label, rows in pair_groups(pairs_of(doc["scenarios"]))]
    _panels(doc, path, plan, "{:.2f}x",
            "Device-to-device migration over each pair's own copy ceiling (the peer copy, or the staged copy "
            "where the pair has no peer access)")


def write_pair_plots(doc: dict[str, Any], out_dir: str | Path) -> list[Path]:
    """Write ``pairs_gbps.png`` and ``pairs_ceiling_ratio.png`` into ``out_dir`` when ``doc`` has device-pair
    records; return the paths written."""
    if not pairs_of(doc["scenarios"]):
        return []
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "pairs_gbps.png", out / "pairs_ceiling_ratio.png"]
    plot_pair_gbps(doc, paths[0])
    plot_pair_ratio(doc, paths[1])
    return paths
