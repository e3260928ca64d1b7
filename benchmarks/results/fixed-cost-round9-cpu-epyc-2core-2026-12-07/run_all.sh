#!/bin/bash
# Every figure of this folder, in this order. /tmp/base and /tmp/now are git worktrees of the two commits
# (machine.txt). blocks.sh, blocks.py and single_call.py are round 8's, run unchanged from its folder;
# single_call.py and the sweep run the "now" commit, from outside the repository.
here="$(cd "$(dirname "$0")" && pwd)"
round8="$here/../fixed-cost-round8-cpu-epyc-2core-2026-12-07"
cd "$here"
(cd "$round8" && bash blocks.sh 5) > blocks.txt 2>&1
bash ab_bench.sh 2
(cd /tmp && PYTHONPATH=/tmp/now python3 "$round8/single_call.py" && PYTHONPATH=/tmp/now python3 "$round8/single_call.py" copy) \
    > single-call.txt 2>&1
(cd /tmp && PYTHONPATH=/tmp/now python3 -m dmamig bench --out "$here/bench") > sweep-now-1.log 2>&1
python3 sweep_summary.py > sweep-summary.txt
