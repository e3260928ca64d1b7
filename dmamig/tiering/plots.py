"""Figures of replays: one column per mode (copy and no-copy side by side), epochs on the x axis."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

__all__ = ["plot_replays", "settings_line"]

#: Figure file -> (title, [(y-axis label, [(series, label, scale), ...]) per panel row]).
_FIGURES = {
    "migrations.png": ("Pages migrated per epoch",
                       [("pages migrated in the epoch", [("promoted", "promoted", 1), ("demoted", "demoted", 1)])]),
    "occupancy.png": ("Tier occupancy of the region (pages, at epoch start)",
                      [("pages of the region on the node", [("fast_pages", "fast tier (node 0)", 1),
                                                             ("slow_pages", "slow tier (node 1)", 1),
                                                             ("device_pages", "device (node 2)", 1)])]),
    "stall_cpu.png": ("Accessor stall and migrating-thread CPU per epoch",
                      [("accessor stall, ms per epoch", [("stall_ns", "accessor stall (ms)", 1e-6)]),
                       ("migrating-thread CPU, ms per epoch", [("migrate_cpu_ns", "migrating-thread CPU (ms)",
                                                                1e-6)])]),
}


def settings_line(cfg: dict[str, Any]) -> str:
    """The settings of a replay in one line, for a figure's title: what the figures depend on."""
    params = ", ".join(f"{k} {v}" for k, v in (cfg.get("policy_params") or {}).items())
    ps = int(cfg.get("page_size") or 4096)
    size = f"{ps // 1024}K" if ps % 1024 == 0 else f"{ps} B"
    fast = cfg.get("fast_fraction")
    parts = [f"policy {cfg.get('policy')}" + (f" ({params})" if params else ""),
             f"{cfg.get('region_pages')} pages of {size}",
             f"fast tier {cfg.get('fast_pages')} pages" + (f" ({fast:.0%})" if isinstance(fast, float) else ""),
             f"slow tier {cfg.get('slow_cost', '?')}x slower",
             f"{cfg.get('records')} accesses in {cfg.get('epochs')} epochs",
             f"{cfg.get('channels', '?')} DMA channels", f"{cfg.get('threads', '?')} accessor thread(s)",
             f"seed {cfg.get('seed', '?')}"]
    if cfg.get("device_actors"):
        parts.append(f"device actors {cfg['device_actors']}, {cfg.get('device_pages')} device pages")
    return ", ".join(parts)


def plot_replays(runs: list[dict[str, Any]], out: Path) -> list[Path]:
    """Draw every figure of ``runs`` (``ReplayResult.to_dict()`` of each mode) into ``out``; return the files."""
    import matplotlib

    matplotlib.use("Agg")  # files only: replay runs on machines without a display
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    written = []
    for fname, (title, rows) in _FIGURES.items():
        fig, axes = plt.subplots(len(rows), len(runs), figsize=(max(9.0, 5 * len(runs)), 3 * len(rows) + 1.2),
                                 squeeze=False, sharey="row")
        for c, run in enumerate(runs):
            cfg, ep = run["config"], run["epochs"]
            for r, (ylabel, row) in enumerate(rows):
                ax = axes[r][c]
                if c == 0:
                    ax.set_ylabel(ylabel)
                for key, label, scale in row:
                    if key == "device_pages" and not any(ep.get(key, ())):
                        continue  # no device in this replay
                    ax.plot(range(len(ep[key])), [v * scale for v in ep[key]], label=label, marker=".")
                ax.set_xlabel("epoch")
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole
                ax.legend(fontsize="small")
                if r == 0:
                    ax.set_title(f"{cfg['mode']} migration")
        cfg = runs[0]["config"]
        fig.suptitle(f"{title}: trace {cfg['trace']}\n" + "\n".join(textwrap.wrap(settings_line(cfg), 110)),
                     fontsize=10)
        fig.tight_layout()
        path = out / fname
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    return written
