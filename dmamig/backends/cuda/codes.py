"""The CUDA runtime's numbers that the backend uses, and what a failed CUDA call becomes.

``cudaError_t`` codes the backend interprets, the flag values of its allocation, copy and event calls (checked
against CuPy's own constants by ``tests/test_cuda_api.py``), CUDA's version encoding, and the mapping of
CuPy/CUDA exceptions to the project's :class:`~dmamig.errors.OutOfMemory`,
:class:`~dmamig.errors.BackendUnavailable` and :class:`~dmamig.errors.DmaError`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from ...errors import BackendUnavailable, DmaError, DmamigError, OutOfMemory

__all__ = ["CUDA_ERROR_INSUFFICIENT_DRIVER", "CUDA_ERROR_MEMORY_ALLOCATION", "CUDA_ERROR_NOT_READY",
           "CUDA_ERROR_NO_DEVICE", "CUDA_ERROR_PEER_ACCESS_ALREADY_ENABLED", "CUDA_SUCCESS", "EVENT_BLOCKING_SYNC",
           "EVENT_DISABLE_TIMING", "HOST_ALLOC_MAPPED", "HOST_ALLOC_PORTABLE", "MEMCPY_DEFAULT",
           "MEMCPY_DEVICE_TO_HOST", "MEMCPY_HOST_TO_DEVICE", "STICKY_CODES", "collect_first_error", "cuda_error_kind",
           "cuda_error_text", "cuda_version_text", "is_sticky", "map_cuda_error", "stream_status"]

# CUDA runtime codes the backend interprets (cudaError_t values, stable across CUDA 11-13).
CUDA_SUCCESS = 0
CUDA_ERROR_MEMORY_ALLOCATION = 2
CUDA_ERROR_INSUFFICIENT_DRIVER = 35
CUDA_ERROR_NO_DEVICE = 100
CUDA_ERROR_NOT_READY = 600
CUDA_ERROR_PEER_ACCESS_ALREADY_ENABLED = 704
# Codes that mean "no usable CUDA here" rather than a failed operation: initialization error, insufficient
# driver, devices unavailable, no device, invalid device, system not ready, driver mismatch, compat unsupported.
_UNAVAILABLE_CODES = frozenset({3, 35, 46, 100, 101, 802, 803, 804})
#: Codes after which the context is unusable until the process exits (sticky): an uncorrectable ECC error,
#: an illegal address, a launch timeout, a device-side assert, a hardware stack error, an illegal or misaligned
#: instruction or address, an invalid address space or program counter, a failed launch.
STICKY_CODES = frozenset({214, 700, 702, 710, 714, 715, 716, 717, 718, 719})


def stream_status(rt: Any, stream: Any) -> int:
    """``cudaStreamQuery`` of ``stream`` as a code (CuPy raises for an error code; its status is the code)."""
    try:
        return int(rt.streamQuery(stream.ptr))
    except Exception as exc:
        return int(getattr(exc, "status", -1))


def is_sticky(code: int | None) -> bool:
    """Whether a ``cudaError_t`` leaves its context unusable (see :data:`STICKY_CODES`)."""
    return code in STICKY_CODES

# cudaHostAllocPortable | cudaHostAllocMapped: pinned for every device, and device-addressable.
HOST_ALLOC_PORTABLE = 1
HOST_ALLOC_MAPPED = 2
MEMCPY_HOST_TO_DEVICE = 1
MEMCPY_DEVICE_TO_HOST = 2
MEMCPY_DEFAULT = 4  # cudaMemcpyDefault: the driver infers the direction from the pointers (UVA)
EVENT_BLOCKING_SYNC = 1  # a waiting thread sleeps in the driver instead of spinning
EVENT_DISABLE_TIMING = 2


def cuda_version_text(v: int) -> str:
    """``13020`` -> ``"13.2"`` (CUDA's ``1000 * major + 10 * minor`` encoding); ``0`` -> ``"none"``."""
    v = int(v)
    return "none" if v <= 0 else f"{v // 1000}.{(v % 1000) // 10}"


def cuda_error_text(code: int, runtime: Any = None) -> str:
    """Name and meaning of a ``cudaError_t`` code, e.g. ``"cudaErrorIllegalAddress: an illegal memory ..."``.

    Parameters
    ----------
    code : int
        The CUDA runtime status code.
    runtime : module, optional
        ``cupy.cuda.runtime`` (or an object with a ``CUDARuntimeError`` class); its error class knows the names.
        Without it only the number is given.
    """
    err_cls = getattr(runtime, "CUDARuntimeError", None)
    if err_cls is not None:
        try:
            return f"{err_cls(int(code))} (code {int(code)})"
        except Exception:  # an unknown code: fall back to the number
            pass
    return f"CUDA error code {int(code)}"


def collect_first_error(calls: Iterable[Callable[[], Any]]) -> BaseException | None:
    """Call every callable, even after one raised; return the first exception (``None`` when none raised).

    Used where stopping early would be unsafe: every stream of a failed submission must have stopped before
    its destination frames may be freed, so each event is synchronized whatever the others reported.
    """
    first: BaseException | None = None
    for call in calls:
        try:
            call()
        except Exception as exc:
            if first is None:
                first = exc
    return first


def cuda_error_kind(exc: BaseException) -> str:
    """Classify an exception raised by a CuPy call: ``"oom"``, ``"unavailable"`` or ``"error"``.

    ``MemoryError`` (CuPy's ``OutOfMemoryError``) and ``cudaErrorMemoryAllocation`` are ``"oom"``; status codes
    meaning that CUDA cannot run here (insufficient driver, no device, initialization errors) are
    ``"unavailable"``; anything else is ``"error"``.
    """
    if isinstance(exc, DmamigError):
        return "error"
    status = getattr(exc, "status", None)
    if isinstance(exc, MemoryError) or status == CUDA_ERROR_MEMORY_ALLOCATION:
        return "oom"
    if isinstance(status, int) and status in _UNAVAILABLE_CODES:
        return "unavailable"
    return "error"


def map_cuda_error(exc: BaseException, what: str) -> DmamigError:
    """The project's exception for a CuPy/CUDA exception raised while doing ``what``.

    Returns :class:`~dmamig.errors.OutOfMemory`, :class:`~dmamig.errors.BackendUnavailable` or
    :class:`~dmamig.errors.DmaError` (see :func:`cuda_error_kind`); one of the project's own errors is returned
    unchanged. The caller raises the result ``from exc``.
    """
    if isinstance(exc, DmamigError):
        return exc
    kind = cuda_error_kind(exc)
    detail = f"{type(exc).__name__}: {exc}"
    if kind == "oom":
        return OutOfMemory(f"{what}: the CUDA allocation failed ({detail}); use fewer pages per node or free "
                           f"GPU memory held by other processes")
    if kind == "unavailable":
        return BackendUnavailable(f"{what}: CUDA is not usable ({detail})")
    return DmaError(f"{what} failed: {detail}")
