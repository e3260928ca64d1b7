"""Running a sweep: its tasks, same-run ceilings, and the results document.

:func:`build_tasks` turns settings into tasks and :func:`run_task` runs one with the runner of its kind
(:mod:`dmamig.bench.scenario_runs` for migration groups, state-only migration and raw DMA copies,
:mod:`dmamig.bench.access` and :mod:`dmamig.bench.pairs` for the others); :func:`run_sweep` runs them all in
this process and :func:`sweep_document` builds the results document. Records come from
:mod:`dmamig.bench.figures`.
"""

from __future__ import annotations

import datetime as _dt
import time
from collections.abc import Callable
from typing import Any

from ..sweep.tasks import ProgressFn, Task
from . import scenario_runs
from .access import access_tasks, run_access
from .environment import machine_info, measure_ceilings
from .figures import add_speedups
from .pairs import pair_tasks, run_pair
from .pairs_figures import pair_topology
from .scenarios import BenchSettings, build_sweep
from .schema import SCHEMA_VERSION

__all__ = [
    "SweepInterrupted",
    "build_tasks",
    "run_sweep",
    "run_task",
    "sweep_directions",
    "sweep_document",
    "sweep_steps",
]


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
        return scenario_runs.run_group(task.payload, settings, ceilings, progress, seed=task.seed)
    if task.kind == "state":
        return [scenario_runs.run_state(task.payload, settings, progress)]
    if task.kind == "dma":
        return [scenario_runs.run_dma(task.payload, settings, ceilings, progress, seed=task.seed)]
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
    add_speedups(records, settings.copy_baseline())
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
        # The GPUs the sweep uses (devices 0 .. devices - 1), described once: UUID, PCI bus id, driver, clocks.
        gpus = [dict(d) for d in backend.devices()][:settings.devices]
        if settings.backend == "cuda" and gpus:
            from ..sweep.hardware import gpu_facts

            gpus = gpu_facts(gpus)
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
