"""The ``dmamig replay`` command: replay a trace or a built-in workload under a policy, copy vs no-copy."""

from __future__ import annotations

import argparse
import json
import platform
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import InvalidArgument
from .lackey import lackey_to_trace
from .policies import POLICIES
from .replay import BACKINGS
from .trace import Trace, TraceError, load_trace, save_trace
from .workloads import WORKLOADS, make_workload

__all__ = ["add_replay_parser", "add_replay_report_parser", "cmd_replay", "cmd_replay_report", "load_source"]


def _fraction(text: str) -> float:
    v = float(text)
    if not 0.0 < v <= 1.0:
        raise ValueError(f"{text!r} is not a fraction in (0, 1], e.g. 0.25")
    return v


def _cost(text: str) -> float:
    v = float(text)
    if not v > 0:
        raise ValueError(f"{text!r} is not a cost > 0, e.g. 2.5")
    return v


def add_replay_parser(sub: Any, argtype: Callable, positive: Callable, nonnegative: Callable) -> None:
    """Add ``replay`` to the ``dmamig`` subcommands."""
    r = sub.add_parser(
        "replay", help="replay a trace or a built-in workload on tiered memory under a migration policy",
        description="Replay an access trace (.npz/.parquet, or a Valgrind Lackey --trace-mem=yes log) or a "
                    f"built-in workload ({', '.join(sorted(WORKLOADS))}) on a machine with a fast and a slow "
                    "host tier, with a policy choosing migrations after each epoch, in copy and/or no-copy "
                    "mode. Prints a table, writes results.json and plots; exit 1 when data did not verify.")
    r.add_argument("source", metavar="TRACE|WORKLOAD", help="a trace file or a built-in workload name")
    r.add_argument("--policy", choices=sorted(POLICIES), default="tpp", help="migration policy (tpp)")
    r.add_argument("--mode", choices=("copy", "no-copy", "both"), default="both",
                   help="copy: the migrating thread copies; no-copy: the DMA engine does; both (default)")
    r.add_argument("--channels", type=argtype(positive), default=2, metavar="N", help="DMA channels (2)")
    r.add_argument("--threads", type=argtype(positive), default=1, metavar="T", help="accessor threads (1)")
    r.add_argument("--device-fraction", type=argtype(_fraction), default=0.5, metavar="F",
                   help="device frames as a share of the region's pages, for traces with device actors (0.5)")
    r.add_argument("--fast-fraction", type=argtype(_fraction), default=0.25, metavar="F",
                   help="fast-tier frames as a share of the region's pages (0.25)")
    r.add_argument("--slow-cost", type=argtype(_cost), default=2.5, metavar="C",
                   help="relative cost per byte of the slow tier (2.5)")
    r.add_argument("--pages", type=argtype(positive), default=512, help="workload: region pages (512)")
    r.add_argument("--epochs", type=argtype(positive), default=16, help="workload: epochs (16)")
    r.add_argument("--per-epoch", type=argtype(positive), default=256, metavar="N",
                   help="workload: accesses per epoch; Lackey: accesses per epoch (256)")
    r.add_argument("--actors", type=argtype(positive), help="workload: actors (the workload's default)")
    r.add_argument("--seed", type=argtype(nonnegative), default=0, help="workload and initial bytes seed (0)")
    r.add_argument("--backing", choices=BACKINGS, default="anon",
                   help="the region: private anonymous memory (anon), shared anonymous memory (shmem), or a shared "
                        "mapping of a real file whose bytes on disk are checked at the end (file)")
    r.add_argument("--format", choices=("auto", "trace", "lackey"), default="auto",
                   help="how to read a TRACE file: auto (.npz/.parquet are traces, other files Lackey logs)")
    r.add_argument("--record", type=Path, metavar="PATH", help="also save the replayed trace (.npz/.parquet)")
    r.add_argument("--out", type=Path, metavar="DIR", help="results folder (default replay-results/NAME-POLICY)")
    r.add_argument("--no-plots", action="store_true", help="skip the figures")
    from ..sweep.cli import add_sweep_arguments

    add_sweep_arguments(r, "mode's replay")


def load_source(args: argparse.Namespace) -> Trace:
    """The trace ``args.source`` names: a trace file, a Lackey log or a built-in workload."""
    path = Path(args.source)
    if path.exists():
        fmt = args.format
        if fmt == "auto":
            fmt = "trace" if path.suffix in (".npz", ".parquet") else "lackey"
        return load_trace(path) if fmt == "trace" else lackey_to_trace(path, per_epoch=args.per_epoch)
    if args.source in WORKLOADS:
        extra = {} if args.actors is None else {"actors": args.actors}
        return make_workload(args.source, pages=args.pages, epochs=args.epochs, per_epoch=args.per_epoch,
                             seed=args.seed, **extra)
    raise TraceError(f"{args.source!r} is neither a file nor a built-in workload "
                     f"({', '.join(sorted(WORKLOADS))})")


