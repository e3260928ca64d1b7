"""The ``dmamig`` command: ``bench``, ``report``, ``info``, ``selftest``, ``schema``, ``stress``, ``replay``,
``replay-report`` and ``model``: the whole command line of the benchmark in one module (its argument types,
subparsers, output folders and commands), calling down into :mod:`dmamig.bench` for what the commands run.
``replay`` and ``replay-report`` take their subparsers and commands from :mod:`dmamig.tiering.commands`, ``model``
from :mod:`dmamig.bench.model_command`.

Every argument type names what was wrong and what is allowed. Output folders are unique, writable and never
overwrite results.

Exit codes: 0 success; 1 a failure the command found (a significant regression beyond the threshold or a
missing scenario, a benchmark whose data failed verification, a failed self-test); 2 a usage error, told in
one line (a bad argument, an output folder that cannot be used, a file that is not a results file, runs
whose settings differ); 130 after Ctrl-C (``bench`` keeps the scenarios that finished, marked partial).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import errno
import json
import os
import re
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["WORKING_SET_COPIES", "OutputError", "add_bench_parser", "add_report_parser", "bench_folder",
           "build_parser", "check_writable", "cmd_bench", "cmd_report", "main", "remove_if_empty", "tasks_text"]


# -- argument types: each names what was wrong and what is allowed ---------------------------------------------

def _argtype(fn: Callable[[str], Any]) -> Callable[[str], Any]:
    def wrapped(text: str) -> Any:
        try:
            return fn(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    wrapped.__name__ = fn.__name__
    return wrapped


def _whole(text: str) -> bool:
    # ASCII digits only: str.isdigit() also accepts '²' and the like, which int() refuses.
    return text.strip().isascii() and text.strip().isdigit()


def _positive(text: str) -> int:
    if not _whole(text) or int(text) < 1:
        raise ValueError(f"{text!r} is not a positive whole number, e.g. 3")
    return int(text)


def _nonnegative(text: str) -> int:
    if not _whole(text):
        raise ValueError(f"{text!r} is not a whole number >= 0, e.g. 1")
    return int(text)


# -- dmamig bench and dmamig report: argument types and subparsers --------------------------------------------

def _sizes(text: str) -> list[int]:
    from .bench.settings import parse_folio_sizes

    return parse_folio_sizes(text)


def _total(text: str) -> int:
    from .bench.settings import PAGE_SIZE, parse_size

    n = parse_size(text)
    if n % PAGE_SIZE:
        raise ValueError(f"{text!r} is not a whole number of 4 KiB pages; use e.g. 256M or 1G")
    limit = _memory_limit()
    if limit and n > limit:
        raise ValueError(f"{text!r} does not fit in this machine's memory: a scenario holds about "
                         f"{WORKING_SET_COPIES} copies of its working set; use at most {limit >> 20}M")
    return n


#: Copies of the working set a scenario holds at once (host node, device node, reference data).
WORKING_SET_COPIES = 3


def _memory_limit() -> int:
    """The largest working set that fits in physical memory, in whole MiB (0 when unknown)."""
    try:
        phys = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0
    return (phys // WORKING_SET_COPIES) >> 20 << 20


def _channels(text: str) -> list[int]:
    from .bench.settings import parse_channels

    return parse_channels(text)


def _batch_pages(text: str) -> list[int]:
    from .bench.settings import parse_batch_pages

    return parse_batch_pages(text)


def _batches_per_step(text: str) -> list[int]:
    from .bench.settings import parse_batches_per_step

    return parse_batches_per_step(text)


def _poll_us(text: str) -> float:
    from .bench.settings import parse_poll_us

    return parse_poll_us(text)


def _pipeline(text: str) -> list[int]:
    from .bench.settings import parse_pipeline

    return parse_pipeline(text)


def _fault_batches(text: str) -> list[int]:
    from .bench.access import parse_fault_batches

    return parse_fault_batches(text)


def _oversubscription(text: str) -> list[float]:
    from .bench.access import parse_oversubscription

    return parse_oversubscription(text)


def _files_total(text: str) -> int:
    from .bench.settings import PAGE_SIZE, parse_size

    n = parse_size(text)
    if n % PAGE_SIZE:
        raise ValueError(f"{text!r} is not a whole number of 4 KiB pages; use e.g. 32M")
    limit = _memory_limit()
    # The private mapping's copies sit beside its page cache: twice the working set on the host.
    if limit and 2 * n > limit:
        raise ValueError(f"{text!r} does not fit twice in this machine's memory; use at most {limit >> 21}M")
    return n


def _access_total(text: str) -> int:
    from .bench.settings import parse_size

    n = parse_size(text)
    if n % (2 << 20):
        raise ValueError(f"{text!r} is not a whole number of 2 MiB blocks (UVM's unit of prefetch and "
                         f"eviction); use e.g. 32M or 256M")
    limit = _memory_limit()
    if limit and n > limit:
        raise ValueError(f"{text!r} does not fit in this machine's memory; use at most {limit >> 20}M")
    return n


def _devices(text: str) -> int:
    from .bench.pairs import parse_device_count

    return parse_device_count(text)


def _pair_total(text: str) -> int:
    from .bench.pairs import check_pair_bytes
    from .bench.settings import parse_size

    n = parse_size(text)
    try:
        check_pair_bytes(n)
    except ValueError:
        raise ValueError(f"{text!r} is not a whole number of 2 MiB folios (the device pairs migrate 2 MiB "
                         f"folios); use e.g. 32M or 256M") from None
    limit = _memory_limit()
    if limit and n > limit:
        raise ValueError(f"{text!r} does not fit in this machine's memory; use at most {limit >> 20}M")
    return n


def _threshold(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a number; use a fraction such as 0.1 for 10 %") from None
    if not 0 <= v < 1:
        raise ValueError(f"{text!r} is out of range; use a fraction in [0, 1), such as 0.1 for 10 %")
    return v


# -- parsers ---------------------------------------------------------------------------------------------------

def add_bench_parser(sub: Any, argtype: Callable, positive: Callable, nonnegative: Callable) -> None:
    """Add the ``bench`` subcommand to ``sub`` (an argparse subparsers object).

    ``argtype`` wraps a ``ValueError``-raising parser into an argparse type; ``positive`` and ``nonnegative``
    are the command line's shared integer types.
    """
    from .topology import PRESETS

    b = sub.add_parser("bench", help="run the copy vs no-copy migration sweep and write a results folder",
                       description="Migrate a working set between host and device nodes with copy migration "
                                   "(the CPU copies) and no-copy migration (the DMA engine copies), over folio "
                                   "sizes and channel counts; every run is verified. Migrations run with the "
                                   "kernel's batching (faithful, the headline); --batch, --batches-per-step "
                                   "and --pipeline add experiment settings as separate, labelled scenarios. "
                                   "Writes results.json, results.csv and PNG plots.")
    b.add_argument("--backend", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto picks cuda when a GPU is usable (DMAMIG_BACKEND overrides auto)")
    b.add_argument("--sizes", type=argtype(_sizes), metavar="LIST",
                   help="folio sizes, 4k..2m in powers of two (default 4k,64k,2m)")
    b.add_argument("--total", type=argtype(_total), metavar="SIZE",
                   help="working set per scenario, e.g. 256M or 1G (default 256M on cpu, 1G on cuda)")
    b.add_argument("--channels", type=argtype(_channels), metavar="LIST",
                   help="DMA channel counts for no-copy migration (default 1,2 on cpu, 1,2,4 on cuda)")
    b.add_argument("--batch", type=argtype(_batch_pages), metavar="LIST", dest="batch_pages",
                   help="experiment axis: base pages per migration batch, e.g. 512,2048 (the kernel's is 512, "
                        "which always runs)")
    b.add_argument("--batches-per-step", type=argtype(_batches_per_step), metavar="LIST",
                   help="experiment axis: batches whose phases run together, e.g. 1,16 (the kernel's is 1)")
    b.add_argument("--pipeline", type=argtype(_pipeline), metavar="LIST",
                   help="experiment axis: steps whose DMA copy overlaps the next step's unmap, e.g. 0,1 "
                        "(no-copy only; the kernel's is 0)")
    b.add_argument("--rfc-preset", action="store_true",
                   help="experiment preset: also migrate with the DMA batch-offload RFC's configuration (batches of "
                        "262144 base pages, 1 GiB of 4K pages, as its patched kernels ran), reported beside the "
                        "faithful figure as its own scenario")
    b.add_argument("--faithful-only", action="store_true",
                   help="run only the kernel's batching: no default pipelined no-copy variant at the "
                        "smallest folio size")
    b.add_argument("--repeat", type=argtype(positive), metavar="N",
                   help="timed repetitions per scenario; medians are reported (default 5; 1 with --quick)")
    b.add_argument("--warmup", type=argtype(nonnegative), metavar="N", help="untimed repetitions first (1)")
    b.add_argument("--devices", type=argtype(_devices), metavar="N",
                   help="device nodes, 1 to 8; 2 or more add device->device migration (between the first two) "
                        "and the all-pairs matrix: each ordered device pair (d0->d1 and d1->d0 alike) in copy and "
                        "no-copy mode, against the pair's own copy ceiling (default: GPUs present, at most 2; "
                        "on cuda at most the GPUs visible)")
    b.add_argument("--topology", choices=PRESETS, metavar="PRESET",
                   help=f"cpu backend: peer access and links between the --devices, one of {', '.join(PRESETS)} "
                        f"(default nvswitch: every pair NVLink with peer access; dgx1 needs --devices 8); on cuda "
                        f"the runtime reports it")
    b.add_argument("--dma-poll-us", type=argtype(_poll_us), metavar="US",
                   help="microseconds a wait for a DMA copy polls before sleeping, as dma_sync_wait() does (cpu: "
                        "channel workers watch their doorbells as long); default 1000; 0 sleeps at once, so every "
                        "copy pays the host's thread wake-ups (an experiment)")
    b.add_argument("--dma-engine", choices=("launch", "persistent"),
                   help="cuda: what consumes the DMA rings: launch (one kernel launch per submission, the default) "
                        "or persistent (a resident consumer kernel per device: an experiment, recorded in "
                        "results.json); the cpu backend refuses persistent, its channels already are persistent "
                        "consumers")
    b.add_argument("--copy-baseline", choices=("sync-dma", "cpu"),
                   help="what copy mode measures, the divisor of every no-copy / copy ratio (recorded in "
                        "results.json as copy_baseline): on cuda sync-dma (one synchronous DMA per folio, the "
                        "default) or cpu (the migrating CPU's memcpy into device frames in host-mapped memory, as "
                        "over a cache-coherent link such as Grace Hopper C2C: a proxy where the card is on PCIe; "
                        "no-copy keeps device memory); the cpu backend measures only cpu")
    b.add_argument("--pair-total", type=argtype(_pair_total), metavar="SIZE",
                   help="working set of each device pair, whole 2 MiB folios (default 32M on cpu, 256M on cuda)")
    b.add_argument("--no-pairs", action="store_true",
                   help="skip the all-pairs device-to-device matrix that --devices 2 or more adds")
    b.add_argument("--quick", action="store_true", help="tiny sweep for smoke tests (a few seconds)")
    b.add_argument("--no-engine", action="store_true",
                   help="skip the engine scenarios (state-only migration, raw DMA copies)")
    b.add_argument("--no-access", action="store_true",
                   help="skip the device-access scenarios (a device faulting host memory in, UVM-style)")
    b.add_argument("--fault-batch", type=argtype(_fault_batches), metavar="LIST",
                   help="fault batch sizes of the streaming device read, e.g. 32,256,1024 (the default; UVM's "
                        "256 always runs)")
    b.add_argument("--oversubscription", type=argtype(_oversubscription), metavar="LIST",
                   help="working set over device memory of the device-access stencil, e.g. 0.5,1,1.5,2 (the "
                        "default; 2 with --quick)")
    b.add_argument("--access-total", type=argtype(_access_total), metavar="SIZE",
                   help="working set of each device-access scenario (default 32M on cpu, 128M on cuda)")
    b.add_argument("--files", action="store_true",
                   help="also run the file-backed scenarios (clean and dirty page cache, shmem, a private file "
                        "mapping after COW), copy and no-copy; --quick always runs them, at 4M")
    b.add_argument("--no-files", action="store_true",
                   help="skip the file-backed scenarios, also in a --quick sweep")
    b.add_argument("--files-total", type=argtype(_files_total), metavar="SIZE",
                   help="working set of each file-backed scenario (default 32M on cpu, 128M on cuda, 4M with "
                        "--quick)")
    b.add_argument("--no-plots", action="store_true", help="do not write PNG plots")
    b.add_argument("--out", type=Path, metavar="DIR",
                   help="output folder, refused if it already holds results (default "
                        "./dmamig-results/<timestamp>/, suffixed -2, -3 ... when taken)")
    from .sweep.cli import add_sweep_arguments

    add_sweep_arguments(b, "scenario group")


def add_report_parser(sub: Any, argtype: Callable) -> None:
    """Add the ``report`` subcommand to ``sub`` (an argparse subparsers object)."""
    r = sub.add_parser("report", help="re-render a results.json; with a baseline, check for regressions",
                       description="Print the tables of a results file, or of the folder dmamig bench wrote "
                                   "(and write CSV and plots with --out). With BASELINE, compare scenario by "
                                   "scenario and exit 1 when any scenario is slower than (1 - threshold) times "
                                   "its baseline and the 95% bootstrap interval of the ratio of median times "
                                   "lies below 1, when a baseline scenario is missing, or when its options "
                                   "differ. A scenario beyond the threshold with fewer than 3 repetitions is "
                                   "reported as inconclusive and does not fail. Runs with different settings "
                                   "(quick vs full, working set, backend) are refused (exit 2), and so are runs "
                                   "from different machines (CPU model, GPU) unless --allow-other-machine is "
                                   "given.")
    r.add_argument("results", type=Path, metavar="RESULTS", help="a results.json, or the folder that holds it")
    r.add_argument("baseline", type=Path, nargs="?", metavar="BASELINE",
                   help="the baseline's results.json, or its folder")
    r.add_argument("--threshold", type=argtype(_threshold), default=0.1, metavar="FRACTION",
                   help="allowed slowdown before a scenario counts as regressed (default 0.1 = 10 %%)")
    r.add_argument("--metric", choices=("throughput", "ceiling-ratio"), default="throughput",
                   help="compare GB/s (pages per CPU-second for state-only), or the ratio to the same run's "
                        "ceiling, which factors out machine speed (default throughput)")
    r.add_argument("--allow-other-machine", action="store_true",
                   help="compare runs made on different machines (another CPU model or GPU), which is refused "
                        "otherwise (exit 2); the backend may then differ too")
    r.add_argument("--out", type=Path, metavar="DIR", help="also write results.csv and plots into DIR")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``dmamig`` command."""
    p = argparse.ArgumentParser(
        prog="dmamig",
        description="Emulated Linux page migration with a device DMA engine: copy vs no-copy benchmarks.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    add_bench_parser(sub, _argtype, _positive, _nonnegative)
    add_report_parser(sub, _argtype)

    from .tiering.commands import add_replay_parser, add_replay_report_parser

    add_replay_parser(sub, _argtype, _positive, _nonnegative)
    add_replay_report_parser(sub)

    from .bench.model_command import add_model_parser

    add_model_parser(sub, _argtype)

    i = sub.add_parser("info", help="backend, devices, versions and kernel build status")
    i.add_argument("--backend", choices=("auto", "cpu", "cuda"), default="auto")
    i.add_argument("--json", action="store_true", help="print machine-readable JSON")

    s = sub.add_parser("selftest", help="quick correctness pass of a backend; exit 1 on any failure")
    s.add_argument("--backend", choices=("auto", "cpu", "cuda"), default="auto")

    sub.add_parser("schema", help="print the JSON schema of results.json")

    st = sub.add_parser("stress", help="bounded stress with fault injection and invariant checks; exit 1 on a "
                                       "violation",
                        description="Run readers, writers, migrators (every mode, copy and no-copy), MigrateVma "
                                    "drivers and fork/munmap churn together on one machine for N operations, "
                                    "with faults injected at rate R; check bytes, refcounts, mapcounts, frames "
                                    "and vmstat every K operations and at the end.")
    st.add_argument("--ops", type=_argtype(_positive), default=10_000, metavar="N",
                    help="operations in all (default 10000)")
    st.add_argument("--threads", type=_argtype(_positive), default=6, metavar="T", help="worker threads (6)")
    st.add_argument("--fault-rate", type=_argtype(_rate), default=0.02, metavar="R",
                    help="chance that each DMA share fails (submission, mid-copy, completion); worker crashes "
                         "and allocation failures at R/4 (default 0.02; 0 injects nothing)")
    st.add_argument("--seed", type=_argtype(_nonnegative), metavar="S", help="seed (default: random, printed)")
    st.add_argument("--check-every", type=_argtype(_positive), default=1000, metavar="K",
                    help="operations between invariant checks (1000)")
    st.add_argument("--stall-timeout", type=_argtype(_seconds), default=60.0, metavar="SECONDS",
                    help="fail when no thread progresses for this long (60)")
    st.add_argument("--roles", type=_argtype(_roles), metavar="LIST",
                    help="roles to deal to the threads, comma-separated among writer, reader, migrator, dma, "
                         "driver, churn, pinner (default: all)")
    st.add_argument("--backend", choices=("auto", "cpu", "cuda"), default="cpu")
    st.add_argument("--files", choices=("generic", "buffer", "blockdev", "no-callback", "unaudited"),
                    metavar="FS", help="also map files on this filesystem model (generic, buffer, blockdev, "
                                       "no-callback, unaudited), written through mappings and pwrite")
    st.add_argument("--files-only", action="store_true", help="with --files: no anonymous or shmem regions")
    st.add_argument("--unaudited-no-copy", action="store_true",
                    help="experiment: let no-copy migration move the un-audited filesystem's folios, and count "
                         "the writes it loses")
    return p


# -- commands --------------------------------------------------------------------------------------------------

def _console(stderr: bool = False):
    from rich.console import Console

    con = Console(stderr=stderr)
    # Piped into a CI log, rich would fall back to 80 columns and fold every table; logs can be wide.
    return con if con.is_terminal else Console(stderr=stderr, width=180)


def _resolve_backend(parser: argparse.ArgumentParser, name: str) -> str:
    from .backends import resolve_backend
    from .backends.cuda import status as cuda_probe
    from .errors import InvalidArgument

    try:
        resolved = resolve_backend(name)
    except InvalidArgument as exc:
        parser.error(str(exc))
    if resolved == "cuda":
        reason = cuda_probe.cuda_unavailable_reason()
        if reason is not None:
            parser.error(f"argument --backend: cuda cannot run here: {reason}; use --backend cpu")
    return resolved


def _gpu_count(backend: str) -> int:
    if backend != "cuda":
        return 0
    from .backends import open_backend

    be = open_backend("cuda")
    try:
        return len(be.devices())
    finally:
        be.close()


def _kernel_status() -> Any:
    """``kernel_build_status()`` of the CUDA backend, or why it could not be asked."""
    try:
        from .backends import cuda
    except Exception as exc:  # the module may be absent or fail to import without a GPU stack
        return f"unavailable ({type(exc).__name__}: {exc})"
    fn = getattr(cuda, "kernel_build_status", None)
    if fn is None:
        return "unavailable (dmamig.backends.cuda has no kernel_build_status)"
    try:
        return fn()
    except Exception as exc:
        return f"error ({type(exc).__name__}: {exc})"


def info_dict(backend_arg: str = "auto") -> dict[str, Any]:
    """Everything ``dmamig info`` shows, as a dict.

    ``cuda`` says whether the CUDA backend can run (``usable``, ``absent: ...`` or ``UNUSABLE: ...`` where a GPU
    is present but CUDA cannot use it, which is also an ``error``); ``cuda_driver``, ``cuda_runtime`` (the CUDA
    version cupy was built for), ``nvrtc`` and ``batch_copy`` are shown wherever cupy imports.
    """
    from .backends import open_backend, resolve_backend
    from .backends.cuda import status as cuda_probe
    from .bench.environment import machine_info

    status = cuda_probe.cuda_status()
    reason = status.reason
    try:
        backend = resolve_backend(backend_arg)
    except Exception as exc:
        backend, err = "cpu", str(exc)
    else:
        err = None
    devices: list[dict[str, Any]] = []
    batch_reason = None
    topology: Any = ("a Machine setting on the cpu backend: Machine(topology=...), by default "
                     "Topology.nvswitch(devices) (every device pair NVLink with peer access)")
    if backend == "cuda" and reason is not None:
        err = f"cuda requested but unusable: {reason}"
    else:
        try:
            be = open_backend(backend)
            try:
                devices = [dict(d) for d in be.devices()]
                batch_reason = getattr(be, "batch_copy_reason", None)
                if hasattr(be, "runtime_topology"):
                    topology = be.runtime_topology().as_dict()
            finally:
                be.close()
        except Exception as exc:
            err = f"{type(exc).__name__}: {exc}"
    if status.state == "unusable" and err is None:
        err = f"a GPU is present but CUDA is not usable: {reason}"
    info = machine_info(backend, devices)
    info["devices"] = devices
    info["topology"] = topology
    info["cuda"] = {"usable": "usable", "absent": f"absent: {reason}"}.get(status.state, f"UNUSABLE: {reason}")
    if status.state != "absent" or "cupy is not installed" not in (reason or ""):
        from .backends.cuda import cuda_environment

        env = cuda_environment()
        env.pop("cupy", None)  # the installed version is already there, from the package metadata
        info.update(env)
        if batch_reason is not None:
            info["batch_copy"] = "on" if batch_reason == "available" else f"off: {batch_reason}"
    info["kernel_build_status"] = _kernel_status()
    if err:
        info["error"] = err
    return info


def _info_text(key: str, v: Any, info: dict[str, Any]) -> str:
    """One ``dmamig info`` value in words: what a missing one means, and a reason said once, not per kernel."""
    if key == "git_commit":
        if v is None:
            return str(info.get("git_commit_source") or "unknown")
        dirty = {True: ", dirty: tracked files changed", False: ", clean"}.get(info.get("git_dirty"), "")
        return f"{v}{dirty} (from {info.get('git_commit_source', 'unknown')})"
    if key == "host" and isinstance(v, dict):
        return host_text(v)
    if v is None:
        return "not installed"
    if key == "kernel_build_status" and isinstance(v, dict) and str(info.get("cuda", "")).startswith("absent"):
        return f"not built ({', '.join(v)}): CUDA is absent here, see cuda"
    return json.dumps(v, default=str) if isinstance(v, dict | list) else str(v)


def host_text(host: dict[str, Any]) -> str:
    """A host record (:func:`dmamig.sweep.hardware.host_facts`) in one line of words."""
    numa = host.get("numa_nodes")
    if isinstance(numa, list):
        nodes = "; ".join(f"node {n.get('node')}: CPUs {n.get('cpus')}" for n in numa)
        numa_text = f"{len(numa)} NUMA node(s) ({nodes})"
    else:
        numa_text = str(numa)
    mem = host.get("memory_bytes")
    mem_text = f"{mem / (1 << 30):.1f} GiB" if isinstance(mem, int) else str(mem)
    tpc = host.get("threads_per_core")
    return (f"{host.get('cpu_model')}; {host.get('cpus_available')} of {host.get('cpus_online')} CPUs available "
            f"to this process ({host.get('affinity')}); SMT {host.get('smt')}"
            + (f" ({tpc} thread(s) per core)" if tpc else "") + f"; {numa_text}; memory {mem_text}")


def _cmd_info(args: argparse.Namespace) -> int:
    info = info_dict(args.backend)
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 1 if "error" in info else 0
    from rich.markup import escape
    from rich.table import Table

    con = _console()
    t = Table(title="dmamig info", show_header=False, title_justify="left")
    t.add_column("key", style="bold")
    t.add_column("value")
    for key in ("backend", "cuda", "cuda_driver", "cuda_runtime", "nvrtc", "batch_copy", "dmamig", "git_commit",
                "python", "numpy", "numba", "cupy", "host", "platform", "kernel_build_status",
                "error"):
        if key in info:
            t.add_row(key, escape(_info_text(key, info[key], info)))
    con.print(t)
    if info["devices"]:
        d = Table(title="devices", title_justify="left")
        for col in ("#", "name", "memory", "peers", "UUID", "PCI bus", "driver", "CUDA runtime", "compute mode",
                    "persistence", "app clocks MHz (SM, memory)"):
            d.add_column(col)
        for k, dev in enumerate(info.get("gpus") or info["devices"]):
            mem = dev.get("memory_bytes")
            d.add_row(str(k), escape(str(dev.get("name", "?"))), f"{mem / (1 << 30):.1f} GiB" if mem else "?",
                      ", ".join(map(str, dev.get("peers", []))) or "none",
                      *(escape(str(dev.get(key, "unknown"))) for key in ("uuid", "pci_bus_id", "driver",
                                                                        "cuda_runtime", "compute_mode",
                                                                        "persistence_mode")),
                      escape(f"{dev.get('app_clock_graphics_mhz', 'unknown')}, "
                             f"{dev.get('app_clock_memory_mhz', 'unknown')}"))
        con.print(d)
    else:
        con.print("devices: none (the cpu backend emulates device nodes with host-RAM buffers)")
    topo = info.get("topology")
    if isinstance(topo, dict):
        from .topology import Topology

        con.print(f"topology: {escape(str(topo.get('name')))} (read from the CUDA runtime)")
        con.print(escape(Topology.from_dict(topo).format()))
    elif topo:
        con.print(f"topology: {escape(str(topo))}")
    return 1 if "error" in info else 0


def _cmd_selftest(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from rich.markup import escape

    from .backends.cuda import status as cuda_probe
    from .bench.selftest import run_selftest

    con = _console()
    status = cuda_probe.cuda_status()
    # A GPU that CUDA cannot use (an insufficient driver, say) is a failure, never a quiet fallback to the CPU.
    # (No GPU at all with --backend cuda is a usage error, below.)
    if status.state == "unusable" and args.backend in ("cuda", "auto"):
        con.print(f"[bold red]FAIL[/bold red] CUDA backend: a GPU is present but CUDA is not usable: "
                  f"{escape(status.reason or '')}")
        con.print(f"[bold red]selftest ({args.backend}): CUDA is not usable on this GPU machine[/bold red]")
        return 1
    backend = _resolve_backend(parser, args.backend)
    failed = 0
    for name, ok, detail in run_selftest(backend):
        failed += not ok
        mark = "[green]PASS[/green]" if ok else "[bold red]FAIL[/bold red]"
        con.print(f"{mark} {escape(name)}" + (f": {escape(detail)}" if detail else ""))
    if failed:
        con.print(f"[bold red]selftest ({backend}): {failed} check(s) failed[/bold red]")
        return 1
    con.print(f"selftest ({backend}): all checks passed")
    return 0


def _rate(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a number; use a fraction such as 0.01") from None
    if not 0 <= v <= 1:
        raise ValueError(f"{text!r} is out of range; use a fraction in [0, 1], such as 0.01")
    return v


def _roles(text: str) -> tuple[str, ...]:
    from .stress_ops import ROLES

    roles = tuple(r.strip() for r in text.split(",") if r.strip())
    bad = [r for r in roles if r not in ROLES]
    if not roles or bad or len(set(roles)) != len(roles):
        raise ValueError(f"{text!r} is not a list of distinct roles among {','.join(ROLES)}")
    return roles


def _seconds(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a number of seconds, e.g. 60") from None
    if not v > 0:
        raise ValueError(f"{text!r} must be > 0 seconds, e.g. 60")
    return v


def _cmd_stress(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .errors import InvalidArgument
    from .stress import StressConfig, run_stress

    backend = _resolve_backend(parser, args.backend)
    cfg = StressConfig(ops=args.ops, threads=args.threads, fault_rate=args.fault_rate, seed=args.seed,
                       check_every=args.check_every, stall_timeout=args.stall_timeout, backend=backend,
                       files=args.files, anon=not args.files_only, unaudited_no_copy=args.unaudited_no_copy,
                       **({"roles": args.roles} if args.roles else {}))
    print(f"dmamig stress: {cfg.ops} ops, {cfg.threads} threads, fault rate {cfg.fault_rate:g}, backend "
          f"{backend}", flush=True)
    try:
        cfg.validate()
    except InvalidArgument as exc:
        parser.error(str(exc))
    report = run_stress(cfg, out=lambda line: print(line, flush=True))
    for line in report.lines():
        print(line)
    return 0 if report.ok else 1


# -- dmamig bench and dmamig report: output folders -----------------------------------------------------------
# Two runs started in the same second must not share a folder: the default folder is created atomically
# (mkdir without exist_ok), with a -2, -3 ... suffix when the timestamp is taken. A folder given with --out
# that already holds a results.json is refused.

class OutputError(ValueError):
    """An output folder that cannot be used; the message names the argument, the folder and the fix."""


def _why(exc: OSError) -> str:
    return exc.strerror or str(exc)


def check_writable(folder: Path, arg: str = "--out") -> bool:
    """Create ``folder`` if needed and check that files can be written into it.

    Returns
    -------
    bool
        True when this call created the folder (so that a caller can remove it again if it stays empty).

    Raises
    ------
    OutputError
        When ``folder`` is a file, cannot be created or cannot be written.
    """
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"argument {arg}: {str(folder)!r} is a file, not a folder; give a folder path")
    created = not folder.exists()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"argument {arg}: cannot create folder {str(folder)!r}: {_why(exc)}; give a "
                          f"writable folder") from None
    try:
        # Probe with a real file: permission bits alone do not tell (root, read-only mounts, /proc).
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".dmamig-probe-"):
            pass
    except OSError as exc:
        if created:
            remove_if_empty(folder)
        raise OutputError(f"argument {arg}: cannot write into {str(folder)!r}: {_why(exc)}; give a writable "
                          f"folder") from None
    return created


def bench_folder(out: Path | None, now: _dt.datetime | None = None) -> tuple[Path, bool]:
    """The folder a ``dmamig bench`` run writes into, created; and whether this call created it.

    Parameters
    ----------
    out : Path or None
        The ``--out`` argument; None for ``./dmamig-results/<timestamp>/`` made unique with a suffix.
    now : datetime, optional
        The timestamp (the current time by default).

    Raises
    ------
    OutputError
        When the folder cannot be used, or already holds results (they are never overwritten).
    """
    if out is not None:
        if (out / "results.json").exists():
            raise OutputError(f"argument --out: {str(out)!r} already holds a results.json; results are never "
                              f"overwritten: give a new folder, or leave --out out for a fresh one")
        return out, check_writable(out)
    root = Path("dmamig-results")
    check_writable(root, "--out (default ./dmamig-results)")
    stamp = (now or _dt.datetime.now()).strftime("%Y%m%d-%H%M%S")
    for n in range(1, 10_000):
        folder = root / (stamp if n == 1 else f"{stamp}-{n}")
        try:
            folder.mkdir()  # atomic: of two runs racing for one name, exactly one gets it
        except FileExistsError:
            continue
        except OSError as exc:
            raise OutputError(f"argument --out: cannot create folder {str(folder)!r}: {_why(exc)}") from None
        return folder, True
    raise OutputError(f"argument --out: {str(root)!r} has 10000 folders for {stamp}; give --out")


def remove_if_empty(folder: Path) -> None:
    """Remove ``folder`` if it is empty (a run that wrote nothing leaves nothing behind)."""
    try:
        os.rmdir(folder)
    except OSError as exc:
        if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOENT):
            raise


# -- dmamig bench and dmamig report: the commands -------------------------------------------------------------

def cmd_bench(args: argparse.Namespace, parser: argparse.ArgumentParser, backend: str, gpus: int,
              console: Callable[..., Any]) -> int:
    """Run ``dmamig bench``: build the sweep from the arguments, run it, write and print the results.

    Parameters
    ----------
    args, parser
        The parsed arguments and their parser (for usage errors).
    backend : str or None
        The resolved backend, ``"cpu"`` or ``"cuda"``; None to resolve it on the workers of ``--cluster``
        (a scheduler address: this machine may have no GPU while they do).
    gpus : int
        Usable GPUs (0 on the CPU backend); per worker when ``backend`` is None.
    console : callable
        ``console(stderr=False)`` gives a rich console.

    Returns
    -------
    int
        0; 1 when a repetition failed verification, or when cluster tasks failed twice (the others are
        written, with ``"failed"``); 130 after Ctrl-C (the scenarios that finished are written, with
        ``"partial": true``; a folder left empty is removed). A folder that cannot be used, a ``--resume``
        of other settings and a ``--cluster`` that cannot be used are usage errors (exit 2).
    """
    import dataclasses

    from rich.markup import escape
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from .bench.access import stream_batches
    from .bench.migration import PIPELINED
    from .bench.naming import check_copy_baseline, describe_options, format_size
    from .bench.pairs import pair_options, pair_scenarios
    from .bench.report import render_tables, write_plots
    from .bench.results import write_csv, write_json
    from .bench.runner import BenchSweep, SweepFailed, SweepInterrupted
    from .bench.settings import default_settings
    from .bench.verify import VerificationError
    from .errors import InvalidArgument
    from .sweep.cli import check_sweep_arguments, open_sweep, remote_backend

    check_sweep_arguments(args, parser)
    if backend is None:
        backend, gpus = remote_backend(args, parser)
    settings = default_settings(backend, gpus=gpus, quick=args.quick)
    over: dict[str, Any] = {}
    for key in ("sizes", "channels", "repeat", "warmup", "devices", "batch_pages", "batches_per_step"):
        if getattr(args, key) is not None:
            over[key] = getattr(args, key)
    if args.pipeline is not None:
        over["pipeline"] = args.pipeline
    if args.dma_poll_us is not None:
        over["dma_poll_us"] = args.dma_poll_us
    if args.dma_engine == "persistent" and backend == "cpu":
        parser.error("--dma-engine persistent is a cuda setting: the cpu backend's channels already are persistent "
                     "consumers (--dma-poll-us sets their idle window)")
    if args.dma_engine is not None:
        over["dma_engine"] = args.dma_engine
    if args.copy_baseline is not None:
        try:
            over["copy_baseline_name"] = check_copy_baseline(args.copy_baseline, backend)
        except InvalidArgument as exc:
            parser.error(f"--copy-baseline: {exc}")
    if args.total is not None:
        over["total_bytes"] = args.total
    if args.no_engine:
        over["extras"] = False
    if args.no_access:
        over["access"] = False
    if args.files and args.no_files:
        parser.error("argument --no-files: not allowed with --files; drop one of them")
    if args.files:
        over["files"] = True
    if args.no_files:
        over["files"] = False
    if args.files_total is not None:
        if args.no_files or not (args.files or settings.files):
            parser.error("argument --files-total: sizes the file-backed scenarios, which run with --files (or "
                         "--quick) and not with --no-files; add --files")
        over["files_bytes"] = args.files_total
    try:
        # On a cluster the workers' GPUs count: the sweep compares them with --devices itself.
        over.update(pair_options(backend, gpus, args.devices or settings.devices, args.topology, args.pair_total,
                                 args.no_pairs, check_gpus=not getattr(args, "cluster", None)))
    except ValueError as exc:
        parser.error(str(exc))
    for key, field in (("fault_batch", "fault_batches"), ("oversubscription", "oversubscription"),
                       ("access_total", "access_bytes")):
        if getattr(args, key) is not None:
            over[field] = getattr(args, key)
    if getattr(args, "rfc_preset", False):
        from .migrate.options import RFC_DMA_OFFLOAD_BATCH_PAGES

        over["batch_pages"] = list(dict.fromkeys([*(args.batch_pages or settings.batch_pages),
                                                  RFC_DMA_OFFLOAD_BATCH_PAGES]))
    if args.faithful_only:
        axes = [f"--{k}" for k, v in (("batch", args.batch_pages), ("batches-per-step", args.batches_per_step),
                                      ("pipeline", args.pipeline), ("rfc-preset", args.rfc_preset or None))
                if v is not None]
        if axes:
            parser.error(f"argument --faithful-only: not allowed with {', '.join(axes)}, which add experiment "
                         f"settings; drop one of them")
        over["variants"] = False
    settings = dataclasses.replace(settings, **over)
    largest = max(settings.sizes)
    if settings.total_bytes % largest:
        parser.error(f"argument --total: {format_size(settings.total_bytes)} is not a multiple of the largest "
                     f"folio size {format_size(largest)}; use e.g. --total {format_size(largest * 64)}")

    def new_folder() -> tuple[Path, bool]:
        try:
            return bench_folder(args.out)
        except OutputError as exc:
            parser.error(str(exc))

    sweep, out, created, session = open_sweep(
        args, parser, lambda folder, resume: BenchSweep(settings, folder, resume=resume), new_folder,
        backend=backend, gpus=gpus, devices_per_task=settings.devices,
        memory_per_task=WORKING_SET_COPIES * settings.total_bytes)
    # Whatever happens from here on (an error, Ctrl-C), a session closes: its cluster's workers must not outlive
    # the command.
    try:
        err = console(stderr=True)
        experiments = [describe_options(o) for o in settings.option_sets()[1:]]
        if settings.variants:
            experiments.append(f"{describe_options(PIPELINED)} at {format_size(settings.sizes[0])}")
        err.print(f"dmamig bench: backend {backend}, sizes {','.join(format_size(s) for s in settings.sizes)}, "
                  f"{format_size(settings.total_bytes)} per scenario, DMA channels "
                  f"{','.join(map(str, settings.channels))}, repeat {settings.repeat}, faithful batching"
                  + (f" + experiments: {'; '.join(dict.fromkeys(experiments))}" if experiments else " only")
                  + (f"; device access {format_size(settings.access_bytes)}, fault batches "
                     f"{','.join(map(str, stream_batches(settings)))}, stencil at "
                     f"{','.join(f'{f:g}x' for f in sorted(set(settings.oversubscription)))} device memory"
                     if settings.access else "; no device access")
                  + (f"; file-backed scenarios {format_size(settings.files_bytes)}" if settings.files else "")
                  + (f"; device pairs: {settings.devices} devices ({len(pair_scenarios(settings))} ordered pairs, "
                     f"topology {settings.topology}), {format_size(settings.pair_bytes)} each"
                     if pair_scenarios(settings) else "")
                  + f" -> {out}")
        if sweep.prior:
            err.print(f"resuming: {tasks_text(sweep)} finished before, {len(sweep.todo)} to run")
        # The bar moves per repetition (its ETA needs steps that small) and counts tasks, as the interrupt and
        # resume messages do; a resumed sweep's bar starts where the earlier runs stopped.
        done_steps = sum(t.steps for t in sweep.tasks if t.id in sweep.prior)
        with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[tasks]}"),
                      TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                      TextColumn("{task.fields[scenario]}"), console=err) as bar:
            task = bar.add_task("dmamig bench", total=done_steps + sweep.steps, completed=done_steps,
                                tasks=tasks_text(sweep),
                                scenario=f"measuring the copy ceilings, then {sweep.todo[0].label}"
                                if sweep.todo else "")
            try:
                if session is not None:
                    err.print(f"cluster {args.cluster}: scheduler {session.address}, {len(session.workers())} "
                              f"worker(s)")
                doc = sweep.run(progress=lambda sid, n: bar.update(task, advance=n, scenario=sid,
                                                                   tasks=tasks_text(sweep)), session=session)
            except SweepFailed as exc:
                bar.stop()
                _ran_on(exc.doc, err)
                return _failed(exc, out, err)
            except VerificationError as exc:
                bar.stop()
                err.print(f"[bold red]dmamig bench: verification FAILED[/bold red]: {escape(str(exc))}")
                return 1
            except KeyboardInterrupt as exc:  # SweepInterrupted carries the scenarios that finished
                bar.stop()
                return _interrupted(exc.doc if isinstance(exc, SweepInterrupted) else None, out, created, err,
                                    tasks_text(sweep))
            except MemoryError:
                bar.stop()
                if created:
                    remove_if_empty(out)
                err.print(f"dmamig bench: out of memory for {format_size(settings.total_bytes)} per scenario; "
                          f"use a smaller --total")
                return 2
    finally:
        if session is not None:
            session.close()
    write_json(doc, out / "results.json")
    write_csv(doc, out / "results.csv")
    sweep.journal.discard()  # complete: results.json holds every task, and the folder is what it always was
    plots = [] if args.no_plots else write_plots(doc, out)
    render_tables(doc, console())
    names = ", ".join(p.name for p in [out / "results.json", out / "results.csv", *plots])
    err.print(f"wrote {names} to {out} ({doc['wall_s']:.1f} s)")
    if session is not None:
        _ran_on(doc, err)
    return 0


