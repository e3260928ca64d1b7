"""``dma_engine``: what consumes the DMA rings (``"launch"``, one kernel launch per submission; ``"persistent"``, a
resident consumer kernel per device), from ``Machine`` and ``dmamig bench`` to results.json, on the CuPy stand-in
and on the CPU backend that refuses the experiment."""

from __future__ import annotations

import json

import numpy as np
import pytest
from support import check_results_schema
from test_cuda_fake import FakeGpu, use_fake_cupy

from dmamig import Machine, MigrateMode
from dmamig.bench.results import NotComparable, check_comparable
from dmamig.bench.settings import default_settings
from dmamig.cli import main
from dmamig.errors import BackendUnavailable, InvalidArgument

PAGE = 4096


@pytest.fixture
def fake_gpu(monkeypatch) -> FakeGpu:
    """``backend="cuda"`` machines built on the stand-in."""
    from dmamig.backends.cuda import status as cuda_probe

    gpu = FakeGpu()
    monkeypatch.setattr(cuda_probe, "cuda_unavailable_reason", lambda: None)
    use_fake_cupy(monkeypatch, gpu)
    return gpu


def test_a_machine_migrates_through_the_persistent_consumer(fake_gpu):
    with Machine(host_pages=512, device_pages=512, devices=1, backend="cuda", channels=2,
                 dma_engine="persistent") as m:
        assert m.backend.dma_engine == "persistent"
        mm = m.address_space()
        data = np.random.default_rng(40).integers(0, 256, 300 * PAGE, dtype=np.uint8)
        addr = mm.mmap(300 * PAGE)
        mm.write(addr, data)
        assert mm.migrate(addr, 300 * PAGE, 1, mode=MigrateMode.SYNC, engine=m.dma).nr_failed == 0
        assert mm.node_of(addr) == 1
        assert mm.migrate(addr, 300 * PAGE, 0, mode=MigrateMode.SYNC, engine=m.dma).nr_failed == 0
        np.testing.assert_array_equal(mm.read(addr, 300 * PAGE), data)
        mm.close()
        assert [x[0] for x in fake_gpu.launches].count("ring_persist") >= 1
        assert "ring_copy" not in [x[0] for x in fake_gpu.launches]
    assert fake_gpu.live("device") == 0  # host frames go with their last reference, not with close


def test_a_machine_refuses_the_persistent_consumer_with_the_reason_and_leaks_nothing(fake_gpu):
    fake_gpu.attrs[17] = 1  # a display watchdog
    with pytest.raises(BackendUnavailable, match="kernel execution timeout"):
        Machine(host_pages=64, device_pages=64, devices=1, backend="cuda", dma_engine="persistent")
    assert fake_gpu.live("device") == 0 and fake_gpu.live("host") == 0
    with pytest.raises(InvalidArgument, match="dma_engine must be one of"):
        Machine(host_pages=64, device_pages=64, devices=1, backend="cuda", dma_engine="fast")


def test_the_cpu_backend_refuses_the_persistent_consumer():
    with pytest.raises(InvalidArgument, match="CUDA backend setting"):
        Machine(host_pages=64, device_pages=64, devices=1, backend="cpu", dma_engine="persistent")
    with Machine(host_pages=64, device_pages=64, devices=1, backend="cpu", dma_engine="launch") as m:
        assert m.backend_name == "cpu"


def test_the_setting_is_recorded_in_results_json(tmp_path, capsys):
    out = tmp_path / "r"
    assert main(["bench", "--quick", "--backend", "cpu", "--sizes", "4k", "--total", "1M", "--channels", "1",
                 "--no-engine", "--no-access", "--no-plots", "--out", str(out)]) == 0
    doc = json.loads((out / "results.json").read_text())
    check_results_schema(doc)
    assert doc["settings"]["dma_engine"] is None  # the cpu backend's channels are worker threads
    cuda = default_settings("cuda", gpus=1)
    assert cuda.to_json()["dma_engine"] == "launch"
    persistent = cuda.__class__(**{**cuda.__dict__, "dma_engine": "persistent"})
    assert persistent.to_json()["dma_engine"] == "persistent" and persistent.machine_dma_engine() == "persistent"
    doc["settings"].update(backend="cuda", dma_engine="persistent")
    check_results_schema(doc)


def test_the_cpu_bench_refuses_the_persistent_consumer_as_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--quick", "--backend", "cpu", "--dma-engine", "persistent"])
    assert exc.value.code == 2 and "--dma-engine persistent is a cuda setting" in capsys.readouterr().err


def test_runs_of_different_consumers_are_not_compared():
    base = {"settings": {"backend": "cuda", "page_size": 4096, "total_bytes": 1 << 30, "quick": False,
                         "dma_engine": "launch"}}
    new = {"settings": {**base["settings"], "dma_engine": "persistent"}}
    with pytest.raises(NotComparable, match="dma_engine"):
        check_comparable(new, base)
    cpu = {"settings": {**base["settings"], "backend": "cpu", "dma_engine": None}}
    check_comparable(cpu, base, other_machine=True)  # null: not the cpu backend's setting
