"""Heat maps of the device-pair records of a results document (see :mod:`dmamig.bench.pairs`).

One cell per ordered pair: source device per row, destination per column. Each cell is annotated with its figure
and its link class (NV nvlink, PS pcie-switch, PH pcie-host); pairs without peer access (copies staged through
host memory) are hatched and starred. Colour scales start at zero.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

from ..topology import LINK_CODES
from .naming import format_size
from .pairs_figures import pair_groups, pair_matrix, pairs_of
from .plots import _pyplot

__all__ = ["plot_pair_gbps", "plot_pair_ratio", "write_pair_plots"]

_STAGED_WORDS = "hatched, *: no peer access, copies staged through host memory"
_LINK_WORDS = "NV nvlink, PS pcie-switch, PH pcie-host"


def _context(doc: dict[str, Any], recs: list[dict[str, Any]]) -> str:
    s, m = doc["settings"], doc["machine"]
    gpus = sorted({g["name"] for g in m.get("gpus") or []})
    where = f"{m['backend']} backend" + (f" ({', '.join(gpus)})" if gpus else "")
    topo = (m.get("topology") or {}).get("name") or recs[0].get("topology") or "?"
    sizes = "/".join(format_size(b) for b in sorted({r["bytes"] for r in recs}))
    reps = f"median of {s['repeat']} repetitions" if s["repeat"] > 1 else "1 repetition"
    return f"{where}, topology {topo}, {sizes} per pair in 2M folios, kernel's batching, {reps}"


def _heatmap(ax: Any, recs: list[dict[str, Any]], field: str, vmax: float, fmt: str, cmap: str) -> Any:
    """Draw one matrix of ``field`` on ``ax``; return the image (for a colour bar)."""
    import numpy as np

    values = pair_matrix(recs, field)
    link, staged = pair_matrix(recs, "link"), pair_matrix(recs, "staged")
    n = len(values)
    grid = np.array([[np.nan if v is None else float(v) for v in row] for row in values], dtype=float)
    import matplotlib

    colors = matplotlib.colormaps[cmap].with_extremes(bad="#eeeeee")  # the diagonal and missing pairs
    img = ax.imshow(np.ma.masked_invalid(grid), cmap=colors, vmin=0.0, vmax=vmax or 1.0)
    small = 8 if n <= 4 else 7
    for a in range(n):
        for b in range(n):
            v = values[a][b]
            if v is None:
                ax.text(b, a, "-" if a == b else "n/a", ha="center", va="center", fontsize=small, color="#888888")
                continue
            if staged[a][b]:
                ax.add_patch(_hatch(a, b))
            dark = float(v) / (vmax or 1.0) < 0.55  # viridis is dark at the bottom of its scale
            color = "white" if dark else "black"
            ax.text(b, a - 0.12, fmt.format(v), ha="center", va="center", fontsize=small + 1, color=color,
                    fontweight="bold")
            code = LINK_CODES.get(link[a][b], "?") + ("*" if staged[a][b] else "")
            ax.text(b, a + 0.25, code, ha="center", va="center", fontsize=small - 1, color=color)
    ticks = list(range(n))
    ax.set_xticks(ticks, [f"d{i}" for i in ticks])
    ax.set_yticks(ticks, [f"d{i}" for i in ticks])
    ax.set_xlabel("destination device")
    ax.set_ylabel("source device")
    ax.tick_params(length=0)
    return img


def _hatch(a: int, b: int) -> Any:
    from matplotlib.patches import Rectangle

    return Rectangle((b - 0.5, a - 0.5), 1, 1, fill=False, hatch="///", edgecolor="#ffffff80", linewidth=0)


def _panels(doc: dict[str, Any], path: Path, plan: list[tuple[str, list[dict[str, Any]], str, str]], fmt: str,
            title: str) -> None:
    """One heat map per ``(label, records, field, scale)`` of ``plan``, side by side; panels of one ``scale``
    (a colour-bar label) share a colour scale from zero and one colour bar."""
    plt = _pyplot()
    recs = [r for _, rs, _, _ in plan for r in rs]
    n = 1 + max(max(r["src_device"], r["dst_device"]) for r in recs)
    side = max(3.4, 0.5 * n + 1.0)
    scales = list(dict.fromkeys(scale for *_, scale in plan))
    # Constrained layout places the three-line title and colour bars that span several panels.
    fig, axes = plt.subplots(1, len(plan), figsize=(side * len(plan) + 1.4 * len(scales), side + 0.9),
                             squeeze=False, layout="constrained")
    # Ratios keep 1 (the ceiling) on their scale, so that a pair far below its ceiling looks it.
    top = {k: max([1.0 if any(f == "ceiling_ratio" for _, _, f, sk in plan if sk == k) else 1e-9,
                   *(r.get(f) or 0.0 for _, rs, f, sk in plan if sk == k for r in rs)]) for k in scales}
    images: dict[str, tuple[Any, list[Any]]] = {}
    for ax, (label, rows, field, scale) in zip(axes[0], plan, strict=True):
        img = _heatmap(ax, rows, field, top[scale], fmt, "viridis")
        ax.set_title(label, fontsize=10)
        images.setdefault(scale, (img, []))[1].append(ax)
    for scale, (img, axs) in images.items():
        fig.colorbar(img, ax=axs, shrink=0.85, pad=0.03).set_label(scale)
    # Wrapped to the figure's width (about 7.5 pixels a character at this size): a small matrix is narrow.
    width = int(fig.get_figwidth() * fig.dpi / 7.5)
    lines = [title, _context(doc, recs), f"{_LINK_WORDS}; {_STAGED_WORDS}"]
    fig.suptitle("\n".join(textwrap.fill(line, width) for line in lines), fontsize=10)
    fig.savefig(path, dpi=100, bbox_inches="tight", pad_inches=0.15)  # square panels: keep every label
    plt.close(fig)


def plot_pair_gbps(doc: dict[str, Any], path: Path) -> None:
    """GB/s of every device pair in each mode (one colour scale), and each pair's ceiling (its own scale)."""
    groups = pair_groups(pairs_of(doc["scenarios"]))
    unit = "GB/s, median (scale starts at 0)"
    plan = [(f"migration, {label}", rows, "gbps", unit) for label, rows in groups]
    plan.append(("ceiling: plain copy of the pair", groups[0][1], "ceiling_gbps", "ceiling GB/s, best (from 0)"))
    _panels(doc, path, plan, "{:.2f}",
            "Device-to-device migration, GB/s per ordered pair; right: each pair's copy ceiling (same task)")


def plot_pair_ratio(doc: dict[str, Any], path: Path) -> None:
    """Each pair's GB/s over its own ceiling (peer copy, or staged where there is no peer access), per mode."""
    unit = "x the pair's ceiling (scale starts at 0)"
    plan = [(f"migration, {label}", rows, "ceiling_ratio", unit)
            for label, rows in pair_groups(pairs_of(doc["scenarios"]))]
    _panels(doc, path, plan, "{:.2f}x",
            "Device-to-device migration over each pair's own copy ceiling (the peer copy, or the staged copy "
            "where the pair has no peer access)")


def write_pair_plots(doc: dict[str, Any], out_dir: str | Path) -> list[Path]:
    """Write ``pairs_gbps.png`` and ``pairs_ceiling_ratio.png`` into ``out_dir`` when ``doc`` has device-pair
    records; return the paths written."""
    if not pairs_of(doc["scenarios"]):
        return []
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "pairs_gbps.png", out / "pairs_ceiling_ratio.png"]
    plot_pair_gbps(doc, paths[0])
    plot_pair_ratio(doc, paths[1])
    return paths
