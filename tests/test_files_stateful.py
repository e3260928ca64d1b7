"""A stateful property test of files: random pwrite, writes through shared and private mappings, reads, fsync,
ftruncate, start_writeback, buffer-head references, munmap and mmap again, and migrations of every kind (copy
and no-copy, every mode, through mappings and by pfn) against a model of the file's bytes and of the private
mapping's copies. After every step the struct pages agree with the page tables and the page-cache counters
with the page state; at the end the bytes on disk equal the model and every frame is free."""

from __future__ import annotations

import errno

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from dmamig import Machine, MigrateMode, MigrateOptions
from dmamig.check import check_machine

PS = 4096
NPAGES = 12  # the mappings cover these; the file may be longer
MODES = [MigrateMode.ASYNC, MigrateMode.SYNC_LIGHT, MigrateMode.SYNC]
FS = ["generic", "buffer", "blockdev", "no-callback", "unaudited"]


class FileModel(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.m = Machine(host_pages=256, device_pages=128, devices=2, backend="cpu", channels=2)
        self.m.page_cache.writeback_interval = 0.001
        self.fs = None
        self.f = None

    def _setup(self, fs: str) -> None:
        self.fs = fs
        self.f = self.m.open(size=NPAGES * PS, fs=fs)
        self.data = bytearray(NPAGES * PS)  # the file, as it must read
        self.mm = self.m.address_space()
        self.shared = self.mm.mmap(NPAGES * PS, file=self.f, shared=True)
        self.private = self.mm.mmap(NPAGES * PS, file=self.f, shared=False)
        self.copies: dict[int, bytearray] = {}  # private pages written (copied on write)
        self.held = 0  # buffer-head references held on page 0

    @initialize(fs=st.sampled_from(FS))
    def start(self, fs):
        self._setup(fs)

    def _ready(self) -> bool:
        return self.f is not None

    def _private_bytes(self) -> bytes:
        out = bytearray(self.data[: NPAGES * PS])
        for p, b in self.copies.items():
            out[p * PS:(p + 1) * PS] = b
        return bytes(out)

    @rule(data=st.data())
    def pwrite(self, data):
        if not self._ready():
            return
        off = data.draw(st.integers(0, len(self.data) - 1))
        n = data.draw(st.integers(1, min(2 * PS, len(self.data) - off)))
        buf = bytes([data.draw(st.integers(0, 255))]) * n
        self.f.pwrite(buf, off)
        self.data[off: off + n] = buf

    @rule(data=st.data(), private=st.booleans())
    def write_mapping(self, data, private):
        if not self._ready():
            return
        off = data.draw(st.integers(0, NPAGES * PS - 1))
        n = data.draw(st.integers(1, min(2 * PS, NPAGES * PS - off)))
        buf = bytes([data.draw(st.integers(0, 255))]) * n
        if private:
            for p in range(off // PS, (off + n - 1) // PS + 1):
                self.copies.setdefault(p, bytearray(self.data[p * PS:(p + 1) * PS]))
            self.mm.write(self.private + off, buf)
            for i in range(n):
                p, o = divmod(off + i, PS)
                self.copies[p][o] = buf[i]
        else:
            self.mm.write(self.shared + off, buf)
            self.data[off: off + n] = buf

    @rule()
    def read_everything(self):
        if not self._ready():
            return
        assert bytes(self.f.pread(0, len(self.data))) == bytes(self.data)
        assert bytes(self.mm.read(self.shared, NPAGES * PS)) == bytes(self.data[: NPAGES * PS])
        assert bytes(self.mm.read(self.private, NPAGES * PS)) == self._private_bytes()

    @rule(data=st.data(), node=st.integers(0, 2), mode=st.sampled_from(MODES), engine=st.booleans(),
          private=st.booleans(), unaudited=st.booleans())
    def migrate(self, data, node, mode, engine, private, unaudited):
        if not self._ready():
            return
        first = data.draw(st.integers(0, NPAGES - 1))
        n = data.draw(st.integers(1, NPAGES - first))
        base = self.private if private else self.shared
        opts = MigrateOptions(unaudited_no_copy=True) if unaudited and self.fs != "unaudited" else None
        res = self.mm.migrate(base + first * PS, n * PS, node, mode=mode, engine=self.m.dma if engine else None,
                              options=opts, move_all=True)
        allowed = {0, -errno.EAGAIN, -errno.EBUSY, -errno.ENOENT, -errno.EINVAL, -errno.ENOMEM}
        assert set(res.status.tolist()) <= allowed
        if self.fs != "unaudited" or not engine:
            assert -errno.EINVAL not in res.status.tolist()

    @rule(node=st.integers(0, 2), mode=st.sampled_from(MODES))
    def migrate_pages_of_the_cache(self, node, mode):
        if not self._ready():
            return
        pfns = self.f.folio_pfns()
        pfns = pfns[pfns >= 0]
        if pfns.size:
            self.m.migrate_pages(pfns, node, mode=mode)

    @rule()
    def fsync(self):
        if self._ready():
            assert self.f.fsync() == 0

    @rule()
    def start_writeback(self):
        if self._ready():
            self.f.start_writeback()

    @rule(extra=st.integers(0, 4), partial=st.integers(0, PS - 1))
    def ftruncate(self, extra, partial):
        if not self._ready():
            return
        size = (NPAGES + extra) * PS + (partial if extra else 0)
        self.f.ftruncate(size)
        if size < len(self.data):
            del self.data[size:]
        else:
            self.data.extend(bytes(size - len(self.data)))

    @rule(get=st.booleans())
    def buffer_heads(self, get):
        if not self._ready() or self.fs not in ("buffer", "blockdev", "no-callback"):
            return
        if get:
            self.f.buffer_state(0, get_bh=1)
            self.held += 1
        elif self.held:
            self.f.buffer_state(0, get_bh=-1)
            self.held -= 1

    @rule()
    def munmap_and_map_again(self):
        if not self._ready():
            return
        self.mm.munmap(self.shared, NPAGES * PS)
        self.shared = self.mm.mmap(NPAGES * PS, file=self.f, shared=True)

    @invariant()
    def consistent(self):
        assert check_machine(self.m, idle=True) == []
        assert self.m.page_cache.check_counters() == []

    def teardown(self):
        try:
            if self._ready():
                assert bytes(self.mm.read(self.shared, NPAGES * PS)) == bytes(self.data[: NPAGES * PS])
                while self.held:
                    self.f.buffer_state(0, get_bh=-1)
                    self.held -= 1
                assert self.f.fsync() == 0
                with open(self.f.path, "rb") as fh:
                    assert fh.read() == bytes(self.data)
                self.mm.close()
                self.f.close()
                assert all(nd.free_pages == nd.total_pages for nd in self.m.nodes)
        finally:
            self.m.close()


FileModel.TestCase.settings = settings(max_examples=60, stateful_step_count=30, deadline=None, database=None,
                                       suppress_health_check=[HealthCheck.too_slow])
TestFileModel = FileModel.TestCase
