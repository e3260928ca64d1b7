"""PageControls: a Machine's per-page controls that emulate the rest of the kernel (the page lock, writeback,
page flags, transient references, last_cpupid) and the struct-page snapshot ``page_state``."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .arguments import as_pfn_array
from .errors import InvalidArgument
from .flags import PageFlag

if TYPE_CHECKING:
    from .machine import Machine

__all__ = ["PageControls"]


class PageControls:
    """A machine's per-page controls (``Machine.page_controls``): what the rest of the kernel does to a page that
    a migration must live with (the page lock, writeback, page flags, transient references, ``last_cpupid``),
    for tests and drivers, and the struct-page snapshot :meth:`page_state`.

    Parameters
    ----------
    m : Machine
        The machine whose pages these control.
    """

    def __init__(self, m: Machine) -> None:
        self.m = m
        self._page_refs: dict[int, int] = {}  # references taken with get_page, by folio head

    def _head(self, pfn: int) -> int:
        pfn = int(as_pfn_array(self.m, "pfn", np.array([pfn]))[0])
        return int(self.m.pages.head[pfn])

    def _wait_unlocked(self, head: int, blocking: bool) -> bool:
        """Wait (caller holds ``changed``) until folio ``head`` is unlocked; False at once if not ``blocking``."""
        while self.m.pages.test(head, PageFlag.LOCKED):
            if not blocking:
                return False
            self.m.changed.wait()
        return True

    def lock_page(self, pfn: int, blocking: bool = True) -> bool:
        """Lock the folio of ``pfn`` (PG_locked), as another kernel path would; return False if busy."""
        head = self._head(pfn)
        with self.m.changed:
            if not self._wait_unlocked(head, blocking):
                return False
            self.m.pages.set(head, PageFlag.LOCKED)
        return True

    def unlock_page(self, pfn: int) -> None:
        """Unlock the folio of ``pfn`` and wake waiters."""
        head = self._head(pfn)
        with self.m.changed:
            if not self.m.pages.test(head, PageFlag.LOCKED):
                raise InvalidArgument(f"pfn {pfn} is not locked")
            self.m.pages.clear(head, PageFlag.LOCKED)
            self.m.changed.notify_all()

    def start_writeback(self, pfn: int, blocking: bool = True) -> bool:
        """Start writeback on the folio of ``pfn`` (PG_writeback), as the kernel does: under the folio lock.

        A folio that a migration holds locked cannot start writeback until the migration lets it go: with
        ``blocking`` the call waits for the lock, otherwise it returns False at once. Returns True once
        writeback has started.
        """
        head = self._head(pfn)
        with self.m.changed:
            if not self._wait_unlocked(head, blocking):
                return False
            self.m.pages.set(head, PageFlag.WRITEBACK)
            self.m.changed.notify_all()
        return True

    def end_writeback(self, pfn: int) -> None:
        """End writeback on the folio of ``pfn`` and wake waiters."""
        self.clear_page_flags(pfn, PageFlag.WRITEBACK)

    def set_page_flags(self, pfn: int, flags: PageFlag) -> None:
        """Set page flags on the folio of ``pfn`` (referenced, active, dirty, unevictable, ...).

        ``SWAPCACHE`` adds the folio to the swap cache, as ``add_to_swap_cache`` does: under the folio lock
        (waited for), the swap cache taking one reference per base page. Only an anonymous folio can be
        added; shared memory is in its page cache.
        """
        self._change_flags(pfn, flags, True)

    def clear_page_flags(self, pfn: int, flags: PageFlag) -> None:
        """Clear page flags on the folio of ``pfn`` and wake waiters.

        ``SWAPCACHE`` deletes the folio from the swap cache (``delete_from_swap_cache``), dropping the swap
        cache's references under the folio lock.
        """
        self._change_flags(pfn, flags, False)

    def _change_flags(self, pfn: int, flags: PageFlag, set_: bool) -> None:
        head = self._head(pfn)
        flags = PageFlag(flags)
        if flags & (PageFlag.HEAD | PageFlag.ISOLATED | PageFlag.LOCKED):
            raise InvalidArgument("HEAD, ISOLATED and LOCKED are managed by the core; use lock_page and "
                                  "unlock_page for LOCKED")
        with self.m.changed:
            if flags & PageFlag.SWAPCACHE:
                self._wait_unlocked(head, True)
                self._swap_cache(head, set_)
            (self.m.pages.set if set_ else self.m.pages.clear)(head, flags)
            self.m.changed.notify_all()

    def _swap_cache(self, head: int, add: bool) -> None:
        """The swap cache's references on folio ``head`` as it enters or leaves it (caller holds the lock)."""
        pages = self.m.pages
        if bool(pages.test(head, PageFlag.SWAPCACHE)) == add:
            return
        nr = 1 << int(pages.order[head])
        if add:
            if pages.refcount[head] <= 0:
                raise InvalidArgument(f"pfn {head} is free; only an in-use page can enter the swap cache")
            obj = self.m.object_or_none(int(pages.mapping[head]))
            if obj is not None and obj.shared:
                raise InvalidArgument(f"pfn {head} is shared memory, in its page cache; only an anonymous "
                                      f"folio enters the swap cache")
            pages.refcount[head] += nr
            return
        pages.clear(head, PageFlag.SWAPCACHE)
        self.m.frames.put_folios(np.array([head]), nr)

    def page_flags(self, pfn: int) -> PageFlag:
        """Flags of the folio containing ``pfn``."""
        head = self._head(pfn)
        with self.m.lock:
            return PageFlag(int(self.m.pages.flags[head]))

    @property
    def page_refs(self) -> dict[int, int]:
        """References taken with :meth:`get_page` and not dropped yet, per folio head (a copy)."""
        with self.m.lock:
            return dict(self._page_refs)

    def get_page(self, pfn: int) -> None:
        """Take a transient reference on the folio of ``pfn`` (a speculative lookup or short GUP)."""
        head = self._head(pfn)
        with self.m.lock:
            if self.m.pages.refcount[head] <= 0:
                raise InvalidArgument(f"pfn {pfn} is free; only an in-use page can be referenced")
            self.m.pages.refcount[head] += 1
            self._page_refs[head] = self._page_refs.get(head, 0) + 1

    def put_page(self, pfn: int) -> None:
        """Drop a reference taken with :meth:`get_page`; the folio is freed if it was the last one."""
        head = self._head(pfn)
        with self.m.changed:
            held = self._page_refs.get(head, 0)
            if held <= 0:
                raise InvalidArgument(f"pfn {pfn} holds no reference taken with get_page to drop")
            if held == 1:
                del self._page_refs[head]
            else:
                self._page_refs[head] = held - 1
            self.m.frames.put_folios(np.array([head]))
            self.m.changed.notify_all()

    def set_page_cpupid(self, pfn: int, cpupid: int) -> None:
        """Set the folio's ``last_cpupid`` (NUMA-balancing hint) as a fault on a CPU would."""
        head = self._head(pfn)
        with self.m.lock:
            self.m.pages.last_cpupid[head] = cpupid

    def page_state(self, pfn: int) -> dict:
        """A dict snapshot of the struct page of ``pfn`` and its folio head, for inspection and tests."""
        p = int(as_pfn_array(self.m, "pfn", np.array([pfn]))[0])
        with self.m.lock:
            pg = self.m.pages
            h = int(pg.head[p])
            return {
                "pfn": p, "head": h, "node": int(self.m.nodemap.node_of(np.array([p]))[0]),
                "flags": PageFlag(int(pg.flags[h])), "refcount": int(pg.refcount[h]),
                "mapcount": int(pg.mapcount[p]), "mapping": int(pg.mapping[p]), "index": int(pg.index[p]),
                "private": int(pg.private[h]), "last_cpupid": int(pg.last_cpupid[h]),
                "memcg": int(pg.memcg[h]), "order": int(pg.order[h]),
            }
