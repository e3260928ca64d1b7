"""PNG plots of a results document (matplotlib, Agg backend: no display needed).

Each plot is meant to be read without the README: its title names the backend, the working set and the batching
(faithful, i.e. the kernel's, unless marked as an experiment), axes of rates start at zero, legends say
what each colour measures, and error bars span the slowest to the fastest timed repetition.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

from .naming import DIRECTIONS, batching_class, format_size, options_of, settings_words
from .results import PHASES

__all__ = ["ceiling_label", "ceilings_of", "plot_copy_vs_nocopy", "plot_phases", "plot_throughput", "spread_bars",
           "write_plots"]

_PHASE_COLORS = {"isolate": "#64b5cd", "unmap": "#4c72b0", "copy": "#dd8452", "submit": "#da8bc3",
                 "dma_wait": "#8172b3", "move": "#55a868", "undo": "#c44e52", "putback": "#ccb974",
                 "outside": "#bbbbbb"}
_EXTRA_COLORS = ("#937860", "#da8bc3", "#8c8c8c", "#ccb974", "#64b5cd")

#: What each phase is, for the legend: the kernel's step names with the work they stand for.
PHASE_LEGEND = {
    "unmap": "unmap: lock, install migration entries, TLB flush",
    "copy": "copy: the CPU copies the data (copy mode)",
    "dma_wait": "dma_wait: waiting for the DMA copy (no-copy)",
    "move": "move: transfer page state, remap, unlock",
    "undo": "undo: restore pages that failed",
    # Phases a core may report beyond the schema's; any other name is shown as it is.
    "dma_submit": "dma_submit: plan and queue the DMA copy (no-copy)",
    "submit": "submit: plan and queue the DMA copy (no-copy)",
    "isolate": "isolate: validate, collect and isolate the folios of the range",
    "collect": "collect: find the folios of the range",
    "putback": "putback: return folios that did not move, build the per-page status",
}

_FAITHFUL_WORDS = "faithful (the kernel's batching: 512-page batches, one at a time, no pipeline)"


def _pyplot():
    import matplotlib

    # Agg before pyplot is imported: plots are written to files, and a CI runner has no display.
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(plt: Any, fig: Any, path: Path, rect: tuple[float, float, float, float] = (0, 0, 1, 1)) -> None:
    """Lay out (inside ``rect``, leaving room for a figure legend), write the PNG and release the figure.

    pyplot keeps every open figure otherwise.
    """
    fig.tight_layout(rect=rect)
    fig.savefig(path, dpi=100)
    plt.close(fig)


# -- selecting and labelling records ---------------------------------------------------------------------------

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


#: What an error bar spans, for the axis labels.
_BARS = "bars: slowest to fastest repetition"


def spread_bars(recs: list[dict[str, Any] | None], value: str = "gbps") -> tuple[list[float], list[float]]:
    """Error bars of ``recs``' ``value`` (``gbps``, or another rate of the same bytes): how far below and above
    the median the slowest and the fastest timed repetition lie; zero for a missing record or one repetition.

    A rate over the same bytes scales as the inverse of the wall time, so a repetition's rate is the median
    rate times the median wall time over that repetition's.
    """
    from .results import wall_spread

    lo, hi = [], []
    for sc in recs:
        v = (sc or {}).get(value)
        sp = wall_spread(sc) if sc and v else None
        if not sp or sp["min_wall_ns"] is None or not sc.get("median_wall_ns"):
            lo.append(0.0)
            hi.append(0.0)
            continue
        med = sc["median_wall_ns"]
        lo.append(max(0.0, v - v * med / sp["max_wall_ns"]))
        hi.append(max(0.0, v * med / sp["min_wall_ns"] - v))
    return lo, hi


# -- the plots -------------------------------------------------------------------------------------------------

def plot_throughput(doc: dict[str, Any], path: Path) -> None:
    """Throughput against folio size, one panel per direction.

    Faithful records are lines (copy, and no-copy per DMA channel count); experiment records are hollow
    markers labelled with their settings; the same-run ceiling is dotted. The y axis starts at 0.
    """
    plt = _pyplot()
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
    axes[0][0].set_ylabel(f"GB/s (median; axis starts at 0)\n{_BARS}")
    # One legend for every panel (they share their series), below them, so it never covers a point.
    legend: dict[str, Any] = {}
    for ax in axes[0]:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            legend.setdefault(label, handle)
    fig.legend(list(legend.values()), list(legend), loc="lower center", ncol=2, fontsize=8, frameon=False)
    fig.suptitle(f"Migration throughput vs folio size: lines {words}\n{_context(doc)}", fontsize=11)
    _save(plt, fig, path, rect=(0, 0.04 + 0.028 * ((len(legend) + 1) // 2), 1, 1))


def plot_copy_vs_nocopy(doc: dict[str, Any], path: Path) -> None:
    """Grouped bars, faithful records only: copy against the best no-copy run per (direction, folio size).

    Each pair is labelled with its no-copy/copy ratio, so the headline ratio compares like with like (both
    with the kernel's batching); the ceiling is a dotted line.
    """
    plt = _pyplot()
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
    axes[0][0].set_ylabel(f"GB/s (median; axis starts at 0)\n{_BARS}")
    fig.suptitle(f"Copy vs no-copy migration, {words}\nlabels: no-copy GB/s / copy GB/s; {_context(doc)}",
                 fontsize=10.5)
    _save(plt, fig, path)


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
    plt = _pyplot()
    mig = _migrations(doc)
    directions = _directions(mig)
    sizes = sorted({s["folio_bytes"] for s in mig})
    names = _phase_names(mig)
    colors = dict(_PHASE_COLORS)
    for k, p in enumerate(p for p in names if p not in colors):
        colors[p] = _EXTRA_COLORS[k % len(_EXTRA_COLORS)]
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
    _save(plt, fig, path, rect=(0, 0.07, 1, 1))


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


def write_plots(doc: dict[str, Any], out_dir: str | Path) -> list[Path]:
    """Write every plot of ``doc`` into ``out_dir``; return the paths written.

    Plots: ``throughput_vs_folio.png``, ``copy_vs_nocopy.png``, ``phases.png`` when the document has migration
    scenarios, then the device-access plots (:func:`~dmamig.bench.access_plots.write_access_plots`) when it
    has device-access scenarios, and the device-pair heat maps (:func:`~dmamig.bench.pairs_plots.write_pair_plots`)
    when it has device-pair scenarios.
    """
    from .access import write_access_plots
    from .pairs import write_pair_plots

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    if _migrations(doc):
        for name, fn in (("throughput_vs_folio.png", plot_throughput), ("copy_vs_nocopy.png", plot_copy_vs_nocopy),
                         ("phases.png", plot_phases)):
            fn(doc, out / name)
            paths.append(out / name)
    return paths + write_access_plots(doc, out) + write_pair_plots(doc, out)
