#!/bin/bash
# Alternating before/now, N rounds: each line is "round mode before|now lowest middle" (one_page.py).
# /tmp/base and /tmp/now are git worktrees of the two commits (machine.txt).
for r in $(seq 1 $1); do
  for mode in nocopy copy; do
    for w in before now; do
      d=/tmp/base; [ $w = now ] && d=/tmp/now
      v=$(cd /tmp && PYTHONPATH=$d MODE=$mode python3 "$OLDPWD/one_page.py" | awk '{print $4, $5}')
      echo "$r $mode $w $v"
    done
  done
done
