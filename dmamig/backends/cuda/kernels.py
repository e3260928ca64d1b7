"""The CUDA kernels: their sources in ``kernels/*.cu`` (shipped as ``dmamig.kernels``), their launch shape,
NVRTC compilation without a GPU, and the build status that ``dmamig info`` shows and the compile check that
``python -m dmamig.backends.cuda`` runs.

Each backend builds and caches the kernels it loads (:meth:`~dmamig.backends.cuda.CudaBackend.kernel`).
"""

from __future__ import annotations

import importlib.resources
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ...errors import DmaError, InvalidArgument
from . import runtime

__all__ = ["KERNEL_FILES", "compile_kernel_nvrtc", "kernel_build_status", "kernel_source", "launch",
           "nvrtc_check"]

#: The CUDA sources shipped in ``dmamig.kernels`` and the ``extern "C"`` kernels each must provide.
KERNEL_FILES: dict[str, tuple[str, ...]] = {
    "page_copy.cu": ("page_gather_copy",),
    "page_checksum.cu": ("page_checksum",),
    "page_access.cu": ("page_access_read", "page_access_write"),
    "ring_copy.cu": ("ring_copy",),
    "ring_persist.cu": ("ring_persist",),
}
#: Threads per block of both kernels (a multiple of 32, as the checksum's warp reduction requires).
BLOCK_THREADS = 256
#: Upper bound on the grid; both kernels stride over pages, so larger submissions still work.
MAX_GRID = 1 << 16


def launch(kernel: Any, stream: Any, pages: int, args: tuple) -> None:
    """Launch ``kernel`` on ``stream`` over ``pages`` pages: blocks of :data:`BLOCK_THREADS`, at most
    :data:`MAX_GRID` of them (every kernel strides over the pages)."""
    with stream:
        kernel((min(pages, MAX_GRID),), (BLOCK_THREADS,), args)


def kernel_source(name: str) -> str:
    """Text of a CUDA source file shipped in ``dmamig.kernels`` (works from a wheel or a source tree).

    Parameters
    ----------
    name : str
        File name, one of :data:`KERNEL_FILES`.
    """
    try:
        return importlib.resources.files("dmamig.kernels").joinpath(name).read_text(encoding="utf-8")
    except ModuleNotFoundError:
        # Running from a source checkout on sys.path (not installed): kernels/ sits beside the package.
        return (Path(__file__).resolve().parents[3] / "kernels" / name).read_text(encoding="utf-8")


def compile_kernel_nvrtc(fname: str, arch: int, cp: Any = None) -> bytes:
    """Compile one kernel file with NVRTC for ``sm_<arch>``, as CuPy does, and return the cubin; needs no GPU.

    Parameters
    ----------
    fname : str
        A key of :data:`KERNEL_FILES`.
    arch : int
        Compute capability as an integer, e.g. ``90`` for sm_90.
    cp : module, optional
        The cupy module (imported when omitted).

    Raises
    ------
    InvalidArgument
        ``fname`` is not a shipped kernel file.
    DmaError
        NVRTC rejected the source; the message carries NVRTC's log.
    """
    if fname not in KERNEL_FILES:
        raise InvalidArgument(f"fname must be one of {sorted(KERNEL_FILES)}, got {fname!r}")
    cp = cp if cp is not None else runtime.import_cupy()
    nvrtc = cp.cuda.nvrtc
    prog = nvrtc.createProgram(kernel_source(fname), fname, (), ())
    try:
        try:
            nvrtc.compileProgram(prog, (f"-arch=sm_{int(arch)}", "-std=c++14"))
        except Exception as exc:
            raise DmaError(f"NVRTC could not compile {fname} for sm_{arch}: {exc}\n"
                           f"{nvrtc.getProgramLog(prog)}") from exc
        return bytes(nvrtc.getCUBIN(prog))
    finally:
        nvrtc.destroyProgram(prog)


def kernel_build_status() -> dict[str, str]:
    """Build every kernel now and report, per ``.cu`` file, ``"compiled OK"``, ``"error: ..."``, or, without a
    usable GPU, whether NVRTC compiles it for sm_90 (for ``dmamig info``)."""
    from .status import cuda_unavailable_reason

    reason = cuda_unavailable_reason()
    status: dict[str, str] = {}
    for fname, funcs in KERNEL_FILES.items():
        try:
            code = kernel_source(fname)
        except Exception as exc:
            status[fname] = f"error: cannot read the source: {exc}"
            continue
        if reason is not None:
            nv = runtime.nvrtc_status()
            if not nv["found"]:
                status[fname] = f"not built: CUDA is not usable here ({reason})"
                continue
            try:
                compile_kernel_nvrtc(fname, 90)
                status[fname] = f"NVRTC {nv['version']} compiles it for sm_90; not loaded: {reason}"
            except Exception as exc:
                status[fname] = f"error: NVRTC {nv['version']} cannot compile it: {type(exc).__name__}: {exc}"
            continue
        try:
            cp = runtime.import_cupy()
            module = cp.RawModule(code=code)
            for func in funcs:
                module.get_function(func)
            status[fname] = "compiled OK"
        except Exception as exc:
            status[fname] = f"error: {type(exc).__name__}: {exc}"
    return status


def nvrtc_check(archs: Iterable[int] = (80, 90)) -> int:
    """Compile every kernel through NVRTC for each ``sm_<arch>`` and print one line each (no GPU needed).

    For CI beside the ``nvcc`` check: ``python -m dmamig.backends.cuda``. Returns the exit code: 0 when all
    compiled, 1 when one failed, 0 with a note when cupy or NVRTC is not installed (nothing to check).
    """
    st = runtime.nvrtc_status()
    if not st["found"]:
        print(f"NVRTC compile check skipped: {st['detail']}")
        return 0
    failed = 0
    for fname in KERNEL_FILES:
        for arch in archs:
            try:
                cubin = compile_kernel_nvrtc(fname, arch)
                print(f"nvrtc {st['version']} sm_{arch} {fname}: OK ({len(cubin)} bytes of cubin)")
            except Exception as exc:
                failed += 1
                print(f"nvrtc {st['version']} sm_{arch} {fname}: FAILED: {exc}")
    return 1 if failed else 0
