"""A stateful property test: random address-space operations and migrations against a plain-bytes model.

The model keeps, per address space, one bytearray per mapped page (shared mappings share the same
bytearray between the spaces that map them; fork gives the child its own copy of a private page, which is
what copy-on-write looks like from outside) and whether the page may be written. Whatever migrates, fails,
retries, faults, is write-protected or moved by mremap, every read must match the model, and once
everything is closed every node's frames must be free again.
"""

from __future__ import annotations

import errno

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import dmamig.migrate.core as core
from dmamig import AddressFault, Machine, MigrateMode, MigrateVma, OutOfMemory, PteFlag
from dmamig.flags import Prot

PS = 256
HOST, DEV = 256, 128
MAX_SPACES = 4
MODES = [MigrateMode.ASYNC, MigrateMode.SYNC_LIGHT, MigrateMode.SYNC]
OK_STATUS = {0, -errno.EAGAIN, -errno.EBUSY, -errno.ENOMEM, -errno.ENOENT, -errno.EACCES, -errno.EFAULT}
EIO = -errno.EIO

try:
    import dmamig.dma  # noqa: F401

    HAVE_DMA = True
except ImportError:  # the engine is optional for this test
    HAVE_DMA = False


class Page:
    """The model of one page: its bytes."""

    __slots__ = ("b",)

    def __init__(self, b: bytearray | None = None):
        self.b = bytearray(PS) if b is None else b


class Space:
    """An address space and its model: page address -> Page."""

    def __init__(self, mm):
        self.mm = mm
        self.pages: dict[int, Page] = {}
        self.readonly: set[int] = set()  # page addresses mprotected to Prot.READ
        self.pins: list[tuple[int, int]] = []


