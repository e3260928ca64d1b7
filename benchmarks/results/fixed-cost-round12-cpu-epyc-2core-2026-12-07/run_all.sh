#!/bin/bash
# Every figure of this folder, in this order. /tmp/base and /tmp/now are git worktrees of the two commits
# (machine.txt). The A/B scripts import both packages in one process: they are copied side by side into $AB_DIR
# as dmamig_before and dmamig_now (every import inside the package is relative, so a copy under another name
# runs as it is). The other scripts run from outside the repository, on the worktree PYTHONPATH names.
here="$(cd "$(dirname "$0")" && pwd)"
cd "$here"
export AB_DIR=${AB_DIR:-/tmp/ab}
rm -rf "$AB_DIR" && mkdir -p "$AB_DIR"
cp -r /tmp/base/dmamig "$AB_DIR/dmamig_before"
cp -r /tmp/now/dmamig "$AB_DIR/dmamig_now"
find "$AB_DIR" -name __pycache__ -prune -exec rm -rf {} +
for r in 1 2 3; do
  for case in "nocopy 32 9" "copy 32 9" "nocopy 1 9" "copy 1 9" "nocopy 1 0" "copy 1 0"; do
    set -- $case
    echo "$r $(cd /tmp && MODE=$1 FOLIOS=$2 ORDER=$3 python3 "$here/migrate_ab.py")"
  done
done > migrate-ab.txt 2>&1
for r in 1 2; do
  for kind in 4k 2m; do
    for ch in 1 4; do
      echo "$r $(cd /tmp && KIND=$kind CH=$ch python3 "$here/submit_ab.py")"
    done
  done
done > submit-ab.txt 2>&1
for w in before now; do
  d=/tmp/base; [ $w = now ] && d=/tmp/now
  for r in 1 2; do
    (cd $d && python3 benchmarks/bench_submit.py --backend standin) > "submit-standin-$w-$r.txt" 2>&1
    (cd $d && python3 -m pytest -q -p no:cacheprovider benchmarks/bench_bound.py --benchmark-only -s) \
      > "bound-$w-$r.txt" 2>&1
  done
done
for r in 1 2; do
  mkdir -p "sweep-$r"
  (cd /tmp && PYTHONPATH=/tmp/now python3 -m dmamig bench --out "$here/sweep-$r/bench") > "sweep-now-$r.log" 2>&1
  python3 ../fixed-cost-round9-cpu-epyc-2core-2026-12-07/sweep_summary.py "sweep-$r" > "sweep-summary-$r.txt"
done
