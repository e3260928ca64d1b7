"""Backends: the CPU backend (numpy frames, worker-thread DMA channels) and the CUDA backend (CuPy).

``cupy`` is imported only inside :mod:`dmamig.backends.cuda`, lazily, so that ``import dmamig`` works anywhere.
"""

from __future__ import annotations

import os

from ..errors import BackendUnavailable, InvalidArgument
from .base import Backend, DeviceInfo

__all__ = ["BACKEND_NAMES", "Backend", "DeviceInfo", "cuda_unavailable_reason", "open_backend", "resolve_backend"]

BACKEND_NAMES = ("auto", "cpu", "cuda")
#: Environment variable that overrides ``backend="auto"``.
BACKEND_ENV = "DMAMIG_BACKEND"


def cuda_unavailable_reason() -> str | None:
    """Return why the CUDA backend cannot run here, or ``None`` when it can."""
    try:
        import cupy
    except ImportError as exc:
        return f"cupy is not installed ({exc}); install dmamig[cuda12] or dmamig[cuda13]"
    except Exception as exc:  # a broken cupy install (missing libraries) is reported, not raised
        return f"cupy failed to import: {exc}"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:
        return f"the CUDA driver/runtime is not usable: {exc}"
    if count < 1:
        return "no CUDA device is visible"
    try:
        if not cupy.is_available():
            return "cupy.is_available() is False (no usable CUDA device)"
    except Exception as exc:
        return f"cupy.is_available() failed: {exc}"
    return None


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
        return "cuda" if cuda_unavailable_reason() is None else "cpu"
    return name


def open_backend(name: str = "auto", **options) -> Backend:
    """Create the backend ``name`` (``"auto"``, ``"cpu"`` or ``"cuda"``)."""
    resolved = resolve_backend(name)
    if resolved == "cpu":
        from .cpu import CpuBackend

        return CpuBackend(**options)
    reason = cuda_unavailable_reason()
    if reason is not None:
        raise BackendUnavailable(f"backend 'cuda' cannot run here: {reason}")
    from .cuda import CudaBackend

    return CudaBackend(**options)
