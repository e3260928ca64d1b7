"""Frames: a Machine's frames by pfn: allocating and freeing folios, dropping references, reading, writing,
zeroing and CPU-copying frames (grouped by node, one backend call per node or node pair)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .array_ops import add_at, distinct

if TYPE_CHECKING:
    from .backends.base import Backend
    from .fault_injection import FaultPoints
    from .nodes import Node, NodeMap
    from .pages import PageArray

__all__ = ["Frames"]

#: Positions of every pfn of a lookup (``frames_of`` where one node holds them all).
_ALL = slice(None)


class Frames:
    """A machine's frames by pfn (``Machine.frames``): allocating and freeing folios, dropping references, frame
    I/O and the migrating thread's CPU copy, grouped by node (one backend call per node or node pair). The
    callers hold the machine's lock where they change page state.

    Parameters
    ----------
    backend : Backend
        The backend that owns the frames.
    nodes : tuple of Node
        The machine's nodes, in pfn order.
    page_size : int
        Bytes of a base page.
    faults : FaultPoints
        The machine's fault points (an injected allocation failure).
    staged : list of list of bool
        Per (source node, destination node): whether copies between them go through host memory.
    nodemap : NodeMap
        Node of each pfn.
    pages : PageArray
        The struct pages.
    """

    def __init__(self, backend: Backend, nodes: tuple[Node, ...], page_size: int, faults: FaultPoints,
                 staged: list[list[bool]], nodemap: NodeMap, pages: PageArray) -> None:
        self._backend = backend
        self._nodes = nodes
        self._page_size = int(page_size)
        self._faults = faults
        self._staged = staged
        self.nodemap = nodemap
        self.pages = pages

    def node_of_pfns(self, pfns: np.ndarray) -> np.ndarray:
        """Node id of each pfn."""
        return self.nodemap.node_of(pfns)

    def alloc_folios(self, node: int, count: int, order: int = 0) -> np.ndarray:
        """Allocate up to ``count`` folios of ``order`` on ``node`` (caller holds the lock); return head pfns.

        Each folio comes back with refcount 1 and clean state. Fewer than ``count`` come back when the node is
        short of (contiguous) frames.
        """
        nd = self._nodes[node]
        if self._faults.armed:  # an injected allocation failure at folio k returns the k folios before it
            count = self._faults.allowed("alloc", int(count), self._page_size << order)
        heads = nd.allocator.alloc(count, order) + nd.base_pfn
        if heads.size:
            self.pages.prep_new(heads, order)
        return heads

    def free_folios(self, heads: np.ndarray) -> None:
        """Return whole folios to their nodes' allocators (caller holds the lock)."""
        heads = np.asarray(heads, dtype=np.int64)
        if heads.size == 0:
            return
        pfns = self.pages.expand(heads)
        self.pages.reset(pfns)
        self.free_frames(pfns)

    def free_frames(self, pfns: np.ndarray) -> None:
        """Return base frames already reset to the free state to their nodes' allocators (lock held)."""
        nid, frame = self.nodemap.locate(pfns)
        nodes = distinct(nid)
        if len(nodes) == 1:
            self._nodes[nodes[0]].allocator.free(frame)
            return
        for n in nodes:
            self._nodes[n].allocator.free(frame[nid == n])

    def put_folios(self, heads: np.ndarray, refs: np.ndarray | int = 1, unique: bool = False) -> None:
        """Drop references on folios and free those whose refcount reaches zero (caller holds the lock).

        ``unique=True`` promises that ``heads`` has no repeats (a faster path).
        """
        heads = np.asarray(heads, dtype=np.int64)
        if heads.size == 0:
            return
        add_at(self.pages.refcount, heads, -np.asarray(refs), unique)
        dead = heads[self.pages.refcount[heads] <= 0]
        if not unique:
            dead = np.unique(dead)
        if dead.size:
            if (self.pages.refcount[dead] < 0).any():
                raise RuntimeError(f"refcount underflow on pfns {dead[self.pages.refcount[dead] < 0][:8]}")
            self.free_folios(dead)

    def frames_of(self, pfns: np.ndarray) -> list[tuple[int, np.ndarray | slice, np.ndarray]]:
        """Group pfns by node: ``[(node_id, positions, frame_indices), ...]``; ``positions`` index ``pfns`` (a
        slice of them all when one node holds every pfn, the common case)."""
        pfns = np.asarray(pfns, dtype=np.int64)
        one = self.nodemap.locate_one(pfns)
        if one is not None:
            return [(one[0], _ALL, one[1])]
        nid, frame = self.nodemap.locate(pfns)
        out = []
        for n in distinct(nid):
            pos = np.flatnonzero(nid == n)
            out.append((n, pos, frame[pos]))
        return out

    def read_pfns(self, pfns: np.ndarray) -> np.ndarray:
        """Host copy of the frames at ``pfns``, shape ``(len(pfns), page_size)``."""
        out = np.empty((len(pfns), self._page_size), dtype=np.uint8)
        for n, pos, frame in self.frames_of(pfns):
            out[pos] = self._backend.read_frames(self._nodes[n].frames, frame)
        return out

    def write_pfns(self, pfns: np.ndarray, data: np.ndarray) -> None:
        """Store ``data`` (``(len(pfns), page_size)`` uint8) into the frames at ``pfns``."""
        for n, pos, frame in self.frames_of(pfns):
            self._backend.write_frames(self._nodes[n].frames, frame, data[pos])
        self.pages.note_written(pfns)

    def zero_pfns(self, pfns: np.ndarray) -> None:
        """Zero the frames at ``pfns``."""
        for n, _pos, frame in self.frames_of(pfns):
            self._backend.zero_frames(self._nodes[n].frames, frame)
        self.pages.note_written(pfns)

    def copy_folios(self, src_heads: np.ndarray, dst_heads: np.ndarray) -> None:
        """Copy folios on the calling thread (the CPU copy path), grouped by node pair."""
        if src_heads.size:
            # The copy's number is drawn before it starts: a write that lands on a source while the copy runs
            # (through a pin, on a folio that is unmapped) is then newer than the copy, which is not trusted.
            seq = self.pages.next_write_seq()
            self._copy_runs(src_heads, dst_heads, self.pages.order)
            self.pages.note_folios_written(dst_heads, seq)

    def copy_pages(self, src_pfns: np.ndarray, dst_pfns: np.ndarray) -> None:
        """Copy base pages on the calling thread, ``src_pfns[i]`` to ``dst_pfns[i]``."""
        if src_pfns.size:
            seq = self.pages.next_write_seq()  # drawn before the copy, as in copy_folios
            self._copy_runs(src_pfns, dst_pfns, None)
            self.pages.note_written(dst_pfns, seq)

    def _copy_runs(self, src: np.ndarray, dst: np.ndarray, order: np.ndarray | None) -> None:
        """The folio at each ``src[i]`` to ``dst[i]`` (its size from the page orders ``order``; None: one page
        each), one backend call per (source, destination) node pair."""
        one = self.nodemap.locate_pair(src, dst, order)
        if one is not None:  # one node pair: the common case
            s0, sframe, d0, dframe, nr = one
            self._copy_pair(s0, sframe, d0, dframe, nr)
            return
        nr = np.ones(src.size, dtype=np.int64) if order is None else self.pages.nr_pages(src)
        snid, sframe = self.nodemap.locate(src)
        dnid, dframe = self.nodemap.locate(dst)
        pair = snid * len(self._nodes) + dnid
        for p in distinct(pair):
            sel = pair == p
            s, d = divmod(p, len(self._nodes))
            self._copy_pair(s, sframe[sel], d, dframe[sel], nr[sel])

    def _copy_pair(self, s: int, sframe: np.ndarray, d: int, dframe: np.ndarray, nr: np.ndarray) -> None:
        # Devices without peer access: the backend stages the copy through host memory (only then is the
        # keyword passed, so backends that predate staging keep working for every other pair).
        if self._staged[s][d]:
            self._backend.copy_folios(self._nodes[s].frames, sframe, self._nodes[d].frames, dframe, nr, staged=True)
        else:
            self._backend.copy_folios(self._nodes[s].frames, sframe, self._nodes[d].frames, dframe, nr)
