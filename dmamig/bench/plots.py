"""What every bench plot shares (matplotlib, Agg backend: no display needed): pyplot, saving, colours, bars.

Each plot is meant to be read without the documentation: its title names the backend, the working set and the batching
(faithful, i.e. the kernel's, unless marked as an experiment), axes of rates start at zero, legends say
what each colour measures, and error bars span the slowest to the fastest timed repetition. The plots
themselves live with their scenario kind (:mod:`dmamig.bench.migration`, :mod:`dmamig.bench.access`,
:mod:`dmamig.bench.pairs`); :func:`dmamig.bench.report.write_plots` writes them all.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .results import wall_spread

__all__ = ["BARS", "EXTRA_COLORS", "PHASE_COLORS", "PHASE_LEGEND", "pyplot", "save_figure", "spread_bars"]

#: Colour of each migration phase in the phase plots.
PHASE_COLORS = {"isolate": "#64b5cd", "unmap": "#4c72b0", "copy": "#dd8452", "submit": "#da8bc3",
                 "dma_wait": "#8172b3", "move": "#55a868", "undo": "#c44e52", "putback": "#ccb974",
                 "outside": "#bbbbbb"}

#: Colours of phases without one of their own.
EXTRA_COLORS = ("#937860", "#da8bc3", "#8c8c8c", "#ccb974", "#64b5cd")

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

#: What an error bar spans, for the axis labels.
BARS = "bars: slowest to fastest repetition"

def pyplot() -> Any:
    """matplotlib's pyplot, on the Agg backend."""
    import matplotlib

    # Agg before pyplot is imported: plots are written to files, and a CI runner has no display.
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt

def save_figure(plt: Any, fig: Any, path: Path, rect: tuple[float, float, float, float] = (0, 0, 1, 1)) -> None:
    """Lay out (inside ``rect``, leaving room for a figure legend), write the PNG and release the figure.

    pyplot keeps every open figure otherwise.
    """
    fig.tight_layout(rect=rect)
    fig.savefig(path, dpi=100)
    plt.close(fig)

def spread_bars(recs: list[dict[str, Any] | None], value: str = "gbps") -> tuple[list[float], list[float]]:
    """Error bars of ``recs``' ``value`` (``gbps``, or another rate of the same bytes): how far below and above
    the median the slowest and the fastest timed repetition lie; zero for a missing record or one repetition.

    A rate over the same bytes scales as the inverse of the wall time, so a repetition's rate is the median
    rate times the median wall time over that repetition's.
    """
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
