"""The CUDA backend's own code (channels, completions, frames, error mapping, close) driven through a stand-in
for the few CuPy calls it makes, on every machine.

The stand-in (:class:`FakeCupy`) is a real implementation of that interface on host memory: allocations are
numpy buffers, copies are ``memmove`` between the real addresses (every range is checked against the
allocations, so address arithmetic errors fail loudly), streams are queues that run on command, events complete
or fail on command, and the two kernels are their numpy references. It never replaces the GPU tests in
``test_cuda_backend.py``; it checks what a GPU cannot be made to do on demand (sticky errors, slow streams,
failed events on one device of two, missing NVRTC) and what does not need one.
"""

from __future__ import annotations

import ctypes
import gc
import threading
import time
import warnings

import numpy as np
import pytest
from support import WAIT, contents, engine_for, make_nodes

from dmamig.backends import cuda as cuda_mod
from dmamig.backends.cuda import CudaBackend, DeviceFrames
from dmamig.backends.cuda import kernels as cuda_kernels
from dmamig.backends.cuda import runtime as cuda_runtime
from dmamig.backends.cuda.events import TIMING_RING
from dmamig.dma import PlanOptions, page_checksums
from dmamig.dma import ring as dma_ring
from dmamig.dma.channel import ChannelWork
from dmamig.dma.copy_plan import METHOD_BATCH, METHOD_MEMCPY
from dmamig.errors import BackendUnavailable, DmaError, InvalidArgument, OutOfMemory

PAGE = 4096

ERROR_NAMES = {
    1: "cudaErrorInvalidValue: invalid argument",
    2: "cudaErrorMemoryAllocation: out of memory",
    35: "cudaErrorInsufficientDriver: CUDA driver version is insufficient for CUDA runtime version",
    600: "cudaErrorNotReady: device not ready",
    700: "cudaErrorIllegalAddress: an illegal memory access was encountered",
    704: "cudaErrorPeerAccessAlreadyEnabled: peer access is already enabled",
}


class FakeCudaError(RuntimeError):
    """Stands in for ``CUDARuntimeError``: carries ``status``; its text is the CUDA error's name."""

    def __init__(self, status: int):
        self.status = status
        super().__init__(ERROR_NAMES.get(status, f"cudaErrorUnknown{status}: unknown error"))


class FakeStream:
    """A queue of operations; runs them at once (``auto``) or when the GPU is told to run."""

    def __init__(self, gpu: FakeGpu, device: int, non_blocking: bool = False):
        self.gpu = gpu
        self.device = device
        self.non_blocking = non_blocking
        self.ptr = gpu.new_handle()
        self.ops: list = []
        self.enqueued = 0
        self.executed = 0
        self.resident: threading.Thread | None = None  # a persistent kernel running on the stream
        gpu.streams[self.ptr] = self

    def enqueue(self, op) -> None:
        self.ops.append(op)
        self.enqueued += 1
        if self.gpu.auto:
            self.run()

    def run(self, upto: int | None = None) -> None:
        upto = self.enqueued if upto is None else upto
        while self.executed < upto:
            op = self.ops.pop(0)
            op()
            self.executed += 1

    def busy(self) -> bool:
        """Work queued, or a persistent kernel still running."""
        return self.executed < self.enqueued or (self.resident is not None and self.resident.is_alive())

    def start_resident(self, body) -> None:
        """Run ``body`` on a thread of its own after the stream's previous resident kernel ends (stream order)."""
        before = self.resident

        def run() -> None:
            if before is not None:
                before.join()
            body()

        self.resident = threading.Thread(target=run, daemon=True, name="fake-ring-persist")
        self.resident.start()

    def synchronize(self) -> None:
        self.gpu.log.append(("streamSynchronize", self.ptr))
        if self.gpu.sticky:
            raise FakeCudaError(self.gpu.sticky)
        self.run()
        if self.resident is not None:
            self.resident.join()

    def __enter__(self) -> FakeStream:
        self.gpu.tls.__dict__.setdefault("streams", []).append(self)
        return self

    def __exit__(self, *exc) -> None:
        self.gpu.tls.streams.pop()


class FakeRuntime:
    """``cupy.cuda.runtime`` on host memory."""

    CUDARuntimeError = FakeCudaError
    hostAllocPortable = 1
    hostAllocMapped = 2
    memcpyDefault = 4

    def __init__(self, gpu: FakeGpu):
        self.gpu = gpu

    # versions and devices
    def getDeviceCount(self) -> int:
        if self.gpu.count_error:
            raise FakeCudaError(self.gpu.count_error)
        return self.gpu.ndev

    def driverGetVersion(self) -> int:
        return self.gpu.driver

    def runtimeGetVersion(self) -> int:
        return 13000

    def getDeviceProperties(self, i: int) -> dict:
        return {"name": f"Fake GPU {i}".encode(), "totalGlobalMem": 1 << 30, "major": 9, "minor": 0}

    def deviceCanAccessPeer(self, a: int, b: int) -> int:
        if self.gpu.peer_matrix is not None:
            return int(bool(self.gpu.peer_matrix[a][b]))
        return int(self.gpu.peer_capable)

    def deviceGetP2PAttribute(self, attr: int, a: int, b: int) -> int:
        """Not in CuPy; the backend looks for it before asking the driver library."""
        self.gpu.log.append(("deviceGetP2PAttribute", attr, a, b))
        if a == b or not (0 <= a < self.gpu.ndev and 0 <= b < self.gpu.ndev):
            raise FakeCudaError(101)  # cudaErrorInvalidDevice
        if attr == 1:  # performance rank
            return self.gpu.perf_rank
        if attr == 2:  # access supported
            return self.deviceCanAccessPeer(a, b)
        if attr == 3:  # native atomics
            return int(self.gpu.nvlink and bool(self.deviceCanAccessPeer(a, b)))
        raise FakeCudaError(1)

    def deviceEnablePeerAccess(self, peer: int) -> None:
        key = (self.gpu.current_device(), peer)
        if key in self.gpu.peer_enabled:
            raise FakeCudaError(704)
        self.gpu.peer_enabled.add(key)

    # memory
    def malloc(self, n: int) -> int:
        if self.gpu.oom:
            raise FakeCudaError(2)
        return self.gpu.alloc(n, self.gpu.current_device())

    def free(self, ptr: int) -> None:
        self.gpu.release(ptr, host=False)

    def hostAlloc(self, n: int, flags: int) -> int:
        return self.gpu.alloc(n, -1)

    def freeHost(self, ptr: int) -> None:
        self.gpu.release(ptr, host=True)

    def _stream(self, ptr: int) -> FakeStream:
        if ptr not in self.gpu.streams:
            raise FakeCudaError(1)
        return self.gpu.streams[ptr]

    def memcpyAsync(self, dst: int, src: int, n: int, kind: int, stream: int) -> None:
        self.gpu.log.append(("memcpyAsync", dst, src, n, kind, stream))
        if self.gpu.sticky:
            raise FakeCudaError(self.gpu.sticky)
        # Pageable (unregistered) host memory is allowed only where the direction is explicit.
        ddev = self.gpu.check(dst, n, pageable=kind == 2)
        sdev = self.gpu.check(src, n, pageable=kind == 1)
        if kind == 4 and ddev >= 0 and sdev >= 0 and ddev != sdev and not self.gpu.default_cross_device:
            raise FakeCudaError(1)  # cross-device copies must say which devices they join
        if sdev == -2:
            # From pageable memory the runtime takes the bytes before returning (the caller may free them).
            data = ctypes.create_string_buffer(ctypes.string_at(src, n), n)
            self._stream(stream).enqueue(lambda: ctypes.memmove(dst, data, n))
            return
        self._stream(stream).enqueue(lambda: ctypes.memmove(dst, src, n))

    def memcpyPeerAsync(self, dst: int, ddev: int, src: int, sdev: int, n: int, stream: int) -> None:
        self.gpu.log.append(("memcpyPeerAsync", dst, ddev, src, sdev, n, stream))
        if self.gpu.check(dst, n) != ddev or self.gpu.check(src, n) != sdev:
            raise FakeCudaError(1)
        self._stream(stream).enqueue(lambda: ctypes.memmove(dst, src, n))

    def memset(self, ptr: int, value: int, n: int) -> None:
        self.gpu.check(ptr, n)
        ctypes.memset(ptr, value, n)

    def streamQuery(self, stream: int) -> int:
        self.gpu.log.append(("streamQuery", stream))
        if self.gpu.sticky:
            return self.gpu.sticky
        return 600 if self._stream(stream).busy() else 0

    def deviceGetAttribute(self, attr: int, device: int) -> int:
        if not 0 <= device < self.gpu.ndev:
            raise FakeCudaError(101)
        return self.gpu.attrs[attr]

    def memsetAsync(self, ptr: int, value: int, n: int, stream: int) -> None:
        self.gpu.check(ptr, n)
        self._stream(stream).enqueue(lambda: ctypes.memset(ptr, value, n))

    # events
    def eventCreateWithFlags(self, flags: int) -> int:
        ev = self.gpu.new_handle()
        self.gpu.events[ev] = {"stream": None, "mark": 0, "fail": 0, "flags": flags}
        return ev

    def eventDestroy(self, ev: int) -> None:
        self.gpu.log.append(("eventDestroy", ev))
        del self.gpu.events[ev]

    def eventRecord(self, ev: int, stream: int) -> None:
        self.gpu.log.append(("eventRecord", ev, stream))
        s = self._stream(stream)
        e = self.gpu.events[ev]
        e["stream"], e["mark"] = s, s.enqueued

    def _event_code(self, ev: int) -> int:
        e = self.gpu.events[ev]
        if e["fail"]:
            return e["fail"]
        if self.gpu.sticky:
            return self.gpu.sticky
        return 0 if e["stream"] is None or e["stream"].executed >= e["mark"] else 600

    def streamWaitEvent(self, stream: int, ev: int, flags: int = 0) -> None:
        """The stream's later work waits for the event's most recent record (as it stands now)."""
        self.gpu.log.append(("streamWaitEvent", stream, ev))
        e = self.gpu.events[ev]
        waited, mark = e["stream"], e["mark"]
        self._stream(stream).enqueue(lambda: waited.run(mark) if waited is not None else None)

    def eventQuery(self, ev: int) -> int:
        self.gpu.log.append(("eventQuery", ev))
        return self._event_code(ev)

    def eventSynchronize(self, ev: int) -> None:
        self.gpu.log.append(("eventSynchronize", ev))
        e = self.gpu.events[ev]
        if e["stream"] is not None:
            e["stream"].run(e["mark"])  # the device finishes the work before the event
        code = self._event_code(ev)
        if code:
            raise FakeCudaError(code)

    def eventElapsedTime(self, start: int, end: int) -> float:
        a, b = self.gpu.events[start], self.gpu.events[end]
        if self._event_code(start) or self._event_code(end):
            raise FakeCudaError(600)
        return 0.5 * (b["mark"] - a["mark"])  # half a millisecond per queued operation


