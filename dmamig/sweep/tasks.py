"""A sweep as tasks: each one runs on one machine (one process, one GPU) and returns its records.

A task is the unit that a sweep schedules, journals (:mod:`dmamig.sweep.journal`) and, with ``--cluster``,
ships to a worker (:mod:`dmamig.sweep.cluster`); so it is plain, picklable data: what to run (``kind`` and
``payload``), which ceilings its ratios need (``directions``, measured on the machine that runs it) and how
many progress steps it reports. The sweeps above this floor (``dmamig bench``, ``dmamig replay``) make their
tasks and run them; this module knows none of them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["ProgressFn", "Task"]

#: ``progress(label, steps)``: called after each repetition a task ran.
ProgressFn = Callable[[str, int], None]


@dataclass(frozen=True)
class Task:
    """One schedulable piece of a sweep.

    Attributes
    ----------
    id : str
        Stable and unique within a sweep; a resumed sweep skips the ids that finished.
    label : str
        A short description for progress bars.
    kind : str
        What the sweep's runner runs for this task (``dmamig bench``: ``"group"``, ``"state"``, ``"dma"``,
        ...; ``dmamig replay``: ``"replay"``).
    steps : int
        Progress steps the task reports (one per repetition of each of its records).
    directions : tuple of str
        Directions whose copy ceilings the task's ratios use.
    payload : Any
        What the sweep's runner runs for this kind.
    seed : int
        Seed of the task's random data, fixed by its place in the sweep so that reruns write the same bytes.
    """

    id: str
    label: str
    kind: str
    steps: int
    directions: tuple[str, ...]
    payload: Any
    seed: int = 0
