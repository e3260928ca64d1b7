"""Reading, rendering and comparing benchmark results: rich tables, CSV, and baseline regression checks.

Everything here works on the results document (the parsed ``results.json``), so a report can be re-rendered
or compared on a machine that never ran the benchmark.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from .access_figures import access_table
from .naming import (
    DIRECTIONS,
    LEGACY_BATCHING,
    NOT_A_MIGRATION,
    batching_class,
    format_number,
    format_rate,
    format_size,
    options_of,
    scenario_name,
    settings_words,
)
from .pairs_figures import pair_table
from .schema import PHASES, ResultsError, validate_results
from .stats import ratio_interval

__all__ = [
    "CSV_FIELDS",
    "METRICS",
    "Comparison",
    "NotComparable",
    "check_comparable",
    "compare_results",
    "comparison_table",
    "load_results",
    "normalize_results",
    "primary_metric",
    "regressions",
    "render_tables",
    "write_csv",
    "write_json",
]

#: Columns of results.csv, in order; phase columns are ``phase_<name>_ns`` and ``share_<name>``.
#: ``batch_pages``, ``batches_per_step``, ``pipeline_depth`` and ``faithful`` come from the scenario's options
#: (empty for raw DMA copies and for results that predate recorded settings).
CSV_FIELDS = (
    ["id", "name", "kind", "mode", "direction", "layout", "folio_bytes", "folio_order", "channels", "batching",
     "batch_pages", "batches_per_step", "pipeline_depth", "faithful", "bytes", "pages", "repeat",
     "median_wall_ns", "gbps", "pages_per_s", "thread_time_ns", "cpu_ns_per_page", "pages_per_cpu_s",
     "ceiling_gbps", "ceiling_ratio", "ceiling_method", "speedup_vs_copy", "speedup_vs",
     "speedup_vs_faithful_copy", "nr_failed", "verified"]
    + [f"phase_{p}_ns" for p in PHASES]
    + ["outside_phases_ns"]
    + [f"share_{p}" for p in PHASES]
    # Device-access records (empty for the others).
    + ["pattern", "fault_batch_size", "oversubscription", "fault_batches", "fault_batches_per_s",
       "service_ns_per_batch", "bytes_migrated_per_byte_touched", "ceiling_pages_per_s"]
    # Device-pair records (empty for the others).
    + ["src_device", "dst_device", "link", "peer", "staged", "ceiling_route"]
)

#: Metrics ``dmamig report`` can compare: ``throughput`` (GB/s; pages per CPU-second for state-only
#: scenarios) or ``ceiling-ratio`` (throughput over the same run's ceiling, which factors out machine speed).
METRICS = ("throughput", "ceiling-ratio")


def load_results(path: str | Path) -> dict[str, Any]:
    """Read and validate a results.json file.

    Raises
    ------
    ResultsError
        When the file is missing, not JSON, or does not follow the schema.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ResultsError(f"cannot read results file {str(p)!r}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ResultsError(f"{str(p)!r} is not a results file: it is binary, not JSON text; give the "
                           f"results.json that dmamig bench wrote") from None
    try:
        doc = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise ResultsError(f"{str(p)!r} is not JSON: {exc}; give the results.json that dmamig bench wrote") \
            from None
    try:
        validate_results(doc)
    except ResultsError as exc:
        raise ResultsError(f"{str(p)!r}: {exc}") from None
    return normalize_results(doc)


def normalize_results(doc: dict[str, Any]) -> dict[str, Any]:
    """Give every scenario of ``doc`` a ``name`` and a ``batching`` text, in place; return ``doc``.

    Results written before settings were recorded (schema 1) have neither: the name is built from the
    scenario's fields, and the batching reads as not recorded. Their ``options`` stay absent, which is how
    the report tells them apart from a run that recorded the kernel's batching.
    """
    for sc in doc["scenarios"]:
        if "name" not in sc:
            sc["name"] = scenario_name(sc["kind"], sc["direction"], sc["folio_bytes"], sc["mode"],
                                       sc.get("channels"), sc.get("layout", ""))
        if "batching" not in sc:
            sc["batching"] = NOT_A_MIGRATION if sc["kind"] == "dma" else LEGACY_BATCHING
    return doc


def write_json(doc: dict[str, Any], path: str | Path) -> None:
    """Write a results document as indented JSON."""
    Path(path).write_text(json.dumps(doc, indent=2, sort_keys=False) + "\n")


def write_csv(doc: dict[str, Any], path: str | Path) -> None:
    """Write one CSV row per scenario with the columns of :data:`CSV_FIELDS`."""
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for sc in doc["scenarios"]:
            row = {k: sc.get(k) for k in CSV_FIELDS}
            row.update(sc.get("options") or {})
            for p in PHASES:
                row[f"phase_{p}_ns"] = (sc.get("phase_ns") or {}).get(p)
                row[f"share_{p}"] = (sc.get("phase_share") or {}).get(p)
            w.writerow({k: "" if v is None else v for k, v in row.items()})


