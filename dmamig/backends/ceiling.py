"""Per-pair copy ceilings: the best a single contiguous copy between two devices (or a device and host memory)
does, directly or staged through host memory, for benchmarks to print beside what a migration achieves.

The CPU backend times ``np.copyto`` here; the CUDA backend times copies with CUDA events
(:func:`dmamig.backends.cuda.ceilings.cuda_pair_ceiling`). Both validate their arguments with :func:`check_pair_args`.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from ..dma.staging import STAGE_BYTES
from ..errors import InvalidArgument
from .cpu import copy_loops

__all__ = ["check_pair_args", "numpy_pair_ceiling", "topology_staged"]


def check_pair_args(src_dev: Any, dst_dev: Any, nbytes: Any, repeat: Any,
                    staged: bool | None = None) -> tuple[int, int, int, int]:
    """Validate ``pair_ceiling`` arguments; return the first four as ints.

    Raises
    ------
    InvalidArgument
        A device id below -1 (-1 is host memory), ``nbytes`` / ``repeat`` not an integer >= 1, or ``staged``
        for anything but two different devices.
    """
    for name, v in (("src_dev", src_dev), ("dst_dev", dst_dev)):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < -1:
            raise InvalidArgument(f"{name} must be a device id >= 0, or -1 for host memory, got {v!r}")
    for name, v in (("nbytes", nbytes), ("repeat", repeat)):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
            raise InvalidArgument(f"{name} must be an integer >= 1, got {v!r}")
    if staged and (min(src_dev, dst_dev) < 0 or src_dev == dst_dev):
        raise InvalidArgument(f"only a copy between two different devices can be staged, got ({src_dev}, "
                              f"{dst_dev})")
    return int(src_dev), int(dst_dev), int(nbytes), int(repeat)


def topology_staged(topology: Any, src_dev: int, dst_dev: int) -> bool:
    """Whether ``topology`` (``None``: all peers) stages a copy from ``src_dev`` to ``dst_dev``; host memory
    (-1) and a device's copy to itself never are."""
    if topology is None or min(src_dev, dst_dev) < 0 or src_dev == dst_dev:
        return False
    if max(src_dev, dst_dev) >= topology.devices:
        raise InvalidArgument(f"the topology describes devices 0..{topology.devices - 1}, got the pair "
                              f"({src_dev}, {dst_dev})")
    return bool(topology.staged(src_dev, dst_dev))


def numpy_pair_ceiling(nbytes: int, repeat: int, staged: bool) -> float:
    """Best seconds of ``np.copyto`` of ``nbytes`` between two page-aligned buffers, ``staged`` through a host
    bounce buffer in :data:`~dmamig.dma.staging.STAGE_BYTES` chunks (two copies each, as a staged DMA copy)."""
    src = copy_loops.aligned_zeros(1, nbytes)[0]
    dst = copy_loops.aligned_zeros(1, nbytes)[0]
    src.fill(1)  # touched, so that the timed copies do not pay first-touch page faults
    dst.fill(0)
    step = min(nbytes, STAGE_BYTES)
    bounce = copy_loops.aligned_zeros(1, step)[0] if staged else None
    best = float("inf")
    for i in range(repeat + 1):
        t0 = time.perf_counter()
        if bounce is None:
            np.copyto(dst, src)
        else:
            for a in range(0, nbytes, step):
                n = min(step, nbytes - a)
                np.copyto(bounce[:n], src[a:a + n])  # hop 1: into host memory
                np.copyto(dst[a:a + n], bounce[:n])  # hop 2: out of it, after hop 1
        if i:  # the first copy is the warm-up
            best = min(best, time.perf_counter() - t0)
    return best
