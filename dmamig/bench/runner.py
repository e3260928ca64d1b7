"""Running a sweep: timed and verified repetitions, same-run ceilings, and the results document.

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

import datetime as _dt
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from .access import access_tasks, add_access_speedups, run_access
from .environment import cpu_copy_ceiling, machine_info, measure_ceilings
from .naming import DIRECTIONS, describe_options, options_of
from .pairs import add_pair_speedups, pair_tasks, run_pair
from .pairs_figures import pair_topology
from .scenarios import PAGE_SIZE, BenchSettings, MigrateGroup, Scenario, build_sweep
from .schema import PHASES, SCHEMA_VERSION
from .tasks import ProgressFn, Task
from .verify import (
    VerificationError,
    bench_machine,
    check,
    random_bytes,
    range_pfns,
    verify_pages,
    verify_result,
)

__all__ = [
    "SweepInterrupted",
    "Task",
    "VerificationError",
    "add_speedups",
    "build_tasks",
    "cpu_copy_ceiling",
    "machine_info",
    "measure_ceilings",
    "range_pfns",
    "run_sweep",
    "run_task",
    "sweep_directions",
    "sweep_document",
    "sweep_steps",
    "verify_pages",
    "verify_result",
]

#: Node that each direction migrates to (node 0 is host RAM; 1 and 2 are device nodes).
_TARGET = {"h2d": 1, "d2d": 2, "d2h": 0}


# -- figures ---------------------------------------------------------------------------------------------------

def _phase_names(phases: list[dict[str, int]]) -> list[str]:
    # The schema's phases in pipeline order, then any phase a newer core reports, so none is lost in "other".
    extra = sorted({p for ph in phases for p in ph} - set(PHASES))
    return [*PHASES, *extra]


def _figures(sc: Scenario, walls: list[int], cpus: list[int], phases: list[dict[str, int]],
             ceiling: dict[str, Any] | None, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    wall = statistics.median(walls)
    cpu = statistics.median(cpus)
    secs = wall / 1e9
    gbps = sc.total_bytes / secs / 1e9 if secs > 0 else 0.0
    names = _phase_names(phases)
    phase_ns = {p: float(statistics.median([ph.get(p, 0) for ph in phases])) for p in names} if phases else {}
    # Time of the call outside every named phase (argument checks, collecting and isolating folios, putting
    # them back, building the result), per repetition first so that medians of parts never exceed the whole.
    outside = (float(statistics.median([max(0, w - sum(ph.values())) for w, ph in zip(walls, phases, strict=True)]))
               if phases and len(phases) == len(walls) else None)
    rec: dict[str, Any] = {
        "id": sc.id,
        "name": sc.name,
        "kind": sc.kind,
        "mode": sc.mode,
        "direction": sc.direction,
        "direction_name": DIRECTIONS[sc.direction],
        "layout": sc.layout,
        "folio_bytes": sc.folio_bytes,
        "folio_order": sc.order,
        "channels": sc.channels,
        "options": sc.options.as_dict() if sc.options is not None else None,
        "batching": describe_options(sc.options),
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
        "speedup_vs": None,
        "speedup_vs_faithful_copy": None,
        "phase_ns": phase_ns,
        "phase_share": {p: v / wall for p, v in phase_ns.items()} if wall > 0 else {},
        "outside_phases_ns": outside,
        "verified": True,
    }
    rec.update(extra or {})
    return rec


def _phase_dict(res: Any) -> dict[str, int]:
    return {p: int(v) for p, v in dict(getattr(res, "phase_ns", None) or {}).items()}


def add_speedups(records: list[dict[str, Any]]) -> None:
    """Fill ``speedup_vs_copy``, ``speedup_vs`` and ``speedup_vs_faithful_copy`` of every no-copy migration.

    Like is compared with like: a no-copy record is divided by the copy record of the same direction, folio
    size, batch size and batches per step (copy has no DMA to pipeline, so the pipeline depth does not
    count), and ``speedup_vs`` names that copy record's id. Without such a copy record it falls back to the
    faithful copy. ``speedup_vs_faithful_copy`` always divides by the faithful copy. Records without
    recorded settings (legacy) count as the kernel's batching. Device-access records are paired by
    :func:`~dmamig.bench.access.add_access_speedups`, device-pair records by
    :func:`~dmamig.bench.pairs.add_pair_speedups`.
    """
    def key(r: dict[str, Any]) -> tuple:
        o = options_of(r)
        return (r["direction"], r["folio_bytes"], o.batch_pages if o else 512, o.batches_per_step if o else 1)

    copies = {key(r): r for r in records if r["kind"] == "migrate" and r["mode"] == "copy"}
    for r in records:
        if r["kind"] != "migrate" or r["mode"] != "nocopy":
            continue
        faithful = copies.get((r["direction"], r["folio_bytes"], 512, 1))
        base = copies.get(key(r)) or faithful
        if base is not None and base["gbps"] > 0:
            r["speedup_vs_copy"] = r["gbps"] / base["gbps"]
            r["speedup_vs"] = base["id"]
        if faithful is not None and faithful["gbps"] > 0:
            r["speedup_vs_faithful_copy"] = r["gbps"] / faithful["gbps"]
    add_access_speedups(records)
    add_pair_speedups(records)


def _check_options(res: Any, sc: Scenario, what: str) -> None:
    # A result records the batching it ran with; a figure labelled with other settings would be a wrong figure.
    ran = getattr(res, "options", None)
    check(ran is None or ran == sc.options, what,
          f"ran with {describe_options(ran)} but the scenario asked for {describe_options(sc.options)}")


# -- scenario runners ------------------------------------------------------------------------------------------

def _what(sc: Scenario, rep: int) -> str:
    return f"{sc.name} ({sc.id}), repetition {rep + 1}"


def _run_group(g: MigrateGroup, settings: BenchSettings, ceilings: dict[str, dict], progress: ProgressFn,
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
    return _figures(sc, walls, cpus, phases, None)


def _run_dma(sc: Scenario, settings: BenchSettings, ceilings: dict[str, dict], progress: ProgressFn,
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
    return _figures(sc, walls, cpus, [], ceilings.get(sc.direction))


# -- the sweep -------------------------------------------------------------------------------------------------

def build_tasks(settings: BenchSettings) -> list[Task]:
    """The sweep of ``settings`` as tasks, in the order they run: migration groups (the headline first), the
    engine scenarios, the device-access scenarios (:mod:`dmamig.bench.access`), then with two devices or more
    one task per ordered device pair (:mod:`dmamig.bench.pairs`). Each task runs on its own machine (or two,
    for a stencil and its ceiling) and returns its records (:func:`run_task`)."""
    groups, engine = build_sweep(settings)
    reps = settings.warmup + settings.repeat
    tasks = [Task(g.id, g.label, "group", len(g.scenarios) * reps, g.path, g, 1000 + i)
             for i, g in enumerate(groups)]
    for i, sc in enumerate(engine):
        dirs = (sc.direction,) if sc.kind == "dma" else ()
        tasks.append(Task(sc.id, sc.name, sc.kind, reps, dirs, sc, 2000 + i))
    tasks += access_tasks(settings)
    tasks += pair_tasks(settings)
    # Ids key the journal, the resume and the cluster's futures: two tasks of one id would lose one of them.
    seen: set[str] = set()
    twice = [t.id for t in tasks if t.id in seen or seen.add(t.id)]
    if twice:
        raise ValueError(f"these settings give two tasks the id {twice[0]!r}; make the values of each sweep axis "
                         f"distinct")
    return tasks


def run_task(task: Task, settings: BenchSettings, ceilings: dict[str, dict],
             progress: ProgressFn | None = None) -> list[dict[str, Any]]:
    """Run one task of :func:`build_tasks` on a machine of its own and return its scenario records.

    ``ceilings`` maps each direction in ``task.directions`` to the ceiling measured on the same host and
    GPU as the task (the ratio of a figure to a ceiling from another machine would mean nothing).
    """
    progress = progress or _noop
    if task.kind == "group":
        return _run_group(task.payload, settings, ceilings, progress, seed=task.seed)
    if task.kind == "state":
        return [_run_state(task.payload, settings, progress)]
    if task.kind == "dma":
        return [_run_dma(task.payload, settings, ceilings, progress, seed=task.seed)]
    if task.kind == "access":
        return run_access(task.payload, settings, progress, seed=task.seed)
    if task.kind == "pairs":
        return run_pair(task.payload, settings, progress, seed=task.seed)
    raise ValueError(f"task {task.id!r}: unknown kind {task.kind!r}")


def sweep_steps(settings: BenchSettings) -> int:
    """Number of progress steps :func:`run_sweep` reports (one per timed or warm-up repetition of a leg)."""
    return sum(t.steps for t in build_tasks(settings))


def sweep_directions(tasks: list[Task]) -> list[str]:
    """The directions whose ceilings ``tasks`` need, in first-use order."""
    return list(dict.fromkeys(d for t in tasks for d in t.directions))


def _noop(label: str, advance: int) -> None:
    pass


def sweep_document(settings: BenchSettings, started: _dt.datetime, wall_s: float, gpus: list[dict[str, Any]],
                   ceilings: list[dict[str, Any]], records: list[dict[str, Any]],
                   partial: bool = False) -> dict[str, Any]:
    """The results document (see :mod:`dmamig.bench.schema`) of a sweep's records."""
    add_speedups(records)
    machine = machine_info(settings.backend, gpus)
    # The devices' topology: a setting on cpu; on cuda what the runtime told the pairs' machines.
    topo = settings.machine_topology(settings.devices) or pair_topology(records, source="runtime")
    if topo is not None:
        machine["topology"] = topo.as_dict()
    doc = {
        "schema_version": SCHEMA_VERSION,
        "created": started.isoformat(timespec="seconds"),
        "wall_s": wall_s,
        "machine": machine,
        "settings": settings.to_json(),
        "ceilings": ceilings,
        "scenarios": records,
    }
    if partial:
        doc["partial"] = True
    return doc


