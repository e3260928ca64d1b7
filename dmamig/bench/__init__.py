"""Benchmarks of copy vs no-copy migration: scenarios, a verified runner, reports, plots and the results schema.

``dmamig bench`` drives :func:`dmamig.bench.runner.run_sweep`; ``dmamig report`` re-renders and compares the
results document it writes (see :mod:`dmamig.bench.schema`). Every migration scenario records the
:class:`~dmamig.MigrateOptions` it ran with: the kernel's batching (faithful, the headline) or a named
experiment such as :data:`~dmamig.bench.scenarios.PIPELINED`.
"""
