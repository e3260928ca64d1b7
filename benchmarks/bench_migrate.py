"""pytest-benchmark suites: copy vs no-copy migration, state-only migration and raw DMA copies.

Each benchmark records GB/s, its same-run ceiling and the ratio in ``benchmark.extra_info`` and prints them
side by side at the end of the run. Every benchmark verifies its data afterwards (checksums against the source
pages), so a fast wrong result fails.

Migrations run with the kernel's batching (``faithful``: 512-page batches, one at a time) unless the test id
says otherwise: the ``pipelined`` case (16 batches per step, one step's DMA copy overlapping the next step's
unmap) and its like-for-like copy partner (16 batches per step) are experiment settings, and their
``extra_info`` records the :class:`~dmamig.MigrateOptions` they ran with, as every migration case does.

    pytest benchmarks/ --benchmark-only                             # 128 MiB working sets, seconds
    DMAMIG_BENCH_PAGES=262144 pytest benchmarks/ --benchmark-only   # 1 GiB, as the targets quote
"""

from __future__ import annotations

import os
import statistics
import time

import numpy as np
import pytest

from dmamig import Machine, MigrateMode, MigrateOptions
from dmamig.bench.environment import measure_ceilings
from dmamig.bench.migration import PIPELINED
from dmamig.bench.naming import describe_options, format_size, scenario_name
from dmamig.bench.settings import PAGE_SIZE, folio_order
from dmamig.bench.verify import range_pfns, verify_pages

ROUNDS = int(os.environ.get("DMAMIG_BENCH_ROUNDS", "5"))
CHANNELS = 2
FOLIOS = pytest.mark.parametrize("folio", [4096, 2 << 20], ids=["4k", "2m"])
#: The kernel's batching.
FAITHFUL = MigrateOptions()
#: Copy at the pipelined case's batches per step: what the pipelined no-copy ratio is compared with.
STEPS16 = MigrateOptions(batches_per_step=PIPELINED.batches_per_step)
#: Host->device migration cases: faithful copy and no-copy at each folio size, then the experiments at 4K.
MIGRATIONS = pytest.mark.parametrize("mode, folio, options", [
    *(pytest.param(mode, folio, FAITHFUL, id=f"{mode}-{format_size(folio).lower()}-faithful")
      for folio in (4096, 2 << 20) for mode in ("copy", "nocopy")),
    pytest.param("copy", 4096, STEPS16, id="copy-4k-experiment-16-batches-per-step"),
    pytest.param("nocopy", 4096, PIPELINED, id="nocopy-4k-pipelined"),
])


@pytest.fixture(scope="module")
def ceilings(total_bytes: int, backend_name: str) -> dict[str, dict]:
    """Copy ceilings of this run, by direction (pinned cudaMemcpyAsync on a GPU, np.copyto on the CPU)."""
    from dmamig.backends import open_backend

    be = open_backend(backend_name)
    try:
        out = measure_ceilings(be, backend_name, total_bytes, ["h2d", "d2h"], repeat=ROUNDS)
    finally:
        be.close()
    return {c["direction"]: c for c in out}


