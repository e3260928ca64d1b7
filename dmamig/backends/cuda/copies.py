"""Copy mode on the CUDA backend: the migrating thread's folio-by-folio copy, one driver call per folio, with
the calls and their host time counted (:attr:`FolioCopyMixin.copy_stats`).

:class:`FolioCopyMixin` is part of :class:`~dmamig.backends.cuda.CudaBackend`; it runs its copies through the
backend's synchronous streams (``_device_op``).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from ...errors import InvalidArgument
from ..cpu import copy_loops
from .codes import _MEMCPY_DEFAULT
from .memory import _device_of, _ptr
from .staging import stage_folios

__all__ = ["FolioCopyMixin"]


class FolioCopyMixin:
    """Copy mode's per-folio copies, for :class:`~dmamig.backends.cuda.CudaBackend`."""

    def copy_folios(self, src: Any, src_idx: np.ndarray, dst: Any, dst_idx: np.ndarray,
                    nr_pages: np.ndarray, staged: bool = False) -> None:
        """Copy folio by folio on the calling thread: one ``cudaMemcpyAsync`` per folio (``cudaMemcpyPeerAsync``
        between devices) on the device's synchronous-operations stream, and one wait at the end of the batch.
        ``staged`` (two GPUs without peer access): through a pinned bounce buffer, into it on the source's stream,
        then out of it on the destination's (:func:`~dmamig.backends.cuda.staging.stage_folios`).

        The calls and their host time are counted in :attr:`copy_stats`: on a GPU this faithful per-folio copy
        costs one driver call per folio, which is what copy mode measures.
        """
        src_idx = np.asarray(src_idx, dtype=np.int64)
        dst_idx = np.asarray(dst_idx, dtype=np.int64)
        nr_pages = np.asarray(nr_pages, dtype=np.int64)
        if not (src_idx.shape == dst_idx.shape == nr_pages.shape) or src_idx.ndim != 1:
            raise InvalidArgument("copy_folios: src_idx, dst_idx and nr_pages must be 1-D of one length")
        copy_loops.check_runs(src, dst, src_idx, dst_idx, nr_pages)
        if isinstance(src, np.ndarray) and isinstance(dst, np.ndarray):
            copy_loops.copy_runs_cached(src, dst, src_idx, dst_idx, nr_pages)
            return
        sdev, ddev = _device_of(src), _device_of(dst)
        if staged and sdev >= 0 and ddev >= 0 and sdev != ddev:
            t0 = time.perf_counter()
            stage_folios(self, src, src_idx, dst, dst_idx, nr_pages)
            with self._lock:
                self._copy_calls += int(src_idx.size)
                self._copy_seconds += time.perf_counter() - t0
            return
        page = int(src.shape[1])
        sp, dp = _ptr(src), _ptr(dst)
        rt = self._rt
        peer = sdev >= 0 and ddev >= 0 and sdev != ddev

        def op(s: Any) -> None:
            for a, b, n in zip(src_idx.tolist(), dst_idx.tolist(), nr_pages.tolist()):
                if peer:
                    rt.memcpyPeerAsync(dp + b * page, ddev, sp + a * page, sdev, n * page, s.ptr)
                else:
                    rt.memcpyAsync(dp + b * page, sp + a * page, n * page, _MEMCPY_DEFAULT, s.ptr)

        t0 = time.perf_counter()
        self._device_op(ddev if ddev >= 0 else sdev, "copying folios", op)
        with self._lock:
            self._copy_calls += int(src_idx.size)
            self._copy_seconds += time.perf_counter() - t0

    @property
    def copy_stats(self) -> dict[str, float]:
        """Copy-mode cost: ``calls`` (one per folio copied by :meth:`copy_folios`), ``seconds`` (host time of
        those batches, waits included) and ``us_per_call``."""
        with self._lock:
            calls, secs = self._copy_calls, self._copy_seconds
        return {"calls": calls, "seconds": secs, "us_per_call": (secs / calls * 1e6) if calls else 0.0}
