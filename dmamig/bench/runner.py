"""Running a sweep: machines, timed and verified repetitions, same-run ceilings, and the results document.

Timing rules: each scenario warms up first (untimed: first touch, kernel compilation, allocator state), then
runs ``repeat`` timed repetitions and reports medians. Wall time is ``time.perf_counter_ns`` around the call;
CPU time is ``time.thread_time_ns`` of the calling thread, which is the migrating thread (DMA channels run
elsewhere, which is the point of no-copy migration). Every repetition, warm-up included, is verified after it
ran: status codes, the node of every page, and per-page checksums against the source; the group's bytes are
read back once at the end. A wrong result raises :class:`VerificationError`, whatever its speed.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from .scenarios import DIRECTIONS, PAGE_SIZE, BenchSettings, MigrateGroup, Scenario, build_sweep
from .schema import PHASES, SCHEMA_VERSION

__all__ = [
    "VerificationError",
    "cpu_copy_ceiling",
    "machine_info",
    "measure_ceilings",
    "range_pfns",
    "run_sweep",
    "sweep_steps",
    "verify_pages",
    "verify_result",
]

#: Node that each direction migrates to (node 0 is host RAM; 1 and 2 are device nodes).
_TARGET = {"h2d": 1, "d2d": 2, "d2h": 0}
#: Node each direction starts from.
_SOURCE = {"h2d": 0, "d2d": 1, "d2h": 2}

ProgressFn = Callable[[str, int], None]


class VerificationError(AssertionError):
    """A timed run produced wrong data or left pages in the wrong place."""


# -- environment -----------------------------------------------------------------------------------------------

def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _package_version() -> str:
    # Running from a source tree that is not installed: no distribution metadata, but the package knows.
    try:
        from .. import __version__
    except ImportError:
        return "unknown"
    return str(__version__)


def _cupy_version() -> str | None:
    # Package metadata, not an import: cupy is only ever imported by the CUDA backend.
    for dist in ("cupy-cuda13x", "cupy-cuda12x", "cupy-cuda11x", "cupy"):
        v = _version(dist)
        if v:
            return f"{v} ({dist})"
    return None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _git_head(where: Path) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=5)
        if out.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=where,
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() + ("-dirty" if dirty else "")


def _git_commit() -> str | None:
    """The commit of the source tree dmamig runs from, or of the dmamig checkout in the current directory.

    An installed copy (``pip install .``) has no git metadata, but CI runs it from the checkout it installed,
    so a current directory holding dmamig's own pyproject.toml names the commit.
    """
    here = Path(__file__).resolve().parent
    if (here.parent.parent / "pyproject.toml").exists():
        return _git_head(here)
    try:
        ours = 'name = "dmamig"' in (Path.cwd() / "pyproject.toml").read_text()
    except OSError:
        ours = False
    return _git_head(Path.cwd()) if ours else None


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    # Device descriptions may carry tuples (compute capability) or numpy scalars; JSON wants lists and numbers.
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, tuple | list):
            out[k] = [x.item() if isinstance(x, np.generic) else x for x in v]
        elif isinstance(v, np.generic):
            out[k] = v.item()
        elif isinstance(v, str | int | float | bool) or v is None:
            out[k] = v
        else:
            out[k] = str(v)
    return out


def machine_info(backend: str, gpus: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Describe where a run happens: CPU, GPUs, versions and the git commit.

    Parameters
    ----------
    backend : str
        ``"cpu"`` or ``"cuda"``.
    gpus : list of dict, optional
        ``backend.devices()`` of the backend in use.
    """
    import numpy

    info: dict[str, Any] = {
        "backend": backend,
        "hostname": platform.node(),
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count() or 1,
        "gpus": [_jsonable(dict(g)) for g in (gpus or [])],
        "python": platform.python_version(),
        "numpy": numpy.__version__,
        "numba": _version("numba"),
        "cupy": _cupy_version(),
        "dmamig": _version("dmamig") or _package_version(),
        "git_commit": _git_commit(),
    }
    if backend == "cpu":
        info["note"] = ("cpu backend: every node's frames are numpy buffers in host RAM, so host->device and "
                        "device->host are RAM-to-RAM copies between distinct buffers; DMA channels are threads")
    return info


# -- ceilings --------------------------------------------------------------------------------------------------

