"""``cuMemcpyBatchAsync``: whether channels may use it (off unless asked for) and the copier that calls it
through the CUDA Python driver bindings (``cuda.bindings``) where the driver and the bindings offer it."""

from __future__ import annotations

import os
from typing import Any

from ...errors import DmaError
from .codes import cuda_version_text

__all__ = ["BATCH_COPY_ENV", "BatchCopy", "batch_copy_requested"]

#: Environment variable that switches ``cuMemcpyBatchAsync`` on (``1``) for channels of new backends.
BATCH_COPY_ENV = "DMAMIG_CUDA_BATCH_COPY"


def batch_copy_requested(option: bool | None) -> bool:
    if option is not None:
        return bool(option)
    return os.environ.get(BATCH_COPY_ENV, "").strip() in ("1", "true", "yes", "on")


class BatchCopy:
    """``cuMemcpyBatchAsync`` through the CUDA Python driver bindings (``cuda.bindings``), when installed."""

    #: The first driver with cuMemcpyBatchAsync (CUDA 12.8, as cuDriverGetVersion encodes it).
    MIN_DRIVER = 12080

    def __init__(self, driver: Any):
        self._driver = driver
        attrs = driver.CUmemcpyAttributes()
        # Stream order for the sources: the copies may start once prior work on the stream finished.
        attrs.srcAccessOrder = driver.CUmemcpySrcAccessOrder.CU_MEMCPY_SRC_ACCESS_ORDER_STREAM
        self._attrs = attrs

    @classmethod
    def probe(cls, driver_version: int) -> tuple[BatchCopy | None, str]:
        """The batch copier, or ``None`` with the reason it is unavailable.

        Parameters
        ----------
        driver_version : int
            ``cudaDriverGetVersion()``: the bindings may offer the call on a driver that lacks it.
        """
        if int(driver_version) < cls.MIN_DRIVER:
            return None, (f"the driver supports CUDA {cuda_version_text(driver_version)}; cuMemcpyBatchAsync needs "
                          f"{cuda_version_text(cls.MIN_DRIVER)} or newer")
        try:
            from cuda.bindings import driver
        except Exception as exc:
            return None, f"cuda.bindings is not installed ({type(exc).__name__})"
        if not hasattr(driver, "cuMemcpyBatchAsync"):
            return None, "the installed cuda.bindings has no cuMemcpyBatchAsync (needs CUDA 12.8+)"
        try:
            return cls(driver), "available"
        except Exception as exc:
            return None, f"cuMemcpyBatchAsync attributes could not be built: {exc}"

    def copy(self, dsts: list[int], srcs: list[int], sizes: list[int], stream_ptr: int) -> None:
        d = self._driver
        res = d.cuMemcpyBatchAsync([d.CUdeviceptr(x) for x in dsts], [d.CUdeviceptr(x) for x in srcs], sizes,
                                   len(sizes), [self._attrs], [0], 1, d.CUstream(stream_ptr))
        err = res[0] if isinstance(res, tuple) else res
        if err != d.CUresult.CUDA_SUCCESS:
            raise DmaError(f"cuMemcpyBatchAsync failed: {err}")
