"""The per-call cost of the batch's two compiled calls inside a long 2 MiB no-copy migration (``folios.py no-copy
256``): each call timed as dmamig makes it, and a compiled no-op with the same arguments timed just before it
(what passing them costs). Medians per call, in us.

    python3 calls_ab.py
"""

import os
import runpy
import statistics
import sys
import time

from numba import njit

from dmamig.migrate import batch_loops

times: dict[str, list[int]] = {}


def wrap(name: str) -> None:
    real = getattr(batch_loops, name)
    nargs = real.py_func.__code__.co_argcount
    ns: dict = {}
    exec(f"def noop({', '.join(f'a{i}' for i in range(nargs))}):\n    return a0.size", ns)
    noop = njit(nogil=True)(ns["noop"])

    def timed(*args):
        noop(*args)  # compiled for these types before it is timed
        t0 = time.perf_counter_ns()
        noop(*args)
        times.setdefault(f"{name} (no-op, same arguments)", []).append(time.perf_counter_ns() - t0)
        t0 = time.perf_counter_ns()
        out = real(*args)
        times.setdefault(name, []).append(time.perf_counter_ns() - t0)
        return out

    setattr(batch_loops, name, timed)


for fn in ("unmap_one_vma", "move_one_vma"):
    wrap(fn)
sys.argv = ["folios.py", "no-copy", "256"]
runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "folios.py"), run_name="__main__")
for k, v in times.items():
    print(f"{k}: {statistics.median(v[len(v) // 4:]) / 1e3:.2f}")
