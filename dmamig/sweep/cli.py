"""``--cluster`` and ``--resume`` of the sweep commands (``dmamig bench``, ``dmamig replay``).

Every problem here is a usage error told in one line (``parser.error``, exit 2), Dask missing included.
Nothing here imports Dask unless ``--cluster`` is given.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .journal import JOURNAL_NAME, ResumeError

__all__ = ["add_sweep_arguments", "check_sweep_arguments", "connect_or_exit", "is_remote", "open_sweep",
           "remote_backend", "resume_folder"]


def is_remote(spec: str | None) -> bool:
    """Whether a ``--cluster`` value names a scheduler elsewhere (not None, not ``local`` or ``local:N``)."""
    return spec is not None and spec != "local" and not spec.startswith("local:")


def add_sweep_arguments(p: argparse.ArgumentParser, unit: str) -> None:
    """Add ``--cluster`` and ``--resume`` to a sweep command whose tasks are ``unit`` (e.g. "scenario")."""
    p.add_argument("--cluster", metavar="ADDRESS",
                   help=f"run each {unit} as a task on a Dask cluster: 'local' (worker processes on this machine, "
                        f"one per GPU on cuda; local:N for N workers) or a scheduler address such as "
                        f"tcp://host:8786 (workers started with --nthreads 1 --resources bench=1); needs "
                        f"pip install 'dmamig[dask]'")
    p.add_argument("--resume", type=Path, metavar="DIR",
                   help=f"continue the interrupted sweep in DIR with the same options: each {unit} its "
                        f"{JOURNAL_NAME} holds is kept, not run again")


def check_sweep_arguments(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Usage errors of ``--cluster`` (Dask missing, an empty or malformed value) before anything runs."""
    spec = args.cluster
    if spec is None:
        return
    from .cluster import ClusterError, require_dask

    if not spec.strip():
        parser.error("argument --cluster: expected 'local', 'local:N' or a scheduler address such as "
                     "tcp://host:8786")
    if spec.startswith("local:") and not (spec[6:].isascii() and spec[6:].isdigit() and int(spec[6:]) >= 1):
        parser.error(f"argument --cluster: {spec!r}: give local, local:N with N >= 1 workers, or a scheduler "
                     f"address such as tcp://host:8786")
    try:
        require_dask()
    except ClusterError as exc:
        parser.error(str(exc))


def connect_or_exit(parser: argparse.ArgumentParser, spec: str, **options: Any) -> Any:
    """:func:`dmamig.sweep.cluster.connect`, with a usage error when the cluster cannot be used."""
    from .cluster import ClusterError, connect

    try:
        return connect(spec, **options)
    except ClusterError as exc:
        parser.error(str(exc))


def remote_backend(args: argparse.Namespace, parser: argparse.ArgumentParser) -> tuple[str, int]:
    """Resolve ``--backend`` on the workers of the scheduler ``--cluster`` names (this machine may have no
    GPU while they do); every worker must agree. Returns ``(backend, GPUs a task may use by default)``.

    A task uses one GPU unless ``--devices`` says more: a ``dask cuda worker`` sees every GPU of its host but
    owns only the first, so two GPUs per task would reach into a neighbour's. ``--devices N`` is refused when
    a worker sees fewer than N GPUs.
    """
    from .worker import probe_backend

    session = connect_or_exit(parser, args.cluster)
    try:
        probes = session.probe(probe_backend, args.backend)
    finally:
        session.close()
    for address, p in sorted(probes.items()):
        if p["error"]:
            parser.error(f"argument --backend: {args.backend} cannot run on worker {address} ({p['host']}): "
                         f"{p['error']}")
    kinds = sorted({p["backend"] for p in probes.values()})
    if len(kinds) != 1:
        parser.error(f"argument --backend: the workers at {args.cluster} resolve {args.backend!r} to "
                     f"{' and '.join(kinds) or 'nothing'}; give --backend cpu or --backend cuda")
    least = min(p["gpus"] for p in probes.values())
    wanted = getattr(args, "devices", None)
    if kinds[0] == "cuda" and wanted is not None and wanted > least:
        parser.error(f"argument --devices: {wanted} GPUs per task, but a worker at {args.cluster} sees {least}; "
                     f"start workers with {wanted} GPUs each (CUDA_VISIBLE_DEVICES) or give fewer")
    return kinds[0], min(least, 1)


def open_sweep(args: argparse.Namespace, parser: Any, make: Callable[[Path, bool], Any],
               new_folder: Callable[[], tuple[Path, bool]], **connect_options: Any) -> tuple[Any, Path, bool, Any]:
    """The output folder, the sweep bound to it and, with ``--cluster``, the cluster session.

    Parameters
    ----------
    args, parser
        The parsed arguments, and what usage errors go to (``parser.error``).
    make : callable
        ``make(folder, resume)``: the sweep (raises :class:`~dmamig.sweep.ResumeError` when it cannot be).
    new_folder : callable
        ``new_folder()``: the folder of a fresh sweep and whether it was created here (without ``--resume``).
    connect_options
        Passed to :func:`dmamig.sweep.cluster.connect`.

    Returns
    -------
    tuple
        ``(sweep, folder, created, session)``; ``session`` is None without ``--cluster``. A folder created
        here is removed again, if still empty, when a usage error follows.
    """
    resume = args.resume is not None
    out, created = (resume_folder(args, parser), False) if resume else new_folder()
    try:
        try:
            sweep = make(out, resume)
        except ResumeError as exc:
            parser.error(str(exc))
        session = connect_or_exit(parser, args.cluster, **connect_options) if args.cluster else None
    except BaseException:
        if created:
            try:
                os.rmdir(out)  # only if empty: a run that wrote nothing leaves nothing behind
            except OSError:
                pass
        raise
    return sweep, out, created, session


def resume_folder(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Path:
    """The folder ``--resume`` names, checked: not another ``--out``, and not a sweep that completed."""
    folder: Path = args.resume
    if args.out is not None and Path(args.out).resolve() != folder.resolve():
        parser.error(f"argument --resume: not allowed with --out {str(args.out)!r}: a sweep resumes in its own "
                     f"folder; drop --out")
    results = folder / "results.json"
    if results.is_file():
        try:
            partial = bool(json.loads(results.read_text()).get("partial"))
        except (OSError, ValueError, AttributeError):
            partial = True  # unreadable: the journal decides what finished
        if not partial:
            parser.error(f"argument --resume: {str(folder)!r} holds a complete results.json: that sweep "
                         f"finished; nothing to resume")
    return folder
