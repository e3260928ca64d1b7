"""Running one migration group, state-only migration or raw DMA copy: timed and verified repetitions.

Timing rules: each scenario warms up first (untimed: first touch, kernel compilation, allocator state), then
runs ``repeat`` timed repetitions and reports medians. Wall time is ``time.perf_counter_ns`` around the call;
CPU time is ``time.thread_time_ns`` of the calling thread, which is the migrating thread (DMA channels run
elsewhere, which is the point of no-copy migration). Every repetition, warm-up included, is verified after it
ran: status codes, the node of every page, and per-page checksums against the source; the group's bytes are
read back once at the end. A wrong result raises :class:`VerificationError`, whatever its speed.

Every migration runs with the batching its scenario names (:class:`~dmamig.MigrateOptions`), and its record
says which: the kernel's (``faithful``) or an experiment.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from ..sweep.tasks import ProgressFn
from .figures import scenario_record
from .naming import describe_options
from .parsing import PAGE_SIZE
from .scenarios import BenchSettings, MigrateGroup, Scenario
from .verify import bench_machine, check, random_bytes, range_pfns, verify_pages, verify_result

__all__ = ["run_dma", "run_group", "run_state"]

#: Node that each direction migrates to (node 0 is host RAM; 1 and 2 are device nodes).
_TARGET = {"h2d": 1, "d2d": 2, "d2h": 0}


def _phase_dict(res: Any) -> dict[str, int]:
    return {p: int(v) for p, v in dict(getattr(res, "phase_ns", None) or {}).items()}


def _check_options(res: Any, sc: Scenario, what: str) -> None:
    # A result records the batching it ran with; a figure labelled with other settings would be a wrong figure.
    ran = getattr(res, "options", None)
    check(ran is None or ran == sc.options, what,
          f"ran with {describe_options(ran)} but the scenario asked for {describe_options(sc.options)}")


def _what(sc: Scenario, rep: int) -> str:
    return f"{sc.name} ({sc.id}), repetition {rep + 1}"


def run_group(g: MigrateGroup, settings: BenchSettings, ceilings: dict[str, dict], progress: ProgressFn,
              seed: int) -> list[dict[str, Any]]:
    """Migrate one working set around the group's cycle ``warmup + repeat`` times; one record per leg."""
    from ..flags import MigrateMode

    pages = g.total_bytes // PAGE_SIZE
    order = g.scenarios[0].order
    with bench_machine(settings, pages, g.channels or 1) as m:
        mm = m.address_space()
        try:
            addr = mm.mmap(g.total_bytes, order=order)
            data = random_bytes(g.total_bytes, seed)
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
                    res = mm.migrate(addr, g.total_bytes, target, mode=MigrateMode.SYNC, engine=engine,
                                     options=g.options)
                    wall = time.perf_counter_ns() - t0
                    cpu = time.thread_time_ns() - c0
                    what = _what(sc, rep)
                    verify_result(res, pages, what)
                    _check_options(res, sc, what)
                    verify_pages(m, range_pfns(mm, addr, pages), target, ref, what)
                    if rep >= settings.warmup:
                        s = samples[sc.direction]
                        s["wall"].append(wall)
                        s["cpu"].append(cpu)
                        s["phase"].append(_phase_dict(res))
                        s["res"].append(res)
                    progress(sc.name, 1)
            back = mm.read(addr, g.total_bytes)
            bad = np.flatnonzero(back != data)
            check(bad.size == 0, f"{g.label}: read-back", f"{bad.size} bytes differ from the bytes written "
                                                          f"(first at offset {bad[:1].tolist()})")
        finally:
            mm.close()
    out = []
    for sc in g.scenarios:
        s = samples[sc.direction]
        last = s["res"][-1]
        out.append(scenario_record(sc, s["wall"], s["cpu"], s["phase"], ceilings.get(sc.direction), {
            "nr_succeeded": int(last.nr_succeeded),
            "nr_failed": int(last.nr_failed),
            "nr_thp_split": int(getattr(last, "nr_thp_split", 0)),
        }))
    return out


