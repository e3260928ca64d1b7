#!/bin/bash
# Every figure of this folder, in this order. /tmp/base and /tmp/now are git worktrees of the two commits
# (machine.txt). Round 8's blocks.sh, blocks.py and single_call.py and round 9's ab_bench.sh and sweep_summary.py
# run unchanged from their folders; single_call.py, one_page.py and the sweep run the "now" commit, from outside
# the repository.
here="$(cd "$(dirname "$0")" && pwd)"
round8="$here/../fixed-cost-round8-cpu-epyc-2core-2026-12-07"
round9="$here/../fixed-cost-round9-cpu-epyc-2core-2026-12-07"
cd "$here"
(cd "$round8" && bash blocks.sh 5) > blocks.txt 2>&1
bash one_page.sh 4 > one-page.txt 2>&1
bash "$round9/ab_bench.sh" 2
(cd /tmp && PYTHONPATH=/tmp/now python3 "$round8/single_call.py" && PYTHONPATH=/tmp/now python3 "$round8/single_call.py" copy) \
    > single-call.txt 2>&1
(cd /tmp && PYTHONPATH=/tmp/now python3 -m dmamig bench --out "$here/bench") > sweep-now-1.log 2>&1
python3 "$round9/sweep_summary.py" > sweep-summary.txt
