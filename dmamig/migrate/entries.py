"""The folios of one migrate call, as parallel arrays: the kernel's ``from`` list with its ``dst`` folios.

One entry per isolated source folio: its head, destination, status, size and the expected reference count.
A large folio split on ``-ENOMEM`` keeps its entry (status ``SPLIT``) and adds one entry per base page.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .. import page_loops
from ..array_ops import distinct
from ..flags import PageFlag
from ..nodes import PAGEBLOCK_ORDER
from . import batch_loops

if TYPE_CHECKING:
    from ..machine import Machine

__all__ = ["HPAGE_PMD_ORDER", "PENDING", "SPLIT", "UNTRIED", "Entries", "batch_ids"]

_SWAPCACHE = np.uint32(PageFlag.SWAPCACHE)

#: Order of a PMD-mapped THP; only folios of this order count in ``thp_migration_*``.
HPAGE_PMD_ORDER = PAGEBLOCK_ORDER

# Entry states of a call in progress, beside 0 (migrated) and -errno: positive, so they never collide.
#: Tried and still to go: the kernel's -EAGAIN between passes.
PENDING = 1
#: A large folio split into base-page entries of its own.
SPLIT = 2
#: Not reached yet (and never, once an -ENOMEM ended the call).
UNTRIED = 3


class _Row:
    """A column of an entry block (``Entries.ints`` or ``Entries.bools``), as a view made on its first read and
    kept in the instance from then on: a call reads few of the ten, and each view is a numpy object to build."""

    __slots__ = ("block", "name", "row")

    def __init__(self, block: str, row: int) -> None:
        self.block, self.row = block, row

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: Entries | None, owner: type | None = None) -> np.ndarray:
        if obj is None:
            return self  # type: ignore[return-value]
        view = obj.__dict__[self.name] = getattr(obj, self.block)[self.row]
        return view


class Entries:
    """Per-folio state of a migrate call; positions index every array.

    The int64 columns ``order``, ``nr``, ``expected``, ``dst``, ``batch_of``, ``split_first`` are the rows of
    ``ints``; the bool ones ``given``, ``fresh``, ``unmapped``, ``counted`` the rows of ``bools``.
    """

    order = _Row("ints", batch_loops.ROW_ORDER)
    nr = _Row("ints", batch_loops.ROW_NR)
    expected = _Row("ints", batch_loops.ROW_EXPECTED)
    dst = _Row("ints", batch_loops.ROW_DST)
    batch_of = _Row("ints", batch_loops.ROW_BATCH_OF)
    split_first = _Row("ints", batch_loops.ROW_SPLIT_FIRST)
    given = _Row("bools", batch_loops.ROW_GIVEN)
    fresh = _Row("bools", batch_loops.ROW_FRESH)
    unmapped = _Row("bools", batch_loops.ROW_UNMAPPED)
    counted = _Row("bools", batch_loops.ROW_COUNTED)
    _ROWS = tuple(name for name, value in locals().items() if isinstance(value, _Row))

    def __init__(self, m: Machine, heads: np.ndarray, dst: np.ndarray | None = None):
        self.m = m
        pages = m.pages
        n = heads.size
        self.src = np.ascontiguousarray(heads, dtype=np.int64)  # (compiled calls take it through a table)
        # Few allocations per call: the int64 columns come from one block, the bool ones from another; a
        # compiled call takes each block as one argument (``ints``, ``bools``) and its rows in this order.
        self.ints = ints = np.empty((6, n), dtype=np.int64)
        self.status = np.empty(n, np.int32)
        if page_loops.HAVE_NUMBA and n:
            top, same, node, lo, hi, swap = batch_loops.init_entries(self.src, pages.state, m.nodemap.node_table,
                                                                     UNTRIED, ints, self.status)
            one_object = lo == hi
            self.oid = int(lo) if one_object and lo >= 0 else -1  # the one object of every folio, if so
        else:
            self.order[:] = pages.order[self.src]
            self.nr[:] = np.left_shift(1, self.order)
            self.expected[:] = 1
            self.dst[:] = -1
            self.batch_of[:] = 0
            self.split_first[:] = -1  # first piece of a split entry
            self.status[:] = UNTRIED
            top = int(self.order.max()) if n else 0
            same = bool((self.order == top).all())
            nid = m.nodemap.node_table[self.src]
            node = int(nid[0]) if n and nid.min() == nid.max() else -1
            one_object, lo = False, -1
            self.oid = -1
            swap = bool(((pages.flags[self.src] & _SWAPCACHE) != 0).any())
        self.all_base = top == 0  # only base pages: a folio's head is its one pfn
        # The order every folio has (-1: mixed): one allocation per batch then needs no grouping.
        self.one_order = int(top) if same else -1
        self.src_node = int(node)  # the node every source lives on, or -1 if they span several
        # folio_expected_refs(): the isolation reference, plus the page cache's for a shared-memory folio.
        #: The object every folio belongs to (None: several, none, or released since).
        self.obj = m.object_or_none(self.oid) if self.oid >= 0 else None
        if one_object:
            obj = self.obj
            shared = obj is not None and obj.shared
            if shared:
                self.expected += self.nr
        else:
            shared = True  # some may be: the pass below looks
            if n:
                self.expected += np.where(shared_folios(m, self.src), self.nr, 0)
        # Shared-memory folios (the page cache's references): their nr_shmem moves with them. None: none here
        # (known without a pass over the entries when they all belong to one anonymous object).
        self.shmem: np.ndarray | None = None
        if n and shared:
            shmem = self.expected > 1
            self.shmem = shmem if shmem.any() else None
        # An anonymous folio in the swap cache has a mapping too (the swap cache's), holding a reference per
        # base page.
        if swap:
            swapped = (pages.flags[self.src] & _SWAPCACHE) != 0
            self.expected[swapped] = self.nr[swapped] + 1
        # Folios of files and movable non-LRU pages migrate through their mapping's callback
        # (mapping_callbacks.py); None: there are none here, and every folio takes the core's own path.
        self.by_callback: np.ndarray | None = None
        if m.callback_object_ids.size and n:
            mine = np.isin(pages.mapping[self.src], m.callback_object_ids)
            if mine.any():
                self.by_callback = mine
                if self.shmem is not None:
                    self.shmem = self.shmem & ~mine
                    if not self.shmem.any():
                        self.shmem = None
        if dst is not None:
            self.dst[:] = dst
        # given: destination supplied (and copied) by the caller; fresh: destination content equals the source
        # right now; unmapped: source locked and behind migration entries; counted: failure in the statistics.
        self.bools = np.zeros((4, n), dtype=bool)
        self.all_given = dst is not None  # every destination is the caller's (NO_COPY with dst_pfns)
        if dst is not None:
            self.given[:] = True
        self._pieces: list[np.ndarray] = []

    def base_pfns(self, heads: np.ndarray, pos: np.ndarray) -> np.ndarray:
        """Every base pfn of the folios ``heads`` (of entries ``pos``), folio by folio."""
        if self.all_base:
            return heads
        return self.m.pages.expand(heads)

    @property
    def size(self) -> int:
        return self.src.size

    # -- batches -----------------------------------------------------------------------------------------------
    def steps(self, positions: np.ndarray, batch_pages: int, per_step: int) -> list[np.ndarray]:
        """Cut entries into batches of ``batch_pages`` base pages (see :func:`batch_ids`), and batches into
        steps of ``per_step`` batches. Once per call, before any batch runs (every entry is set up in batch 0)."""
        if self.one_order >= 0:
            total = positions.size << self.one_order
        else:
            total = int(self.nr[positions].sum())
        if total <= batch_pages:
            return [positions]  # one batch: every entry is set up in batch 0
        if self.one_order >= 0:  # folios of one size: a batch is the same number of them each time (slices)
            folios = -(-batch_pages >> self.one_order)  # the folio that reaches batch_pages is its batch's last
            self.batch_of[positions] = np.arange(positions.size) // folios
            size = folios * per_step
            return [positions[a:a + size] for a in range(0, positions.size, size)]
        batch_id = batch_ids(self.nr[positions], batch_pages)
        self.batch_of[positions] = batch_id
        step_id = batch_id // per_step
        cuts = (np.flatnonzero(np.diff(step_id)) + 1).tolist()
        return [positions[a:b] for a, b in zip([0, *cuts], [*cuts, positions.size])]

    def nr_batches(self, pos: np.ndarray) -> int:
        """How many batches the entries at ``pos`` span (one TLB flush each)."""
        if pos.size == 1:
            return 1
        b = self.batch_of[pos]
        return 1 if b[0] == b[-1] else len(distinct(b))

    # -- destinations --------------------------------------------------------------------------------------
    def release_dst(self, pos: np.ndarray, given_too: bool = False) -> None:
        """Free the destinations the core allocated for ``pos``; the caller's are kept (stale from now on)
        unless ``given_too`` (a failed folio's caller destination is the core's to free)."""
        if pos.size == 0:
            return
        own = pos[(self.dst[pos] >= 0) & (given_too | ~self.given[pos])]
        if own.size:
            self.m.frames.free_folios(self.dst[own])
            self.dst[own] = -1
        self.fresh[pos] = False

    def check_fresh(self, pos: np.ndarray) -> None:
        """Right after unmap: is each caller destination still a copy of its (now frozen) source?

        A write between the caller's copy and the unmap makes the copy stale; the move then copies again.
        """
        given = pos[self.given[pos]]
        if given.size:
            pages = self.m.pages
            self.fresh[given] = pages.copies_current(self.src[given], self.dst[given], self.nr[given])

    # -- splitting -----------------------------------------------------------------------------------------------
    def split(self, pos: int) -> bool:
        """Split the large folio of entry ``pos`` into base-page entries; False if it cannot be split."""
        pages = self.m.pages
        head = int(self.src[pos])
        nr = int(self.nr[pos])
        pfns = head + np.arange(nr)
        cached = bool(self.expected[pos] > 1)  # in the page cache or the swap cache: a reference per page
        expected = 1 + int(pages.mapcount[pfns].sum()) + (nr if cached else 0)
        if pages.refcount[head] != expected or pages.test(head, PageFlag.LOCKED):
            return False  # split_folio() refuses a folio with extra references or a busy lock
        pages.split(head, page_cache=cached)
        # The isolation reference stayed on the head; every other base page gets its own.
        pages.refcount[pfns[1:]] += 1
        self.status[pos] = SPLIT
        first = self.size
        self.split_first[pos] = first
        self._grow(pfns, 1 + (1 if cached else 0), int(self.batch_of[pos]),
                   self.shmem is not None and bool(self.shmem[pos]))
        self._pieces.append(np.arange(first, first + nr))
        return True

    def _grow(self, heads: np.ndarray, expected: int, batch: int, shmem: bool = False) -> None:
        n = heads.size

        def cat(a: np.ndarray, fill: object) -> np.ndarray:
            return np.concatenate([a, np.full(n, fill, dtype=a.dtype)])

        self.src = np.concatenate([self.src, heads])
        self.all_given = False
        if self.one_order != 0:
            self.one_order = -1  # base pages beside larger folios
        # The blocks grow as a whole, their rows in the order __init__ gives them.
        self.ints = np.concatenate([self.ints, np.array([[0], [1], [expected], [-1], [batch], [-1]]).repeat(n, 1)],
                                   axis=1)
        self.bools = np.concatenate([self.bools, np.zeros((4, n), dtype=bool)], axis=1)
        for name in self._ROWS:  # views of the old blocks: made again from the new ones when read
            self.__dict__.pop(name, None)
        self.status = cat(self.status, UNTRIED)
        if self.by_callback is not None:
            self.by_callback = cat(self.by_callback, False)
        if self.shmem is not None:
            self.shmem = cat(self.shmem, bool(shmem))

    @property
    def has_pieces(self) -> bool:
        """Whether split pieces wait for their pass."""
        return bool(self._pieces)

    def take_split_pieces(self) -> np.ndarray:
        """Entries of folios split since the last call, to migrate after their batch."""
        if not self._pieces:
            return np.empty(0, dtype=np.int64)
        out = np.concatenate(self._pieces)
        self._pieces = []
        return out

    def all_migrated(self) -> bool:
        """Whether nothing is left to put back: every folio moved, a split one as all of its pieces."""
        st = self.status
        return bool(((st == 0) | (st == SPLIT)).all())

    # -- per-page status -----------------------------------------------------------------------------------------
    def locate(self, pfns: np.ndarray, status: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """Where the pages of ``pfns`` whose ``status`` is ``PENDING`` (collection's provisional status: their
        folio is an entry) will find their final status: the entry of each page's folio, before anything moved
        (caller holds the lock), for :meth:`fill_status`.

        ``None`` when the pfns are the entries themselves, in order (base pages, each listed once: the usual
        case, since collection keeps first occurrences in order; but it isolates movable pages after the others).
        """
        pages, src = self.m.pages, self.src
        compiled = page_loops.HAVE_NUMBA
        if self.all_base and pfns.size == src.size \
                and (page_loops.same_values(pfns, src) if compiled else bool((pfns == src).all())):
            return None
        if compiled:  # every page's entry, -1 for a page of no entry's folio (those are not pending)
            entry = np.empty(pfns.size, dtype=np.int64)
            page_loops.locate_entries(pfns, pages.head, src, pages.mark, entry)
            return entry, pfns
        pfns = pfns[status == PENDING]
        heads = pages.head[pfns]
        if src.size < 2 or bool((src[1:] > src[:-1]).all()):
            entry = np.searchsorted(src, heads)
        else:
            order = np.argsort(src)
            entry = order[np.searchsorted(src[order], heads)]
        return entry, pfns

    def fill_status(self, status: np.ndarray, where: tuple[np.ndarray, np.ndarray] | None,
                    all_moved: bool = False) -> None:
        """Give each pending page of ``status`` the final status of its entry, :meth:`locate` having found them;
        a split folio's page reports its own piece. ``all_moved``: every entry moved (none split), so each
        pending page's status is 0."""
        if where is None:
            status[:] = self.status[: self.size]
            return
        if all_moved:
            if page_loops.HAVE_NUMBA:
                batch_loops.fill_moved_status(status, PENDING)
            else:
                status[status == PENDING] = 0
            return
        entry, pfns = where
        if page_loops.HAVE_NUMBA:
            batch_loops.fill_status(status, PENDING, entry, pfns, self.status, self.split_first, self.src, SPLIT)
            return
        st = self.status[entry]
        split = st == SPLIT
        if split.any():
            at = entry[split]
            st[split] = self.status[self.split_first[at] + pfns[split] - self.src[at]]
        status[status == PENDING] = st


