"""A balloon driver's pages: non-LRU movable pages, after the kernel's ``mm/balloon_compaction.c``.

A virtio-style balloon takes pages from the guest (``inflate``) and gives them back (``deflate``). Its pages are
on no LRU list: compaction isolates, migrates and puts them back through the driver's ``movable_operations``
(``isolate_page``, ``migrate_page``, ``putback_page``), and ``migrate_page`` refused ``MIGRATE_SYNC_NO_COPY``
with ``-EINVAL``: a balloon page has no content the migration core could have had copied for it.

The balloon is an object of the machine, like a page cache: ``pfns[i]`` is its ``i``-th page, and it holds the
one reference of each (the driver's). ``Machine.migrate_pages`` migrates its pages like any others.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .arguments import check_node, check_positive_int
from .errors import OutOfMemory
from .flags import EBUSY, PageFlag
from .vma import NO_PFN, MemObject

if TYPE_CHECKING:
    from .machine import Machine

__all__ = ["Balloon", "isolate_movable_folios"]


class Balloon(MemObject):
    """A balloon device's pages (``balloon_dev_info``): non-LRU movable pages with ``movable_ops``.

    Create with :meth:`Machine.balloon <dmamig.Machine.balloon>`.
    """

    migrate_callback = True
    movable = True

    def __init__(self, machine: Machine):
        super().__init__(machine, 0, shared=True, order=0)

    @property
    def nr_pages(self) -> int:
        """Pages the balloon holds now."""
        with self.machine.lock:
            return int(np.count_nonzero(self.pfns >= 0))

    def inflate(self, count: int, node: int = 0) -> np.ndarray:
        """Take ``count`` pages from ``node`` (``balloon_page_alloc`` + ``balloon_page_enqueue``); return them.

        Raises OutOfMemory (and takes nothing) when the node has fewer free pages.
        """
        m = self.machine
        count = check_positive_int("count", count)
        node = check_node(m, "node", node)
        with m.lock:
            new = m.frames.alloc_folios(node, count, 0)
            if new.size < count:
                m.frames.free_folios(new)
                raise OutOfMemory(f"node {node} has {m.nodes[node].free_pages} free pages, {count} asked to inflate")
            first = self.pfns.size
            self.grow(first + count)
            idx = np.arange(first, first + count)
            m.pages.mapping[new] = self.id
            m.pages.index[new] = idx
            self.pfns[idx] = new  # the allocation's reference is the balloon's
        return new

    def deflate(self) -> None:
        """Give every page back (``balloon_page_dequeue``); pages a migration holds isolated go when it ends."""
        m = self.machine
        with m.changed:
            held = self.pfns[self.pfns >= 0]
            m.pages.mapping[held] = -1
            self.pfns[:] = NO_PFN
            m.frames.put_folios(held, unique=True)
            m.changed.notify_all()

    def release(self) -> None:
        """No VMA ever maps a balloon: it lives until it is deflated."""


def isolate_movable_folios(m: Machine, heads: np.ndarray) -> np.ndarray:
    """``isolate_movable_page`` through ``movable_ops->isolate_page`` (caller holds the lock): 0 or ``-EBUSY``
    (already isolated, or no longer the driver's) per folio; an isolated page holds one more reference."""
    pages = m.pages
    ok = (pages.refcount[heads] > 0) & ~pages.test(heads, PageFlag.ISOLATED) \
        & np.isin(pages.mapping[heads], m.movable_object_ids)
    pages.set(heads[ok], PageFlag.ISOLATED)
    pages.refcount[heads[ok]] += 1
    return np.where(ok, 0, EBUSY).astype(np.int32)
