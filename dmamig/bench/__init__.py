"""Benchmarks of copy vs no-copy migration: scenarios, a verified runner, reports, plots and the results schema.

``dmamig bench`` drives :func:`dmamig.bench.runner.run_sweep`; ``dmamig report`` re-renders and compares the
results document it writes (see :mod:`dmamig.bench.schema`).
"""

from .scenarios import BenchSettings, Scenario, build_sweep, default_settings, parse_size
from .schema import RESULTS_SCHEMA, validate_results

__all__ = ["RESULTS_SCHEMA", "BenchSettings", "Scenario", "build_sweep", "default_settings", "parse_size",
           "validate_results"]
