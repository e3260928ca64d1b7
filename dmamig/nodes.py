"""Memory nodes: one frame buffer each, and a buddy-style free-frame allocator.

Frames are numbered by a machine-wide page frame number (pfn): node ``i`` owns the pfns
``[node.base_pfn, node.base_pfn + node.total_pages)``.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

import numpy as np

from . import page_loops
from .errors import InvalidArgument

__all__ = ["MAX_ORDER", "PAGEBLOCK_ORDER", "FrameAllocator", "Node", "NodeMap", "check_owner"]

#: Largest folio order served (order 9 = 2 MiB folios of 4 KiB pages), as ``pageblock_order`` on x86-64.
PAGEBLOCK_ORDER = 9
MAX_ORDER = PAGEBLOCK_ORDER
_BLOCK = 1 << PAGEBLOCK_ORDER
#: Allocate and free with the compiled loops of ``page_loops`` (numba); the numpy methods are the reference.
USE_COMPILED = True
#: ``order`` of :meth:`NodeMap.locate_pair` for base pages (the dtype of the page orders: one compiled signature).
_NO_ORDER = np.zeros(0, dtype=np.int8)


class FrameAllocator:
    """Free frames of one node as a bitmap, with per-pageblock free counts.

    Order-0 requests are served from partly used pageblocks first and whole free pageblocks last, which keeps
    large contiguous blocks available as a buddy allocator would; order-``k`` requests get naturally aligned
    blocks of ``2**k`` frames. All operations are vectorized over the request.
    """

    def __init__(self, nr_frames: int):
        self.nr_frames = int(nr_frames)
        self._nblocks = -(-self.nr_frames // _BLOCK)
        # Frames past the end of the node (padding of the last pageblock) are permanently "used".
        self._free = np.zeros(self._nblocks * _BLOCK, dtype=bool)
        self._free[: self.nr_frames] = True
        self._block_free = self._free.reshape(self._nblocks, _BLOCK).sum(axis=1).astype(np.int64)
        self._nr_free = self.nr_frames

    @property
    def nr_free(self) -> int:
        """Number of free frames."""
        return self._nr_free

    @property
    def block(self) -> int:
        """Frames per pageblock."""
        return _BLOCK

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """The free-frame bitmap and the per-pageblock free counts, for compiled callers that allocate or free
        through :mod:`dmamig.page_loops` (``alloc_frames0``, ``alloc_frames_order``, ``free_frames``) inside a
        larger compiled pass; they report the frames they took (or, negative, gave back) with :meth:`taken`."""
        return self._free, self._block_free

    def taken(self, frames: int) -> None:
        """Account for ``frames`` frames a compiled caller took from :meth:`arrays` (negative: gave back)."""
        self._nr_free -= int(frames)

    def is_free(self, idx: np.ndarray) -> np.ndarray:
        """Whether each frame index in ``idx`` is free."""
        return self._free[idx]

    def _candidate_blocks(self) -> np.ndarray:
        partial = np.flatnonzero((self._block_free > 0) & (self._block_free < _BLOCK))
        whole = np.flatnonzero(self._block_free == _BLOCK)
        return np.concatenate([partial, whole])

    def alloc(self, count: int, order: int = 0) -> np.ndarray:
        """Allocate up to ``count`` blocks of ``2**order`` frames; return their first frame indices.

        Fewer than ``count`` come back when the node runs out of (contiguous) free frames.
        """
        if not 0 <= order <= MAX_ORDER:
            raise InvalidArgument(f"order must be in 0..{MAX_ORDER}, got {order}")
        if count <= 0:
            return np.empty(0, dtype=np.int64)
        if page_loops.HAVE_NUMBA and USE_COMPILED:
            # One compiled pass finds and takes the blocks (the numpy methods below are the reference).
            size = 1 << order
            out = np.empty(min(count, self._nr_free // size), dtype=np.int64)
            if out.size == 0:
                return out
            if order == 0:
                got = page_loops.alloc_frames0(self._free, self._block_free, _BLOCK, out.size, out)
            else:
                got = page_loops.alloc_frames_order(self._free, self._block_free, _BLOCK, size, out.size, out)
            self._nr_free -= got * size
            return out[:got]
        heads = self._alloc_order0(count) if order == 0 else self._alloc_order(count, order)
        if heads.size:
            frames = (heads[:, None] + np.arange(1 << order)).ravel() if order else heads
            self._take(frames)
        return heads

    def _alloc_order0(self, count: int) -> np.ndarray:
        cand = self._candidate_blocks()
        if cand.size == 0:
            return np.empty(0, dtype=np.int64)
        cum = np.cumsum(self._block_free[cand])
        nb = int(np.searchsorted(cum, count)) + 1
        chosen = cand[:nb]
        rows, cols = np.nonzero(self._free.reshape(self._nblocks, _BLOCK)[chosen])
        frames = chosen[rows] * _BLOCK + cols
        return frames[:count].astype(np.int64)

    def _alloc_order(self, count: int, order: int) -> np.ndarray:
        size = 1 << order
        if order == PAGEBLOCK_ORDER:
            return (np.flatnonzero(self._block_free == _BLOCK)[:count] * _BLOCK).astype(np.int64)
        cand = self._candidate_blocks()
        cand = cand[self._block_free[cand] >= size]
        found: list[np.ndarray] = []
        got = 0
        # Scan candidate pageblocks in chunks so a small request does not look at the whole node.
        for start in range(0, cand.size, 64):
            chunk = cand[start:start + 64]
            sub = self._free.reshape(self._nblocks, _BLOCK)[chunk].reshape(chunk.size, _BLOCK // size, size)
            rows, cols = np.nonzero(sub.all(axis=2))
            heads = chunk[rows] * _BLOCK + cols * size
            found.append(heads)
            got += heads.size
            if got >= count:
                break
        if not found:
            return np.empty(0, dtype=np.int64)
        return np.concatenate(found)[:count].astype(np.int64)

    def _take(self, frames: np.ndarray) -> None:
        self._free[frames] = False
        self._block_free -= np.bincount(frames // _BLOCK, minlength=self._nblocks)
        self._nr_free -= frames.size

    def free(self, frames: np.ndarray) -> None:
        """Return frames (base-frame indices, each listed once) to the free pool."""
        frames = np.asarray(frames, dtype=np.int64)
        if frames.size == 0:
            return
        if page_loops.HAVE_NUMBA and USE_COMPILED:
            bad = page_loops.free_frames(self._free, self._block_free, _BLOCK, frames)
            if bad >= 0:
                raise RuntimeError(f"double free of frame {int(frames[bad])} (allocator invariant broken)")
            self._nr_free += frames.size
            return
        if self._free[frames].any():
            bad = frames[self._free[frames]][:8]
            raise RuntimeError(f"double free of frames {bad.tolist()} (allocator invariant broken)")
        self._free[frames] = True
        self._block_free += np.bincount(frames // _BLOCK, minlength=self._nblocks)
        self._nr_free += frames.size

    def buddyinfo(self) -> list[int]:
        """Free blocks per order 0..MAX_ORDER, each counted at its largest aligned free order (/proc/buddyinfo)."""
        counts = []
        for order in range(MAX_ORDER + 1):
            fo = self._free.reshape(-1, 1 << order).all(axis=1)
            if order < MAX_ORDER:
                parent = self._free.reshape(-1, 1 << (order + 1)).all(axis=1)
                maximal = fo & ~np.repeat(parent, 2)
            else:
                maximal = fo
            counts.append(int(maximal.sum()))
        return counts

    def unusable_index(self, order: int) -> float:
        """The kernel's unusable free space index: the share of free frames not in free blocks of ``order``."""
        if self._nr_free == 0:
            return 0.0
        usable = int(self._free.reshape(-1, 1 << order).all(axis=1).sum()) << order
        return (self._nr_free - usable) / self._nr_free


