"""One GPU check, ready to run on a lent GPU host: per-call costs, DMA submission costs, a re-baseline, the GPU
tests and the CPU bound, written to one results folder in at most ``--budget`` seconds (300 by default).

    python3 benchmarks/gpu_check.py --out "$OUT/gpu-check"

Each check is a short ``run()`` that fills its part of one result dict; the ones that start a process run
under a share of the budget that is left, so a hung step costs its share, not the session. Without a usable
GPU the CUDA per-call costs are skipped with the reason and every other check still runs on the CPU backend,
so the script itself is exercised on any host. It writes:

- ``summary.json``: every figure (medians of host microseconds), the card, the commit and the settings;
- ``summary.md``: the same as tables;
- ``info.txt``, ``bench/`` (``dmamig bench`` at 4K and 2M, faithful batching), ``bench-persistent/`` (the same
  with ``--dma-engine persistent``: the copy re-baseline with the persistent consumer, on CUDA only),
  ``bench-rfc/`` (2M, faithful and the DMA-offload RFC preset), ``bench-cpu-baseline/`` (2M, one channel, with
  ``--copy-baseline cpu``: copy mode as the migrating CPU's memcpy into host-mapped device frames, on CUDA only),
  ``gpu-tests.log``
  (``pytest -m gpu``: the failure paths on the card), ``bound.log`` (``benchmarks/bench_bound.py`` on the
  CPU backend, on the host's own cores) and ``submit-cpu/`` (``benchmarks/bench_submit.py --backend cpu``: the
  CPU channel's submission, 1 and 4 channels, on the same cores).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import bench_submit  # benchmarks/ is the script's own folder
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
#: Calls timed per per-call figure (after as many warm-up calls).
CALLS = 300
#: Base pages of one submission: the kernel's NR_MAX_BATCHED_MIGRATION.
BATCH = 512
#: Most seconds each process step may take, before the budget that is left caps it further.
STEP_CAPS = {"info": 30, "bench": 150, "bench_persistent": 120, "bench_rfc": 90, "bench_cpu_baseline": 60,
             "gpu_tests": 120, "bound": 120, "submit_cpu": 60}
#: The persistent consumer's idle window while its start latency is measured (``dma_poll_us``): long enough that
#: it stays resident between two probes.
PERSISTENT_IDLE_US = 20000.0
#: Most microseconds from a doorbell to the persistent consumer seeing the job (docs/DESIGN's target).
JOB_START_TARGET_US = 3.0
#: Microseconds a probe waits for the consumer before it counts as missed (and the consumer is relaunched).
PROBE_TIMEOUT_US = 50000


def _median_us(fn: Callable[[], Any], calls: int = CALLS) -> float:
    """Median host microseconds of ``fn()`` over ``calls`` calls, after as many untimed ones."""
    for _ in range(calls):
        fn()
    times = []
    for _ in range(calls):
        t0 = time.perf_counter_ns()
        fn()
        times.append(time.perf_counter_ns() - t0)
    return round(statistics.median(times) / 1e3, 3)


# -- per-call costs of the CUDA runtime ------------------------------------------------------------------------
def run_cuda_calls(result: dict[str, Any]) -> None:
    """What each runtime call a submission may make costs the host: a launch, an event, a stream memory
    write, 4 KiB uploads from pinned and from pageable memory. Skipped, with the reason, without a GPU."""
    out = result.setdefault("cuda_calls_us", {})
    try:
        import cupy as cp

        cp.cuda.runtime.getDeviceCount()
        props = cp.cuda.runtime.getDeviceProperties(0)
    except Exception as exc:  # no cupy, no driver, no device: all are "no usable GPU" here
        out["skipped"] = f"no usable GPU: {type(exc).__name__}: {exc}"
        return
    name = props["name"]
    result["card"] = name.decode() if isinstance(name, bytes) else str(name)
    stream = cp.cuda.Stream(non_blocking=True)
    noop = cp.RawKernel(r'extern "C" __global__ void noop() {}', "noop")
    with stream:
        out["kernel_launch"] = _median_us(lambda: noop((1,), (1,), ()))
        stream.synchronize()

        def event_per_call() -> None:
            ev = cp.cuda.Event(block=False, disable_timing=True)
            ev.record(stream)

        out["event_create_and_record"] = _median_us(event_per_call)
        pooled = cp.cuda.Event(block=False, disable_timing=True)
        out["event_record_pooled"] = _median_us(lambda: pooled.record(stream))
        stream.synchronize()
        dev = cp.empty(4096, dtype=cp.uint8)
        pinned_mem = cp.cuda.alloc_pinned_memory(4096)
        pinned = np.frombuffer(pinned_mem, dtype=np.uint8, count=4096)
        pageable = np.zeros(4096, dtype=np.uint8)
        h2d = cp.cuda.runtime.memcpyHostToDevice
        out["upload_4k_pinned"] = _median_us(lambda: cp.cuda.runtime.memcpyAsync(
            dev.data.ptr, pinned.ctypes.data, 4096, h2d, stream.ptr))
        stream.synchronize()
        out["upload_4k_pageable"] = _median_us(lambda: cp.cuda.runtime.memcpyAsync(
            dev.data.ptr, pageable.ctypes.data, 4096, h2d, stream.ptr))
        stream.synchronize()
        out["stream_synchronize_idle"] = _median_us(stream.synchronize)
    try:
        from cuda.bindings import driver as cu

        word = cp.zeros(1, dtype=cp.uint64)
        handle, ptr = cu.CUstream(stream.ptr), cu.CUdeviceptr(word.data.ptr)
        out["stream_write_value64"] = _median_us(lambda: cu.cuStreamWriteValue64(handle, ptr, 1, 0))
        stream.synchronize()
    except Exception as exc:
        out["stream_write_value64"] = f"not measured: {type(exc).__name__}: {exc}"
    out["batched_memcpy"] = "not measured: cudaMemcpyBatchAsync (CUDA 12.8+) has no CuPy wrapper"


# -- dmamig's own DMA submissions -------------------------------------------------------------------------------
def run_submissions(result: dict[str, Any], backend: str) -> None:
    """Host time of one ``m.dma.copy`` of a 512-page batch (the submission alone, then to completion) at 4K
    (random pages) and 2M (one contiguous run), with 1 and 4 channels, the ring's compiled call alone, the numpy
    buffers a submission allocates, and a one-page copy's start-to-done latency (the ring's start and completion
    latency), on the backend the bench uses."""
    from dmamig import Machine

    out = result.setdefault("submission_us", {})
    rng = np.random.default_rng(0)
    for channels in (1, 4):
        m = Machine(host_pages=8 * BATCH, device_pages=8 * BATCH, devices=1, backend=backend, channels=channels)
        try:
            result.setdefault("backend", m.backend_name)
            # 4K: the sources in random order, as a batch of scattered base pages comes to the engine.
            src4k = m.alloc_pages(0, BATCH)[rng.permutation(BATCH)]
            dst4k = m.alloc_pages(1, BATCH)
            src2m = m.pages.expand(m.alloc_pages(0, 1, order=9))
            dst2m = m.pages.expand(m.alloc_pages(1, 1, order=9))
            for name, src, dst in (("4k", src4k, dst4k), ("2m", src2m, dst2m)):
                out[f"{name}_{channels}ch_submit"], out[f"{name}_{channels}ch_to_completion"] = \
                    _submission_us(m.dma, src, dst)
                compiled = bench_submit.compiled_only(m.dma, src, dst)
                out[f"{name}_{channels}ch_compiled"] = round(compiled, 3) if isinstance(compiled, float) else compiled
                out[f"{name}_{channels}ch_numpy_allocations"] = bench_submit.numpy_allocations(m.dma, src, dst, 20)
            out[f"one_page_{channels}ch_to_completion"] = _submission_us(m.dma, src4k[:1], dst4k[:1])[1]
        finally:
            m.close()


# -- the persistent consumer (dma_engine="persistent") -------------------------------------------------------------
def run_persistent(result: dict[str, Any], backend: str) -> None:
    """The persistent consumer's job-start latency and a re-baseline of the submissions with it (CUDA only).

    Job start: a probe job (one that copies nothing) is published on a channel's ring while the consumer is
    resident, and the host spins until the consumer's ``SEEN`` word says it picked the job up. The figure is that
    round trip (publish call, the doorbell's way to the device, the consumer's poll, its ``SEEN`` store's way
    back): an upper bound on doorbell-to-consumer, compared with :data:`JOB_START_TARGET_US`. Then the
    submissions of :func:`run_submissions` (one page, and 512 pages at 4K and 2M with 1 and 4 channels) on
    machines with ``dma_engine="persistent"``. Skipped, with the reason, on the CPU backend or where the setting
    is refused (a watchdog, no cooperative launch, MPS).
    """
    from dmamig import Machine
    from dmamig.dma import ring as dma_ring

    out = result.setdefault("persistent_us", {})
    if backend == "cpu" or result.get("backend") == "cpu":
        out["skipped"] = "cpu backend: its polling channels already are persistent consumers"
        return
    try:
        m = Machine(host_pages=8 * BATCH, device_pages=8 * BATCH, devices=1, backend="cuda", channels=1,
                    dma_engine="persistent", dma_poll_us=PERSISTENT_IDLE_US)
    except Exception as exc:  # refused (the reason says why) or no usable GPU
        out["skipped"] = f"{type(exc).__name__}: {exc}"
        return
    try:
        src, dst = m.alloc_pages(0, 1), m.alloc_pages(1, 1)
        m.dma.copy(src, dst).wait()  # the first submission launches the consumer
        route = m.dma.ring_route(src, dst)
        if route is None:
            out["skipped"] = "the copy took the general path, not the rings"
            return
        rings, lane = route[0].ring_set, route[1][0].ring_lane
        ring = rings.rings[0]
        starts, missed = [], 0
        for _ in range(CALLS):
            with rings.lock:
                if not ring.has_room():
                    missed += 1
                    continue
                t0 = time.perf_counter_ns()
                seq, _ = ring.publish(dma_ring.JOB_PYTHON)  # ends STATUS_FAILED: a probe copies nothing
            while lane.seen(0) <= seq:
                if time.perf_counter_ns() - t0 > PROBE_TIMEOUT_US * 1000:
                    missed += 1
                    m.dma.copy(src, dst).wait()  # the consumer went idle: relaunch it
                    break
            else:
                starts.append(time.perf_counter_ns() - t0)
        if starts:
            starts.sort()
            out["job_start"] = round(statistics.median(starts) / 1e3, 3)
            out["job_start_p90"] = round(starts[int(0.9 * (len(starts) - 1))] / 1e3, 3)
            out["job_start_target"] = JOB_START_TARGET_US
            out["job_start_met"] = out["job_start"] <= JOB_START_TARGET_US
        out["job_start_probes_missed"] = missed
        out["one_page_1ch_to_completion"] = _median_us(lambda: m.dma.copy(src, dst).wait(), CALLS // 3)
        out["launches"] = lane.launches
    finally:
        m.close()
    rng = np.random.default_rng(0)
    for channels in (1, 4):
        m = Machine(host_pages=8 * BATCH, device_pages=8 * BATCH, devices=1, backend="cuda", channels=channels,
                    dma_engine="persistent")
        try:
            src4k = m.alloc_pages(0, BATCH)[rng.permutation(BATCH)]
            dst4k = m.alloc_pages(1, BATCH)
            src2m = m.pages.expand(m.alloc_pages(0, 1, order=9))
            dst2m = m.pages.expand(m.alloc_pages(1, 1, order=9))
            for name, src, dst in (("4k", src4k, dst4k), ("2m", src2m, dst2m)):
                out[f"{name}_{channels}ch_submit"], out[f"{name}_{channels}ch_to_completion"] = \
                    _submission_us(m.dma, src, dst)
        finally:
            m.close()


def _submission_us(dma: Any, src: np.ndarray, dst: np.ndarray) -> tuple[float, float]:
    """Median host microseconds of ``dma.copy(src, dst)`` alone (each fence waited for outside the timed
    call: :func:`bench_submit.timed_submissions`) and of the copy waited for to completion."""
    return (round(bench_submit.timed_submissions(dma, src, dst, CALLS), 3),
            _median_us(lambda: dma.copy(src, dst).wait(), CALLS // 3))


# -- the steps run as processes -----------------------------------------------------------------------------------
def _step(result: dict[str, Any], name: str, cmd: list[str], log: Path, deadline: float,
          env: dict[str, str] | None = None) -> None:
    left = deadline - time.monotonic()
    limit = min(STEP_CAPS[name], left)
    steps = result.setdefault("steps", {})
    if limit < 10:
        steps[name] = {"cmd": " ".join(cmd), "skipped": f"budget spent ({left:.0f} s left)"}
        return
    t0 = time.monotonic()
    with log.open("w") as fh:
        try:
            rc = subprocess.run(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, timeout=limit,
                                env={**os.environ, **(env or {})}).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    lines = log.read_text(errors="replace").strip().splitlines()
    steps[name] = {"cmd": " ".join(cmd), "rc": rc, "seconds": round(time.monotonic() - t0, 1),
                   "limit_s": round(limit), "last_line": lines[-1] if lines else "", "log": log.name}


def run_steps(result: dict[str, Any], out: Path, deadline: float, backend: str) -> None:
    py = sys.executable
    _step(result, "info", [py, "-m", "dmamig", "info"], out / "info.txt", deadline)
    _step(result, "bench", [py, "-m", "dmamig", "bench", "--backend", backend, "--sizes", "4k,2m",
                            "--faithful-only", "--repeat", "3", "--no-access", "--no-pairs", "--out",
                            str(out / "bench")], out / "bench.log", deadline)
    if result.get("backend") == "cpu" or backend == "cpu":
        result.setdefault("steps", {})["bench_persistent"] = {
            "skipped": "cpu backend: dma_engine='persistent' is a CUDA setting"}
    else:
        _step(result, "bench_persistent", [py, "-m", "dmamig", "bench", "--backend", backend, "--dma-engine",
                                           "persistent", "--sizes", "4k,2m", "--faithful-only", "--repeat", "3",
                                           "--no-access", "--no-pairs", "--out", str(out / "bench-persistent")],
              out / "bench-persistent.log", deadline)
    _step(result, "bench_rfc", [py, "-m", "dmamig", "bench", "--backend", backend, "--sizes", "2m", "--rfc-preset",
                                "--repeat", "3", "--no-access", "--no-pairs", "--no-engine", "--out",
                                str(out / "bench-rfc")], out / "bench-rfc.log", deadline)
    _step(result, "gpu_tests", [py, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests"],
          out / "gpu-tests.log", deadline)
    if result.get("backend") == "cpu" or backend == "cpu":
        result.setdefault("steps", {})["bench_cpu_baseline"] = {
            "skipped": "cpu backend: its copy mode already is the cpu baseline (the CUDA setting is "
                       "--copy-baseline cpu)"}
    else:
        # After the GPU tests, which come first where the budget runs short; one size and one channel: the copy
        # figure is what this step is for, the no-copy run only gives the ratio.
        _step(result, "bench_cpu_baseline", [py, "-m", "dmamig", "bench", "--backend", backend, "--copy-baseline",
                                             "cpu", "--sizes", "2m", "--channels", "1", "--faithful-only",
                                             "--repeat", "3", "--no-access", "--no-pairs", "--no-engine", "--out",
                                             str(out / "bench-cpu-baseline")], out / "bench-cpu-baseline.log",
              deadline)
    _step(result, "bound", [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "benchmarks/bench_bound.py",
                            "--benchmark-only"], out / "bound.log", deadline, env={"DMAMIG_BACKEND": "cpu"})
    # The CPU channel's submission with 1 and 4 channels where each channel's worker has a core of its own (on a
    # 2-vCPU VM four workers share two with the submitter).
    _step(result, "submit_cpu", [py, "benchmarks/bench_submit.py", "--backend", "cpu", "--out",
                                 str(out / "submit-cpu")], out / "submit-cpu.log", deadline)


def _commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True,
                               timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "unknown (no git here)"
    return (sha or "unknown (not a git checkout)") + (" (dirty)" if dirty else "")


def _markdown(result: dict[str, Any]) -> str:
    lines = [f"# GPU check: {result.get('card', 'no GPU')} ({result['date']})", "",
             f"Commit {result['commit']}, backend {result.get('backend', '?')}, host {result['host']}.", ""]
    for key, title in (("cuda_calls_us", "CUDA runtime calls, host us per call (median)"),
                       ("submission_us", "dmamig DMA submissions, host us (median)"),
                       ("persistent_us", "dma_engine='persistent': job start (doorbell to the consumer seeing "
                                         "it, a round trip) and submissions, host us (median)")):
        lines += [f"## {title}", "", "| figure | value |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in result.get(key, {}).items()]
        lines.append("")
    lines += ["## Steps", "", "| step | rc | seconds | last line |", "|---|---|---|---|"]
    for name, s in result.get("steps", {}).items():
        lines.append(f"| {name} | {s.get('rc', s.get('skipped'))} | {s.get('seconds', '')} | "
                     f"{s.get('last_line', '').replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("gpu-check"), help="results folder (created; must be new)")
    p.add_argument("--budget", type=float, default=300.0, help="seconds for the whole check (300)")
    p.add_argument("--backend", choices=("auto", "cpu", "cuda"), default="auto")
    args = p.parse_args(argv)
    if args.budget <= 0:
        p.error(f"--budget must be a positive number of seconds, got {args.budget}")
    if args.out.exists() and any(args.out.iterdir()):
        p.error(f"--out {args.out} already holds files; name a new folder")
    args.out.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + args.budget
    result: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), "commit": _commit(), "host":
                              f"{platform.node()} ({os.cpu_count()} CPUs)", "budget_s": args.budget}
    backend = args.backend
    for check in (lambda: run_cuda_calls(result), lambda: run_submissions(result, backend),
                  lambda: run_persistent(result, backend)):
        try:
            check()
        except Exception as exc:  # one failing check must not cost the others' figures
            result.setdefault("errors", []).append(f"{type(exc).__name__}: {exc}")
    run_steps(result, args.out, deadline, backend)
    (args.out / "summary.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "summary.md").write_text(_markdown(result))
    print(_markdown(result))
    failed = [n for n, s in result.get("steps", {}).items() if s.get("rc") not in (0, None)]
    return 1 if result.get("errors") or failed else 0


if __name__ == "__main__":
    sys.exit(main())
