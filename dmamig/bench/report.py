"""The report of a results document: every kind's tables, in order, and every kind's plots.

Everything here works on the results document (the parsed ``results.json``), so a report can be re-rendered
or compared on a machine that never ran the benchmark. Each scenario kind draws its own tables and plots
(:mod:`dmamig.bench.migration`, :mod:`dmamig.bench.engine`, :mod:`dmamig.bench.access`,
:mod:`dmamig.bench.files`, :mod:`dmamig.bench.pairs`); this module puts them in order under one header, with the ceilings last.
Reading, writing and comparing the document is :mod:`dmamig.bench.results`' job.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console

from .access import access_table, write_access_plots
from .engine import engine_table
from .files import file_table
from .migration import migration_tables, write_migration_plots
from .naming import COPY_BASELINES, DIRECTIONS, copy_baseline_tag, format_size
from .pairs import pair_table, write_pair_plots

__all__ = ["render_tables", "write_plots"]

def _header(doc: dict[str, Any]) -> str:
    m, s = doc["machine"], doc["settings"]
    gpus = ", ".join(g["name"] for g in m.get("gpus") or []) or "none"
    poll = s.get("dma_poll_us")
    channels = "" if poll is None else f" | DMA waits {f'poll {poll:g} us' if poll else 'sleep at once'}"
    if s.get("dma_engine") == "persistent":
        channels += " | DMA consumer: persistent kernel (experiment)"
    if s.get("copy_baseline"):
        channels += (f" | copy baseline {copy_baseline_tag(s['copy_baseline'], s.get('backend'))}: "
                     f"{COPY_BASELINES.get(s['copy_baseline'], '?')}")
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

def render_tables(doc: dict[str, Any], console: Console | None = None) -> None:
    """Print the results as rich tables: faithful migrations, experiments, engine scenarios, device access,
    file-backed scenarios, the device-pair matrices, then ceilings.

    Each migration row says its batching (``faithful`` or the experiment's settings) and which copy
    scenario its no-copy/copy ratio divides by.

    Parameters
    ----------
    doc : dict
        A results document (as :func:`~dmamig.bench.results.load_results` returns it, or as the runner
        builds it).
    console : rich.console.Console, optional
        Where to print (a new console on stdout by default).
    """
    console = console or Console()
    console.print(_header(doc))
    scs = doc["scenarios"]
    for table in migration_tables(doc):
        console.print(table)
    eng = [s for s in scs if s["kind"] in ("state", "dma")]
    if eng:
        console.print(engine_table(eng))
    access = [s for s in scs if s["kind"] == "access"]
    if access:
        console.print(access_table(access))
    files = file_table(scs)
    if files is not None:
        console.print(files)
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

def write_plots(doc: dict[str, Any], out_dir: str | Path) -> list[Path]:
    """Write every plot of ``doc`` into ``out_dir``; return the paths written.

    Plots: ``throughput_vs_folio.png``, ``copy_vs_nocopy.png``, ``phases.png`` when the document has migration
    scenarios (:func:`~dmamig.bench.migration.write_migration_plots`), then the device-access plots
    (:func:`~dmamig.bench.access.write_access_plots`) when it has device-access scenarios, and the device-pair
    heat maps (:func:`~dmamig.bench.pairs.write_pair_plots`) when it has device-pair scenarios.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return write_migration_plots(doc, out) + write_access_plots(doc, out) + write_pair_plots(doc, out)
