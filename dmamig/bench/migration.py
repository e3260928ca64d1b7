"""Migration scenarios: a working set migrated around a cycle of nodes with ``mm.migrate``, copy or no-copy.

A *group* is one working set migrated around a cycle of nodes (host -> device -> back) in one mode; each leg of
the cycle is a *scenario* with its own figures. Grouping the legs means every timed repetition starts from a
populated range on the right node without an untimed reset in between. Every migration runs with the batching
its scenario names (:class:`~dmamig.MigrateOptions`), and its record says which: the kernel's (``faithful``,
the headline) or an experiment such as :data:`PIPELINED`.

Timing rules (the engine scenarios of :mod:`dmamig.bench.engine` follow them too): each scenario warms up first
(untimed: first touch, kernel compilation, allocator state), then runs ``repeat`` timed repetitions and reports
medians. Wall time is ``time.perf_counter_ns`` around the call; CPU time is ``time.thread_time_ns`` of the
calling thread, which is the migrating thread (DMA channels run elsewhere, which is the point of no-copy
migration). Every repetition, warm-up included, is verified after it ran: status codes, the node of every page,
and per-page checksums against the source; the group's bytes are read back once at the end. A wrong result
raises :class:`~dmamig.bench.verify.VerificationError`, whatever its speed.

This module holds the whole kind: its scenarios, the runner, the record of a scenario (the medians of its timed
repetitions, its phases and its ratio to the same run's copy ceiling), the pairing of no-copy with copy
records, the report's tables and the plots.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.table import Table

from ..migrate.options import FAITHFUL, MigrateOptions
from ..sweep.tasks import ProgressFn
from .naming import (
    DIRECTIONS,
    batching_class,
    copy_baseline_tag,
    describe_options,
    format_number,
    format_size,
    options_id,
    options_of,
    scenario_name,
    settings_words,
)
from .plots import BARS, EXTRA_COLORS, PHASE_COLORS, PHASE_LEGEND, pyplot, save_figure, spread_bars
from .results import PHASES, wall_spread
from .settings import PAGE_SIZE, BenchSettings, folio_order
from .timing import timed_call, timing_fields
from .verify import bench_machine, check, random_bytes, range_pfns, verify_pages, verify_result

__all__ = [
    "PIPELINED",
    "MigrateGroup",
    "Scenario",
    "add_migration_speedups",
    "ceiling_label",
    "ceilings_of",
    "check_options",
    "migration_groups",
    "migration_tables",
    "plot_copy_vs_nocopy",
    "plot_phases",
    "plot_throughput",
    "repetition",
    "result_phases",
    "run_group",
    "scenario_record",
    "write_migration_plots",
]

#: The pipelined variant every default sweep adds for no-copy at its smallest folio size: the setting that hid
#: the emulator's per-batch cost before the kernel's batching became the default. An experiment, never a headline.
PIPELINED = MigrateOptions(batches_per_step=16, pipeline_depth=1)

@dataclass(frozen=True)
class Scenario:
    """One measured figure set: a migration leg, a state-only migration or a raw DMA copy.

    ``kind`` is ``"migrate"`` (end-to-end ``mm.migrate``), ``"state"`` (``m.migrate_pages`` with ``NO_COPY``:
    page state only) or ``"dma"`` (``m.dma.copy`` of pages, ``layout`` ``"random"`` or ``"contiguous"``).
    ``options`` is the migration's batching (``None`` for a raw DMA copy, which migrates nothing).
    """

    kind: str
    folio_bytes: int
    total_bytes: int
    mode: str = "nocopy"
    direction: str = "h2d"
    channels: int | None = None
    layout: str = ""
    options: MigrateOptions | None = FAITHFUL

    @property
    def id(self) -> str:
        """A stable identifier, used to match scenarios between a run and its baseline.

        The kernel's batching adds no suffix (ids stay as they were before settings were recorded); an
        experiment appends its settings, e.g. ``migrate/h2d/4k/nocopy/ch2/steps16-pipe1``.
        """
        size = format_size(self.folio_bytes).lower()
        if self.kind == "migrate":
            ch = f"/ch{self.channels}" if self.mode == "nocopy" else ""
            return f"migrate/{self.direction}/{size}/{self.mode}{ch}{options_id(self.options)}"
        if self.kind == "state":
            return f"state/{size}{options_id(self.options)}"
        return f"dma/{self.layout}/{size}/ch{self.channels}"

    @property
    def name(self) -> str:
        """The scenario in words, e.g. ``host->device, 4K pages, no-copy, 2 DMA channels``."""
        return scenario_name(self.kind, self.direction, self.folio_bytes, self.mode, self.channels, self.layout,
                             self.options)

    @property
    def pages(self) -> int:
        """Base pages moved."""
        return self.total_bytes // PAGE_SIZE

    @property
    def order(self) -> int:
        """Folio order."""
        return folio_order(self.folio_bytes)

@dataclass(frozen=True)
class MigrateGroup:
    """One working set migrated around ``path`` (node kinds) in one mode; one scenario per leg.

    ``path`` is a cycle of direction names, e.g. ``("h2d", "d2h")`` or ``("h2d", "d2d", "d2h")``.
    """

    mode: str
    folio_bytes: int
    total_bytes: int
    channels: int | None
    path: tuple[str, ...]
    scenarios: tuple[Scenario, ...] = field(default=())
    options: MigrateOptions = FAITHFUL

    @property
    def id(self) -> str:
        """A stable identifier of the group, e.g. ``group/4k/nocopy/ch2`` (experiments append their settings)."""
        size = format_size(self.folio_bytes).lower()
        ch = f"/ch{self.channels}" if self.channels else ""
        return f"group/{size}/{self.mode}{ch}{options_id(self.options)}"

    @property
    def label(self) -> str:
        """A short progress label."""
        ch = f", {self.channels} DMA ch." if self.channels else ""
        how = "no-copy" if self.mode == "nocopy" else "copy"
        return f"{how} {format_size(self.folio_bytes)}{ch}{options_id(self.options)}"

def _path(devices: int) -> tuple[str, ...]:
    return ("h2d", "d2d", "d2h") if devices >= 2 else ("h2d", "d2h")

def _group(settings: BenchSettings, mode: str, size: int, ch: int | None, opts: MigrateOptions) -> MigrateGroup:
    path = _path(settings.devices)
    legs = tuple(Scenario("migrate", size, settings.total_bytes, mode, d, ch, options=opts) for d in path)
    return MigrateGroup(mode, size, settings.total_bytes, ch, path, legs, opts)

def migration_groups(settings: BenchSettings) -> list[MigrateGroup]:
    """Expand settings into migration groups, each with its per-leg scenarios.

    Copy migration does not use the DMA engine, so it runs once per folio size and batching (a pipeline depth
    changes nothing without a DMA copy to overlap); no-copy runs once per channel count. The kernel's batching
    comes first (the headline), then each experiment of the sweep axes at every folio size, then (with
    ``settings.variants``) :data:`PIPELINED` no-copy at the smallest folio size beside copy at the same
    batches per step.
    """
    plan: list[tuple[str, int, int | None, MigrateOptions]] = []

    def add(mode: str, size: int, opts: MigrateOptions) -> None:
        if mode == "copy":
            # Without a DMA engine the pipeline depth is ignored: run each copy batching once.
            opts = MigrateOptions(opts.batch_pages, opts.batches_per_step, 0)
            todo = [None]
        else:
            todo = list(settings.channels)
        for ch in todo:
            if (mode, size, ch, opts) not in plan:
                plan.append((mode, size, ch, opts))

    for opts in settings.option_sets():
        for size in settings.sizes:
            add("copy", size, opts)
            add("nocopy", size, opts)
    if settings.variants:
        add("copy", settings.sizes[0], PIPELINED)
        add("nocopy", settings.sizes[0], PIPELINED)
    return [_group(settings, mode, size, ch, opts) for mode, size, ch, opts in plan]


# -- running a group ------------------------------------------------------------------------------------------

#: Node that each direction migrates to (node 0 is host RAM; 1 and 2 are device nodes).
_TARGET = {"h2d": 1, "d2d": 2, "d2h": 0}

def result_phases(res: Any) -> dict[str, int]:
    """The phase times a migration result reports, as plain ints (ns)."""
    return {p: int(v) for p, v in dict(getattr(res, "phase_ns", None) or {}).items()}

def check_options(res: Any, sc: Scenario, what: str) -> None:
    """Check that ``res`` ran with the batching ``sc`` names."""
    # A result records the batching it ran with; a figure labelled with other settings would be a wrong figure.
    ran = getattr(res, "options", None)
    check(ran is None or ran == sc.options, what,
          f"ran with {describe_options(ran)} but the scenario asked for {describe_options(sc.options)}")

def repetition(sc: Scenario, rep: int) -> str:
    """A repetition of ``sc`` in words, for verification messages."""
    return f"{sc.name} ({sc.id}), repetition {rep + 1}"

def run_group(g: MigrateGroup, settings: BenchSettings, ceilings: dict[str, dict], progress: ProgressFn,
              seed: int) -> list[dict[str, Any]]:
    """Migrate one working set around the group's cycle ``warmup + repeat`` times; one record per leg."""
    from ..flags import MigrateMode

    pages = g.total_bytes // PAGE_SIZE
    order = g.scenarios[0].order
    with bench_machine(settings, pages, g.channels or 1, mode=g.mode) as m:
        mm = m.address_space()
        try:
            addr = mm.mmap(g.total_bytes, order=order)
            data = random_bytes(g.total_bytes, seed)
            mm.write(addr, data)
            pfns = range_pfns(mm, addr, pages)
            verify_pages(m, pfns, 0, None, f"{g.label}: populate")
            ref = np.asarray(m.dma.checksum(pfns))
            engine = m.dma if g.mode == "nocopy" else None
            samples: dict[str, dict[str, list]] = {d: {"wall": [], "cpu": [], "phase": [], "res": []}
                                                   for d in g.path}
            for rep in range(settings.warmup + settings.repeat):
                for sc in g.scenarios:
                    target = _TARGET[sc.direction]
                    res, wall, cpu = timed_call(mm.migrate, addr, g.total_bytes, target, mode=MigrateMode.SYNC,
                                                engine=engine, options=g.options)
                    what = repetition(sc, rep)
                    verify_result(res, pages, what)
                    check_options(res, sc, what)
                    verify_pages(m, range_pfns(mm, addr, pages), target, ref, what)
                    if rep >= settings.warmup:
                        s = samples[sc.direction]
                        s["wall"].append(wall)
                        s["cpu"].append(cpu)
                        s["phase"].append(result_phases(res))
                        s["res"].append(res)
                    progress(sc.name, 1)
            back = mm.read(addr, g.total_bytes)
            bad = np.flatnonzero(back != data)
            check(bad.size == 0, f"{g.label}: read-back", f"{bad.size} bytes differ from the bytes written "
                                                          f"(first at offset {bad[:1].tolist()})")
        finally:
            mm.close()
    out = []
    for sc in g.scenarios:
        s = samples[sc.direction]
        last = s["res"][-1]
        out.append(scenario_record(sc, s["wall"], s["cpu"], s["phase"], ceilings.get(sc.direction), {
            "nr_succeeded": int(last.nr_succeeded),
            "nr_failed": int(last.nr_failed),
            "nr_thp_split": int(getattr(last, "nr_thp_split", 0)),
        }))
    return out