def _table(runs: list[dict[str, Any]], console: Any) -> None:
    from rich.table import Table

    t = Table(title=f"dmamig replay: {runs[0]['config']['trace']} under {runs[0]['config']['policy']}")
    cols = ["mode", "fast hits", "promoted", "demoted", "MiB moved", "migr CPU ms", "CPU/page us", "stalls",
            "stall ms", "access cost", "UVM in/out", "verified"]
    for c in cols:
        t.add_column(c, justify="left" if c == "mode" else "right")
    for run in runs:
        s = run["summary"]
        per = s["cpu_ns_per_migrated_page"]
        t.add_row(run["config"]["mode"], f"{s['fast_hit_share']:.1%}", str(s["promoted"]), str(s["demoted"]),
                  f"{s['bytes_migrated'] / 2**20:.1f}", f"{s['migrate_cpu_ns'] / 1e6:.2f}",
                  "-" if per is None else f"{per / 1e3:.1f}", str(s["stalls"]), f"{s['stall_ns'] / 1e6:.2f}",
                  f"{s['access_cost']:.3g}", f"{s.get('uvm_migrated', 0)}/{s.get('uvm_evicted', 0)}",
                  "yes" if s["verified"] else "[red]NO[/red]")
    console.print(t)


def _replay_folder(out: Path | None, name: str) -> tuple[Path, bool]:
    """The folder a replay writes into, and whether this call created it: ``--out`` unless it already holds
    results (never overwritten), else ``replay-results/NAME``, or ``NAME-2``, ``NAME-3`` ... when taken."""
    from ..sweep.journal import JOURNAL_NAME

    if out is not None:
        # An interrupted replay's folder (its journal is there) is left to the sweep, which says to --resume it.
        if (out / "results.json").exists() and not (out / JOURNAL_NAME).exists():
            raise _UsageError(f"argument --out: {str(out)!r} already holds a results.json; results are never "
                              f"overwritten: give a new folder, or leave --out out for a fresh one")
        return out, False
    root = Path("replay-results")
    for n in range(1, 10_000):
        folder = root / (name if n == 1 else f"{name}-{n}")
        try:
            folder.mkdir(parents=True)  # atomic: of two replays racing for one name, exactly one gets it
        except FileExistsError:
            continue
        except OSError as exc:
            raise _UsageError(f"argument --out: cannot create {str(folder)!r}: {exc.strerror or exc}") from None
        return folder, True
    raise _UsageError(f"argument --out: {str(root)!r} has 10000 folders named {name}; give --out")


class _UsageError(Exception):
    """A usage error of ``dmamig replay``: printed in one line, exit 2."""


class _Usage:
    # What the shared --cluster/--resume checks call on a usage error (they are written for argparse).
    def error(self, message: str) -> None:
        raise _UsageError(message)


