"""Who runs a task: host, Dask worker, process and GPUs; recorded beside every result a cluster returns.

These functions run on the worker (inside a task, or through ``Client.run``). They import Dask only to ask
for the current worker, and cupy never: GPU names come from the CUDA backend, the rest of each GPU's record
(UUID, PCI bus id, driver, modes, clocks) from :mod:`dmamig.sweep.hardware`.
"""

from __future__ import annotations

import os
import platform
from typing import Any

from .hardware import cpu_model, gpu_facts

__all__ = ["identity", "probe_backend"]

_IDENTITY: dict[tuple[str, int], dict[str, Any]] = {}


def _worker_address() -> tuple[str | None, str | None]:
    try:
        from distributed import get_worker

        w = get_worker()
    except (ImportError, ValueError):  # not inside a Dask worker
        return None, None
    return str(w.address), (None if w.name is None else str(w.name))


def _gpus(backend: str, devices: int) -> list[dict[str, Any]]:
    """The GPUs a task of ``devices`` device nodes uses here (visible devices ``0 .. devices - 1``), described
    by :func:`dmamig.sweep.hardware.gpu_facts`."""
    if backend != "cuda":
        return []
    from ..backends import open_backend

    be = open_backend("cuda")
    try:
        infos = [dict(d) for d in be.devices()][:max(1, devices)]
    finally:
        be.close()
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    out = []
    for i, g in enumerate(gpu_facts(infos)):
        phys = visible[i] if i < len(visible) else str(i)
        if str(g.get("uuid", "")).startswith("unknown") and phys.startswith(("GPU-", "MIG-")):
            g["uuid"] = phys  # CUDA_VISIBLE_DEVICES named it
        g["index"] = int(phys) if phys.isdigit() else None
        g["name"] = str(g.get("name", "unknown"))
        out.append(g)
    return out


def identity(backend: str, devices: int) -> dict[str, Any]:
    """Who runs tasks in this process: ``host``, ``cpu`` (its CPU model), ``address`` and ``name`` of the Dask
    worker (None outside one), ``pid``, and ``gpus`` (``index``, ``name``, ``uuid``, PCI bus id, driver and the
    rest of :func:`dmamig.sweep.hardware.gpu_facts` for each GPU a task uses; empty on the CPU backend).
    Computed once per process and backend."""
    key = (backend, devices)
    if key not in _IDENTITY:
        address, name = _worker_address()
        _IDENTITY[key] = {"host": platform.node(), "cpu": cpu_model(), "address": address, "name": name,
                          "pid": os.getpid(), "gpus": _gpus(backend, devices)}
    return dict(_IDENTITY[key])


def probe_backend(name: str) -> dict[str, Any]:
    """What ``--backend NAME`` resolves to on this worker, and its usable GPUs (``error`` when it cannot run)."""
    from ..backends import resolve_backend
    from ..backends.cuda import status as cuda_probe

    try:
        resolved = resolve_backend(name)
    except ValueError as exc:
        return {"host": platform.node(), "backend": None, "gpus": 0, "error": str(exc)}
    gpus = 0
    if resolved == "cuda":
        reason = cuda_probe.cuda_unavailable_reason()
        if reason is not None:
            return {"host": platform.node(), "backend": None, "gpus": 0, "error": f"cuda cannot run: {reason}"}
        from ..backends import open_backend

        be = open_backend("cuda")
        try:
            gpus = len(be.devices())
        finally:
            be.close()
    return {"host": platform.node(), "backend": resolved, "gpus": gpus, "error": None}
