"""Running a ``dmamig bench`` sweep: its tasks, same-run ceilings, the results document, the journal, the cluster.

:func:`build_tasks` turns settings into tasks (:class:`~dmamig.sweep.tasks.Task`) and :func:`run_task` runs one
with the runner of its kind (:mod:`dmamig.bench.migration`, :mod:`dmamig.bench.engine`,
:mod:`dmamig.bench.access`, :mod:`dmamig.bench.files`, :mod:`dmamig.bench.pairs`); :func:`run_sweep` runs them all in this process and
:func:`sweep_document` builds the results document.

:class:`BenchSweep` binds a sweep to its output folder: journalled, resumable, in this process or on a cluster.
In this process the sweep is :func:`run_sweep`, unchanged, with each finished task written to the folder's
journal (:mod:`dmamig.sweep.journal`). On a cluster (:mod:`dmamig.sweep.cluster`) each task runs on one worker
(:func:`run_on_worker`) and the client journals and merges what comes back. Either way a resumed sweep runs only
the tasks its journal lacks, and the document holds the records of every finished task in the order of
:func:`build_tasks`.

A worker measures the copy ceilings a task's ratios need on itself, before the task and under the same worker
resource (so no other timed task shares its GPU meanwhile), once per worker process for each backend, GPU set,
working set and direction: a ratio is always a figure over a ceiling of the same worker and the same GPU.

A document whose tasks ran in more than one process (a cluster, or a resumed sweep) records who ran what:
every scenario and every ceiling carries ``worker`` (host, Dask worker address, pid, GPUs), the top-level
``ceilings`` hold one entry per worker and direction, and ``machine.workers`` lists the workers. A resumed
sweep's ``wall_s`` is the sum of its runs', and ``resumed`` lists them. A plain in-process sweep writes the
same document as :func:`run_sweep` alone.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..sweep.hardware import cpu_model
from ..sweep.journal import Journal
from ..sweep.tasks import ProgressFn, Task
from .access import access_tasks, add_access_speedups, run_access
from .engine import engine_scenarios, run_dma, run_state
from .environment import machine_info, measure_ceilings
from .files import add_file_speedups, file_tasks, run_file_case
from .migration import MigrateGroup, Scenario, add_migration_speedups, migration_groups, run_group
from .pairs import add_pair_speedups, pair_tasks, pair_topology, run_pair
from .results import SCHEMA_VERSION
from .settings import BenchSettings
from .verify import VerificationError

__all__ = [
    "BenchSweep",
    "SweepFailed",
    "SweepInterrupted",
    "TOOL",
    "add_speedups",
    "build_sweep",
    "build_tasks",
    "run_on_worker",
    "run_sweep",
    "run_task",
    "settings_json",
    "sweep_directions",
    "sweep_document",
    "sweep_steps",
    "worker_ceilings",
]


def build_sweep(settings: BenchSettings) -> tuple[list[MigrateGroup], list[Scenario]]:
    """Expand settings into migration groups (:func:`~dmamig.bench.migration.migration_groups`) and engine
    scenarios (:func:`~dmamig.bench.engine.engine_scenarios`, empty when ``settings.extras`` is false)."""
    return migration_groups(settings), engine_scenarios(settings)


def add_speedups(records: list[dict[str, Any]], copy_baseline: str = "cpu") -> None:
    """Pair the records of a sweep once they are all in: no-copy migrations with their copy
    (:func:`~dmamig.bench.migration.add_migration_speedups`, which also records ``copy_baseline``),
    device-access records (:func:`~dmamig.bench.access.add_access_speedups`), file-backed records
    (:func:`~dmamig.bench.files.add_file_speedups`) and device pairs (:func:`~dmamig.bench.pairs.add_pair_speedups`)."""
    add_migration_speedups(records, copy_baseline)
    add_access_speedups(records)
    add_file_speedups(records, copy_baseline)
    add_pair_speedups(records)


def build_tasks(settings: BenchSettings) -> list[Task]:
    """The sweep of ``settings`` as tasks, in the order they run: migration groups (the headline first), the
    engine scenarios, the device-access scenarios (:mod:`dmamig.bench.access`), the file-backed scenarios
    (:mod:`dmamig.bench.files`), then with two devices or more
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
    tasks += file_tasks(settings)
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
        return run_group(task.payload, settings, ceilings, progress, seed=task.seed)
    if task.kind == "state":
        return [run_state(task.payload, settings, progress)]
    if task.kind == "dma":
        return [run_dma(task.payload, settings, ceilings, progress, seed=task.seed)]
    if task.kind == "access":
        return run_access(task.payload, settings, progress, seed=task.seed)
    if task.kind == "files":
        return run_file_case(task.payload, settings, ceilings, progress, seed=task.seed)
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
    """The results document (see :mod:`dmamig.bench.results`) of a sweep's records."""
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


