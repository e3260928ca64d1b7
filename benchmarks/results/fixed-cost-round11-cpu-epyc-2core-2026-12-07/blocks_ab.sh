#!/bin/bash
# Alternating before/now, N rounds of round 8's blocks.py: "round mode folios before|now lowest middle".
# /tmp/base and /tmp/now are git worktrees of the two commits (machine.txt).
R="$(cd "$(dirname "$0")" && pwd)/../fixed-cost-round8-cpu-epyc-2core-2026-12-07"
for r in $(seq 1 $1); do
  for case in "nocopy 1" "copy 1" "nocopy 32" "copy 32"; do
    set -- $case
    for w in before now; do
      d=/tmp/base; [ $w = now ] && d=/tmp/now
      v=$(cd /tmp && PYTHONPATH=$d MODE=$1 FOLIOS=$2 python3 $R/blocks.py | awk '{print $4, $5}')
      echo "$r $1 $2 $w $v"
    done
  done
done
