"""Benchmarks of copy vs no-copy migration: one module per scenario kind, a verified runner, the results.

- :mod:`~dmamig.bench.settings`: what a sweep measures, the defaults, and the parsers of their values;
- one module per scenario kind, each with its scenarios, runner, records, report tables and plots:
  :mod:`~dmamig.bench.migration` (``mm.migrate`` around host and devices, copy and no-copy; the headline),
  :mod:`~dmamig.bench.engine` (state-only migration, raw DMA copies), :mod:`~dmamig.bench.access` (device
  access through faults, UVM-style) and :mod:`~dmamig.bench.pairs` (the all-pairs device-to-device matrix);
- what the kinds share: :mod:`~dmamig.bench.verify` (bench machines and verification),
  :mod:`~dmamig.bench.timing` (the figures of timed repetitions), :mod:`~dmamig.bench.naming` (scenarios and
  settings in words), :mod:`~dmamig.bench.plots` (pyplot, colours, error bars),
  :mod:`~dmamig.bench.environment` (the machine and the same-run copy ceilings);
- :mod:`~dmamig.bench.runner`: a sweep as tasks, run here, journalled and resumable, or on a cluster;
- :mod:`~dmamig.bench.results`: the results document's schema, reading, writing and comparing;
- :mod:`~dmamig.bench.report`: every kind's tables and plots of a document, in order;
- :mod:`~dmamig.bench.selftest`: ``dmamig selftest``.

``dmamig bench`` (:mod:`dmamig.cli`) drives :class:`~dmamig.bench.runner.BenchSweep`; ``dmamig report``
re-renders and compares the results document it writes. Every migration scenario records the
:class:`~dmamig.MigrateOptions` it ran with: the kernel's batching (faithful, the headline) or a named
experiment such as :data:`~dmamig.bench.migration.PIPELINED`.
"""
