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
