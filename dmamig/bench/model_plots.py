"""The plots of ``dmamig model``: modelled throughput against folio size, and where DMA offload pays.

Every title names the cost model (modelled, never measured) and says that the 1 GiB runs were scaled from real
runs of a smaller buffer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .model_study import FOLIOS, ModelStudy
from .plots import pyplot, save_figure

__all__ = ["plot_heat_map", "plot_throughput"]


def plot_throughput(study: ModelStudy, path: Path, lanes: tuple[int, ...]) -> Path:
    """Modelled GB/s against folio size: the vanilla kernel, DMA offload per channel count and the multi-threaded
    copy per thread count, with the published rows (calibration inputs filled, checks hollow)."""
    plt = pyplot()
    folios = list(FOLIOS)
    x = np.arange(len(folios))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), sharey=True)
    cmap = plt.get_cmap("viridis")
    for ax, kind, word in ((axes[0], "dma", "channels"), (axes[1], "mtcopy", "threads")):
        base = [study.value("vanilla", f, 0) for f in folios]
        ax.plot(x, base, color="black", lw=2, label="vanilla kernel (512-page batches)")
        for i, n in enumerate(lanes):
            ys = [study.value(kind, f, n) for f in folios]
            ax.plot(x, ys, marker="o", ms=3, color=cmap(i / max(len(lanes) - 1, 1)), label=f"{n} {word}")
        for row in study.published():
            if row["folio"] not in FOLIOS or row["kind"] not in ("vanilla", kind) or row["modelled"] is None:
                continue
            if row["kind"] == "vanilla" and kind == "mtcopy":
                continue
            xi = folios.index(row["folio"])
            ax.plot([xi], [row["published"]], marker="s", ms=8, ls="none", color="#c44e52",
                    mfc="#c44e52" if row["calibration"] else "none")
        ax.set_xticks(x, folios)
        ax.set_xlabel("folio size")
        ax.set_ylim(bottom=0)
        ax.set_title("DMA offload (1 GiB batch)" if kind == "dma" else "multi-threaded copy (1 GiB batch)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left")
    axes[0].set_ylabel(f"modelled GB/s ({study.model.name})")
    fig.suptitle(f"MODELLED move_pages of 1 GiB, cost model {study.model.name} (real runs of "
                 f"{study.real_bytes >> 20} MiB, charges scaled); red squares: published (filled: calibration "
                 f"input)", fontsize=9)
    save_figure(plt, fig, path)
    return path


def plot_heat_map(model_name: str, ratios: dict[str, Any], desc_ns: Any, channel_bw: Any, channels: int,
                  path: Path, here: tuple[float, float] | None = None) -> Path:
    """No-copy ÷ copy (DMA offload over the vanilla kernel) over the per-descriptor cost and the channel
    bandwidth, one panel per folio size; the contour at 1 is where offload starts to pay. ``here``: the model's
    own ``(channel_bw, desc_hw_ns)``, marked with a star."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(ratios), figsize=(6 * len(ratios), 4.8), squeeze=False)
    bw_gb = np.asarray(channel_bw) / 1e9
    for ax, (folio, grid) in zip(axes[0], ratios.items()):
        lg = np.log2(np.clip(grid, 1 / 64, 64))
        im = ax.pcolormesh(bw_gb, np.asarray(desc_ns), lg, cmap="RdBu", vmin=-2, vmax=2, shading="nearest")
        if here is not None:
            ax.plot([here[0] / 1e9], [max(here[1], float(np.min(desc_ns)))], marker="*", ms=14, color="gold",
                    mec="black", ls="none", label=f"{model_name} itself")
            ax.legend(fontsize=7, loc="lower right")
        cs = ax.contour(bw_gb, np.asarray(desc_ns), grid, levels=[0.5, 1.0, 2.0], colors="black",
                        linewidths=[0.6, 1.6, 0.6])
        ax.clabel(cs, fmt=lambda v: f"{v:g}x", fontsize=8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("DMA channel bandwidth, GB/s")
        ax.set_ylabel("engine cost per descriptor, ns")
        ax.set_title(f"{folio} folios, {channels} channels")
        bar = fig.colorbar(im, ax=ax)
        bar.set_label("log2(no-copy ÷ copy): blue, offload pays")
    fig.suptitle(f"MODELLED no-copy ÷ copy throughput, cost model {model_name}, move_pages of 1 GiB "
                 f"(offload: the RFC's 1 GiB batch; copy: the vanilla kernel's 512-page batches)", fontsize=9)
    save_figure(plt, fig, path)
    return path
