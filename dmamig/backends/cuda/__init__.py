"""The CUDA backend (CuPy): pinned host frames, device frames, stream channels and RawModule kernels.

``cupy`` is imported inside this package only, and only when a backend object is made or a kernel is built, so
importing it (and :mod:`dmamig`) works on machines without cupy or without a GPU.
"""

from .backend import (
    BATCH_COPY_ENV,
    KERNEL_FILES,
    CudaBackend,
    CudaChannel,
    DeviceFrames,
    PendingRing,
    collect_first_error,
    compile_kernel_nvrtc,
    cuda_environment,
    cuda_error_kind,
    cuda_error_text,
    event_finished,
    kernel_build_status,
    kernel_source,
    map_cuda_error,
    nvrtc_check,
    nvrtc_status,
    preload_nvrtc,
)
from .backend import (
    CUDA_ERROR_INSUFFICIENT_DRIVER as CUDA_ERROR_INSUFFICIENT_DRIVER,
)
from .backend import (
    CUDA_ERROR_MEMORY_ALLOCATION as CUDA_ERROR_MEMORY_ALLOCATION,
)
from .backend import (
    CUDA_ERROR_NO_DEVICE as CUDA_ERROR_NO_DEVICE,
)
from .backend import (
    CUDA_ERROR_NOT_READY as CUDA_ERROR_NOT_READY,
)
from .backend import (
    CUDA_ERROR_PEER_ACCESS_ALREADY_ENABLED as CUDA_ERROR_PEER_ACCESS_ALREADY_ENABLED,
)
from .backend import (
    CUDA_SUCCESS as CUDA_SUCCESS,
)
from .backend import (
    TIMING_RING as TIMING_RING,
)
from .backend import (
    run_spans as run_spans,
)

__all__ = [
    "BATCH_COPY_ENV",
    "KERNEL_FILES",
    "CudaBackend",
    "CudaChannel",
    "DeviceFrames",
    "PendingRing",
    "collect_first_error",
    "compile_kernel_nvrtc",
    "cuda_error_kind",
    "cuda_error_text",
    "cuda_environment",
    "event_finished",
    "kernel_build_status",
    "kernel_source",
    "map_cuda_error",
    "nvrtc_check",
    "nvrtc_status",
    "preload_nvrtc",
]
