"""Sweeps as journalled tasks, run in this process or on a Dask cluster.

A sweep (``dmamig bench``, ``dmamig replay``) is a list of tasks whose results are records. Three pieces are
shared by every sweep:

- :mod:`dmamig.sweep.tasks`: the task, plain picklable data that says what to run;
- :mod:`dmamig.sweep.journal`: ``tasks.jsonl`` in the output folder, one line per finished task, written as
  each task finishes, so that an interrupted sweep resumes without re-running what finished;
- :mod:`dmamig.sweep.cluster`: connecting to a Dask cluster (``local`` or a scheduler address) and running the
  tasks there, one timed task per worker at a time, with retries.

Importing this package imports no Dask: only :mod:`dmamig.sweep.cluster` does, and only when a cluster is
asked for.
"""

from __future__ import annotations

from .journal import JOURNAL_NAME, Journal, ResumeError, fingerprint

__all__ = ["JOURNAL_NAME", "Journal", "ResumeError", "fingerprint", "is_remote"]


def is_remote(spec: str | None) -> bool:
    """Whether a ``--cluster`` value names a scheduler elsewhere (not None, not ``local`` or ``local:N``)."""
    return spec is not None and spec != "local" and not spec.startswith("local:")
