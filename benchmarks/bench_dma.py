"""DMA engine throughput on the CPU backend against the same-run ``np.copyto`` ceiling.

Sizes: ``DMAMIG_BENCH_PAGES`` base pages of 4 KiB (default 32768 = 128 MiB for a quick run; the design's
targets are stated for 262144 = 1 GiB). ``DMAMIG_BENCH_CHANNELS`` sets the channel count (default 2).

Each benchmark measures its ceiling (a contiguous ``np.copyto`` of the same number of bytes, best of a few) in
the same run, prints it beside the result, and stores GB/s and the ratio in ``benchmark.extra_info``. Targets
(DESIGN.md, 2-core machine, 1 GiB, 2 channels): random pages >= 0.9x the ceiling, contiguous runs >= 1.3x.

Run: ``pytest benchmarks/bench_dma.py --benchmark-only -s``.
"""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

from dmamig.backends.cpu.backend import CpuBackend
from dmamig.dma import DmaEngine
from dmamig.nodes import Node, NodeMap

PAGE = 4096
PAGES = int(os.environ.get("DMAMIG_BENCH_PAGES", "32768"))
CHANNELS = int(os.environ.get("DMAMIG_BENCH_CHANNELS", "2"))


@pytest.fixture(scope="module")
def rig():
    backend = CpuBackend()
    nodes = []
    for i in range(2):
        frames = backend.alloc_frames("host" if i == 0 else "device", i - 1, PAGES, PAGE)
        frames.fill(i + 1)  # touch every frame: page faults are not part of the measurement
        nodes.append(Node(i, "host" if i == 0 else "device", i - 1, i * PAGES, PAGES, frames))
    nodes = tuple(nodes)
    engine = DmaEngine(nodes=nodes, nodemap=NodeMap(nodes), backend=backend, page_size=PAGE, channels=CHANNELS)
    yield engine, nodes
    engine.close()


def copyto_ceiling(nodes, repeats: int = 3) -> float:
    """Best-of-``repeats`` GB/s of one contiguous ``np.copyto`` of the whole working set."""
    src, dst = nodes[0].frames, nodes[1].frames
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t)
    return src.nbytes / best / 1e9


def run(benchmark, rig, src, dst, label: str) -> None:
    engine, nodes = rig
    nbytes = src.size * PAGE
    ceiling = copyto_ceiling(nodes)

    def once():
        engine.copy(src, dst).wait()

    benchmark.pedantic(once, rounds=5, iterations=1, warmup_rounds=1)
    gbps = nbytes / benchmark.stats.stats.min / 1e9
    ratio = gbps / ceiling
    benchmark.extra_info.update({"pages": int(src.size), "channels": engine.channels, "gbps": round(gbps, 2),
                                 "ceiling_copyto_gbps": round(ceiling, 2), "ratio_to_ceiling": round(ratio, 3)})
    print(f"\n{label}: {src.size} x 4 KiB pages, {engine.channels} DMA channels: {gbps:.2f} GB/s "
          f"(np.copyto ceiling {ceiling:.2f} GB/s, ratio {ratio:.2f}x)")
    np.testing.assert_array_equal(nodes[1].frames[dst[:64] - PAGES], nodes[0].frames[src[:64]])


def test_dma_random_pages(benchmark, rig):
    rng = np.random.default_rng(0)
    src = rng.permutation(PAGES)
    dst = rng.permutation(PAGES) + PAGES
    run(benchmark, rig, src, dst, "random pages")


def test_dma_contiguous(benchmark, rig):
    src = np.arange(PAGES)
    run(benchmark, rig, src, src + PAGES, "contiguous")


def test_dma_2mib_folios_shuffled(benchmark, rig):
    # 2 MiB folios (512 pages) at shuffled positions on both sides: long runs, the memcpy method.
    rng = np.random.default_rng(1)
    nfol = PAGES // 512
    heads_s = rng.permutation(nfol) * 512
    heads_d = rng.permutation(nfol) * 512
    src = (heads_s[:, None] + np.arange(512)).ravel()
    dst = (heads_d[:, None] + np.arange(512)).ravel() + PAGES
    run(benchmark, rig, src, dst, "2 MiB folios")


def test_dma_random_sparse(benchmark, rig):
    # Half of each node's pages, chosen at random on both sides: sorting cannot make either side sequential.
    rng = np.random.default_rng(2)
    src = rng.choice(PAGES, PAGES // 2, replace=False)
    dst = rng.choice(PAGES, PAGES // 2, replace=False) + PAGES
    run(benchmark, rig, src, dst, "random sparse pages")
