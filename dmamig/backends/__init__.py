"""Backends: the CPU backend (numpy frames, worker-thread DMA channels) and the CUDA backend (CuPy).

``cupy`` is imported only inside :mod:`dmamig.backends.cuda`, lazily, so that ``import dmamig`` works anywhere.
"""

from __future__ import annotations

import os

from ..errors import BackendUnavailable, InvalidArgument
from .base import Backend, DeviceInfo
from .cuda import status as cuda_probe

__all__ = [
    "BACKEND_NAMES",
    "Backend",
    "DeviceInfo",
    "REQUIRE_GPU_ENV",
    "open_backend",
    "resolve_backend",
]

BACKEND_NAMES = ("auto", "cpu", "cuda")
#: Environment variable that overrides ``backend="auto"``.
BACKEND_ENV = "DMAMIG_BACKEND"


#: Set to ``1`` on a GPU machine to make "no usable GPU" an error for GPU tests instead of a skip.
REQUIRE_GPU_ENV = "DMAMIG_REQUIRE_GPU"

def resolve_backend(name: str = "auto") -> str:
    """Resolve ``"auto"`` (and ``DMAMIG_BACKEND``) to ``"cpu"`` or ``"cuda"``."""
    if not isinstance(name, str) or name not in BACKEND_NAMES:
        raise InvalidArgument(f"backend must be one of {BACKEND_NAMES}, got {name!r}")
    if name == "auto":
        env = os.environ.get(BACKEND_ENV, "").strip().lower()
        if env:
            if env not in ("cpu", "cuda"):
                raise InvalidArgument(f"{BACKEND_ENV} must be 'cpu' or 'cuda', got {env!r}")
            return env
        return "cuda" if cuda_probe.cuda_unavailable_reason() is None else "cpu"
    return name


def open_backend(name: str = "auto", **options) -> Backend:
    """Create the backend ``name`` (``"auto"``, ``"cpu"`` or ``"cuda"``)."""
    resolved = resolve_backend(name)
    if resolved == "cpu":
        from .cpu.backend import CpuBackend

        return CpuBackend(**options)
    reason = cuda_probe.cuda_unavailable_reason()
    if reason is not None:
        raise BackendUnavailable(f"backend 'cuda' cannot run here: {reason}")
    from .cuda import CudaBackend

    return CudaBackend(**options)
