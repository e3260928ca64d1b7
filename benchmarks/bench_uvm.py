"""pytest-benchmark suite: device-side access (UVM-style fault servicing) in copy vs no-copy mode.

A device node reads a host-resident range with :class:`~dmamig.DeviceAccessor` (every page faults; faults are
serviced in batches of 32, 256 or 1024 through the migration core, with the DMA engine or the migrating
thread; UVM's density prefetch on). The same-run ceiling is the same access once the range is resident on the
device (no fault at all), timed in the same round. ``extra_info`` records pages/s of the whole access,
pages/s of the fault servicing alone, fault batches/s, service time per batch and per phase, bytes migrated per
byte touched, and the ratio of the faulting access's throughput to the ceiling's. The access itself reads
every byte on the device (a per-page checksum): on the CPU backend that read is part of both figures.

    pytest benchmarks/bench_uvm.py --benchmark-only
"""

from __future__ import annotations

import os
import statistics
import time

import numpy as np
import pytest

from dmamig import DeviceAccessor, Machine, UvmOptions

ROUNDS = int(os.environ.get("DMAMIG_BENCH_ROUNDS", "5"))
PAGE = 4096


@pytest.mark.parametrize("batch", [32, 256, 1024])
@pytest.mark.parametrize("mode", ["copy", "nocopy"])
def test_device_access_fault_servicing(benchmark, total_bytes: int, backend_name: str, bench_summary: list[str],
                                       mode: str, batch: int) -> None:
    pages = total_bytes // PAGE
    with Machine(host_pages=pages + 512, device_pages=pages + 512, devices=1, backend=backend_name,
                 channels=2) as m:
        mm = m.address_space()
        a = mm.mmap(total_bytes)
        data = np.random.default_rng(0).integers(0, 256, total_bytes, dtype=np.uint8)
        mm.write(a, data)
        opts = UvmOptions(fault_batch_size=batch, no_copy=mode == "nocopy")
        state: dict = {}
        ceiling_s: list[float] = []

        def setup():
            mm.migrate(a, total_bytes, 0)  # back on the host: every page faults again
            state["acc"] = DeviceAccessor(mm, 1, opts)
            return (), {}

        def run():
            state["acc"].touch(a, total_bytes)

        def teardown_round():
            t0 = time.perf_counter()
            state["acc"].touch(a, total_bytes)  # pre-migrated: the ceiling
            ceiling_s.append(time.perf_counter() - t0)

        stats_seen = []
        fault_s: list[float] = []

        def round_():
            t0 = time.perf_counter()
            run()
            fault_s.append(time.perf_counter() - t0)
            stats_seen.append(state["acc"].stats)
            teardown_round()

        benchmark.pedantic(round_, setup=setup, rounds=ROUNDS, iterations=1)
        assert (mm.read(a, total_bytes) == data).all()
        mm.close()
    s = stats_seen[-1]
    assert s.pages_migrated == pages
    # Each round times the faulting access and then the same access again, every page resident: the ceiling.
    access_s = statistics.median(fault_s)
    ceil = statistics.median(ceiling_s)
    service_s = statistics.median(st.service_total_ns for st in stats_seen) / 1e9
    info = benchmark.extra_info
    info.update({
        "mode": mode, "fault_batch_size": batch, "pages": pages, "backend": backend_name,
        "options": opts.as_dict(),
        "access_s": access_s, "ceiling_s": ceil,
        "pages_per_s": pages / access_s, "ceiling_pages_per_s": pages / ceil,
        "ratio_to_ceiling": ceil / access_s,
        "service_pages_per_s": pages / service_s,
        "fault_batches": s.batches, "fault_batches_per_s": s.batches / access_s,
        "service_us_per_batch": service_s * 1e6 / max(s.batches, 1),
        "service_ns": dict(s.service_ns),
        "bytes_migrated_per_byte_touched": s.bytes_migrated / total_bytes,
        "pages_prefetched": s.pages_prefetched,
    })
    bench_summary.append(
        f"device access {mode:6s} batch {batch:5d}: {pages / access_s / 1e6:6.3f} M pages/s "
        f"({pages / service_s / 1e6:6.3f} M pages/s serviced), {s.batches / access_s:6.0f} batches/s, "
        f"{info['service_us_per_batch']:7.1f} us/batch; ceiling (pre-migrated) {pages / ceil / 1e6:6.3f} M pages/s; "
        f"ratio {info['ratio_to_ceiling']:.3f}")