def _ran_on(doc: dict[str, Any], err: Any) -> None:
    """Say how many workers, on which hosts, ran a cluster sweep."""
    from rich.markup import escape

    from .sweep.cluster import workers_summary

    workers = doc["machine"].get("workers") or []
    if workers:
        err.print(escape(f"dmamig bench: ran on {workers_summary(workers)}"), soft_wrap=True)


def tasks_text(sweep: Any) -> str:
    """``"4 of 34 tasks"``: how far a sweep is, counted as the progress bar, the interrupt and the resume
    messages all count it."""
    return f"{sweep.tasks_done} of {len(sweep.tasks)} tasks"


def _interrupted(doc: dict[str, Any] | None, out: Path, created: bool, err: Any, done: str) -> int:
    """Ctrl-C: keep the scenarios that finished (marked partial), or leave no empty folder behind."""
    from .bench.results import write_csv, write_json

    if doc is None:
        if created:
            remove_if_empty(out)
        err.print("dmamig bench: interrupted before any task finished; nothing written")
        return 130
    write_json(doc, out / "results.json")
    write_csv(doc, out / "results.csv")
    err.print(f"dmamig bench: interrupted after {done} finished; kept their {len(doc['scenarios'])} scenario(s) "
              f"in {out / 'results.json'} (marked partial); continue with the same options and --resume {out}",
              soft_wrap=True)
    return 130