# -- rendering -------------------------------------------------------------------------------------------------



def _phases(sc: dict[str, Any]) -> str:
    # Nanoseconds per base page, as the phase plot shows them: copy and no-copy compare by size, not share.
    per = sc.get("phase_ns") or {}
    pages = sc.get("pages") or 1
    # A no-break space keeps each phase with its figure when the column wraps.
    parts = [f"{p}\u00a0{per[p] / pages:.0f}" for p in per if per[p] / pages >= 0.5]
    if sc.get("outside_phases_ns") is not None:
        parts.append(f"outside\u00a0{sc['outside_phases_ns'] / pages:.0f}")
    return " ".join(parts) or "-"


def _header(doc: dict[str, Any]) -> str:
    m, s = doc["machine"], doc["settings"]
    gpus = ", ".join(g["name"] for g in m.get("gpus") or []) or "none"
    return (f"dmamig {m.get('dmamig', '?')} | backend {m['backend']} | CPU {m['cpu']} x{m['cpu_count']} | "
            f"GPU {gpus} | working set {format_size(s['total_bytes'])} | repeat {s['repeat']} (medians)"
            + (" | PARTIAL: interrupted, only the scenarios that finished" if doc.get("partial") else ""))


def _compared_with(sc: dict[str, Any], by_id: dict[str, dict[str, Any]]) -> str:
    if sc.get("speedup_vs_copy") is None:
        return "-"
    base = by_id.get(sc.get("speedup_vs") or "")
    if base is None:  # legacy results: the copy of the same direction and folio size
        return "copy, same folio size"
    opts = options_of(base)
    return "faithful copy" if opts is None or opts.faithful else f"copy with {settings_words(opts)}"


_MIGRATION_TABLES = (
    ("faithful", "Migration, faithful: the kernel's batching (512-page batches, one at a time, no pipeline)"),
    ("experiment", "Migration, experiment settings (not the kernel's batching: compare with care)"),
    ("legacy", "Migration, batching not recorded (results from before settings were recorded)"),
)


def _migration_table(rows: list[dict[str, Any]], title: str, by_id: dict[str, dict[str, Any]]) -> Table:
    t = Table(title=title, title_justify="left")
    # The ceiling itself is printed once below the tables, and pages/s is GB/s in other units: both stay in
    # the CSV, out of a table that is wide already.
    for col, just in (("direction", "left"), ("folio", "right"), ("mode", "left"), ("DMA channels", "right"),
                      ("batching", "left"), ("GB/s", "right"), ("CPU ns/page", "right"),
                      ("x ceiling", "right"), ("no-copy ÷ copy", "right"),
                      ("compared with", "left"), ("ns per page by phase", "left"), ("ok", "center")):
        # Wide enough for "pipelined (16 batches/step, DMA overlaps next unmap)" in two lines.
        width = {"batching": min(28, max(len(s["batching"]) for s in rows)), "compared with": 14}.get(col)
        t.add_column(col, justify=just, min_width=width,
                     no_wrap=col not in ("ns per page by phase", "batching", "compared with"))
    for s in rows:
        t.add_row(DIRECTIONS.get(s["direction"], s["direction"]), format_size(s["folio_bytes"]),
                  "no-copy" if s["mode"] == "nocopy" else "copy", format_number(s["channels"], "{}"), s["batching"],
                  format_number(s["gbps"]), format_number(s["cpu_ns_per_page"], "{:.0f}"),
                  format_number(s["ceiling_ratio"]), format_number(s.get("speedup_vs_copy")),
                  _compared_with(s, by_id), _phases(s), "yes" if s["verified"] else "[red]NO[/red]")
    return t


