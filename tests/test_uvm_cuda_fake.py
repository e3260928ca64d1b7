"""Device-side access on the CUDA backend's own code, driven through the CuPy stand-in of
``test_cuda_fake.py`` (every machine): the page_access kernels' launches and address arithmetic, and a
whole oversubscribed device access on a ``backend="cuda"`` machine."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
from support import check_access_frames_against_cpu
from test_cuda_fake import FakeCupy, FakeGpu, FakeKernel, use_fake_cupy

from dmamig.backends.cuda import CudaBackend

PAGE = 4096
_fake_call = FakeKernel.__call__


def _access_call(self, grid, block, args, **kwargs):
    """The page_access kernels on the stand-in: their numpy reference at the real addresses."""
    if not self.name.startswith("page_access_"):
        return _fake_call(self, grid, block, args, **kwargs)
    s = self.gpu.tls.streams[-1]
    self.gpu.launches.append((self.name, grid, block))
    a, buf, n, page = (int(x) for x in args)
    self.gpu.check(a, 8 * n)
    self.gpu.check(buf, n * page)

    def run():
        addrs = np.ctypeslib.as_array((ctypes.c_uint64 * n).from_address(a)).tolist()
        for i, p in enumerate(addrs):
            self.gpu.check(p, page)
            src, dst = (p, buf + i * page) if self.name == "page_access_read" else (buf + i * page, p)
            ctypes.memmove(dst, src, page)

    s.enqueue(run)


@pytest.fixture
def gpu(monkeypatch) -> FakeGpu:
    monkeypatch.setattr(FakeKernel, "__call__", _access_call)
    return FakeGpu()


def test_access_frames_matches_the_reference(gpu):
    b = CudaBackend(cupy=FakeCupy(gpu))
    try:
        check_access_frames_against_cpu(b, 40, 25, PAGE)
        names = [name for name, _g, _b in gpu.launches]
        assert names.count("page_access_read") == 1 and names.count("page_access_write") == 1
    finally:
        b.close()


def test_oversubscribed_device_access_on_a_cuda_machine(gpu, monkeypatch):
    from dmamig import DeviceAccessor, Machine, UvmOptions
    from dmamig.backends.cuda import status as cuda_probe

    monkeypatch.setattr(cuda_probe, "cuda_unavailable_reason", lambda: None)
    use_fake_cupy(monkeypatch, gpu)
    with Machine(host_pages=4096, device_pages=1024, devices=1, backend="cuda", channels=2) as m:
        mm = m.address_space()
        n = 2048  # twice the device
        a = mm.mmap(n * PAGE)
        data = np.random.default_rng(1).integers(0, 256, n * PAGE, dtype=np.uint8)
        mm.write(a, data)
        acc = DeviceAccessor(mm, 1, UvmOptions(fault_batch_size=256))
        np.testing.assert_array_equal(acc.read(a, n * PAGE), data)
        data[::PAGE] = 3
        acc.write_pages(a + np.arange(n) * PAGE, data.reshape(n, PAGE))
        assert acc.stats.pages_evicted > 0
        np.testing.assert_array_equal(mm.read(a, n * PAGE), data)
        assert any(name == "page_access_read" for name, _g, _b in gpu.launches)
        mm.close()
        assert [nd.free_pages for nd in m.nodes] == [4096, 1024]
    assert gpu.live("device") == 0
