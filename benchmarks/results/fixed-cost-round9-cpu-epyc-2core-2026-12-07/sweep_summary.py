"""The faithful host->device migration rows of this folder's sweep (bench/results.json)."""
import json
import sys

root = sys.argv[1] if len(sys.argv) > 1 else "."
ids = ["migrate/h2d/4k/copy", "migrate/h2d/4k/nocopy/ch1", "migrate/h2d/4k/nocopy/ch2", "migrate/h2d/64k/copy",
       "migrate/h2d/64k/nocopy/ch1", "migrate/h2d/64k/nocopy/ch2", "migrate/h2d/2m/copy", "migrate/h2d/2m/nocopy/ch1",
       "migrate/h2d/2m/nocopy/ch2"]
scenarios = {s["id"]: s for s in json.load(open(f"{root}/bench/results.json"))["scenarios"]}
print("faithful host->device rows, 256M each, medians of 5: GB/s (x the same-run ceiling, x the copy of that size)")
for sid in ids:
    s = scenarios[sid]
    x = s["speedup_vs_copy"]
    print(f"{sid:28s} {s['gbps']:6.2f} ({s['ceiling_ratio']:.2f}x" + (f", {x:.2f}x)" if x else ")"))
