"""The CUDA backend (CuPy): pinned host frames, device frames, stream channels and RawModule kernels.

``cupy`` is imported inside this package only (by :mod:`dmamig.backends.cuda.runtime`), and only when a
backend object is made, a kernel is built or CUDA is probed, so importing it (and :mod:`dmamig`) works on
machines without cupy or without a GPU. A backend may also be handed any object that provides the few CuPy
names it uses (``cupy=``); the test suite drives the real channel and backend code through a small numpy
implementation of them.

Memory: host RAM frames are pinned (``cudaHostAlloc``, portable and mapped): copies from them are truly
asynchronous and, under unified virtual addressing, the host pointer is also a device pointer, so the
gather/scatter kernel reads and writes host pages directly. Device frames are plain ``cudaMalloc`` allocations
(:class:`DeviceFrames`), outside CuPy's memory pools, so :meth:`CudaBackend.close` gives every byte back to
the driver instead of leaving it cached in a pool.

Channels: each DMA channel owns one non-blocking stream per device (so it never serialises with the legacy
default stream). Per run the plan's method picks ``cudaMemcpyAsync`` (``cudaMemcpyPeerAsync`` between
devices), the batched ``page_gather_copy`` kernel from ``kernels/page_copy.cu``, or ``cuMemcpyBatchAsync``
when it was switched on. Completions are CUDA events recorded after the work. Their state is read with
``cudaEventQuery`` directly: ``cudaSuccess`` is done, ``cudaErrorNotReady`` pending, and any other code is a
CUDA error, turned into a :class:`~dmamig.errors.DmaError` that names it (CuPy's ``Event.done`` would report
such an event as forever pending).

Kernels are compiled with NVRTC. When NVRTC (or the build) is unavailable the backend warns once and keeps
working: gather runs become one ``cudaMemcpyAsync`` per run and checksums are computed on the host.

Modules, one job each:

===================  ===============================================================================================
``codes``            CUDA status codes and flag values; CUDA errors as the project's exceptions
``runtime``          the cupy import and probe, NVRTC's preload and status, the CUDA versions ``dmamig info`` shows
``kernels``          kernel sources, launch shape, NVRTC compilation and check, build status (``dmamig info``)
``memory``           device frames outside CuPy's pools, pinned host memory, frame addresses and release
``events``           ``cudaEventQuery`` results, the timing-event ring, the completion of channel work
``ring_lane``        each device's DMA rings in pinned mapped memory, one ``ring_copy`` launch per submission
``persistent_lane``  the experiment ``dma_engine="persistent"``: a ``ring_persist`` consumer kernel per device
                     that stays resident until its rings go idle; its refusal rules
``channels``         stream channels: descriptors, per-run copy methods, submission, staged copies between GPUs
                     without peer access (a pinned bounce buffer per channel); their ring lane
``batch``            ``cuMemcpyBatchAsync`` through ``cuda.bindings``, off unless asked for
``topology``         peer access and link classes read from the runtime
``ceilings``         copy ceilings timed with CUDA events, per direction and per device pair
``backend``          :class:`CudaBackend`: devices, peer access, kernel cache, frames and their synchronous operations,
                     copy mode, channels, ceilings, close
===================  ===============================================================================================

Module-level settings are read in the module that uses them, so change them there (the names re-exported here
are copies): ``MAX_GRID`` in :mod:`~dmamig.backends.cuda.kernels`, ``import_cupy`` (the cupy import) in
:mod:`~dmamig.backends.cuda.runtime`.
"""

from .backend import CudaBackend
from .batch import BATCH_COPY_ENV
from .channels import CudaChannel
from .codes import collect_first_error, cuda_error_kind, cuda_error_text, map_cuda_error
from .events import PendingRing, event_finished
from .kernels import KERNEL_FILES, compile_kernel_nvrtc, kernel_build_status, kernel_source, nvrtc_check
from .memory import DeviceFrames
from .runtime import cuda_environment, nvrtc_status, preload_nvrtc

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