class FakeDevice:
    def __init__(self, gpu: FakeGpu, i: int):
        self.gpu, self.id = gpu, int(i)

    def __enter__(self) -> FakeDevice:
        self.gpu.tls.__dict__.setdefault("devices", []).append(self.id)
        return self

    def __exit__(self, *exc) -> None:
        self.gpu.tls.devices.pop()


class FakeKernel:
    def __init__(self, gpu: FakeGpu, name: str):
        self.gpu, self.name = gpu, name

    def __call__(self, grid, block, args, **kwargs) -> None:
        streams = getattr(self.gpu.tls, "streams", [])
        if not streams:
            raise AssertionError("kernel launched outside `with stream:` (it would run on the default stream)")
        s = streams[-1]
        self.gpu.launches.append((self.name, grid, block))
        if self.name == "ring_copy":
            s.enqueue(lambda: self._ring_copy(tuple(int(x) for x in args)))
            return
        if self.name == "ring_persist":
            if not kwargs.get("enable_cooperative_groups"):
                raise AssertionError("ring_persist needs a cooperative launch (its grid barrier)")
            if self.gpu.sticky:
                raise FakeCudaError(self.gpu.sticky)
            s.enqueue(lambda: s.start_resident(lambda: self._ring_persist(tuple(int(x) for x in args))))
            return
        a, b, n, page = (int(x) for x in args)
        if self.name == "page_gather_copy":
            self.gpu.check(a, 8 * n)
            self.gpu.check(b, 8 * n)
            s.enqueue(lambda: self._gather(a, b, n, page))
        else:
            self.gpu.check(a, 8 * n)
            self.gpu.check(b, 8 * n)
            s.enqueue(lambda: self._checksum(a, b, n, page))

    def _gather(self, a: int, b: int, n: int, page: int) -> None:
        src = np.ctypeslib.as_array((ctypes.c_uint64 * n).from_address(a))
        dst = np.ctypeslib.as_array((ctypes.c_uint64 * n).from_address(b))
        for s_, d_ in zip(src.tolist(), dst.tolist()):
            self.gpu.check(s_, page)
            self.gpu.check(d_, page)
            ctypes.memmove(d_, s_, page)

    def _ring_copy(self, args: tuple[int, ...]) -> None:
        """kernels/ring_copy.cu's protocol: per channel with a job, check its rows against the registered ranges,
        copy them (every range checked against the allocations), then the status, ROW_HEAD and HEAD."""
        def words(addr: int, n: int) -> np.ndarray:
            self.gpu.check(addr, 8 * n)
            return np.ctypeslib.as_array((ctypes.c_int64 * n).from_address(addr))

        ctl, rows, jobs, regions, done = args[:5]
        seqs = args[5:13]
        channels, row_cap, job_cap, ctl_words, _bpc = args[13:18]
        nreg = int(words(regions, 1)[0])
        ranges = words(regions, 2 * nreg + 2).reshape(-1, 2)[1:].tolist()
        words(done, 1)  # the per-channel counters are device memory the kernel may touch

        def inside(addr: int, n: int) -> bool:
            return any(lo <= addr and addr + n <= hi for lo, hi in ranges)

        for c in range(channels):
            seq = seqs[c]
            if seq < 0:
                continue
            my_ctl = words(ctl + 8 * c * ctl_words, ctl_words)
            slot = words(jobs + 32 * (c * job_cap + seq % job_cap), 4)
            first, count = int(slot[1]), int(slot[2])
            ring = words(rows + 32 * c * row_cap, 4 * row_cap).reshape(row_cap, 4)
            picked = [ring[(first + i) % row_cap].tolist() for i in range(count)]
            ok = not nreg or all(inside(src, n) and inside(dst, n) for src, dst, n, _ in picked)
            if ok:
                for src, dst, n, _ in picked:
                    self.gpu.check(src, n)
                    self.gpu.check(dst, n)
                    ctypes.memmove(dst, src, n)
            slot[3] = 1 if ok else 2
            my_ctl[dma_ring.ROW_HEAD] = first + count
            my_ctl[dma_ring.HEARTBEAT] += 1
            my_ctl[dma_ring.HEAD] = seq + 1

    def _ring_persist(self, args: tuple[int, ...]) -> None:
        """kernels/ring_persist.cu's protocol on a thread: poll every channel's TAIL, run one job per channel a
        round (rows checked against the registered ranges, then copied), publish status, ROW_HEAD and HEAD, beat
        HEARTBEAT; exit after the idle window with the IDLE hand-shake, or on the stop word once nothing is
        left. Switches on the GPU: ``consumer_stalled`` (no progress, no heartbeat), ``sticky`` (the kernel
        dies), ``bad_row`` (the next job's first row points outside registered memory)."""
        gpu = self.gpu

        def words(addr: int, n: int) -> np.ndarray:
            gpu.check(addr, 8 * n)
            return np.ctypeslib.as_array((ctypes.c_int64 * n).from_address(addr))

        ctl, rows, jobs, regions, host, scratch, stage = args[:7]
        channels, row_cap, job_cap, ctl_words, idle_ns, generation = args[7:13]
        words(scratch, 104)  # the round buffers, the barrier and the staged rows are device memory it may touch
        words(stage, 4 * channels * row_cap)
        ctl_v = words(ctl, channels * ctl_words).reshape(channels, ctl_words)
        host_v = words(host, 16)
        ring_v = [words(rows + 32 * c * row_cap, 4 * row_cap).reshape(row_cap, 4) for c in range(channels)]
        jobs_v = [words(jobs + 32 * c * job_cap, 4 * job_cap).reshape(job_cap, 4) for c in range(channels)]
        fence = threading.Lock()  # taking a lock is a full fence (a locked instruction on x86)
        heads = [int(ctl_v[c, dma_ring.HEAD]) for c in range(channels)]
        ctl_v[:, dma_ring.IDLE] = 0
        host_v[1] = generation
        gpu.persist_runs.append(generation)
        idle_since = time.monotonic_ns()
        while True:
            while gpu.consumer_stalled and not gpu.sticky:
                time.sleep(1e-3)
            if gpu.sticky:
                return  # the context is poisoned: the kernel dies where it stands
            with fence:
                tails = ctl_v[:, dma_ring.TAIL].tolist()
            work = [c for c in range(channels) if tails[c] > heads[c]]
            if not work:
                if host_v[0]:
                    break
                ctl_v[:, dma_ring.HEARTBEAT] += 1
                if time.monotonic_ns() - idle_since >= idle_ns:
                    ctl_v[:, dma_ring.IDLE] = generation
                    with fence:
                        tails = ctl_v[:, dma_ring.TAIL].tolist()
                    if any(tails[c] > heads[c] for c in range(channels)):
                        ctl_v[:, dma_ring.IDLE] = 0
                        continue
                    break
                time.sleep(20e-6)
                continue
            nreg = int(words(regions, 1)[0])
            ranges = words(regions, 2 * nreg + 2).reshape(-1, 2)[1:].tolist()
            for c in work:
                seq = heads[c]
                slot = jobs_v[c][seq % job_cap]
                kind, first, count = int(slot[0]), int(slot[1]), int(slot[2])
                host_v[8 + c] = seq + 1
                if kind != dma_ring.JOB_ROWS:
                    slot[3] = dma_ring.STATUS_FAILED
                else:
                    if gpu.bad_row:
                        gpu.bad_row = False
                        ring_v[c][first % row_cap, 1] = 0x10
                    picked = [ring_v[c][(first + i) % row_cap].tolist() for i in range(count)]
                    ok = not nreg or all(any(lo <= a and a + n <= hi for lo, hi in ranges)
                                         for src, dst, n, _ in picked for a in (src, dst))
                    if ok:
                        for src, dst, n, _ in picked:
                            gpu.check(src, n)
                            gpu.check(dst, n)
                            ctypes.memmove(dst, src, n)
                    slot[3] = dma_ring.STATUS_OK if ok else dma_ring.STATUS_BAD_ROW
                    ctl_v[c, dma_ring.ROW_HEAD] = first + count
                with fence:
                    ctl_v[c, dma_ring.HEAD] = seq + 1
                heads[c] = seq + 1
            ctl_v[:, dma_ring.HEARTBEAT] += 1
            idle_since = time.monotonic_ns()
        host_v[1] = 0

    def _checksum(self, a: int, out: int, n: int, page: int) -> None:
        addrs = np.ctypeslib.as_array((ctypes.c_uint64 * n).from_address(a)).tolist()
        pages = np.stack([np.ctypeslib.as_array((ctypes.c_uint8 * page).from_address(p)) for p in addrs])
        np.ctypeslib.as_array((ctypes.c_uint64 * n).from_address(out))[:] = page_checksums(pages)