def render_tables(doc: dict[str, Any], console: Console | None = None) -> None:
    """Print the results as rich tables: faithful migrations, experiments, engine scenarios, device access,
    the device-pair matrices, then ceilings.

    Each migration row says its batching (``faithful`` or the experiment's settings) and which copy
    scenario its no-copy/copy ratio divides by.

    Parameters
    ----------
    doc : dict
        A results document (as :func:`load_results` returns it, or as the runner builds it).
    console : rich.console.Console, optional
        Where to print (a new console on stdout by default).
    """
    console = console or Console()
    normalize_results(doc)
    console.print(_header(doc))
    scs = doc["scenarios"]
    by_id = {s["id"]: s for s in scs}
    mig = [s for s in scs if s["kind"] == "migrate"]
    for cls, title in _MIGRATION_TABLES:
        rows = [s for s in mig if batching_class(s) == cls]
        if rows:
            console.print(_migration_table(rows, title, by_id))
    eng = [s for s in scs if s["kind"] in ("state", "dma")]
    if eng:
        t = Table(title="Engine (state-only migration, raw DMA copy)", title_justify="left")
        for col in ("scenario", "batching", "pages", "GB/s", "pages/s", "CPU ns/page", "pages per CPU-s",
                    "ceiling GB/s", "x ceiling", "ok"):
            t.add_column(col, justify="left" if col in ("scenario", "batching") else "right")
        for s in eng:
            # State-only migration copies no data: a GB/s figure would only restate pages/s.
            gbps = None if s["kind"] == "state" else s["gbps"]
            t.add_row(s["name"], s["batching"], str(s["pages"]), format_number(gbps), format_rate(s["pages_per_s"]),
                      format_number(s["cpu_ns_per_page"], "{:.0f}"), format_rate(s.get("pages_per_cpu_s")),
                      format_number(s["ceiling_gbps"]), format_number(s["ceiling_ratio"]), "yes" if s["verified"] else "[red]NO[/red]")
        console.print(t)
    access = [s for s in scs if s["kind"] == "access"]
    if access:
        console.print(access_table(access))
    for table in pair_table(scs):
        console.print(table)
    if doc.get("ceilings"):
        console.print("Ceilings (same run): " + "; ".join(
            f"{DIRECTIONS.get(c['direction'], c['direction'])} {c['gbps']:.2f} GB/s ({c['method']}, "
            f"{format_size(c['bytes'])}{_measured_by(c.get('worker'))})" for c in doc["ceilings"]))


def _measured_by(who: dict[str, Any] | None) -> str:
    # Runs of several workers (a cluster, a resumed sweep) have a ceiling per worker: say whose it is.
    if not who:
        return ""
    where = who.get("address") or f"pid {who.get('pid')}"
    gpus = "".join(f", GPU {g.get('index')} {g.get('name')}" for g in who.get("gpus") or [])
    return f", on {who.get('host')} {where}{gpus}"


# -- comparison ------------------------------------------------------------------------------------------------

def primary_metric(sc: dict[str, Any], metric: str = "throughput") -> float | None:
    """The figure compared between runs: GB/s (pages per CPU-second for state-only, pages per second for
    device access), or its ceiling ratio.

    With ``metric="ceiling-ratio"`` a scenario without a ceiling (state-only) falls back to throughput.
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if metric == "ceiling-ratio" and sc.get("ceiling_ratio") is not None:
        return sc["ceiling_ratio"]
    if sc["kind"] == "state":
        return sc.get("pages_per_cpu_s")
    if sc["kind"] == "access":
        return sc.get("pages_per_s")
    return sc.get("gbps")


@dataclass(frozen=True)
class Comparison:
    """One scenario of a run against its baseline; ``ratio`` is new / baseline (higher is better).

    ``id`` is the stable key both runs share; ``name`` says the scenario in words.
    """

    id: str
    baseline: float | None
    new: float | None
    ratio: float | None
    regressed: bool
    note: str = ""
    name: str = ""
    low: float | None = None
    high: float | None = None


class NotComparable(ResultsError):
    """Two runs whose settings differ: their figures measure different things and must not be compared."""


#: Run settings that change what a scenario measures; runs that differ in any of them are not compared.
COMPARED_SETTINGS = ("backend", "page_size", "total_bytes", "quick")
#: Settings compared only when both runs record them (older files predate them).
COMPARED_IF_RECORDED = ("access_bytes", "pair_bytes", "topology")


def check_comparable(new: dict[str, Any], baseline: dict[str, Any]) -> None:
    """Refuse to compare runs whose settings differ (quick vs full, another working set, backend, page size).

    Raises
    ------
    NotComparable
        Naming every differing setting and its two values.
    """
    ns, bs = new["settings"], baseline["settings"]
    diff = [f"{k} {ns.get(k, False if k == 'quick' else None)!r} vs baseline "
            f"{bs.get(k, False if k == 'quick' else None)!r}"
            for k in COMPARED_SETTINGS if ns.get(k, False if k == "quick" else None)
            != bs.get(k, False if k == "quick" else None)]
    diff += [f"{k} {ns[k]!r} vs baseline {bs[k]!r}" for k in COMPARED_IF_RECORDED
             if k in ns and k in bs and ns[k] != bs[k]]
    if diff:
        raise NotComparable(f"the runs are not comparable, their settings differ: {'; '.join(diff)}; compare "
                            f"with a baseline run with the same settings")


def _settings_note(new: dict[str, Any], base: dict[str, Any]) -> tuple[str, bool]:
    """A note on the scenarios' recorded settings, and whether they differ (which fails the gate)."""
    # Same id, but one side predates recorded settings: the figures may come from different batching.
    n, b = batching_class(new), batching_class(base)
    if n == b or "n/a" in (n, b):
        if new.get("options") and base.get("options") and new["options"] != base["options"]:
            return f"options differ: {new['options']} vs baseline {base['options']}", True
        return "", False
    if b == "legacy":
        return "baseline's batching not recorded (older results)", False
    if n == "legacy":
        return "this run's batching not recorded (older results)", False
    return f"batching differs: {new['batching']} vs baseline {base['batching']}", True