def _stencil(acc: DeviceAccessor, a: int, pages: int, sweeps: int) -> None:
    """A 1-D stencil over the range: each 2 MiB tile reads itself and its neighbours' edge pages, then
    writes itself back changed (a device kernel sweeping a grid, tile by tile)."""
    tile = 512
    for _ in range(sweeps):
        for t in range(0, pages, tile):
            lo, hi = max(t - 1, 0), min(t + tile + 1, pages)
            rows = acc.read_pages(a + np.arange(lo, hi, dtype=np.int64) * PAGE)
            inner = rows[t - lo: t - lo + tile]
            inner[:, :8] += 1
            acc.write_pages(a + np.arange(t, t + inner.shape[0], dtype=np.int64) * PAGE, inner)


@pytest.mark.parametrize("mode", ["copy", "nocopy"])
def test_oversubscribed_stencil(benchmark, total_bytes: int, backend_name: str, bench_summary: list[str],
                                mode: str) -> None:
    """The stencil over twice the device's memory, against the same stencil on a device that holds it all.

    One sweep per round; the first round starts from host memory, later ones from whatever the previous
    sweep left on the device (the steady state of an oversubscribed loop). Medians over the rounds.
    """
    pages = total_bytes // PAGE
    opts = UvmOptions(no_copy=mode == "nocopy")
    times: dict[str, list[float]] = {"oversubscribed": [], "ceiling": []}
    stats = {}
    for case, device_pages in (("oversubscribed", pages // 2), ("ceiling", pages + 512)):
        with Machine(host_pages=pages + 512, device_pages=device_pages, devices=1, backend=backend_name,
                     channels=2) as m:
            mm = m.address_space()
            a = mm.mmap(total_bytes)
            data = np.random.default_rng(0).integers(0, 256, total_bytes, dtype=np.uint8)
            mm.write(a, data)
            acc = DeviceAccessor(mm, 1, opts)
            if case == "ceiling":
                acc.prefetch(a, total_bytes)
                acc.reset_stats()

            def sweep(acc=acc, a=a, case=case):
                t0 = time.perf_counter()
                _stencil(acc, a, pages, 1)
                times[case].append(time.perf_counter() - t0)

            if case == "ceiling":
                for _ in range(ROUNDS):
                    sweep()
            else:
                benchmark.pedantic(sweep, rounds=ROUNDS, iterations=1)
            stats[case] = acc.stats
            expect = data.reshape(pages, PAGE)
            expect[:, :8] += ROUNDS
            assert (mm.read(a, total_bytes).reshape(pages, PAGE) == expect).all()
            mm.close()
    over_s = statistics.median(times["oversubscribed"])
    ceil_s = statistics.median(times["ceiling"])
    s = stats["oversubscribed"]
    touched = total_bytes * ROUNDS * 2  # every tile read and written once per sweep
    info = benchmark.extra_info
    info.update({
        "mode": mode, "pages": pages, "oversubscription": 2.0, "sweeps": ROUNDS, "options": opts.as_dict(),
        "sweep_s": over_s, "ceiling_sweep_s": ceil_s, "ratio_to_ceiling": ceil_s / over_s,
        "pages_per_s": pages / over_s, "fault_batches_per_sweep": s.batches / ROUNDS,
        "service_us_per_batch": s.service_total_ns / max(s.batches, 1) / 1e3,
        "pages_evicted_per_sweep": s.pages_evicted / ROUNDS,
        "bytes_migrated_per_byte_touched": (s.bytes_migrated + s.bytes_evicted) / touched,
    })
    bench_summary.append(
        f"stencil 2x device memory {mode:6s}: {pages / over_s / 1e6:6.3f} M pages/s, "
        f"{s.batches / ROUNDS:.0f} fault batches and {s.pages_evicted / ROUNDS:.0f} pages evicted per sweep, "
        f"{info['bytes_migrated_per_byte_touched']:.2f} bytes moved per byte touched; ceiling (fits, "
        f"pre-migrated) {pages / ceil_s / 1e6:6.3f} M pages/s; ratio {info['ratio_to_ceiling']:.3f}")
