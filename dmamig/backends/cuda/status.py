"""Whether the CUDA backend can run here: a probe of cupy and the CUDA driver (:func:`cuda_status`), and the
classification of what it found (:func:`classify_cuda`, no CUDA call), shared by ``backend="auto"``, ``dmamig
info``, the kernel build status and the GPU tests' skip or fail decision.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

__all__ = ["CudaStatus", "classify_cuda", "cuda_status", "cuda_unavailable_reason"]

# cudaError_t codes that getDeviceCount() raises when there is simply no GPU to use (no device; no driver at
# all, which the runtime reports as an insufficient driver of version 0).
_NO_DEVICE = 100
_INSUFFICIENT_DRIVER = 35


@dataclass(frozen=True)
class CudaStatus:
    """Whether the CUDA backend can run here.

    Attributes
    ----------
    state : str
        ``"usable"``; ``"absent"`` (no cupy, no driver or no GPU: GPU tests skip); or ``"unusable"`` (a GPU
        and driver are there but CUDA cannot run, e.g. a driver older than CuPy's CUDA: GPU tests fail).
    reason : str or None
        Why it is not usable, ``None`` when it is.
    """

    state: str
    reason: str | None = None

    @property
    def usable(self) -> bool:
        """Whether the CUDA backend can run."""
        return self.state == "usable"


def _version(v: int) -> str:
    return f"{v // 1000}.{(v % 1000) // 10}"


def classify_cuda(*, import_error: str | None = None, import_missing: bool = False, driver_version: int = 0,
                  runtime_version: int = 0, device_count: int | None = None,
                  count_error: tuple[int | None, str] | None = None, available: bool = True,
                  gpu_hint: bool = False) -> CudaStatus:
    """Classify what a probe of cupy and the CUDA driver found (no CUDA call is made here).

    Parameters
    ----------
    import_error : str, optional
        Why ``import cupy`` failed.
    import_missing : bool
        The failure was a plain "not installed" (``ImportError``) rather than a broken install.
    driver_version : int
        ``cudaDriverGetVersion()``: 0 when no driver is installed.
    runtime_version : int
        The CUDA version cupy was built for (``cudaRuntimeGetVersion()``).
    device_count : int, optional
        ``getDeviceCount()`` when it succeeded.
    count_error : (int or None, str), optional
        Status code and text of the exception ``getDeviceCount()`` raised.
    available : bool
        ``cupy.is_available()``.
    gpu_hint : bool
        The kernel shows NVIDIA GPUs (``/proc/driver/nvidia/gpus`` or ``/dev/nvidia0``).

    Returns
    -------
    CudaStatus
    """
    if import_error is not None:
        if import_missing:
            return CudaStatus("absent", f"cupy is not installed ({import_error}); install dmamig[cuda12] or "
                                        f"dmamig[cuda13]")
        return CudaStatus("unusable" if gpu_hint else "absent", f"cupy failed to import: {import_error}")
    if count_error is not None:
        code, text = count_error
        if code == _NO_DEVICE:
            return CudaStatus("unusable" if gpu_hint else "absent", f"no CUDA device is visible ({text})")
        if code == _INSUFFICIENT_DRIVER and driver_version <= 0:
            if gpu_hint:
                return CudaStatus("unusable", f"an NVIDIA GPU is present but its CUDA driver library cannot be "
                                              f"loaded ({text})")
            return CudaStatus("absent", "no CUDA driver is installed (no GPU)")
        if code == _INSUFFICIENT_DRIVER:
            return CudaStatus("unusable", (
                f"insufficient driver: the driver supports CUDA {_version(driver_version)}, cupy was built for "
                f"CUDA {_version(runtime_version)}; update the driver or install the cupy build for CUDA "
                f"{driver_version // 1000} (dmamig[cuda{driver_version // 1000}])"))
        return CudaStatus("unusable", f"a CUDA driver is installed but CUDA cannot start: {text}")
    if not device_count:
        return CudaStatus("unusable" if gpu_hint else "absent", "no CUDA device is visible")
    if not available:
        return CudaStatus("unusable", "cupy.is_available() is False although CUDA devices are visible")
    return CudaStatus("usable")


def _gpu_hint() -> bool:
    proc = "/proc/driver/nvidia/gpus"
    try:
        if os.path.isdir(proc) and os.listdir(proc):
            return True
    except OSError:
        pass
    return os.path.exists("/dev/nvidia0")


def cuda_status() -> CudaStatus:
    """Probe cupy and the CUDA driver (imports cupy, never raises) and classify the result."""
    from .runtime import probe_cuda

    hint = _gpu_hint()
    return classify_cuda(**probe_cuda(), gpu_hint=hint)


def cuda_unavailable_reason() -> str | None:
    """Return why the CUDA backend cannot run here, or ``None`` when it can."""
    status = cuda_status()
    return None if status.usable else status.reason
