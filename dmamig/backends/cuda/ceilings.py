"""Copy ceilings timed with CUDA events, for benchmarks to print beside what a migration achieves: one
contiguous copy host to device, device to host or device to device (:meth:`CeilingMixin.copy_ceiling`), and
per pair of devices, direct or staged as the channels stage it (:meth:`CeilingMixin.pair_ceiling`,
:func:`cuda_pair_ceiling`). Their buffers are allocated outside CuPy's pools and freed before returning.

:class:`CeilingMixin` is part of :class:`~dmamig.backends.cuda.CudaBackend`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ...dma.staging import STAGE_BYTES
from ...errors import InvalidArgument
from ..ceiling import check_pair_args, topology_staged
from .codes import (
    _EVENT_BLOCKING_SYNC,
    _EVENT_DISABLE_TIMING,
    _HOST_ALLOC_PORTABLE,
    _MEMCPY_DEFAULT,
    collect_first_error,
    map_cuda_error,
)
from .memory import alloc_pinned

if TYPE_CHECKING:
    from .backend import CudaBackend

__all__ = ["CeilingMixin", "cuda_pair_ceiling"]


class CeilingMixin:
    """The copy ceilings of :class:`~dmamig.backends.cuda.CudaBackend`."""

    def copy_ceiling(self, direction: str, nbytes: int, repeat: int = 3) -> float:
        """Best seconds of one ``cudaMemcpyAsync`` of ``nbytes`` contiguous bytes, timed with CUDA events.

        ``"h2d"`` copies pinned host memory to device 0, ``"d2h"`` the reverse, ``"d2d"`` device 0 to device 1
        where two devices exist (a peer copy when peer access is enabled), else within device 0. One untimed
        copy warms up first; the best of ``repeat`` timed copies is returned: the ceiling the migration
        throughput of the same run is compared against. Its buffers are allocated outside CuPy's pools and
        freed before returning.

        Raises
        ------
        InvalidArgument
            ``direction`` is not one of the three.
        OutOfMemory, DmaError
            The buffers could not be allocated, or a copy failed.
        """
        if direction not in ("h2d", "d2h", "d2d"):
            raise InvalidArgument(f"direction must be 'h2d', 'd2h' or 'd2d', got {direction!r}")
        self._check_open()
        cp, rt = self._cp, self._rt
        nbytes = int(nbytes)
        frees: list[Callable[[], Any]] = []
        events: list[int] = []
        try:
            with cp.cuda.Device(0):
                stream = cp.cuda.Stream(non_blocking=True)
                dev0 = rt.malloc(nbytes)
                frees.append(lambda: self._free_device(0, dev0))
                if direction == "d2d":
                    other_dev = 1 if self._ndev > 1 else 0
                    with cp.cuda.Device(other_dev):
                        other = rt.malloc(nbytes)
                    frees.append(lambda: self._free_device(other_dev, other))
                    src, dst = dev0, other
                else:
                    host = rt.hostAlloc(nbytes, _HOST_ALLOC_PORTABLE)
                    frees.append(lambda: rt.freeHost(host))
                    src, dst = (host, dev0) if direction == "h2d" else (dev0, host)
                start, end = rt.eventCreateWithFlags(0), rt.eventCreateWithFlags(_EVENT_BLOCKING_SYNC)
                events += [start, end]
                best = float("inf")
                for i in range(max(1, int(repeat)) + 1):
                    rt.eventRecord(start, stream.ptr)
                    rt.memcpyAsync(dst, src, nbytes, _MEMCPY_DEFAULT, stream.ptr)
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

    def pair_ceiling(self, src_dev: int, dst_dev: int, nbytes: int, repeat: int = 3,
                     staged: bool | None = None) -> float:
        """Best seconds of one contiguous copy of ``nbytes`` from device ``src_dev`` to ``dst_dev`` (-1: pinned
        host memory), timed with CUDA events: direct where the pair has peer access, else staged as the DMA
        channels stage it (``staged`` defaults to what :attr:`topology` says); see
        :func:`cuda_pair_ceiling`.

        Raises
        ------
        InvalidArgument
            A device that does not exist, ``staged`` for a pair that is not two devices, ``nbytes`` or
            ``repeat`` below 1.
        OutOfMemory, DmaError
            The buffers could not be allocated, or a copy failed.
        """
        src_dev, dst_dev, nbytes, repeat = check_pair_args(src_dev, dst_dev, nbytes, repeat, staged)
        self._check_open()
        if max(src_dev, dst_dev) >= self._ndev:
            raise InvalidArgument(f"device {max(src_dev, dst_dev)} does not exist; devices 0..{self._ndev - 1} "
                                  f"are visible")
        if staged is None:
            staged = topology_staged(self.topology or self.runtime_topology(), src_dev, dst_dev)
        return cuda_pair_ceiling(self, src_dev, dst_dev, nbytes, repeat, bool(staged))


def cuda_pair_ceiling(backend: CudaBackend, src_dev: int, dst_dev: int, nbytes: int, repeat: int,
                      staged: bool) -> float:
    """Best seconds of a contiguous copy of ``nbytes`` from ``src_dev`` to ``dst_dev`` (-1: pinned host), timed
    with CUDA events: one ``cudaMemcpyPeerAsync`` / ``cudaMemcpyAsync``, or, ``staged``, the two-hop chunked
    copy the channels make (both events on the destination's stream; the source's waits for the start)."""
    cp, rt = backend._cp, backend._rt
    frees: list[Callable[[], Any]] = []
    events: list[tuple[int, Any]] = []

    def buffer(dev: int) -> int:
        if dev < 0:
            p = alloc_pinned(rt, nbytes)
            frees.append(lambda: rt.freeHost(p))
            return p
        with cp.cuda.Device(dev):
            p = rt.malloc(nbytes)
        frees.append(lambda: backend._free_device(dev, p))
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
        start, end = event(timer, 0), event(timer, _EVENT_BLOCKING_SYNC)
        if staged:
            step = min(nbytes, STAGE_BYTES)
            bounce = alloc_pinned(rt, 2 * step)
            frees.append(lambda: rt.freeHost(bounce))
            with cp.cuda.Device(src_dev):
                src_stream = cp.cuda.Stream(non_blocking=True)
            filled = [event(src_dev, _EVENT_DISABLE_TIMING) for _ in range(2)]
            free = [event(timer, _EVENT_DISABLE_TIMING) for _ in range(2)]
        best = float("inf")
        for i in range(repeat + 1):
            with cp.cuda.Device(timer):
                rt.eventRecord(start, stream.ptr)
                if not staged and src_dev >= 0 and dst_dev >= 0 and src_dev != dst_dev:
                    rt.memcpyPeerAsync(dst, dst_dev, src, src_dev, nbytes, stream.ptr)
                elif not staged:
                    rt.memcpyAsync(dst, src, nbytes, _MEMCPY_DEFAULT, stream.ptr)
            if staged:
                with cp.cuda.Device(src_dev):
                    rt.streamWaitEvent(src_stream.ptr, start, 0)
                for k, a in enumerate(range(0, nbytes, step)):
                    n, slot = min(step, nbytes - a), k & 1
                    with cp.cuda.Device(src_dev):
                        if k >= 2:  # the slot's previous chunk has left host memory
                            rt.streamWaitEvent(src_stream.ptr, free[slot], 0)
                        rt.memcpyAsync(bounce + slot * step, src + a, n, _MEMCPY_DEFAULT, src_stream.ptr)
                        rt.eventRecord(filled[slot], src_stream.ptr)
                    with cp.cuda.Device(timer):
                        rt.streamWaitEvent(stream.ptr, filled[slot], 0)
                        rt.memcpyAsync(dst + a, bounce + slot * step, n, _MEMCPY_DEFAULT, stream.ptr)
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