class FakeModule:
    def __init__(self, gpu: FakeGpu, code: str):
        self.gpu, self.code = gpu, code
        if gpu.nvrtc_missing:
            raise RuntimeError("CuPy failed to load libnvrtc.so.13: OSError: libnvrtc.so.13: cannot open shared "
                               "object file: No such file or directory")

    def get_function(self, name: str) -> FakeKernel:
        assert f"void {name}(" in self.code
        return FakeKernel(self.gpu, name)


class FakeNvrtc:
    def __init__(self, gpu: FakeGpu):
        self.gpu = gpu

    def getVersion(self):
        if self.gpu.nvrtc_missing:
            raise RuntimeError("CuPy failed to load libnvrtc.so.13")
        return (13, 0)


class FakeGpu:
    """The state behind the stand-in: memory, streams, events, and switches for failures."""

    def __init__(self, ndev: int = 1, auto: bool = True):
        self.ndev = ndev
        self.auto = auto
        self.driver = 13000
        self.count_error = 0
        self.sticky = 0  # a sticky context error: every query and synchronize reports it
        self.oom = False
        self.nvrtc_missing = False
        self.peer_capable = True
        self.peer_matrix = None  # per ordered pair, where peer access differs between pairs
        self.nvlink = False  # native atomics over the peer links (what NVLink reports)
        self.perf_rank = 0
        self.default_cross_device = False
        self.peer_enabled: set = set()
        self.tls = threading.local()
        self.allocs: dict[int, tuple[np.ndarray, int]] = {}
        self.streams: dict[int, FakeStream] = {}
        self.events: dict[int, dict] = {}
        self.launches: list = []
        self.log: list = []
        # cudaDeviceAttr values: multiprocessors, a kernel execution timeout, cooperative launch support.
        self.attrs = {16: 132, 17: 0, 95: 1}
        self.consumer_stalled = False  # a persistent consumer stops making progress (and beating)
        self.bad_row = False  # the next job a persistent consumer runs has a row outside registered memory
        self.persist_runs: list[int] = []  # generations of the persistent consumers that started
        self.double_frees = 0
        self._next = 0x1000
        self.runtime = FakeRuntime(self)

    def new_handle(self) -> int:
        self._next += 16
        return self._next

    def current_device(self) -> int:
        devs = getattr(self.tls, "devices", [])
        return devs[-1] if devs else 0

    def alloc(self, n: int, device: int) -> int:
        buf = np.zeros(n + 64, dtype=np.uint8)
        ptr = (buf.ctypes.data + 63) & ~63
        self.allocs[ptr] = (buf, device, n)
        return ptr

    def release(self, ptr: int, host: bool) -> None:
        if ptr not in self.allocs:
            self.double_frees += 1
            raise FakeCudaError(1)
        buf, device, _n = self.allocs.pop(ptr)
        assert (device < 0) == host, "freed with the wrong call (free vs freeHost)"

    def check(self, ptr: int, n: int, pageable: bool = False) -> int:
        """Device of the allocation holding ``[ptr, ptr + n)`` (-2 for pageable host memory where allowed); a
        range outside every allocation, or straddling one's end, is an error."""
        for base, (_buf, device, size) in self.allocs.items():
            if base <= ptr and ptr + n <= base + size:
                return device
            if ptr < base + size and base < ptr + n:
                raise FakeCudaError(1)
        if pageable:
            return -2
        raise FakeCudaError(1)

    def run(self) -> None:
        """Let every stream finish its queued work."""
        for s in list(self.streams.values()):
            s.run()

    def live(self, kind: str) -> int:
        if kind == "device":
            return sum(1 for _b, d, _n in self.allocs.values() if d >= 0)
        if kind == "host":
            return sum(1 for _b, d, _n in self.allocs.values() if d < 0)
        return len(self.events)


class _CudaNamespace:
    def __init__(self, gpu: FakeGpu):
        self.runtime = gpu.runtime
        self.nvrtc = FakeNvrtc(gpu)
        self._gpu = gpu

    def Device(self, i: int = 0) -> FakeDevice:  # noqa: N802 (CuPy's name)
        return FakeDevice(self._gpu, i)

    def Stream(self, non_blocking: bool = False) -> FakeStream:  # noqa: N802 (CuPy's name)
        return FakeStream(self._gpu, self._gpu.current_device(), non_blocking)


class FakeCupy:
    """The names of ``cupy`` the CUDA backend uses."""

    __version__ = "14.2.0"

    def __init__(self, gpu: FakeGpu):
        self.gpu = gpu
        self.cuda = _CudaNamespace(gpu)

    def RawModule(self, code: str, **kwargs) -> FakeModule:  # noqa: N802 (CuPy's name)
        return FakeModule(self.gpu, code)


# -- fixtures and helpers ----------------------------------------------------------------------------------------

@pytest.fixture
def gpu() -> FakeGpu:
    return FakeGpu()


def backend_on(gpu: FakeGpu, **kw) -> CudaBackend:
    return CudaBackend(cupy=FakeCupy(gpu), **kw)


def use_fake_cupy(monkeypatch, gpu: FakeGpu) -> None:
    """Make the one place the CUDA backend imports cupy hand out the stand-in on ``gpu`` instead: backends made
    without ``cupy=`` (``backend="cuda"`` machines) and the module-level helpers then drive the stand-in."""
    monkeypatch.setattr(cuda_runtime, "import_cupy", lambda: FakeCupy(gpu))



GATHER = PlanOptions(memcpy_min_pages=10**9)
MEMCPY = PlanOptions(memcpy_min_pages=1)


# -- frames ----------------------------------------------------------------------------------------------------------

