"""Files and their page cache, after the kernel's ``mm/filemap.c`` and ``mm/page-writeback.c``.

A :class:`File` is a real file on disk and its page cache: an address space object (a shared
:class:`~dmamig.vma.MemObject`) whose ``pfns[i]`` holds the folio caching page ``i`` of the file. Folios are
base pages; their state lives in the machine's :class:`~dmamig.pages.PageArray` like every other page's:
``UPTODATE`` once read, ``DIRTY`` until written back, ``WRITEBACK`` while the flusher writes them,
``PRIVATE`` with the filesystem's private data attached (buffer heads, or a folio state), which holds one
folio reference (``folio_attach_private``). The page cache holds one reference per page it caches.

The :class:`PageCache` is the machine's: its open files, the per-node counters (``nr_file_pages``,
``nr_file_dirty``, ``nr_writeback``) and the flusher thread, which writes dirty folios back with
``os.pwrite``. While it writes a folio, the folio is under writeback: ``ASYNC`` and ``SYNC_LIGHT`` migrations
meet ``-EBUSY`` there and ``SYNC`` waits.

Every method that changes page-cache state takes ``machine.changed``; the disk I/O of writeback runs without
it. Each file's filesystem (:class:`Filesystem`) names the migrate callback its folios migrate through
(``address_space_operations.migrate_folio``) and whether it writes folios under the folio lock.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import tempfile
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from .arguments import as_bytes
from .errors import AddressFault, InvalidArgument, OutOfMemory
from .flags import PageFlag, PteFlag
from .mmap import unmap_slots
from .vma import NO_PFN, MemObject, Vma, rmap_walk

if TYPE_CHECKING:
    from .machine import Machine

__all__ = ["BH_LOCKED", "BH_REF", "BLOCKDEV_FS", "MAX_FILE_PAGES", "BUFFER_FS", "FILESYSTEMS", "GENERIC_FS", "NODE_STAT_ITEMS", "NO_CALLBACK_FS",
           "UNAUDITED_FS", "File", "Filesystem", "PageCache", "check_file_mapping", "vma_file"]

#: Most pages a file may have: its page cache is a dense array of pfns (8 bytes per page).
MAX_FILE_PAGES = 1 << 24

#: Per-node page-cache counters (``enum node_stat_item``), in :meth:`PageCache.node_page_state` order. As in the
#: kernel, ``nr_file_pages`` counts shared-memory pages too, and ``nr_shmem`` those alone.
NODE_STAT_ITEMS = ("nr_file_pages", "nr_file_dirty", "nr_writeback", "nr_shmem")
_FILE_PAGES, _FILE_DIRTY, _WRITEBACK, _SHMEM = range(4)

_NEW_FILE_FLAGS = PageFlag.UPTODATE | PageFlag.LRU | PageFlag.MAPPEDTODISK
_DIRTY = np.uint32(PageFlag.DIRTY)
_LOCKED = np.uint32(PageFlag.LOCKED)
_WB = np.uint32(PageFlag.WRITEBACK)
_PRIVATE = np.uint32(PageFlag.PRIVATE)
_PTE_DIRTY = np.uint8(PteFlag.DIRTY)

#: Buffer-head state in ``pages.private`` of a folio with buffers: bit 0 is a buffer lock held
#: (``lock_buffer``), the bits above count buffer-head references (``get_bh``).
BH_LOCKED = 1
BH_REF = 2


@dataclass(frozen=True)
class Filesystem:
    """A filesystem model: how its folios migrate and how it writes them.

    Parameters
    ----------
    name : str
        Its name in reports.
    migrate_folio : str or None
        The migrate callback of its ``address_space_operations``: ``"filemap_migrate_folio"``,
        ``"buffer_migrate_folio"``, ``"buffer_migrate_folio_norefs"``, or ``None`` for a filesystem without
        one (``fallback_migrate_folio``: a dirty folio is written out first).
    buffer_heads : bool
        Its folios carry buffer heads as private data; otherwise a private folio state (as iomap's).
    locks_folios : bool
        It writes a folio only under the folio lock (``generic_perform_write``). ``False`` is the un-audited
        filesystem of the no-copy patch's warning: it writes cached folios without the lock, so a write may
        land on a folio a migration has unmapped and locked. No-copy migration of its folios is refused with
        ``-EINVAL`` unless ``MigrateOptions(unaudited_no_copy=True)`` allows it.
    """

    name: str
    migrate_folio: str | None = "filemap_migrate_folio"
    buffer_heads: bool = False
    locks_folios: bool = True


#: A filesystem with ``filemap_migrate_folio`` and a private folio state (iomap-based filesystems).
GENERIC_FS = Filesystem("generic")
#: A block-based filesystem with buffer heads and ``buffer_migrate_folio`` (ext2-like).
BUFFER_FS = Filesystem("buffer", "buffer_migrate_folio", buffer_heads=True)
#: A block device's page cache: ``buffer_migrate_folio_norefs`` (busy buffer heads refused).
BLOCKDEV_FS = Filesystem("blockdev", "buffer_migrate_folio_norefs", buffer_heads=True)
#: A filesystem without a migrate callback: ``fallback_migrate_folio`` (buffer heads as private data).
NO_CALLBACK_FS = Filesystem("no-callback", None, buffer_heads=True)
#: The un-audited filesystem: writes folios without the folio lock.
UNAUDITED_FS = Filesystem("unaudited", locks_folios=False)
#: Every filesystem model by name.
FILESYSTEMS = {fs.name: fs for fs in (GENERIC_FS, BUFFER_FS, BLOCKDEV_FS, NO_CALLBACK_FS, UNAUDITED_FS)}


class File(MemObject):
    """An open file: a real file on disk and its page cache (the kernel's ``address_space`` of its inode).

    Create with :meth:`Machine.open <dmamig.Machine.open>`. A mapping of the file (``mm.mmap(length,
    file=f)``) keeps it alive after :meth:`close`; its page cache goes when it is closed and nothing maps it
    (dirty folios are written back first), so every frame comes back.

    Attributes
    ----------
    path : str
        The file's path.
    fs : Filesystem
        Its filesystem model.
    writable : bool
        Opened for writing.
    size : int
        The file's size in bytes (``i_size``).
    unlocked_writes : int
        Writes (in pages) that landed on a folio a migration held locked: only the un-audited filesystem
        makes them, and each may be lost by a no-copy migration.
    unlocked_pages : dict of int to int
        The same, by file page.
    """

    migrate_callback = True

    def __init__(self, machine: Machine, cache: PageCache, path: str, fd: int, writable: bool, fs: Filesystem):
        self.size = os.fstat(fd).st_size
        super().__init__(machine, _pages(self.size, machine.page_size), shared=True, order=0)
        self.cache = cache
        self.path = path
        self.fd = fd
        self.writable = writable
        self.fs = fs
        self.opened = True
        self.wb_err = 0  # errno of a writeback that failed, reported by the next fsync
        self.unlocked_writes = 0
        self.unlocked_pages: dict[int, int] = {}  # file page -> unlocked writes that landed on a locked folio

    def __repr__(self) -> str:
        return f"File({self.path!r}, size={self.size}, fs={self.fs.name!r})"

    # -- the page cache: lookup and fill (caller holds the lock) --------------------------------------------------
    def check_index(self, idx: np.ndarray, what: str) -> None:
        """Raise AddressFault for pages past the end of the file (the kernel's SIGBUS)."""
        end = _pages(self.size, self.machine.page_size)
        if idx.size and int(idx.max()) >= end:
            raise AddressFault(f"{what}: page {int(idx.max())} of {self.path!r} is past its end ({self.size} "
                               f"bytes, {end} pages): accessing a mapping past the end of its file is SIGBUS")

    def find_or_read(self, idx: np.ndarray, node: int = 0) -> np.ndarray:
        """The folios caching pages ``idx``; pages not cached are read from disk into new folios on ``node``
        (``filemap_read_folio``). Raises OutOfMemory (via the allocator) when ``node`` is full."""
        m, pages = self.machine, self.machine.pages
        self.grow(int(idx.max()) + 1 if idx.size else 0)
        pfns = self.pfns[idx]
        miss = np.unique(idx[pfns < 0])
        if miss.size == 0:
            return pfns
        new = m.frames.alloc_folios(node, miss.size, 0)
        if new.size < miss.size:
            m.frames.free_folios(new)
            raise OutOfMemory(f"node {node} is out of free pages: {miss.size} needed for the page cache of "
                              f"{self.path!r}, {m.nodes[node].free_pages} free")
        m.frames.write_pfns(new, self._read_disk(miss))
        pages.mapping[new] = self.id
        pages.index[new] = miss
        pages.set(new, _NEW_FILE_FLAGS)
        # The allocation reference is the page cache's; private data holds one more (folio_attach_private).
        pages.set(new, PageFlag.PRIVATE)
        pages.private[new] = 0
        pages.refcount[new] = 2
        self.pfns[miss] = new
        self.cache.count(new, _FILE_PAGES, 1)
        return self.pfns[idx]

    def _read_disk(self, idx: np.ndarray) -> np.ndarray:
        ps = self.machine.page_size
        out = np.zeros((idx.size, ps), dtype=np.uint8)
        for a, b in _runs(idx):
            raw = os.pread(self.fd, (b - a) * ps, int(idx[a]) * ps)
            out.reshape(-1)[a * ps: a * ps + len(raw)] = np.frombuffer(raw, dtype=np.uint8)
        return out

    def cached_pfns(self, offset: int, length: int) -> np.ndarray:
        """The pfn caching each page of ``[offset, offset + length)``, ``-1`` where none (lock held)."""
        ps = self.machine.page_size
        idx = np.arange(offset // ps, -(-(offset + length) // ps))
        out = np.full(idx.size, NO_PFN, dtype=np.int64)
        inside = idx < self.pfns.size
        out[inside] = self.pfns[idx[inside]]
        return out

    def attach_buffers(self, pfns: np.ndarray) -> None:
        """Give folios that lost their private data (``try_to_free_buffers``) new, idle buffer heads
        (``folio_create_empty_buffers``), as the filesystem does before it uses them (lock held)."""
        pages = self.machine.pages
        bare = pfns[(pages.flags[pfns] & _PRIVATE) == 0]
        if bare.size:
            pages.set(bare, PageFlag.PRIVATE)
            pages.private[bare] = 0
            pages.refcount[bare] += 1

    # -- writes ----------------------------------------------------------------------------------------------
    def write_cached(self, offset: int, buf: np.ndarray) -> None:
        """Store ``buf`` at ``offset`` through the page cache (``generic_perform_write``; lock held).

        A filesystem that locks folios waits while a folio of the range is locked (by a migration), then
        looks it up again: the migration may have replaced it. The un-audited one writes at once.
        """
        m, pages, ps = self.machine, self.machine.pages, self.machine.page_size
        idx = np.arange(offset // ps, -(-(offset + buf.size) // ps))
        while True:
            pfns = self.find_or_read(idx)
            locked = (pages.flags[pfns] & _LOCKED) != 0
            if not self.fs.locks_folios or not locked.any():
                break
            m.changed.wait()
        if self.fs.buffer_heads:
            self.attach_buffers(pfns)  # block_write_begin writes through the folio's buffers
        off = offset - int(idx[0]) * ps
        frames = m.frames.read_pfns(pfns)
        frames.reshape(-1)[off: off + buf.size] = buf
        if self.fs.locks_folios:
            m.frames.write_pfns(pfns, frames)
        else:
            # No folio lock and no reference kept across the write: nothing tells a migration that holds the
            # folio locked and unmapped that its content changed, so the frames are written as they are.
            self.unlocked_writes += int(np.count_nonzero(locked))
            for i in idx[locked].tolist():
                self.unlocked_pages[i] = self.unlocked_pages.get(i, 0) + 1
            for n, pos, frame in m.frames.frames_of(pfns):
                m.backend.write_frames(m.nodes[n].frames, frame, frames[pos])
        self.cache.mark_dirty(pfns)
        self.size = max(self.size, offset + buf.size)
        m.changed.notify_all()

    # -- truncation and release ---------------------------------------------------------------------------------
    def truncate(self, size: int) -> None:
        """``truncate_setsize``: drop the cached pages past ``size``, unmapping them first (lock held)."""
        m, pages, ps = self.machine, self.machine.pages, self.machine.page_size
        first = _pages(size, ps)
        while True:
            gone = np.flatnonzero(self.pfns[first:] >= 0) + first
            # The partial last page is zeroed past the end under its folio lock too: wait for it as well.
            tail = self.pfns[first - 1: first] if size % ps and first - 1 < self.pfns.size else self.pfns[:0]
            heads = np.concatenate([self.pfns[gone], tail[tail >= 0]])
            if not ((pages.flags[heads] & (_LOCKED | _WB)) != 0).any() and \
                    not any(v.has_migration_entries() for v in self.vmas):
                break
            m.changed.wait()
        for v in list(self.vmas):
            _unmap_file_pages(v, self, first)
        self.evict(gone)
        if size % ps and first - 1 < self.pfns.size and self.pfns[first - 1] >= 0:
            # The partial last page keeps its bytes up to the new end only (truncate_inode_partial_folio).
            pfn = self.pfns[first - 1: first]
            frame = m.frames.read_pfns(pfn)
            frame[0, size % ps:] = 0
            m.frames.write_pfns(pfn, frame)
        self.size = size

    def evict(self, idx: np.ndarray) -> None:
        """Take pages ``idx`` out of the page cache: their references and counters go (lock held)."""
        m, pages = self.machine, self.machine.pages
        pfns = self.pfns[idx]
        pfns = pfns[pfns >= 0]
        if pfns.size == 0:
            return
        self.cache.count(pfns, _FILE_PAGES, -1)
        dirty = pfns[(pages.flags[pfns] & _DIRTY) != 0]
        self.cache.count(dirty, _FILE_DIRTY, -1)
        private = (pages.flags[pfns] & _PRIVATE) != 0
        pages.clear(pfns, PageFlag.PRIVATE | PageFlag.DIRTY)
        pages.private[pfns] = 0
        pages.mapping[pfns] = -1  # truncated: a folio kept alive by a migration or a pin belongs to no file
        self.pfns[idx] = NO_PFN
        m.frames.put_folios(pfns, 1 + private.astype(np.int64), unique=True)

    def release(self) -> None:
        """No VMA maps the file any more: an open file keeps its page cache; a closed one writes its dirty
        folios back and lets every folio go (caller holds the lock)."""
        if self.opened or self.machine.object_or_none(self.id) is None:
            return
        self.cache.write_back(self, wait=True)
        self.evict(np.flatnonzero(self.pfns >= 0))
        self.machine.unregister_object(self.id)
        self.cache.forget(self)
        os.close(self.fd)

    # -- the public calls -----------------------------------------------------------------------------------------
    def _check_open(self) -> None:
        if not self.opened:
            raise InvalidArgument(f"{self.path!r} is closed")

    def pread(self, offset: int, length: int) -> np.ndarray:
        """Read up to ``length`` bytes at ``offset`` through the page cache (fewer at the end of the file).

        Returns
        -------
        numpy.ndarray
            uint8 copy of the bytes read.
        """
        self._check_open()
        offset, length = _check_span(offset, length)
        m = self.machine
        with m.changed:
            length = max(0, min(length, self.size - offset))
            if length == 0:
                return np.empty(0, dtype=np.uint8)
            ps = m.page_size
            pfns = self.find_or_read(np.arange(offset // ps, -(-(offset + length) // ps)))
            data = m.frames.read_pfns(pfns).reshape(-1)
        off = offset % ps
        return data[off: off + length].copy()

    def pwrite(self, data: Any, offset: int) -> int:
        """Write ``data`` at ``offset`` through the page cache (the file grows as needed); returns its length.

        Dirty folios are written back by the flusher, by :meth:`fsync` or when the file is released.
        """
        self._check_open()
        if not self.writable:
            raise InvalidArgument(f"{self.path!r} was opened read-only (writable=False): pwrite needs a file "
                                  f"opened for writing (EBADF)")
        buf = as_bytes(data)
        offset, _ = _check_span(offset, buf.size, self.machine.page_size)
        with self.machine.changed:
            self.write_cached(offset, buf)
        return int(buf.size)

    def fsync(self) -> int:
        """Write every dirty folio back, wait for writeback in flight, then ``os.fsync`` the file.

        Returns ``0``, or ``-EIO`` (``-ENOSPC`` for a full disk) when a writeback since the last fsync failed:
        the error is reported once, as the kernel's ``filemap_check_errors`` does, and the folios it could not
        write stay dirty (the next fsync writes them again).
        """
        self._check_open()
        with self.machine.changed:
            self.cache.write_back(self, wait=True)
            err, self.wb_err = self.wb_err, 0
        if self.writable:
            os.fsync(self.fd)
        return -err if err else 0

    def ftruncate(self, size: int) -> None:
        """Set the file's size: cached pages past it are dropped (and unmapped), a growth reads as zeros."""
        self._check_open()
        if not self.writable:
            raise InvalidArgument(f"{self.path!r} was opened read-only (writable=False): ftruncate needs a file "
                                  f"opened for writing")
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 0:
            raise InvalidArgument(f"size must be an integer >= 0, got {size!r}")
        _check_size(int(size), self.machine.page_size, "size")
        with self.machine.changed:
            self.truncate(int(size))
            os.ftruncate(self.fd, int(size))
            self.machine.changed.notify_all()

    def start_writeback(self) -> int:
        """Start writeback of every dirty folio the way the flusher does (``filemap_fdatawrite`` with
        ``WB_SYNC_NONE``): folios locked by someone else are skipped, and the disk writes finish on the
        flusher thread. Returns how many folios went under writeback."""
        self._check_open()
        with self.machine.changed:
            return self.cache.write_back(self, wait=False)

    def folio_pfns(self, offset: int = 0, length: int | None = None) -> np.ndarray:
        """The pfn caching each page of ``[offset, offset + length)`` (the whole file by default); ``-1``
        where the page is not cached."""
        length = max(1, self.size - offset) if length is None else length
        offset, length = _check_span(offset, length, self.machine.page_size)
        with self.machine.lock:
            return self.cached_pfns(offset, length)

    def buffer_state(self, offset: int, get_bh: int = 0, lock: bool | None = None) -> int:
        """Change the buffer heads of the folio caching ``offset`` as the filesystem's own code would:
        ``get_bh > 0`` takes references (``get_bh``), ``< 0`` drops them (``put_bh``); ``lock`` takes or releases
        a buffer lock. Returns the new state (``pages.private``: ``BH_LOCKED`` plus ``BH_REF`` per reference).
        The folio is read in first if needed."""
        self._check_open()
        if not self.fs.buffer_heads:
            raise InvalidArgument(f"{self.path!r} is on the {self.fs.name!r} filesystem, which has no buffer heads")
        m, ps = self.machine, self.machine.page_size
        offset, _ = _check_span(offset, 1, m.page_size)
        with m.changed:
            pfn = int(self.find_or_read(np.array([offset // ps]))[0])
            self.attach_buffers(np.array([pfn]))
            state = int(m.pages.private[pfn]) + BH_REF * int(get_bh)
            if state < 0:
                raise InvalidArgument("put_bh without a matching get_bh")
            if lock is not None:
                state = (state | BH_LOCKED) if lock else (state & ~BH_LOCKED)
            m.pages.private[pfn] = state
            m.changed.notify_all()
            return state

    def close(self) -> None:
        """Close the file. Idempotent. The page cache stays while a mapping of the file remains."""
        m = self.machine
        with m.changed:
            if not self.opened:
                return
            self.opened = False
            if not self.vmas:
                self.release()
            m.changed.notify_all()

    def __enter__(self) -> File:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def check_file_mapping(m: Machine, file: Any, offset: Any, shared: bool, order: int, npages: int) -> int:
    """Validate the file arguments of mmap; return the first page's index in the file."""
    if not isinstance(file, File) or file.machine is not m:
        raise InvalidArgument(f"file must be a File opened on this machine (m.open(path)), got {file!r}")
    if not file.opened:
        raise InvalidArgument(f"{file.path!r} is closed: mmap needs an open file")
    if isinstance(offset, bool) or not isinstance(offset, (int, np.integer)) or offset < 0 \
            or offset % m.page_size:
        raise InvalidArgument(f"offset must be a page-aligned integer >= 0 (page size {m.page_size}), got "
                              f"{offset!r}")
    if order:
        raise InvalidArgument(f"a file mapping uses base pages (order=0), got order={order}")
    if shared and not file.writable:
        raise InvalidArgument(f"{file.path!r} was opened read-only: a shared writable mapping of it needs a file "
                              f"opened for writing (EACCES); map it private")
    _check_size(int(offset) + npages * m.page_size, m.page_size, "offset + length")
    return int(offset) // m.page_size


def vma_file(vma: Vma) -> File | None:
    """The file a VMA maps (shared or private), or None for anonymous memory."""
    for obj in vma.chain:
        if isinstance(obj, File):
            return obj
    return None


def _unmap_file_pages(v: Vma, f: File, first: int) -> None:
    """Drop the PTEs of ``v`` that map page-cache pages of ``f`` from page ``first`` on (lock held)."""
    slots = np.arange(max(0, first - v.pgoff), v.npages)
    if slots.size == 0:
        return
    idx = v.pgoff + slots
    inside = idx < f.pfns.size
    slots, idx = slots[inside], idx[inside]
    hit = slots[(f.pfns[idx] >= 0) & (v.pte_pfn[slots] == f.pfns[idx])]
    if hit.size:
        unmap_slots(v.mm, v, hit)


class PageCache:
    """The machine's page cache: open files, per-node counters and the flusher thread.

    Parameters
    ----------
    machine : Machine
        The machine whose frames cache the files.

    Attributes
    ----------
    writeback_interval : float
        Seconds between the flusher's rounds over dirty folios (the kernel's ``dirty_writeback_centisecs``,
        far shorter here so that migrations meet writeback).
    io_delay : float
        Seconds each writeback's disk write takes on top of its own (a slow disk, for tests and experiments).
    """

    def __init__(self, machine: Machine):
        self.machine = machine
        self.files: list[File] = []
        self.file_ids = np.empty(0, dtype=np.int64)
        self.node_stat = np.zeros((len(NODE_STAT_ITEMS), len(machine.nodes)), dtype=np.int64)
        self.writeback_interval = 0.002
        self.io_delay = 0.0
        self._tmpdir: str | None = None
        self._queue: list[tuple[File, np.ndarray, np.ndarray, np.ndarray]] = []
        self._wake = threading.Condition(threading.Lock())
        self._stop = False
        self._flusher: threading.Thread | None = None

    # -- opening files ---------------------------------------------------------------------------------------
    def open(self, path: Any = None, size: Any = None, fs: Filesystem | str = GENERIC_FS, writable: bool = True,
             create: bool = True) -> File:
        """``Machine.open``: see there."""
        if isinstance(fs, str):
            if fs not in FILESYSTEMS:
                raise InvalidArgument(f"fs must be a Filesystem or one of {sorted(FILESYSTEMS)}, got {fs!r}")
            fs = FILESYSTEMS[fs]
        if not isinstance(fs, Filesystem):
            raise InvalidArgument(f"fs must be a Filesystem or one of {sorted(FILESYSTEMS)}, got {fs!r}")
        if size is not None and (isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 0):
            raise InvalidArgument(f"size must be an integer >= 0 or None, got {size!r}")
        if size is not None:
            _check_size(int(size), self.machine.page_size, "size")
        if path is None:
            if self._tmpdir is None:
                self._tmpdir = tempfile.mkdtemp(prefix="dmamig-files-")
            fd, path = tempfile.mkstemp(dir=self._tmpdir, suffix=".dat")
            os.close(fd)
            writable = True
        fd = _open_fd(os.fspath(path) if isinstance(path, os.PathLike) else path, writable, create)
        try:
            if size is not None:
                if not writable:
                    raise InvalidArgument("size needs a file opened for writing (it truncates or extends it)")
                os.ftruncate(fd, int(size))
        except BaseException:
            os.close(fd)
            raise
        m = self.machine
        with m.changed:
            f = File(m, self, str(path), fd, bool(writable), fs)
            self.files.append(f)
            self.file_ids = np.array([g.id for g in self.files], dtype=np.int64)
            if self._flusher is None:
                self._flusher = threading.Thread(target=self._flusher_loop, name="dmamig-flusher", daemon=True)
                self._flusher.start()
        return f

    def forget(self, f: File) -> None:
        """A released file leaves the registry (lock held)."""
        if f in self.files:
            self.files.remove(f)
            self.file_ids = np.array([g.id for g in self.files], dtype=np.int64)

    # -- counters and dirtying (lock held) --------------------------------------------------------------------------
    def count(self, pfns: np.ndarray, item: int, delta: int) -> None:
        """Add ``delta`` per page of ``pfns`` to counter ``item`` of each page's node."""
        if pfns.size:
            np.add.at(self.node_stat[item], self.machine.nodemap.node_of(pfns), delta)

    def node_page_state(self, node: int) -> dict[str, int]:
        """The page-cache counters of ``node``."""
        with self.machine.lock:
            return {name: int(self.node_stat[i, node]) for i, name in enumerate(NODE_STAT_ITEMS)}

    def file_folios(self, pfns: np.ndarray) -> np.ndarray:
        """Which of ``pfns`` are page-cache folios of a file (lock held)."""
        if not self.files or pfns.size == 0:
            return np.zeros(pfns.size, dtype=bool)
        return np.isin(self.machine.pages.mapping[pfns], self.file_ids)

    def mark_dirty(self, pfns: np.ndarray) -> None:
        """``folio_mark_dirty`` on the file folios among ``pfns`` (a write through a mapping or pwrite)."""
        pfns = pfns[pfns >= 0]
        pfns = np.unique(pfns[self.file_folios(pfns)])
        if pfns.size == 0:
            return
        pages = self.machine.pages
        clean = pfns[(pages.flags[pfns] & _DIRTY) == 0]
        pages.set(clean, PageFlag.DIRTY)
        self.count(clean, _FILE_DIRTY, 1)

    def shmem_added(self, pfns: np.ndarray) -> None:
        """Shared-memory pages ``pfns`` entered their object's page cache (a fault allocated them)."""
        self.count(pfns, _FILE_PAGES, 1)
        self.count(pfns, _SHMEM, 1)

    def shmem_removed(self, pfns: np.ndarray) -> None:
        """Shared-memory pages ``pfns`` left their page cache (the object was released)."""
        self.count(pfns, _FILE_PAGES, -1)
        self.count(pfns, _SHMEM, -1)

    def move_shmem(self, old: np.ndarray, new: np.ndarray, nr: np.ndarray) -> None:
        """``folio_migrate_mapping``'s counters for shared-memory folios: ``nr`` pages each change node."""
        if old.size == 0:
            return
        nodemap, stat = self.machine.nodemap, self.node_stat
        for item in (_FILE_PAGES, _SHMEM):
            np.add.at(stat[item], nodemap.node_of(old), -nr)
            np.add.at(stat[item], nodemap.node_of(new), nr)

    def count_dirtied(self, pfns: np.ndarray) -> None:
        """Count file folios ``pfns`` that someone else has just made dirty (a dirty PTE that became a
        migration entry: ``try_to_migrate_one``'s ``folio_mark_dirty``)."""
        self.count(pfns, _FILE_DIRTY, 1)

    def move_counters(self, old: np.ndarray, new: np.ndarray) -> None:
        """``folio_migrate_mapping``'s counters: the folios' pages (and their dirtiness) change node."""
        dirty = (self.machine.pages.flags[old] & _DIRTY) != 0
        self.count(old, _FILE_PAGES, -1)
        self.count(new, _FILE_PAGES, 1)
        self.count(old[dirty], _FILE_DIRTY, -1)
        self.count(new[dirty], _FILE_DIRTY, 1)

    # -- writeback ----------------------------------------------------------------------------------------------------
    def write_back(self, f: File, wait: bool) -> int:
        """Write back ``f``'s dirty folios (lock held). ``wait`` is ``WB_SYNC_ALL``: wait for folios locked
        by someone else and for every writeback in flight, doing the disk writes on this thread. Without it,
        locked folios are skipped and the flusher does the disk writes. Returns the folios started."""
        m, pages = self.machine, self.machine.pages
        started = 0
        failed = np.empty(0, dtype=np.int64)  # written once by this call and failed: not tried again here
        while True:
            cached = f.pfns[f.pfns >= 0]
            fl = pages.flags[cached]
            dirty = cached[((fl & _DIRTY) != 0) & ((fl & (_LOCKED | _WB)) == 0)]
            if failed.size:
                dirty = dirty[~np.isin(dirty, failed)]
            if dirty.size:
                started += dirty.size
                batch = self._start(f, dirty)
                if not wait:
                    with self._wake:
                        self._queue.append(batch)
                        self._wake.notify()
                    return started
                m.lock.release()
                try:
                    err = self._io(f, batch[2], batch[3])
                finally:
                    m.lock.acquire()
                self._end(f, batch[1], err)
                if err:
                    failed = np.concatenate([failed, batch[1]])
                continue
            if not wait:
                return started
            busy = ((fl & (_LOCKED | _WB)) != 0) & (((fl & _DIRTY) != 0) | ((fl & _WB) != 0))
            if failed.size:
                busy &= ~np.isin(cached, failed)
            if not busy.any():
                return started
            m.changed.wait()

    def _start(self, f: File, heads: np.ndarray) -> tuple[File, np.ndarray, np.ndarray, np.ndarray]:
        """``folio_start_writeback`` (lock held): dirty cleared, writeback set, the PTEs and migration entries
        that map the folios made clean (``folio_mkclean``), the data taken as it is now."""
        m, pages = self.machine, self.machine.pages
        pages.clear(heads, PageFlag.DIRTY)
        pages.set(heads, PageFlag.WRITEBACK)
        self.count(heads, _FILE_DIRTY, -1)
        self.count(heads, _WRITEBACK, 1)
        for vma, slots, _pos in rmap_walk(m, heads, PteFlag.PRESENT | PteFlag.MIGRATION):
            vma.pte_flags[slots] &= ~_PTE_DIRTY
        return f, heads, pages.index[heads].copy(), m.frames.read_pfns(heads)

    def write_folios(self, f: File, heads: np.ndarray) -> int:
        """Write dirty folios ``heads`` of ``f`` back now, on this thread, holding the lock (the migrating
        thread's ``writeout``: the folios are its own, locked and unmapped). Returns 0 or the errno."""
        _f, heads, idx, data = self._start(f, heads)
        err = self._io(f, idx, data)
        self._end(f, heads, err)
        return err

    def check_counters(self) -> list[str]:
        """The per-node counters against the page state they count; return the differences (lock taken)."""
        m, pages = self.machine, self.machine.pages
        with m.lock:
            want = np.zeros_like(self.node_stat)
            for f in self.files:
                cached = f.pfns[f.pfns >= 0]
                nid = m.nodemap.node_of(cached)
                fl = pages.flags[cached]
                np.add.at(want[_FILE_PAGES], nid, 1)
                np.add.at(want[_FILE_DIRTY], nid[(fl & _DIRTY) != 0], 1)
                np.add.at(want[_WRITEBACK], nid[(fl & _WB) != 0], 1)
            for obj in m.objects:
                if obj.shared and not obj.migrate_callback:  # shared memory
                    nid = m.nodemap.node_of(obj.pfns[obj.pfns >= 0])
                    np.add.at(want[_FILE_PAGES], nid, 1)
                    np.add.at(want[_SHMEM], nid, 1)
            bad = np.argwhere(want != self.node_stat)
            return [f"{NODE_STAT_ITEMS[i]} of node {n}: counted {int(self.node_stat[i, n])}, the page state "
                    f"says {int(want[i, n])}" for i, n in bad.tolist()]

    def _io(self, f: File, idx: np.ndarray, data: np.ndarray) -> int:
        """The disk writes of one writeback (no lock held): 0 or the errno of the first failure."""
        if self.io_delay:
            threading.Event().wait(self.io_delay)
        faults = self.machine.faults
        if faults.armed:
            if faults.should_fail("writeback", idx.size):
                return errno.EIO
            if faults.should_fail("disk_full", idx.size):
                return errno.ENOSPC
        ps = self.machine.page_size
        try:
            end = f.size  # i_size: bytes past it are not the file's
            for k, i in enumerate(idx.tolist()):
                n = min(ps, end - i * ps)
                if n > 0:
                    os.pwrite(f.fd, data[k, :n].tobytes(), i * ps)
        except OSError as exc:
            return exc.errno or errno.EIO
        return 0

    def _end(self, f: File, heads: np.ndarray, err: int) -> None:
        """``folio_end_writeback`` (lock held): writeback cleared; a failed write leaves the folio dirty and
        records the error for the next fsync (``mapping_set_error``)."""
        pages = self.machine.pages
        pages.clear(heads, PageFlag.WRITEBACK)
        self.count(heads, _WRITEBACK, -1)
        if err:
            f.wb_err = errno.ENOSPC if err == errno.ENOSPC else errno.EIO  # mapping_set_error
            live = heads[(pages.mapping[heads] == f.id) & ((pages.flags[heads] & _DIRTY) == 0)]
            pages.set(live, PageFlag.DIRTY)
            self.count(live, _FILE_DIRTY, 1)
        self.machine.changed.notify_all()

    def _flusher_loop(self) -> None:
        """The flusher: completes the writebacks queued to it, and every ``writeback_interval`` starts the
        writeback of every open file's dirty folios (folios a migration holds locked are skipped)."""
        m = self.machine
        while True:
            with self._wake:
                if not self._queue and not self._stop:
                    self._wake.wait(self.writeback_interval)
                if self._stop:
                    return
                queue, self._queue = self._queue, []
            # The counters say whether any folio is dirty: an idle page cache costs a sum per round, not a scan.
            if not queue and self.node_stat[_FILE_DIRTY].sum() > 0:
                with m.changed:
                    for f in list(self.files):
                        if f.opened or f.vmas:
                            cached = f.pfns[f.pfns >= 0]
                            fl = m.pages.flags[cached]
                            dirty = cached[((fl & _DIRTY) != 0) & ((fl & (_LOCKED | _WB)) == 0)]
                            if dirty.size:
                                queue.append(self._start(f, dirty))
            for f, heads, idx, data in queue:
                err = self._io(f, idx, data)
                with m.changed:
                    self._end(f, heads, err)

    # -- life cycle --------------------------------------------------------------------------------------------------
    def close(self) -> None:
        """Stop the flusher (finishing its queue), release every file, remove the temporary folder."""
        with self._wake:
            self._stop = True
            self._wake.notify()
        if self._flusher is not None:
            self._flusher.join(timeout=30)
        m = self.machine
        with m.changed:
            for f, heads, idx, data in self._queue:
                self._end(f, heads, self._io(f, idx, data))
            self._queue = []
            for f in list(self.files):
                f.opened = False
                for v in list(f.vmas):
                    v.mm.remove(v)
                f.release()
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None


def _open_fd(path: Any, writable: bool, create: bool) -> int:
    """Open ``path`` for the page cache, or raise InvalidArgument saying what is wrong with it."""
    if not isinstance(path, str) or not path or "\0" in path:
        raise InvalidArgument(f"path must be a non-empty str or os.PathLike without NUL bytes, got {path!r}")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise InvalidArgument(f"cannot open {path!r}: its folder {parent!r} does not exist")
    if os.path.isdir(path):
        raise InvalidArgument(f"cannot open {path!r}: it is a directory; give a regular file's path")
    exists = os.path.exists(path)
    if not exists and not create:
        raise InvalidArgument(f"cannot open {path!r}: no such file (it does not exist, or vanished); pass "
                              f"create=True to create it")
    if exists and writable and not os.stat(path).st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH):
        raise InvalidArgument(f"cannot open {path!r} for writing: it is read-only (mode "
                              f"{stat.S_IMODE(os.stat(path).st_mode):04o}); open it with writable=False")
    flags = (os.O_RDWR if writable else os.O_RDONLY) | (os.O_CREAT if create and writable else 0)
    try:
        fd = os.open(path, flags, 0o644)
    except FileNotFoundError:
        raise InvalidArgument(f"cannot open {path!r}: the file vanished while it was being opened") from None
    except OSError as exc:
        raise InvalidArgument(f"cannot open {path!r}: {exc.strerror}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise InvalidArgument(f"cannot open {path!r}: not a regular file")
    return fd


def _check_span(offset: Any, length: Any, ps: int | None = None) -> tuple[int, int]:
    """``(offset, length)`` as ints; with ``ps`` (the page size), also inside :data:`MAX_FILE_PAGES`."""
    for name, v in (("offset", offset), ("length", length)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise InvalidArgument(f"{name} must be an integer, got {type(v).__name__}")
    if offset < 0 or length < 0:
        raise InvalidArgument(f"offset and length must be >= 0, got {offset} and {length}")
    if ps is not None:
        _check_size(int(offset) + int(length), ps, "offset + length")
    return int(offset), int(length)


def _check_size(size: int, ps: int, what: str) -> None:
    if size > MAX_FILE_PAGES * ps:
        raise InvalidArgument(f"{what} is {size} bytes; a file may have at most {MAX_FILE_PAGES} pages "
                              f"({MAX_FILE_PAGES * ps} bytes): its page cache is a dense array")


def _pages(size: int, ps: int) -> int:
    return -(-int(size) // ps)


def _runs(idx: np.ndarray) -> list[tuple[int, int]]:
    """``[a, b)`` position ranges of ``idx`` whose values are consecutive."""
    cuts = (np.flatnonzero(np.diff(idx) != 1) + 1).tolist()
    return list(zip([0, *cuts], [*cuts, idx.size]))

