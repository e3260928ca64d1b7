"""PNG plots of the device-access records of a results document (see :mod:`dmamig.bench.access`).

As the migration plots: each title names the backend, the working set and the repetitions, rate axes start at
zero, and each ceiling (the same access pre-migrated, same run) is drawn beside what it bounds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..uvm.options import SERVICE_PHASES
from .access_figures import PATTERN_WORDS
from .naming import format_size
from .plots import _BARS, _EXTRA_COLORS, _PHASE_COLORS, PHASE_LEGEND, _pyplot, _save, spread_bars

__all__ = ["plot_access_batches", "plot_oversubscription", "plot_service_breakdown", "write_access_plots"]

_MODE_STYLE = {"copy": ("#dd8452", "-", "copy (the faulting thread copies)"),
               "nocopy": ("#4c72b0", "--", "no-copy (the DMA engine copies)")}
#: Service phases beyond the migration core's, for the legend.
_SERVICE_LEGEND = {
    "fetch": "fetch: read and group the fault batch",
    "prefetch": "prefetch: the density decision",
    "evict": "evict: send LRU blocks back to host memory",
    "populate": "populate: look the pages up, zero-fill untouched ones",
    "replay": "replay: look the pages up again and resume",
}
_SERVICE_COLORS = {"fetch": "#8c8c8c", "prefetch": "#e5ae38", "evict": "#c44e52", "populate": "#937860",
                   "replay": "#6d904f"}


def _access(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return [s for s in doc["scenarios"] if s["kind"] == "access"]


def _context(doc: dict[str, Any], recs: list[dict[str, Any]]) -> str:
    s = doc["settings"]
    gpus = ", ".join(g["name"] for g in doc["machine"].get("gpus") or [])
    where = f"{doc['machine']['backend']} backend" + (f" ({gpus})" if gpus else "")
    sizes = sorted({r.get("working_set_bytes") or r["bytes"] for r in recs})
    reps = f"median of {s['repeat']} repetitions" if s["repeat"] > 1 else "1 repetition"
    return f"{where}, {'/'.join(format_size(b) for b in sizes)} working set, {reps}"


def _modes(recs: list[dict[str, Any]]) -> list[str]:
    return [m for m in ("copy", "nocopy") if any(r["mode"] == m for r in recs)]


def plot_oversubscription(doc: dict[str, Any], path: Path) -> None:
    """The stencil's throughput against the oversubscription factor (left) and the bytes it migrates per
    byte it touches (right), copy and no-copy, with the pre-migrated ceiling of each point dotted."""
    plt = _pyplot()
    recs = sorted((r for r in _access(doc) if r.get("pattern") == "stencil"), key=lambda r: r["oversubscription"])
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11.5, 4.8))
    top = 0.0
    for mode in _modes(recs):
        color, style, words = _MODE_STYLE[mode]
        pts = [r for r in recs if r["mode"] == mode]
        xs = [r["oversubscription"] for r in pts]
        ys = [r["pages_per_s"] / 1e6 for r in pts]
        cs = [r["ceiling_pages_per_s"] / 1e6 for r in pts]
        top = max([top, *ys, *cs])
        ax.plot(xs, ys, marker="o", color=color, linestyle=style, label=words)
        ax.plot(xs, cs, marker=".", color=color, linestyle=":", linewidth=1.2,
                label=f"ceiling of {mode.replace('nocopy', 'no-copy')}: device holds it all, pre-migrated")
        bx.plot(xs, [r["bytes_migrated_per_byte_touched"] for r in pts], marker="o", color=color,
                linestyle=style, label=words)
    right = max((r["oversubscription"] for r in recs), default=2.0)
    for a in (ax, bx):
        a.axvline(1.0, color="grey", linewidth=0.8, alpha=0.6)
        a.set_xlim(0, right * 1.1 + 0.1)
        a.set_xlabel("oversubscription (working set / device memory)")
        a.grid(True, alpha=0.3)
    ax.set_ylim(0, top * 1.15 or 1.0)
    ax.set_ylabel("M pages/s (median; axis starts at 0)")
    ax.set_title("throughput, steady state (after one untimed sweep)", fontsize=10)
    bx.set_ylim(0, max([1.0, *(r["bytes_migrated_per_byte_touched"] for r in recs)]) * 1.15)
    bx.set_ylabel("bytes moved (in + evicted) per byte touched")
    bx.set_title("traffic per sweep", fontsize=10)
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=2, fontsize=8, frameon=False)
    fig.suptitle("Device access: 2 MiB-tile stencil vs oversubscription (UVM faults, LRU eviction, density "
                 f"prefetch)\n{_context(doc, recs)}; grey line: the device holds the working set exactly",
                 fontsize=10.5)
    _save(plt, fig, path, rect=(0, 0.1, 1, 1))


def plot_access_batches(doc: dict[str, Any], path: Path) -> None:
    """Fault-servicing throughput of the streaming read against the fault batch size, copy and no-copy, with
    the same read pre-migrated (dotted): what each batch size leaves of the ceiling."""
    plt = _pyplot()
    recs = sorted((r for r in _access(doc) if r.get("pattern") == "stream"), key=lambda r: r["fault_batch_size"])
    batches = sorted({r["fault_batch_size"] for r in recs})
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    top = 0.0
    for mode in _modes(recs):
        color, style, words = _MODE_STYLE[mode]
        pts = {r["fault_batch_size"]: r for r in recs if r["mode"] == mode}
        x = [i for i, b in enumerate(batches) if b in pts]
        ys = [pts[batches[i]]["pages_per_s"] / 1e6 for i in x]
        cs = [pts[batches[i]]["ceiling_pages_per_s"] / 1e6 for i in x]
        lo, hi = spread_bars([pts[batches[i]] for i in x], "pages_per_s")
        top = max([top, *cs, *(y + h / 1e6 for y, h in zip(ys, hi))])
        ax.errorbar(x, ys, yerr=[[v / 1e6 for v in lo], [v / 1e6 for v in hi]], marker="o", color=color,
                    linestyle=style, label=words, capsize=4)
        ax.plot(x, cs, marker=".", color=color, linestyle=":", linewidth=1.2,
                label=f"ceiling of {mode.replace('nocopy', 'no-copy')}: same read, pre-migrated")
    for i, b in enumerate(batches):
        # One label per batch size, above its highest point: the modes' points are often too close for two.
        cell = sorted((r for r in recs if r["fault_batch_size"] == b), key=lambda r: r["mode"])
        text = " | ".join(f"{r['ceiling_ratio']:.2f}x" for r in cell if r["ceiling_ratio"] is not None)
        if text:
            ax.annotate(text, (i, max(r["pages_per_s"] for r in cell) / 1e6), textcoords="offset points",
                        xytext=(0, 8), ha="center", fontsize=8)
    ax.set_xticks(list(range(len(batches))), [str(b) for b in batches])
    # Half a step of room on either side: the first and last labels sit clear of the axes' edges.
    ax.set_xlim(-0.5, len(batches) - 0.5)
    ax.set_xlabel("fault batch size (faults serviced together)")
    ax.set_ylim(0, top * 1.2 or 1.0)
    ax.set_ylabel(f"M pages/s (median; axis starts at 0)\n{_BARS}")
    ax.grid(True, alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=2, fontsize=8, frameon=False)
    words = " | ".join({"copy": "copy", "nocopy": "no-copy"}[m] for m in _modes(recs))
    fig.suptitle(f"Device access: streaming read vs fault batch size; labels: x ceiling ({words})\n"
                 f"{_context(doc, recs)}", fontsize=10.5)
    _save(plt, fig, path, rect=(0, 0.1, 1, 1))


def plot_service_breakdown(doc: dict[str, Any], path: Path) -> None:
    """Stacked bars of the service time of one fault batch by phase, for every access that faulted: copy
    and no-copy side by side, so the DMA engine's share (dma_wait) and the CPU copy's (copy) compare."""
    plt = _pyplot()
    recs = [r for r in _access(doc) if r.get("service_ns_per_batch")]
    seen = {p for r in recs for p, v in (r.get("service_phase_ns_per_batch") or {}).items() if v > 0}
    names = [p for p in SERVICE_PHASES if p in seen] + sorted(seen - set(SERVICE_PHASES))
    colors = {**_PHASE_COLORS, **_SERVICE_COLORS}
    for k, p in enumerate(p for p in names if p not in colors):
        colors[p] = _EXTRA_COLORS[k % len(_EXTRA_COLORS)]
    # A bar's label is three or four short lines, about 0.85 in wide at 7 pt: each bar gets that much room.
    fig, ax = plt.subplots(figsize=(max(11.0, 0.95 * len(recs) + 2.5), 5.8))
    bottom = [0.0] * len(recs)
    handles = {}
    for p in names:
        vals = [(r.get("service_phase_ns_per_batch") or {}).get(p, 0.0) / 1e3 for r in recs]
        bars = ax.bar(range(len(recs)), vals, bottom=bottom, color=colors[p], edgecolor="white", linewidth=0.5)
        for b, r in zip(bars, recs, strict=True):
            b.set_hatch("//" if r["mode"] == "nocopy" else "")
        if len(bars):
            handles[p] = bars[0]
        bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
    labels = []
    for r in recs:
        what = PATTERN_WORDS.get(r["pattern"], r["pattern"]).removesuffix(" reads").removesuffix(" read")
        extra = f"\n{r['oversubscription']:g}x mem" if r.get("oversubscription") is not None else ""
        mode = "copy" if r["mode"] == "copy" else f"no-copy\n{r['channels']} DMA ch."
        labels.append(f"{what}{extra}\nbatch {r['fault_batch_size']}\n{mode}")
    ax.set_xticks(list(range(len(recs))), labels, fontsize=7)
    ax.set_ylim(0, max(bottom, default=0.0) * 1.08 or 1.0)
    ax.set_ylabel("us per fault batch (median; axis starts at 0)")
    ax.grid(True, axis="y", alpha=0.3)
    words = {**PHASE_LEGEND, **_SERVICE_LEGEND}
    fig.legend([handles[p] for p in names if p in handles], [words.get(p, p) for p in names if p in handles],
               loc="lower center", ncol=3, fontsize=7.5, frameon=False)
    fig.suptitle("Device access: where the service time of one fault batch goes (hatched: no-copy)\n"
                 f"{_context(doc, recs)}", fontsize=10.5)
    _save(plt, fig, path, rect=(0, 0.02 + 0.03 * ((len(handles) + 2) // 3), 1, 1))


def write_access_plots(doc: dict[str, Any], out_dir: str | Path) -> list[Path]:
    """Write the device-access plots of ``doc`` into ``out_dir``; return the paths written.

    ``access_oversubscription.png`` (with stencil records), ``access_fault_batch.png`` (with streaming
    records) and ``access_service.png`` (with any access that faulted); nothing without access records.
    """
    out = Path(out_dir)
    recs = _access(doc)
    plan = [("access_oversubscription.png", plot_oversubscription, any(r.get("pattern") == "stencil" for r in recs)),
            ("access_fault_batch.png", plot_access_batches, any(r.get("pattern") == "stream" for r in recs)),
            ("access_service.png", plot_service_breakdown, any(r.get("service_ns_per_batch") for r in recs))]
    paths = []
    for name, fn, wanted in plan:
        if wanted:
            out.mkdir(parents=True, exist_ok=True)
            fn(doc, out / name)
            paths.append(out / name)
    return paths
