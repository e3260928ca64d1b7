"""Per-pair copy ceilings, what both backends share: the argument checks (:func:`check_pair_args`) and whether a
pair of devices is staged through host memory (:func:`topology_staged`).

A ceiling is the best a single contiguous copy between two devices (or a device and host memory) does, directly
or staged, for benchmarks to print beside what a migration achieves. The CPU backend times ``np.copyto``
(:func:`dmamig.backends.cpu.backend.numpy_pair_ceiling`); the CUDA backend times copies with CUDA events
(:func:`dmamig.backends.cuda.ceilings.cuda_pair_ceiling`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import InvalidArgument

__all__ = ["check_pair_args", "topology_staged"]


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
