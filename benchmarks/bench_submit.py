"""Host cost of one DMA submission: a 512-page batch at 4K (scattered pages) and 2M (one folio), 1 and 4 channels.

    python3 benchmarks/bench_submit.py [--backend cpu|cuda|standin] [--out DIR]

Each case is a short ``run()`` over the same operation, ``m.dma.copy(src, dst)`` (its fence waited for outside
the timed call), on a machine of the chosen backend. It reports, per case, the median host microseconds of:

- ``submit``: the whole ``copy`` call (validation, plan, rows, publish, the fence);
- ``compiled``: the ring's one compiled call alone (:meth:`dmamig.dma.ring.RingRoute.submit`), where the
  lane's channels take rows;

and, over the same calls, the numpy buffers allocated per submission (``tracemalloc``'s numpy domain: a
submission should allocate none) and the submission's share of the target (DESIGN.md: 10 us at 4K, 5 us at 2M).

``--backend standin`` runs the CUDA backend's own code (the ring lane, its launch and its waits) over the CuPy
stand-in of ``tests/test_cuda_fake.py`` with a zero-cost device: a launch is queued and runs, untimed, after the
timed call, publishing each job done without copying. It adds the runtime calls a submission makes (the
launches and the runtime entry points the stand-in logs) and ``stand-in us``: the stand-in's own Python for one
launch (entering the device and the stream, the kernel call), measured alone. A zero-cost runtime would cost
none of it, so the share of the target is taken from the submission net of it (both are in submit.json). Medians; these machines are noisy. Nothing here is a
pass/fail test.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import time
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np

from dmamig import Machine
from dmamig.dma import ring as dma_ring

#: Base pages of one submission: the kernel's NR_MAX_BATCHED_MIGRATION.
BATCH = 512
#: Calls timed per case (after as many warm-up calls).
CALLS = 400
#: The design's targets, host microseconds per submission.
TARGET_US = {"4k": 10.0, "2m": 5.0}
#: tracemalloc's domain for numpy's data buffers.
NUMPY_DOMAIN = 389047


def pages(m: Machine, kind: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Source and destination pfns of one batch: scattered 4K pages in random order, or one 2 MiB folio."""
    if kind == "4k":
        return m.alloc_pages(0, BATCH)[rng.permutation(BATCH)], m.alloc_pages(1, BATCH)
    return m.pages.expand(m.alloc_pages(0, 1, order=9)), m.pages.expand(m.alloc_pages(1, 1, order=9))


def timed_submissions(dma: Any, src: np.ndarray, dst: np.ndarray, calls: int = CALLS) -> float:
    """Median host microseconds of ``dma.copy(src, dst)``, each fence waited for outside the timed call
    (``calls`` timed, after as many untimed)."""
    times = []
    for k in range(2 * calls):
        t0 = time.perf_counter_ns()
        fence = dma.copy(src, dst)
        t1 = time.perf_counter_ns()
        fence.wait()
        if k >= calls:
            times.append(t1 - t0)
    return statistics.median(times) / 1e3


def compiled_only(dma: Any, src: np.ndarray, dst: np.ndarray) -> float | str:
    """Median host microseconds of the ring's compiled call alone (the engine's own route, its jobs waited for)."""
    found = dma.ring_route(src, dst)
    if found is None:
        return "not measured: this lane's channels take no rows"
    route, lane = found
    times = []
    for k in range(2 * CALLS):
        t0 = time.perf_counter_ns()
        got = route.submit(src, dst, False)
        t1 = time.perf_counter_ns()
        if isinstance(got, int):  # a ring full: make room and try again, untimed
            route.ring_set.make_room()
            continue
        for c, (seq, asleep) in enumerate(got.jobs):
            if seq >= 0:
                if asleep:
                    lane[c].wake()
                lane[c].completion(seq).wait()
        if k >= CALLS:
            times.append(t1 - t0)
    return statistics.median(times) / 1e3


def numpy_allocations(dma: Any, src: np.ndarray, dst: np.ndarray, calls: int = 100) -> float:
    """numpy buffers allocated per ``copy`` call (fences waited for outside the count)."""
    fences = []
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot().filter_traces([tracemalloc.DomainFilter(True, NUMPY_DOMAIN)])
        for _ in range(calls):
            fences.append(dma.copy(src, dst))
            fences[-1].wait()
        after = tracemalloc.take_snapshot().filter_traces([tracemalloc.DomainFilter(True, NUMPY_DOMAIN)])
    finally:
        tracemalloc.stop()
    grown = sum(max(0, s.count_diff) for s in after.compare_to(before, "lineno"))
    return grown / calls


def standin_engine(channels: int) -> tuple[Any, Any, Any]:
    """A DMA engine of the CUDA backend over the stand-in's zero-cost device, and the stand-in's GPU: host and
    device nodes of ``8 * BATCH`` pages each."""
    import sys

    tests = Path(__file__).resolve().parent.parent / "tests"
    sys.path.insert(0, str(tests))
    import test_cuda_fake as fake  # the stand-in lives beside the tests that check it
    from support import engine_for, make_nodes

    from dmamig.backends.cuda.backend import CudaBackend

    def publish_only(self: Any, args: tuple[int, ...]) -> None:  # the protocol's completion, no bytes moved
        ctl, _rows, jobs, _regions, _done = args[:5]
        channels_, _row_cap, job_cap, ctl_words, _bpc = args[13:18]
        for c, seq in enumerate(args[5:5 + channels_]):
            if seq < 0:
                continue
            words = np.ctypeslib.as_array((ctypes.c_int64 * ctl_words).from_address(ctl + 8 * c * ctl_words))
            slot = np.ctypeslib.as_array((ctypes.c_int64 * 4).from_address(jobs + 32 * (c * job_cap + seq % job_cap)))
            slot[3] = 1
            words[dma_ring.ROW_HEAD] = slot[1] + slot[2]
            words[dma_ring.HEAD] = seq + 1

    fake.FakeKernel._ring_copy = publish_only
    gpu = fake.FakeGpu(auto=False)
    backend = CudaBackend(cupy=fake.FakeCupy(gpu))
    nodes = make_nodes(backend, sizes=(8 * BATCH, 8 * BATCH), devices=(-1, 0))
    return engine_for(backend, nodes, channels=channels), gpu, backend


