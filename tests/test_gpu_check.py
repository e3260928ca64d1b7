"""``benchmarks/gpu_check.py`` runs where no GPU is: the CUDA figures are skipped with the reason, the DMA
submission figures and the summary files are written, and steps past the budget are skipped, not run."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.py"


@pytest.fixture
def gpu_check(monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPT.parent))  # as when run as a script: its folder is on the path
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.setattr(mod, "CALLS", 4)
    return mod


def test_a_check_within_no_budget_writes_its_figures_and_skips_its_steps(gpu_check, tmp_path):
    out = tmp_path / "check"
    assert gpu_check.main(["--out", str(out), "--budget", "1", "--backend", "cpu"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    calls = summary["cuda_calls_us"]
    assert "skipped" in calls or calls["kernel_launch"] > 0
    subs = summary["submission_us"]
    for name in ("4k", "2m"):
        for ch in (1, 4):
            assert subs[f"{name}_{ch}ch_submit"] > 0
            assert subs[f"{name}_{ch}ch_to_completion"] >= subs[f"{name}_{ch}ch_submit"] * 0.5
    assert summary["backend"] == "cpu" and "errors" not in summary
    assert subs["4k_1ch_numpy_allocations"] == 0 and subs["2m_4ch_compiled"] > 0
    assert set(summary["steps"]) == {"info", "bench", "bench_persistent", "bench_rfc", "bench_cpu_baseline",
                                     "gpu_tests", "bound", "submit_cpu"}
    assert "CUDA setting" in summary["steps"].pop("bench_persistent")["skipped"]
    assert "--copy-baseline cpu" in summary["steps"].pop("bench_cpu_baseline")["skipped"]
    assert all("budget spent" in s["skipped"] for s in summary["steps"].values())
    assert "persistent consumers" in summary["persistent_us"]["skipped"]
    assert "# GPU check" in (out / "summary.md").read_text()


def test_a_used_folder_is_refused(gpu_check, tmp_path):
    (tmp_path / "old.txt").write_text("x")
    with pytest.raises(SystemExit) as exc:
        gpu_check.main(["--out", str(tmp_path)])
    assert exc.value.code == 2


def test_the_persistent_consumer_figures_on_the_cuda_stand_in(gpu_check, monkeypatch):
    """The job-start probes and the submissions with dma_engine="persistent", on the CuPy stand-in (a thread
    plays the consumer, so the figures are the stand-in's, not a GPU's)."""
    monkeypatch.syspath_prepend(str(SCRIPT.parent.parent / "tests"))
    from test_cuda_fake import FakeGpu, use_fake_cupy

    from dmamig.backends.cuda import status as cuda_probe

    gpu = FakeGpu()
    monkeypatch.setattr(cuda_probe, "cuda_unavailable_reason", lambda: None)
    use_fake_cupy(monkeypatch, gpu)
    result = {"backend": "cuda"}
    gpu_check.run_persistent(result, "cuda")
    out = result["persistent_us"]
    assert "skipped" not in out, out
    assert out["job_start"] > 0 and out["job_start_probes_missed"] == 0 and out["launches"] == 1
    assert out["job_start_target"] == 3.0 and isinstance(out["job_start_met"], bool)
    for name in ("4k", "2m"):
        for ch in (1, 4):
            assert out[f"{name}_{ch}ch_to_completion"] > 0
    gpu.attrs[95] = 0  # no cooperative launch: refused, and the reason is recorded
    refused: dict = {"backend": "cuda"}
    gpu_check.run_persistent(refused, "cuda")
    assert "cooperative launch" in refused["persistent_us"]["skipped"]