def test_frames_round_trip_and_zero(gpu):
    b = backend_on(gpu)
    dev = b.alloc_frames("device", 0, 32, PAGE)
    host = b.alloc_frames("host", -1, 8, PAGE)
    assert isinstance(dev, DeviceFrames) and dev.shape == (32, PAGE) and not b.read_frames(dev, np.arange(32)).any()
    assert isinstance(host, np.ndarray) and host.shape == (8, PAGE)
    rng = np.random.default_rng(1)
    idx = np.array([5, 6, 7, 20, 3, 31])  # runs and single pages, out of order
    data = rng.integers(0, 256, (idx.size, PAGE), dtype=np.uint8)
    b.write_frames(dev, idx, data)
    np.testing.assert_array_equal(b.read_frames(dev, idx), data)
    b.zero_frames(dev, idx[:2])
    assert not b.read_frames(dev, idx[:2]).any()
    np.testing.assert_array_equal(b.read_frames(dev, idx[2:]), data[2:])
    assert dev.__cuda_array_interface__["data"][0] == dev.ptr
    b.close()


def test_close_frees_device_memory_and_later_use_raises(gpu):
    b = backend_on(gpu)
    nodes = make_nodes(b, sizes=(16, 16, 16), devices=(-1, 0, 0))
    with engine_for(b, nodes, options=GATHER) as engine:
        engine.copy(np.arange(8), 16 + np.arange(8)).wait()
        engine.checksum(np.arange(48))
    assert gpu.live("device") > 2  # frames plus descriptor and checksum buffers
    b.close()
    assert gpu.live("device") == 0 and gpu.live("events") == 0
    assert nodes[1].frames.released
    with pytest.raises(DmaError, match="closed"):
        b.read_frames(nodes[1].frames, np.arange(2))
    with pytest.raises(BackendUnavailable, match="closed"):
        b.alloc_frames("device", 0, 1, PAGE)
    b.close()  # idempotent
    del nodes, engine
    gc.collect()
    assert gpu.live("host") == 0  # pinned host frames go with their last reference


def test_frames_dropped_without_close_are_freed_once(gpu):
    b = backend_on(gpu)
    frames = b.alloc_frames("device", 0, 8, PAGE)
    kept = b.alloc_frames("device", 0, 8, PAGE)
    del frames
    gc.collect()
    assert gpu.live("device") == 1
    b.close()
    assert kept.released and gpu.live("device") == 0
    del kept
    gc.collect()
    assert gpu.double_frees == 0


def test_close_after_sticky_error_still_releases_everything(gpu):
    b = backend_on(gpu)
    nodes = make_nodes(b, sizes=(16, 16), devices=(-1, 0))
    engine = engine_for(b, nodes)
    gpu.auto = False
    fence = engine.copy(np.arange(8), 16 + np.arange(8))
    gpu.sticky = 700
    with pytest.raises(DmaError, match="cudaErrorIllegalAddress"):
        fence.wait()
    engine.close()
    b.close()
    assert gpu.live("device") == 0 and gpu.live("events") == 0


def test_allocation_failure_is_out_of_memory(gpu):
    b = backend_on(gpu)
    gpu.oom = True
    with pytest.raises(OutOfMemory, match="device 0"):
        b.alloc_frames("device", 0, 4, PAGE)
    with pytest.raises(InvalidArgument, match="device 3 does not exist"):
        b.alloc_frames("device", 3, 4, PAGE)
    with pytest.raises(InvalidArgument, match="'host' or 'device'"):
        b.alloc_frames("gpu", 0, 4, PAGE)


def test_cuda_errors_outside_the_engine_become_dma_errors(gpu):
    b = backend_on(gpu)
    frames = b.alloc_frames("device", 0, 4, PAGE)
    gpu.sticky = 700
    with pytest.raises(DmaError, match="cudaErrorIllegalAddress") as info:
        b.read_frames(frames, np.arange(2))
    assert isinstance(info.value.__cause__, FakeCudaError)
    with pytest.raises(DmaError, match="writing frames"):
        b.write_frames(frames, np.arange(1), np.zeros((1, PAGE), np.uint8))
    with pytest.raises(DmaError, match="checksumming"):
        b.checksum_frames(frames, np.arange(2))


def test_no_usable_driver_is_backend_unavailable(gpu):
    gpu.count_error = 35
    with pytest.raises(BackendUnavailable, match="cudaErrorInsufficientDriver"):
        backend_on(gpu)


# -- copies ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("opts", [GATHER, MEMCPY], ids=["gather", "memcpy"])
def test_engine_copies_match_numpy(gpu, opts):
    b = backend_on(gpu)
    nodes = make_nodes(b, sizes=(96, 96, 64), devices=(-1, 0, 0), seed=3)
    rng = np.random.default_rng(4)
    with engine_for(b, nodes, channels=3, options=opts) as engine:
        for _ in range(4):
            perm = rng.permutation(256)
            n = int(rng.integers(1, 100))
            dst, src = perm[:n], rng.choice(perm[n:], size=n)
            expect = contents(b, nodes)
            expect[dst] = expect[src]
            assert engine.copy(src, dst).wait(timeout=5)
            np.testing.assert_array_equal(contents(b, nodes), expect)
        stats = engine.stats
    if opts is GATHER:
        assert stats.kernel_launches > 0 and stats.memcpy_calls == 0
    else:
        assert stats.memcpy_calls > 0 and stats.kernel_launches == 0
    assert sum(stats.busy_seconds) > 0
    b.close()


def test_grid_is_capped_and_kernels_launch_on_the_channel_stream(gpu, monkeypatch):
    monkeypatch.setattr(cuda_kernels, "MAX_GRID", 8)
    b = backend_on(gpu, rings=False)  # the channels' streams
    nodes = make_nodes(b, sizes=(64, 64), devices=(-1, 0), page=64)
    with engine_for(b, nodes, channels=1, options=GATHER) as engine:
        expect = contents(b, nodes)
        expect[64:] = expect[np.arange(0, 64)[::-1]]
        engine.copy(np.arange(64)[::-1], 64 + np.arange(64)).wait()
        np.testing.assert_array_equal(contents(b, nodes), expect)
        np.testing.assert_array_equal(engine.checksum(np.arange(128)), page_checksums(expect))
    assert all(grid[0] <= 8 for _name, grid, _block in gpu.launches)


def test_checksum_of_pages_not_a_multiple_of_16_uses_the_host(gpu):
    b = backend_on(gpu)
    frames = b.alloc_frames("device", 0, 10, 24)
    data = np.random.default_rng(5).integers(0, 256, (10, 24), dtype=np.uint8)
    b.write_frames(frames, np.arange(10), data)
    launches = len(gpu.launches)
    np.testing.assert_array_equal(b.checksum_frames(frames, np.arange(10)), page_checksums(data))
    assert len(gpu.launches) == launches


@pytest.mark.parametrize("pair", [("host", "device"), ("device", "host"), ("device", "device")])
def test_copy_folios_counts_calls(gpu, pair):
    b = backend_on(gpu)
    src = b.alloc_frames(pair[0], 0, 64, PAGE)
    dst = b.alloc_frames(pair[1], 0, 64, PAGE)
    data = np.random.default_rng(2).integers(0, 256, (64, PAGE), dtype=np.uint8)
    b.write_frames(src, np.arange(64), data)
    s, d, n = np.array([0, 16, 40]), np.array([32, 0, 60]), np.array([16, 1, 4])
    b.copy_folios(src, s, dst, d, n)
    out = b.read_frames(dst, np.arange(64))
    for a, c, k in zip(s, d, n):
        np.testing.assert_array_equal(out[c:c + k], data[a:a + k])
    stats = b.copy_stats
    assert stats["calls"] == 3 and stats["seconds"] > 0 and stats["us_per_call"] > 0


