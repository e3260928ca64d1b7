"""A ``dmamig bench`` sweep bound to its output folder: journalled, resumable, in this process or on a cluster.

In this process the sweep is :func:`~dmamig.bench.runner.run_sweep`, unchanged, with each finished task
written to the folder's journal (:mod:`dmamig.sweep.journal`). On a cluster (:mod:`dmamig.sweep.cluster`)
each task runs on one worker (:func:`dmamig.bench.cluster.run_on_worker`) and the client journals and merges
what comes back. Either way a resumed sweep runs only the tasks its journal lacks, and the document holds the
records of every finished task in the order of :func:`~dmamig.bench.runner.build_tasks`.

A document whose tasks ran in more than one process (a cluster, or a resumed sweep) records who ran what:
every scenario and every ceiling carries ``worker`` (host, Dask worker address, pid, GPUs), the top-level
``ceilings`` hold one entry per worker and direction, and ``machine.workers`` lists the workers. A resumed
sweep's ``wall_s`` is the sum of its runs', and ``resumed`` lists them. A plain
in-process sweep writes the same document as :func:`~dmamig.bench.runner.run_sweep` alone.
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
from .runner import SweepInterrupted, build_tasks, run_sweep, sweep_document
from .scenarios import BenchSettings
from .verify import VerificationError

__all__ = ["TOOL", "BenchSweep", "SweepFailed", "settings_json"]

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


def _noop(label: str, steps: int) -> None:
    pass


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
            What a worker runs per task (default :func:`dmamig.bench.cluster.run_on_worker`).

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
        from .cluster import run_on_worker

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
