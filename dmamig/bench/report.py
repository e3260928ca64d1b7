"""Rendering benchmark results as rich tables: migrations, engine scenarios, device access, device pairs
and the ceilings.

Everything here works on the results document (the parsed ``results.json``), so a report can be re-rendered
or compared on a machine that never ran the benchmark. Reading and writing the document is
:mod:`dmamig.bench.results_file`'s job, the baseline comparison :mod:`dmamig.bench.comparison`'s.
"""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from .access import access_table
from .naming import (
    COPY_BASELINES,
    DIRECTIONS,
    batching_class,
    format_number,
    format_rate,
    format_size,
    options_of,
    settings_words,
)
from .pairs import pair_table
from .results import wall_spread

__all__ = ["render_tables"]


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
    poll = s.get("dma_poll_us")
    channels = "" if poll is None else f" | DMA waits {f'poll {poll:g} us' if poll else 'sleep at once'}"
    if s.get("copy_baseline"):
        channels += f" | copy baseline {s['copy_baseline']}: {COPY_BASELINES.get(s['copy_baseline'], '?')}"
    return (f"dmamig {m.get('dmamig', '?')} | backend {m['backend']} | CPU {m['cpu']} x{m['cpu_count']} | "
            f"GPU {gpus} | working set {format_size(s['total_bytes'])} | repeat {s['repeat']} (medians)"
            + channels + _resumed(doc)
            + (" | PARTIAL: interrupted, only the scenarios that finished" if doc.get("partial") else ""))


def _resumed(doc: dict[str, Any]) -> str:
    r = doc.get("resumed")
    if not r:
        return ""
    parts = ", ".join(f"{x['wall_s']:.1f} s" for x in r["runs"])
    return (f" | RESUMED: ran in {r['parts']} parts ({parts}; {doc.get('wall_s', 0):.1f} s in all), each with "
            f"its own ceilings")


def _compared_with(sc: dict[str, Any], by_id: dict[str, dict[str, Any]]) -> str:
    if sc.get("speedup_vs_copy") is None:
        return "-"
    base = by_id.get(sc.get("speedup_vs") or "")
    baseline = f" ({sc['copy_baseline']})" if sc.get("copy_baseline") else ""
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


def _migration_table(rows: list[dict[str, Any]], title: str, by_id: dict[str, dict[str, Any]]) -> Table:
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
