#!/bin/bash
# Every figure of this folder, in this order. /tmp/base and /tmp/now are git worktrees of the two commits
# (machine.txt); scripts run from outside the repository, on the worktree PYTHONPATH names.
here="$(cd "$(dirname "$0")" && pwd)"
cd "$here"
bash blocks_ab.sh 3 > blocks.txt 2>&1
for r in 1 2; do
  for w in before now; do
    d=/tmp/base; [ $w = now ] && d=/tmp/now
    for mode in nocopy copy; do
      echo "$r $w $mode $(cd /tmp && PYTHONPATH=$d MODE=$mode python3 "$here/batch_4k.py")"
      echo "$r $w $mode $(cd /tmp && PYTHONPATH=$d MODE=$mode python3 "$here/phases.py")" >> phases.txt
    done
  done
done > batch-4k.txt
for r in 1 2; do
  for w in before now; do
    d=/tmp/base; [ $w = now ] && d=/tmp/now
    (cd $d && python3 -m pytest -q -p no:cacheprovider benchmarks/bench_bound.py --benchmark-only -s) > "bound-$w-$r.txt" 2>&1
  done
done
for w in before now; do
  d=/tmp/base; [ $w = now ] && d=/tmp/now
  (cd $d && python3 -m pytest -q -p no:cacheprovider benchmarks/bench_batch.py --benchmark-only -s) > "batch-$w-1.txt" 2>&1
  for backend in cpu standin; do
    (cd $d && python3 benchmarks/bench_submit.py --backend $backend) > "submit-$backend-$w.txt" 2>&1
  done
done
(cd /tmp && PYTHONPATH=/tmp/now python3 -m dmamig bench --out "$here/bench") > sweep-now-1.log 2>&1
python3 ../fixed-cost-round9-cpu-epyc-2core-2026-12-07/sweep_summary.py > sweep-summary.txt
