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
