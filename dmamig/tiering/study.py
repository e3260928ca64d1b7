"""Policy studies and comparisons: every workload under every policy, copy vs no-copy, in one table.

:func:`run_study` replays the built-in workloads and writes ``study.json``, ``study.md`` (a markdown table)
and ``study.png``; :func:`compare` reads ``results.json`` files of ``dmamig replay`` (or a ``study.json``)
into the same rows, for ``dmamig replay-report``.
"""

from __future__ import annotations

import json
import platform
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .policies import POLICIES, make_policy
from .replay import replay
from .workloads import WORKLOADS, make_workload

__all__ = ["ROW_FIELDS", "compare", "markdown_table", "row_of", "run_study"]

#: Columns of a comparison row.
ROW_FIELDS = ("workload", "policy", "mode", "fast_hit_share", "promoted", "demoted", "mib_migrated",
              "cpu_us_per_page", "migrate_cpu_ms", "stalls", "stall_ms", "access_cost", "uvm_in", "uvm_evicted",
              "verified")


def row_of(run: dict[str, Any]) -> dict[str, Any]:
    """One comparison row of a replay (``ReplayResult.to_dict()``)."""
    s, c = run["summary"], run["config"]
    per = s["cpu_ns_per_migrated_page"]
    return {"workload": c["trace"], "policy": c["policy"], "mode": c["mode"],
            "fast_hit_share": round(s["fast_hit_share"], 4), "promoted": s["promoted"], "demoted": s["demoted"],
            "mib_migrated": round(s["bytes_migrated"] / 2**20, 2),
            "cpu_us_per_page": None if per is None else round(per / 1e3, 2),
            "migrate_cpu_ms": round(s["migrate_cpu_ns"] / 1e6, 2), "stalls": s["stalls"],
            "stall_ms": round(s["stall_ns"] / 1e6, 2), "access_cost": round(s["access_cost"] / 2**20, 2),
            "uvm_in": s.get("uvm_migrated", 0), "uvm_evicted": s.get("uvm_evicted", 0), "verified": s["verified"]}


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """The rows as a markdown table (``access_cost`` in cost-weighted MiB)."""
    head = "| " + " | ".join(ROW_FIELDS) + " |\n|" + "---|" * len(ROW_FIELDS) + "\n"
    return head + "".join("| " + " | ".join("-" if r[k] is None else str(r[k]) for k in ROW_FIELDS) + " |\n"
                          for r in rows)


def compare(paths: Sequence[str | Path]) -> list[dict[str, Any]]:
    """Comparison rows of ``results.json`` / ``study.json`` files (or folders holding one)."""
    rows = []
    for p in map(Path, paths):
        if p.is_dir():
            p = p / "results.json" if (p / "results.json").exists() else p / "study.json"
        doc = json.loads(p.read_text())
        rows += [row_of(run) for run in doc["runs"]]
    return rows


def run_study(out: str | Path, workloads: Sequence[str] = tuple(sorted(WORKLOADS)),
              policies: Sequence[str] = tuple(sorted(POLICIES)), modes: Sequence[str] = ("copy", "no-copy"),
              workload_kw: dict[str, Any] | None = None, policy_kw: dict[str, dict[str, Any]] | None = None,
              replay_kw: dict[str, Any] | None = None,
              progress: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Replay each workload under each policy in each mode; write ``study.json``, ``study.md``, ``study.png``.

    Parameters
    ----------
    out : path
        Folder to write into (created).
    workloads, policies, modes : sequence of str
        What to run.
    workload_kw, policy_kw, replay_kw : dict, optional
        Arguments of every workload, of each policy by name, and of :func:`~dmamig.tiering.replay`.
    progress : callable, optional
        Called with a label before each replay.

    Returns
    -------
    list of dict
        One comparison row per replay (:data:`ROW_FIELDS`).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    runs = []
    for w in workloads:
        trace = make_workload(w, **(workload_kw or {}))
        on_device = bool(trace.meta.get("device_actors"))
        for p in policies:
            if p.startswith("uvm-") and not on_device:
                continue  # a UVM policy only sets how device actors fault: without any it is first touch
            for mode in modes:
                if progress is not None:
                    progress(f"{w} {p} {mode}")
                res = replay(trace, make_policy(p, **(policy_kw or {}).get(p, {})), mode, **(replay_kw or {}))
                runs.append(res.to_dict())
    rows = [row_of(r) for r in runs]
    doc = {"tool": "dmamig tiering study", "machine": {"platform": platform.platform(),
                                                      "python": platform.python_version(), "backend": "cpu"},
           "settings": {"workload": workload_kw, "policy": policy_kw, "replay": replay_kw}, "runs": runs}
    (out / "study.json").write_text(json.dumps(doc, indent=2))
    (out / "study.md").write_text(markdown_table(rows))
    _plot(rows, out / "study.png")
    return rows


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    workloads = sorted({r["workload"] for r in rows})
    policies = sorted({r["policy"] for r in rows})
    metrics = [("fast_hit_share", "share of accesses on the fast tier", "copy"),
               ("cpu_us_per_page", "migrating-thread CPU per migrated page (us)", None),
               ("stall_ms", "accessor stall (ms)", None)]
    fig, axes = plt.subplots(1, len(metrics), figsize=(6 * len(metrics), 4))
    x = np.arange(len(workloads))
    for ax, (key, label, only) in zip(axes, metrics):
        bars = [(p, m) for p in policies for m in ("copy", "no-copy") if only in (None, m)]
        width = 0.8 / len(bars)
        for i, (p, m) in enumerate(bars):
            vals = [next((r[key] or 0 for r in rows if (r["workload"], r["policy"], r["mode"]) == (w, p, m)), 0)
                    for w in workloads]
            ax.bar(x + i * width, vals, width, label=p if only else f"{p} {m}",
                   hatch="//" if m == "no-copy" else None)
        ax.set_xticks(x + 0.4 - width / 2, workloads, rotation=20)
        ax.set_title(label, fontsize="medium")
        ax.legend(fontsize="x-small")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