#: The tool name a bench journal is written under.
TOOL = "dmamig bench"


class SweepFailed(Exception):
    """Tasks of a cluster sweep failed twice; ``doc`` holds every task that finished (``"partial": true``,
    ``"failed"`` lists the others) and ``failures`` the :class:`~dmamig.sweep.cluster.TaskFailure` of each."""

    def __init__(self, doc: dict[str, Any], failures: list[Any]):
        names = ", ".join(f.id for f in failures)
        super().__init__(f"{len(failures)} task(s) failed twice: {names}")
        self.doc = doc
        self.failures = failures


def settings_json(settings: BenchSettings) -> dict[str, Any]:
    """Every field of ``settings``, JSON-ready: what a journal's fingerprint covers."""
    return json_ready(dataclasses.asdict(settings))


def json_ready(value: Any) -> Any:
    """``value`` with tuples as lists and numpy scalars as numbers."""
    if isinstance(value, dict):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_ready(v) for v in value]
    item = getattr(value, "item", None)
    return item() if callable(item) and not isinstance(value, str | int | float | bool) else value


def _worker_key(who: dict[str, Any] | None) -> tuple:
    who = who or {}
    return who.get("host"), who.get("address"), who.get("pid"), who.get("run")


def _run_id(started: _dt.datetime) -> str:
    """The name of a run of a sweep: when it started (a resumed sweep is several runs)."""
    return started.isoformat(timespec="microseconds")


def _run_fields(started: _dt.datetime, t0: float) -> dict[str, Any]:
    """What a journalled task says of its run: which one, and how long it had run when the task finished."""
    return {"run": _run_id(started), "run_elapsed_s": time.perf_counter() - t0}


