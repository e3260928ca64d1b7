"""pytest-benchmark suites of dmamig: collection of ``bench_*.py``, scale, backend and the ceiling summary.

Run with ``pytest benchmarks/ --benchmark-only``. The working set defaults to 64 MiB so that the suite takes
seconds; ``DMAMIG_BENCH_TOTAL=1G`` gives the 1 GiB working sets the performance targets quote.
``DMAMIG_BACKEND=cpu|cuda`` picks the backend (auto by default).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dmamig.bench.scenarios import parse_size

#: Lines printed after the run: each benchmark's figure beside its same-run ceiling.
SUMMARY: list[str] = []


def pytest_collect_file(file_path: Path, parent: pytest.Collector):
    # The suites are named bench_*.py so that a plain `pytest` run of tests/ never picks them up by accident.
    if file_path.suffix == ".py" and file_path.name.startswith("bench_"):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


@pytest.fixture(scope="session")
def total_bytes() -> int:
    """Working set per benchmark: ``DMAMIG_BENCH_TOTAL`` (e.g. 256M, 1G), 64 MiB by default."""
    text = os.environ.get("DMAMIG_BENCH_TOTAL", "64M")
    try:
        n = parse_size(text)
    except ValueError as exc:
        raise pytest.UsageError(f"DMAMIG_BENCH_TOTAL: {exc}") from None
    if n % (2 << 20):
        raise pytest.UsageError(f"DMAMIG_BENCH_TOTAL must be a multiple of 2M, got {text!r}")
    return n


@pytest.fixture(scope="session")
def bench_summary() -> list[str]:
    """Lines for the end-of-run summary (each benchmark's figure beside its ceiling)."""
    return SUMMARY


@pytest.fixture(scope="session")
def backend_name() -> str:
    """The resolved backend (``DMAMIG_BACKEND`` or auto)."""
    from dmamig.backends import resolve_backend

    return resolve_backend("auto")


def pytest_terminal_summary(terminalreporter) -> None:
    if SUMMARY:
        terminalreporter.section("dmamig: results beside their same-run ceilings")
        for line in SUMMARY:
            terminalreporter.write_line(line)