def _failed(exc: Any, out: Path, err: Any) -> int:
    """Cluster tasks that failed twice: keep every other scenario, name each failed task and why."""
    from rich.markup import escape

    from .bench.results import write_csv, write_json

    write_json(exc.doc, out / "results.json")
    write_csv(exc.doc, out / "results.csv")
    err.print(f"[bold red]dmamig bench: {len(exc.failures)} task(s) failed twice[/bold red] (kept the "
              f"{len(exc.doc['scenarios'])} scenario(s) that finished in {escape(str(out / 'results.json'))}; "
              f"rerun the rest with --resume {escape(str(out))}):")
    for f in exc.failures:
        err.print(escape(f"  {f.id}: {f.error}"), soft_wrap=True)
    return 1


def _replay_files(*paths: Any) -> bool:
    """Whether the files given to ``report`` are results of ``dmamig replay`` (their ``tool`` says so)."""
    import json

    found = []
    for p in paths:
        if p is None:
            continue
        path = Path(p) / "results.json" if Path(p).is_dir() else Path(p)
        try:
            with open(path, encoding="utf-8") as fh:
                doc = json.load(fh)
        except (OSError, ValueError, RecursionError):
            return False  # not readable as JSON (or absurdly nested): load_results says why
        found.append(isinstance(doc, dict) and str(doc.get("tool", "")).startswith("dmamig replay"))
    return bool(found) and all(found)


