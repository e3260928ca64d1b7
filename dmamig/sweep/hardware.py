"""What hardware a process runs on: the host's CPU, cores, SMT, NUMA nodes and memory, and each GPU it uses.

Recorded in every results document (``machine.host``, ``machine.gpus``) and shown by ``dmamig info``, so that
a result says which machine made it and ``dmamig report`` can refuse to compare two machines' figures.

The host comes from Linux's ``/proc`` and ``/sys``; GPUs from the CUDA backend (name, memory) and
``nvidia-smi`` (UUID, PCI bus id, driver, compute and persistence mode, application clocks), never from an
import of cupy here. A fact that cannot be read is recorded as ``"unknown (why)"``, never guessed.
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
from pathlib import Path
from typing import Any

__all__ = ["SMI_FIELDS", "cpu_model", "cuda_runtime_version", "gpu_facts", "host_facts", "smi_gpus"]

#: ``nvidia-smi --query-gpu`` fields and the keys they are recorded under.
SMI_FIELDS = (
    ("index", "smi_index"),
    ("uuid", "uuid"),
    ("pci.bus_id", "pci_bus_id"),
    ("name", "smi_name"),
    ("driver_version", "driver"),
    ("compute_mode", "compute_mode"),
    ("persistence_mode", "persistence_mode"),
    ("clocks.applications.graphics", "app_clock_graphics_mhz"),
    ("clocks.applications.memory", "app_clock_memory_mhz"),
)


def cpu_model(root: str | Path = "/") -> str:
    """The CPU's model name (``/proc/cpuinfo`` under ``root``), or what :mod:`platform` says where there is
    none."""
    for line in (_read(Path(root) / "proc" / "cpuinfo") or "").splitlines():
        if line.startswith(("model name", "Model Name")):  # x86; some Arm kernels
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown"


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _cpulist(text: str) -> list[int]:
    """``"0-3,8,10-11"`` as the list of CPU numbers."""
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        lo, _, hi = part.partition("-")
        out += range(int(lo), int(hi or lo) + 1)
    return out


def _smt(sys_cpu: Path) -> dict[str, Any]:
    active = _read(sys_cpu / "smt" / "active")
    siblings = _read(sys_cpu / "cpu0" / "topology" / "thread_siblings_list")
    threads = len(_cpulist(siblings)) if siblings else None
    if active is None and threads is None:
        return {"smt": "unknown (no /sys/devices/system/cpu/smt or thread siblings)", "threads_per_core": None}
    on = active == "1" if active is not None else bool(threads and threads > 1)
    return {"smt": "on" if on else "off", "threads_per_core": threads}


def _numa(sys_node: Path) -> list[dict[str, Any]] | str:
    nodes = sorted((p for p in sys_node.glob("node[0-9]*") if p.name[4:].isdigit()), key=lambda p: int(p.name[4:]))
    if not nodes:
        return "unknown (no /sys/devices/system/node)"
    out = []
    for p in nodes:
        mem = None
        for line in (_read(p / "meminfo") or "").splitlines():
            m = re.search(r"MemTotal:\s+(\d+) kB", line)
            if m:
                mem = int(m.group(1)) * 1024
        out.append({"node": int(p.name[4:]), "cpus": _read(p / "cpulist") or "", "memory_bytes": mem})
    return out


def _memory(meminfo: Path) -> int | str:
    for line in (_read(meminfo) or "").splitlines():
        m = re.match(r"MemTotal:\s+(\d+) kB", line)
        if m:
            return int(m.group(1)) * 1024
    return f"unknown (no MemTotal in {meminfo})"


def host_facts(root: str | Path = "/") -> dict[str, Any]:
    """The host a process runs on.

    Parameters
    ----------
    root : str or Path
        Where ``proc`` and ``sys`` are found (``/``; tests give a fake tree).

    Returns
    -------
    dict
        ``cpu_model``; ``cpus_online`` (the machine's logical CPUs); ``cpus_available`` (the ones this process
        may run on, its affinity) and ``affinity`` (their list, e.g. ``"0-3"``); ``smt`` (``"on"``, ``"off"`` or
        ``"unknown (why)"``) and ``threads_per_core``; ``numa_nodes`` (each node's number, CPUs and memory) and
        ``memory_bytes`` (MemTotal). Facts that cannot be read say ``"unknown (why)"``.
    """
    root = Path(root)
    try:
        mine = sorted(os.sched_getaffinity(0)) if str(root) == "/" else None
    except (AttributeError, OSError):
        mine = None
    if mine is None:
        status = _read(root / "proc" / "self" / "status") or ""
        m = re.search(r"Cpus_allowed_list:\s*(\S+)", status)
        mine = _cpulist(m.group(1)) if m else None
    ranges = []
    for c in mine or []:
        if ranges and ranges[-1][1] == c - 1:
            ranges[-1][1] = c
        else:
            ranges.append([c, c])
    online = _read(root / "sys" / "devices" / "system" / "cpu" / "online")
    return {
        "cpu_model": cpu_model(root),
        "cpus_online": len(_cpulist(online)) if online else (os.cpu_count() or 1),
        "cpus_available": len(mine) if mine else "unknown (no affinity mask)",
        "affinity": ",".join(f"{a}-{b}" if b > a else f"{a}" for a, b in ranges) or "unknown",
        **_smt(root / "sys" / "devices" / "system" / "cpu"),
        "numa_nodes": _numa(root / "sys" / "devices" / "system" / "node"),
        "memory_bytes": _memory(root / "proc" / "meminfo"),
    }


def smi_gpus() -> list[dict[str, Any]] | str:
    """Every GPU ``nvidia-smi`` lists, in its (PCI bus) order, with the keys of :data:`SMI_FIELDS`; or why
    there is no list (``"unknown (...)"``)."""
    query = ",".join(f for f, _ in SMI_FIELDS)
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=20)
    except FileNotFoundError:
        return "unknown (nvidia-smi not found)"
    except (OSError, subprocess.SubprocessError) as exc:
        return f"unknown (nvidia-smi failed: {type(exc).__name__})"
    if out.returncode != 0:
        first = (out.stderr or out.stdout).strip().splitlines()[:1]
        return f"unknown (nvidia-smi exit {out.returncode}{': ' + first[0] if first else ''})"
    rows = []
    for line in out.stdout.splitlines():
        cells = [c.strip() for c in line.split(",")]
        if len(cells) != len(SMI_FIELDS):
            continue
        row: dict[str, Any] = {}
        for (_, key), cell in zip(SMI_FIELDS, cells):
            if cell in ("[N/A]", "N/A", "[Not Supported]", ""):
                row[key] = f"unknown (nvidia-smi: {cell or 'empty'})"
            elif key.endswith("_mhz") or key == "smi_index":
                row[key] = int(cell) if cell.isdigit() else cell
            else:
                row[key] = cell
        rows.append(row)
    return rows


def _visible() -> list[str] | None:
    text = os.environ.get("CUDA_VISIBLE_DEVICES")
    if text is None:
        return None
    return [v.strip() for v in text.split(",") if v.strip()]


def _match(i: int, name: str, rows: list[dict[str, Any]]) -> tuple[dict[str, Any] | None, str]:
    """The nvidia-smi row of CUDA device ``i`` named ``name``, and how it was matched."""
    visible = _visible()
    if visible is not None and i < len(visible):
        token = visible[i]
        for r in rows:
            if token.isdigit() and r.get("smi_index") == int(token):
                return r, "CUDA_VISIBLE_DEVICES index"
            if not token.isdigit() and str(r.get("uuid", "")).startswith(token):
                return r, "CUDA_VISIBLE_DEVICES UUID"
    if visible is None and os.environ.get("CUDA_DEVICE_ORDER") == "PCI_BUS_ID" and i < len(rows):
        return rows[i], "CUDA_DEVICE_ORDER=PCI_BUS_ID index"
    if len(rows) == 1:
        return rows[0], "the only GPU"
    same = [r for r in rows if r.get("smi_name") == name]
    if len(same) == 1:
        return same[0], "the only GPU of this name"
    return None, (f"unknown (device {i} cannot be told apart among {len(rows)} GPUs; set "
                  f"CUDA_DEVICE_ORDER=PCI_BUS_ID or CUDA_VISIBLE_DEVICES)")


def cuda_runtime_version() -> str | None:
    """The CUDA runtime version the CUDA backend runs (None where it cannot say)."""
    try:
        from ..backends.cuda import cuda_environment
    except Exception:  # no CUDA stack: the GPUs' records say the runtime is unknown
        return None
    rt = cuda_environment().get("cuda_runtime")
    return None if rt is None else str(rt)


def gpu_facts(devices: list[dict[str, Any]], cuda_runtime: str | None = None) -> list[dict[str, Any]]:
    """Describe each GPU of ``devices`` (the CUDA backend's ``devices()``, the ones a run uses).

    Parameters
    ----------
    devices : list of dict
        Each with ``name`` (and ``id``, ``memory_bytes``, ``compute_capability`` where the backend gives them).
    cuda_runtime : str, optional
        The CUDA runtime version the backend runs (the same for every device); by default the CUDA backend is
        asked (:func:`cuda_runtime_version`).

    Returns
    -------
    list of dict
        Each device's own keys, plus ``index``, ``cuda_runtime`` and the keys of :data:`SMI_FIELDS` from the
        ``nvidia-smi`` row matched to it (``smi_match`` says how); every key that could not be found says
        ``"unknown (why)"``.
    """
    if not devices:
        return []
    rows = smi_gpus()
    runtime = cuda_runtime if cuda_runtime is not None else cuda_runtime_version()
    out = []
    for i, d in enumerate(devices):
        g = dict(d)
        g.setdefault("index", g.get("id", i))
        g["cuda_runtime"] = runtime or "unknown (the CUDA backend did not say)"
        if isinstance(rows, str):
            row, how = None, rows
        else:
            row, how = _match(i, str(g.get("name", "")), rows)
        for _, key in SMI_FIELDS:
            if key in ("smi_index", "smi_name"):
                continue
            if g.get(key) in (None, ""):
                g[key] = row[key] if row is not None else how
        g["smi_match"] = how
        out.append(g)
    return out