def standin_launch_us(gpu: Any, channels: int) -> float:
    """Median host microseconds of the stand-in's own part of one launch: entering a device and a stream and
    calling a ``ring_copy`` kernel with the lane's 18 arguments and no job (its queued work run untimed). A zero-cost
    runtime would take none of it: the submission minus this is the CUDA path's own code."""
    import test_cuda_fake as fake  # on sys.path since standin_engine()

    cp = fake.FakeCupy(gpu)
    kernel = fake.FakeKernel(gpu, "ring_copy")
    device, stream = cp.cuda.Device(0), cp.cuda.Stream(non_blocking=True)
    args = (0, 0, 0, 0, 0) + (-1,) * 8 + (channels, 0, 1, 40, 1)
    times = []
    for k in range(2 * CALLS):
        t0 = time.perf_counter_ns()
        with device, stream:
            kernel((channels,), (256,), args)
        t1 = time.perf_counter_ns()
        gpu.run()
        if k >= CALLS:
            times.append(t1 - t0)
    return statistics.median(times) / 1e3


def run_standin(channels: int, kind: str) -> dict[str, Any]:
    """One case on the stand-in: host microseconds and runtime calls of the CUDA path's submission, and the same
    net of the stand-in's own launch (what a zero-cost runtime leaves)."""
    engine, gpu, backend = standin_engine(channels)
    try:
        rng = np.random.default_rng(0)
        n = 8 * BATCH
        src = rng.permutation(BATCH).astype(np.int64) if kind == "4k" else np.arange(BATCH, dtype=np.int64)
        dst = n + np.arange(BATCH, dtype=np.int64)
        times, calls = [], []
        for k in range(2 * CALLS):
            logged, launched = len(gpu.log), len(gpu.launches)
            t0 = time.perf_counter_ns()
            fence = engine.copy(src, dst)
            t1 = time.perf_counter_ns()
            calls.append(len(gpu.log) - logged + len(gpu.launches) - launched)
            gpu.run()  # the device, untimed
            fence.wait()
            if k >= CALLS:
                times.append(t1 - t0)
        submit = statistics.median(times) / 1e3
        own = standin_launch_us(gpu, channels)
        net = submit - max(calls[CALLS:]) * own
        gpu.auto = True  # the allocation count waits for its fences
        return {"backend": "cuda (stand-in, zero-cost device)", "channels": channels, "pages": kind,
                "submit_us": round(submit, 3), "compiled_us": "not measured", "runtime_calls": max(calls[CALLS:]),
                "standin_launch_us": round(own, 3), "submit_net_of_standin_us": round(net, 3),
                "numpy_allocations_per_submission": numpy_allocations(engine, src, dst),
                "target_us": TARGET_US[kind], "share_of_target": round(net / TARGET_US[kind], 2)}
    finally:
        gpu.run()
        engine.close()
        backend.close()


def run(backend: str, channels: int, kind: str) -> dict[str, Any]:
    """One case: a machine with ``channels`` channels per device, a batch of ``kind`` pages, every figure."""
    m = Machine(host_pages=8 * BATCH, device_pages=8 * BATCH, devices=1, backend=backend, channels=channels)
    try:
        src, dst = pages(m, kind, np.random.default_rng(0))
        submit = timed_submissions(m.dma, src, dst)
        return {"backend": m.backend_name, "channels": channels, "pages": kind, "submit_us": round(submit, 3),
                "compiled_us": compiled_only(m.dma, src, dst),
                "numpy_allocations_per_submission": numpy_allocations(m.dma, src, dst),
                "target_us": TARGET_US[kind], "share_of_target": round(submit / TARGET_US[kind], 2)}
    finally:
        m.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", default="cpu", choices=["auto", "cpu", "cuda", "standin"])
    ap.add_argument("--out", type=Path, help="folder for submit.json (created)")
    args = ap.parse_args(argv)
    case = run_standin if args.backend == "standin" else lambda c, kind: run(args.backend, c, kind)
    rows = [case(c, kind) for kind in ("4k", "2m") for c in (1, 4)]
    print(f"backend: {rows[0]['backend']}")
    print(f"{'pages':>5} {'ch':>3} {'submit us':>10} {'compiled us':>12} {'np allocs':>10} {'runtime calls':>14} "
          f"{'stand-in us':>12} {'x target':>9}")
    for r in rows:
        comp = r["compiled_us"] if isinstance(r["compiled_us"], str) else f"{r['compiled_us']:.2f}"
        own = f"{r['standin_launch_us']:.2f}" if "standin_launch_us" in r else "-"
        print(f"{r['pages']:>5} {r['channels']:>3} {r['submit_us']:>10.2f} {comp:>12} "
              f"{r['numpy_allocations_per_submission']:>10.2f} {r.get('runtime_calls', '-'):>14} {own:>12} "
              f"{r['share_of_target']:>9.2f}")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "submit.json").write_text(json.dumps({"rows": rows, "ring_available": dma_ring.RING_AVAILABLE},
                                                         indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
