"""Engine scenarios: state-only migration (``NO_COPY`` onto pre-copied frames) and raw DMA copies.

Neither is a migration a user runs: they take the two halves of no-copy migration apart. State-only migration
is ``m.migrate_pages`` with ``NO_COPY`` to frames from ``m.alloc_pages`` (page state only, no data: the cost of
the migration core itself); a raw DMA copy is ``m.dma.copy`` of host pages to device frames, in random or
contiguous page order, fence waited (the engine's copy against the same run's ceiling). Both are
:class:`~dmamig.bench.migration.Scenario` records of kinds ``state`` and ``dma``, timed and verified as the
migration scenarios are.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from rich.table import Table

from ..migrate.options import MigrateOptions
from ..sweep.tasks import ProgressFn
from .migration import Scenario, check_options, repetition, result_phases, scenario_record
from .naming import format_number, format_rate
from .settings import PAGE_SIZE, BenchSettings
from .timing import timed_call
from .verify import bench_machine, check, random_bytes, range_pfns, verify_result

__all__ = ["engine_scenarios", "engine_table", "run_dma", "run_state"]

def engine_scenarios(settings: BenchSettings) -> list[Scenario]:
    """The engine scenarios of ``settings`` (none when ``settings.extras`` is false): state-only migration at
    the smallest and largest folio size, in every batching of the sweep axes without a pipeline, and raw DMA
    copies of random and contiguous 4 KiB pages at the largest channel count."""
    engine: list[Scenario] = []
    if settings.extras:
        state_opts = list(dict.fromkeys(MigrateOptions(o.batch_pages, o.batches_per_step, 0)
                                        for o in settings.option_sets()))
        for opts in state_opts:
            for size in sorted({settings.sizes[0], settings.sizes[-1]}):
                engine.append(Scenario("state", size, settings.total_bytes, "state", "h2d", options=opts))
        ch = max(settings.channels)
        for layout in ("random", "contiguous"):
            engine.append(Scenario("dma", PAGE_SIZE, settings.total_bytes, "dma", "h2d", ch, layout, options=None))
    return engine

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
                what = repetition(sc, rep)
                for node, timed in ((1, True), (0, False)):
                    src = range_pfns(mm, addr, pages)
                    heads = src[:: 1 << sc.order]
                    dst = np.asarray(m.alloc_pages(node, nfolios, order=sc.order), dtype=np.int64)
                    check(dst.size == nfolios, what, f"alloc_pages gave {dst.size} of {nfolios} folios")
                    res, wall, cpu = timed_call(m.migrate_pages, heads, node, mode=mode, dst_pfns=dst,
                                                options=sc.options)
                    verify_result(res, pages, what)
                    check_options(res, sc, what)
                    now = range_pfns(mm, addr, pages)
                    check(np.array_equal(now, m.pages.expand(dst)), what,
                          "pages are not mapped to the destination frames")
                    if timed and rep >= settings.warmup:
                        walls.append(wall)
                        cpus.append(cpu)
                        phases.append(result_phases(res))
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
                    _, wall, cpu = timed_call(lambda: m.dma.copy(src, dst).wait())
                    sums = np.asarray(m.dma.checksum(dst))
                    bad = np.flatnonzero(sums != ref)
                    check(bad.size == 0, repetition(sc, rep),
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

def engine_table(records: list[dict[str, Any]]) -> Table:
    """The report's table of the engine records (kinds ``state`` and ``dma``)."""
    t = Table(title="Engine (state-only migration, raw DMA copy)", title_justify="left")
    for col in ("scenario", "batching", "pages", "GB/s", "pages/s", "CPU ns/page", "pages per CPU-s",
                "ceiling GB/s", "x ceiling", "ok"):
        t.add_column(col, justify="left" if col in ("scenario", "batching") else "right")
    for s in records:
        # State-only migration copies no data: a GB/s figure would only restate pages/s.
        gbps = None if s["kind"] == "state" else s["gbps"]
        t.add_row(s["name"], s["batching"], str(s["pages"]), format_number(gbps), format_rate(s["pages_per_s"]),
                  format_number(s["cpu_ns_per_page"], "{:.0f}"), format_rate(s.get("pages_per_cpu_s")),
                  format_number(s["ceiling_gbps"]), format_number(s["ceiling_ratio"]),
                  "yes" if s["verified"] else "[red]NO[/red]")
    return t