def run_state(sc: Scenario, settings: BenchSettings, progress: ProgressFn) -> dict[str, Any]:
    """``m.migrate_pages`` with ``NO_COPY`` to frames from ``m.alloc_pages``: page state only, no data."""
    from ..flags import MigrateMode

    pages = sc.pages
    nfolios = pages >> sc.order
    mode = MigrateMode.SYNC | MigrateMode.NO_COPY
    walls, cpus, phases = [], [], []
    with bench_machine(settings, pages, 1, devices=1) as m:
        mm = m.address_space()
        try:
            addr = mm.mmap(sc.total_bytes, order=sc.order)
            mm.populate(addr, sc.total_bytes, node=0)
            for rep in range(settings.warmup + settings.repeat):
                what = _what(sc, rep)
                for node, timed in ((1, True), (0, False)):
                    src = range_pfns(mm, addr, pages)
                    heads = src[:: 1 << sc.order]
                    dst = np.asarray(m.alloc_pages(node, nfolios, order=sc.order), dtype=np.int64)
                    check(dst.size == nfolios, what, f"alloc_pages gave {dst.size} of {nfolios} folios")
                    c0 = time.thread_time_ns()
                    t0 = time.perf_counter_ns()
                    res = m.migrate_pages(heads, node, mode=mode, dst_pfns=dst, options=sc.options)
                    wall = time.perf_counter_ns() - t0
                    cpu = time.thread_time_ns() - c0
                    verify_result(res, pages, what)
                    _check_options(res, sc, what)
                    now = range_pfns(mm, addr, pages)
                    check(np.array_equal(now, m.pages.expand(dst)), what,
                          "pages are not mapped to the destination frames")
                    if timed and rep >= settings.warmup:
                        walls.append(wall)
                        cpus.append(cpu)
                        phases.append(_phase_dict(res))
                progress(sc.name, 1)
        finally:
            mm.close()
    return scenario_record(sc, walls, cpus, phases, None)


def run_dma(sc: Scenario, settings: BenchSettings, ceilings: dict[str, dict], progress: ProgressFn,
            seed: int) -> dict[str, Any]:
    """``m.dma.copy`` of host pages to device frames, in random or contiguous page order; fence waited."""
    pages = sc.pages
    walls, cpus = [], []
    with bench_machine(settings, pages, sc.channels or 1, devices=1) as m:
        mm = m.address_space()
        try:
            addr = mm.mmap(sc.total_bytes)
            mm.write(addr, random_bytes(sc.total_bytes, seed))
            src = range_pfns(mm, addr, pages)
            if sc.layout == "random":
                src = src[np.random.default_rng(seed).permutation(pages)]
            ref = np.asarray(m.dma.checksum(src))
            dst = np.asarray(m.alloc_pages(1, pages), dtype=np.int64)
            check(dst.size == pages, sc.id, f"alloc_pages gave {dst.size} of {pages} frames")
            try:
                for rep in range(settings.warmup + settings.repeat):
                    c0 = time.thread_time_ns()
                    t0 = time.perf_counter_ns()
                    m.dma.copy(src, dst).wait()
                    wall = time.perf_counter_ns() - t0
                    cpu = time.thread_time_ns() - c0
                    sums = np.asarray(m.dma.checksum(dst))
                    bad = np.flatnonzero(sums != ref)
                    check(bad.size == 0, _what(sc, rep),
                          f"{bad.size} of {pages} destination pages differ from their source")
                    if rep >= settings.warmup:
                        walls.append(wall)
                        cpus.append(cpu)
                    progress(sc.name, 1)
            finally:
                m.put_pages(dst)
        finally:
            mm.close()
    return scenario_record(sc, walls, cpus, [], ceilings.get(sc.direction))