def check_owner(name: str, value: Any) -> Hashable:
    """Return ``value`` as a device memory owner token, or raise InvalidArgument (``None``, unhashable)."""
    if value is None:
        raise InvalidArgument(f"{name} must be an owner token (a node's Node.owner: by default the device node's "
                              f"id), got None; device memory always has an owner")
    try:
        hash(value)
    except TypeError:
        raise InvalidArgument(f"{name} must be hashable (an int, a str, a tuple or an object), got an unhashable "
                              f"{type(value).__name__}") from None
    return value


class Node:
    """One memory node: host RAM (node 0) or a device. Its frames live in one backend buffer."""

    def __init__(self, node_id: int, kind: str, device: int, base_pfn: int, total_pages: int, frames: Any):
        self._id = node_id
        self._kind = kind
        self._device = device
        self._base_pfn = base_pfn
        self._total_pages = total_pages
        self.frames = frames
        self.allocator = FrameAllocator(total_pages)
        #: What a compiled pass that takes or frees this node's frames is given, in this order: the allocator's
        #: arrays (:meth:`FrameAllocator.arrays`), its frames per pageblock and the node's first pfn; a pass reports
        #: the frames it took with ``allocator.taken``. One tuple, made once: these never change.
        self.alloc_args: tuple[np.ndarray, np.ndarray, int, int] = (*self.allocator.arrays(), self.allocator.block,
                                                                     base_pfn)
        # A device node's memory is one pgmap; until a driver claims it, its owner is the node's own id.
        self._owner: Hashable | None = node_id if kind == "device" else None

    id = property(lambda self: self._id, doc="Node number; 0 is host RAM.")
    kind = property(lambda self: self._kind, doc='"host" or "device".')
    device = property(lambda self: self._device, doc="Accelerator index of a device node; -1 for host RAM.")
    base_pfn = property(lambda self: self._base_pfn, doc="First pfn of this node.")
    total_pages = property(lambda self: self._total_pages, doc="Number of base-page frames.")

    @property
    def owner(self) -> Hashable | None:
        """The owner token of a device node's memory, the kernel's ``dev_pagemap.owner``; ``None`` for host RAM.

        ``MigrateVma(..., flags=MigrateVmaSelect.DEVICE_PRIVATE | ..., pgmap_owner=x)`` collects a device
        page only when its node's owner equals ``x``, as ``migrate_vma_collect_pmd`` compares
        ``pgmap->owner``. The default is the node's id, so each device is its own owner; a driver that
        drives several devices as one sets the same token on each (any hashable value but ``None``).
        """
        return self._owner

    @owner.setter
    def owner(self, value: Hashable) -> None:
        if self._kind != "device":
            raise InvalidArgument(f"node {self._id} is host memory: only a device node's memory (a dev_pagemap) "
                                  f"has an owner")
        self._owner = check_owner("owner", value)

    @property
    def free_pages(self) -> int:
        """Number of free base-page frames."""
        return self.allocator.nr_free

    def fragmentation(self) -> dict:
        """Free-space report: free pages, buddyinfo per order and the unusable index for 2 MiB folios."""
        return {
            "free_pages": self.free_pages,
            "buddyinfo": self.allocator.buddyinfo(),
            "unusable_index_order9": self.allocator.unusable_index(PAGEBLOCK_ORDER),
        }

    def __repr__(self) -> str:
        return f"Node(id={self.id}, kind={self.kind!r}, total_pages={self.total_pages}, free_pages={self.free_pages})"


