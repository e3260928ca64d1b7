"""Policy study: every built-in workload under every policy, copy vs no-copy, on the CPU backend.

Run ``python benchmarks/policy_study.py [OUT]``; it writes study.json, study.md and study.png into OUT
(default ``benchmarks/results/policy-study-cpu-<date>``). Compare with ``dmamig replay-report OUT/study.json``.

``numa-balancing`` and ``tpp`` run the kernel's paths (hint faults, kswapd demotion) with the kernel's sysctl
defaults; ``--move-pages`` runs them as the 2026-11-25 study did instead (epoch decisions, ``rate_limit`` 512
pages per epoch, migrated in ``move_pages`` SYNC batches): an experiment kept for comparison.
"""

from __future__ import annotations

import datetime
import sys
import time
from pathlib import Path

from dmamig.tiering.study import run_study

WORKLOAD = {"pages": 8192, "epochs": 16, "per_epoch": 4096, "seed": 1}
POLICY = {"numa-balancing": {}, "tpp": {}, "lru": {"rate_limit": 1024}, "uvm-counters": {"threshold": 2}}
#: The 2026-11-25 settings: the epoch path in move_pages SYNC batches (``--move-pages``).
MOVE_PAGES = {"numa-balancing": {"rate_limit": 512, "path": "move_pages"},
              "tpp": {"rate_limit": 512, "path": "move_pages"}}
REPLAY = {"fast_fraction": 0.25, "slow_cost": 2.5, "channels": 2}

if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--move-pages"]
    if "--move-pages" in sys.argv[1:]:
        POLICY.update(MOVE_PAGES)
    out = Path(args[0]) if args else \
        Path(__file__).parent / "results" / f"policy-study-cpu-{datetime.date.today().isoformat()}"
    t0 = time.perf_counter()
    rows = run_study(out, workload_kw=WORKLOAD, policy_kw=POLICY, replay_kw={**REPLAY, "record_events": False},
                     progress=lambda label: print(f"[{time.perf_counter() - t0:6.1f}s] {label}", flush=True))
    print((out / "study.md").read_text())
    sys.exit(0 if all(r["verified"] for r in rows) else 1)