def _machine(total_bytes: int, backend_name: str, channels: int = CHANNELS) -> Machine:
    pages = (total_bytes // PAGE_SIZE // 512 + 1) * 512
    return Machine(host_pages=pages, device_pages=pages, devices=1, backend=backend_name, channels=channels)


def _median_s(benchmark) -> float | None:
    stats = getattr(benchmark, "stats", None)
    return None if stats is None else stats.stats.median


def _report(benchmark, summary: list[str], name: str, nbytes: int, ceiling: dict | None, cpu_ns: list[int],
            pages: int, copies_data: bool = True, options: MigrateOptions | None = None) -> None:
    """Put GB/s, the ceiling and their ratio in extra_info, and a line in the end-of-run summary.

    ``copies_data=False`` (state-only migration) leaves GB/s out: no byte moves, pages per CPU-second count.
    ``options`` (migrations only) is recorded with its batching in words: ``faithful`` or the experiment.
    """
    secs = _median_s(benchmark) if copies_data else None
    info = benchmark.extra_info
    info["bytes"] = nbytes
    info["pages"] = pages
    if options is not None:
        info["options"] = options.as_dict()
        info["batching"] = describe_options(options)
    if cpu_ns:
        cpu = statistics.median(cpu_ns)
        info["cpu_ns_per_page"] = cpu / pages
        info["pages_per_cpu_s"] = pages / (cpu / 1e9) if cpu else None
    if secs:
        info["gbps"] = nbytes / secs / 1e9
    if ceiling:
        info["ceiling_gbps"] = ceiling["gbps"]
        info["ceiling_method"] = ceiling["method"]
        if secs:
            info["ceiling_ratio"] = info["gbps"] / ceiling["gbps"]
    parts = [name]
    if "gbps" in info:
        parts.append(f"{info['gbps']:.2f} GB/s")
    if ceiling:
        parts.append(f"ceiling {ceiling['gbps']:.2f} GB/s ({ceiling['method']})")
        if "ceiling_ratio" in info:
            parts.append(f"-> {info['ceiling_ratio']:.2f}x ceiling")
    if "pages_per_cpu_s" in info and info["pages_per_cpu_s"]:
        parts.append(f"{info['pages_per_cpu_s'] / 1e6:.1f} M pages per CPU-second "
                     f"({info['cpu_ns_per_page']:.0f} ns/page)")
    summary.append(", ".join(parts))


def test_ceiling_copyto(benchmark, bench_summary, total_bytes):
    """np.copyto of the working set, contiguous: the CPU memcpy ceiling as a benchmark row of its own."""
    src = np.full(total_bytes, 0x5A, dtype=np.uint8)
    dst = np.empty_like(src)
    np.copyto(dst, src)
    benchmark.pedantic(np.copyto, args=(dst, src), rounds=ROUNDS, warmup_rounds=1, iterations=1)
    assert np.array_equal(dst, src)
    # This row is the reference the CPU-backend ratios divide by; it has no ceiling of its own.
    _report(benchmark, bench_summary, "np.copyto contiguous (the CPU ceiling)", total_bytes, None, [],
            total_bytes // PAGE_SIZE)


@MIGRATIONS
def test_migrate_host_to_device(benchmark, bench_summary, mode, folio, options, total_bytes, backend_name,
                                ceilings):
    """mm.migrate host->device of the whole working set: copy (CPU copies) or no-copy (DMA copies).

    Faithful (the kernel's batching) unless ``options`` names an experiment.
    """
    pages = total_bytes // PAGE_SIZE
    with _machine(total_bytes, backend_name) as m:
        mm = m.address_space()
        addr = mm.mmap(total_bytes, order=folio_order(folio))
        mm.write(addr, np.frombuffer(np.random.default_rng(7).bytes(total_bytes), dtype=np.uint8))
        ref = np.asarray(m.dma.checksum(range_pfns(mm, addr, pages)))
        engine = m.dma if mode == "nocopy" else None
        cpu: list[int] = []
        results = []

        def back_to_host():
            # Untimed: each round starts with the range populated on the host.
            if (mm.nodes_of(addr, total_bytes) != 0).any():
                res = mm.migrate(addr, total_bytes, 0, engine=engine, options=options)
                assert res.nr_failed == 0

        def migrate():
            c0 = time.thread_time_ns()
            res = mm.migrate(addr, total_bytes, 1, mode=MigrateMode.SYNC, engine=engine, options=options)
            cpu.append(time.thread_time_ns() - c0)
            results.append(res)

        benchmark.pedantic(migrate, setup=back_to_host, rounds=ROUNDS, warmup_rounds=1, iterations=1)
        assert all(r.nr_failed == 0 and r.nr_succeeded == pages for r in results)
        assert all(getattr(r, "options", options) == options for r in results)
        name = scenario_name("migrate", "h2d", folio, mode, CHANNELS if mode == "nocopy" else None, options=options)
        verify_pages(m, range_pfns(mm, addr, pages), 1, ref, name)
        if options.faithful:
            name += ", faithful"
        _report(benchmark, bench_summary, name, total_bytes, ceilings["h2d"], cpu, pages, options=options)


@FOLIOS
def test_state_only_migration(benchmark, bench_summary, folio, total_bytes, backend_name):
    """m.migrate_pages with NO_COPY to frames from m.alloc_pages: page state only (target >= 10M pages/CPU-s).

    Faithful: the kernel's batching, as the target is stated.
    """
    pages = total_bytes // PAGE_SIZE
    order = folio_order(folio)
    mode = MigrateMode.SYNC | MigrateMode.NO_COPY
    with _machine(total_bytes, backend_name) as m:
        mm = m.address_space()
        addr = mm.mmap(total_bytes, order=order)
        mm.populate(addr, total_bytes, node=0)
        cpu: list[int] = []
        results = []

        def setup():
            # Untimed: move back to the host (state only as well) and allocate this round's destinations.
            if (mm.nodes_of(addr, total_bytes) != 0).any():
                heads = range_pfns(mm, addr, pages)[:: 1 << order]
                m.migrate_pages(heads, 0, mode=mode, dst_pfns=m.alloc_pages(0, heads.size, order=order),
                                options=FAITHFUL)
            heads = range_pfns(mm, addr, pages)[:: 1 << order]
            return (heads, m.alloc_pages(1, heads.size, order=order)), {}

        def migrate(heads, dst):
            c0 = time.thread_time_ns()
            res = m.migrate_pages(heads, 1, mode=mode, dst_pfns=dst, options=FAITHFUL)
            cpu.append(time.thread_time_ns() - c0)
            results.append((res, dst))

        benchmark.pedantic(migrate, setup=setup, rounds=ROUNDS, warmup_rounds=1, iterations=1)
        res, dst = results[-1]
        assert res.nr_failed == 0 and res.nr_succeeded == pages
        assert np.array_equal(range_pfns(mm, addr, pages), m.pages.expand(np.asarray(dst)))
        _report(benchmark, bench_summary, scenario_name("state", "h2d", folio, "state", None) + ", faithful",
                total_bytes, None, cpu, pages, copies_data=False, options=FAITHFUL)


@pytest.mark.parametrize("layout", ["random", "contiguous"])
def test_dma_copy(benchmark, bench_summary, layout, total_bytes, backend_name, ceilings):
    """m.dma.copy of 4 KiB pages host->device on 2 channels (targets: random >= 0.9x, contiguous >= 1.3x)."""
    pages = total_bytes // PAGE_SIZE
    with _machine(total_bytes, backend_name) as m:
        mm = m.address_space()
        addr = mm.mmap(total_bytes)
        mm.write(addr, np.frombuffer(np.random.default_rng(3).bytes(total_bytes), dtype=np.uint8))
        src = range_pfns(mm, addr, pages)
        if layout == "random":
            src = src[np.random.default_rng(3).permutation(pages)]
        dst = np.asarray(m.alloc_pages(1, pages))
        cpu: list[int] = []

        def copy():
            c0 = time.thread_time_ns()
            m.dma.copy(src, dst).wait()
            cpu.append(time.thread_time_ns() - c0)

        benchmark.pedantic(copy, rounds=ROUNDS, warmup_rounds=1, iterations=1)
        assert np.array_equal(np.asarray(m.dma.checksum(dst)), np.asarray(m.dma.checksum(src)))
        m.put_pages(dst)
        _report(benchmark, bench_summary, f"m.dma.copy, {layout} 4K pages, {CHANNELS} DMA channels", total_bytes,
                ceilings["h2d"], cpu, pages)