class NodeMap:
    """Translate machine-wide pfns to (node id, frame index within the node), vectorized."""

    def __init__(self, nodes: Sequence[Node]):
        self.nodes = tuple(nodes)
        self.bases = np.array([n.base_pfn for n in self.nodes], dtype=np.int64)
        self.nr_pfns = int(self.nodes[-1].base_pfn + self.nodes[-1].total_pages)
        # One byte per pfn: a gather is cheaper than a binary search over the node bases.
        self.node_table = np.repeat(np.arange(len(self.nodes), dtype=np.int8), [n.total_pages for n in self.nodes])

    def node_of(self, pfns: np.ndarray) -> np.ndarray:
        """Node id of each pfn."""
        return self.node_table[pfns].astype(np.int64)

    def locate_pair(self, src: np.ndarray, dst: np.ndarray,
                    order: np.ndarray | None = None) -> tuple[int, np.ndarray, int, np.ndarray, np.ndarray] | None:
        """``(source node, source frames, destination node, destination frames, run lengths)`` of a copy's int64
        pfns when all of ``src`` lie on one node and all of ``dst`` on one node (the common case); ``None``
        otherwise (then :meth:`locate` each side). The run of ``src[i]`` is the folio it heads, its size from the
        page orders ``order``, or one page each without them."""
        if not page_loops.HAVE_NUMBA or src.dtype != np.int64 or dst.dtype != np.int64:
            return None
        out = np.empty((3, src.size), dtype=np.int64)
        s, d = page_loops.one_node_pair(src, dst, self.node_table, self.bases, _NO_ORDER if order is None else order,
                                        out)
        if s < 0:
            return None
        return int(s), out[0], int(d), out[1], out[2]

    def locate_one(self, pfns: np.ndarray) -> tuple[int, np.ndarray] | None:
        """``(node, frame_indices)`` of int64 ``pfns`` that all lie on one node (the common case); ``None``
        otherwise (then :meth:`locate`)."""
        if not page_loops.HAVE_NUMBA or pfns.dtype != np.int64:
            return None
        frames = np.empty(pfns.size, dtype=np.int64)
        n = page_loops.one_node(pfns, self.node_table, self.bases, frames)
        return None if n < 0 else (int(n), frames)

    def locate(self, pfns: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Return ``(node_ids, frame_indices)`` of each pfn."""
        nid = self.node_table[pfns]
        lo, hi = nid.min(initial=0), nid.max(initial=0)
        if lo == hi:  # the common case: one node, no per-pfn base gather
            return nid.astype(np.int64), pfns - self.bases[lo]
        nid = nid.astype(np.int64)
        return nid, pfns - self.bases[nid]
