"""The ``bench`` and ``report`` subcommands of ``dmamig``: what they run.

:mod:`dmamig.cli` builds the command line (with the subparsers of :mod:`dmamig.bench.arguments`) and hands
these two commands their parsed arguments, the resolved backend and a console factory; everything specific to
benchmarks lives in this package, beside the code it drives.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .arguments import WORKING_SET_COPIES

__all__ = ["cmd_bench", "cmd_report", "tasks_text"]


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
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from ..sweep.cli import check_sweep_arguments, open_sweep, remote_backend
    from .access import stream_batches
    from .migration import PIPELINED
    from .naming import describe_options, format_size
    from .output import OutputError, bench_folder, remove_if_empty
    from .pairs import pair_options, pair_scenarios
    from .report import render_tables, write_plots
    from .results import write_csv, write_json
    from .runner import BenchSweep, SweepFailed, SweepInterrupted
    from .settings import default_settings
    from .verify import VerificationError

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
    if getattr(args, "rfc_preset", False):
        from ..migrate.options import RFC_DMA_OFFLOAD_BATCH_PAGES

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

    from ..sweep.cluster import workers_summary

    workers = doc["machine"].get("workers") or []
    if workers:
        err.print(escape(f"dmamig bench: ran on {workers_summary(workers)}"), soft_wrap=True)


def tasks_text(sweep: Any) -> str:
    """``"4 of 34 tasks"``: how far a sweep is, counted as the progress bar, the interrupt and the resume
    messages all count it."""
    return f"{sweep.tasks_done} of {len(sweep.tasks)} tasks"


def _interrupted(doc: dict[str, Any] | None, out: Path, created: bool, err: Any, done: str) -> int:
    """Ctrl-C: keep the scenarios that finished (marked partial), or leave no empty folder behind."""
    from .output import remove_if_empty
    from .results import write_csv, write_json

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

    from .results import write_csv, write_json

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

    from .output import OutputError, check_writable
    from .report import render_tables, write_plots
    from .results import (
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

        from ..tiering.commands import cmd_replay_report

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