def batch_ids(nr: np.ndarray, batch_pages: int) -> np.ndarray:
    """The batch of each folio of ``nr`` base pages, in list order, as ``migrate_pages()`` cuts its list.

    A batch takes folios until it holds ``batch_pages`` base pages or more: the folio that gets it there is
    its last (``list_cut_before`` the next one), and the next batch starts after it. A batch may so hold up
    to ``batch_pages - 1`` pages more than ``batch_pages``; a folio never straddles two batches.
    """
    out = np.empty(nr.size, dtype=np.int64)
    if batch_loops.HAVE_NUMBA:
        batch_loops.cut_batches(np.asarray(nr, dtype=np.int64), batch_pages, out)
        return out
    ends = np.cumsum(nr)
    start, done, b = 0, 0, 0
    while start < nr.size:
        stop = int(np.searchsorted(ends, done + batch_pages, side="left")) + 1  # one past the folio reaching it
        stop = min(stop, nr.size)
        out[start:stop] = b
        done = int(ends[stop - 1])
        start, b = stop, b + 1
    return out


def shared_folios(m: Machine, heads: np.ndarray) -> np.ndarray:
    """Whether each folio belongs to a shared-memory object (a page cache holds a reference per page)."""
    mapping = m.pages.mapping[heads]
    lo, hi = mapping.min(), mapping.max()
    if lo == hi:  # one object (the common case)
        obj = m.object_or_none(int(lo)) if lo >= 0 else None
        return np.full(heads.size, obj is not None and obj.shared)
    out = np.zeros(heads.size, dtype=bool)
    for oid in distinct(mapping[mapping >= 0]):
        obj = m.object_or_none(oid)
        if obj is not None and obj.shared:
            out[mapping == oid] = True
    return out
