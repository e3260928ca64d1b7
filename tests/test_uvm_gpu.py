"""Device-side access on a real GPU: the page_access kernels against their numpy reference, and faults
serviced into real device memory (run only where a CUDA GPU is usable)."""

from __future__ import annotations

import numpy as np
import pytest
from support import check_access_frames_against_cpu

from dmamig import DeviceAccessor, Machine, UvmOptions

pytestmark = pytest.mark.gpu
PAGE = 4096


@pytest.fixture(scope="module")
def cuda(gpu_required):
    from dmamig.backends.cuda import CudaBackend

    backend = CudaBackend()
    yield backend
    backend.close()


@pytest.mark.parametrize("page", [PAGE, 64 << 10])
def test_page_access_kernels_match_the_reference(cuda, page):
    check_access_frames_against_cpu(cuda, 300, 200, page)
    assert cuda.kernel(0, "page_access.cu", "page_access_read") is not None


@pytest.mark.parametrize("memory", ["coherent", "private"])
@pytest.mark.parametrize("no_copy", [True, False])
def test_faults_through_real_device_memory_oversubscribed(gpu_required, no_copy, memory):
    with Machine(host_pages=4096, device_pages=1024, devices=1, backend="cuda", channels=2,
                 device_memory=memory) as m:
        mm = m.address_space()
        n = 2048  # twice the device
        a = mm.mmap(n * PAGE)
        data = np.random.default_rng(1).integers(0, 256, n * PAGE, dtype=np.uint8)
        mm.write(a, data)
        acc = DeviceAccessor(mm, 1, UvmOptions(no_copy=no_copy))
        assert (acc.read(a, n * PAGE) == data).all()
        data[::PAGE] = 5
        acc.write_pages(a + np.arange(n) * PAGE, data.reshape(n, PAGE))
        assert acc.stats.pages_evicted > 0
        assert (mm.read(a, n * PAGE) == data).all()
        mm.close()
        assert [nd.free_pages for nd in m.nodes] == [4096, 1024]


def test_read_duplicates_in_real_device_memory(gpu_required):
    with Machine(host_pages=4096, device_pages=1024, devices=1, backend="cuda", channels=2) as m:
        mm = m.address_space()
        n = 1500
        a = mm.mmap(n * PAGE)
        data = np.random.default_rng(2).integers(0, 256, n * PAGE, dtype=np.uint8)
        mm.write(a, data)
        acc = DeviceAccessor(mm, 1, UvmOptions(read_duplication=True))
        assert (acc.read(a, n * PAGE) == data).all()
        assert (mm.nodes_of(a, n * PAGE) == 0).all() and acc.stats.pages_read_duplicated == n
        mm.write(a, np.zeros(PAGE, np.uint8))
        data[:PAGE] = 0
        assert (acc.read(a, n * PAGE) == data).all()
        mm.close()
        assert [nd.free_pages for nd in m.nodes] == [4096, 1024]
