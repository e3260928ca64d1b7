"""The ``dmamig`` command: ``bench``, ``report``, ``info``, ``selftest``, ``schema`` and ``stress``.

Exit codes: 0 success; 1 a failure the command found (a regression beyond the threshold, a benchmark whose
data failed verification, a failed self-test, an unreadable results file); 2 a usage error (argparse).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["build_parser", "main"]


# -- argument types: each names what was wrong and what is allowed ---------------------------------------------

def _argtype(fn: Callable[[str], Any]) -> Callable[[str], Any]:
    def wrapped(text: str) -> Any:
        try:
            return fn(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    wrapped.__name__ = fn.__name__
    return wrapped


def _sizes(text: str) -> list[int]:
    from .bench.scenarios import parse_folio_sizes

    return parse_folio_sizes(text)


def _total(text: str) -> int:
    from .bench.scenarios import PAGE_SIZE, parse_size

    n = parse_size(text)
    if n % PAGE_SIZE:
        raise ValueError(f"{text!r} is not a whole number of 4 KiB pages; use e.g. 256M or 1G")
    return n


def _channels(text: str) -> list[int]:
    from .bench.scenarios import parse_channels

    return parse_channels(text)


def _batch_pages(text: str) -> list[int]:
    from .bench.scenarios import parse_batch_pages

    return parse_batch_pages(text)


def _batches_per_step(text: str) -> list[int]:
    from .bench.scenarios import parse_batches_per_step

    return parse_batches_per_step(text)


def _pipeline(text: str) -> list[int]:
    from .bench.scenarios import parse_pipeline

    return parse_pipeline(text)


def _positive(text: str) -> int:
    if not text.strip().isdigit() or int(text) < 1:
        raise ValueError(f"{text!r} is not a positive whole number, e.g. 3")
    return int(text)


def _nonnegative(text: str) -> int:
    if not text.strip().isdigit():
        raise ValueError(f"{text!r} is not a whole number >= 0, e.g. 1")
    return int(text)


def _threshold(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a number; use a fraction such as 0.1 for 10 %") from None
    if not 0 <= v < 1:
        raise ValueError(f"{text!r} is out of range; use a fraction in [0, 1), such as 0.1 for 10 %")
    return v


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``dmamig`` command."""
    p = argparse.ArgumentParser(
        prog="dmamig",
        description="Emulated Linux page migration with a device DMA engine: copy vs no-copy benchmarks.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    b = sub.add_parser("bench", help="run the copy vs no-copy migration sweep and write a results folder",
                       description="Migrate a working set between host and device nodes with copy migration "
                                   "(the CPU copies) and no-copy migration (the DMA engine copies), over folio "
                                   "sizes and channel counts; every run is verified. Migrations run with the "
                                   "kernel's batching (faithful, the headline); --batch, --batches-per-step "
                                   "and --pipeline add experiment settings as separate, labelled scenarios. "
                                   "Writes results.json, results.csv and PNG plots.")
    b.add_argument("--backend", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto picks cuda when a GPU is usable (DMAMIG_BACKEND overrides auto)")
    b.add_argument("--sizes", type=_argtype(_sizes), metavar="LIST",
                   help="folio sizes, 4k..2m in powers of two (default 4k,64k,2m)")
    b.add_argument("--total", type=_argtype(_total), metavar="SIZE",
                   help="working set per scenario, e.g. 256M or 1G (default 256M on cpu, 1G on cuda)")
    b.add_argument("--channels", type=_argtype(_channels), metavar="LIST",
                   help="DMA channel counts for no-copy migration (default 1,2 on cpu, 1,2,4 on cuda)")
    b.add_argument("--batch", type=_argtype(_batch_pages), metavar="LIST", dest="batch_pages",
                   help="experiment axis: base pages per migration batch, e.g. 512,2048 (the kernel's is 512, "
                        "which always runs)")
    b.add_argument("--batches-per-step", type=_argtype(_batches_per_step), metavar="LIST",
                   help="experiment axis: batches whose phases run together, e.g. 1,16 (the kernel's is 1)")
    b.add_argument("--pipeline", type=_argtype(_pipeline), metavar="LIST",
                   help="experiment axis: steps whose DMA copy overlaps the next step's unmap, e.g. 0,1 "
                        "(no-copy only; the kernel's is 0)")
    b.add_argument("--faithful-only", action="store_true",
                   help="run only the kernel's batching: no default pipelined no-copy variant at the "
                        "smallest folio size")
    b.add_argument("--repeat", type=_argtype(_positive), metavar="N",
                   help="timed repetitions per scenario; medians are reported (default 5; 1 with --quick)")
    b.add_argument("--warmup", type=_argtype(_nonnegative), metavar="N", help="untimed repetitions first (1)")
    b.add_argument("--devices", type=_argtype(_positive), metavar="N",
                   help="device nodes; 2 adds device->device migration (default: GPUs present, at most 2)")
    b.add_argument("--quick", action="store_true", help="tiny sweep for smoke tests (a few seconds)")
    b.add_argument("--no-engine", action="store_true",
                   help="skip the engine scenarios (state-only migration, raw DMA copies)")
    b.add_argument("--no-plots", action="store_true", help="do not write PNG plots")
    b.add_argument("--out", type=Path, metavar="DIR",
                   help="output folder (default ./dmamig-results/<timestamp>/)")

    r = sub.add_parser("report", help="re-render a results.json; with a baseline, check for regressions",
                       description="Print the tables of a results file (and write CSV and plots with --out). "
                                   "With BASELINE, compare scenario by scenario and exit 1 when any scenario "
                                   "is slower than (1 - threshold) times its baseline.")
    r.add_argument("results", type=Path, metavar="RESULTS.json")
    r.add_argument("baseline", type=Path, nargs="?", metavar="BASELINE.json")
    r.add_argument("--threshold", type=_argtype(_threshold), default=0.1, metavar="FRACTION",
                   help="allowed slowdown before a scenario counts as regressed (default 0.1 = 10 %%)")
    r.add_argument("--metric", choices=("throughput", "ceiling-ratio"), default="throughput",
                   help="compare GB/s (pages per CPU-second for state-only), or the ratio to the same run's "
                        "ceiling, which factors out machine speed (default throughput)")
    r.add_argument("--out", type=Path, metavar="DIR", help="also write results.csv and plots into DIR")

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
    st.add_argument("--fault-rate", type=_argtype(_rate), default=0.0, metavar="R",
                    help="chance that each DMA share fails (submission, mid-copy, completion); worker crashes "
                         "and allocation failures at R/4 (default 0)")
    st.add_argument("--seed", type=_argtype(_nonnegative), metavar="S", help="seed (default: random, printed)")
    st.add_argument("--check-every", type=_argtype(_positive), default=1000, metavar="K",
                    help="operations between invariant checks (1000)")
    st.add_argument("--stall-timeout", type=_argtype(_seconds), default=60.0, metavar="SECONDS",
                    help="fail when no thread progresses for this long (60)")
    st.add_argument("--backend", choices=("auto", "cpu", "cuda"), default="cpu")
    return p


# -- commands --------------------------------------------------------------------------------------------------

def _console(stderr: bool = False):
    from rich.console import Console

    con = Console(stderr=stderr)
    # Piped into a CI log, rich would fall back to 80 columns and fold every table; logs can be wide.
    return con if con.is_terminal else Console(stderr=stderr, width=180)


def _resolve_backend(parser: argparse.ArgumentParser, name: str) -> str:
    from .backends import cuda_unavailable_reason, resolve_backend
    from .errors import InvalidArgument

    try:
        resolved = resolve_backend(name)
    except InvalidArgument as exc:
        parser.error(str(exc))
    if resolved == "cuda":
        reason = cuda_unavailable_reason()
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


def _cmd_bench(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import dataclasses

    from rich.markup import escape
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from .bench.naming import describe_options
    from .bench.plots import write_plots
    from .bench.report import render_tables, write_csv, write_json
    from .bench.runner import VerificationError, run_sweep, sweep_steps
    from .bench.scenarios import PIPELINED, default_settings, format_size

    backend = _resolve_backend(parser, args.backend)
    settings = default_settings(backend, gpus=_gpu_count(backend), quick=args.quick)
    over: dict[str, Any] = {}
    for key in ("sizes", "channels", "repeat", "warmup", "devices", "batch_pages", "batches_per_step"):
        if getattr(args, key) is not None:
            over[key] = getattr(args, key)
    if args.pipeline is not None:
        over["pipeline"] = args.pipeline
    if args.total is not None:
        over["total_bytes"] = args.total
    if args.no_engine:
        over["extras"] = False
    if args.faithful_only:
        axes = [f"--{k}" for k, v in (("batch", args.batch_pages), ("batches-per-step", args.batches_per_step),
                                      ("pipeline", args.pipeline)) if v is not None]
        if axes:
            parser.error(f"argument --faithful-only: not allowed with {', '.join(axes)}, which add experiment "
                         f"settings; drop one of them")
        over["variants"] = False
    settings = dataclasses.replace(settings, **over)
    largest = max(settings.sizes)
    if settings.total_bytes % largest:
        parser.error(f"argument --total: {format_size(settings.total_bytes)} is not a multiple of the largest "
                     f"folio size {format_size(largest)}; use e.g. --total {format_size(largest * 64)}")

    out = args.out or Path("dmamig-results") / _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    err = _console(stderr=True)
    experiments = [describe_options(o) for o in settings.option_sets()[1:]]
    if settings.variants:
        experiments.append(f"{describe_options(PIPELINED)} at {format_size(settings.sizes[0])}")
    err.print(f"dmamig bench: backend {backend}, sizes {','.join(format_size(s) for s in settings.sizes)}, "
              f"{format_size(settings.total_bytes)} per scenario, DMA channels "
              f"{','.join(map(str, settings.channels))}, repeat {settings.repeat}, faithful batching"
              + (f" + experiments: {'; '.join(dict.fromkeys(experiments))}" if experiments else " only")
              + f" -> {out}")
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("{task.fields[scenario]}"), console=err) as bar:
        task = bar.add_task("migrating", total=sweep_steps(settings), scenario="")
        try:
            doc = run_sweep(settings, progress=lambda sid, n: bar.update(task, advance=n, scenario=sid))
        except VerificationError as exc:
            bar.stop()
            err.print(f"[bold red]dmamig bench: verification FAILED[/bold red]: {escape(str(exc))}")
            return 1
    write_json(doc, out / "results.json")
    write_csv(doc, out / "results.csv")
    plots = [] if args.no_plots else write_plots(doc, out)
    render_tables(doc, _console())
    names = ", ".join(p.name for p in [out / "results.json", out / "results.csv", *plots])
    err.print(f"wrote {names} to {out} ({doc['wall_s']:.1f} s)")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from rich.markup import escape

    from .bench.plots import write_plots
    from .bench.report import (
        compare_results,
        comparison_table,
        load_results,
        regressions,
        render_tables,
        write_csv,
    )
    from .bench.schema import ResultsError

    err = _console(stderr=True)
    try:
        doc = load_results(args.results)
        base = load_results(args.baseline) if args.baseline else None
    except ResultsError as exc:
        err.print(f"[bold red]dmamig report:[/bold red] {exc}")
        return 1
    con = _console()
    render_tables(doc, con)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        write_csv(doc, args.out / "results.csv")
        write_plots(doc, args.out)
    if base is None:
        return 0
    comps = compare_results(doc, base, args.threshold, args.metric)
    con.print(comparison_table(comps, args.threshold, args.metric))
    bad = regressions(comps)
    if bad:
        err.print(f"[bold red]dmamig report: {len(bad)} scenario(s) regressed beyond {args.threshold:.0%} "
                  f"({args.metric}):[/bold red]")
        for c in bad:
            detail = f"{c.ratio:.3f}x baseline" if c.ratio is not None else c.note
            err.print(escape(f"  {c.name or c.id} ({c.id}): {detail}")
                      + (f" ({c.note})" if c.note and c.ratio is not None else ""))
        return 1
    err.print(f"dmamig report: no regression beyond {args.threshold:.0%} ({args.metric}, {len(comps)} scenarios)")
    return 0


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
    """Everything ``dmamig info`` shows, as a dict."""
    from .backends import cuda_unavailable_reason, open_backend, resolve_backend
    from .bench.runner import machine_info

    reason = cuda_unavailable_reason()
    try:
        backend = resolve_backend(backend_arg)
    except Exception as exc:
        backend, err = "cpu", str(exc)
    else:
        err = None
    devices: list[dict[str, Any]] = []
    if backend == "cuda" and reason is not None:
        err = f"cuda requested but unusable: {reason}"
    else:
        try:
            be = open_backend(backend)
            try:
                devices = [dict(d) for d in be.devices()]
            finally:
                be.close()
        except Exception as exc:
            err = f"{type(exc).__name__}: {exc}"
    info = machine_info(backend, devices)
    info["devices"] = devices
    info["cuda"] = "usable" if reason is None else f"not usable: {reason}"
    info["kernel_build_status"] = _kernel_status()
    if err:
        info["error"] = err
    return info


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
    for key in ("backend", "cuda", "dmamig", "git_commit", "python", "numpy", "numba", "cupy", "cpu",
                "cpu_count", "platform", "kernel_build_status", "error"):
        if key in info:
            v = info[key]
            text = json.dumps(v, default=str) if isinstance(v, dict | list) else str(v)
            t.add_row(key, escape(text))
    con.print(t)
    if info["devices"]:
        d = Table(title="devices", title_justify="left")
        for col in ("#", "name", "memory", "peers"):
            d.add_column(col)
        for k, dev in enumerate(info["devices"]):
            mem = dev.get("memory_bytes")
            d.add_row(str(k), escape(str(dev.get("name", "?"))), f"{mem / (1 << 30):.1f} GiB" if mem else "?",
                      ", ".join(map(str, dev.get("peers", []))) or "none")
        con.print(d)
    else:
        con.print("devices: none (the cpu backend emulates device nodes with host-RAM buffers)")
    return 1 if "error" in info else 0


def _cmd_selftest(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from rich.markup import escape

    from .bench.selftest import run_selftest

    backend = _resolve_backend(parser, args.backend)
    con = _console()
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


def _seconds(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a number of seconds, e.g. 60") from None
    if not v > 0:
        raise ValueError(f"{text!r} must be > 0 seconds, e.g. 60")
    return v


def _cmd_stress(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .stress import StressConfig, run_stress

    backend = _resolve_backend(parser, args.backend)
    cfg = StressConfig(ops=args.ops, threads=args.threads, fault_rate=args.fault_rate, seed=args.seed,
                       check_every=args.check_every, stall_timeout=args.stall_timeout, backend=backend)
    print(f"dmamig stress: {cfg.ops} ops, {cfg.threads} threads, fault rate {cfg.fault_rate:g}, backend "
          f"{backend}", flush=True)
    report = run_stress(cfg, out=lambda line: print(line, flush=True))
    for line in report.lines():
        print(line)
    return 0 if report.ok else 1


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``dmamig`` command line; return its exit code.

    Parameters
    ----------
    argv : sequence of str, optional
        Arguments without the program name (``sys.argv[1:]`` by default).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "bench":
        return _cmd_bench(args, parser)
    if args.command == "report":
        return _cmd_report(args)
    if args.command == "info":
        return _cmd_info(args)
    if args.command == "selftest":
        return _cmd_selftest(args, parser)
    if args.command == "stress":
        return _cmd_stress(args, parser)
    from .bench.schema import RESULTS_SCHEMA

    print(json.dumps(RESULTS_SCHEMA, indent=2))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