class BenchSweep:
    """The sweep of ``settings`` writing into ``folder``.

    Parameters
    ----------
    settings : BenchSettings
        What to run (backend resolved).
    folder : Path
        The output folder; its journal is ``folder / "tasks.jsonl"``.
    resume : bool
        Continue the sweep journalled in ``folder``: its settings must equal ``settings``.
    tasks : list of Task, optional
        The tasks (default :func:`~dmamig.bench.runner.build_tasks` of ``settings``).

    Raises
    ------
    ResumeError
        ``resume`` of a folder without a journal of these settings; or, without ``resume``, a folder that
        holds the journal of an unfinished sweep (it is resumed, never overwritten).
    """

    def __init__(self, settings: BenchSettings, folder: Path, *, resume: bool = False,
                 tasks: list[Task] | None = None):
        self.settings = settings
        self.folder = Path(folder)
        self.tasks = list(tasks) if tasks is not None else build_tasks(settings)
        if resume:
            self.journal = Journal.resume(self.folder, TOOL, settings_json(settings))
        else:
            self.journal = Journal.fresh(self.folder, TOOL, settings_json(settings))
        ids = {t.id for t in self.tasks}
        self.prior = {i: e for i, e in self.journal.done.items() if i in ids}
        self.todo = [t for t in self.tasks if t.id not in self.prior]

    @property
    def steps(self) -> int:
        """Progress steps the tasks still to run report."""
        return sum(t.steps for t in self.todo)

    def run(self, progress: ProgressFn | None = None, session: Any | None = None,
            worker_fn: Callable[..., dict[str, Any]] | None = None) -> dict[str, Any]:
        """Run the tasks the journal lacks and return the document of every finished task.

        Parameters
        ----------
        progress : callable, optional
            ``progress(label, steps)``: per repetition in this process, per finished task on a cluster.
        session : Session, optional
            A :class:`~dmamig.sweep.cluster.Session`; without one the tasks run in this process.
        worker_fn : callable, optional
            What a worker runs per task (default :func:`run_on_worker`).

        Raises
        ------
        VerificationError
            A repetition produced wrong data (the sweep stops).
        SweepInterrupted
            Ctrl-C; ``doc`` holds every finished task (or is None when none did).
        SweepFailed
            On a cluster: tasks that failed twice, after every other task ran.
        """
        progress = progress or _noop
        started = _dt.datetime.now(_dt.timezone.utc)
        t0 = time.perf_counter()
        if session is None:
            return self._run_here(progress, started, t0)
        return self._run_cluster(progress, session, worker_fn, started, t0)

    # -- in this process ---------------------------------------------------------------------------------------

    def _run_here(self, progress: ProgressFn, started: _dt.datetime, t0: float) -> dict[str, Any]:
        seen: dict[str, Any] = {}

        def start(gpus: list[dict[str, Any]], ceilings: list[dict[str, Any]]) -> None:
            seen["ceilings"] = ceilings
            # An in-process sweep measures its ceilings anew each run: the run, not the process, is the worker.
            seen["who"] = {"host": platform.node(), "address": None, "name": None, "pid": os.getpid(),
                           "run": _run_id(started),
                           "cpu": cpu_model(),
                           "gpus": [json_ready({**g, "index": g.get("id", g.get("index")), "name": str(g.get("name")),
                                                "uuid": g.get("uuid")}) for g in gpus[:self.settings.devices]]}

        def done(task: Task, records: list[dict[str, Any]]) -> None:
            ceilings = [c for c in seen["ceilings"] if c["direction"] in task.directions]
            self.journal.record(task.id, records=json_ready(records), ceilings=ceilings, worker=seen["who"],
                                **_run_fields(started, t0))
            progress(task.label, 0)  # the task is journalled: the count of finished tasks moves on

        try:
            doc = run_sweep(self.settings, progress, on_task_done=done, skip=set(self.prior), on_start=start)
        except SweepInterrupted:
            self.journal.end_run(_run_id(started), time.perf_counter() - t0)
            if not self.prior:
                raise
            raise SweepInterrupted(self.document(started, time.perf_counter() - t0, partial=True)) from None
        if not self.prior:
            return doc  # one process ran everything: the document run_sweep writes, unchanged
        return self.document(started, time.perf_counter() - t0)

    # -- on a cluster ------------------------------------------------------------------------------------------

    def _run_cluster(self, progress: ProgressFn, session: Any, worker_fn: Callable[..., dict[str, Any]] | None,
                     started: _dt.datetime, t0: float) -> dict[str, Any]:
        def done(task: Task, result: dict[str, Any]) -> None:
            who = result.get("worker") or {}
            if "verification_error" in result:
                raise VerificationError(f"{result['verification_error']} (on {who.get('host')}, worker "
                                        f"{who.get('address')})")
            self.journal.record(task.id, records=json_ready(result["records"]), ceilings=result["ceilings"],
                                worker=who, **_run_fields(started, t0))
            progress(f"{task.label} on {who.get('host')}", task.steps)

        cluster = session.describe()
        try:
            failures = session.run(self.todo, worker_fn or run_on_worker, self.settings, on_done=done)
        except KeyboardInterrupt:
            self.journal.end_run(_run_id(started), time.perf_counter() - t0)
            finished = bool(self.journal.done)
            raise SweepInterrupted(self.document(started, time.perf_counter() - t0, partial=True, cluster=cluster)
                                   if finished else None) from None
        doc = self.document(started, time.perf_counter() - t0, partial=bool(failures), cluster=cluster,
                            failures=failures)
        if failures:
            raise SweepFailed(doc, failures)
        return doc

    # -- the merged document -----------------------------------------------------------------------------------

    @property
    def tasks_done(self) -> int:
        """How many of the sweep's tasks have finished, in earlier runs and in this one."""
        ids = {t.id for t in self.tasks}
        return sum(1 for i in self.journal.done if i in ids)

    def earlier_runs(self, started: _dt.datetime) -> list[dict[str, Any]]:
        """The runs of this sweep before the one started at ``started``: ``started`` and ``wall_s`` of each.

        A run that was interrupted journalled its end; one that was killed outright counts up to its last
        finished task.
        """
        current = _run_id(started)
        walls: dict[str, float] = {}
        for entry in self.journal.done.values():
            run = entry.get("run")
            if run and run != current:
                walls[run] = max(walls.get(run, 0.0), float(entry.get("run_elapsed_s") or 0.0))
        for r in self.journal.runs:
            if r.get("run") and r["run"] != current:
                walls[r["run"]] = max(walls.get(r["run"], 0.0), float(r["wall_s"]))
        return [{"started": run, "wall_s": w} for run, w in sorted(walls.items())]

    def document(self, started: _dt.datetime, wall_s: float, *, partial: bool = False,
                 cluster: dict[str, Any] | None = None, failures: list[Any] = ()) -> dict[str, Any]:
        """The results document of every task the journal holds, in sweep order, tagged with their workers.

        ``wall_s`` is this run's; the document's covers the earlier runs too (:meth:`earlier_runs`), which
        ``resumed`` lists.
        """
        entries = self.journal.done
        records: list[dict[str, Any]] = []
        ceilings: list[dict[str, Any]] = []
        workers: dict[tuple, dict[str, Any]] = {}
        measured: set[tuple] = set()
        for task in self.tasks:
            entry = entries.get(task.id)
            if entry is None:
                continue
            who = entry.get("worker") or {}
            key = _worker_key(who)
            workers.setdefault(key, who)
            # Copies: the speedups are filled into the document's records, not into the journal's.
            records += [{**r, "worker": who} for r in entry["records"]]
            for c in entry.get("ceilings", []):
                if (key, c["direction"]) not in measured:  # one entry per worker and direction
                    measured.add((key, c["direction"]))
                    ceilings.append({**c, "worker": who})
        gpus: dict[tuple, dict[str, Any]] = {}
        for who in workers.values():
            for g in who.get("gpus") or []:
                gpus.setdefault((g.get("uuid") or (who.get("host"), g.get("index"))),
                                {**g, "host": who.get("host")})
        earlier = self.earlier_runs(started)
        doc = sweep_document(self.settings, started, wall_s + sum(r["wall_s"] for r in earlier),
                             list(gpus.values()), ceilings, records, partial)
        if earlier:
            doc["resumed"] = {"parts": len(earlier) + 1,
                              "runs": [*earlier, {"started": _run_id(started), "wall_s": wall_s}]}
        doc["machine"]["workers"] = list(workers.values())
        if cluster is not None:
            doc["machine"]["cluster"] = cluster
        if failures:
            doc["failed"] = [{"id": f.id, "error": f.error} for f in failures]
        return doc


