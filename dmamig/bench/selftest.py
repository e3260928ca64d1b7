"""``dmamig selftest``: a quick correctness pass of one backend.

Each check migrates real data and verifies it (status codes, nodes, per-page checksums, read-back); on the
CUDA backend the GPU checksum and gather/scatter kernels are checked against the numpy reference on random
data. Checks never raise: each reports ``(name, ok, detail)``.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from .naming import format_size
from .settings import PAGE_SIZE
from .verify import range_pfns, verify_pages, verify_result

__all__ = ["run_selftest"]

_PAGES = 1024  # 4 MiB of 4 KiB pages: two 2 MiB folios at order 9


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise AssertionError(msg)


def _migrate_roundtrip(m: Any, order: int, nocopy: bool, rng: np.random.Generator) -> str:
    from ..flags import MigrateMode

    ps = m.page_size
    mm = m.address_space()
    try:
        n = _PAGES
        addr = mm.mmap(n * ps, order=order)
        data = np.frombuffer(rng.bytes(n * ps), dtype=np.uint8)
        mm.write(addr, data)
        ref = np.asarray(m.dma.checksum(range_pfns(mm, addr, n)))
        engine = m.dma if nocopy else None
        stats = getattr(m.backend, "copy_stats", None)
        calls0, secs0 = (stats["calls"], stats["seconds"]) if stats else (0, 0.0)
        for node in (1, 0):
            res = mm.migrate(addr, n * ps, node, mode=MigrateMode.SYNC, engine=engine)
            verify_result(res, n, f"to node {node}")
            verify_pages(m, range_pfns(mm, addr, n), node, ref, f"to node {node}")
        _check(np.array_equal(mm.read(addr, n * ps), data), "read-back differs from the bytes written")
        detail = f"{n} pages there and back, checksums and read-back equal"
        if stats and not nocopy:
            # Copy mode on a GPU: one synchronous copy call per folio; show what each one costs.
            now = m.backend.copy_stats
            calls = now["calls"] - calls0
            per_call = (now["seconds"] - secs0) / calls * 1e6 if calls else 0.0
            detail += f"; {calls} folio copy calls, {per_call:.1f} us per call"
        return detail
    finally:
        mm.close()


def _dma_random(m: Any, rng: np.random.Generator) -> str:
    from ..dma.checksum import page_checksums

    ps = m.page_size
    mm = m.address_space()
    dst = None
    try:
        n = _PAGES
        addr = mm.mmap(n * ps)
        mm.write(addr, np.frombuffer(rng.bytes(n * ps), dtype=np.uint8))
        src = range_pfns(mm, addr, n)[rng.permutation(n)]
        dst = np.asarray(m.alloc_pages(1, n), dtype=np.int64)[rng.permutation(n)]
        m.dma.copy(src, dst).wait()
        # The reference: numpy checksums of the source pages as read back to the host.
        want = page_checksums(m.frames.read_pfns(src))
        got_src = np.asarray(m.dma.checksum(src))
        got_dst = np.asarray(m.dma.checksum(dst))
        _check(np.array_equal(got_src, want), "engine checksum of the source differs from the numpy reference")
        _check(np.array_equal(got_dst, want), f"{(got_dst != want).sum()} of {n} copied pages differ from source")
        _check(np.array_equal(m.frames.read_pfns(dst), m.frames.read_pfns(src)), "copied bytes differ from the source bytes")
        return f"{n} scattered pages, {m.dma.channels if hasattr(m.dma, 'channels') else '?'} channels"
    finally:
        if dst is not None:
            m.put_pages(dst)
        mm.close()


def _dma_error(m: Any, rng: np.random.Generator) -> str:
    from ..flags import MigrateMode

    ps = m.page_size
    mm = m.address_space()
    try:
        n = _PAGES
        addr = mm.mmap(n * ps)
        data = np.frombuffer(rng.bytes(n * ps), dtype=np.uint8)
        mm.write(addr, data)
        m.dma.inject_errors(1)
        res = mm.migrate(addr, n * ps, 1, mode=MigrateMode.SYNC, engine=m.dma)
        st = np.asarray(res.status)
        where = np.asarray(m.frames.node_of_pfns(range_pfns(mm, addr, n)))
        _check(((st == 0) | (where == 0)).all(), "a page that failed to migrate is not on its source node")
        _check(((st != 0) | (where == 1)).all(), "a page reported migrated is not on the target node")
        _check(np.array_equal(mm.read(addr, n * ps), data), "data changed after an injected DMA error")
        return f"{res.nr_succeeded} migrated (after retries), {res.nr_failed} stayed; data intact"
    finally:
        mm.close()


def _cuda_kernels(m: Any, rng: np.random.Generator) -> str:
    from ..backends.cuda import KERNEL_FILES

    be = m.backend
    for fname, funcs in KERNEL_FILES.items():
        for func in funcs:
            _check(be.kernel(0, fname, func) is not None,
                   f"the CUDA kernels cannot be built ({be.kernel_error}); copies and checksums run on their "
                   f"slower fallbacks. Install dmamig[cuda12] or dmamig[cuda13], which bring NVRTC")
    return f"{', '.join(KERNEL_FILES)} compiled and loaded on device 0"


def _checks(backend: str) -> Iterator[tuple[str, Callable[[Any, np.random.Generator], str]]]:
    if backend == "cuda":
        yield "CUDA kernels built with NVRTC", _cuda_kernels
    for order in (0, 4, 9):
        for nocopy in (False, True):
            name = f"{'no-copy' if nocopy else 'copy'} migration, {format_size(PAGE_SIZE << order)} folios"
            yield name, lambda m, rng, o=order, nc=nocopy: _migrate_roundtrip(m, o, nc, rng)
    what = "GPU gather/scatter and checksum kernels vs numpy reference" if backend == "cuda" else \
        "DMA copy of scattered pages vs numpy reference checksums"
    yield what, _dma_random
    yield "injected DMA error leaves every page intact", _dma_error


def run_selftest(backend: str, seed: int = 12345) -> list[tuple[str, bool, str]]:
    """Run every check on ``backend`` (``"cpu"`` or ``"cuda"``); return ``(name, ok, detail)`` per check.

    A final check confirms that no frame leaked: every node's ``free_pages`` is back where it started.
    """
    from ..machine import Machine

    results: list[tuple[str, bool, str]] = []
    try:
        m = Machine(host_pages=4096, device_pages=4096, devices=1, backend=backend, channels=2)
    except Exception as exc:
        return [(f"create a {backend} machine", False, f"{type(exc).__name__}: {exc}")]
    rng = np.random.default_rng(seed)
    with m:
        start = [n.free_pages for n in m.nodes]
        for name, fn in _checks(backend):
            try:
                results.append((name, True, fn(m, rng)))
            except Exception as exc:
                tb = traceback.extract_tb(exc.__traceback__)[-1]
                results.append((name, False, f"{type(exc).__name__}: {exc} ({tb.filename}:{tb.lineno})"))
        end = [n.free_pages for n in m.nodes]
        results.append(("no frames leaked", start == end, f"free pages per node {start} -> {end}"))
    return results
