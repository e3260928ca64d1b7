"""The CUDA backend's pure helpers (event codes, error mapping, the timing ring, run spans) and the usability
classification of a CUDA probe; none of these needs cupy or a GPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dmamig.backends import REQUIRE_GPU_ENV
from dmamig.backends.cuda import (
    PendingRing,
    collect_first_error,
    cuda_error_kind,
    cuda_error_text,
    event_finished,
    map_cuda_error,
)
from dmamig.backends.cuda.memory import run_spans
from dmamig.backends.cuda.status import classify_cuda, cuda_status
from dmamig.errors import BackendUnavailable, DmaError, InvalidArgument, OutOfMemory


class StatusError(RuntimeError):
    """An exception carrying a CUDA status, as CuPy's ``CUDARuntimeError`` does."""

    def __init__(self, status: int, text: str = "cudaError"):
        self.status = status
        super().__init__(f"{text} (status {status})")


class NamingRuntime:
    """Only the error class, as ``cupy.cuda.runtime`` offers it."""

    CUDARuntimeError = StatusError


# -- event queries -------------------------------------------------------------------------------------------------

def test_event_query_codes():
    assert event_finished(0) is True
    assert event_finished(600) is False
    with pytest.raises(DmaError, match="code 700") as info:
        event_finished(700)
    assert info.value.cuda_status == 700
    with pytest.raises(DmaError, match=r"cudaError \(status 719\)"):
        event_finished(719, NamingRuntime())


def test_error_text_uses_the_runtime_names_when_it_can():
    assert cuda_error_text(2) == "CUDA error code 2"
    assert cuda_error_text(2, NamingRuntime()).startswith("cudaError (status 2)")
    assert cuda_error_text(5, object()) == "CUDA error code 5"


def test_collect_first_error_calls_everything():
    called = []

    def ok(i):
        return lambda: called.append(i)

    def bad(i):
        def f():
            called.append(i)
            raise StatusError(700 + i)
        return f

    err = collect_first_error([ok(0), bad(1), ok(2), bad(3), ok(4)])
    assert called == [0, 1, 2, 3, 4]
    assert isinstance(err, StatusError) and err.status == 701
    assert collect_first_error([ok(5)]) is None


# -- error mapping ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("exc, kind, cls", [
    (MemoryError("Out of memory allocating 1,024 bytes"), "oom", OutOfMemory),
    (StatusError(2), "oom", OutOfMemory),
    (StatusError(35), "unavailable", BackendUnavailable),
    (StatusError(100), "unavailable", BackendUnavailable),
    (StatusError(700), "error", DmaError),
    (RuntimeError("something else"), "error", DmaError),
])
def test_cuda_errors_map_to_the_project_tree(exc, kind, cls):
    assert cuda_error_kind(exc) == kind
    mapped = map_cuda_error(exc, "reading frames on device 0")
    assert isinstance(mapped, cls) and "reading frames on device 0" in str(mapped)
    assert type(exc).__name__ in str(mapped)


def test_project_errors_pass_through_unchanged():
    err = DmaError("already ours")
    assert map_cuda_error(err, "x") is err


# -- timing ring, run spans --------------------------------------------------------------------------------------------

def test_pending_ring_bounds_and_pops():
    ring = PendingRing(3)
    assert [ring.push(i) for i in range(3)] == [[], [], []]
    assert ring.push(3) == [0]
    assert len(ring) == 3
    assert ring.pop_ready(lambda i: i % 2 == 1) == [1, 3]
    assert ring.drain() == [2] and len(ring) == 0
    with pytest.raises(InvalidArgument, match="capacity must be >= 1"):
        PendingRing(0)


def test_run_spans():
    first, pos, length = run_spans(np.array([4, 5, 6, 9, 2, 3, 10]))
    assert first.tolist() == [4, 9, 2, 10]
    assert pos.tolist() == [0, 3, 4, 6]
    assert length.tolist() == [3, 1, 2, 1]
    assert all(a.size == 0 for a in run_spans(np.array([], dtype=np.int64)))


# -- usability classification ------------------------------------------------------------------------------------------

def test_no_cupy_is_absent():
    st = classify_cuda(import_error="No module named 'cupy'", import_missing=True, gpu_hint=True)
    assert st.state == "absent" and "dmamig[cuda12]" in st.reason


def test_broken_cupy_on_a_gpu_machine_is_unusable():
    st = classify_cuda(import_error="libcudart.so.13: cannot open", gpu_hint=True)
    assert st.state == "unusable" and "libcudart" in st.reason
    assert classify_cuda(import_error="libcudart.so.13: cannot open").state == "absent"


def test_no_driver_is_absent_but_an_old_driver_is_unusable():
    text = "CUDARuntimeError: cudaErrorInsufficientDriver"
    # What cupy-cuda13x reports on a machine without any NVIDIA driver: driver version 0.
    st = classify_cuda(driver_version=0, runtime_version=13000, count_error=(35, text))
    assert st.state == "absent" and "no CUDA driver" in st.reason
    st = classify_cuda(driver_version=12040, runtime_version=13000, count_error=(35, text))
    assert st.state == "unusable"
    assert "insufficient driver" in st.reason and "12.4" in st.reason and "13.0" in st.reason
    assert "dmamig[cuda12]" in st.reason
    st = classify_cuda(driver_version=0, runtime_version=13000, count_error=(35, text), gpu_hint=True)
    assert st.state == "unusable"


def test_other_start_failures_are_unusable_and_no_device_is_absent():
    assert classify_cuda(driver_version=13000, count_error=(999, "cudaErrorUnknown")).state == "unusable"
    assert classify_cuda(driver_version=13000, count_error=(100, "cudaErrorNoDevice")).state == "absent"
    assert classify_cuda(driver_version=13000, device_count=0).state == "absent"
    assert classify_cuda(driver_version=13000, device_count=2, available=False).state == "unusable"
    ok = classify_cuda(driver_version=13000, runtime_version=13000, device_count=1)
    assert ok.usable and ok.reason is None


def test_this_machine_is_classified():
    st = cuda_status()
    assert st.state in ("usable", "absent", "unusable")
    assert (st.reason is None) == st.usable


# -- GPU tests fail, not skip, when a GPU is required ----------------------------------------------------------------

def _pytest_gpu(env_extra: dict[str, str]) -> subprocess.CompletedProcess:
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, **env_extra}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu",
                           "tests/test_cuda_backend.py::test_kernels_compile"],
                          cwd=root, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.skipif(cuda_status().state != "absent", reason="checks the no-GPU path")
def test_gpu_tests_skip_without_a_gpu_and_fail_when_one_is_required():
    skipped = _pytest_gpu({REQUIRE_GPU_ENV: "0"})
    assert skipped.returncode == 0, skipped.stdout + skipped.stderr
    assert "skipped" in skipped.stdout
    required = _pytest_gpu({REQUIRE_GPU_ENV: "1"})
    assert required.returncode == 1, required.stdout + required.stderr
    assert "CUDA is not usable" in required.stdout


def test_nvrtc_check_without_nvrtc_is_a_note_not_a_failure(monkeypatch, capsys):
    from dmamig.backends import cuda as cuda_mod
    from dmamig.backends.cuda import runtime as cuda_runtime

    monkeypatch.setattr(cuda_runtime, "nvrtc_status", lambda cp=None: {"found": False, "version": None,
                                                                     "detail": "cupy is not installed"})
    assert cuda_mod.nvrtc_check() == 0
    assert "skipped: cupy is not installed" in capsys.readouterr().out