class MigrationModel(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.m = Machine(host_pages=HOST, device_pages=DEV, devices=2, page_size=PS, backend="cpu",
                         channels=2)
        self.totals = [n.total_pages for n in self.m.nodes]
        self.spaces: list[Space] = [Space(self.m.address_space())]
        self.injected = 0  # DMA errors injected; the engine counts those that hit a submission

    # -- helpers -----------------------------------------------------------------------------------------
    def _pick_space(self, data) -> Space:
        return self.spaces[data.draw(st.integers(0, len(self.spaces) - 1), label="space")]

    def _pick_range(self, data, sp: Space) -> tuple[int, int] | None:
        """A page range inside one VMA of ``sp``: (start address, pages)."""
        vmas = sp.mm.vmas
        if not vmas:
            return None
        v = vmas[data.draw(st.integers(0, len(vmas) - 1), label="vma")]
        first = data.draw(st.integers(0, v.npages - 1), label="first")
        count = data.draw(st.integers(1, v.npages - first), label="count")
        return v.start + first * PS, count

    def _model_bytes(self, sp: Space, addr: int, length: int) -> bytes:
        out = bytearray()
        a = addr
        end = addr + length
        while a < end:
            page = a - a % PS
            lo, hi = a - page, min(PS, end - page)
            out += sp.pages[page].b[lo:hi]
            a = page + hi
        return bytes(out)

    def _eio_possible(self) -> bool:
        """Whether an injected DMA error still waits for a submission (call before the operation)."""
        return HAVE_DMA and self.injected > self.m.dma.stats.errors

    def _check_status(self, status: np.ndarray, eio: bool) -> None:
        allowed = OK_STATUS | ({EIO} if eio else set())
        assert set(np.unique(status).tolist()) <= allowed, status

    # -- rules ---------------------------------------------------------------------------------------------
    @rule(data=st.data(), npages=st.integers(1, 24), shared=st.booleans(), order=st.sampled_from([0, 4]))
    def mmap(self, data, npages, shared, order):
        sp = self._pick_space(data)
        addr = sp.mm.mmap(npages * PS, shared=shared, order=order)
        assert addr % (PS << order) == 0
        for i in range(npages):
            sp.pages[addr + i * PS] = Page()

    def _pick_span(self, data, sp):
        """An unaligned ``(address, length)`` inside a mapped range of ``sp``, or None when it maps nothing."""
        rng = self._pick_range(data, sp)
        if rng is None:
            return None
        addr, count = rng
        off = data.draw(st.integers(0, PS - 1), label="offset")
        length = data.draw(st.integers(1, count * PS - off), label="length")
        return addr + off, length

    @rule(data=st.data())
    def write(self, data):
        sp = self._pick_space(data)
        span = self._pick_span(data, sp)
        if span is None:
            return
        start, length = span
        seed = data.draw(st.integers(0, 2**32 - 1), label="seed")
        buf = np.random.default_rng(seed).integers(0, 256, length, dtype=np.uint8)
        first = start - start % PS
        if any(a in sp.readonly for a in range(first, start + length, PS)):
            with pytest.raises(AddressFault, match="not writable"):
                sp.mm.write(start, buf)
            return  # refused before anything was written
        try:
            sp.mm.write(start, buf)
        except OutOfMemory:
            return  # nothing was written
        a, i = start, 0
        while i < length:
            page = a - a % PS
            n = min(PS - (a - page), length - i)
            sp.pages[page].b[a - page: a - page + n] = buf[i: i + n].tobytes()
            a += n
            i += n

    @rule(data=st.data())
    def read(self, data):
        sp = self._pick_space(data)
        span = self._pick_span(data, sp)
        if span is None:
            return
        start, length = span
        try:
            got = sp.mm.read(start, length)
        except OutOfMemory:
            return
        assert got.tobytes() == self._model_bytes(sp, start, length)

    @rule(data=st.data(), node=st.integers(0, 2), mode=st.sampled_from(MODES), no_copy=st.booleans(),
          move_all=st.booleans())
    def migrate(self, data, node, mode, no_copy, move_all):
        sp = self._pick_space(data)
        rng = self._pick_range(data, sp)
        if rng is None:
            return
        addr, count = rng
        engine = self.m.dma if no_copy and HAVE_DMA else None
        eio = self._eio_possible()
        res = sp.mm.migrate(addr, count * PS, node, mode=mode, engine=engine, move_all=move_all)
        self._check_status(res.status, eio)
        assert res.status.size == count
        nodes = sp.mm.nodes_of(addr, count * PS)
        pfns = sp.mm.pfns_of(addr, count * PS)
        assert ((nodes == node) == (res.status == 0)).all()
        assert ((pfns == -1) == (res.status == -errno.ENOENT)).all()
        assert ((pfns == -2) == (res.status == -errno.EFAULT)).all()  # the zero page stays
        assert not (move_all and (res.status == -errno.EACCES).any())

    @rule(data=st.data(), query=st.booleans(), move_all=st.booleans())
    def move_pages(self, data, query, move_all):
        sp = self._pick_space(data)
        mapped = sorted(sp.pages)
        n = data.draw(st.integers(1, 6), label="n")
        addrs = [mapped[data.draw(st.integers(0, len(mapped) - 1), label="page")]
                 + data.draw(st.integers(0, PS - 1), label="offset") if mapped else 0 for _ in range(n)]
        addrs[-1] = addrs[-1] if data.draw(st.booleans(), label="hole") else 1 << 30  # never mapped
        nodes = None if query else [data.draw(st.integers(0, 2), label="node") for _ in range(n)]
        eio = self._eio_possible()
        res = sp.mm.move_pages(addrs, nodes, move_all=move_all)
        allowed = OK_STATUS - {0} | ({EIO} if eio else set())
        for i, (a, s_) in enumerate(zip(addrs, res.status.tolist())):
            if (a - a % PS) not in sp.pages:
                assert s_ == -errno.EFAULT
            elif s_ >= 0:
                # do_pages_move stores each group's node as the group finishes: a page named again later may
                # have moved on since (and an address the call never reached reports where its page is).
                assert s_ == sp.mm.node_of(a) or (nodes is not None and s_ == nodes[i])
            else:
                assert s_ in allowed, res.status

    @rule(data=st.data(), writable=st.booleans())
    def mprotect(self, data, writable):
        sp = self._pick_space(data)
        rng = self._pick_range(data, sp)
        if rng is None:
            return
        addr, count = rng
        sp.mm.mprotect(addr, count * PS, Prot.READ | (Prot.WRITE if writable else Prot.NONE))
        for a in range(addr, addr + count * PS, PS):
            if writable:
                sp.readonly.discard(a)
            else:
                sp.readonly.add(a)
                assert PteFlag.WRITE not in sp.mm.pte_flags(a)

    @rule(data=st.data())
    def mremap(self, data):
        sp = self._pick_space(data)
        rng = self._pick_range(data, sp)
        if rng is None:
            return
        addr, count = rng
        new = data.draw(st.integers(1, 24), label="new_pages")
        vma = next(v for v in sp.mm.vmas if v.start <= addr < v.end)
        if vma.shared and new > count:
            return  # a shared mapping grows over pages of its object other mappings may show: not modelled
        pfns = sp.mm.pfns_of(addr, min(count, new) * PS)
        got = sp.mm.mremap(addr, count * PS, new * PS)
        assert np.array_equal(sp.mm.pfns_of(got, min(count, new) * PS), pfns)  # same frames, moved or not
        end = addr + count * PS
        grown_ro = addr in sp.readonly  # the range is in one VMA: pages it grows by get that VMA's protection
        moved = {a: (sp.pages.pop(a), a in sp.readonly) for a in range(addr, end, PS)}
        sp.readonly -= set(moved)
        for i in range(new):
            page, ro = moved.get(addr + i * PS, (Page(), grown_ro))
            sp.pages[got + i * PS] = page
            if ro:
                sp.readonly.add(got + i * PS)
        kept = []
        for a, n in sp.pins:
            if a + n * PS <= addr or a >= end:
                kept.append((a, n))
            elif addr <= a and a + n * PS <= addr + min(count, new) * PS:
                kept.append((a - addr + got, n))
            # a pin cut by the move or over the unmapped tail is dropped by close()
        sp.pins = kept

    @precondition(lambda self: HAVE_DMA)
    @rule(data=st.data(), node=st.integers(0, 2), mode=st.sampled_from(MODES))
    def migrate_with_dma_error(self, data, node, mode):
        sp = self._pick_space(data)
        rng = self._pick_range(data, sp)
        if rng is None:
            return
        addr, count = rng
        self.m.dma.inject_errors(1)
        self.injected += 1
        res = sp.mm.migrate(addr, count * PS, node, mode=mode, engine=self.m.dma)
        self._check_status(res.status, eio=True)

    @rule(data=st.data(), node=st.integers(1, 2))
    def migrate_vma(self, data, node):
        sp = self._pick_space(data)
        rng = self._pick_range(data, sp)
        if rng is None:
            return
        addr, count = rng
        mv = MigrateVma(sp.mm, addr, addr + count * PS, node)
        eio = self._eio_possible()
        mv.setup()
        mv.alloc_and_copy(engine=self.m.dma if HAVE_DMA and data.draw(st.booleans(), label="dma") else None)
        mv.pages()
        mv.finalize()
        self._check_status(mv.status, eio)

    @rule(data=st.data(), node=st.integers(0, 2), mode=st.sampled_from(MODES))
    def migrate_pages_no_copy(self, data, node, mode):
        """A driver's state-only migration: destinations allocated and copied by the caller."""
        sp = self._pick_space(data)
        rng = self._pick_range(data, sp)
        if rng is None:
            return
        addr, count = rng
        m = self.m
        pfns = np.array([sp.mm.pfn_of(addr + i * PS) for i in range(count)])
        pfns = pfns[pfns >= 0]
        with m.lock:
            pfns = pfns[(m.pages.head[pfns] == pfns) & (m.pages.order[pfns] == 0)]
        pfns = np.unique(pfns)
        if pfns.size == 0:
            return
        try:
            dst = m.alloc_pages(node, pfns.size)
        except OutOfMemory:
            return
        m.frames.write_pfns(dst, m.frames.read_pfns(pfns))
        res = m.migrate_pages(pfns, node, mode=mode | MigrateMode.NO_COPY, dst_pfns=dst)
        self._check_status(res.status, eio=False)

    def _pin_some(self, data) -> tuple[Space, int, int] | None:
        """Pin a drawn range: ``(space, address, pages)``, or None (nothing mapped, or no frames to pin)."""
        sp = self._pick_space(data)
        rng = self._pick_range(data, sp)
        if rng is None:
            return None
        addr, count = rng
        try:
            sp.mm.pin(addr, count * PS)
        except OutOfMemory:
            return None
        return sp, addr, count

    @rule(data=st.data())
    def pin(self, data):
        pinned = self._pin_some(data)
        if pinned is None:
            return
        sp, addr, count = pinned
        sp.pins.append((addr, count))
        for i in range(count):
            assert PteFlag.PRESENT in sp.mm.pte_flags(addr + i * PS)

    @precondition(lambda self: any(sp.pins for sp in self.spaces))
    @rule(data=st.data())
    def unpin(self, data):
        with_pins = [sp for sp in self.spaces if sp.pins]
        sp = with_pins[data.draw(st.integers(0, len(with_pins) - 1), label="space")]
        addr, count = sp.pins.pop(data.draw(st.integers(0, len(sp.pins) - 1), label="pin"))
        sp.mm.unpin(addr, count * PS)

    @precondition(lambda self: HAVE_DMA)
    @rule(data=st.data(), node=st.integers(1, 2), mode=st.sampled_from(MODES), after_passes=st.integers(0, 2))
    def migrate_while_a_pin_holder_writes(self, data, node, mode, after_passes):
        """A pin holder writes through its pin while a no-copy migration has the page unmapped and copied
        (before the first move pass, or after a pass it kept the page busy), then drops the pin: the write
        must survive the move's retry."""
        pinned = self._pin_some(data)
        if pinned is None:
            return
        sp, addr, count = pinned
        size = data.draw(st.integers(1, count * PS), label="size")
        off = data.draw(st.integers(0, count * PS - size), label="offset")
        seed = data.draw(st.integers(0, 2**32 - 1), label="seed")
        payload = np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes()
        done = []

        def holder():
            sp.mm.write_pinned(addr + off, payload)
            sp.mm.unpin(addr, count * PS)
            done.append(True)

        real_move = core._Migration._move_pass
        seen = []

        def move(mig, moving):
            if not done and len(seen) == after_passes:
                holder()
            seen.append(1)
            return real_move(mig, moving)

        core._Migration._move_pass = move
        try:
            eio = self._eio_possible()
            res = sp.mm.migrate(addr, count * PS, node, mode=mode, engine=self.m.dma)
        finally:
            core._Migration._move_pass = real_move
        if not done:
            holder()  # the migration ended first (nothing to move, or no pass that late)
        self._check_status(res.status, eio)
        for i, b in enumerate(range(off, off + size)):
            a = addr + b
            sp.pages[a - a % PS].b[a % PS] = payload[i]

    @precondition(lambda self: len(self.spaces) < MAX_SPACES)
    @rule(data=st.data())
    def fork(self, data):
        sp = self._pick_space(data)
        try:
            child = sp.mm.fork()
        except OutOfMemory:
            return
        shared = {v.start + i * PS: v.shared for v in sp.mm.vmas for i in range(v.npages)}
        new = Space(child)
        new.pages = {a: (p if shared[a] else Page(bytearray(p.b))) for a, p in sp.pages.items()}
        new.readonly = set(sp.readonly)
        self.spaces.append(new)

    @rule(data=st.data())
    def munmap(self, data):
        sp = self._pick_space(data)
        rng = self._pick_range(data, sp)
        if rng is None:
            return
        addr, count = rng
        sp.mm.munmap(addr, count * PS)
        end = addr + count * PS
        for a in range(addr, end, PS):
            del sp.pages[a]
            sp.readonly.discard(a)
        # a pin over an unmapped page can no longer be dropped by address; close() drops it
        sp.pins = [(a, n) for a, n in sp.pins if a + n * PS <= addr or a >= end]
        with pytest.raises(AddressFault):
            sp.mm.read(addr, 1)

    @precondition(lambda self: len(self.spaces) > 1)
    @rule(data=st.data())
    def close(self, data):
        sp = self.spaces.pop(data.draw(st.integers(0, len(self.spaces) - 1), label="space"))
        sp.mm.close()

    # -- invariants ----------------------------------------------------------------------------------------
    @invariant()
    def model_covers_exactly_the_mappings(self):
        for sp in self.spaces:
            mapped = {v.start + i * PS for v in sp.mm.vmas for i in range(v.npages)}
            assert mapped == set(sp.pages)

    @invariant()
    def mapped_pages_are_live(self):
        m = self.m
        with m.lock:
            pg = m.pages
            assert (pg.refcount >= 0).all() and (pg.mapcount >= 0).all()
            for sp in self.spaces:
                for v in sp.mm.vmas:
                    pfns = v.pte_pfn[v.pte_pfn >= 0]
                    assert (pg.refcount[pg.head[pfns]] > 0).all()
                    assert (pg.mapcount[pfns] > 0).all()
                    assert not (v.pte_flags & np.uint8(PteFlag.MIGRATION)).any()
                    writable = (v.pte_flags & np.uint8(PteFlag.WRITE)) != 0
                    # Copy-on-write: a private page mapped twice, and the zero page, are never writable.
                    if not v.shared:
                        live = v.pte_pfn >= 0
                        assert not (writable & live & (pg.mapcount[np.maximum(v.pte_pfn, 0)] > 1)).any()
                        assert not (writable & (v.pte_pfn == -2)).any()
                    if not v.writable:
                        assert not writable.any()
            # every allocated frame belongs to a folio that somebody references, and the other way round
            used = sum(t - n.free_pages for t, n in zip(self.totals, m.nodes))
            heads = np.flatnonzero((pg.head == np.arange(pg.nr_pfns)) & (pg.refcount > 0))
            assert used == int(pg.nr_pages(heads).sum())

    def teardown(self):
        left = [(sp, v.start) for sp in self.spaces for v in sp.mm.vmas
                if (v.pte_flags & np.uint8(PteFlag.MIGRATION)).any()]
        # Reading or closing would wait forever behind migration entries a bug left: report it instead.
        assert not left, f"migration entries left behind in VMAs at {[hex(a) for _, a in left]}"
        try:
            for sp in self.spaces:
                for a in sorted(sp.pages):
                    try:
                        got = sp.mm.read(a, PS).tobytes()
                    except OutOfMemory:
                        got = bytes(PS)  # backed by nothing (a fault found no frame): it must read as zeros
                    assert got == bytes(sp.pages[a].b), f"page {a:#x} differs"
            for sp in self.spaces:
                sp.mm.close()
            assert [n.free_pages for n in self.m.nodes] == self.totals, "frames leaked"
        finally:
            self.m.close()


MigrationModel.TestCase.settings = settings(
    max_examples=50, stateful_step_count=40, deadline=None, database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
test_migration_model = MigrationModel.TestCase


class PrivateMigrationModel(MigrationModel):
    """The same model on device-private memory: device pages are non-present entries, every CPU access and
    pin faults them back through migrate_to_ram (a migrate_vma of the faulting page)."""

    def __init__(self):
        super().__init__()
        self.m.close()
        self.m = Machine(host_pages=HOST, device_pages=DEV, devices=2, page_size=PS, backend="cpu",
                         channels=2, device_memory="private")
        self.spaces = [Space(self.m.address_space())]


PrivateMigrationModel.TestCase.settings = settings(
    max_examples=50, stateful_step_count=40, deadline=None, database=None,
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink],
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
test_private_migration_model = PrivateMigrationModel.TestCase
