"""CuPy and NVRTC: the only place that imports cupy (:func:`import_cupy` to drive it, :func:`probe_cuda` to see
whether CUDA can run here), NVRTC's preload and status, and what ``dmamig info`` shows about the CUDA driver,
CuPy's CUDA and NVRTC.

``cupy`` is imported only when a backend object is made, a kernel is built or CUDA is probed, so importing
this package (and :mod:`dmamig`) works on machines without cupy or without a GPU. The other modules call
:func:`import_cupy` (and :func:`nvrtc_status`) through this module's namespace (``runtime.import_cupy()``), so that
replacing it here, as the test suite's CuPy stand-in does, reaches every caller.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
from pathlib import Path
from typing import Any

from ...errors import BackendUnavailable
from .batch import BATCH_COPY_ENV, batch_copy_requested
from .codes import cuda_version_text

__all__ = ["cuda_environment", "import_cupy", "nvrtc_status", "preload_nvrtc", "probe_cuda"]

# NVRTC wheels on the package index, per CUDA major version: (distribution, library file name).
_NVRTC_WHEELS = {12: ("nvidia-cuda-nvrtc-cu12", "libnvrtc.so.12"), 13: ("nvidia-cuda-nvrtc", "libnvrtc.so.13")}


def import_cupy() -> Any:
    try:
        import cupy
    except Exception as exc:
        raise BackendUnavailable(f"the CUDA backend needs cupy, which failed to import: {exc}; install "
                                 f"dmamig[cuda12] or dmamig[cuda13]") from exc
    preload_nvrtc(cupy)
    return cupy


def _nvrtc_wheel_library(major: int) -> Path | None:
    """Path of ``libnvrtc.so.<major>`` inside the installed NVRTC wheel, if that wheel is installed."""
    dist_name, lib = _NVRTC_WHEELS.get(int(major), (None, None))
    if dist_name is None:
        return None
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in dist.files or ():
        if Path(str(f)).name == lib:
            path = Path(str(dist.locate_file(f)))
            return path if path.is_file() else None
    return None


_preloaded: dict[int, str] = {}


def preload_nvrtc(cp: Any) -> str | None:
    """Load the NVRTC wheel's library before CuPy needs it, where CuPy would not find it by itself.

    CuPy 14 finds NVRTC wheels on its own (through ``cuda-pathfinder``). CuPy 13 only asks the dynamic loader
    for ``libnvrtc.so.<major>``, which does not search ``site-packages``; loading the wheel's copy first (with
    its builtins library, globally) makes that lookup succeed. Does nothing on CuPy 14+, without the wheel, or
    when the library is already loaded.

    Returns
    -------
    str or None
        The library path that was loaded, or ``None``.
    """
    try:
        major = int(str(getattr(cp, "__version__", "0")).split(".")[0])
        cuda_major = int(cp.cuda.runtime.runtimeGetVersion()) // 1000
    except Exception:
        return None
    if major >= 14 or cuda_major in _preloaded:
        return _preloaded.get(cuda_major)
    path = _nvrtc_wheel_library(cuda_major)
    if path is None:
        return None
    try:
        # libnvrtc opens its builtins library by name at compile time: load that (globally) first.
        for builtins in sorted(path.parent.glob(f"libnvrtc-builtins.so.{cuda_major}*")):
            if ".alt." not in builtins.name:
                ctypes.CDLL(str(builtins), mode=ctypes.RTLD_GLOBAL)
                break
        ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
    except OSError:
        return None
    _preloaded[cuda_major] = str(path)
    return str(path)


def nvrtc_status(cp: Any = None) -> dict[str, Any]:
    """Whether NVRTC (the runtime compiler the kernels need) can be loaded; needs no GPU.

    Returns
    -------
    dict
        ``found`` (bool), ``version`` (``"13.0"`` or ``None``) and ``detail`` (where it came from, or why not).
    """
    try:
        cp = cp if cp is not None else import_cupy()
    except BackendUnavailable as exc:
        return {"found": False, "version": None, "detail": str(exc)}
    try:
        major, minor = cp.cuda.nvrtc.getVersion()
    except Exception as exc:
        try:
            cuda_major = int(cp.cuda.runtime.runtimeGetVersion()) // 1000
        except Exception:
            cuda_major = 0
        if cuda_major in _NVRTC_WHEELS:
            fix = (f"install dmamig[cuda{cuda_major}] (it brings the {_NVRTC_WHEELS[cuda_major][0]} wheel) or a "
                   f"CUDA toolkit")
        else:  # only CUDA 12 and 13 have an extra: older runtimes need a toolkit's NVRTC
            fix = f"install the NVRTC of a CUDA {cuda_major or ''} toolkit (or move to CUDA 12/13: dmamig[cuda13])"
        return {"found": False, "version": None, "detail": f"{type(exc).__name__}: {exc}; {fix}"}
    loaded = _preloaded.get(int(major))
    if loaded is None:
        try:
            # CuPy 14 loads NVRTC through cuda-pathfinder; asking it again only reports where from.
            from cuda import pathfinder

            loaded = str(pathfinder.load_nvidia_dynamic_lib("nvrtc").abs_path)
        except Exception:
            loaded = None
    return {"found": True, "version": f"{major}.{minor}",
            "detail": f"loaded from {loaded}" if loaded else "loaded by cupy"}


def cuda_environment(cp: Any = None) -> dict[str, Any]:
    """What ``dmamig info`` shows about CUDA: driver, CuPy's CUDA, NVRTC; works without a GPU.

    Returns
    -------
    dict
        ``cuda_driver`` (the CUDA version the driver supports, ``"none"`` without a driver),
        ``cuda_runtime`` (the CUDA version CuPy was built for), ``nvrtc`` (version, or why it is missing) and
        ``batch_copy`` (whether channels use ``cuMemcpyBatchAsync``). Only ``cupy`` when cupy is missing.
    """
    try:
        cp = cp if cp is not None else import_cupy()
    except BackendUnavailable as exc:
        return {"cupy": f"not usable: {exc}"}
    rt = cp.cuda.runtime
    out: dict[str, Any] = {"cupy": str(getattr(cp, "__version__", "?"))}
    for key, fn in (("cuda_driver", "driverGetVersion"), ("cuda_runtime", "runtimeGetVersion")):
        try:
            out[key] = cuda_version_text(getattr(rt, fn)())
        except Exception as exc:
            out[key] = f"unknown ({type(exc).__name__}: {exc})"
    nv = nvrtc_status(cp)
    out["nvrtc"] = f"{nv['version']} ({nv['detail']})" if nv["found"] else f"not found: {nv['detail']}"
    out["batch_copy"] = ("on (DMAMIG_CUDA_BATCH_COPY=1)" if batch_copy_requested(None)
                         else f"off: not used unless {BATCH_COPY_ENV}=1 (no calibration shows it faster yet)")
    return out


def probe_cuda() -> dict[str, Any]:
    """What ``import cupy`` and the CUDA driver report here, as keyword arguments of
    :func:`~dmamig.backends.cuda.status.classify_cuda` (all but ``gpu_hint``); never raises.

    Imports cupy as it is (no NVRTC preload): a backend is not made here.
    """
    try:
        import cupy
    except ImportError as exc:
        return {"import_error": str(exc), "import_missing": True}
    except Exception as exc:  # a broken cupy install (missing libraries) is reported, not raised
        return {"import_error": f"{type(exc).__name__}: {exc}"}
    rt = cupy.cuda.runtime
    versions = []
    for fn in (rt.driverGetVersion, rt.runtimeGetVersion):
        try:
            versions.append(int(fn()))
        except Exception:
            versions.append(0)
    try:
        count = int(rt.getDeviceCount())
    except Exception as exc:
        return {"driver_version": versions[0], "runtime_version": versions[1],
                "count_error": (getattr(exc, "status", None), f"{type(exc).__name__}: {exc}")}
    try:
        available = bool(cupy.is_available())
    except Exception:
        available = False
    return {"driver_version": versions[0], "runtime_version": versions[1], "device_count": count,
            "available": available}
