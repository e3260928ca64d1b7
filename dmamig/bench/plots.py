"""PNG plots of a results document (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .scenarios import DIRECTIONS, format_size
from .schema import PHASES

__all__ = ["write_plots"]

_PHASE_COLORS = {"unmap": "#4c72b0", "copy": "#dd8452", "move": "#55a868", "undo": "#c44e52",
                 "dma_wait": "#8172b3", "other": "#cccccc"}


def _pyplot():
    import matplotlib

    # Agg before pyplot is imported: plots are written to files, and a CI runner has no display.
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(plt: Any, fig: Any, path: Path) -> None:
    """Lay out, write the PNG and release the figure (pyplot keeps every open figure otherwise)."""
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _series_label(sc: dict[str, Any]) -> str:
    return "copy" if sc["mode"] == "copy" else f"no-copy, {sc['channels']} ch"


def _migrations(doc: dict[str, Any]) -> tuple[list[str], list[int], list[dict[str, Any]]]:
    mig = [s for s in doc["scenarios"] if s["kind"] == "migrate"]
    directions = [d for d in DIRECTIONS if any(s["direction"] == d for s in mig)]
    sizes = sorted({s["folio_bytes"] for s in mig})
    return directions, sizes, mig


def _ceiling(doc: dict[str, Any], direction: str) -> dict[str, Any] | None:
    return next((c for c in doc.get("ceilings", []) if c["direction"] == direction), None)


def plot_throughput(doc: dict[str, Any], path: Path) -> None:
    """Throughput against folio size, one panel per direction, one line per mode; the ceiling dashed."""
    plt = _pyplot()
    directions, sizes, mig = _migrations(doc)
    fig, axes = plt.subplots(1, len(directions), figsize=(5.2 * len(directions), 4.2), squeeze=False,
                             sharey=True)
    xs = list(range(len(sizes)))
    for ax, d in zip(axes[0], directions, strict=True):
        labels = sorted({_series_label(s) for s in mig if s["direction"] == d}, key=lambda x: (x != "copy", x))
        for label in labels:
            pts = {s["folio_bytes"]: s["gbps"] for s in mig if s["direction"] == d and _series_label(s) == label}
            x = [i for i, sz in enumerate(sizes) if sz in pts]
            ax.plot(x, [pts[sizes[i]] for i in x], marker="o", label=label,
                    linestyle="-" if label == "copy" else "--" if label.endswith(" 1 ch") else "-.")
        c = _ceiling(doc, d)
        if c:
            ax.axhline(c["gbps"], color="black", linestyle=":", linewidth=1.5,
                       label=f"ceiling {c['gbps']:.1f} GB/s")
        ax.set_title(DIRECTIONS[d])
        ax.set_xticks(xs, [format_size(s) for s in sizes])
        ax.set_xlabel("folio size")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("GB/s (median)")
    fig.suptitle(f"Migration throughput vs folio size ({doc['machine']['backend']} backend, "
                 f"{format_size(doc['settings']['total_bytes'])} per run)")
    _save(plt, fig, path)


def plot_copy_vs_nocopy(doc: dict[str, Any], path: Path) -> None:
    """Grouped bars: copy against the best no-copy run per (direction, folio size), the ceiling as a line."""
    plt = _pyplot()
    directions, sizes, mig = _migrations(doc)
    fig, axes = plt.subplots(1, len(directions), figsize=(5.2 * len(directions), 4.2), squeeze=False,
                             sharey=True)
    width = 0.38
    for ax, d in zip(axes[0], directions, strict=True):
        copy, best = [], []
        for sz in sizes:
            cell = [s for s in mig if s["direction"] == d and s["folio_bytes"] == sz]
            copy.append(max((s["gbps"] for s in cell if s["mode"] == "copy"), default=0.0))
            best.append(max((s["gbps"] for s in cell if s["mode"] == "nocopy"), default=0.0))
        xs = range(len(sizes))
        ax.bar([x - width / 2 for x in xs], copy, width, label="copy (CPU copies)", color="#dd8452")
        bars = ax.bar([x + width / 2 for x in xs], best, width, label="no-copy (DMA copies), best ch",
                      color="#4c72b0")
        for rect, c, n in zip(bars, copy, best, strict=True):
            if c > 0:
                ax.annotate(f"{n / c:.2f}x", (rect.get_x() + rect.get_width() / 2, rect.get_height()),
                            ha="center", va="bottom", fontsize=8)
        c = _ceiling(doc, d)
        if c:
            ax.axhline(c["gbps"], color="black", linestyle=":", linewidth=1.5,
                       label=f"ceiling {c['gbps']:.1f} GB/s")
        ax.set_title(DIRECTIONS[d])
        ax.set_xticks(list(xs), [format_size(s) for s in sizes])
        ax.set_xlabel("folio size")
        ax.grid(True, axis="y", alpha=0.3)
        # Headroom above the tallest bar or the ceiling, so the legend covers neither.
        top = max([*copy, *best, c["gbps"] if c else 0.0, 1e-9])
        ax.set_ylim(0, top * 1.4)
        ax.legend(fontsize=8, loc="upper left")
    axes[0][0].set_ylabel("GB/s (median)")
    fig.suptitle("Copy vs no-copy migration (labels: no-copy / copy)")
    _save(plt, fig, path)


def plot_phases(doc: dict[str, Any], path: Path) -> None:
    """Stacked bars of each migration scenario's wall time split into phases."""
    plt = _pyplot()
    _, _, mig = _migrations(doc)
    fig, ax = plt.subplots(figsize=(max(7.0, 0.45 * len(mig) + 3), 4.8))
    xs = range(len(mig))
    bottom = [0.0] * len(mig)
    for p in (*PHASES, "other"):
        if p == "other":
            vals = [max(0.0, 1.0 - b) for b in bottom]
        else:
            vals = [(s.get("phase_share") or {}).get(p, 0.0) for s in mig]
        ax.bar(xs, vals, bottom=bottom, color=_PHASE_COLORS[p], label=p)
        bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
    ax.set_xticks(list(xs), [s["id"].removeprefix("migrate/") for s in mig], rotation=70, ha="right",
                  fontsize=7)
    ax.set_ylabel("share of wall time")
    ax.set_ylim(0, max(1.0, max(bottom, default=1.0)))
    ax.set_title("Where migration time goes (median repetition)")
    # Outside the axes: the bars fill the whole height.
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5))
    _save(plt, fig, path)


def write_plots(doc: dict[str, Any], out_dir: str | Path) -> list[Path]:
    """Write every plot of ``doc`` into ``out_dir``; return the paths written.

    Plots: ``throughput_vs_folio.png``, ``copy_vs_nocopy.png``, ``phases.png``. Nothing is written when the
    document has no migration scenarios.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not any(s["kind"] == "migrate" for s in doc["scenarios"]):
        return []
    paths = []
    for name, fn in (("throughput_vs_folio.png", plot_throughput), ("copy_vs_nocopy.png", plot_copy_vs_nocopy),
                     ("phases.png", plot_phases)):
        fn(doc, out / name)
        paths.append(out / name)
    return paths