def cpu_copy_ceiling(nbytes: int, repeat: int = 3) -> float:
    """Best seconds of ``np.copyto`` of ``nbytes`` contiguous bytes on the CPU (the memcpy ceiling).

    Both buffers are touched first so that page faults are not timed. The best repetition, not the median:
    a ceiling slowed down by a noisy neighbour would flatter every ratio measured against it.
    """
    src = np.empty(nbytes, dtype=np.uint8)
    src.fill(0x5A)
    dst = np.empty_like(src)
    np.copyto(dst, src)
    times = []
    for _ in range(max(1, repeat)):
        t0 = time.perf_counter_ns()
        np.copyto(dst, src)
        times.append(time.perf_counter_ns() - t0)
    return min(times) / 1e9


def measure_ceilings(backend: Any, backend_name: str, nbytes: int, directions: list[str],
                     repeat: int = 3) -> list[dict[str, Any]]:
    """Measure the copy ceiling of each direction in this run.

    A backend that offers ``copy_ceiling(direction, nbytes, repeat) -> seconds`` (the CUDA backend: pinned
    ``cudaMemcpyAsync`` host<->device and device-to-device copies timed with CUDA events, best of ``repeat``)
    is asked; otherwise
    the ceiling is ``np.copyto`` of the same bytes, measured once and used for every direction (on the CPU
    backend every node is host RAM).
    """
    out = []
    fn = getattr(backend, "copy_ceiling", None)
    cpu_s = None
    for d in directions:
        if fn is not None:
            secs = float(fn(d, nbytes, repeat))
            method = {"h2d": "cudaMemcpyAsync pinned H2D", "d2h": "cudaMemcpyAsync D2H pinned",
                      "d2d": "device-to-device cudaMemcpyAsync"}[d] + f" (CUDA events, best of {repeat})"
        else:
            if cpu_s is None:
                cpu_s = cpu_copy_ceiling(nbytes, repeat)
            secs = cpu_s
            method = f"np.copyto contiguous, host RAM, best of {max(1, repeat)}"
        out.append({"direction": d, "method": method, "bytes": nbytes, "seconds": secs,
                    "gbps": nbytes / secs / 1e9 if secs > 0 else 0.0})
    if backend_name == "cuda" and fn is None:
        for c in out:
            c["method"] += " (backend has no copy_ceiling: host memcpy stands in)"
    return out


# -- machines and verification ---------------------------------------------------------------------------------

