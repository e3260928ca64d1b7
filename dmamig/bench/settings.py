"""What a ``dmamig bench`` sweep measures: its settings, the defaults, and the values a command line gives.

Everything here is pure (no machine, no backend), so that a sweep can be built, tested and shown without
running anything. Each parser of a size, a folio size or a sweep axis refuses bad input with a message that says
what is allowed; the page and folio sizes they check against live here too.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field

from ..backends.cuda.memory import HOST_MAPPED
from ..migrate.options import FAITHFUL, NR_MAX_BATCHED_MIGRATION, MigrateOptions
from ..topology import Topology
from .naming import COPY_BASELINE_OF, format_size

__all__ = [
    "MAX_FOLIO_ORDER",
    "PAGE_SIZE",
    "RUNTIME_TOPOLOGY",
    "BenchSettings",
    "default_settings",
    "folio_order",
    "folio_sizes",
    "parse_batch_pages",
    "parse_batches_per_step",
    "parse_channels",
    "parse_folio_sizes",
    "parse_int_list",
    "parse_pipeline",
    "parse_poll_us",
    "parse_size",
]

#: Base page size every sweep uses (the kernel's on x86-64).
PAGE_SIZE = 4096

#: Largest folio order a node serves (2 MiB folios of 4 KiB pages).
MAX_FOLIO_ORDER = 9

#: ``BenchSettings.topology`` on CUDA: the topology the runtime reports (presets are a CPU-backend setting).
RUNTIME_TOPOLOGY = "runtime"

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*$", re.IGNORECASE)

def parse_size(text: str) -> int:
    """Parse a byte size such as ``4k``, ``64K``, ``2m``, ``256M``, ``1G``, ``1.5g`` or ``4096``.

    Suffixes are binary (``k`` = 1024) and may be followed by ``b``/``ib`` (``4KiB``, ``2MB``).

    Parameters
    ----------
    text : str
        The size as typed on a command line.

    Returns
    -------
    int
        The size in bytes.

    Raises
    ------
    ValueError
        When ``text`` is not a size; the message says what a size looks like.
    """
    m = _SIZE_RE.match(str(text))
    if not m:
        raise ValueError(f"{text!r} is not a size; use a number with an optional k/m/g suffix, e.g. 4k, 2m, 1G")
    value = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if value != int(value) or value <= 0:
        raise ValueError(f"{text!r} is not a positive whole number of bytes")
    return int(value)

def folio_sizes() -> list[int]:
    """Every folio size a node serves: ``PAGE_SIZE << order`` for order 0..9."""
    return [PAGE_SIZE << order for order in range(MAX_FOLIO_ORDER + 1)]

def parse_folio_sizes(text: str) -> list[int]:
    """Parse a comma-separated list of folio sizes (``4k,64k,2m``) into sorted, distinct byte counts.

    Raises
    ------
    ValueError
        On an empty list, a malformed size, or a size that is not ``4K << order`` for order 0..9.
    """
    items = [t for t in str(text).split(",") if t.strip()]
    if not items:
        raise ValueError("expected a comma-separated list of folio sizes, e.g. 4k,64k,2m")
    allowed = folio_sizes()
    out = set()
    for item in items:
        size = parse_size(item)
        if size not in allowed:
            names = ", ".join(format_size(s) for s in allowed)
            raise ValueError(f"{item.strip()!r} is not a folio size; allowed: {names}")
        out.add(size)
    return sorted(out)

def folio_order(folio_bytes: int) -> int:
    """The order of a folio of ``folio_bytes`` bytes (``4K`` -> 0, ``64K`` -> 4, ``2M`` -> 9)."""
    return (folio_bytes // PAGE_SIZE).bit_length() - 1

def parse_int_list(text: str, what: str, low: int, high: int, example: str) -> list[int]:
    """Parse a comma-separated list of whole numbers in ``low..high`` into sorted, distinct values.

    One parser for every numeric sweep axis, so that each rejects bad input with the same kind of message;
    ``what`` names one value (``"channel count"``) and ``example`` shows a valid list.

    Raises
    ------
    ValueError
        On an empty list, a non-integer or a value outside ``low..high``.
    """
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    if not items:
        raise ValueError(f"expected a comma-separated list of {what}s, e.g. {example}")
    out = set()
    for item in items:
        if not (item.isascii() and item.isdigit()) or not low <= int(item) <= high:
            raise ValueError(f"{item!r} is not a {what}; use whole numbers from {low} to {high}, e.g. {example}")
        out.add(int(item))
    return sorted(out)

def parse_channels(text: str) -> list[int]:
    """Parse a comma-separated list of DMA channel counts (``1,2,4``), each in 1..64.

    Raises
    ------
    ValueError
        On an empty list, a non-integer or a count outside 1..64.
    """
    return parse_int_list(text, "channel count", 1, 64, "1,2,4")

def parse_batch_pages(text: str) -> list[int]:
    """Parse a comma-separated list of batch sizes in base pages (``512,2048``), each in 1..262144.

    ``512`` is the kernel's ``NR_MAX_BATCHED_MIGRATION``; any other value is an experiment setting.

    Raises
    ------
    ValueError
        On an empty list, a non-integer or a size outside 1..262144.
    """
    return parse_int_list(text, "batch size in pages", 1, 1 << 18, "512,2048")

def parse_batches_per_step(text: str) -> list[int]:
    """Parse a comma-separated list of batches per step (``1,16``), each in 1..1024; ``1`` is the kernel's.

    Raises
    ------
    ValueError
        On an empty list, a non-integer or a count outside 1..1024.
    """
    return parse_int_list(text, "batches-per-step count", 1, 1024, "1,16")

def parse_pipeline(text: str) -> list[int]:
    """Parse a comma-separated list of DMA pipeline depths (``0,1``), each in 0..8; ``0`` is the kernel's.

    Raises
    ------
    ValueError
        On an empty list, a non-integer or a depth outside 0..8.
    """
    return parse_int_list(text, "pipeline depth", 0, 8, "0,1")

def parse_poll_us(text: str) -> float:
    """Parse a DMA poll window in microseconds, 0 (channels sleep) to 1000000.

    Raises
    ------
    ValueError
        On anything but a plain decimal number in that range.
    """
    t = text.strip()
    try:
        if not t or not t.isascii() or t.lower() in ("nan", "inf", "-inf", "+inf", "infinity"):
            raise ValueError
        value = float(t)
    except ValueError:
        raise ValueError(f"expected a number of microseconds from 0 to 1000000, e.g. 1000 (or 0: channels "
                         f"sleep), got {text!r}") from None
    if not 0 <= value <= 1e6:
        raise ValueError(f"a poll window is 0 to 1000000 microseconds, got {text!r}")
    return value

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
        Add the default experiment: no-copy :data:`~dmamig.bench.migration.PIPELINED` at the smallest folio size, beside copy with the
        same batches per step, so that its no-copy/copy ratio compares like with like.
    access : bool
        Also run the device-access scenarios (:mod:`dmamig.bench.access`), in copy and no-copy mode.
    access_bytes : int
        Working set of each device-access scenario.
    fault_batches : list of int
        Fault batch sizes of the streaming read (UVM's 256 always runs, and is the one the other patterns use).
    oversubscription : list of float
        Working set over device memory of the stencil scenarios (``2.0``: twice the device's memory).
    files : bool
        Also run the file-backed scenarios (:mod:`dmamig.bench.files`): clean and dirty page cache, shared
        memory and a private file mapping after copy-on-write, in copy and no-copy mode. Off by default (they
        add about 14 s on a 2-vCPU VM); on in a quick sweep, at 4 MiB.
    files_bytes : int
        Working set of each file-backed scenario (whole 4 KiB pages).
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
    dma_engine : str or None
        What consumes the DMA rings on CUDA (``Machine(dma_engine=)``): ``None`` or ``"launch"``, one kernel launch
        per submission (the default); ``"persistent"``, a resident consumer kernel per device (an experiment; the
        CPU backend refuses it). Recorded on CUDA, ``null`` on the CPU backend.
    copy_baseline_name : str or None
        What copy mode measures, the divisor of every no-copy / copy ratio (:data:`~dmamig.bench.naming.COPY_BASELINES`):
        ``None`` is the backend's (:data:`~dmamig.bench.naming.COPY_BASELINE_OF`). On CUDA ``"cpu"`` runs the
        migration and file scenarios' copy mode on machines whose device frames are host-mapped
        (``Machine(device_frames="host-mapped")``), so that the migrating CPU's memcpy copies them; their no-copy
        mode keeps device memory. Recorded as ``copy_baseline``.
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
    files: bool = False
    files_bytes: int = 32 << 20
    pairs: bool = True
    pair_bytes: int = 32 << 20
    topology: str = "nvswitch"
    dma_poll_us: float | None = None
    dma_engine: str | None = None
    copy_baseline_name: str | None = None

    def copy_baseline(self) -> str:
        """What copy mode measures on this sweep (:data:`~dmamig.bench.naming.COPY_BASELINES`): the setting, else
        the backend's."""
        return self.copy_baseline_name or COPY_BASELINE_OF.get(self.backend, "cpu")

    def machine_device_frames(self, mode: str) -> str | None:
        """The ``device_frames`` of a bench machine that runs ``mode`` (``"copy"`` or ``"nocopy"``).

        ``"host-mapped"`` for copy mode on CUDA under the ``cpu`` baseline, so that the migrating CPU copies the
        device frames; ``None`` (device memory) otherwise: no-copy mode measures the DMA engine on real device
        memory whatever the baseline.
        """
        if mode == "copy" and self.backend == "cuda" and self.copy_baseline() == "cpu":
            return HOST_MAPPED
        return None

    def machine_poll(self) -> float | None:
        """The ``dma_poll_us`` of a bench machine (``None``: the machine's default)."""
        return self.dma_poll_us

    def machine_dma_engine(self) -> str | None:
        """The ``dma_engine`` of a bench machine (``None``: the machine's default)."""
        return self.dma_engine

    def recorded_dma_engine(self) -> str | None:
        """What consumed the DMA rings, as results.json records it: ``None`` on the CPU backend (its channels are
        worker threads whatever the setting), else the setting (``"launch"`` by default)."""
        return None if self.backend == "cpu" else (self.dma_engine or "launch")

    def recorded_copy_device_frames(self) -> str | None:
        """Where copy mode's device frames lived, as results.json records it: ``None`` on the CPU backend (its
        device frames are host memory whatever the setting), else ``"host-mapped"`` or ``"device"``."""
        if self.backend == "cpu":
            return None
        return self.machine_device_frames("copy") or "device"

    def recorded_poll(self) -> float:
        """The poll window the bench machines run with, as results.json records it."""
        from ..backends.cpu.ring_consumer import RING_AVAILABLE
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
            "files": self.files,
            "files_bytes": self.files_bytes,
            "pairs": self.pairs,
            "pair_bytes": self.pair_bytes,
            "topology": self.topology,
            "dma_poll_us": self.recorded_poll(),
            "copy_baseline": self.copy_baseline(),
            "dma_engine": self.recorded_dma_engine(),
            "copy_device_frames": self.recorded_copy_device_frames(),
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
    The file-backed scenarios run only in a quick sweep (4 MiB) unless ``files`` is set (32 MiB, 128 MiB on a
    GPU).

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
                             oversubscription=[2.0], files=True, files_bytes=4 << 20, pair_bytes=4 << 20, topology=topology)
    if backend == "cuda":
        return BenchSettings(backend=backend, sizes=[4096, 64 << 10, 2 << 20], total_bytes=1 << 30,
                             channels=[1, 2, 4], devices=max(1, min(gpus, 2)), repeat=5, warmup=1,
                             access_bytes=128 << 20, files_bytes=128 << 20, pair_bytes=256 << 20,
                             topology=topology)
    return BenchSettings(backend=backend, sizes=[4096, 64 << 10, 2 << 20], total_bytes=256 << 20,
                         channels=[1, 2], devices=1, repeat=5, warmup=1)
