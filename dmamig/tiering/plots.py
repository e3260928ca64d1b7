"""Figures of replays: one column per mode (copy and no-copy side by side), epochs on the x axis."""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["plot_replays"]

#: Figure file -> (title, [(series, label, scale), ...] per panel row).
_FIGURES = {
    "migrations.png": ("Pages migrated per epoch", [[("promoted", "promoted", 1), ("demoted", "demoted", 1)]]),
    "occupancy.png": ("Tier occupancy of the region (pages, at epoch start)",
                      [[("fast_pages", "fast tier (node 0)", 1), ("slow_pages", "slow tier (node 1)", 1),
                        ("device_pages", "device (node 2)", 1)]]),
    "stall_cpu.png": ("Accessor stall and migrating-thread CPU per epoch",
                      [[("stall_ns", "accessor stall (ms)", 1e-6)],
                       [("migrate_cpu_ns", "migrating-thread CPU (ms)", 1e-6)]]),
}


def plot_replays(runs: list[dict[str, Any]], out: Path) -> list[Path]:
    """Draw every figure of ``runs`` (``ReplayResult.to_dict()`` of each mode) into ``out``; return the files."""
    import matplotlib

    matplotlib.use("Agg")  # files only: replay runs on machines without a display
    import matplotlib.pyplot as plt

    written = []
    for fname, (title, rows) in _FIGURES.items():
        fig, axes = plt.subplots(len(rows), len(runs), figsize=(5 * len(runs), 3 * len(rows)), squeeze=False,
                                 sharey="row")
        for c, run in enumerate(runs):
            cfg, ep = run["config"], run["epochs"]
            for r, row in enumerate(rows):
                ax = axes[r][c]
                for key, label, scale in row:
                    if key == "device_pages" and not any(ep.get(key, ())):
                        continue  # no device in this replay
                    ax.plot(range(len(ep[key])), [v * scale for v in ep[key]], label=label, marker=".")
                ax.set_xlabel("epoch")
                ax.legend(fontsize="small")
                if r == 0:
                    ax.set_title(f"{cfg['mode']} ({cfg['policy']})")
        fig.suptitle(f"{title}: {runs[0]['config']['trace']}")
        fig.tight_layout()
        path = out / fname
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    return written
