"""The ``cpu`` copy baseline on CUDA: device frames in pinned, host-mapped memory
(``Machine(device_frames="host-mapped")``) that the migrating CPU copies with its memcpy, and
``dmamig bench --copy-baseline cpu`` that runs copy mode on them, from the backend to results.json; on the CuPy
stand-in, on the CPU backend that refuses the setting, and on a real card where there is one."""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest
from rich.console import Console
from support import check_results_schema
from test_cuda_fake import FakeGpu, backend_on, use_fake_cupy

from dmamig import Machine, MigrateMode
from dmamig.backends.cuda import CudaBackend, DeviceFrames
from dmamig.bench.naming import COPY_BASELINES, check_copy_baseline, copy_baseline_tag
from dmamig.bench.report import render_tables
from dmamig.bench.results import NotComparable, check_comparable
from dmamig.bench.settings import default_settings
from dmamig.cli import main
from dmamig.dma import page_checksums
from dmamig.errors import InvalidArgument

PAGE = 4096
#: The runtime calls that would mean a copy went through the driver instead of the CPU's memcpy.
DRIVER_COPIES = ("memcpyAsync", "memcpyPeerAsync")


@pytest.fixture
def gpu() -> FakeGpu:
    """The stand-in's state, for backends made on it directly."""
    return FakeGpu()


@pytest.fixture(params=[1])
def fake_gpu(monkeypatch, request) -> FakeGpu:
    """``backend="cuda"`` machines built on the stand-in (of ``request.param`` devices)."""
    from dmamig.backends.cuda import status as cuda_probe

    gpu = FakeGpu(ndev=request.param)
    monkeypatch.setattr(cuda_probe, "cuda_unavailable_reason", lambda: None)
    use_fake_cupy(monkeypatch, gpu)
    return gpu


def driver_copies(gpu: FakeGpu, since: int) -> list[str]:
    return [c[0] for c in gpu.log[since:] if c[0] in DRIVER_COPIES]


# -- the backend: host-mapped device frames ---------------------------------------------------------------------

def test_host_mapped_device_frames_are_pinned_numpy_frames(gpu):
    b = backend_on(gpu)
    frames = b.alloc_frames("host-mapped", 0, 16, PAGE)
    assert isinstance(frames, np.ndarray) and not isinstance(frames, DeviceFrames)
    assert frames.shape == (16, PAGE) and frames.dtype == np.uint8 and not frames.any()
    # From cudaHostAlloc (the stand-in's host allocations), not cudaMalloc: the device reads it through UVA.
    assert gpu.live("host") == 1 and gpu.live("device") == 0
    assert gpu.check(int(frames.ctypes.data), frames.nbytes) == -1
    with pytest.raises(InvalidArgument, match="device 3 does not exist"):
        b.alloc_frames("host-mapped", 3, 16, PAGE)
    with pytest.raises(InvalidArgument, match="or 'host-mapped' .*, got 'mapped'"):
        b.alloc_frames("mapped", 0, 16, PAGE)
    b.close()
    del frames
    assert gpu.live("host") == 0  # freed with the last reference, as host frames are


def test_copy_folios_copies_host_mapped_frames_with_the_cpu(gpu):
    b = backend_on(gpu)
    host = b.alloc_frames("host", -1, 32, PAGE)
    mapped = b.alloc_frames("host-mapped", 0, 32, PAGE)
    host[:] = np.random.default_rng(1).integers(0, 256, host.shape, dtype=np.uint8)
    since = len(gpu.log)
    b.copy_folios(host, np.array([0, 4, 20]), mapped, np.array([8, 1, 30]), np.array([4, 2, 1]))
    assert driver_copies(gpu, since) == []
    assert b.copy_stats["calls"] == 0  # the count is of driver calls; the CPU's memcpy makes none
    np.testing.assert_array_equal(mapped[8:12], host[0:4])
    np.testing.assert_array_equal(mapped[1:3], host[4:6])
    np.testing.assert_array_equal(mapped[30], host[20])
    # The device still sees them (checksums run the kernel on the mapped address).
    np.testing.assert_array_equal(b.checksum_frames(mapped, np.arange(32)), page_checksums(mapped))
    b.close()


