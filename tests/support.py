"""Helpers shared by the core test modules (importable because pytest puts ``tests/`` on ``sys.path``)."""

from __future__ import annotations

import threading

import numpy as np
import pytest

#: Generous bound for joins and teardowns; a healthy run takes milliseconds.
WAIT = 30.0


def finish_within(fn, what: str, timeout: float = WAIT) -> None:
    """Run a teardown call, failing (instead of hanging) if a bug left a page locked or unmapped."""
    errors: list[BaseException] = []

    def body() -> None:
        try:
            fn()
        except BaseException as exc:  # re-raised below, on the test's thread
            errors.append(exc)

    t = threading.Thread(target=body, daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        pytest.fail(f"{what} did not finish: something was left locked or unmapped")
    if errors:
        raise errors[0]


def rand(n: int, seed: int = 0) -> np.ndarray:
    """``n`` random bytes, reproducible from ``seed``."""
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8)


def filled(m, mm, npages: int, seed: int = 0, **kw) -> tuple[int, np.ndarray]:
    """Map ``npages`` pages (``mmap`` keywords in ``kw``), write random bytes; return the address and bytes."""
    addr = mm.mmap(npages * m.page_size, **kw)
    data = rand(npages * m.page_size, seed)
    mm.write(addr, data)
    return addr, data


def free(m) -> list[int]:
    """Free base-page frames of every node."""
    return [n.free_pages for n in m.nodes]


def used(m) -> int:
    """Frames in use on the whole machine."""
    return sum(n.total_pages - n.free_pages for n in m.nodes)


def delta(m, before: dict) -> dict:
    """vmstat counters that changed since ``before`` (a snapshot of ``m.vmstat``), with their change."""
    return {k: v - before[k] for k, v in m.vmstat.items() if v != before[k]}


def run_migrate_vma(mm, start, end, node, engine=None):
    """A driver's whole ``MigrateVma`` sequence: setup, alloc_and_copy, pages, finalize."""
    from dmamig import MigrateVma

    mv = MigrateVma(mm, start, end, node)
    mv.setup()
    mv.alloc_and_copy(engine=engine)
    mv.pages()
    mv.finalize()
    return mv


def jsonschema_or_skip():
    """The ``jsonschema`` module (a ``test`` extra); the calling test skips, saying why, where it is missing."""
    return pytest.importorskip("jsonschema", reason="jsonschema is not installed (pip install 'dmamig[test]')")


def check_results_schema(doc) -> None:
    """Validate a results document against the shipped JSON schema with ``jsonschema`` (skip without it)."""
    from dmamig.bench.results import RESULTS_SCHEMA

    jsonschema_or_skip().validate(doc, RESULTS_SCHEMA)


def interrupt_bench_after(monkeypatch, n: int) -> None:
    """Make ``dmamig bench`` raise KeyboardInterrupt (Ctrl-C) when its ``n + 1``-th migration group starts."""
    from dmamig.bench import runner

    real, calls = runner.run_group, []

    def group(*a, **k):
        if len(calls) >= n:
            raise KeyboardInterrupt
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(runner, "run_group", group)


def make_nodes(backend, sizes=(64, 64), devices=(-1, 0), seed=0, page=4096):
    """Nodes of ``backend`` (device -1 is host RAM) filled with seeded random bytes, numbered and based in order."""
    from dmamig.nodes import Node

    rng = np.random.default_rng(seed)
    nodes, base = [], 0
    for i, (n, dev) in enumerate(zip(sizes, devices)):
        kind = "host" if dev < 0 else "device"
        frames = backend.alloc_frames(kind, dev, n, page)
        backend.write_frames(frames, np.arange(n), rng.integers(0, 256, (n, page), dtype=np.uint8))
        nodes.append(Node(i, kind, dev, base, n, frames))
        base += n
    return tuple(nodes)


def contents(backend, nodes):
    """Every frame of ``nodes``, in pfn order, read back to the host."""
    return np.concatenate([backend.read_frames(n.frames, np.arange(n.total_pages)) for n in nodes])


def engine_for(backend, nodes, channels=2, options=None):
    """A DMA engine over ``nodes`` of ``backend``."""
    from dmamig.dma import DmaEngine
    from dmamig.nodes import NodeMap

    return DmaEngine(nodes=nodes, nodemap=NodeMap(nodes), backend=backend, page_size=nodes[0].frames.shape[1],
                     channels=channels, options=options)


def check_access_frames_against_cpu(backend, n: int, picks: int, page: int, seed: int = 0) -> None:
    """``backend.access_frames`` reads and writes ``picks`` of ``n`` device frames as the CPU backend's does."""
    from dmamig.backends.cpu.backend import CpuBackend

    cpu = CpuBackend()
    rng = np.random.default_rng(seed)
    frames = backend.alloc_frames("device", 0, n, page)
    ref = cpu.alloc_frames("device", 0, n, page)
    init = rng.integers(0, 256, (n, page), dtype=np.uint8)
    backend.write_frames(frames, np.arange(n), init)
    ref[:] = init
    idx = rng.permutation(n)[:picks]
    np.testing.assert_array_equal(backend.access_frames(frames, idx), cpu.access_frames(ref, idx))
    rows = rng.integers(0, 256, (idx.size, page), dtype=np.uint8)
    backend.access_frames(frames, idx, rows)
    cpu.access_frames(ref, idx, rows)
    np.testing.assert_array_equal(backend.read_frames(frames, np.arange(n)), ref)


def stop_worker(channel) -> None:
    """Make a CPU DMA channel's worker leave its loop as if stopped, without closing the channel."""
    with channel._lock:
        channel._enqueue_stop()
    channel._thread.join(WAIT)
    assert not channel.alive


def hook_copy_kernels(monkeypatch) -> None:
    """Route polling channels' copies through the Python worker, so that hooks on ``cpu_kernels`` see them."""
    from dmamig.backends.cpu.polling_channel import PollingCpuChannel

    monkeypatch.setattr(PollingCpuChannel, "compiled_copies", False)