def compare_results(new: dict[str, Any], baseline: dict[str, Any], threshold: float = 0.1,
                    metric: str = "throughput") -> list[Comparison]:
    """Compare two runs scenario by scenario.

    A scenario regresses when ``new / baseline < 1 - threshold`` *and* the change is significant: the 95 %
    bootstrap interval of the ratio of median wall times (see :mod:`dmamig.bench.stats`) lies below 1. With
    fewer than 3 repetitions on a side there is nothing to resample and the threshold alone decides (the
    note says so). A scenario also regresses when its data failed verification in the new run, when its
    recorded options differ from the baseline's, or when the baseline has it and the new run does not (a
    partial or smaller run never passes the gate). Scenarios only the new run has are listed with a note and
    do not regress, so that a sweep can grow without breaking its baseline.

    Parameters
    ----------
    new, baseline : dict
        Results documents.
    threshold : float
        Allowed relative slowdown, e.g. ``0.1`` for 10 %.
    metric : str
        One of :data:`METRICS`.

    Returns
    -------
    list of Comparison
        In the new run's scenario order, then baseline-only scenarios.

    Raises
    ------
    NotComparable
        When the runs' settings differ (:func:`check_comparable`).
    """
    if not 0 <= threshold < 1:
        raise ValueError(f"threshold must be in [0, 1), got {threshold}")
    check_comparable(new, baseline)
    normalize_results(new)
    normalize_results(baseline)
    base = {s["id"]: s for s in baseline["scenarios"]}
    seen = set()
    out = []
    for s in new["scenarios"]:
        seen.add(s["id"])
        nv = primary_metric(s, metric)
        unverified = "data NOT verified" if not s["verified"] else ""
        b = base.get(s["id"])
        if b is None:
            out.append(Comparison(s["id"], None, nv, None, not s["verified"],
                                  "; ".join(x for x in ("not in baseline", unverified) if x), s["name"]))
            continue
        bv = primary_metric(b, metric)
        ratio = nv / bv if (nv is not None and bv) else None
        differs_note, differs = _settings_note(s, b)
        lo = hi = None
        untested = ""
        slow = False
        if ratio is not None:
            ci = ratio_interval(s["wall_ns"], b["wall_ns"], ratio)
            lo, hi = ci.low, ci.high
            beyond = ratio < 1.0 - threshold
            slow = beyond and (ci.slower or not ci.tested)
            if beyond and not ci.tested:
                untested = (f"{min(len(s['wall_ns']), len(b['wall_ns']))} repetition(s): too few to test "
                            f"significance, threshold alone")
            elif beyond and not slow:
                untested = "within noise (not significant)"
        note = "; ".join(x for x in (unverified, differs_note, untested) if x)
        out.append(Comparison(s["id"], bv, nv, ratio, slow or differs or not s["verified"], note, s["name"],
                              lo, hi))
    for sid, b in base.items():
        if sid not in seen:
            out.append(Comparison(sid, primary_metric(b, metric), None, None, True,
                                  "missing from this run" + (" (partial run)" if new.get("partial") else ""),
                                  b["name"]))
    return out


def regressions(comparisons: list[Comparison]) -> list[Comparison]:
    """The comparisons that regressed."""
    return [c for c in comparisons if c.regressed]


def comparison_table(comparisons: list[Comparison], threshold: float, metric: str) -> Table:
    """A rich table of a comparison, regressions in red."""
    unit = "ratio to ceiling" if metric == "ceiling-ratio" else "GB/s, pages/CPU-s or device-access pages/s"
    t = Table(title=f"Against baseline ({metric}: {unit}; regression: below {1 - threshold:.2f}x and "
                    f"significant)",
              title_justify="left")
    for col in ("scenario", "id", "baseline", "new", "new/baseline", "95% interval", "", "note"):
        t.add_column(col, justify="left" if col in ("scenario", "id", "note") else "right")
    for c in comparisons:
        fmt = format_rate if (c.new or c.baseline or 0) >= 1e4 else format_number
        verdict = "[red]REGRESSED[/red]" if c.regressed else ("ok" if c.ratio is not None else "")
        ci = "-" if c.low is None else f"{c.low:.3f}-{c.high:.3f}"
        t.add_row(c.name or c.id, c.id, fmt(c.baseline), fmt(c.new), format_number(c.ratio, "{:.3f}"), ci, verdict, c.note)
    return t