def cmd_replay(args: argparse.Namespace, console_factory: Callable[..., Any]) -> int:
    """Run ``dmamig replay``; return the exit code (2: a bad trace, workload, ``--cluster`` or ``--resume``;
    1: data that did not verify, or cluster tasks that failed twice; 130: Ctrl-C, finished modes kept)."""
    from rich.progress import Progress

    from ..sweep.cli import check_sweep_arguments, open_sweep
    from .sweep import ReplayJob, ReplaySweep, replay_tasks

    con = console_factory()
    try:
        check_sweep_arguments(args, _Usage())
        trace = load_source(args).validate()
        unparsed = int((trace.meta or {}).get("unparsed_lines", 0))
        if unparsed:
            con.print(f"dmamig replay: {unparsed} line(s) of {args.source} are not Lackey access lines (nor "
                      f"Valgrind banners) and were skipped", markup=False, highlight=False)
        if args.record is not None:
            save_trace(trace, args.record)
        modes = ["copy", "no-copy"] if args.mode == "both" else [args.mode]
        job = ReplayJob(trace, args.policy, fast_fraction=args.fast_fraction, slow_cost=args.slow_cost,
                        channels=args.channels, threads=args.threads, device_fraction=args.device_fraction,
                        seed=args.seed, backing=args.backing)
        sweep, out, _, session = open_sweep(
            args, _Usage(), lambda folder, resume: ReplaySweep(job, replay_tasks(job, modes), folder,
                                                               job.settings(str(args.source), modes), resume),
            lambda: _replay_folder(args.out, f"{trace.name.replace(':', '-')}-{args.policy}"), backend="cpu")
    except (TraceError, InvalidArgument, _UsageError) as exc:
        # Bad input is a usage error, as for bench and report: one line (some readers' messages span lines).
        console_factory(stderr=True).print(f"dmamig replay: {' '.join(str(exc).split())}", markup=False,
                                           highlight=False, soft_wrap=True)
        return 2
    interrupted, failures, cluster = False, [], None
    try:
        cluster = session.describe() if session else None
        with Progress(console=con, transient=True) as prog:
            bars = {t.id: prog.add_task(t.label, total=t.steps) for t in sweep.todo}
            failures = sweep.run(lambda task, done: prog.update(bars[task.id], completed=done), session)
    except KeyboardInterrupt:
        interrupted = True  # the journal keeps every mode that finished
    finally:
        if session is not None:
            session.close()
    runs = sweep.runs()
    for f in failures:
        con.print(f"dmamig replay: {f.id} failed twice: {f.error}", style="red", markup=False, highlight=False)
    if not runs:
        con.print(f"dmamig replay: {'interrupted' if interrupted else 'failed'} before any replay finished; "
                  f"nothing written")
        return 130 if interrupted else 1
    _table(runs, con)
    out.mkdir(parents=True, exist_ok=True)
    doc = {"tool": "dmamig replay", "source": str(args.source),
           "machine": {"platform": platform.platform(), "processor": platform.processor(),
                       "python": platform.python_version(), "backend": "cpu"},
           "runs": runs}
    if cluster is not None or sweep.prior:
        doc["machine"]["workers"] = sweep.workers()
    if cluster is not None:
        doc["machine"]["cluster"] = cluster
    if interrupted or failures:
        doc["partial"] = True
    if failures:
        doc["failed"] = [{"id": f.id, "error": f.error} for f in failures]
    (out / "results.json").write_text(json.dumps(doc, indent=2))
    if not doc.get("partial"):
        sweep.journal.discard()  # complete: nothing is left to resume
    files = [] if args.no_plots else _plots(runs, out)
    con.print(f"wrote {out / 'results.json'}" + "".join(f", {f.name}" for f in files))
    if cluster is not None:
        from ..sweep.cluster import workers_summary

        con.print(f"dmamig replay: ran on {workers_summary(doc['machine']['workers'])}", markup=False,
                  highlight=False)
    if interrupted or failures:
        con.print(f"dmamig replay: {'interrupted' if interrupted else 'incomplete'}; kept {len(runs)} finished "
                  f"replay(s) (marked partial); continue with the same options and --resume {out}")
        return 130 if interrupted else 1
    bad = [r["config"]["mode"] for r in runs if not r["summary"]["verified"]]
    if bad:
        con.print(f"[red]data did not verify in mode(s) {', '.join(bad)}: "
                  f"{[r['summary']['first_mismatch'] for r in runs]}[/red]")
        return 1
    return 0


def _plots(runs: list[dict[str, Any]], out: Path) -> list[Path]:
    from .plots import plot_replays

    return plot_replays(runs, out)


def add_replay_report_parser(sub: Any) -> None:
    """Add ``replay-report`` to the ``dmamig`` subcommands."""
    r = sub.add_parser("replay-report", help="compare replays: results.json / study.json files side by side",
                       description="Read results of dmamig replay (results.json, or the folder holding it) or "
                                   "of a policy study (study.json) and print one comparison table.")
    r.add_argument("results", nargs="+", type=Path, metavar="RESULTS", help="results.json files or folders")
    r.add_argument("--markdown", action="store_true", help="print a markdown table instead")


def cmd_replay_report(args: argparse.Namespace, console_factory: Callable[..., Any]) -> int:
    """Run ``dmamig replay-report``; exit 1 on an unreadable file or a replay whose data did not verify."""
    from rich.table import Table

    from .study import ROW_FIELDS, compare, markdown_table

    try:
        rows = compare(args.results)
    except (OSError, ValueError, KeyError) as exc:
        console_factory(stderr=True).print(f"dmamig replay-report: cannot read results: {exc}", markup=False)
        return 1
    if args.markdown:
        print(markdown_table(rows), end="")
    else:
        t = Table(title="dmamig replay-report")
        for c in ROW_FIELDS:
            t.add_column(c, justify="left" if c in ("workload", "policy", "mode") else "right")
        for r in rows:
            t.add_row(*("-" if r[c] is None else str(r[c]) for c in ROW_FIELDS))
        console_factory().print(t)
    return 0 if all(r["verified"] for r in rows) else 1
