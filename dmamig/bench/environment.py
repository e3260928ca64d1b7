"""Where a benchmark runs, and the copy ceiling it is measured against in the same run.

:func:`machine_info` describes the CPU, GPUs, library versions and the git commit; :func:`measure_ceilings`
times a plain copy of the working set (pinned ``cudaMemcpyAsync`` on a GPU, ``np.copyto`` on the CPU), which
every migration figure is divided by.
"""

from __future__ import annotations

import os
import platform
import subprocess
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["cpu_copy_ceiling", "machine_info", "measure_ceilings"]


# -- versions and machine -----------------------------------------------------------------------------------------------

def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _package_version() -> str:
    # Running from a source tree that is not installed: no distribution metadata, but the package knows.
    try:
        from .. import __version__
    except ImportError:
        return "unknown"
    return str(__version__)


def _cupy_version() -> str | None:
    # Package metadata, not an import: cupy is only ever imported by the CUDA backend.
    for dist in ("cupy-cuda13x", "cupy-cuda12x", "cupy-cuda11x", "cupy"):
        v = _version(dist)
        if v:
            return f"{v} ({dist})"
    return None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _git_head(where: Path) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=5)
        if out.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=where,
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() + ("-dirty" if dirty else "")


def _git_commit() -> str | None:
    """The commit of the source tree dmamig runs from, or of the dmamig checkout in the current directory.

    An installed copy (``pip install .``) has no git metadata, but CI runs it from the checkout it installed,
    so a current directory holding dmamig's own pyproject.toml names the commit.
    """
    here = Path(__file__).resolve().parent
    if (here.parent.parent / "pyproject.toml").exists():
        return _git_head(here)
    try:
        ours = 'name = "dmamig"' in (Path.cwd() / "pyproject.toml").read_text()
    except OSError:
        ours = False
    return _git_head(Path.cwd()) if ours else None


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    # Device descriptions may carry tuples (compute capability) or numpy scalars; JSON wants lists and numbers.
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, tuple | list):
            out[k] = [x.item() if isinstance(x, np.generic) else x for x in v]
        elif isinstance(v, np.generic):
            out[k] = v.item()
        elif isinstance(v, str | int | float | bool) or v is None:
            out[k] = v
        else:
            out[k] = str(v)
    return out


def machine_info(backend: str, gpus: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Describe where a run happens: CPU, GPUs, versions and the git commit.

    Parameters
    ----------
    backend : str
        ``"cpu"`` or ``"cuda"``.
    gpus : list of dict, optional
        ``backend.devices()`` of the backend in use.
    """
    import numpy

    info: dict[str, Any] = {
        "backend": backend,
        "hostname": platform.node(),
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count() or 1,
        "gpus": [_jsonable(dict(g)) for g in (gpus or [])],
        "python": platform.python_version(),
        "numpy": numpy.__version__,
        "numba": _version("numba"),
        "cupy": _cupy_version(),
        "dmamig": _version("dmamig") or _package_version(),
        "git_commit": _git_commit(),
    }
    if backend == "cpu":
        info["note"] = ("cpu backend: every node's frames are numpy buffers in host RAM, so host->device and "
                        "device->host are RAM-to-RAM copies between distinct buffers; DMA channels are threads")
    return info


# -- ceilings --------------------------------------------------------------------------------------------------

def cpu_copy_ceiling(nbytes: int, repeat: int = 3) -> float:
    """Best seconds of ``np.copyto`` of ``nbytes`` contiguous bytes on the CPU (the memcpy ceiling).

    Both buffers are touched first so that page faults are not timed. The best repetition, not the median:
    a ceiling slowed down by a noisy neighbour would flatter every ratio measured against it.
    """
    src = np.empty(nbytes, dtype=np.uint8)
    src.fill(0x5A)
    dst = np.empty_like(src)
    np.copyto(dst, src)
    times = []
    for _ in range(max(1, repeat)):
        t0 = time.perf_counter_ns()
        np.copyto(dst, src)
        times.append(time.perf_counter_ns() - t0)
    return min(times) / 1e9


def measure_ceilings(backend: Any, backend_name: str, nbytes: int, directions: list[str],
                     repeat: int = 3) -> list[dict[str, Any]]:
    """Measure the copy ceiling of each direction in this run.

    A backend that offers ``copy_ceiling(direction, nbytes, repeat) -> seconds`` (the CUDA backend: pinned
    ``cudaMemcpyAsync`` host<->device and device-to-device copies timed with CUDA events, best of ``repeat``)
    is asked; otherwise
    the ceiling is ``np.copyto`` of the same bytes, measured once and used for every direction (on the CPU
    backend every node is host RAM).
    """
    out = []
    fn = getattr(backend, "copy_ceiling", None)
    cpu_s = None
    for d in directions:
        if fn is not None:
            secs = float(fn(d, nbytes, repeat))
            method = {"h2d": "cudaMemcpyAsync pinned H2D", "d2h": "cudaMemcpyAsync D2H pinned",
                      "d2d": "device-to-device cudaMemcpyAsync"}[d] + f" (CUDA events, best of {repeat})"
        else:
            if cpu_s is None:
                cpu_s = cpu_copy_ceiling(nbytes, repeat)
            secs = cpu_s
            method = f"np.copyto contiguous, host RAM, best of {max(1, repeat)}"
        out.append({"direction": d, "method": method, "bytes": nbytes, "seconds": secs,
                    "gbps": nbytes / secs / 1e9 if secs > 0 else 0.0})
    if backend_name == "cuda" and fn is None:
        for c in out:
            c["method"] += " (backend has no copy_ceiling: host memcpy stands in)"
    return out
