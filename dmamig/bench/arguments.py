"""The command lines of ``dmamig bench`` and ``dmamig report``: their subparsers and argument types.

Each argument type names what was wrong and what is allowed; :mod:`dmamig.bench.commands` runs the parsed
arguments.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["WORKING_SET_COPIES", "add_bench_parser", "add_report_parser"]


# -- argument types: each names what was wrong and what is allowed ---------------------------------------------

def _sizes(text: str) -> list[int]:
    from .settings import parse_folio_sizes

    return parse_folio_sizes(text)


def _total(text: str) -> int:
    from .settings import PAGE_SIZE, parse_size

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
    from .settings import parse_channels

    return parse_channels(text)


def _batch_pages(text: str) -> list[int]:
    from .settings import parse_batch_pages

    return parse_batch_pages(text)


def _batches_per_step(text: str) -> list[int]:
    from .settings import parse_batches_per_step

    return parse_batches_per_step(text)


def _poll_us(text: str) -> float:
    from .settings import parse_poll_us

    return parse_poll_us(text)


def _pipeline(text: str) -> list[int]:
    from .settings import parse_pipeline

    return parse_pipeline(text)


def _fault_batches(text: str) -> list[int]:
    from .access import parse_fault_batches

    return parse_fault_batches(text)


def _oversubscription(text: str) -> list[float]:
    from .access import parse_oversubscription

    return parse_oversubscription(text)


def _access_total(text: str) -> int:
    from .settings import parse_size

    n = parse_size(text)
    if n % (2 << 20):
        raise ValueError(f"{text!r} is not a whole number of 2 MiB blocks (UVM's unit of prefetch and "
                         f"eviction); use e.g. 32M or 256M")
    limit = _memory_limit()
    if limit and n > limit:
        raise ValueError(f"{text!r} does not fit in this machine's memory; use at most {limit >> 20}M")
    return n


def _devices(text: str) -> int:
    from .pairs import parse_device_count

    return parse_device_count(text)


def _pair_total(text: str) -> int:
    from .pairs import check_pair_bytes
    from .settings import parse_size

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
    from ..topology import PRESETS

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
    b.add_argument("--no-plots", action="store_true", help="do not write PNG plots")
    b.add_argument("--out", type=Path, metavar="DIR",
                   help="output folder, refused if it already holds results (default "
                        "./dmamig-results/<timestamp>/, suffixed -2, -3 ... when taken)")
    from ..sweep.cli import add_sweep_arguments

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
