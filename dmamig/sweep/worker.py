"""Who runs a task: host, Dask worker, process and GPUs; recorded beside every result a cluster returns.

These functions run on the worker (inside a task, or through ``Client.run``). They import Dask only to ask
for the current worker, and cupy never: GPU names come from the CUDA backend, GPU UUIDs from
``CUDA_VISIBLE_DEVICES`` or ``nvidia-smi``.
"""

from __future__ import annotations

import os
import platform
import subprocess
from typing import Any

__all__ = ["identity", "probe_backend"]

_IDENTITY: dict[tuple[str, int], dict[str, Any]] = {}


def _worker_address() -> tuple[str | None, str | None]:
    try:
        from distributed import get_worker

        w = get_worker()
    except (ImportError, ValueError):  # not inside a Dask worker
        return None, None
    return str(w.address), (None if w.name is None else str(w.name))


def _smi_uuids() -> dict[str, str]:
    """nvidia-smi's index -> UUID (empty when it cannot tell)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=index,uuid", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return {}
    if out.returncode != 0:
        return {}
    pairs = (line.split(",", 1) for line in out.stdout.splitlines() if "," in line)
    return {i.strip(): u.strip() for i, u in pairs}


def _gpus(backend: str, devices: int) -> list[dict[str, Any]]:
    """The GPUs a task of ``devices`` device nodes uses here: visible devices ``0 .. devices - 1``."""
    if backend != "cuda":
        return []
    from ..backends import open_backend

    be = open_backend("cuda")
    try:
        infos = [dict(d) for d in be.devices()][:max(1, devices)]
    finally:
        be.close()
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    smi: dict[str, str] | None = None
    out = []
    for i, d in enumerate(infos):
        phys = visible[i] if i < len(visible) else str(i)
        uuid = d.get("uuid") or (phys if phys.startswith(("GPU-", "MIG-")) else None)
        if uuid is None and phys.isdigit():
            smi = _smi_uuids() if smi is None else smi
            # nvidia-smi counts GPUs in PCI bus order; CUDA does only under CUDA_DEVICE_ORDER=PCI_BUS_ID.
            if os.environ.get("CUDA_DEVICE_ORDER") == "PCI_BUS_ID" or len(smi) == 1:
                uuid = smi.get(phys)
        out.append({"index": int(phys) if phys.isdigit() else None, "name": str(d.get("name", "unknown")),
                    "uuid": uuid})
    return out


def identity(backend: str, devices: int) -> dict[str, Any]:
    """Who runs tasks in this process: ``host``, ``address`` and ``name`` of the Dask worker (None outside
    one), ``pid``, and ``gpus`` (``index``, ``name``, ``uuid`` of each GPU a task uses; empty on the CPU
    backend). Computed once per process and backend."""
    key = (backend, devices)
    if key not in _IDENTITY:
        address, name = _worker_address()
        _IDENTITY[key] = {"host": platform.node(), "address": address, "name": name, "pid": os.getpid(),
                          "gpus": _gpus(backend, devices)}
    return dict(_IDENTITY[key])


def probe_backend(name: str) -> dict[str, Any]:
    """What ``--backend NAME`` resolves to on this worker, and its usable GPUs (``error`` when it cannot run)."""
    from ..backends import cuda_unavailable_reason, resolve_backend

    try:
        resolved = resolve_backend(name)
    except ValueError as exc:
        return {"host": platform.node(), "backend": None, "gpus": 0, "error": str(exc)}
    gpus = 0
    if resolved == "cuda":
        reason = cuda_unavailable_reason()
        if reason is not None:
            return {"host": platform.node(), "backend": None, "gpus": 0, "error": f"cuda cannot run: {reason}"}
        from ..backends import open_backend

        be = open_backend("cuda")
        try:
            gpus = len(be.devices())
        finally:
            be.close()
    return {"host": platform.node(), "backend": resolved, "gpus": gpus, "error": None}
