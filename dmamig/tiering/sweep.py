"""``dmamig replay`` as tasks: one replay of the trace under the policy per migration mode.

Each task runs :func:`~dmamig.tiering.replay` on a machine of its own and returns its run
(``ReplayResult.to_dict()``); with ``--cluster`` each runs on one worker, which tags it with who ran it
(:func:`dmamig.sweep.worker.identity`). Finished tasks are journalled in the output folder
(:mod:`dmamig.sweep.journal`) so that an interrupted replay resumes without replaying what finished; the
journal's settings hold a digest of the trace, so a changed trace file is not resumed into.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import platform
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..sweep.journal import Journal
from ..sweep.tasks import Task
from .policies import make_policy
from .replay import replay
from .trace import Trace

__all__ = ["TOOL", "ReplayJob", "ReplaySweep", "replay_tasks", "run_on_worker", "run_replay_task",
           "trace_digest"]

#: The tool name a replay journal is written under.
TOOL = "dmamig replay"


def trace_digest(trace: Trace) -> str:
    """A hash of the trace's records (each column's name, dtype, shape and bytes), region, actors, page size
    and metadata: two traces whose bytes agree but whose columns are typed or shaped otherwise differ."""
    h = hashlib.sha256()
    for name, col in trace.columns().items():
        h.update(json.dumps([name, col.dtype.str, list(col.shape)]).encode())
        h.update(np.ascontiguousarray(col).tobytes())
    h.update(json.dumps([trace.region_bytes, trace.actors, trace.page_size, trace.name, trace.meta],
                        sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class ReplayJob:
    """What every task of one replay sweep shares: the trace, the policy and the machine settings."""

    trace: Trace
    policy: str
    fast_fraction: float = 0.25
    slow_cost: float = 2.5
    channels: int = 2
    threads: int = 1
    device_fraction: float = 0.5
    seed: int = 0
    backing: str = "anon"

    def settings(self, source: str, modes: list[str]) -> dict[str, Any]:
        """The settings a journal records and compares on ``--resume`` (``backing`` only where it is not the
        default, so that journals written before it existed still resume)."""
        out = {"source": source, "trace": trace_digest(self.trace), "policy": self.policy, "modes": modes,
               "fast_fraction": self.fast_fraction, "slow_cost": self.slow_cost, "channels": self.channels,
               "threads": self.threads, "device_fraction": self.device_fraction, "seed": self.seed}
        if self.backing != "anon":
            out["backing"] = self.backing
        return out


def replay_tasks(job: ReplayJob, modes: list[str]) -> list[Task]:
    """One task per mode (``copy``, ``no-copy``), in the order given; each reports one step per epoch."""
    return [Task(mode, f"{job.trace.name} {job.policy} {mode}", "replay", job.trace.epochs, (), mode)
            for mode in modes]


def run_replay_task(task: Task, job: ReplayJob,
                    progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Replay ``job`` in the mode ``task`` names; the run as ``ReplayResult.to_dict()``."""
    res = replay(job.trace, make_policy(job.policy), task.payload, fast_fraction=job.fast_fraction,
                 slow_cost=job.slow_cost, channels=job.channels, threads=job.threads, seed=job.seed,
                 device_fraction=job.device_fraction, backing=job.backing, progress=progress)
    return res.to_dict()


def run_on_worker(task: Task, job: ReplayJob) -> dict[str, Any]:
    """What a cluster worker runs: the task's run, and who ran it (replays run on the CPU backend)."""
    from ..sweep.worker import identity

    return {"id": task.id, "worker": identity("cpu", 0), "runs": [run_replay_task(task, job)]}


class ReplaySweep:
    """The tasks of one ``dmamig replay`` writing into ``folder``, journalled and resumable.

    Parameters
    ----------
    job : ReplayJob
        What to replay.
    tasks : list of Task
        :func:`replay_tasks` of the job.
    folder : Path
        The output folder.
    settings : dict
        :meth:`ReplayJob.settings`: what the journal's fingerprint covers.
    resume : bool
        Continue the sweep journalled in ``folder`` (raises :class:`~dmamig.sweep.ResumeError` if it cannot;
        without ``resume``, a ``folder`` that holds a journal raises it too).
    """

    def __init__(self, job: ReplayJob, tasks: list[Task], folder: Path, settings: dict[str, Any],
                 resume: bool = False):
        self.job = job
        self.tasks = tasks
        # A folder holding an unfinished sweep's journal is resumed, never overwritten by a fresh one.
        self.journal = (Journal.resume(folder, TOOL, settings) if resume else Journal.fresh(folder, TOOL, settings))
        ids = {t.id for t in tasks}
        self.prior = {i: e for i, e in self.journal.done.items() if i in ids}
        self.todo = [t for t in tasks if t.id not in self.prior]
        self._here: dict[str, Any] | None = None

    def run(self, progress: Callable[[Task, int], None] | None = None, session: Any | None = None) -> list[Any]:
        """Run the tasks the journal lacks, journalling each as it finishes.

        ``progress(task, epochs_done)`` reports each task's progress (on a cluster: once, when it finished).
        Ctrl-C propagates; :meth:`runs` then gives what finished. Returns the tasks that failed twice on a
        cluster (:class:`~dmamig.sweep.cluster.TaskFailure`), an empty list otherwise.
        """
        report = progress or (lambda task, done: None)
        if session is None:
            # Each run of a sweep in one process is a worker of its own (a resumed sweep mixes two).
            self._here = {"host": platform.node(), "address": None, "name": None, "pid": os.getpid(),
                          "run": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="microseconds"), "gpus": []}
            for task in self.todo:
                run = run_replay_task(task, self.job, lambda done, _total, task=task: report(task, done))
                self.journal.record(task.id, runs=[run], worker=self._here)
            return []

        def done(task: Task, result: dict[str, Any]) -> None:
            self.journal.record(task.id, runs=result["runs"], worker=result["worker"])
            report(task, task.steps)

        return session.run(self.todo, run_on_worker, self.job, on_done=done)

    def runs(self) -> list[dict[str, Any]]:
        """Every finished run in task order; tagged with its ``worker`` when they did not all run here."""
        entries = [self.journal.done[t.id] for t in self.tasks if t.id in self.journal.done]
        local = all(e.get("worker") == self._here for e in entries) and self._here is not None
        return [{**run, **({} if local else {"worker": e.get("worker")})} for e in entries for run in e["runs"]]

    def workers(self) -> list[dict[str, Any]]:
        """The distinct workers that ran the finished tasks."""
        seen: dict[tuple, dict[str, Any]] = {}
        for e in self.journal.done.values():
            w = e.get("worker") or {}
            seen.setdefault((w.get("host"), w.get("address"), w.get("pid"), w.get("run")), w)
        return list(seen.values())
