"""The timing fields every migration record shares: medians of its timed repetitions, throughput, the ratio
to a ceiling, and the split of the wall time by phase.

Migration groups, state-only and DMA-copy scenarios (:mod:`dmamig.bench.migration`,
:mod:`dmamig.bench.engine`), device access (:mod:`dmamig.bench.access`) and device pairs
(:mod:`dmamig.bench.pairs`) all time and describe their repetitions the same way: :func:`timed_call` is the
one timing of a measured call, :func:`timing_fields` the description, and :func:`median` the one median the
bench figures use.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any, TypeVar

from .results import PHASES

__all__ = ["median", "phase_names", "timed_call", "timing_fields"]

T = TypeVar("T")


def timed_call(fn: Callable[..., T], *args: Any, **kwargs: Any) -> tuple[T, int, int]:
    """Run ``fn(*args, **kwargs)`` once, as every scenario times what it measures.

    Returns
    -------
    tuple
        ``fn``'s result, the wall time around the call (``time.perf_counter_ns``) and the CPU time of the
        calling thread (``time.thread_time_ns``: the migrating or faulting thread; DMA channels run elsewhere,
        which is the point of no-copy migration), both in nanoseconds.
    """
    c0 = time.thread_time_ns()
    t0 = time.perf_counter_ns()
    out = fn(*args, **kwargs)
    wall = time.perf_counter_ns() - t0
    cpu = time.thread_time_ns() - c0
    return out, wall, cpu


def median(values: list[float]) -> float:
    """The median of ``values`` as a float."""
    return float(statistics.median(values))


def phase_names(phases: list[dict[str, int]]) -> list[str]:
    """The schema's phases in pipeline order, then any phase a newer core reports, so none is lost in "other"."""
    extra = sorted({p for ph in phases for p in ph} - set(PHASES))
    return [*PHASES, *extra]


def timing_fields(nbytes: int, pages: int, walls: list[int], cpus: list[int], phases: list[dict[str, int]],
                  ceiling_gbps: float | None, ceiling_method: str | None) -> dict[str, Any]:
    """Record fields of timed repetitions: ``walls`` and ``cpus`` (ns of each), ``phases`` (each repetition's
    ``phase_ns``; empty, or empty dicts, when the scenario reports none) and a ceiling in GB/s (None: none).

    Speedups are left None: the sweep pairs records once they are all in.
    """
    wall = median(walls)
    cpu = median(cpus)
    secs = wall / 1e9
    gbps = nbytes / secs / 1e9 if secs > 0 else 0.0
    timed = any(phases)
    phase_ns = {p: median([ph.get(p, 0) for ph in phases]) for p in phase_names(phases)} if timed else {}
    # Time of the call outside every named phase (argument checks, collecting and isolating folios, putting
    # them back, building the result), per repetition first so that medians of parts never exceed the whole.
    outside = (median([max(0, w - sum(ph.values())) for w, ph in zip(walls, phases, strict=True)])
               if timed and len(phases) == len(walls) else None)
    return {
        "repeat": len(walls),
        "wall_ns": [int(w) for w in walls],
        "median_wall_ns": wall,
        "gbps": gbps,
        "pages_per_s": pages / secs if secs > 0 else 0.0,
        "thread_time_ns": cpu,
        "cpu_ns_per_page": cpu / pages,
        "pages_per_cpu_s": pages / (cpu / 1e9) if cpu > 0 else None,
        "ceiling_gbps": ceiling_gbps,
        "ceiling_method": ceiling_method,
        "ceiling_ratio": gbps / ceiling_gbps if ceiling_gbps else None,
        "speedup_vs_copy": None,
        "speedup_vs": None,
        "speedup_vs_faithful_copy": None,
        "phase_ns": phase_ns,
        "phase_share": {p: v / wall for p, v in phase_ns.items()} if wall > 0 else {},
        "outside_phases_ns": outside,
    }
