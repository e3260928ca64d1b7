"""The ``bench`` and ``report`` subcommands of ``dmamig``: their arguments and what they run.

:mod:`dmamig.cli` builds the command line and hands these two commands their parsed arguments, the resolved
backend and a console factory; everything specific to benchmarks lives here, beside the code it drives.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["add_bench_parser", "add_report_parser", "cmd_bench", "cmd_report"]


# -- argument types: each names what was wrong and what is allowed ---------------------------------------------

def _sizes(text: str) -> list[int]:
    from .scenarios import parse_folio_sizes

    return parse_folio_sizes(text)


def _total(text: str) -> int:
    from .scenarios import PAGE_SIZE, parse_size

    n = parse_size(text)
    if n % PAGE_SIZE:
        raise ValueError(f"{text!r} is not a whole number of 4 KiB pages; use e.g. 256M or 1G")
    limit = _memory_limit()
    if limit and n > limit:
        raise ValueError(f"{text!r} does not fit in this machine's memory: a scenario holds about "
                         f"{_COPIES} copies of its working set; use at most {limit >> 20}M")
    return n


#: Copies of the working set a scenario holds at once (host node, device node, reference data).
_COPIES = 3


def _memory_limit() -> int:
    """The largest working set that fits in physical memory, in whole MiB (0 when unknown)."""
    try:
        phys = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0
    return (phys // _COPIES) >> 20 << 20


def _channels(text: str) -> list[int]:
    from .scenarios import parse_channels

    return parse_channels(text)


def _batch_pages(text: str) -> list[int]:
    from .scenarios import parse_batch_pages

    return parse_batch_pages(text)


def _batches_per_step(text: str) -> list[int]:
    from .scenarios import parse_batches_per_step

    return parse_batches_per_step(text)


def _pipeline(text: str) -> list[int]:
    from .scenarios import parse_pipeline

    return parse_pipeline(text)


def _fault_batches(text: str) -> list[int]:
    from .access import parse_fault_batches

    return parse_fault_batches(text)


def _oversubscription(text: str) -> list[float]:
    from .access import parse_oversubscription

    return parse_oversubscription(text)


def _access_total(text: str) -> int:
    from .scenarios import parse_size

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
    from .scenarios import parse_size

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
                       description="Print the tables of a results file (and write CSV and plots with --out). "
                                   "With BASELINE, compare scenario by scenario and exit 1 when any scenario "
                                   "is slower than (1 - threshold) times its baseline and the 95%% bootstrap "
                                   "interval of the ratio of median times lies below 1, when a baseline "
                                   "scenario is missing, or when its options differ. Runs with different "
                                   "settings (quick vs full, working set, backend) are refused (exit 2).")
    r.add_argument("results", type=Path, metavar="RESULTS.json")
    r.add_argument("baseline", type=Path, nargs="?", metavar="BASELINE.json")
    r.add_argument("--threshold", type=argtype(_threshold), default=0.1, metavar="FRACTION",
                   help="allowed slowdown before a scenario counts as regressed (default 0.1 = 10 %%)")
    r.add_argument("--metric", choices=("throughput", "ceiling-ratio"), default="throughput",
                   help="compare GB/s (pages per CPU-second for state-only), or the ratio to the same run's "
                        "ceiling, which factors out machine speed (default throughput)")
    r.add_argument("--out", type=Path, metavar="DIR", help="also write results.csv and plots into DIR")


# -- commands --------------------------------------------------------------------------------------------------

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
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from ..sweep.cli import check_sweep_arguments, open_sweep, remote_backend
    from .access import stream_batches
    from .driver import BenchSweep, SweepFailed
    from .naming import describe_options
    from .output import OutputError, bench_folder, remove_if_empty
    from .pairs import pair_options, pair_scenarios
    from .plots import write_plots
    from .report import render_tables, write_csv, write_json
    from .runner import SweepInterrupted, VerificationError
    from .scenarios import PIPELINED, default_settings, format_size

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
    if args.total is not None:
        over["total_bytes"] = args.total
    if args.no_engine:
        over["extras"] = False
    if args.no_access:
        over["access"] = False
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

    def new_folder() -> tuple[Path, bool]:
        try:
            return bench_folder(args.out)
        except OutputError as exc:
            parser.error(str(exc))

    sweep, out, created, session = open_sweep(
        args, parser, lambda folder, resume: BenchSweep(settings, folder, resume=resume), new_folder,
        backend=backend, gpus=gpus, devices_per_task=settings.devices,
        memory_per_task=_COPIES * settings.total_bytes)
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
                  + (f"; device pairs: {settings.devices} devices ({len(pair_scenarios(settings))} ordered pairs, "
                     f"topology {settings.topology}), {format_size(settings.pair_bytes)} each"
                     if pair_scenarios(settings) else "")
                  + f" -> {out}")
        if sweep.prior:
            err.print(f"resuming: {len(sweep.prior)} of {len(sweep.tasks)} task(s) finished before, "
                      f"{len(sweep.todo)} to run")
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      TextColumn("{task.fields[scenario]}"), console=err) as bar:
            task = bar.add_task("migrating", total=sweep.steps, scenario="")
            try:
                if session is not None:
                    err.print(f"cluster {args.cluster}: scheduler {session.address}, {len(session.workers())} "
                              f"worker(s)")
                doc = sweep.run(progress=lambda sid, n: bar.update(task, advance=n, scenario=sid), session=session)
            except SweepFailed as exc:
                bar.stop()
                return _failed(exc, out, err)
            except VerificationError as exc:
                bar.stop()
                err.print(f"[bold red]dmamig bench: verification FAILED[/bold red]: {escape(str(exc))}")
                return 1
            except KeyboardInterrupt as exc:  # SweepInterrupted carries the scenarios that finished
                bar.stop()
                return _interrupted(exc.doc if isinstance(exc, SweepInterrupted) else None, out, created, err)
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
    return 0


def _interrupted(doc: dict[str, Any] | None, out: Path, created: bool, err: Any) -> int:
    """Ctrl-C: keep the scenarios that finished (marked partial), or leave no empty folder behind."""
    from .output import remove_if_empty
    from .report import write_csv, write_json

    if doc is None:
        if created:
            remove_if_empty(out)
        err.print("dmamig bench: interrupted before any scenario finished; nothing written")
        return 130
    write_json(doc, out / "results.json")
    write_csv(doc, out / "results.csv")
    err.print(f"dmamig bench: interrupted; kept the {len(doc['scenarios'])} scenario(s) that finished in "
              f"{out / 'results.json'} (marked partial); continue with the same options and --resume {out}",
              soft_wrap=True)
    return 130


def _failed(exc: Any, out: Path, err: Any) -> int:
    """Cluster tasks that failed twice: keep every other scenario, name each failed task and why."""
    from rich.markup import escape

    from .report import write_csv, write_json

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

    Exit 2 (one line on stderr) when a file is not a results file, when the two runs' settings differ, or
    when ``--out`` cannot be written.

    Parameters
    ----------
    args
        The parsed arguments.
    console : callable
        ``console(stderr=False)`` gives a rich console.
    """
    from rich.markup import escape

    from .output import OutputError, check_writable
    from .plots import write_plots
    from .report import (
        check_comparable,
        compare_results,
        comparison_table,
        load_results,
        regressions,
        render_tables,
        write_csv,
    )
    from .schema import ResultsError

    err = console(stderr=True)
    if _replay_files(args.results, args.baseline):
        # Results of ``dmamig replay`` (or a policy study): compared side by side, as replay-report does.
        from types import SimpleNamespace

        from ..tiering.commands import cmd_replay_report

        files = [args.results] + ([args.baseline] if args.baseline else [])
        return cmd_replay_report(SimpleNamespace(results=files, markdown=False), console)
    try:
        doc = load_results(args.results)
        base = load_results(args.baseline) if args.baseline else None
        if base is not None:
            check_comparable(doc, base)
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