# -- the machine setting ----------------------------------------------------------------------------------------

def _migrate_both_ways(m: Machine, gpu: FakeGpu, engine=None, npages: int = 300) -> tuple[list[str], np.ndarray]:
    mm = m.address_space()
    data = np.random.default_rng(7).integers(0, 256, npages * PAGE, dtype=np.uint8)
    addr = mm.mmap(npages * PAGE)
    mm.write(addr, data)
    since = len(gpu.log)
    assert mm.migrate(addr, npages * PAGE, 1, mode=MigrateMode.SYNC, engine=engine).nr_failed == 0
    assert mm.node_of(addr) == 1
    pfns = mm.pfns_of(addr, npages * PAGE)
    node = m.nodes[1]
    on_device = np.asarray(m.backend.read_frames(node.frames, pfns - node.base_pfn)).reshape(-1)
    np.testing.assert_array_equal(on_device, data)  # the bytes are in the device node's frames
    assert mm.migrate(addr, npages * PAGE, 0, mode=MigrateMode.SYNC, engine=engine).nr_failed == 0
    assert mm.node_of(addr) == 0
    calls = driver_copies(gpu, since)
    np.testing.assert_array_equal(mm.read(addr, npages * PAGE), data)
    mm.close()
    return calls, data


def test_copy_mode_on_host_mapped_device_frames_is_the_cpus_memcpy(fake_gpu):
    with Machine(host_pages=512, device_pages=512, devices=1, backend="cuda", channels=2,
                 device_frames="host-mapped") as m:
        assert m.device_frames == "host-mapped" and m.nodes[1].kind == "device" and m.nodes[1].device == 0
        assert isinstance(m.nodes[1].frames, np.ndarray)
        calls, _ = _migrate_both_ways(m, fake_gpu)
        assert calls == []  # host->device and back without a driver copy
        assert m.backend.copy_stats["calls"] == 0
        # No-copy on the same frames still goes through the DMA engine and moves the right bytes.
        _migrate_both_ways(m, fake_gpu, engine=m.dma)
        assert m.dma.stats.bytes > 0


def test_copy_mode_on_device_memory_stays_one_driver_copy_per_folio(fake_gpu):
    with Machine(host_pages=512, device_pages=512, devices=1, backend="cuda") as m:
        assert m.device_frames == "device" and isinstance(m.nodes[1].frames, DeviceFrames)
        calls, _ = _migrate_both_ways(m, fake_gpu)
        assert calls and m.backend.copy_stats["calls"] == 2 * 300


@pytest.mark.parametrize("fake_gpu", [2], indirect=True)
def test_two_devices_of_host_mapped_frames_copy_between_them_with_the_cpu(fake_gpu):
    with Machine(host_pages=256, device_pages=256, devices=2, backend="cuda", device_frames="host-mapped") as m:
        mm = m.address_space()
        data = np.random.default_rng(9).integers(0, 256, 100 * PAGE, dtype=np.uint8)
        addr = mm.mmap(100 * PAGE)
        mm.write(addr, data)
        assert mm.migrate(addr, 100 * PAGE, 1, mode=MigrateMode.SYNC).nr_failed == 0
        since = len(fake_gpu.log)
        assert mm.migrate(addr, 100 * PAGE, 2, mode=MigrateMode.SYNC).nr_failed == 0
        assert mm.node_of(addr) == 2 and driver_copies(fake_gpu, since) == []
        np.testing.assert_array_equal(mm.read(addr, 100 * PAGE), data)
        mm.close()


