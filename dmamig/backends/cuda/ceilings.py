"""Copy ceilings timed with CUDA events, for benchmarks to print beside what a migration achieves: one
contiguous copy host to device, device to host or device to device (:func:`cuda_copy_ceiling`), and per pair of
devices, direct or staged as the channels stage it (:func:`cuda_pair_ceiling`). Their buffers are allocated
outside CuPy's pools and freed before returning. The CUDA backend's ``copy_ceiling`` and ``pair_ceiling``
check their arguments and call these, as the CPU backend's call :mod:`dmamig.backends.ceiling`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ...dma.staging import STAGE_BYTES
from ...errors import InvalidArgument
from .codes import (
    EVENT_BLOCKING_SYNC,
    EVENT_DISABLE_TIMING,
    HOST_ALLOC_PORTABLE,
    MEMCPY_DEFAULT,
    collect_first_error,
    map_cuda_error,
)
from .memory import alloc_pinned

__all__ = ["cuda_copy_ceiling", "cuda_pair_ceiling"]


def cuda_copy_ceiling(cp: Any, ndev: int, direction: str, nbytes: int, repeat: int,
                      free_device: Callable[[int, int], None]) -> float:
    """Best seconds of one ``cudaMemcpyAsync`` of ``nbytes`` contiguous bytes, timed with CUDA events.

    ``"h2d"`` copies pinned host memory to device 0, ``"d2h"`` the reverse, ``"d2d"`` device 0 to device 1
    where two devices exist (a peer copy when peer access is enabled), else within device 0. One untimed
    copy warms up first; the best of ``repeat`` timed copies is returned: the ceiling the migration
    throughput of the same run is compared against. Its buffers are allocated outside CuPy's pools and
    freed before returning, device memory by ``free_device(device, pointer)`` (the backend's, which survives a
    sticky error).

    Raises
    ------
    InvalidArgument
        ``direction`` is not one of the three.
    OutOfMemory, DmaError
        The buffers could not be allocated, or a copy failed.
    """
    if direction not in ("h2d", "d2h", "d2d"):
        raise InvalidArgument(f"direction must be 'h2d', 'd2h' or 'd2d', got {direction!r}")
    rt = cp.cuda.runtime
    nbytes = int(nbytes)
    frees: list[Callable[[], Any]] = []
    events: list[int] = []
    try:
        with cp.cuda.Device(0):
            stream = cp.cuda.Stream(non_blocking=True)
            dev0 = rt.malloc(nbytes)
            frees.append(lambda: free_device(0, dev0))
            if direction == "d2d":
                other_dev = 1 if ndev > 1 else 0
                with cp.cuda.Device(other_dev):
                    other = rt.malloc(nbytes)
                frees.append(lambda: free_device(other_dev, other))
                src, dst = dev0, other
            else:
                host = rt.hostAlloc(nbytes, HOST_ALLOC_PORTABLE)
                frees.append(lambda: rt.freeHost(host))
                src, dst = (host, dev0) if direction == "h2d" else (dev0, host)
            start, end = rt.eventCreateWithFlags(0), rt.eventCreateWithFlags(EVENT_BLOCKING_SYNC)
            events += [start, end]
            best = float("inf")
            for i in range(max(1, int(repeat)) + 1):
                rt.eventRecord(start, stream.ptr)
                rt.memcpyAsync(dst, src, nbytes, MEMCPY_DEFAULT, stream.ptr)
                rt.eventRecord(end, stream.ptr)
                rt.eventSynchronize(end)
                if i:  # the first copy is the warm-up
                    best = min(best, rt.eventElapsedTime(start, end) / 1e3)
            stream.synchronize()
    except Exception as exc:
        raise map_cuda_error(exc, f"measuring the {direction} copy ceiling") from exc
    finally:
        collect_first_error([lambda e=e: rt.eventDestroy(e) for e in events] + frees)
    return best


def cuda_pair_ceiling(cp: Any, src_dev: int, dst_dev: int, nbytes: int, repeat: int, staged: bool,
                      free_device: Callable[[int, int], None]) -> float:
    """Best seconds of a contiguous copy of ``nbytes`` from ``src_dev`` to ``dst_dev`` (-1: pinned host), timed
    with CUDA events: one ``cudaMemcpyPeerAsync`` / ``cudaMemcpyAsync``, or, ``staged``, the two-hop chunked
    copy the channels make (both events on the destination's stream; the source's waits for the start)."""
    rt = cp.cuda.runtime
    frees: list[Callable[[], Any]] = []
    events: list[tuple[int, Any]] = []

    def buffer(dev: int) -> int:
        if dev < 0:
            p = alloc_pinned(rt, nbytes)
            frees.append(lambda: rt.freeHost(p))
            return p
        with cp.cuda.Device(dev):
            p = rt.malloc(nbytes)
        frees.append(lambda: free_device(dev, p))
        return p

    def event(dev: int, flags: int) -> Any:
        with cp.cuda.Device(dev):
            ev = rt.eventCreateWithFlags(flags)
        events.append((dev, ev))
        return ev

    timer = dst_dev if dst_dev >= 0 else max(src_dev, 0)
    try:
        src, dst = buffer(src_dev), buffer(dst_dev)
        with cp.cuda.Device(timer):
            stream = cp.cuda.Stream(non_blocking=True)
        start, end = event(timer, 0), event(timer, EVENT_BLOCKING_SYNC)
        if staged:
            step = min(nbytes, STAGE_BYTES)
            bounce = alloc_pinned(rt, 2 * step)
            frees.append(lambda: rt.freeHost(bounce))
            with cp.cuda.Device(src_dev):
                src_stream = cp.cuda.Stream(non_blocking=True)
            filled = [event(src_dev, EVENT_DISABLE_TIMING) for _ in range(2)]
            free = [event(timer, EVENT_DISABLE_TIMING) for _ in range(2)]
        best = float("inf")
        for i in range(repeat + 1):
            with cp.cuda.Device(timer):
                rt.eventRecord(start, stream.ptr)
                if not staged and src_dev >= 0 and dst_dev >= 0 and src_dev != dst_dev:
                    rt.memcpyPeerAsync(dst, dst_dev, src, src_dev, nbytes, stream.ptr)
                elif not staged:
                    rt.memcpyAsync(dst, src, nbytes, MEMCPY_DEFAULT, stream.ptr)
            if staged:
                with cp.cuda.Device(src_dev):
                    rt.streamWaitEvent(src_stream.ptr, start, 0)
                for k, a in enumerate(range(0, nbytes, step)):
                    n, slot = min(step, nbytes - a), k & 1
                    with cp.cuda.Device(src_dev):
                        if k >= 2:  # the slot's previous chunk has left host memory
                            rt.streamWaitEvent(src_stream.ptr, free[slot], 0)
                        rt.memcpyAsync(bounce + slot * step, src + a, n, MEMCPY_DEFAULT, src_stream.ptr)
                        rt.eventRecord(filled[slot], src_stream.ptr)
                    with cp.cuda.Device(timer):
                        rt.streamWaitEvent(stream.ptr, filled[slot], 0)
                        rt.memcpyAsync(dst + a, bounce + slot * step, n, MEMCPY_DEFAULT, stream.ptr)
                        rt.eventRecord(free[slot], stream.ptr)
            with cp.cuda.Device(timer):
                rt.eventRecord(end, stream.ptr)
            rt.eventSynchronize(end)
            if i:  # the first copy is the warm-up
                best = min(best, rt.eventElapsedTime(start, end) / 1e3)
        stream.synchronize()
        if staged:
            src_stream.synchronize()
    except Exception as exc:
        raise map_cuda_error(exc, f"measuring the device {src_dev} -> {dst_dev} copy ceiling") from exc
    finally:
        collect_first_error([lambda e=e: rt.eventDestroy(e) for _d, e in events] + frees)
    return best