# -- peers ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("peer_capable", [True, False])
def test_copies_between_two_devices(peer_capable):
    gpu = FakeGpu(ndev=2)
    gpu.peer_capable = peer_capable
    b = backend_on(gpu)
    assert b.peers == ({(0, 1), (1, 0)} if peer_capable else set())
    nodes = make_nodes(b, sizes=(32, 64, 64), devices=(-1, 0, 1), seed=9)
    with engine_for(b, nodes, channels=2) as engine:
        expect = contents(b, nodes)
        # contiguous multi-page runs from device 0 to device 1, and scattered pages device 1 -> device 0
        src = np.concatenate([32 + np.arange(20), 96 + np.array([55, 3, 17, 60])])
        dst = np.concatenate([96 + 30 + np.arange(20), 32 + np.array([60, 61, 25, 22])])
        expect[dst] = expect[src]
        engine.copy(src, dst).wait()
        np.testing.assert_array_equal(contents(b, nodes), expect)
    peers = [e for e in gpu.log if e[0] == "memcpyPeerAsync"]
    if not peer_capable:
        # Without peer access no kernel may touch the other device: every cross-device run is a peer memcpy,
        # one per run (a 20-page run is one call), which the driver stages through host memory.
        assert {(e[2], e[4]) for e in peers} == {(1, 0), (0, 1)}
        assert any(e[5] == 20 * PAGE for e in peers)
    # folio copies between devices name both devices
    before = len([e for e in gpu.log if e[0] == "memcpyPeerAsync"])
    b.copy_folios(nodes[2].frames, np.array([0]), nodes[1].frames, np.array([5]), np.array([4]))
    assert len([e for e in gpu.log if e[0] == "memcpyPeerAsync"]) == before + 1
    np.testing.assert_array_equal(b.read_frames(nodes[1].frames, np.arange(5, 9)),
                                  b.read_frames(nodes[2].frames, np.arange(4)))


def test_peer_access_already_enabled_counts_as_enabled():
    gpu = FakeGpu(ndev=2)
    first = backend_on(gpu)
    second = backend_on(gpu)  # the runtime answers "already enabled" for every pair now
    assert first.peers == second.peers == {(0, 1), (1, 0)}


# -- events, fences and timing --------------------------------------------------------------------------------------

def test_wait_with_timeout_returns_false_until_the_stream_runs(gpu):
    b = backend_on(gpu)
    nodes = make_nodes(b)
    with engine_for(b, nodes) as engine:
        gpu.auto = False
        fence = engine.copy(np.arange(10), 64 + np.arange(10))
        assert fence.wait(timeout=0.01) is False
        assert not fence.done
        gpu.run()
        assert fence.done and fence.wait(timeout=0.01) is True


@pytest.mark.parametrize("poll_us", [0, 300_000])
def test_a_wait_polls_the_events_for_the_poll_window_before_it_sleeps(gpu, poll_us):
    b = backend_on(gpu, rings=False)  # the channels' events
    b.poll_us = poll_us
    nodes = make_nodes(b)
    with engine_for(b, nodes) as engine:
        gpu.auto = False
        fence = engine.copy(np.arange(10), 64 + np.arange(10))
        runner = threading.Timer(0.005, gpu.run)  # the copy finishes 5 ms later, well inside the window
        runner.start()
        gpu.log.clear()
        assert fence.wait() is True
        runner.join()
        calls = [entry[0] for entry in gpu.log]
        if poll_us:  # dma_sync_wait(): polled to completion, never slept
            assert "eventQuery" in calls and "eventSynchronize" not in calls
        else:  # no window: straight to the blocking wait
            assert "eventSynchronize" in calls
        np.testing.assert_array_equal(b.read_frames(nodes[1].frames, np.arange(10)),
                                      b.read_frames(nodes[0].frames, np.arange(10)))


def test_sticky_error_surfaces_from_a_timed_wait(gpu):
    # CuPy's Event.done is `eventQuery() == 0`: after a sticky error it stays False, and a timed wait would
    # return False forever. The error must come out instead, named.
    b = backend_on(gpu)
    nodes = make_nodes(b)
    with engine_for(b, nodes) as engine:
        gpu.auto = False
        fence = engine.copy(np.arange(10), 64 + np.arange(10))
        gpu.sticky = 700
        with pytest.raises(DmaError, match="cudaErrorIllegalAddress"):
            fence.wait(timeout=2)
        assert fence.done
        gpu.sticky = 0


def test_failed_wait_synchronizes_every_device_and_keeps_the_first_error():
    gpu = FakeGpu(ndev=2)
    b = backend_on(gpu)
    nodes = make_nodes(b, sizes=(32, 32, 32), devices=(-1, 0, 1))
    gpu.auto = False
    ch = b.open_channels(1)[0]

    def work(dst_node):
        n = nodes[dst_node]
        return ChannelWork(nodes[0].frames, n.frames, "host", "device", -1, n.device, METHOD_MEMCPY,
                           np.array([0]), np.array([0]), np.array([8]))

    completion = ch.submit([work(1), work(2)])
    ends = list(completion._ends)
    assert len(ends) == 2
    gpu.events[ends[0]]["fail"] = 700  # device 0's work failed; device 1's is still queued
    assert completion.wait() is True
    synced = [e[1] for e in gpu.log if e[0] == "eventSynchronize"]
    assert ends[1] in synced, "the second device's event was not waited for after the first failed"
    assert gpu.streams[ch.stream(1).ptr].executed == gpu.streams[ch.stream(1).ptr].enqueued
    assert isinstance(completion.error, DmaError) and "cudaErrorIllegalAddress" in str(completion.error)
    assert gpu.live("events") == 0  # a failed job's events are freed too
    assert ch.busy_seconds == 0  # and its time is not counted
    ch.close()


def test_timing_events_are_bounded_and_start_after_descriptor_work(gpu, monkeypatch):
    b = backend_on(gpu, rings=False)  # the channels' events
    nodes = make_nodes(b)
    engine = engine_for(b, nodes, channels=1, options=GATHER)
    ch = engine._channels[0]
    real_prepare = ch._prepare

    def logged_prepare(dev, w):
        gpu.log.append(("prepare",))
        return real_prepare(dev, w)

    monkeypatch.setattr(ch, "_prepare", logged_prepare)
    gpu.log.clear()
    engine.copy(np.arange(4), 64 + np.arange(4))
    names = [e[0] for e in gpu.log]
    assert names.index("prepare") < names.index("eventRecord")
    gpu.auto = False  # the GPU falls behind: nothing completes unless someone waits for it
    fences = [engine.copy(np.arange(4), 64 + np.arange(4)) for _ in range(3 * TIMING_RING)]
    # never waited on: still the number of live events stays bounded by the ring
    assert gpu.live("events") <= 2 * TIMING_RING + 2
    gpu.run()
    assert ch.busy_seconds > 0
    assert gpu.live("events") == 0
    assert all(f.done for f in fences)
    engine.close()


def test_submit_after_close_raises(gpu):
    b = backend_on(gpu)
    nodes = make_nodes(b)
    ch = b.open_channels(1)[0]
    ch.close()
    w = ChannelWork(nodes[0].frames, nodes[1].frames, "host", "device", -1, 0, METHOD_MEMCPY,
                    np.array([0]), np.array([0]), np.array([1]))
    with pytest.raises(DmaError, match="closed"):
        ch.submit([w])


# -- missing NVRTC and the batched copy ------------------------------------------------------------------------------

def test_missing_nvrtc_warns_once_and_falls_back(gpu):
    gpu.nvrtc_missing = True
    b = backend_on(gpu)
    nodes = make_nodes(b, seed=11)
    with pytest.warns(RuntimeWarning, match="cannot be built.*libnvrtc") as record:
        engine = engine_for(b, nodes, options=GATHER)  # the ring kernel is the first to be built
        expect = contents(b, nodes)
        expect[64:74] = expect[20:30]
        engine.copy(20 + np.arange(10), 64 + np.arange(10)).wait()
        np.testing.assert_array_equal(engine.checksum(np.arange(128)), page_checksums(expect))
        engine.copy(20 + np.arange(10), 64 + np.arange(10)).wait()
    assert len([w for w in record if issubclass(w.category, RuntimeWarning)]) == 1
    with engine:
        np.testing.assert_array_equal(contents(b, nodes), expect)
        assert engine.stats.kernel_launches == 0 and engine.stats.memcpy_calls > 0
    assert not b.kernels_available and "libnvrtc" in b.kernel_error


def test_batch_copy_is_off_by_default_and_needs_a_new_enough_driver(gpu, monkeypatch):
    monkeypatch.delenv(cuda_mod.BATCH_COPY_ENV, raising=False)
    b = backend_on(gpu)
    assert not b.batch_copy_available and "off by default" in b.batch_copy_reason
    gpu.driver = 12040
    b = backend_on(gpu, batch_copy=True)
    assert not b.batch_copy_available and "12.4" in b.batch_copy_reason and "12.8" in b.batch_copy_reason


class _FailingBatch:
    def copy(self, dsts, srcs, sizes, stream_ptr):
        raise DmaError("cuMemcpyBatchAsync failed: CUDA_ERROR_NOT_SUPPORTED")


