"""Summary of the four sweeps (before-1/2, now-1/2): the faithful host->device migration rows."""
import json
import sys

root = sys.argv[1] if len(sys.argv) > 1 else "."
ids = ["migrate/h2d/4k/copy", "migrate/h2d/4k/nocopy/ch1", "migrate/h2d/4k/nocopy/ch2", "migrate/h2d/64k/copy",
       "migrate/h2d/64k/nocopy/ch1", "migrate/h2d/64k/nocopy/ch2", "migrate/h2d/2m/copy", "migrate/h2d/2m/nocopy/ch1",
       "migrate/h2d/2m/nocopy/ch2"]
runs = [(w, r) for w in ("before", "now") for r in (1, 2)]
print("faithful host->device rows, 256M each, medians of 5: GB/s (x the same-run ceiling, x the copy of that size)")
print(f"{'scenario':28s} " + " ".join(f"{w}-{r}".ljust(24) for w, r in runs))
for sid in ids:
    cells = []
    for w, r in runs:
        d = json.load(open(f"{root}/sweep-{w}-{r}/results.json"))
        s = {s["id"]: s for s in d["scenarios"]}[sid]
        x = s["speedup_vs_copy"]
        cell = f"{s['gbps']:5.2f} ({s['ceiling_ratio']:.2f}x"
        cell += f", {x:.2f}x)" if x else ")"
        cells.append(cell.ljust(24))
    print(f"{sid:28s} " + " ".join(cells))
