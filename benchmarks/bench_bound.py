"""pytest-benchmark suite: how much faithful no-copy migration can win on this host, and how much it does.

A faithful batch overlaps nothing: the migrating thread unmaps 512 pages, copies them (copy mode) or submits
them to the DMA channels and waits (no-copy), then moves their state. So

    no-copy / copy  =  (state + CPU copy)  /  (state + DMA submission + DMA copy + hand-offs)

and even a free submission and free hand-offs leave the bound ``(state + CPU copy) / (state + DMA copy)``.
On the CPU backend the "DMA copy" is channel threads copying with streaming stores; whether two channels beat
one depends on how much memory bandwidth one core leaves for a second. This suite measures, in one run and on
the same frames:

- ``state``: one faithful copy-mode ``mm.migrate`` of 512 pages, minus its copy phase;
- ``cpu_copy``: the copy phase of that call (the kernel's ``folio_copy``: cached ``memcpy`` per page);
- ``stream1`` / ``stream2``: the same 2 MiB per batch copied by one thread, and by two threads each taking
  half, with streaming stores and no hand-off at all (threads started once, for the whole working set);
- ``handoff``: a round trip between two threads through two locks (wake a sleeping thread, be woken by it),
  the least any asynchronous engine run by a thread costs per submission on this host: a DMA channel is woken
  by the submission and wakes the migrating thread on completion;
- ``actual``: faithful copy and no-copy (2 channels) ``mm.migrate`` of the working set, per batch, with
  polling channels (the default: no wake-up on either side) and with channels that sleep between jobs
  (``dma_poll_us=0``: two wake-ups per submission);
- ``pipelined``: copy at 16 batches per step, and no-copy pipelined (16 batches per step, the DMA copy of one
  step overlapping the next step's unmap), per batch.

It reports the bound with a free DMA engine, ``(state + cpu_copy) / (state + min(stream1, stream2))``, the
bound once the host's thread hand-off is paid, ``(state + cpu_copy) / (state + stream + handoff)``, beside
the measured faithful no-copy/copy ratios, and what the submission and hand-offs cost per batch (the measured
no-copy batch minus ``state + stream``). On a VM a wake-up can cost tens of microseconds, which is then a
property of the host, not of the emulator; polling channels do not pay it. For the pipelined experiment the
bound is the copy at the same batching over the streaming copy alone: however well the state work hides
behind the DMA copy, no-copy cannot run faster than the channels copy. CPU backend only: on a GPU the copy
engines are not the CPU's threads and the DMA copy time is the copy engine's.

    pytest benchmarks/bench_bound.py --benchmark-only
"""

from __future__ import annotations

import os
import statistics
import threading
import time

import numpy as np
import pytest

from dmamig import Machine, MigrateOptions
from dmamig.backends.cpu import copy_loops

ROUNDS = int(os.environ.get("DMAMIG_BENCH_ROUNDS", "5"))
BATCH = 512  # NR_MAX_BATCHED_MIGRATION
PAGE = 4096


def _per_batch_stream(src: np.ndarray, dst: np.ndarray, nbatches: int, threads: int) -> float:
    """Seconds per 512-page batch when ``threads`` threads copy the batches' halves with streaming stores."""
    share = BATCH // threads
    barrier = threading.Barrier(threads + 1)
    spans: list[float] = []

    def work(t: int) -> None:
        starts = np.arange(nbatches, dtype=np.int64) * BATCH + t * share
        n = np.full(nbatches, share, dtype=np.int64)
        barrier.wait()
        copy_loops.copy_runs_stream(src, dst, starts, starts, n)  # one call, GIL released throughout
        barrier.wait()

    pool = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for th in pool:
        th.start()
    barrier.wait()
    t0 = time.perf_counter()
    barrier.wait()
    spans.append(time.perf_counter() - t0)
    for th in pool:
        th.join()
    return spans[0] / nbatches


def _handoff_round_trip(n: int = 2000) -> float:
    """Median seconds of a wake-and-be-woken round trip between two threads (two plain locks, no Python work)."""
    go, back = threading.Lock(), threading.Lock()
    go.acquire()
    back.acquire()
    stop = False

    def echo() -> None:
        while True:
            go.acquire()
            if stop:
                return
            back.release()

    t = threading.Thread(target=echo)
    t.start()
    times = []
    for _ in range(n):
        t0 = time.perf_counter_ns()
        go.release()
        back.acquire()
        times.append(time.perf_counter_ns() - t0)
    stop = True
    go.release()
    t.join()
    return statistics.median(times) / 1e9


#: The pipelined experiment of ``dmamig bench``, and copy batched the same way.
PIPELINED = MigrateOptions(batches_per_step=16, pipeline_depth=1)
BATCHED = MigrateOptions(batches_per_step=16)