def test_a_failing_batch_copy_is_switched_off_with_its_reason(gpu):
    b = backend_on(gpu)
    b._batch = _FailingBatch()  # the backend's own state: a batched copy that fails
    nodes = make_nodes(b, seed=12)
    with engine_for(b, nodes) as engine:
        ch = engine._channels[0]
        w = ChannelWork(nodes[0].frames, nodes[1].frames, "host", "device", -1, 0, METHOD_BATCH,
                        np.array([0, 10]), np.array([5, 40]), np.array([3, 2]))
        expect = contents(b, nodes)
        expect[64 + 5:64 + 8] = expect[0:3]
        expect[64 + 40:64 + 42] = expect[10:12]
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            ch.submit([w]).wait()
        assert any("NOT_SUPPORTED" in str(r.message) for r in record)
        np.testing.assert_array_equal(contents(b, nodes), expect)
    assert not b.batch_copy_available and "NOT_SUPPORTED" in b.batch_copy_reason


def test_devices_report(gpu):
    infos = backend_on(gpu).devices()
    assert infos[0]["name"] == "Fake GPU 0" and infos[0]["compute_capability"] == (9, 0)


# -- the whole machine on the stand-in -------------------------------------------------------------------------------

@pytest.fixture
def fake_cuda_machine(monkeypatch):
    """``backend="cuda"`` machines built on the stand-in (``gpu`` is its state)."""
    from dmamig.backends.cuda import status as cuda_probe

    gpu = FakeGpu()
    monkeypatch.setattr(cuda_probe, "cuda_unavailable_reason", lambda: None)
    use_fake_cupy(monkeypatch, gpu)
    return gpu


def test_selftest_passes_on_the_stand_in(fake_cuda_machine):
    from dmamig.bench.selftest import run_selftest

    results = run_selftest("cuda")
    failed = [(name, detail) for name, ok, detail in results if not ok]
    assert not failed
    names = [name for name, _ok, _detail in results]
    assert names[0] == "CUDA kernels built with NVRTC"
    copy_detail = next(d for n, _ok, d in results if n.startswith("copy migration"))
    assert "folio copy calls" in copy_detail and "us per call" in copy_detail
    assert fake_cuda_machine.live("device") == 0  # Machine.close gave every device buffer back


def test_selftest_fails_when_kernels_cannot_be_built(fake_cuda_machine):
    from dmamig.bench.selftest import run_selftest

    fake_cuda_machine.nvrtc_missing = True
    with pytest.warns(RuntimeWarning, match="cannot be built"):
        results = run_selftest("cuda")
    by_name = {name: (ok, detail) for name, ok, detail in results}
    ok, detail = by_name["CUDA kernels built with NVRTC"]
    assert not ok and "libnvrtc" in detail and "dmamig[cuda13]" in detail
    # every migration still works, on the fallbacks
    assert all(ok for name, (ok, _d) in by_name.items() if name != "CUDA kernels built with NVRTC")


def test_machine_migrations_on_the_stand_in(fake_cuda_machine):
    from dmamig import Machine, MigrateMode

    with Machine(host_pages=512, device_pages=512, devices=1, backend="cuda", channels=2) as m:
        assert m.backend_name == "cuda"
        mm = m.address_space()
        data = np.random.default_rng(20).integers(0, 256, 300 * PAGE, dtype=np.uint8)
        addr = mm.mmap(300 * PAGE)
        mm.write(addr, data)
        assert mm.migrate(addr, 300 * PAGE, 1, mode=MigrateMode.SYNC, engine=m.dma).nr_failed == 0
        assert mm.node_of(addr) == 1
        m.dma.inject_errors(1)
        res = mm.migrate(addr, 300 * PAGE, 0, mode=MigrateMode.SYNC, engine=m.dma)
        assert res.nr_failed == 0
        np.testing.assert_array_equal(mm.read(addr, 300 * PAGE), data)
        mm.close()
    assert fake_cuda_machine.live("device") == 0 and fake_cuda_machine.live("events") == 0


def test_a_sticky_error_during_a_dma_copy_leaves_no_fallback_copy_calling_into_the_context(fake_cuda_machine):
    # A failed DMA copy normally falls back to the migrating thread's copy; after a sticky error the context is
    # unusable, so the fallback must fail at once (DmaError, pages restored) instead of calling into it.
    from dmamig import Machine, MigrateMode

    gpu = fake_cuda_machine
    with Machine(host_pages=256, device_pages=256, devices=1, backend="cuda", channels=2) as m:
        mm = m.address_space()
        data = np.random.default_rng(21).integers(0, 256, 64 * PAGE, dtype=np.uint8)
        addr = mm.mmap(64 * PAGE)
        mm.write(addr, data)
        gpu.auto = False  # the DMA copy stays queued...
        timer = threading.Timer(0.05, lambda: setattr(gpu, "sticky", 700))  # ...until the context breaks
        timer.start()
        seen = len(gpu.log)
        with pytest.raises(DmaError, match="unusable after a sticky error"):
            mm.migrate(addr, 64 * PAGE, 1, mode=MigrateMode.SYNC, engine=m.dma)
        timer.join()
        calls = [c[0] for c in gpu.log[seen:]]
        assert not any(name.startswith("memcpy") for name in calls), calls
        assert m.backend.sticky_error(0) is not None
        assert mm.node_of(addr) == 0
        np.testing.assert_array_equal(mm.read(addr, 64 * PAGE), data)
        gpu.sticky = 0  # let close() give everything back
        gpu.auto = True
        mm.close()


# -- the command line where a GPU is present but unusable -------------------------------------------------------------

@pytest.fixture
def unusable_gpu(monkeypatch):
    from dmamig.backends.cuda import status as cuda_probe

    reason = ("insufficient driver: the driver supports CUDA 12.4, cupy was built for CUDA 13.0; update the driver "
              "or install the cupy build for CUDA 12 (dmamig[cuda12])")
    monkeypatch.setattr(cuda_probe, "cuda_status", lambda: cuda_probe.CudaStatus("unusable", reason))
    monkeypatch.setattr(cuda_probe, "cuda_unavailable_reason", lambda: reason)
    monkeypatch.setattr(cuda_mod, "cuda_environment", lambda cp=None: {"cuda_driver": "12.4"})
    return reason


