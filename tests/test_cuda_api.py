"""Wherever cupy imports (with or without a GPU): every CuPy name the CUDA backend uses exists with the expected
signature, the CUDA status codes the backend interprets have the expected names, the stand-in of
``test_cuda_fake.py`` mirrors those signatures, and both kernels compile through NVRTC for sm_80 and sm_90 as
CuPy would compile them (NVRTC needs no GPU)."""

from __future__ import annotations

import inspect
import re

import pytest

cupy = pytest.importorskip("cupy", reason="cupy is not installed (install dmamig[cuda12] or dmamig[cuda13])")

from dmamig.backends import cuda as cuda_mod  # noqa: E402
from dmamig.backends.cuda import codes as cuda_codes  # noqa: E402

#: runtime function -> parameter names, as CuPy's docstrings spell them.
RUNTIME_SIGNATURES = {
    "getDeviceCount": [],
    "driverGetVersion": [],
    "runtimeGetVersion": [],
    "getDeviceProperties": ["device"],
    "deviceCanAccessPeer": ["device", "peerDevice"],
    "deviceEnablePeerAccess": ["peerDevice"],
    "malloc": ["size"],
    "free": ["ptr"],
    "hostAlloc": ["size", "flags"],
    "freeHost": ["ptr"],
    "memcpyAsync": ["dst", "src", "size", "kind", "stream"],
    "memcpyPeerAsync": ["dst", "dstDevice", "src", "srcDevice", "size", "stream"],
    "memsetAsync": ["ptr", "value", "size", "stream"],
    "streamWaitEvent": ["stream", "event", "flags"],
    "eventCreateWithFlags": ["flags"],
    "eventDestroy": ["event"],
    "eventRecord": ["event", "stream"],
    "eventQuery": ["event"],
    "eventSynchronize": ["event"],
    "eventElapsedTime": ["start", "end"],
}

NVRTC_FUNCTIONS = {
    "getVersion": [],
    "createProgram": ["src", "name", "headers", "include_names"],
    "compileProgram": ["prog", "options"],
    "getCUBIN": ["prog"],
    "getProgramLog": ["prog"],
    "destroyProgram": ["prog"],
}


def doc_params(fn) -> list[str]:
    """Parameter names from the first docstring line of a Cython function, e.g. ``f(intptr_t a, int b)``."""
    first = (fn.__doc__ or "").strip().splitlines()[0]
    m = re.match(r"[\w.]+\((.*)\)", first)
    assert m, f"{fn.__name__}: no signature line in its docstring: {first!r}"
    params = [p.strip() for p in m.group(1).split(",") if p.strip()]
    names = [re.split(r"[\s=]", p.split("=")[0].strip())[-1] for p in params]
    return [n for n in names if n not in ("self", "*")]


@pytest.mark.parametrize("name", sorted(RUNTIME_SIGNATURES))
def test_runtime_function_signatures(name):
    fn = getattr(cupy.cuda.runtime, name, None)
    assert fn is not None, f"cupy.cuda.runtime.{name} is missing"
    assert doc_params(fn) == RUNTIME_SIGNATURES[name]


@pytest.mark.parametrize("name", sorted(NVRTC_FUNCTIONS))
def test_nvrtc_function_signatures(name):
    fn = getattr(cupy.cuda.nvrtc, name, None)
    assert fn is not None, f"cupy.cuda.nvrtc.{name} is missing"
    assert doc_params(fn) == NVRTC_FUNCTIONS[name]


def test_constants_match_cupy():
    rt = cupy.cuda.runtime
    assert rt.hostAllocPortable == cuda_codes.HOST_ALLOC_PORTABLE
    assert rt.hostAllocMapped == cuda_codes.HOST_ALLOC_MAPPED
    assert rt.memcpyHostToDevice == cuda_codes.MEMCPY_HOST_TO_DEVICE
    assert rt.memcpyDeviceToHost == cuda_codes.MEMCPY_DEVICE_TO_HOST
    assert rt.memcpyDefault == cuda_codes.MEMCPY_DEFAULT
    assert rt.eventBlockingSync == cuda_codes.EVENT_BLOCKING_SYNC
    assert rt.eventDisableTiming == cuda_codes.EVENT_DISABLE_TIMING
    assert rt.streamNonBlocking == 1