def _round(m: Machine, mm, addr: int, total_bytes: int, nbatches: int, figures: dict[str, list[float]],
           sleeping: bool) -> None:
    """One round on machine ``m``: faithful copy and no-copy (and, on the polling machine, the pipelined pair and
    the streaming copies), per batch, into ``figures``."""
    runs = [("copy", None, None), ("nocopy", m.dma, None)]
    if not sleeping:
        runs += [("copy16", None, BATCHED), ("piped", m.dma, PIPELINED)]
    for name, engine, options in runs:
        for target in (1, 0):
            res = mm.migrate(addr, total_bytes, target, engine=engine, options=options)
            assert res.ok
            if target != 1:
                continue
            key = f"{name}_sleeping" if sleeping else name
            figures[key].append(res.wall_ns / 1e9 / nbatches)
            if name == "copy" and not sleeping:
                cp = res.phase_ns["copy"]
                figures["cpu_copy"].append(cp / 1e9 / nbatches)
                figures["state"].append((res.wall_ns - cp) / 1e9 / nbatches)
    if not sleeping:
        src, dst = m.nodes[0].frames, m.nodes[1].frames
        for threads in (1, 2):
            figures[f"stream{threads}"].append(_per_batch_stream(src, dst, nbatches, threads))
        figures["handoff"].append(_handoff_round_trip())


def test_faithful_nocopy_bound(benchmark, total_bytes: int, backend_name: str, bench_summary: list[str]) -> None:
    if backend_name != "cpu":
        pytest.skip("the bound compares the CPU's copy with CPU channel threads: CPU backend only")
    pages = total_bytes // PAGE
    nbatches = pages // BATCH
    keys = ("state", "cpu_copy", "stream1", "stream2", "handoff", "copy", "nocopy", "copy16", "piped",
            "copy_sleeping", "nocopy_sleeping")
    figures: dict[str, list[float]] = {k: [] for k in keys}
    data = np.random.default_rng(3).integers(0, 256, total_bytes, dtype=np.uint8)
    machines: list[Machine] = []
    spaces = []
    try:
        for poll in (None, 0):  # polling channels (the default), then channels that sleep between jobs
            m = Machine(host_pages=pages + BATCH, device_pages=pages + BATCH, devices=1, backend="cpu",
                        channels=2, dma_poll_us=poll)
            machines.append(m)
            mm = m.address_space()
            addr = mm.mmap(total_bytes)
            mm.write(addr, data)
            spaces.append((m, mm, addr))

        def one_round() -> None:
            for m, mm, addr in spaces:
                _round(m, mm, addr, total_bytes, nbatches, figures, sleeping=m.dma_poll_us == 0)

        one_round()  # warm-up: compiles, first touch
        for v in figures.values():
            v.clear()
        benchmark.pedantic(one_round, rounds=ROUNDS, iterations=1)
        for _m, mm, addr in spaces:
            assert np.array_equal(mm.read(addr, total_bytes), data)
    finally:
        for m in machines:
            m.close()
    med = {k: statistics.median(v) for k, v in figures.items()}
    stream = min(med["stream1"], med["stream2"])
    bound = (med["state"] + med["cpu_copy"]) / (med["state"] + stream)
    bound_handoff = (med["state"] + med["cpu_copy"]) / (med["state"] + stream + med["handoff"])
    actual = med["copy"] / med["nocopy"]
    actual_sleeping = med["copy_sleeping"] / med["nocopy_sleeping"]
    overhead = med["nocopy"] - med["state"] - stream
    overhead_sleeping = med["nocopy_sleeping"] - med["state"] - stream
    piped_bound = med["copy16"] / stream
    piped = med["copy16"] / med["piped"]
    us = {k: round(v * 1e6, 1) for k, v in med.items()}
    benchmark.extra_info.update(per_batch_us=us, bound_free_dma=round(bound, 3),
                                bound_with_handoff=round(bound_handoff, 3), actual_nocopy_over_copy=round(actual, 3),
                                actual_sleeping_channels=round(actual_sleeping, 3),
                                submission_and_handoffs_us=round(overhead * 1e6, 1),
                                submission_and_handoffs_sleeping_us=round(overhead_sleeping * 1e6, 1),
                                pipelined_bound=round(piped_bound, 3), pipelined_over_copy16=round(piped, 3),
                                batches=nbatches)
    bench_summary.append(
        f"faithful 4K, per 512-page batch: state {us['state']} us, CPU copy {us['cpu_copy']} us, streaming copy "
        f"{us['stream1']} us (1 thread) / {us['stream2']} us (2 threads), thread hand-off round trip "
        f"{us['handoff']} us; no-copy/copy bound with a free DMA engine {bound:.2f}x, with this host's hand-off "
        f"{bound_handoff:.2f}x; measured {actual:.2f}x with polling channels (copy {us['copy']} us, no-copy "
        f"{us['nocopy']} us: {overhead * 1e6:.0f} us of submission and hand-offs), {actual_sleeping:.2f}x with "
        f"sleeping channels ({overhead_sleeping * 1e6:.0f} us); pipelined no-copy over copy at 16 batches/step "
        f"{piped:.2f}x (copy {us['copy16']} us, no-copy {us['piped']} us per batch), bound {piped_bound:.2f}x "
        f"(that copy over the streaming copy alone)")
