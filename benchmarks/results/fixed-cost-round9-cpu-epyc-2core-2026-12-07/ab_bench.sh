#!/bin/bash
# Alternating before/now runs of bench_batch and bench_bound (N rounds), each output in its own file.
for r in $(seq 1 $1); do
  for w in before now; do
    d=/tmp/base; [ $w = now ] && d=/tmp/now
    (cd $d && python3 -m pytest -q -p no:cacheprovider benchmarks/bench_batch.py --benchmark-only -s) > batch-$w-$r.txt 2>&1
    (cd $d && python3 -m pytest -q -p no:cacheprovider benchmarks/bench_bound.py --benchmark-only -s) > bound-$w-$r.txt 2>&1
  done
done