def test_bad_device_frames_are_refused_with_what_is_allowed(fake_gpu):
    with pytest.raises(InvalidArgument, match="device_frames must be one of 'device', 'host-mapped', got 'host'"):
        Machine(host_pages=64, device_pages=64, devices=1, backend="cuda", device_frames="host")
    assert fake_gpu.live("device") == 0 and fake_gpu.live("host") == 0


def test_the_cpu_backend_refuses_host_mapped_device_frames():
    with pytest.raises(InvalidArgument, match="CUDA backend setting.*already are host memory"):
        Machine(host_pages=64, device_pages=64, devices=1, backend="cpu", device_frames="host-mapped")
    with Machine(host_pages=64, device_pages=64, devices=1, backend="cpu", device_frames="device") as m:
        assert m.device_frames == "device"


# -- the bench: --copy-baseline ---------------------------------------------------------------------------------

def _report(doc: dict) -> str:
    """The report's tables of ``doc``, on a console wide enough that no cell wraps."""
    console = Console(width=500, file=io.StringIO(), color_system=None)
    render_tables(doc, console)
    return console.file.getvalue()


def _tiny_bench(out, *extra: str) -> int:
    return main(["bench", "--quick", "--backend", "cuda", "--sizes", "4k", "--total", "1M", "--channels", "1",
                 "--no-engine", "--no-access", "--no-files", "--no-pairs", "--no-plots", "--faithful-only",
                 "--out", str(out), *extra])


def test_the_cpu_baseline_on_cuda_copies_on_host_mapped_frames_and_is_recorded(fake_gpu, tmp_path, capsys,
                                                                               monkeypatch):
    kinds: list[str] = []
    real = CudaBackend.alloc_frames

    def spy(self, kind, device, nr_pages, page_size):
        kinds.append(kind)
        return real(self, kind, device, nr_pages, page_size)

    monkeypatch.setattr(CudaBackend, "alloc_frames", spy)
    out = tmp_path / "r"
    assert _tiny_bench(out, "--copy-baseline", "cpu") == 0
    capsys.readouterr()
    # The copy group's machine had host-mapped device frames, the no-copy group's device memory.
    assert kinds.count("host-mapped") == 1 and kinds.count("device") == 1
    doc = json.loads((out / "results.json").read_text())
    check_results_schema(doc)
    assert doc["settings"]["copy_baseline"] == "cpu"
    assert doc["settings"]["copy_device_frames"] == "host-mapped"
    mig = [s for s in doc["scenarios"] if s["kind"] == "migrate"]
    assert {s["mode"] for s in mig} == {"copy", "nocopy"} and {s["copy_baseline"] for s in mig} == {"cpu"}
    assert all(s["verified"] for s in mig)
    with open(out / "results.csv", newline="") as fh:
        assert {row["copy_baseline"] for row in csv.DictReader(fh) if row["kind"] == "migrate"} == {"cpu"}
    printed = _report(doc)
    assert "copy baseline cpu, proxy:" in printed and "a proxy where the card is on PCIe" in printed
    assert "faithful copy (cpu, proxy)" in printed


def test_the_default_cuda_baseline_stays_sync_dma_on_device_memory(fake_gpu, tmp_path, capsys):
    out = tmp_path / "r"
    assert _tiny_bench(out) == 0
    doc = json.loads((out / "results.json").read_text())
    check_results_schema(doc)
    assert doc["settings"]["copy_baseline"] == "sync-dma"
    assert doc["settings"]["copy_device_frames"] == "device"
    assert {s["copy_baseline"] for s in doc["scenarios"] if s["kind"] == "migrate"} == {"sync-dma"}
    assert "proxy" not in _report(doc) and "faithful copy (sync-dma)" in _report(doc)