def _node_pages(pages: int) -> int:
    # Room for the working set rounded up to whole 2 MiB pageblocks, plus one spare pageblock, so that order-9
    # destinations always find an aligned free block.
    return (-(-pages // 512) + 1) * 512


@contextmanager
def _machine(settings: BenchSettings, pages: int, channels: int, devices: int | None = None) -> Iterator[Any]:
    from ..machine import Machine

    n = _node_pages(pages)
    m = Machine(host_pages=n, device_pages=n, devices=devices or settings.devices, page_size=PAGE_SIZE,
                backend=settings.backend, channels=channels)
    try:
        yield m
    finally:
        m.close()


def range_pfns(mm: Any, addr: int, pages: int) -> np.ndarray:
    """The pfn backing each base page of ``[addr, addr + pages * PAGE_SIZE)``, in address order.

    Parameters
    ----------
    mm : AddressSpace
        The address space that maps the range.
    addr : int
        Page-aligned start address.
    pages : int
        Number of base pages.
    """
    pfns = mm.pfns_of(addr, pages * PAGE_SIZE)
    if (pfns < 0).any():
        raise VerificationError(f"range {addr:#x}+{pages} pages is not fully populated")
    return pfns


def _pattern(nbytes: int, seed: int) -> np.ndarray:
    # Random bytes: a page copied to the wrong place, or not copied at all, changes its checksum.
    return np.frombuffer(np.random.default_rng(seed).bytes(nbytes), dtype=np.uint8)


def _check(cond: bool, what: str, msg: str) -> None:
    if not cond:
        raise VerificationError(f"{what}: {msg}")


def verify_pages(m: Any, pfns: np.ndarray, node: int, ref: np.ndarray | None, what: str) -> None:
    """Check that every page is on ``node`` and (with ``ref``) that its checksum equals the source page's.

    Parameters
    ----------
    m : Machine
        The machine.
    pfns : numpy.ndarray
        The pages, in the order of ``ref``.
    node : int
        Where every page must be.
    ref : numpy.ndarray or None
        ``m.dma.checksum`` of the source pages, taken before migrating.
    what : str
        Names the run in the error message.

    Raises
    ------
    VerificationError
        On the first discrepancy, with the number of bad pages and the first one.
    """
    nid = m.node_of_pfns(pfns)
    bad = np.flatnonzero(nid != node)
    _check(bad.size == 0, what, f"{bad.size} pages are not on node {node} (first: page {bad[:1].tolist()}, "
                                f"on node {nid[bad[:1]].tolist()})")
    if ref is not None:
        sums = np.asarray(m.dma.checksum(pfns))
        bad = np.flatnonzero(sums != ref)
        _check(bad.size == 0, what, f"{bad.size} of {pfns.size} pages have wrong content after migration "
                                    f"(first bad page index {bad[:1].tolist()})")


def verify_result(res: Any, pages: int, what: str) -> None:
    """Check that a migration moved all ``pages`` base pages: no failure, every status ``0``.

    Raises
    ------
    VerificationError
        Naming ``what``, the failure count and the first status codes.
    """
    status = np.asarray(res.status)
    bad = np.flatnonzero(status != 0)
    _check(res.nr_failed == 0 and bad.size == 0, what,
           f"{res.nr_failed} pages failed to migrate (status {sorted(set(status[bad].tolist()))[:4]})")
    _check(res.nr_succeeded == pages, what, f"{res.nr_succeeded} pages migrated, expected {pages}")


# -- figures ---------------------------------------------------------------------------------------------------

def _figures(sc: Scenario, walls: list[int], cpus: list[int], phases: list[dict[str, int]],
             ceiling: dict[str, Any] | None, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    wall = statistics.median(walls)
    cpu = statistics.median(cpus)
    secs = wall / 1e9
    gbps = sc.total_bytes / secs / 1e9 if secs > 0 else 0.0
    phase_ns = {p: float(statistics.median([ph.get(p, 0) for ph in phases])) for p in PHASES} if phases else {}
    rec: dict[str, Any] = {
        "id": sc.id,
        "kind": sc.kind,
        "mode": sc.mode,
        "direction": sc.direction,
        "direction_name": DIRECTIONS[sc.direction],
        "layout": sc.layout,
        "folio_bytes": sc.folio_bytes,
        "folio_order": sc.order,
        "channels": sc.channels,
        "bytes": sc.total_bytes,
        "pages": sc.pages,
        "repeat": len(walls),
        "wall_ns": [int(w) for w in walls],
        "median_wall_ns": float(wall),
        "gbps": gbps,
        "pages_per_s": sc.pages / secs if secs > 0 else 0.0,
        "thread_time_ns": float(cpu),
        "cpu_ns_per_page": cpu / sc.pages,
        "pages_per_cpu_s": sc.pages / (cpu / 1e9) if cpu > 0 else None,
        "ceiling_gbps": ceiling["gbps"] if ceiling else None,
        "ceiling_method": ceiling["method"] if ceiling else None,
        "ceiling_ratio": gbps / ceiling["gbps"] if ceiling and ceiling["gbps"] > 0 else None,
        "speedup_vs_copy": None,
        "phase_ns": phase_ns,
        "phase_share": {p: v / wall for p, v in phase_ns.items()} if wall > 0 else {},
        "verified": True,
    }
    rec.update(extra or {})
    return rec


def _phase_dict(res: Any) -> dict[str, int]:
    return {p: int(v) for p, v in dict(getattr(res, "phase_ns", None) or {}).items()}


# -- scenario runners ------------------------------------------------------------------------------------------

def _run_group(g: MigrateGroup, settings: BenchSettings, ceilings: dict[str, dict], progress: ProgressFn,
               seed: int) -> list[dict[str, Any]]:
    """Migrate one working set around the group's cycle ``warmup + repeat`` times; one record per leg."""
    from ..flags import MigrateMode

    pages = g.total_bytes // PAGE_SIZE
    order = g.scenarios[0].order
    with _machine(settings, pages, g.channels or 1) as m:
        mm = m.address_space()
        try:
            addr = mm.mmap(g.total_bytes, order=order)
            data = _pattern(g.total_bytes, seed)
            mm.write(addr, data)
            pfns = range_pfns(mm, addr, pages)
            verify_pages(m, pfns, 0, None, f"{g.label}: populate")
            ref = np.asarray(m.dma.checksum(pfns))
            engine = m.dma if g.mode == "nocopy" else None
            samples: dict[str, dict[str, list]] = {d: {"wall": [], "cpu": [], "phase": [], "res": []}
                                                   for d in g.path}
            for rep in range(settings.warmup + settings.repeat):
                for sc in g.scenarios:
                    target = _TARGET[sc.direction]
                    c0 = time.thread_time_ns()
                    t0 = time.perf_counter_ns()
                    res = mm.migrate(addr, g.total_bytes, target, mode=MigrateMode.SYNC, engine=engine)
                    wall = time.perf_counter_ns() - t0
                    cpu = time.thread_time_ns() - c0
                    what = f"{sc.id} (repetition {rep + 1})"
                    verify_result(res, pages, what)
                    verify_pages(m, range_pfns(mm, addr, pages), target, ref, what)
                    if rep >= settings.warmup:
                        s = samples[sc.direction]
                        s["wall"].append(wall)
                        s["cpu"].append(cpu)
                        s["phase"].append(_phase_dict(res))
                        s["res"].append(res)
                    progress(sc.id, 1)
            back = mm.read(addr, g.total_bytes)
            bad = np.flatnonzero(back != data)
            _check(bad.size == 0, f"{g.label}: read-back", f"{bad.size} bytes differ from the bytes written "
                                                           f"(first at offset {bad[:1].tolist()})")
        finally:
            mm.close()
    out = []
    for sc in g.scenarios:
        s = samples[sc.direction]
        last = s["res"][-1]
        out.append(_figures(sc, s["wall"], s["cpu"], s["phase"], ceilings.get(sc.direction), {
            "nr_succeeded": int(last.nr_succeeded),
            "nr_failed": int(last.nr_failed),
            "nr_thp_split": int(getattr(last, "nr_thp_split", 0)),
        }))
    return out


def _run_state(sc: Scenario, settings: BenchSettings, progress: ProgressFn) -> dict[str, Any]:
    """``m.migrate_pages`` with ``NO_COPY`` to frames from ``m.alloc_pages``: page state only, no data."""
    from ..flags import MigrateMode

    pages = sc.pages
    nfolios = pages >> sc.order
    mode = MigrateMode.SYNC | MigrateMode.NO_COPY
    walls, cpus, phases = [], [], []
    with _machine(settings, pages, 1, devices=1) as m:
        mm = m.address_space()
        try:
            addr = mm.mmap(sc.total_bytes, order=sc.order)
            mm.populate(addr, sc.total_bytes, node=0)
            for rep in range(settings.warmup + settings.repeat):
                what = f"{sc.id} (repetition {rep + 1})"
                for node, timed in ((1, True), (0, False)):
                    src = range_pfns(mm, addr, pages)
                    heads = src[:: 1 << sc.order]
                    dst = np.asarray(m.alloc_pages(node, nfolios, order=sc.order), dtype=np.int64)
                    _check(dst.size == nfolios, what, f"alloc_pages gave {dst.size} of {nfolios} folios")
                    c0 = time.thread_time_ns()
                    t0 = time.perf_counter_ns()
                    res = m.migrate_pages(heads, node, mode=mode, dst_pfns=dst)
                    wall = time.perf_counter_ns() - t0
                    cpu = time.thread_time_ns() - c0
                    verify_result(res, pages, what)
                    now = range_pfns(mm, addr, pages)
                    _check(np.array_equal(now, m.pages.expand(dst)), what, "pages are not mapped to the destination frames")
                    if timed and rep >= settings.warmup:
                        walls.append(wall)
                        cpus.append(cpu)
                        phases.append(_phase_dict(res))
                progress(sc.id, 1)
        finally:
            mm.close()
    return _figures(sc, walls, cpus, phases, None)


def _run_dma(sc: Scenario, settings: BenchSettings, ceilings: dict[str, dict], progress: ProgressFn,
             seed: int) -> dict[str, Any]:
    """``m.dma.copy`` of host pages to device frames, in random or contiguous page order; fence waited."""
    pages = sc.pages
    walls, cpus = [], []
    with _machine(settings, pages, sc.channels or 1, devices=1) as m:
        mm = m.address_space()
        try:
            addr = mm.mmap(sc.total_bytes)
            mm.write(addr, _pattern(sc.total_bytes, seed))
            src = range_pfns(mm, addr, pages)
            if sc.layout == "random":
                src = src[np.random.default_rng(seed).permutation(pages)]
            ref = np.asarray(m.dma.checksum(src))
            dst = np.asarray(m.alloc_pages(1, pages), dtype=np.int64)
            _check(dst.size == pages, sc.id, f"alloc_pages gave {dst.size} of {pages} frames")
            try:
                for rep in range(settings.warmup + settings.repeat):
                    c0 = time.thread_time_ns()
                    t0 = time.perf_counter_ns()
                    m.dma.copy(src, dst).wait()
                    wall = time.perf_counter_ns() - t0
                    cpu = time.thread_time_ns() - c0
                    sums = np.asarray(m.dma.checksum(dst))
                    bad = np.flatnonzero(sums != ref)
                    _check(bad.size == 0, f"{sc.id} (repetition {rep + 1})",
                           f"{bad.size} of {pages} destination pages differ from their source")
                    if rep >= settings.warmup:
                        walls.append(wall)
                        cpus.append(cpu)
                    progress(sc.id, 1)
            finally:
                m.put_pages(dst)
        finally:
            mm.close()
    return _figures(sc, walls, cpus, [], ceilings.get(sc.direction))


# -- the sweep -------------------------------------------------------------------------------------------------

def sweep_steps(settings: BenchSettings) -> int:
    """Number of progress steps :func:`run_sweep` reports (one per timed or warm-up repetition of a leg)."""
    groups, engine = build_sweep(settings)
    reps = settings.warmup + settings.repeat
    return sum(len(g.scenarios) for g in groups) * reps + len(engine) * reps


def _noop(label: str, advance: int) -> None:
    pass


def run_sweep(settings: BenchSettings, progress: ProgressFn | None = None) -> dict[str, Any]:
    """Run every scenario of ``settings`` and return the results document (see :mod:`dmamig.bench.schema`).

    Parameters
    ----------
    settings : BenchSettings
        What to run; ``settings.backend`` must be resolved (``"cpu"`` or ``"cuda"``).
    progress : callable, optional
        Called as ``progress(scenario_id, steps)`` after each repetition; :func:`sweep_steps` gives the total.

    Raises
    ------
    VerificationError
        When any repetition produced wrong data or misplaced pages.
    """
    from ..backends import open_backend

    progress = progress or _noop
    started = _dt.datetime.now(_dt.timezone.utc)
    t_start = time.perf_counter()
    groups, engine = build_sweep(settings)
    directions = list(dict.fromkeys(d for g in groups for d in g.path)) or ["h2d"]

    backend = open_backend(settings.backend)
    try:
        gpus = [dict(d) for d in backend.devices()]
        ceil_list = measure_ceilings(backend, settings.backend, settings.total_bytes, directions,
                                     repeat=max(3, settings.repeat))
    finally:
        backend.close()
    ceilings = {c["direction"]: c for c in ceil_list}

    records: list[dict[str, Any]] = []
    for i, g in enumerate(groups):
        records.extend(_run_group(g, settings, ceilings, progress, seed=1000 + i))
    for i, sc in enumerate(engine):
        if sc.kind == "state":
            records.append(_run_state(sc, settings, progress))
        else:
            records.append(_run_dma(sc, settings, ceilings, progress, seed=2000 + i))

    copy_gbps = {(r["direction"], r["folio_bytes"]): r["gbps"] for r in records
                 if r["kind"] == "migrate" and r["mode"] == "copy"}
    for r in records:
        base = copy_gbps.get((r["direction"], r["folio_bytes"]))
        if r["kind"] == "migrate" and r["mode"] == "nocopy" and base:
            r["speedup_vs_copy"] = r["gbps"] / base

    return {
        "schema_version": SCHEMA_VERSION,
        "created": started.isoformat(timespec="seconds"),
        "wall_s": time.perf_counter() - t_start,
        "machine": machine_info(settings.backend, gpus),
        "settings": settings.to_json(),
        "ceilings": ceil_list,
        "scenarios": records,
    }