#: Ceilings this process measured, by (backend, visible GPUs, bytes, repetitions, direction).
_CEILINGS: dict[tuple[str, str, int, int, str], dict[str, Any]] = {}


def worker_ceilings(settings: BenchSettings, directions: tuple[str, ...] | list[str]) -> list[dict[str, Any]]:
    """The ceilings of ``directions`` for ``settings`` in this process, measured the first time each is asked.

    The key holds ``CUDA_VISIBLE_DEVICES``: a process that sees other GPUs measures again.
    """
    from ..backends import open_backend

    repeat = max(3, settings.repeat)  # as an in-process sweep measures them
    base = (settings.backend, os.environ.get("CUDA_VISIBLE_DEVICES", ""), settings.total_bytes, repeat)
    missing = [d for d in dict.fromkeys(directions) if (*base, d) not in _CEILINGS]
    if missing:
        backend = open_backend(settings.backend)
        try:
            for c in measure_ceilings(backend, settings.backend, settings.total_bytes, missing, repeat=repeat):
                _CEILINGS[(*base, c["direction"])] = c
        finally:
            backend.close()
    return [dict(_CEILINGS[(*base, d)]) for d in dict.fromkeys(directions)]


def run_on_worker(task: Task, settings: BenchSettings) -> dict[str, Any]:
    """Run ``task`` here with ceilings measured here; what :class:`BenchSweep` journals.

    Returns
    -------
    dict
        ``id``, ``worker`` (:func:`dmamig.sweep.worker.identity`), and either ``records`` and ``ceilings``, or
        ``verification_error`` (the message): wrong data is a result to report, not a failure to retry.
    """
    from ..sweep.worker import identity

    who = identity(settings.backend, settings.devices)
    ceilings = worker_ceilings(settings, task.directions)
    try:
        records = run_task(task, settings, {c["direction"]: c for c in ceilings})
    except VerificationError as exc:
        return {"id": task.id, "worker": who, "verification_error": str(exc)}
    return {"id": task.id, "worker": who, "records": records, "ceilings": ceilings}
