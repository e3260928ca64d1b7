"""Where a benchmark runs, and the copy ceiling it is measured against in the same run.

:func:`machine_info` describes the host, the GPUs a run used, library versions and the git commit
(:func:`git_provenance`); :func:`measure_ceilings`
times a plain copy of the working set (pinned ``cudaMemcpyAsync`` on a GPU, ``np.copyto`` on the CPU), which
every migration figure is divided by.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import time
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import numpy as np

__all__ = ["cpu_copy_ceiling", "git_provenance", "machine_info", "measure_ceilings"]


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


def _git(where: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=where, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _checkout(where: Path) -> dict[str, Any] | None:
    """The commit and dirtiness of the dmamig checkout holding ``where``; None when it is not one."""
    top = _git(where, "rev-parse", "--show-toplevel")
    if not top:
        return None
    try:
        ours = 'name = "dmamig"' in (Path(top) / "pyproject.toml").read_text()
    except OSError:
        ours = False
    head = _git(Path(top), "rev-parse", "HEAD") if ours else None
    if not head:
        return None
    status = _git(Path(top), "status", "--porcelain", "--untracked-files=no")
    return {"git_commit": head, "git_dirty": None if status is None else bool(status), "path": top}


def _pip_source() -> dict[str, Any] | None:
    """What pip recorded of where dmamig was installed from (PEP 610 ``direct_url.json``), if anything."""
    try:
        text = metadata.distribution("dmamig").read_text("direct_url.json")
    except (metadata.PackageNotFoundError, OSError):
        return None
    try:
        doc = json.loads(text) if text else None
    except ValueError:
        return None
    return doc if isinstance(doc, dict) else None


def _installed_matches(top: Path, commit: str, package: Path) -> bool | None:
    """Whether the installed package's files are those of ``commit`` in the clone ``top`` (git blob hashes);
    None when git cannot list the commit's files."""
    listing = _git(top, "ls-tree", "-r", commit, "--", "dmamig", "kernels")
    if listing is None:
        return None
    blobs = {}
    for line in listing.splitlines():
        meta, _, path = line.partition("\t")
        blobs[path] = meta.split()[-1]
    for f in package.rglob("*"):
        if not f.is_file() or "__pycache__" in f.parts or f.suffix not in (".py", ".cu"):
            continue
        rel = f.relative_to(package).as_posix()
        key = rel if rel.startswith("kernels/") else f"dmamig/{rel}"  # dmamig.kernels ships kernels/
        data = f.read_bytes()
        if blobs.get(key) != hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest():
            return False
    return True


def git_provenance() -> dict[str, Any]:
    """The git commit the running dmamig was made from, whether its tree was dirty, and where that was found.

    Looked for, in order: the source tree dmamig runs from (a checkout, or an editable install); the commit
    pip recorded for an install from a git URL; the clone pip recorded for ``pip install .`` (its HEAD, and
    ``git_dirty`` true when the installed files differ from that commit's); the dmamig checkout holding the current
    directory (as on a CI runner that installed the checkout it runs in).

    Returns
    -------
    dict
        ``git_commit`` (the hash, or None), ``git_dirty`` (True when tracked files differed from the commit;
        None when unknown) and ``git_commit_source``: where the commit was found, or ``"unknown: ..."`` saying
        where it was looked for.
    """
    here = Path(__file__).resolve().parent.parent
    found = _checkout(here) if (here.parent / "pyproject.toml").exists() else None
    if found:
        return {"git_commit": found["git_commit"], "git_dirty": found["git_dirty"],
                "git_commit_source": f"source tree {found['path']}"}
    pip = _pip_source() or {}
    vcs = pip.get("vcs_info") or {}
    if vcs.get("commit_id"):
        return {"git_commit": str(vcs["commit_id"]), "git_dirty": False,
                "git_commit_source": f"pip install from {pip.get('url')} (the commit pip recorded)"}
    url = str(pip.get("url") or "")
    if url.startswith("file://"):
        found = _checkout(Path(unquote(urlparse(url).path)))
        if found:
            same = _installed_matches(Path(found["path"]), found["git_commit"], here)
            how = {True: "the installed files match its HEAD",
                   False: "the installed files differ from its HEAD: installed from another commit or from "
                          "uncommitted changes",
                   None: "its HEAD when this ran"}[same]
            return {"git_commit": found["git_commit"], "git_dirty": None if same is None else not same,
                    "git_commit_source": f"the clone dmamig was installed from, {found['path']} ({how})"}
    found = _checkout(Path.cwd())
    if found:
        return {"git_commit": found["git_commit"], "git_dirty": found["git_dirty"],
                "git_commit_source": f"the dmamig checkout in the current directory, {found['path']}"}
    installed = f"from {url}" if url else "with no source recorded by pip"
    return {"git_commit": None, "git_dirty": None,
            "git_commit_source": f"unknown: dmamig runs from {here}, which is not a git checkout; it was installed "
                                 f"{installed}, which is not a git checkout now; the current directory is not "
                                 f"a dmamig checkout (run from the clone, or install with pip install -e)"}


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
    """Describe where a run happens: the host, the GPUs it used, versions and the git commit.

    Parameters
    ----------
    backend : str
        ``"cpu"`` or ``"cuda"``.
    gpus : list of dict, optional
        The GPUs the run used: ``backend.devices()`` of the backend in use (described here with
        :func:`dmamig.sweep.hardware.gpu_facts`), or records a worker already described.

    Returns
    -------
    dict
        ``cpu`` (model) and ``cpu_count`` (logical CPUs), ``host`` (:func:`dmamig.sweep.hardware.host_facts`:
        CPU model, the cores this process may use, SMT, NUMA nodes, memory), ``gpus`` (per GPU: UUID, PCI bus
        id, name, driver, CUDA runtime, compute and persistence mode, application clocks), versions, and
        :func:`git_provenance`'s ``git_commit``, ``git_dirty`` and ``git_commit_source``.
    """
    import numpy

    from ..sweep.hardware import cpu_model, gpu_facts, host_facts

    gpus = [_jsonable(dict(g)) for g in (gpus or [])]
    if backend == "cuda" and gpus and not all("smi_match" in g for g in gpus):
        gpus = [_jsonable(g) for g in gpu_facts(gpus)]
    info: dict[str, Any] = {
        "backend": backend,
        "hostname": platform.node(),
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count() or 1,
        "host": _jsonable_deep(host_facts()),
        "gpus": gpus,
        "python": platform.python_version(),
        "numpy": numpy.__version__,
        "numba": _version("numba"),
        "cupy": _cupy_version(),
        "dmamig": _version("dmamig") or _package_version(),
        **git_provenance(),
    }
    if backend == "cpu":
        info["note"] = ("cpu backend: every node's frames are numpy buffers in host RAM, so host->device and "
                        "device->host are RAM-to-RAM copies between distinct buffers; DMA channels are threads")
    return info


def _jsonable_deep(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable_deep(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable_deep(v) for v in value]
    return value.item() if isinstance(value, np.generic) else value


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
