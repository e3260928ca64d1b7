"""In-place data access of a device: its own pages through its access kernels, the others where they are.

Every function runs with the machine lock held, on pfns that hold no migration entry, so no page moves
while it is read or written.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from ..memory import read_pages

if TYPE_CHECKING:
    from ..machine import Machine

__all__ = ["load", "on_device", "read_touch", "store"]


def on_device(m: Machine, node: int, pfns: np.ndarray) -> np.ndarray:
    """Whether each pfn is a frame of ``node`` (``-1`` and ``ZERO_PFN`` are not)."""
    on = pfns >= 0
    on[on] = m.nodemap.node_of(pfns[on]) == node
    return on


def _device_access(backend: Any, frames: Any, idx: np.ndarray, data: np.ndarray | None = None) -> Any:
    """The backend's device access kernels, or its plain frame reads and writes where it has none."""
    fn = getattr(backend, "access_frames", None)
    if fn is not None:
        return fn(frames, idx, data)
    if data is None:
        return backend.read_frames(frames, idx)
    backend.write_frames(frames, idx, data)
    return None


def load(m: Machine, node: int, pfns: np.ndarray) -> np.ndarray:
    """Contents of ``pfns`` as ``(len(pfns), page_size)`` uint8: pages of ``node`` by its access kernel,
    remote pages where they are, absent and zero-page entries as zeros."""
    on = on_device(m, node, pfns)
    if not on.any():
        return read_pages(m, pfns)
    nd = m.nodes[node]
    if on.all():
        return _device_access(m.backend, nd.frames, pfns - nd.base_pfn)
    out = read_pages(m, np.where(on, -1, pfns))
    out[on] = _device_access(m.backend, nd.frames, pfns[on] - nd.base_pfn)
    return out


def store(m: Machine, node: int, pfns: np.ndarray, rows: np.ndarray) -> None:
    """Write ``rows[i]`` to ``pfns[i]`` (distinct, present): pages of ``node`` by its access kernel."""
    on = on_device(m, node, pfns)
    nd = m.nodes[node]
    if on.any():
        _device_access(m.backend, nd.frames, pfns[on] - nd.base_pfn, np.ascontiguousarray(rows[on]))
        m.pages.note_written(pfns[on])
    if not on.all():
        m.frames.write_pfns(pfns[~on], np.ascontiguousarray(rows[~on]))


def read_touch(m: Machine, node: int, pfns: np.ndarray) -> None:
    """Read every byte of ``pfns`` on the device without copying it out (remote pages are read too)."""
    on = on_device(m, node, pfns)
    nd = m.nodes[node]
    if on.any():
        touch = getattr(m.backend, "touch_frames", None)
        (touch or m.backend.checksum_frames)(nd.frames, pfns[on] - nd.base_pfn)
    rest = pfns[~on & (pfns >= 0)]
    if rest.size:
        m.frames.read_pfns(rest)
