"""What a cluster worker runs for one task of a ``dmamig bench`` sweep.

A worker measures the copy ceilings a task's ratios need on itself, before the task and under the same
worker resource (so no other timed task shares its GPU meanwhile), once per worker process for each backend,
GPU set, working set and direction; then it runs the task and returns its records tagged with who ran them.
A ratio is thereby always a figure over a ceiling of the same worker and the same GPU.
"""

from __future__ import annotations

import os
from typing import Any

from ..sweep.tasks import Task
from .environment import measure_ceilings
from .runner import run_task
from .scenarios import BenchSettings
from .verify import VerificationError

__all__ = ["run_on_worker", "worker_ceilings"]

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
    """Run ``task`` here with ceilings measured here; what :class:`~dmamig.bench.driver.BenchSweep` journals.

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