def cmd_report(args: argparse.Namespace, console: Callable[..., Any]) -> int:
    """Run ``dmamig report``: print a results file; with a baseline, compare and exit 1 on a regression.

    Exit 2 (one line on stderr) when a file is not a results file, when the two runs' settings differ, when
    they come from different machines (another CPU model or GPU; ``--allow-other-machine`` compares them
    anyway), or when ``--out`` cannot be written.

    Parameters
    ----------
    args
        The parsed arguments.
    console : callable
        ``console(stderr=False)`` gives a rich console.
    """
    from rich.markup import escape

    from .bench.report import render_tables, write_plots
    from .bench.results import (
        ResultsError,
        check_comparable,
        check_same_machine,
        compare_results,
        comparison_table,
        load_results,
        machine_identity,
        regressions,
        write_csv,
    )

    err = console(stderr=True)
    if _replay_files(args.results, args.baseline):
        # Results of ``dmamig replay`` (or a policy study): compared side by side, as replay-report does.
        from types import SimpleNamespace

        from .tiering.commands import cmd_replay_report

        files = [args.results] + ([args.baseline] if args.baseline else [])
        return cmd_replay_report(SimpleNamespace(results=files, markdown=False), console)
    try:
        doc = load_results(args.results)
        base = load_results(args.baseline) if args.baseline else None
        other = bool(getattr(args, "allow_other_machine", False))
        unchecked: list[str] = []
        if base is not None:
            if not other:
                unchecked = check_same_machine(doc, base)
            check_comparable(doc, base, other)
        if args.out:
            check_writable(args.out)
    except (ResultsError, OutputError) as exc:
        # A file that is not a results file, runs that cannot be compared, an unusable folder: usage errors.
        err.print(f"dmamig report: {escape(str(exc))}", soft_wrap=True)
        return 2
    con = console()
    render_tables(doc, con)
    if args.out:
        write_csv(doc, args.out / "results.csv")
        write_plots(doc, args.out)
    if base is None:
        return 0
    if other:
        a, b = machine_identity(doc), machine_identity(base)
        err.print(escape(f"dmamig report: comparing runs of different machines on purpose (--allow-other-machine): "
                         f"CPU {a['cpu_model'] or 'unknown'} vs baseline {b['cpu_model'] or 'unknown'}; GPU "
                         f"{a['gpus'] or 'unknown'} vs baseline {b['gpus'] or 'unknown'}; backend "
                         f"{doc['settings']['backend']} vs baseline {base['settings']['backend']}"), soft_wrap=True)
    elif unchecked:
        err.print(f"dmamig report: not checked whether both runs come from the same machine: "
                  f"{', '.join(unchecked)} unknown in one of them (older results record less)", soft_wrap=True)
    comps = compare_results(doc, base, args.threshold, args.metric, other_machine=other)
    con.print(comparison_table(comps, args.threshold, args.metric))
    bad = regressions(comps)
    unsure = [c for c in comps if c.inconclusive and not c.regressed]
    if unsure:
        err.print(f"dmamig report: {len(unsure)} scenario(s) inconclusive, slower beyond "
                  f"{args.threshold:.0%} but with too few repetitions to tell from noise (rerun with --repeat 3 "
                  f"or more):")
        for c in unsure:
            err.print(escape(f"  {c.name or c.id} ({c.id}): {c.ratio:.3f}x baseline"))
    if bad:
        err.print(f"[bold red]dmamig report: {len(bad)} scenario(s) regressed beyond {args.threshold:.0%} "
                  f"({args.metric}):[/bold red]")
        for c in bad:
            detail = f"{c.ratio:.3f}x baseline" if c.ratio is not None else c.note
            err.print(escape(f"  {c.name or c.id} ({c.id}): {detail}")
                      + (f" ({c.note})" if c.note and c.ratio is not None else ""))
        return 1
    err.print(f"dmamig report: no regression beyond {args.threshold:.0%} ({args.metric}, {len(comps)} scenarios"
              + (f", {len(unsure)} inconclusive)" if unsure else ")"))
    return 0


