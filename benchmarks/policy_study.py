"""Policy study: every built-in workload under every policy, copy vs no-copy, on the CPU backend.

Run ``python benchmarks/policy_study.py [OUT]``; it writes study.json, study.md and study.png into OUT
(default ``benchmarks/results/policy-study-cpu-<date>``). Compare with ``dmamig replay-report OUT/study.json``.
"""

from __future__ import annotations

import datetime
import sys
import time
from pathlib import Path

from dmamig.tiering.study import run_study

WORKLOAD = {"pages": 8192, "epochs": 16, "per_epoch": 4096, "seed": 1}
POLICY = {"numa-balancing": {"rate_limit": 512}, "tpp": {"rate_limit": 512}, "lru": {"rate_limit": 1024},
          "uvm-counters": {"threshold": 2}}
REPLAY = {"fast_fraction": 0.25, "slow_cost": 2.5, "channels": 2}

if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else \
        Path(__file__).parent / "results" / f"policy-study-cpu-{datetime.date.today().isoformat()}"
    t0 = time.perf_counter()
    rows = run_study(out, workload_kw=WORKLOAD, policy_kw=POLICY, replay_kw=REPLAY,
                     progress=lambda label: print(f"[{time.perf_counter() - t0:6.1f}s] {label}", flush=True))
    print((out / "study.md").read_text())
    sys.exit(0 if all(r["verified"] for r in rows) else 1)
