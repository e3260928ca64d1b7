"""pytest-benchmark suites of dmamig: collection of ``bench_*.py``, scale, backend and the ceiling summary.

Run with ``pytest benchmarks/ --benchmark-only``. The working set defaults to 32768 pages (128 MiB) so that
the suite takes seconds; ``DMAMIG_BENCH_PAGES=262144`` gives the 1 GiB working sets the performance targets
quote. ``DMAMIG_BACKEND=cpu|cuda`` picks the backend (auto by default).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

#: Lines printed after the run: each benchmark's figure beside its same-run ceiling.
SUMMARY: list[str] = []


def pytest_collect_file(file_path: Path, parent: pytest.Collector):
    # The suites are named bench_*.py so that a plain `pytest` run of tests/ never picks them up by accident.
    # A file named on the command line is collected by pytest itself; collecting it here too would run it twice.
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


@pytest.fixture(scope="session")
def total_bytes() -> int:
    """Working set per benchmark: ``DMAMIG_BENCH_PAGES`` base pages of 4 KiB (default 32768 = 128 MiB)."""
    text = os.environ.get("DMAMIG_BENCH_PAGES", "32768")
    if not text.strip().isdigit() or int(text) <= 0 or int(text) % 512:
        raise pytest.UsageError(f"DMAMIG_BENCH_PAGES must be a positive multiple of 512 (whole 2 MiB folios), "
                                f"got {text!r}; e.g. 262144 for 1 GiB")
    return int(text) * 4096


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