def run_sweep(settings: BenchSettings, progress: ProgressFn | None = None,
              on_task_done: Callable[[Task, list[dict[str, Any]]], None] | None = None,
              skip: set[str] | frozenset[str] = frozenset(),
              on_start: Callable[[list[dict[str, Any]], list[dict[str, Any]]], None] | None = None
              ) -> dict[str, Any]:
    """Run every task of ``settings`` in this process and return the results document.

    Parameters
    ----------
    settings : BenchSettings
        What to run; ``settings.backend`` must be resolved (``"cpu"`` or ``"cuda"``).
    progress : callable, optional
        Called as ``progress(scenario_name, steps)`` after each repetition; :func:`sweep_steps` gives the total.
    on_task_done : callable, optional
        Called as ``on_task_done(task, records)`` after each task finished (a resumable sweep journals them).
    skip : set of str
        Ids of tasks not to run (finished in an earlier, interrupted run).
    on_start : callable, optional
        Called as ``on_start(gpus, ceilings)`` once the ceilings are measured, before the first task (a
        journal keeps, with each task, the ceilings its ratios used).

    Raises
    ------
    VerificationError
        When any repetition produced wrong data or misplaced pages.
    SweepInterrupted
        On Ctrl-C, carrying the document of the tasks that finished.
    """
    from ..backends import open_backend

    progress = progress or _noop
    started = _dt.datetime.now(_dt.timezone.utc)
    t_start = time.perf_counter()
    tasks = [t for t in build_tasks(settings) if t.id not in skip]
    directions = sweep_directions(tasks) or ["h2d"]

    backend = open_backend(settings.backend)
    try:
        gpus = [dict(d) for d in backend.devices()]
        ceil_list = measure_ceilings(backend, settings.backend, settings.total_bytes, directions,
                                     repeat=max(3, settings.repeat))
    finally:
        backend.close()
    ceilings = {c["direction"]: c for c in ceil_list}
    if on_start is not None:
        on_start(gpus, ceil_list)

    records: list[dict[str, Any]] = []

    def document(partial: bool) -> dict[str, Any]:
        return sweep_document(settings, started, time.perf_counter() - t_start, gpus, ceil_list, records,
                              partial)

    try:
        for task in tasks:
            out = run_task(task, settings, ceilings, progress)
            records.extend(out)
            if on_task_done is not None:
                on_task_done(task, out)
    except KeyboardInterrupt:
        # Keep what finished: a task's records are kept only once all its repetitions are done.
        raise SweepInterrupted(document(partial=True) if records else None) from None
    return document(partial=False)


class SweepInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped :func:`run_sweep`; ``doc`` holds the scenarios that finished (``"partial": true``),
    or is None when none did."""

    def __init__(self, doc: dict[str, Any] | None):
        super().__init__("benchmark interrupted")
        self.doc = doc