# -- records -------------------------------------------------------------------------------------------------

def scenario_record(sc: Scenario, walls: list[int], cpus: list[int], phases: list[dict[str, int]],
                    ceiling: dict[str, Any] | None, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The record of scenario ``sc`` from its timed repetitions: medians of ``walls`` and ``cpus`` (ns) and of
    each phase, throughput, and the ratio to ``ceiling`` (the same run's copy ceiling, or None); ``extra``
    adds fields of its kind. Speedups stay None until :func:`add_migration_speedups` pairs the sweep's records."""
    rec: dict[str, Any] = {
        "id": sc.id,
        "name": sc.name,
        "kind": sc.kind,
        "mode": sc.mode,
        "direction": sc.direction,
        "direction_name": DIRECTIONS[sc.direction],
        "layout": sc.layout,
        "folio_bytes": sc.folio_bytes,
        "folio_order": sc.order,
        "channels": sc.channels,
        "options": sc.options.as_dict() if sc.options is not None else None,
        "batching": describe_options(sc.options),
        "bytes": sc.total_bytes,
        "pages": sc.pages,
        **timing_fields(sc.total_bytes, sc.pages, walls, cpus, phases,
                        ceiling["gbps"] if ceiling else None, ceiling["method"] if ceiling else None),
        "verified": True,
    }
    rec.update(extra or {})
    return rec

def add_migration_speedups(records: list[dict[str, Any]], copy_baseline: str = "cpu") -> None:
    """Fill ``speedup_vs_copy``, ``speedup_vs`` and ``speedup_vs_faithful_copy`` of every no-copy migration,
    and ``copy_baseline`` (what copy mode measured: :data:`~dmamig.bench.naming.COPY_BASELINES`) of every
    migration.

    Like is compared with like: a no-copy record is divided by the copy record of the same direction, folio
    size, batch size and batches per step (copy has no DMA to pipeline, so the pipeline depth does not
    count), and ``speedup_vs`` names that copy record's id. Without such a copy record it falls back to the
    faithful copy. ``speedup_vs_faithful_copy`` always divides by the faithful copy.
    """
    def key(r: dict[str, Any]) -> tuple:
        o = options_of(r)
        return (r["direction"], r["folio_bytes"], o.batch_pages if o else 512, o.batches_per_step if o else 1)

    copies = {key(r): r for r in records if r["kind"] == "migrate" and r["mode"] == "copy"}
    for r in records:
        if r["kind"] == "migrate":
            r["copy_baseline"] = copy_baseline
        if r["kind"] != "migrate" or r["mode"] != "nocopy":
            continue
        faithful = copies.get((r["direction"], r["folio_bytes"], 512, 1))
        base = copies.get(key(r)) or faithful
        if base is not None and base["gbps"] > 0:
            r["speedup_vs_copy"] = r["gbps"] / base["gbps"]
            r["speedup_vs"] = base["id"]
        if faithful is not None and faithful["gbps"] > 0:
            r["speedup_vs_faithful_copy"] = r["gbps"] / faithful["gbps"]


# -- the report's tables ------------------------------------------------------------------------------------

def _phases(sc: dict[str, Any]) -> str:
    # Nanoseconds per base page, as the phase plot shows them: copy and no-copy compare by size, not share.
    per = sc.get("phase_ns") or {}
    pages = sc.get("pages") or 1
    # A no-break space keeps each phase with its figure when the column wraps.
    parts = [f"{p}\u00a0{per[p] / pages:.0f}" for p in per if per[p] / pages >= 0.5]
    if sc.get("outside_phases_ns") is not None:
        parts.append(f"outside\u00a0{sc['outside_phases_ns'] / pages:.0f}")
    return " ".join(parts) or "-"

def _compared_with(sc: dict[str, Any], by_id: dict[str, dict[str, Any]], backend: str | None) -> str:
    if sc.get("speedup_vs_copy") is None:
        return "-"
    base = by_id.get(sc.get("speedup_vs") or "")
    tag = copy_baseline_tag(sc.get("copy_baseline"), backend)
    baseline = f" ({tag})" if tag else ""
    if base is None:  # the copy of the same direction and folio size
        return "copy, same folio size" + baseline
    opts = options_of(base)
    return ("faithful copy" if opts is None or opts.faithful else f"copy with {settings_words(opts)}") + baseline

_MIGRATION_TABLES = (
    ("faithful", "Migration, faithful: the kernel's batching (512-page batches, one at a time, no pipeline)"),
    ("experiment", "Migration, experiment settings (not the kernel's batching: compare with care)"),
)

def _spread(sc: dict[str, Any]) -> str:
    """GB/s of the slowest and the fastest timed repetition ("-" for a single one)."""
    sp = wall_spread(sc)
    if sp["gbps_min"] is None or len(sc.get("wall_ns") or []) < 2:
        return "-"
    return f"{format_number(sp['gbps_min'])}-{format_number(sp['gbps_max'])}"

def _migration_table(rows: list[dict[str, Any]], title: str, by_id: dict[str, dict[str, Any]],
                     backend: str | None) -> Table:
    t = Table(title=title, title_justify="left")
    # The ceiling itself is printed once below the tables, and pages/s is GB/s in other units: both stay in
    # the CSV, out of a table that is wide already.
    for col, just in (("direction", "left"), ("folio", "right"), ("mode", "left"), ("DMA channels", "right"),
                      ("batching", "left"), ("GB/s", "right"), ("min-max", "right"), ("CPU ns/page", "right"),
                      ("x ceiling", "right"), ("no-copy ÷ copy", "right"),
                      ("compared with", "left"), ("ns per page by phase", "left"), ("ok", "center")):
        # Wide enough for "pipelined (16 batches/step, DMA overlaps next unmap)" in two lines.
        width = {"batching": min(28, max(len(s["batching"]) for s in rows)), "compared with": 14}.get(col)
        t.add_column(col, justify=just, min_width=width,
                     no_wrap=col not in ("ns per page by phase", "batching", "compared with"))
    for s in rows:
        t.add_row(DIRECTIONS.get(s["direction"], s["direction"]), format_size(s["folio_bytes"]),
                  "no-copy" if s["mode"] == "nocopy" else "copy", format_number(s["channels"], "{}"), s["batching"],
                  format_number(s["gbps"]), _spread(s), format_number(s["cpu_ns_per_page"], "{:.0f}"),
                  format_number(s["ceiling_ratio"]), format_number(s.get("speedup_vs_copy")),
                  _compared_with(s, by_id, backend), _phases(s), "yes" if s["verified"] else "[red]NO[/red]")
    return t

def migration_tables(doc: dict[str, Any]) -> list[Table]:
    """The report's migration tables of ``doc``: faithful records, then experiments (each absent when empty).

    Each row says its batching (``faithful`` or the experiment's settings) and which copy scenario its
    no-copy/copy ratio divides by.
    """
    scs = doc["scenarios"]
    by_id = {s["id"]: s for s in scs}
    mig = [s for s in scs if s["kind"] == "migrate"]
    tables = []
    for cls, title in _MIGRATION_TABLES:
        rows = [s for s in mig if batching_class(s) == cls]
        if rows:
            tables.append(_migration_table(rows, title, by_id, doc.get("settings", {}).get("backend")))
    return tables


# -- plots ---------------------------------------------------------------------------------------------------

#: The batching of the headline records, in words.
_FAITHFUL_WORDS = "faithful (the kernel's batching: 512-page batches, one at a time, no pipeline)"

def _migrations(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return [s for s in doc["scenarios"] if s["kind"] == "migrate"]

def _headline(mig: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], str]:
    """The records a headline plot shows, and their batching in words: the faithful ones."""
    faithful = [s for s in mig if batching_class(s) == "faithful"]
    if faithful:
        return faithful, _FAITHFUL_WORDS
    # Only experiments (a hand-made or filtered document): plot them, and say so.
    return mig, "experiment settings only (no faithful run in this file)"

def _directions(mig: list[dict[str, Any]]) -> list[str]:
    return [d for d in DIRECTIONS if any(s["direction"] == d for s in mig)]

def _context(doc: dict[str, Any]) -> str:
    """Backend, working set and repetitions: the line every title carries."""
    s = doc["settings"]
    gpus = ", ".join(g["name"] for g in doc["machine"].get("gpus") or [])
    where = f"{doc['machine']['backend']} backend" + (f" ({gpus})" if gpus else "")
    reps = f"median of {s['repeat']} repetitions" if s["repeat"] > 1 else "1 repetition"
    return f"{where}, {format_size(s['total_bytes'])} working set, {reps}"

def _mode_label(sc: dict[str, Any]) -> str:
    if sc["mode"] == "copy":
        return "copy"
    n = sc["channels"]
    return f"no-copy, {n} DMA channel" + ("" if n == 1 else "s")

def _experiment_label(sc: dict[str, Any]) -> str:
    return f"{_mode_label(sc)}, {settings_words(options_of(sc))}"

def ceilings_of(doc: dict[str, Any], direction: str) -> list[dict[str, Any]]:
    """Every ceiling of ``direction``: one per process that measured it (a resumed or cluster run has several)."""
    return [c for c in doc.get("ceilings", []) if c["direction"] == direction]

def ceiling_label(c: dict[str, Any], several: bool) -> str:
    """A ceiling line's legend: its GB/s, and with several ceilings who measured it (each its own line)."""
    who = c.get("worker") or {}
    if not several or not who:
        return f"ceiling {c['gbps']:.1f} GB/s (plain copy, same run)"
    if who.get("address"):
        by = f"worker {who['address']} on {who.get('host')}"
    else:
        run = str(who.get("run") or "")[:19].replace("T", " ")
        by = f"run of {run}" if run else f"pid {who.get('pid')} on {who.get('host')}"
    gpus = ", ".join(str(g.get("name")) for g in who.get("gpus") or [])
    return f"ceiling {c['gbps']:.1f} GB/s (plain copy, {by}{', ' + gpus if gpus else ''})"

_CEILING_STYLES = (":", "-.", (0, (1, 3)), (0, (5, 2, 1, 2)), (0, (3, 1, 1, 1, 1, 1)))

def _ceiling_line(ax: Any, doc: dict[str, Any], direction: str) -> float:
    # One line per process that measured a ceiling, each labelled: two processes' ceilings are two figures.
    cs = ceilings_of(doc, direction)
    for k, c in enumerate(cs):
        ax.axhline(c["gbps"], color="black" if k == 0 else "#555555", linewidth=1.5,
                   linestyle=_CEILING_STYLES[k % len(_CEILING_STYLES)], label=ceiling_label(c, len(cs) > 1))
    return max((float(c["gbps"]) for c in cs), default=0.0)

def plot_throughput(doc: dict[str, Any], path: Path) -> None:
    """Throughput against folio size, one panel per direction.

    Faithful records are lines (copy, and no-copy per DMA channel count); experiment records are hollow
    markers labelled with their settings; the same-run ceiling is dotted. The y axis starts at 0.
    """
    plt = pyplot()
    mig = _migrations(doc)
    head, words = _headline(mig)
    experiments = [s for s in mig if batching_class(s) == "experiment"]
    directions = _directions(mig)
    sizes = sorted({s["folio_bytes"] for s in mig})
    fig, axes = plt.subplots(1, len(directions), figsize=(max(9.0, 5.2 * len(directions)), 6.4), squeeze=False,
                             sharey=True)
    top = 0.0
    for ax, d in zip(axes[0], directions, strict=True):
        labels = sorted({_mode_label(s) for s in head if s["direction"] == d}, key=lambda x: (x != "copy", x))
        for label in labels:
            pts = {s["folio_bytes"]: s for s in head if s["direction"] == d and _mode_label(s) == label}
            x = [i for i, sz in enumerate(sizes) if sz in pts]
            ys = [pts[sizes[i]]["gbps"] for i in x]
            lo, hi = spread_bars([pts[sizes[i]] for i in x])
            top = max([top, *ys, *(y + h for y, h in zip(ys, hi))])
            ax.errorbar(x, ys, yerr=[lo, hi], marker="o", label=label, linestyle="-" if label == "copy" else "--",
                        capsize=4, elinewidth=1.2)
        for k, s in enumerate(e for e in experiments if e["direction"] == d):
            top = max(top, s["gbps"])
            ax.plot([sizes.index(s["folio_bytes"])], [s["gbps"]], marker="osD^v<>"[k % 7], markersize=9,
                    markerfacecolor="none", markeredgewidth=1.8, linestyle="none",
                    label=f"experiment: {_experiment_label(s)}")
        top = max(top, _ceiling_line(ax, doc, d))
        ax.set_title(DIRECTIONS[d])
        ax.set_xticks(list(range(len(sizes))), [format_size(s) for s in sizes])
        ax.set_xlabel("folio size (4K = base pages)")
        ax.grid(True, alpha=0.3)
    for ax in axes[0]:
        ax.set_ylim(0, top * 1.1 or 1.0)
    axes[0][0].set_ylabel(f"GB/s (median; axis starts at 0)\n{BARS}")
    # One legend for every panel (they share their series), below them, so it never covers a point.
    legend: dict[str, Any] = {}
    for ax in axes[0]:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            legend.setdefault(label, handle)
    fig.legend(list(legend.values()), list(legend), loc="lower center", ncol=2, fontsize=8, frameon=False)
    fig.suptitle(f"Migration throughput vs folio size: lines {words}\n{_context(doc)}", fontsize=11)
    save_figure(plt, fig, path, rect=(0, 0.04 + 0.028 * ((len(legend) + 1) // 2), 1, 1))

def plot_copy_vs_nocopy(doc: dict[str, Any], path: Path) -> None:
    """Grouped bars, faithful records only: copy against the best no-copy run per (direction, folio size).

    Each pair is labelled with its no-copy/copy ratio, so the headline ratio compares like with like (both
    with the kernel's batching); the ceiling is a dotted line.
    """
    plt = pyplot()
    head, words = _headline(_migrations(doc))
    directions = _directions(head)
    sizes = sorted({s["folio_bytes"] for s in head})
    chans = sorted({s["channels"] for s in head if s["mode"] == "nocopy"})
    fig, axes = plt.subplots(1, len(directions), figsize=(5.6 * len(directions), 4.8), squeeze=False,
                             sharey=True)
    width = 0.38
    for ax, d in zip(axes[0], directions, strict=True):
        copy_recs, best_recs = [], []
        for sz in sizes:
            cell = [s for s in head if s["direction"] == d and s["folio_bytes"] == sz]
            copy_recs.append(max((s for s in cell if s["mode"] == "copy"), key=lambda s: s["gbps"], default=None))
            best_recs.append(max((s for s in cell if s["mode"] == "nocopy"), key=lambda s: s["gbps"], default=None))
        copy = [s["gbps"] if s else 0.0 for s in copy_recs]
        best = [s["gbps"] if s else 0.0 for s in best_recs]
        xs = range(len(sizes))
        bar_err: dict[str, Any] = {"capsize": 3, "ecolor": "black", "error_kw": {"elinewidth": 1}}
        copy_err = spread_bars(copy_recs)
        ax.bar([x - width / 2 for x in xs], copy, width, label="copy (the CPU copies)", color="#dd8452",
               yerr=copy_err, **bar_err)
        if len(chans) == 1:
            how = f"{chans[0]} DMA channel" + ("" if chans[0] == 1 else "s")
        else:
            how = f"best of {', '.join(map(str, chans[:-1]))} or {chans[-1]} DMA channels"
        best_err = spread_bars(best_recs)
        bars = ax.bar([x + width / 2 for x in xs], best, width, color="#4c72b0",
                      label=f"no-copy (the DMA engine copies), {how}", yerr=best_err, **bar_err)
        for rect, c, n, up in zip(bars, copy, best, best_err[1], strict=True):
            if c > 0:  # above the error bar, so that the two do not overlap
                ax.annotate(f"{n / c:.2f}x", (rect.get_x() + rect.get_width() / 2, rect.get_height() + up),
                            ha="center", va="bottom", fontsize=8)
        ceiling = _ceiling_line(ax, doc, d)
        ax.set_title(DIRECTIONS[d])
        ax.set_xticks(list(xs), [format_size(s) for s in sizes])
        ax.set_xlabel("folio size (4K = base pages)")
        ax.grid(True, axis="y", alpha=0.3)
        # Headroom above the tallest bar, its error bar or the ceiling, so the legend covers none of them.
        tops = [*(c + h for c, h in zip(copy, copy_err[1])), *(b + h for b, h in zip(best, best_err[1]))]
        ax.set_ylim(0, max([*tops, ceiling, 1e-9]) * 1.45)
        ax.legend(fontsize=8, loc="upper left")
    axes[0][0].set_ylabel(f"GB/s (median; axis starts at 0)\n{BARS}")
    fig.suptitle(f"Copy vs no-copy migration, {words}\nlabels: no-copy GB/s / copy GB/s; {_context(doc)}",
                 fontsize=10.5)
    save_figure(plt, fig, path)

def _phase_names(mig: list[dict[str, Any]]) -> list[str]:
    seen = {p for s in mig for p in (s.get("phase_ns") or {})}
    return [p for p in PHASES if p in seen] + sorted(seen - set(PHASES))

def _outside_ns(sc: dict[str, Any]) -> float:
    # Recorded from schema 2 on; older results only have the median wall time and the phase medians.
    if sc.get("outside_phases_ns") is not None:
        return float(sc["outside_phases_ns"])
    return max(0.0, sc["median_wall_ns"] - sum((sc.get("phase_ns") or {}).values()))

def plot_phases(doc: dict[str, Any], path: Path) -> None:
    """Stacked bars of nanoseconds per base page by phase: one row of panels per direction, one per folio size.

    Bar heights are absolute (wall nanoseconds per base page), so copy and no-copy compare by height; the
    grey top of each bar is the call's time outside the named phases. Experiment settings are hatched.
    """
    plt = pyplot()
    mig = _migrations(doc)
    directions = _directions(mig)
    sizes = sorted({s["folio_bytes"] for s in mig})
    names = _phase_names(mig)
    colors = dict(PHASE_COLORS)
    for k, p in enumerate(p for p in names if p not in colors):
        colors[p] = EXTRA_COLORS[k % len(EXTRA_COLORS)]
    counts = [max(len([s for s in mig if s["direction"] == d and s["folio_bytes"] == sz]) for d in directions)
              for sz in sizes]
    # Panels as wide as their bar count, so that every bar has the same width whatever the panel holds.
    fig, axes = plt.subplots(len(directions), len(sizes), squeeze=False, sharey="row",
                             gridspec_kw={"width_ratios": [max(c, 2) for c in counts]},
                             figsize=(max(9.0, 1.25 * sum(max(c, 2) for c in counts) + 1.5),
                                      4.8 * len(directions) + 1.4))
    handles: dict[str, Any] = {}
    for r, d in enumerate(directions):
        row_top = 0.0
        for c, sz in enumerate(sizes):
            ax = axes[r][c]
            cell = [s for s in mig if s["direction"] == d and s["folio_bytes"] == sz]
            cell.sort(key=lambda s: (batching_class(s) == "experiment", s["mode"] != "copy", s["channels"] or 0))
            bottom = [0.0] * len(cell)
            for p in (*names, "outside"):
                vals = [(_outside_ns(s) if p == "outside" else (s.get("phase_ns") or {}).get(p, 0.0)) / s["pages"]
                        for s in cell]
                hatch = ["//" if batching_class(s) == "experiment" else "" for s in cell]
                bars = ax.bar(range(len(cell)), vals, bottom=bottom, color=colors[p], edgecolor="white",
                              linewidth=0.5)
                for b, h in zip(bars, hatch, strict=True):
                    b.set_hatch(h)
                handles.setdefault(p, bars[0] if len(bars) else None)
                bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
            ax.set_xticks(list(range(len(cell))), [_bar_label(s) for s in cell], fontsize=8)
            ax.set_title(f"{DIRECTIONS[d]}, {format_size(sz)} folios" if sz > 4096 else f"{DIRECTIONS[d]}, 4K pages",
                         fontsize=10)
            ax.grid(True, axis="y", alpha=0.3)
            row_top = max([row_top, *bottom])
        axes[r][0].set_ylabel("wall ns per base page (median)")
        axes[r][0].set_ylim(0, row_top * 1.05 or 1.0)  # the row shares its y axis: one limit fits all panels
    order = [p for p in (*names, "outside") if handles.get(p) is not None]
    legend = {p: PHASE_LEGEND.get(p, p) for p in order}
    legend["outside"] = _outside_legend(names, any(s["mode"] == "nocopy" for s in mig))
    fig.legend([handles[p] for p in order], [legend[p] for p in order], loc="lower center",
               ncol=min(3, len(order)), fontsize=8, frameon=False, bbox_to_anchor=(0.5, 0.0))
    head_words = "faithful (the kernel's batching)" if any(batching_class(s) == "faithful" for s in mig) \
        else "batching not recorded (older results)"
    marks = (f"plain bars {head_words}, hatched bars experiment settings (named under the bar)"
             if any(batching_class(s) == "experiment" for s in mig) else f"all bars {head_words}")
    fig.suptitle("Where migration time goes: wall nanoseconds per base page, by phase (lower is faster)\n"
                 f"{_context(doc)}; {marks}", fontsize=10.5)
    save_figure(plt, fig, path, rect=(0, 0.07, 1, 1))

def _outside_legend(names: list[str], nocopy: bool) -> str:
    """What the grey top of a bar holds: the call's work that no reported phase covers."""
    parts = []
    if not any("isolat" in p or "collect" in p for p in names):
        parts += ["validation", "isolation"]
    if not any("putback" in p or "put_back" in p for p in names):
        parts.append("put-back")
    parts.append("batch set-up and the result")
    text = "outside phases: " + ", ".join(parts)
    if nocopy and not any("submit" in p for p in names):
        # A core that does not time DMA submission as a phase of its own leaves it in no-copy's grey.
        text += "; no-copy: also planning and queueing the DMA copy"
    return text

def _bar_label(sc: dict[str, Any]) -> str:
    # Short lines under a bar: the mode, the channels spelled out, and an experiment's settings.
    if sc["mode"] == "copy":
        lines = ["copy"]
    else:
        n = sc["channels"]
        lines = ["no-copy", f"{n} DMA channel" + ("" if n == 1 else "s")]
    if batching_class(sc) == "experiment":
        for w in settings_words(options_of(sc)).split(","):
            lines += textwrap.wrap(w.strip(), 16)
    return "\n".join(lines)

def write_migration_plots(doc: dict[str, Any], out: Path) -> list[Path]:
    """Write ``throughput_vs_folio.png``, ``copy_vs_nocopy.png`` and ``phases.png`` into ``out`` when ``doc``
    has migration records; return the paths written."""
    if not _migrations(doc):
        return []
    paths = []
    for name, fn in (("throughput_vs_folio.png", plot_throughput), ("copy_vs_nocopy.png", plot_copy_vs_nocopy),
                     ("phases.png", plot_phases)):
        fn(doc, out / name)
        paths.append(out / name)
    return paths
