"""Running a sweep's tasks on a Dask cluster: ``local``, or the scheduler address of many runners.

Each task becomes one Dask task that needs one unit of the worker resource :data:`RESOURCE`. Every worker
this module starts declares exactly one unit (remote workers must be started with ``--resources bench=1``),
so a worker runs one timed task at a time, and on a GPU worker that task has the worker's GPU to itself.
The client keeps no more tasks in flight than there are units, so a worker that dies takes at most the task
it was running with it.

A task that raises is retried once (``retries=1``); a task whose worker dies is rescheduled by the scheduler,
and fails once its workers died ``allowed-failures + 1`` times (the clusters started here allow 1: a task is
run at most twice). A task that fails again is reported as a :class:`TaskFailure`; the other tasks go on.

Dask is imported here only, and only inside functions: ``import dmamig.sweep.cluster`` is cheap and safe
without Dask installed, and a sweep without ``--cluster`` never imports it.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["DASK_HINT", "RESOURCE", "ClusterError", "Session", "TaskFailure", "connect", "local_gpu_groups",
           "local_worker_limit", "require_dask", "workers_summary"]

#: Worker resource a sweep task needs one unit of; a worker with one unit runs one timed task at a time.
RESOURCE = "bench"
#: How to install what ``--cluster`` needs.
DASK_HINT = "pip install 'dmamig[dask]'"


class ClusterError(ValueError):
    """A ``--cluster`` that cannot be used: Dask missing, a scheduler that cannot be reached, no usable worker.
    The message names the argument and the fix."""


@dataclass(frozen=True)
class TaskFailure:
    """A task that failed twice (or whose workers died twice): its id and why, in one line."""

    id: str
    error: str


def require_dask(arg: str = "--cluster") -> None:
    """Raise :class:`ClusterError` unless Dask's ``distributed`` can be imported."""
    if importlib.util.find_spec("distributed") is None:
        raise ClusterError(f"argument {arg}: needs Dask (the distributed package), which is not installed: "
                           f"{DASK_HINT}")


def local_gpu_groups(gpus: int, per_task: int) -> list[list[int]]:
    """Disjoint groups of ``per_task`` GPU indices, one group per local worker (at least one group)."""
    per = max(1, per_task)
    groups = [list(range(i, i + per)) for i in range(0, gpus - per + 1, per)]
    return groups or [list(range(max(gpus, 1)))]


