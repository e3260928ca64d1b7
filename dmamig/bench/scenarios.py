"""Benchmark scenarios: sweep settings and the list of scenarios a sweep runs.

Everything here is pure (no machine, no backend), so that sweep generation can be tested and shown without
running anything. The parsers of sizes and sweep axes live in :mod:`dmamig.bench.parsing`.

A *group* is one working set migrated around a cycle of nodes (host -> device -> back) in one mode; each leg of
the cycle is a *scenario* with its own figures. Grouping the legs means every timed repetition starts from a
populated range on the right node without an untimed reset in between.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from ..migrate.options import FAITHFUL, NR_MAX_BATCHED_MIGRATION, MigrateOptions
from ..topology import Topology
from .naming import COPY_BASELINE_OF, format_size, options_id, scenario_name
from .parsing import PAGE_SIZE, folio_order

__all__ = [
    "PIPELINED",
    "RUNTIME_TOPOLOGY",
    "BenchSettings",
    "MigrateGroup",
    "Scenario",
    "build_sweep",
    "default_settings",
]

#: ``BenchSettings.topology`` on CUDA: the topology the runtime reports (presets are a CPU-backend setting).
RUNTIME_TOPOLOGY = "runtime"
#: The pipelined variant every default sweep adds for no-copy at its smallest folio size: the setting that hid
#: the emulator's per-batch cost before the kernel's batching became the default. An experiment, never a headline.
PIPELINED = MigrateOptions(batches_per_step=16, pipeline_depth=1)


@dataclass(frozen=True)
class BenchSettings:
    """What a sweep measures.

    Attributes
    ----------
    backend : str
        ``"cpu"`` or ``"cuda"`` (already resolved from ``"auto"``).
    sizes : list of int
        Folio sizes in bytes.
    total_bytes : int
        Working set of each migration scenario.
    channels : list of int
        DMA channel counts for no-copy migration.
    devices : int
        Device nodes; ``>= 2`` adds device->device legs (between the first two devices) and, with ``pairs``,
        the all-pairs device-to-device matrix.
    repeat : int
        Timed repetitions per scenario (medians are reported).
    warmup : int
        Untimed repetitions first (first-touch, kernel compilation, allocator warm-up).
    quick : bool
        A tiny smoke-test sweep.
    extras : bool
        Also run the engine scenarios (state-only migration, raw DMA copy).
    batch_pages, batches_per_step, pipeline : list of int
        Sweep axes of the migration batching (:class:`~dmamig.MigrateOptions`). The kernel's batching (512,
        1, 0) always runs as the headline; every other combination runs as an experiment at every folio size
        and channel count.
    variants : bool
        Add the default experiment: no-copy :data:`PIPELINED` at the smallest folio size, beside copy with the
        same batches per step, so that its no-copy/copy ratio compares like with like.
    access : bool
        Also run the device-access scenarios (:mod:`dmamig.bench.access`), in copy and no-copy mode.
    access_bytes : int
        Working set of each device-access scenario.
    fault_batches : list of int
        Fault batch sizes of the streaming read (UVM's 256 always runs, and is the one the other patterns use).
    oversubscription : list of float
        Working set over device memory of the stencil scenarios (``2.0``: twice the device's memory).
    pairs : bool
        With ``devices >= 2``: migrate between every ordered pair of devices (:mod:`dmamig.bench.pairs`).
    pair_bytes : int
        Working set of each device pair (a whole number of 2 MiB folios).
    topology : str
        Peer access and links between the devices: a preset of :meth:`~dmamig.Topology.preset` on the CPU
        backend (``nvswitch``, ``pcie``, ``two-socket``, ``dgx1``), ``"runtime"`` on CUDA (what the GPUs report).
    dma_poll_us : float or None
        How long a wait for a DMA copy (and a CPU channel's idle worker) polls before sleeping
        (``Machine(dma_poll_us=)``); ``None`` is the machine's default, ``0`` sleeping at once. Recorded as the
        value the machines used.
    """

    backend: str
    sizes: list[int]
    total_bytes: int
    channels: list[int]
    devices: int = 1
    repeat: int = 3
    warmup: int = 1
    quick: bool = False
    extras: bool = True
    batch_pages: list[int] = field(default_factory=lambda: [NR_MAX_BATCHED_MIGRATION])
    batches_per_step: list[int] = field(default_factory=lambda: [1])
    pipeline: list[int] = field(default_factory=lambda: [0])
    variants: bool = True
    access: bool = True
    access_bytes: int = 32 << 20
    fault_batches: list[int] = field(default_factory=lambda: [32, 256, 1024])
    oversubscription: list[float] = field(default_factory=lambda: [0.5, 1.0, 1.5, 2.0])
    pairs: bool = True
    pair_bytes: int = 32 << 20
    topology: str = "nvswitch"
    dma_poll_us: float | None = None

    def copy_baseline(self) -> str:
        """What copy mode measures on this sweep's backend (:data:`~dmamig.bench.naming.COPY_BASELINES`)."""
        return COPY_BASELINE_OF.get(self.backend, "cpu")

    def machine_poll(self) -> float | None:
        """The ``dma_poll_us`` of a bench machine (``None``: the machine's default)."""
        return self.dma_poll_us

    def recorded_poll(self) -> float:
        """The poll window the bench machines run with, as results.json records it."""
        from ..backends.cpu_ring import RING_AVAILABLE
        from ..dma.channel import DEFAULT_POLL_US

        poll = DEFAULT_POLL_US if self.dma_poll_us is None else self.dma_poll_us
        # CPU channels sleep where the polling loop cannot run (no numba, or no sched_yield).
        return float(poll) if RING_AVAILABLE or self.backend != "cpu" else 0.0

    def machine_topology(self, devices: int) -> Topology | None:
        """The topology of a bench machine with the first ``devices`` of the sweep's devices.

        ``None`` where the machine decides: on CUDA (the runtime reports it) and for a single device.

        Raises
        ------
        dmamig.InvalidArgument
            An unknown preset, or ``dgx1`` for a sweep of other than 8 devices.
        """
        if self.topology == RUNTIME_TOPOLOGY or devices < 2:
            return None
        return Topology.preset(self.topology, self.devices).subset(devices)

    def option_sets(self) -> list[MigrateOptions]:
        """The batching settings of the sweep axes: the kernel's first, then each experiment once."""
        out = [FAITHFUL]
        for b, s, p in itertools.product(self.batch_pages, self.batches_per_step, self.pipeline):
            o = MigrateOptions(batch_pages=b, batches_per_step=s, pipeline_depth=p)
            if o not in out:
                out.append(o)
        return out

    def to_json(self) -> dict:
        """The settings as they are recorded in results.json."""
        return {
            "backend": self.backend,
            "page_size": PAGE_SIZE,
            "sizes": list(self.sizes),
            "total_bytes": self.total_bytes,
            "channels": list(self.channels),
            "devices": self.devices,
            "repeat": self.repeat,
            "warmup": self.warmup,
            "quick": self.quick,
            "batch_pages": list(self.batch_pages),
            "batches_per_step": list(self.batches_per_step),
            "pipeline": list(self.pipeline),
            "variants": self.variants,
            "access": self.access,
            "access_bytes": self.access_bytes,
            "fault_batches": list(self.fault_batches),
            "oversubscription": list(self.oversubscription),
            "pairs": self.pairs,
            "pair_bytes": self.pair_bytes,
            "topology": self.topology,
            "dma_poll_us": self.recorded_poll(),
            "copy_baseline": self.copy_baseline(),
        }


def default_settings(backend: str, *, gpus: int = 0, quick: bool = False) -> BenchSettings:
    """The sweep ``dmamig bench`` runs when no option says otherwise.

    On the CPU backend the default fits about a minute on a 2-core machine: 256 MiB working sets (the
    performance targets quote 1 GiB; ``--total 1G`` selects it) and 1 or 2 channels, one per core. On a GPU
    the working set is 1 GiB, channels go up to 4 (one stream each), and a second GPU adds device->device.
    Every default runs the kernel's batching, plus the pipelined variant at the smallest folio size. The
    device-access scenarios work on 32 MiB (128 MiB on a GPU; 8 MiB and the 2x stencil only with ``quick``).
    With two devices or more each ordered device pair migrates 32 MiB (256 MiB on a GPU, 4 MiB with ``quick``)
    of 2 MiB folios; on the CPU backend the devices sit on one NVSwitch unless ``topology`` names another preset.

    Parameters
    ----------
    backend : str
        ``"cpu"`` or ``"cuda"``.
    gpus : int
        Number of usable GPUs (ignored on the CPU backend).
    quick : bool
        A sweep of a few seconds, for smoke tests.
    """
    topology = RUNTIME_TOPOLOGY if backend == "cuda" else "nvswitch"
    if quick:
        return BenchSettings(backend=backend, sizes=[4096, 2 << 20], total_bytes=8 << 20, channels=[2],
                             devices=1, repeat=1, warmup=1, quick=True, access_bytes=8 << 20,
                             oversubscription=[2.0], pair_bytes=4 << 20, topology=topology)
    if backend == "cuda":
        return BenchSettings(backend=backend, sizes=[4096, 64 << 10, 2 << 20], total_bytes=1 << 30,
                             channels=[1, 2, 4], devices=max(1, min(gpus, 2)), repeat=5, warmup=1,
                             access_bytes=128 << 20, pair_bytes=256 << 20, topology=topology)
    return BenchSettings(backend=backend, sizes=[4096, 64 << 10, 2 << 20], total_bytes=256 << 20,
                         channels=[1, 2], devices=1, repeat=5, warmup=1)


@dataclass(frozen=True)
class Scenario:
    """One measured figure set: a migration leg, a state-only migration or a raw DMA copy.

    ``kind`` is ``"migrate"`` (end-to-end ``mm.migrate``), ``"state"`` (``m.migrate_pages`` with ``NO_COPY``:
    page state only) or ``"dma"`` (``m.dma.copy`` of pages, ``layout`` ``"random"`` or ``"contiguous"``).
    ``options`` is the migration's batching (``None`` for a raw DMA copy, which migrates nothing).
    """

    kind: str
    folio_bytes: int
    total_bytes: int
    mode: str = "nocopy"
    direction: str = "h2d"
    channels: int | None = None
    layout: str = ""
    options: MigrateOptions | None = FAITHFUL

    @property
    def id(self) -> str:
        """A stable identifier, used to match scenarios between a run and its baseline.

        The kernel's batching adds no suffix (ids stay as they were before settings were recorded); an
        experiment appends its settings, e.g. ``migrate/h2d/4k/nocopy/ch2/steps16-pipe1``.
        """
        size = format_size(self.folio_bytes).lower()
        if self.kind == "migrate":
            ch = f"/ch{self.channels}" if self.mode == "nocopy" else ""
            return f"migrate/{self.direction}/{size}/{self.mode}{ch}{options_id(self.options)}"
        if self.kind == "state":
            return f"state/{size}{options_id(self.options)}"
        return f"dma/{self.layout}/{size}/ch{self.channels}"

    @property
    def name(self) -> str:
        """The scenario in words, e.g. ``host->device, 4K pages, no-copy, 2 DMA channels``."""
        return scenario_name(self.kind, self.direction, self.folio_bytes, self.mode, self.channels, self.layout,
                             self.options)

    @property
    def pages(self) -> int:
        """Base pages moved."""
        return self.total_bytes // PAGE_SIZE

    @property
    def order(self) -> int:
        """Folio order."""
        return folio_order(self.folio_bytes)


@dataclass(frozen=True)
class MigrateGroup:
    """One working set migrated around ``path`` (node kinds) in one mode; one scenario per leg.

    ``path`` is a cycle of direction names, e.g. ``("h2d", "d2h")`` or ``("h2d", "d2d", "d2h")``.
    """

    mode: str
    folio_bytes: int
    total_bytes: int
    channels: int | None
    path: tuple[str, ...]
    scenarios: tuple[Scenario, ...] = field(default=())
    options: MigrateOptions = FAITHFUL

    @property
    def id(self) -> str:
        """A stable identifier of the group, e.g. ``group/4k/nocopy/ch2`` (experiments append their settings)."""
        size = format_size(self.folio_bytes).lower()
        ch = f"/ch{self.channels}" if self.channels else ""
        return f"group/{size}/{self.mode}{ch}{options_id(self.options)}"

    @property
    def label(self) -> str:
        """A short progress label."""
        ch = f", {self.channels} DMA ch." if self.channels else ""
        how = "no-copy" if self.mode == "nocopy" else "copy"
        return f"{how} {format_size(self.folio_bytes)}{ch}{options_id(self.options)}"


def _path(devices: int) -> tuple[str, ...]:
    return ("h2d", "d2d", "d2h") if devices >= 2 else ("h2d", "d2h")


def _group(settings: BenchSettings, mode: str, size: int, ch: int | None, opts: MigrateOptions) -> MigrateGroup:
    path = _path(settings.devices)
    legs = tuple(Scenario("migrate", size, settings.total_bytes, mode, d, ch, options=opts) for d in path)
    return MigrateGroup(mode, size, settings.total_bytes, ch, path, legs, opts)


def build_sweep(settings: BenchSettings) -> tuple[list[MigrateGroup], list[Scenario]]:
    """Expand settings into migration groups and engine scenarios.

    Copy migration does not use the DMA engine, so it runs once per folio size and batching (a pipeline depth
    changes nothing without a DMA copy to overlap); no-copy runs once per channel count. The kernel's batching
    comes first (the headline), then each experiment of the sweep axes at every folio size, then (with
    ``settings.variants``) :data:`PIPELINED` no-copy at the smallest folio size beside copy at the same
    batches per step. The engine scenarios are state-only migration (smallest and largest folio size, in
    every batching of the axes without a pipeline) and raw DMA copies of random and contiguous 4 KiB pages at
    the largest channel count.

    Returns
    -------
    groups : list of MigrateGroup
        Migration groups, each with its per-leg scenarios.
    engine : list of Scenario
        State-only and DMA-copy scenarios (empty when ``settings.extras`` is false).
    """
    plan: list[tuple[str, int, int | None, MigrateOptions]] = []

    def add(mode: str, size: int, opts: MigrateOptions) -> None:
        if mode == "copy":
            # Without a DMA engine the pipeline depth is ignored: run each copy batching once.
            opts = MigrateOptions(opts.batch_pages, opts.batches_per_step, 0)
            todo = [None]
        else:
            todo = list(settings.channels)
        for ch in todo:
            if (mode, size, ch, opts) not in plan:
                plan.append((mode, size, ch, opts))

    for opts in settings.option_sets():
        for size in settings.sizes:
            add("copy", size, opts)
            add("nocopy", size, opts)
    if settings.variants:
        add("copy", settings.sizes[0], PIPELINED)
        add("nocopy", settings.sizes[0], PIPELINED)
    groups = [_group(settings, mode, size, ch, opts) for mode, size, ch, opts in plan]

    engine: list[Scenario] = []
    if settings.extras:
        state_opts = list(dict.fromkeys(MigrateOptions(o.batch_pages, o.batches_per_step, 0)
                                        for o in settings.option_sets()))
        for opts in state_opts:
            for size in sorted({settings.sizes[0], settings.sizes[-1]}):
                engine.append(Scenario("state", size, settings.total_bytes, "state", "h2d", options=opts))
        ch = max(settings.channels)
        for layout in ("random", "contiguous"):
            engine.append(Scenario("dma", PAGE_SIZE, settings.total_bytes, "dma", "h2d", ch, layout, options=None))
    return groups, engine