def test_bench_settings_give_host_mapped_frames_to_copy_mode_only():
    cuda = default_settings("cuda", gpus=1)
    cpu_base = cuda.__class__(**{**cuda.__dict__, "copy_baseline_name": "cpu"})
    assert cpu_base.copy_baseline() == "cpu" and cpu_base.to_json()["copy_baseline"] == "cpu"
    assert cpu_base.machine_device_frames("copy") == "host-mapped"
    assert cpu_base.machine_device_frames("nocopy") is None
    assert cuda.machine_device_frames("copy") is None and cuda.to_json()["copy_device_frames"] == "device"
    cpu = default_settings("cpu")
    assert cpu.machine_device_frames("copy") is None and cpu.to_json()["copy_device_frames"] is None


def test_the_cpu_bench_refuses_the_sync_dma_baseline_as_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--quick", "--backend", "cpu", "--copy-baseline", "sync-dma"])
    err = " ".join(capsys.readouterr().err.split())
    assert exc.value.code == 2
    assert "--copy-baseline: copy baseline 'sync-dma' cannot run on the cpu backend, which measures 'cpu'" in err
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--quick", "--backend", "cpu", "--copy-baseline", "gpu"])
    assert exc.value.code == 2 and "invalid choice: 'gpu'" in capsys.readouterr().err


def test_copy_baseline_names_are_checked_and_tagged():
    assert check_copy_baseline("cpu", "cuda") == "cpu" and check_copy_baseline("sync-dma", "cuda") == "sync-dma"
    assert check_copy_baseline("cpu", "cpu") == "cpu"
    with pytest.raises(InvalidArgument, match="must be one of 'cpu', 'sync-dma', got 'memcpy'"):
        check_copy_baseline("memcpy", "cuda")
    assert copy_baseline_tag("cpu", "cuda") == "cpu, proxy"
    assert copy_baseline_tag("cpu", "cpu") == "cpu" and copy_baseline_tag("sync-dma", "cuda") == "sync-dma"
    assert "proxy" in COPY_BASELINES["cpu"] and "PCIe" in COPY_BASELINES["cpu"]


def test_runs_of_different_copy_baselines_are_not_compared():
    base = {"settings": {"backend": "cuda", "page_size": 4096, "total_bytes": 1 << 30, "quick": False,
                         "copy_baseline": "sync-dma"}}
    new = {"settings": {**base["settings"], "copy_baseline": "cpu"}}
    with pytest.raises(NotComparable, match="copy_baseline 'cpu' vs baseline 'sync-dma'"):
        check_comparable(new, base)
    check_comparable(base, base)
    cpu = {"settings": {**base["settings"], "backend": "cpu", "copy_baseline": "cpu"}}
    check_comparable(cpu, base, other_machine=True)  # backends differ: the baselines differ by nature


# -- a real card --------------------------------------------------------------------------------------------------

@pytest.mark.gpu
def test_host_mapped_device_frames_on_a_card():
    """On a GPU: the CPU copies into host-mapped device frames, the device's checksum kernel reads them through
    their mapped address, and no-copy DMA into real device memory on the same machine is unchanged."""
    npages = 1024
    with Machine(host_pages=2048, device_pages=2048, devices=1, backend="cuda", device_frames="host-mapped") as m:
        assert isinstance(m.nodes[1].frames, np.ndarray)
        mm = m.address_space()
        data = np.random.default_rng(11).integers(0, 256, npages * PAGE, dtype=np.uint8)
        addr = mm.mmap(npages * PAGE)
        mm.write(addr, data)
        ref = np.asarray(m.dma.checksum(mm.pfns_of(addr, npages * PAGE)))
        calls = m.backend.copy_stats["calls"]
        assert mm.migrate(addr, npages * PAGE, 1, mode=MigrateMode.SYNC).nr_failed == 0
        assert m.backend.copy_stats["calls"] == calls  # the CPU copied: no driver call
        np.testing.assert_array_equal(np.asarray(m.dma.checksum(mm.pfns_of(addr, npages * PAGE))), ref)
        assert mm.migrate(addr, npages * PAGE, 0, mode=MigrateMode.SYNC).nr_failed == 0
        np.testing.assert_array_equal(mm.read(addr, npages * PAGE), data)
        mm.close()