@pytest.mark.parametrize("code, name", [
    (cuda_codes.CUDA_ERROR_NOT_READY, "cudaErrorNotReady"),
    (cuda_codes.CUDA_ERROR_MEMORY_ALLOCATION, "cudaErrorMemoryAllocation"),
    (cuda_codes.CUDA_ERROR_INSUFFICIENT_DRIVER, "cudaErrorInsufficientDriver"),
    (cuda_codes.CUDA_ERROR_NO_DEVICE, "cudaErrorNoDevice"),
    (cuda_codes.CUDA_ERROR_PEER_ACCESS_ALREADY_ENABLED, "cudaErrorPeerAccessAlreadyEnabled"),
    (700, "cudaErrorIllegalAddress"),
])
def test_status_codes_have_the_expected_names(code, name):
    err = cupy.cuda.runtime.CUDARuntimeError(code)
    assert err.status == code and str(err).startswith(name + ":")
    assert cuda_mod.cuda_error_text(code, cupy.cuda.runtime).startswith(name + ":")


def test_classes_and_calls_the_backend_uses():
    cuda = cupy.cuda
    assert "non_blocking" in cuda.Stream.__init__.__doc__
    # (``ptr`` is set per instance; making a stream needs a GPU.)
    stream_attrs = ("synchronize", "__enter__", "__exit__")
    assert all(hasattr(cuda.Stream, a) for a in stream_attrs)
    assert all(hasattr(cuda.Device, a) for a in ("__enter__", "__exit__", "id"))
    assert hasattr(cuda.nvtx, "RangePush") and hasattr(cuda.nvtx, "RangePop")
    raw = (cupy.RawModule.__doc__ or "").splitlines()[0]
    assert "code" in raw and "options" in raw
    assert "grid, block, args" in (cupy.RawKernel.__call__.__doc__ or "")
    assert callable(cupy.is_available)
    assert issubclass(cupy.cuda.memory.OutOfMemoryError, MemoryError)


def test_the_stand_in_mirrors_cupy():
    from test_cuda_fake import FakeRuntime

    for name, params in RUNTIME_SIGNATURES.items():
        fake = getattr(FakeRuntime, name)
        n = len(inspect.signature(fake).parameters) - 1  # less self
        assert n == len(params), f"FakeRuntime.{name} takes {n} arguments, CuPy's takes {len(params)}"


# -- NVRTC, without a GPU ---------------------------------------------------------------------------------------------

def _nvrtc_or_skip() -> None:
    st = cuda_mod.nvrtc_status()
    if not st["found"]:
        pytest.skip(f"NVRTC is not installed: {st['detail']}")


@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("fname", sorted(cuda_mod.KERNEL_FILES))
def test_kernels_compile_with_nvrtc(fname, arch):
    _nvrtc_or_skip()
    cubin = cuda_mod.compile_kernel_nvrtc(fname, arch)
    assert cubin[:4] == b"\x7fELF"
    for func in cuda_mod.KERNEL_FILES[fname]:
        assert func.encode() in cubin


def test_nvrtc_rejects_unknown_files():
    from dmamig.errors import InvalidArgument

    with pytest.raises(InvalidArgument, match="fname must be one of"):
        cuda_mod.compile_kernel_nvrtc("nope.cu", 90)


def test_environment_report_without_a_gpu():
    env = cuda_mod.cuda_environment()
    assert env["cupy"] == cupy.__version__
    assert re.fullmatch(r"\d+\.\d+", env["cuda_runtime"])
    assert env["cuda_driver"] == "none" or re.fullmatch(r"\d+\.\d+", env["cuda_driver"])
    st = cuda_mod.nvrtc_status()
    assert env["nvrtc"].startswith(st["version"] if st["found"] else "not found")


def test_nvrtc_check_entry_point(capsys):
    _nvrtc_or_skip()
    assert cuda_mod.nvrtc_check((90,)) == 0
    out = capsys.readouterr().out
    assert all(f"sm_90 {fname}: OK" in out for fname in cuda_mod.KERNEL_FILES)