def _cores() -> int:
    """The cores this process may run on (its affinity), which its worker processes inherit."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def _cpu_workers(memory_per_task: int) -> int:
    # A task runs a migrating thread beside its DMA channel threads: one worker per two cores, and no more
    # workers than there is memory for their working sets at once.
    n = max(1, _cores() // 2)
    phys = _memory()
    if memory_per_task > 0 and phys > 0:
        n = min(n, max(1, phys // memory_per_task))
    return n


def local_worker_limit(backend: str, gpus: int, devices_per_task: int = 1,
                       memory_per_task: int = 0) -> tuple[int, str]:
    """The most workers ``--cluster local:N`` may start on this machine, and why, in words.

    On the CUDA backend one worker per GPU (per group of ``devices_per_task`` GPUs): a worker owns its GPUs.
    On the CPU backend one worker per core this process may use (two workers on one core would time each
    other), and no more than there is memory for their working sets at once.
    """
    if backend == "cuda":
        per = max(1, devices_per_task)
        n = max(1, gpus // per)
        return n, (f"{gpus} GPU(s) here, {per} per worker" if per > 1 else f"{gpus} GPU(s) here, one per worker")
    cores = _cores()
    n, why = cores, f"{cores} core(s) available to this process, one per worker"
    phys = _memory()
    if memory_per_task > 0 and phys > 0 and phys // memory_per_task < n:
        n = max(1, phys // memory_per_task)
        why = (f"memory for {n} working set(s) at once ({phys / (1 << 30):.1f} GiB here, "
               f"{memory_per_task / (1 << 20):.0f} MiB per task)")
    return n, why


class Session:
    """A client connected to a cluster, and the cluster itself when this session started it.

    Use :func:`connect` to make one; close it (or use it as a context manager) to release both.
    """

    def __init__(self, spec: str, client: Any, cluster: Any | None):
        self.spec = spec
        self.client = client
        self.cluster = cluster

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @property
    def address(self) -> str:
        """The scheduler's address."""
        return str(self.client.scheduler.address)

    def workers(self) -> dict[str, dict[str, Any]]:
        """The scheduler's view of each worker (address -> info, with ``resources``)."""
        try:
            info = self.client.scheduler_info(n_workers=-1)
        except TypeError:  # distributed before 2025 always lists every worker
            info = self.client.scheduler_info()
        return dict(info.get("workers", {}))

    def slots(self) -> int:
        """Tasks that may run at once: the units of :data:`RESOURCE` the workers declare (at least 1)."""
        return max(1, int(sum(w.get("resources", {}).get(RESOURCE, 0) for w in self.workers().values())))

    def describe(self) -> dict[str, Any]:
        """What results record about the cluster: the ``--cluster`` value, scheduler and worker count."""
        return {"spec": self.spec, "scheduler": self.address, "workers": len(self.workers())}

    def probe(self, fn: Callable[..., Any], *args: Any) -> dict[str, Any]:
        """Run ``fn(*args)`` on every worker now (outside the task queue); results by worker address."""
        return dict(self.client.run(fn, *args))

    def run(self, tasks: Sequence[Any], fn: Callable[..., Any], *args: Any,
            on_done: Callable[[Any, Any], None], retries: int = 1) -> list[TaskFailure]:
        """Run ``fn(task, *args)`` for every task on the cluster; call ``on_done(task, result)`` as each finishes.

        Tasks are submitted in order, no more at once than :meth:`slots`; ``on_done`` runs here, in the
        order tasks finish. An exception from ``on_done`` (a verification failure, Ctrl-C) cancels every task
        still in flight and propagates.

        Returns
        -------
        list of TaskFailure
            The tasks that failed again after their retry, in the order they failed.
        """
        from distributed import as_completed

        token = uuid.uuid4().hex[:8]  # keys unique to this run: a resumed sweep never meets old results
        todo = list(tasks)
        live: dict[Any, tuple[Any, Any]] = {}
        failures: list[TaskFailure] = []
        done = as_completed()

        def fill() -> None:
            limit = self.slots()
            while todo and len(live) < limit:
                task = todo.pop(0)
                fut = self.client.submit(fn, task, *args, key=f"dmamig-{token}-{task.id}", pure=False,
                                         resources={RESOURCE: 1}, retries=retries)
                live[fut.key] = (fut, task)
                done.add(fut)

        try:
            fill()
            for fut in done:
                _, task = live.pop(fut.key)
                if fut.status == "finished":
                    on_done(task, fut.result())
                else:
                    failures.append(TaskFailure(str(task.id), _why(fut)))
                fut.release()
                fill()
        except BaseException:
            if live:
                self.client.cancel([f for f, _ in live.values()], force=True)
            raise
        return failures

    def close(self) -> None:
        """Close the client, and the cluster when this session started it."""
        for part in (self.client, self.cluster):
            if part is None:
                continue
            try:
                part.close()
            except Exception:  # closing must not hide what made us close (an interrupt, a failure)
                pass


def workers_summary(workers: list[dict[str, Any]]) -> str:
    """How many workers, on which hosts, ran a sweep: ``"3 worker(s) on 2 host(s): a (2), b (1)"``.

    Parameters
    ----------
    workers : list of dict
        Who ran the tasks (:func:`dmamig.sweep.worker.identity` of each distinct worker).
    """
    hosts: dict[str, int] = {}
    for w in workers:
        host = str(w.get("host") or "unknown host")
        hosts[host] = hosts.get(host, 0) + 1
    return (f"{len(workers)} worker(s) on {len(hosts)} host(s): "
            + ", ".join(f"{h} ({n})" for h, n in sorted(hosts.items())))


def _why(fut: Any) -> str:
    """One line on why a future failed."""
    if fut.status == "cancelled":
        return "cancelled by the scheduler (its data was lost)"
    try:
        exc = fut.exception(timeout=10)
    except Exception as err:
        return f"{type(err).__name__}: {err}"
    if type(exc).__name__ == "KilledWorker":
        return f"its worker died each time it ran (KilledWorker: {' '.join(str(exc).split())})"
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"


