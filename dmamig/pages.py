"""PageArray: every pfn's struct-page state as parallel numpy arrays.

A folio of order ``k`` is ``2**k`` consecutive pfns; its state (flags, refcount, mapping, index, ...) lives on
the head pfn, which carries ``PageFlag.HEAD`` when ``k > 0``. Every pfn records its head in ``head``, and
``mapcount`` is kept per base page because each PTE maps one base page.

The arrays are views of one buffer, ``state`` (its layout is :data:`dmamig.page_loops.PAGE_FIELDS`), which a
compiled loop takes as a single argument.
"""

from __future__ import annotations

import itertools

import numpy as np

from . import page_loops
from .flags import PageFlag

__all__ = ["NO_MAPPING", "PageArray"]

#: ``mapping`` value of a page that belongs to no address space object.
NO_MAPPING = -1


class PageArray:
    """Struct-page state of ``nr_pfns`` frames, one entry per pfn in each array."""

    def __init__(self, nr_pfns: int):
        n = int(nr_pfns)
        self.nr_pfns = n
        # Every field lives in one buffer (see page_loops.PAGE_FIELDS), so that a compiled call takes the
        # state of every page as one argument: ``state``. The attributes are its typed views.
        slots = page_loops.page_slots(n)
        self.state = np.zeros(slots * page_loops.PAGE_BYTES, dtype=np.uint8)
        offset = 0
        for name, dtype, free in page_loops.PAGE_FIELDS:
            size = np.dtype(dtype).itemsize
            field = self.state[offset:offset + n * size].view(dtype)
            offset += slots * size
            if free is None:
                field[:] = np.arange(n)
            else:
                field.fill(free)
            setattr(self, name, field)
        # The fields, typed for readers (mypy) and named once more here; page_loops.page_fields gives the same
        # views to compiled code.
        self.flags: np.ndarray
        self.refcount: np.ndarray
        self.mapcount: np.ndarray
        self.mapping: np.ndarray
        self.index: np.ndarray
        self.private: np.ndarray
        self.last_cpupid: np.ndarray
        self.memcg: np.ndarray
        self.order: np.ndarray
        self.head: np.ndarray
        # write_seq: when each frame's content last changed, as a machine-wide sequence number. A NO_COPY
        # migration trusts a caller's copy only if the destination was written after the source last changed:
        # a write to the source after the caller's copy makes the copy stale, and the core copies again.
        self.write_seq: np.ndarray
        # mark: scratch for one pass over a batch under the lock (pfn -> batch entry); always all -1 between uses.
        self.mark: np.ndarray
        # next() on a count is atomic under the GIL: writers on different threads never share a number.
        self._seq = itertools.count(1)

    # -- flag helpers, vectorized over an index array ------------------------------------------------------
    def test(self, pfns: np.ndarray | int, flag: PageFlag) -> np.ndarray:
        """Whether ``flag`` is set on each pfn."""
        return (self.flags[pfns] & np.uint32(flag)) != 0

    def set(self, pfns: np.ndarray | int, flag: PageFlag) -> None:
        """Set ``flag`` on each pfn."""
        self.flags[pfns] |= np.uint32(flag)

    def clear(self, pfns: np.ndarray | int, flag: PageFlag) -> None:
        """Clear ``flag`` on each pfn."""
        self.flags[pfns] &= np.uint32(~np.uint32(flag))

    def nr_pages(self, heads: np.ndarray) -> np.ndarray:
        """Base pages in each folio whose head pfn is given."""
        return np.left_shift(np.int64(1), self.order[heads], dtype=np.int64)

    def expand(self, heads: np.ndarray) -> np.ndarray:
        """Every base pfn of the folios whose heads are given, folio by folio."""
        heads = np.asarray(heads, dtype=np.int64)
        if page_loops.HAVE_NUMBA:  # a batch's folios in one call: the numpy steps cost a few us each
            return page_loops.expand_folios(heads, self.order)
        nr = self.nr_pages(heads)
        if heads.size == 0 or (nr == 1).all():
            return heads.copy()
        starts = np.repeat(heads - np.concatenate(([0], np.cumsum(nr)[:-1])), nr)
        return starts + np.arange(int(nr.sum()))

    # -- content sequence -----------------------------------------------------------------------------------
    def note_written(self, pfns: np.ndarray, seq: int | None = None) -> None:
        """Frames at ``pfns`` got new content: written, zeroed, or the destination of a copy. ``seq``: a number
        drawn (:meth:`next_write_seq`) before a copy began, so that a write to its source while it ran counts as
        newer than the copy; a new number by default."""
        self.write_seq[pfns] = next(self._seq) if seq is None else seq

    def note_folios_written(self, heads: np.ndarray, seq: int | None = None) -> None:
        """Every base frame of the folios whose heads are given got new content (see :meth:`note_written`)."""
        seq = next(self._seq) if seq is None else seq
        if page_loops.HAVE_NUMBA:
            page_loops.stamp_folios(np.asarray(heads, dtype=np.int64), self.order, self.write_seq, seq)
        else:
            self.note_written(self.expand(heads), seq)

    def next_write_seq(self) -> int:
        """A new write sequence number, for a caller that stamps ``write_seq`` itself (the DMA engine's compiled
        submission stamps its destinations before it publishes them)."""
        return next(self._seq)

    def copies_current(self, src: np.ndarray, dst: np.ndarray, nr: np.ndarray) -> np.ndarray:
        """Per folio pair: whether every base frame of ``dst`` was written after its ``src`` frame last was."""
        if (nr == 1).all():
            return self.write_seq[dst] > self.write_seq[src]
        ok = self.write_seq[self.expand(dst)] > self.write_seq[self.expand(src)]
        return np.logical_and.reduceat(ok, np.concatenate(([0], np.cumsum(nr)[:-1])))

    # -- folio life cycle ------------------------------------------------------------------------------------
    def prep_new(self, heads: np.ndarray, order: int) -> None:
        """Initialise freshly allocated folios: refcount 1, clean state, compound head/tails set up."""
        heads = np.asarray(heads, dtype=np.int64)
        if page_loops.HAVE_NUMBA:
            page_loops.prep_new_folios(heads, int(order), np.uint32(PageFlag.HEAD), self.flags, self.refcount,
                                       self.order, self.head)
            return
        pfns = (heads[:, None] + np.arange(1 << order)).ravel() if order else heads
        self.reset(pfns)
        self.head[pfns] = np.repeat(heads, 1 << order) if order else heads
        self.order[heads] = order
        self.refcount[heads] = 1
        if order:
            self.set(heads, PageFlag.HEAD)

    def reset(self, pfns: np.ndarray) -> None:
        """Return base pfns to the free state (no folio, no references)."""
        if page_loops.HAVE_NUMBA and isinstance(pfns, np.ndarray) and pfns.dtype == np.int64 and pfns.ndim == 1:
            page_loops.reset_pages(pfns, self.flags, self.refcount, self.mapcount, self.mapping, self.index,
                                 self.private, self.last_cpupid, self.memcg, self.order, self.head)
            return
        self.flags[pfns] = 0
        self.refcount[pfns] = 0
        self.mapcount[pfns] = 0
        self.mapping[pfns] = NO_MAPPING
        self.index[pfns] = 0
        self.private[pfns] = 0
        self.last_cpupid[pfns] = -1
        self.memcg[pfns] = 0
        self.order[pfns] = 0
        self.head[pfns] = pfns

    def split(self, head: int, page_cache: bool = False) -> np.ndarray:
        """Split one large folio into base pages (``split_folio``); return the new base-page heads.

        Each base page inherits the folio's flags (but ``HEAD``), mapping, memcg and cpupid, gets consecutive
        ``index`` values, and takes one reference per mapping of that page plus its share of the page-cache
        references, as ``__split_huge_page`` distributes them.
        """
        order = int(self.order[head])
        nr = 1 << order
        pfns = head + np.arange(nr, dtype=np.int64)
        extra = int(self.refcount[head]) - int(self.mapcount[pfns].sum())
        flags = self.flags[head] & np.uint32(~np.uint32(PageFlag.HEAD))
        self.flags[pfns] = flags
        self.mapping[pfns] = self.mapping[head]
        self.index[pfns] = self.index[head] + np.arange(nr)
        self.memcg[pfns] = self.memcg[head]
        self.last_cpupid[pfns] = self.last_cpupid[head]
        self.private[pfns] = 0
        self.order[pfns] = 0
        self.head[pfns] = pfns
        # References not held by PTEs (isolation, pins, page cache) are per folio; the page cache held one per
        # base page (``page_cache``), every other holder keeps its reference on the head only.
        cache = 1 if page_cache else 0
        self.refcount[pfns] = self.mapcount[pfns] + cache
        self.refcount[head] += extra - cache * nr
        return pfns