def _check_parsed(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse option values argparse let through unconverted.

    ``--opt=--`` reaches the namespace as ``[]`` without the option's type ever seeing it (an argparse
    quirk); every option here takes one value, so an empty list is always a usage error.
    """
    cmd = _command_parser(parser, args.command)
    for action in cmd._actions:
        if action.option_strings and action.nargs is None and getattr(args, action.dest, None) == []:
            cmd.error(f"argument {'/'.join(action.option_strings)}: expected one value, got '--'")


def _command_parser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    """The subcommand's own parser: its usage errors read ``dmamig COMMAND: error: ...``, as argparse's do."""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[command]


def _attach_negative_values(argv: list[str]) -> list[str]:
    """``--total -8M`` as ``--total=-8M``: argparse takes a value starting with ``-`` for an option and says
    "expected one argument"; attached, the value reaches its option's check, which says what is allowed."""
    out: list[str] = []
    for tok in argv:
        if out and re.match(r"^-\d", tok) and out[-1].startswith("--") and "=" not in out[-1]:
            out[-1] = f"{out[-1]}={tok}"
        else:
            out.append(tok)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``dmamig`` command line; return its exit code.

    Parameters
    ----------
    argv : sequence of str, optional
        Arguments without the program name (``sys.argv[1:]`` by default).
    """
    parser = build_parser()
    args = parser.parse_args(_attach_negative_values(sys.argv[1:] if argv is None else list(argv)))
    _check_parsed(parser, args)
    cmd = _command_parser(parser, args.command)
    if args.command == "bench":
        from .sweep.cli import is_remote

        if is_remote(args.cluster):  # the workers decide the backend: this machine may have no GPU
            return cmd_bench(args, cmd, None, 0, _console)
        backend = _resolve_backend(cmd, args.backend)
        return cmd_bench(args, cmd, backend, _gpu_count(backend), _console)
    if args.command == "report":
        return cmd_report(args, _console)
    if args.command == "info":
        return _cmd_info(args)
    if args.command == "selftest":
        return _cmd_selftest(args, cmd)
    if args.command == "stress":
        return _cmd_stress(args, cmd)
    if args.command == "replay":
        from .tiering.commands import cmd_replay

        return cmd_replay(args, _console)
    if args.command == "replay-report":
        from .tiering.commands import cmd_replay_report

        return cmd_replay_report(args, _console)
    if args.command == "model":
        from .bench.model_command import cmd_model

        return cmd_model(args, _console)
    from .bench.results import RESULTS_SCHEMA

    print(json.dumps(RESULTS_SCHEMA, indent=2))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