def connect(spec: str, *, backend: str = "cpu", gpus: int = 0, devices_per_task: int = 1,
            memory_per_task: int = 0, timeout: float = 10.0, wait: float = 30.0) -> Session:
    """Connect to the cluster ``spec`` names, starting it when it is local.

    Parameters
    ----------
    spec : str
        ``local`` (``local:N`` for N workers): a cluster of worker processes on this machine, one thread and
        one :data:`RESOURCE` unit each; on the CUDA backend one worker per GPU (``dask_cuda.LocalCUDACluster``
        when dask-cuda is installed and a task uses one GPU), or per group of ``devices_per_task`` GPUs.
        Anything else is a scheduler address, e.g. ``tcp://host:8786``.
    backend : str
        The resolved backend of the sweep (sizes a local cluster).
    gpus : int
        GPUs on this machine (CUDA backend).
    devices_per_task : int
        GPUs one task uses (a bench sweep with ``--devices 2`` uses two).
    memory_per_task : int
        Bytes one task holds at once; a local CPU cluster starts no more workers than memory allows.
    timeout : float
        Seconds to wait for the scheduler to answer.
    wait : float
        Seconds to wait for a first worker to join it.

    Raises
    ------
    ClusterError
        Dask is missing, the scheduler cannot be reached, no worker joins, or none declares :data:`RESOURCE`.
    """
    require_dask()
    from distributed import Client

    if spec == "local" or spec.startswith("local:"):
        n = None
        if spec != "local":
            count = spec.split(":", 1)[1]
            if not (count.isascii() and count.isdigit()) or int(count) < 1:
                raise ClusterError(f"argument --cluster: {spec!r}: give local, local:N with N >= 1 workers, or "
                                   f"a scheduler address such as tcp://host:8786")
            n = int(count)
            limit, why = local_worker_limit(backend, gpus, devices_per_task, memory_per_task)
            if n > limit:
                raise ClusterError(f"argument --cluster: {spec!r} asks for {n} workers, but this machine allows "
                                   f"at most {limit} ({why}); give local:{limit} or fewer, or plain local")
        cluster = _local_cluster(backend, gpus, devices_per_task, memory_per_task, n)
        try:
            return Session(spec, Client(cluster), cluster)
        except BaseException:
            cluster.close()  # its worker processes must not outlive a failed (or interrupted) connection
            raise
    try:
        client = Client(spec, timeout=timeout)
    except (OSError, TimeoutError, ValueError) as exc:
        raise ClusterError(f"argument --cluster: cannot reach a Dask scheduler at {spec!r}: "
                           f"{' '.join(str(exc).split()) or type(exc).__name__}; start one with `dask scheduler` "
                           f"and give its address, e.g. tcp://host:8786") from None
    session = Session(spec, client, None)
    try:  # the client is closed on every way out but success: a usage error, a lost scheduler, Ctrl-C
        try:
            client.wait_for_workers(1, timeout=wait)
        except (OSError, TimeoutError):
            raise ClusterError(f"argument --cluster: no worker joined the scheduler at {spec!r} within "
                               f"{wait:.0f} s; start workers with `dask worker {spec} --nthreads 1 --resources "
                               f"{RESOURCE}=1`") from None
        if not any(w.get("resources", {}).get(RESOURCE) for w in session.workers().values()):
            raise ClusterError(f"argument --cluster: no worker at {spec!r} declares the {RESOURCE!r} resource; "
                               f"start them with `dask worker {spec} --nthreads 1 --resources {RESOURCE}=1`")
    except BaseException:
        session.close()
        raise
    return session


def _local_cluster(backend: str, gpus: int, devices_per_task: int, memory_per_task: int, n: int | None) -> Any:
    """Start the workers of ``--cluster local`` (see :func:`connect`)."""
    import dask
    from distributed import LocalCluster

    # Any free port for the scheduler's HTTP server: two sweeps at once must not fight over the default 8787.
    common = {"threads_per_worker": 1, "resources": {RESOURCE: 1}, "dashboard_address": ":0",
              "silence_logs": logging.ERROR, "memory_limit": 0}
    # A task runs at most twice: once, and once more after its worker died (the scheduler reads this when it
    # starts, which is here: a local cluster's scheduler runs in this process).
    with dask.config.set({"distributed.scheduler.allowed-failures": 1}):
        if backend != "cuda":
            return LocalCluster(n_workers=n or _cpu_workers(memory_per_task), processes=True, **common)
        groups = local_gpu_groups(gpus, devices_per_task)[:n]
        if devices_per_task <= 1 and importlib.util.find_spec("dask_cuda") is not None:
            from dask_cuda import LocalCUDACluster

            return LocalCUDACluster(CUDA_VISIBLE_DEVICES=[g[0] for g in groups], **common)
        return gpu_spec_cluster(groups)


def gpu_spec_cluster(groups: list[list[int]]) -> Any:
    """A local cluster of one worker per group of GPU indices, each seeing only its own GPUs.

    Used for GPUs when dask-cuda is not installed, or when a task needs several GPUs (dask-cuda gives each
    worker one GPU of its own, and would let a two-GPU task reach into its neighbour's).
    """
    from distributed import Nanny, Scheduler, SpecCluster

    workers = {
        f"gpu{'+'.join(map(str, g))}": {"cls": Nanny, "options": {
            "nthreads": 1, "resources": {RESOURCE: 1}, "memory_limit": 0, "silence_logs": logging.ERROR,
            # PCI bus order: the indices here, CUDA's and nvidia-smi's then name the same GPU.
            "env": {"CUDA_VISIBLE_DEVICES": ",".join(map(str, g)), "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}}}
        for g in groups}
    return SpecCluster(workers=workers, scheduler={"cls": Scheduler, "options": {"dashboard_address": ":0"}},
                       silence_logs=logging.ERROR)