@pytest.mark.parametrize("backend", ["cuda", "auto"])
def test_selftest_fails_loudly_on_an_unusable_gpu(unusable_gpu, capsys, backend):
    from dmamig.cli import main

    assert main(["selftest", "--backend", backend]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "insufficient driver" in out and "12.4" in out


def test_info_reports_an_unusable_gpu_as_an_error(unusable_gpu, capsys):
    import json

    from dmamig.cli import main

    assert main(["info", "--json"]) == 1
    info = json.loads(capsys.readouterr().out)
    assert info["cuda"].startswith("UNUSABLE: insufficient driver")
    assert "insufficient driver" in info["error"] and info["cuda_driver"] == "12.4"


def test_a_submission_racing_close_queues_nothing_and_leaks_nothing(gpu):
    b = backend_on(gpu)
    nodes = make_nodes(b)
    ch = b.open_channels(1)[0]
    work = [ChannelWork(nodes[0].frames, nodes[1].frames, "host", "device", -1, 0, METHOD_MEMCPY,
                        np.array([0]), np.array([0]), np.array([4]))]

    class CloseOnAcquire:
        """The submit lock, taken just after close() set the flag (the window between the two checks)."""

        def __init__(self, lock):
            self.lock = lock

        def __enter__(self):
            ch._closed = True
            return self.lock.__enter__()

        def __exit__(self, *exc):
            return self.lock.__exit__(*exc)

    ch._submit_lock = CloseOnAcquire(ch._submit_lock)
    before = len(gpu.log)
    completion = ch.submit(work)
    assert completion.wait() is True
    assert isinstance(completion.error, DmaError) and "closed" in str(completion.error)
    assert ch._streams == {}, "a stream was made after close"
    assert not [e for e in gpu.log[before:] if e[0] in ("memcpyAsync", "eventRecord")]
    b.close()


# -- the ring lane: one ring_copy launch per submission ----------------------------------------------------------
@pytest.mark.parametrize("channels", [1, 4])
def test_a_submission_is_one_ring_launch_with_no_event_and_no_copy_call(gpu, channels):
    b = backend_on(gpu)
    nodes = make_nodes(b, sizes=(1024, 1024), seed=21)
    with engine_for(b, nodes, channels=channels) as engine:
        rng = np.random.default_rng(22)
        engine.copy(np.array([0]), np.array([1024])).wait()  # the route is found and kept
        expect = contents(b, nodes)
        calls_before, launches_before, events_before = len(gpu.log), len(gpu.launches), gpu.live("events")
        for src, dst in ((rng.permutation(512), 1024 + np.arange(512)),  # scattered 4K pages
                         (512 + np.arange(512), 1536 + np.arange(512))):  # one contiguous 2 MiB run
            expect[dst] = expect[src]
            engine.copy(src, dst).wait()
        calls = gpu.log[calls_before:]
        ring_launches = [x for x in gpu.launches[launches_before:] if x[0] == "ring_copy"]
        assert len(ring_launches) == len(gpu.launches) - launches_before == 2
        assert ring_launches[0][1] == (channels * cuda_mod.ring_lane.BLOCKS_PER_CHANNEL,)
        assert gpu.live("events") == events_before  # no event created, recorded or destroyed
        assert not [c for c in calls if c[0] in ("memcpyAsync", "eventRecord", "eventQuery")]
        np.testing.assert_array_equal(contents(b, nodes), expect)


def test_a_bad_row_on_the_gpu_ring_is_a_status_and_copies_nothing(gpu):
    b = backend_on(gpu)
    nodes = make_nodes(b, seed=23)
    with engine_for(b, nodes, channels=2) as engine:
        engine.copy(np.array([0]), np.array([64])).wait()
        lane = engine._channels[0]._lane
        before = contents(b, nodes)
        ring = lane.rings.rings[0]
        rows = np.array([[nodes[0].frames.ctypes.data, 0x10, 4096, 0]], dtype=np.int64)  # a wild destination
        with lane.rings.lock:
            seq, _ = ring.publish(dma_ring.JOB_EXTERNAL, rows)
        # The ring kernel takes its rows from the ring; an external job's rows are not the device's to read, so
        # publish the bad row into the ring itself.
        first = int(ring.ctl[dma_ring.ROW_TAIL])
        ring.rows[first % ring.row_capacity] = rows[0]
        ring.ctl[dma_ring.ROW_TAIL] = first + 1
        ring.jobs[seq % ring.job_capacity, :3] = (dma_ring.JOB_ROWS, first, 1)
        lane.launch([[seq, 0], [-1, 0]])
        job = lane.job(0, seq)
        assert job.wait(WAIT) and isinstance(job.error, DmaError)
        assert "outside registered memory" in str(job.error)
        np.testing.assert_array_equal(contents(b, nodes), before)
        engine.copy(np.arange(8), 64 + np.arange(8)).wait()  # the lane goes on
        before[64:72] = before[:8]
        np.testing.assert_array_equal(contents(b, nodes), before)


def test_a_stalled_gpu_consumer_bounds_a_timed_wait_and_finishes_when_it_runs(gpu):
    b = backend_on(gpu)
    nodes = make_nodes(b, seed=24)
    with engine_for(b, nodes, channels=2) as engine:
        engine.copy(np.array([0]), np.array([64])).wait()
        expect = contents(b, nodes)
        expect[64:96] = expect[:32]
        gpu.auto = False  # the device does not run what is queued until told to
        fence = engine.copy(np.arange(32), 64 + np.arange(32))
        assert fence.wait(0.05) is False and not fence.done
        gpu.run()
        assert fence.wait(WAIT)
        np.testing.assert_array_equal(contents(b, nodes), expect)
        gpu.auto = True


def test_a_sticky_error_fails_the_lane_its_jobs_and_later_ones_and_close_still_frees(gpu):
    b = backend_on(gpu)
    nodes = make_nodes(b, seed=25)
    host_before = gpu.live("host")
    engine = engine_for(b, nodes, channels=2)
    engine.copy(np.array([0]), np.array([64])).wait()
    gpu.auto = False
    fence = engine.copy(np.arange(16), 64 + np.arange(16))
    gpu.sticky = 700  # an illegal address elsewhere poisoned the context
    with pytest.raises(DmaError, match="illegal memory access"):
        fence.wait(WAIT)
    with pytest.raises(DmaError):
        engine.copy(np.arange(16), 80 + np.arange(16)).wait(WAIT)
    engine.close()  # bounded, and never raises after a sticky error
    b.close()
    assert gpu.live("host") == host_before  # the lane's pinned rings went with it


# -- the persistent consumer (dma_engine="persistent"): one resident ring_persist kernel per device ---------------
def persistent_backend(gpu: FakeGpu, poll_us: float = 1e6) -> CudaBackend:
    """A backend whose lanes run the persistent consumer; ``poll_us`` is also the consumer's idle window."""
    b = backend_on(gpu, dma_engine="persistent")
    b.poll_us = poll_us
    return b


def persist_launches(gpu: FakeGpu) -> list:
    return [x for x in gpu.launches if x[0] == "ring_persist"]


def wait_until(cond, what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not happen within {WAIT} s")
        time.sleep(1e-4)


@pytest.mark.parametrize("channels", [1, 4])
def test_the_persistent_consumer_copies_every_submission_from_one_cooperative_launch(gpu, channels):
    b = persistent_backend(gpu)
    nodes = make_nodes(b, sizes=(1024, 1024), seed=31)
    with engine_for(b, nodes, channels=channels) as engine:
        lane = engine._channels[0]._lane
        assert type(lane).__name__ == "PersistentRingLane" and lane.blocks == 32  # min(32, 132 multiprocessors)
        rng = np.random.default_rng(32)
        expect = contents(b, nodes)
        calls_before = len(gpu.log)
        for _ in range(3):
            for src, dst in ((rng.permutation(512), 1024 + rng.permutation(1024)[:512]),  # scattered 4K pages
                             (512 + np.arange(512), 1536 + np.arange(512))):  # one contiguous 2 MiB run
                dst = np.sort(dst)
                expect[dst] = expect[src]
                engine.copy(src, dst).wait(WAIT)
        assert not [c for c in gpu.log[calls_before:] if c[0] in ("memcpyAsync", "eventRecord", "eventQuery")]
        np.testing.assert_array_equal(contents(b, nodes), expect)
        launches = persist_launches(gpu)
        assert len(launches) == 1 and launches[0][1] == (32,)  # resident: one launch served all six
        assert lane.generation == 1 and lane.running == 1
        assert all(lane.seen(c) == lane.rings.rings[c].tail for c in range(channels))
    assert not any(s.resident is not None and s.resident.is_alive() for s in gpu.streams.values())
    b.close()


def test_the_persistent_consumer_exits_when_idle_and_the_next_submission_relaunches_it(gpu):
    b = persistent_backend(gpu, poll_us=200)  # a 200 us idle window
    nodes = make_nodes(b, sizes=(256, 256), seed=33)
    with engine_for(b, nodes, channels=2) as engine:
        lane = engine._channels[0]._lane
        expect = contents(b, nodes)
        engine.copy(np.arange(8), 256 + np.arange(8)).wait(WAIT)
        expect[256:264] = expect[:8]
        wait_until(lambda: lane.running == 0, "the idle consumer's exit")
        assert all(int(r.ctl[dma_ring.IDLE]) == lane.generation == 1 for r in lane.rings.rings)
        engine.copy(np.arange(8, 16), 264 + np.arange(8)).wait(WAIT)
        expect[264:272] = expect[8:16]
        assert lane.generation == 2 and gpu.persist_runs == [1, 2]
        # Submissions around the idle window's end, where the consumer's exit races the doorbell: none is lost.
        rng = np.random.default_rng(34)
        for i in range(40):
            time.sleep(float(rng.uniform(0, 400e-6)))
            src = rng.choice(256, 16, replace=False)
            dst = 256 + np.sort(rng.choice(256, 16, replace=False))
            expect[dst] = expect[src]
            assert engine.copy(src, dst).wait(WAIT), f"submission {i} was not served"
        np.testing.assert_array_equal(contents(b, nodes), expect)
        assert 2 <= lane.launches <= 42 and lane.launches == lane.generation
    b.close()


def test_a_bad_row_on_the_persistent_consumer_is_a_status_and_the_lane_goes_on(gpu):
    b = persistent_backend(gpu)
    nodes = make_nodes(b, seed=35)
    with engine_for(b, nodes, channels=1) as engine:
        engine.copy(np.array([0]), np.array([64])).wait(WAIT)
        before = contents(b, nodes)
        gpu.bad_row = True  # the next job's first row points outside registered memory
        with pytest.raises(DmaError, match="outside registered memory"):
            engine.copy(np.arange(8), 64 + np.arange(8)).wait(WAIT)
        np.testing.assert_array_equal(contents(b, nodes), before)  # nothing of the job was copied
        lane = engine._channels[0]._lane
        assert lane.failure is None and lane.launches == 1
        engine.copy(np.arange(8), 64 + np.arange(8)).wait(WAIT)
        before[64:72] = before[:8]
        np.testing.assert_array_equal(contents(b, nodes), before)
    b.close()


def test_a_stalled_persistent_consumer_fails_its_jobs_and_close_is_bounded(gpu):
    b = persistent_backend(gpu)
    nodes = make_nodes(b, seed=36)
    engine = engine_for(b, nodes, channels=2)
    engine.copy(np.array([0]), np.array([64])).wait(WAIT)
    lane = engine._channels[0]._lane
    gpu.consumer_stalled = True  # the heartbeat stops
    fence = engine.copy(np.arange(16), 64 + np.arange(16))
    assert fence.wait(0.05) is False  # a timed wait returns in time
    lane.stall_s = 0.2
    t0 = time.monotonic()
    with pytest.raises(DmaError, match="stalled"):
        fence.wait(WAIT)
    assert time.monotonic() - t0 < 5.0
    assert lane.failure is not None and not engine._channels[0].takes_rows
    lane.close_timeout = 0.3
    t0 = time.monotonic()
    engine.close()  # bounded, and never raises
    assert time.monotonic() - t0 < 5.0
    assert "did not stop" in str(lane.failure) or "stalled" in str(lane.failure)
    gpu.consumer_stalled = False  # the consumer wakes, sees the stop word and exits
    wait_until(lambda: lane.running == 0, "the stopped consumer's exit")
    b.close()


def test_a_sticky_error_fails_the_persistent_lane_and_close_still_frees(gpu):
    b = persistent_backend(gpu)
    nodes = make_nodes(b, seed=37)
    host_before, device_before = gpu.live("host"), gpu.live("device")
    engine = engine_for(b, nodes, channels=2)
    engine.copy(np.array([0]), np.array([64])).wait(WAIT)
    gpu.sticky = 700  # an illegal address elsewhere poisoned the context: the consumer dies
    with pytest.raises(DmaError, match="illegal memory access"):
        engine.copy(np.arange(16), 64 + np.arange(16)).wait(WAIT)
    with pytest.raises(DmaError):
        engine.copy(np.arange(16), 80 + np.arange(16)).wait(WAIT)
    engine.close()  # bounded, never raises: the stream reports the error at once
    assert gpu.live("host") == host_before and gpu.live("device") == device_before
    b.close()


def test_close_stops_the_persistent_consumer_and_frees_its_memory(gpu):
    b = persistent_backend(gpu)
    nodes = make_nodes(b, seed=38)
    host_before, device_before = gpu.live("host"), gpu.live("device")
    engine = engine_for(b, nodes, channels=2)
    engine.copy(np.arange(32), 64 + np.arange(32)).wait(WAIT)
    lane = engine._channels[0]._lane
    assert lane.running == 1
    t0 = time.monotonic()
    engine.close()
    assert time.monotonic() - t0 < 5.0 and lane.running == 0 and lane.failure is None
    assert gpu.live("host") == host_before and gpu.live("device") == device_before
    b.close()


def test_a_queued_persistent_consumer_bounds_a_timed_wait_and_serves_once_it_runs(gpu):
    b = persistent_backend(gpu)
    nodes = make_nodes(b, seed=39)
    with engine_for(b, nodes, channels=2) as engine:
        expect = contents(b, nodes)
        gpu.auto = False  # the launch stays queued until the device is told to run
        fence = engine.copy(np.arange(32), 64 + np.arange(32))
        expect[64:96] = expect[:32]
        assert fence.wait(0.05) is False and not fence.done
        gpu.auto = True
        gpu.run()
        assert fence.wait(WAIT)
        np.testing.assert_array_equal(contents(b, nodes), expect)
    b.close()


@pytest.mark.parametrize("attr, value, reason", [(17, 1, "kernel execution timeout"),
                                                  (95, 0, "cooperative launch")])
def test_the_persistent_consumer_is_refused_where_a_device_makes_it_unsafe(gpu, attr, value, reason):
    gpu.attrs[attr] = value
    with pytest.raises(BackendUnavailable, match=f"dma_engine='persistent' is refused: .*{reason}"):
        backend_on(gpu, dma_engine="persistent")
    backend_on(gpu).close()  # the default needs none of it


def test_the_persistent_consumer_is_refused_under_a_running_mps_daemon(gpu, monkeypatch, tmp_path):
    monkeypatch.setenv("CUDA_MPS_PIPE_DIRECTORY", str(tmp_path))
    backend_on(gpu, dma_engine="persistent").close()  # a pipe directory without a daemon's control pipe
    (tmp_path / "control").touch()
    with pytest.raises(BackendUnavailable, match="MPS control daemon is running"):
        backend_on(gpu, dma_engine="persistent")


def test_dma_engine_values_and_where_they_are_refused(gpu):
    from dmamig.backends.cpu.backend import CpuBackend

    with pytest.raises(InvalidArgument, match="dma_engine must be one of 'launch', 'persistent'"):
        backend_on(gpu, dma_engine="resident")
    with pytest.raises(BackendUnavailable, match="rings=False"):
        backend_on(gpu, rings=False, dma_engine="persistent")
    b = backend_on(gpu)
    assert b.dma_engine == "launch"
    b.set_dma_engine("persistent")
    assert b.dma_engine == "persistent"
    b.close()
    cpu = CpuBackend()
    cpu.set_dma_engine("launch")
    with pytest.raises(InvalidArgument, match="already are persistent consumers"):
        cpu.set_dma_engine("persistent")


def test_the_persistent_kernel_and_its_lane_agree_on_every_word():
    import re

    from dmamig.backends.cuda import persistent_lane

    text = cuda_kernels.kernel_source("ring_persist.cu")
    defs = dict(re.findall(r"^#define (\w+) (\S+)$", text, re.MULTILINE))
    assert int(defs["S_ROUND"]) + 2 * int(defs["ROUND_WORDS"]) == persistent_lane.SCRATCH_WORDS
    assert (int(defs["H_STOP"]), int(defs["H_RUNNING"]), int(defs["H_SEEN"])) == \
        (persistent_lane.H_STOP, persistent_lane.H_RUNNING, persistent_lane.H_SEEN)
    for name in ("TAIL", "HEAD", "ROW_HEAD", "BUSY_NS", "HEARTBEAT", "IDLE"):
        assert int(defs[name]) == getattr(dma_ring, name), name
    for name in ("JOB_ROWS", "STATUS_OK", "STATUS_BAD_ROW", "STATUS_FAILED"):
        assert int(defs[name].rstrip("L")) == getattr(dma_ring, name), name
    assert int(defs["MAX_CHANNELS"]) == cuda_mod.ring_lane.MAX_RING_CHANNELS
    assert int(defs["MAX_REGIONS"]) == dma_ring.MAX_REGIONS
    assert int(defs["R_BAD"]) + int(defs["MAX_CHANNELS"]) <= int(defs["ROUND_WORDS"])


def test_long_migrations_run_fused_batches_on_the_stand_in(fake_cuda_machine):
    """A migration of several batches publishes each batch from the fused call (the lane's launch per submission
    included) and waits outside the locks, as on the CPU backend."""
    import dmamig.migrate.batch_loops as batch_loops
    from dmamig import Machine

    if batch_loops.fused_batch is None:
        pytest.skip(f"fused batches cannot run here: {batch_loops.FUSED_ERROR}")
    codes = []
    real = batch_loops.fused_batch

    def fused(*args):
        got = real(*args)
        codes.append(got[0])
        return got

    with pytest.MonkeyPatch.context() as mp, \
            Machine(host_pages=2048, device_pages=2048, devices=1, backend="cuda", channels=2) as m:
        mp.setattr(batch_loops, "fused_batch", fused)
        mm = m.address_space()
        n = 3 * 512
        data = np.random.default_rng(21).integers(0, 256, n * PAGE, dtype=np.uint8)
        addr = mm.mmap(n * PAGE)
        mm.write(addr, data)
        for node in (1, 0, 1):
            res = mm.migrate(addr, n * PAGE, node, engine=m.dma)
            assert res.ok and res.stats.nr_no_copy == n and res.stats.nr_dma_fallback == 0
        assert codes.count(batch_loops.FUSED_SUBMITTED) >= 6  # the first call may open the lane the general way
        np.testing.assert_array_equal(mm.read(addr, n * PAGE), data)
        mm.close()
    assert fake_cuda_machine.live("device") == 0 and fake_cuda_machine.live("events") == 0
