"""Benchmark scenarios: size parsing, sweep settings and the list of scenarios a sweep runs.

Everything here is pure (no machine, no backend), so that argument checking and sweep generation can be tested
and shown without running anything.

A *group* is one working set migrated around a cycle of nodes (host -> device -> back) in one mode; each leg of
the cycle is a *scenario* with its own figures. Grouping the legs means every timed repetition starts from a
populated range on the right node without an untimed reset in between.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

__all__ = [
    "DIRECTIONS",
    "PAGE_SIZE",
    "BenchSettings",
    "MigrateGroup",
    "Scenario",
    "build_sweep",
    "default_settings",
    "format_size",
    "parse_channels",
    "parse_folio_sizes",
    "parse_size",
]

#: Base page size every sweep uses (the kernel's on x86-64).
PAGE_SIZE = 4096
#: Largest folio order a node serves (2 MiB folios of 4 KiB pages).
MAX_FOLIO_ORDER = 9

#: Short names of the migration directions, in report order.
DIRECTIONS = {
    "h2d": "host->device",
    "d2h": "device->host",
    "d2d": "device->device",
}

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


def format_size(nbytes: int) -> str:
    """Render a byte count compactly with binary units: ``4096`` -> ``"4K"``, ``2097152`` -> ``"2M"``."""
    for unit, scale in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if nbytes >= scale and nbytes % scale == 0:
            return f"{nbytes // scale}{unit}"
    if nbytes >= 1 << 20:
        return f"{nbytes / (1 << 20):.1f}M"
    return f"{nbytes}B"


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


def parse_channels(text: str) -> list[int]:
    """Parse a comma-separated list of DMA channel counts (``1,2,4``), each in 1..64.

    Raises
    ------
    ValueError
        On an empty list, a non-integer or a count outside 1..64.
    """
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    if not items:
        raise ValueError("expected a comma-separated list of channel counts, e.g. 1,2,4")
    out = set()
    for item in items:
        if not item.isdigit() or not 1 <= int(item) <= 64:
            raise ValueError(f"{item!r} is not a channel count; use whole numbers from 1 to 64, e.g. 1,2,4")
        out.add(int(item))
    return sorted(out)


def folio_order(folio_bytes: int) -> int:
    """The order of a folio of ``folio_bytes`` bytes (``4K`` -> 0, ``64K`` -> 4, ``2M`` -> 9)."""
    return (folio_bytes // PAGE_SIZE).bit_length() - 1


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
        Device nodes; ``>= 2`` adds device->device legs.
    repeat : int
        Timed repetitions per scenario (medians are reported).
    warmup : int
        Untimed repetitions first (first-touch, kernel compilation, allocator warm-up).
    quick : bool
        A tiny smoke-test sweep.
    extras : bool
        Also run the engine scenarios (state-only migration, raw DMA copy).
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
        }


def default_settings(backend: str, *, gpus: int = 0, quick: bool = False) -> BenchSettings:
    """The sweep ``dmamig bench`` runs when no option says otherwise.

    On the CPU backend the default fits about two minutes on a 2-core machine: 256 MiB working sets (the
    performance targets quote 1 GiB; ``--total 1G`` selects it) and 1 or 2 channels, one per core. On a GPU
    the working set is 1 GiB, channels go up to 4 (one stream each), and a second GPU adds device->device.

    Parameters
    ----------
    backend : str
        ``"cpu"`` or ``"cuda"``.
    gpus : int
        Number of usable GPUs (ignored on the CPU backend).
    quick : bool
        A sweep of a few seconds, for smoke tests.
    """
    if quick:
        return BenchSettings(backend=backend, sizes=[4096, 2 << 20], total_bytes=8 << 20, channels=[2],
                             devices=1, repeat=1, warmup=1, quick=True)
    if backend == "cuda":
        return BenchSettings(backend=backend, sizes=[4096, 64 << 10, 2 << 20], total_bytes=1 << 30,
                             channels=[1, 2, 4], devices=max(1, min(gpus, 2)), repeat=5, warmup=1)
    return BenchSettings(backend=backend, sizes=[4096, 64 << 10, 2 << 20], total_bytes=256 << 20,
                         channels=[1, 2], devices=1, repeat=5, warmup=1)


@dataclass(frozen=True)
class Scenario:
    """One measured figure set: a migration leg, a state-only migration or a raw DMA copy.

    ``kind`` is ``"migrate"`` (end-to-end ``mm.migrate``), ``"state"`` (``m.migrate_pages`` with ``NO_COPY``:
    page state only) or ``"dma"`` (``m.dma.copy`` of pages, ``layout`` ``"random"`` or ``"contiguous"``).
    """

    kind: str
    folio_bytes: int
    total_bytes: int
    mode: str = "nocopy"
    direction: str = "h2d"
    channels: int | None = None
    layout: str = ""

    @property
    def id(self) -> str:
        """A stable identifier, used to match scenarios between a run and its baseline."""
        size = format_size(self.folio_bytes).lower()
        if self.kind == "migrate":
            ch = f"/ch{self.channels}" if self.mode == "nocopy" else ""
            return f"migrate/{self.direction}/{size}/{self.mode}{ch}"
        if self.kind == "state":
            return f"state/{size}"
        return f"dma/{self.layout}/{size}/ch{self.channels}"

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

    @property
    def label(self) -> str:
        """A short progress label."""
        ch = f" ch{self.channels}" if self.channels else ""
        return f"{self.mode} {format_size(self.folio_bytes)}{ch}"


def _path(devices: int) -> tuple[str, ...]:
    return ("h2d", "d2d", "d2h") if devices >= 2 else ("h2d", "d2h")


def build_sweep(settings: BenchSettings) -> tuple[list[MigrateGroup], list[Scenario]]:
    """Expand settings into migration groups and engine scenarios.

    Copy migration does not use the DMA engine, so it runs once per folio size; no-copy runs once per channel
    count. The engine scenarios are state-only migration (one per folio size, smallest and largest) and raw DMA
    copies of random and contiguous 4 KiB pages at the largest channel count.

    Returns
    -------
    groups : list of MigrateGroup
        Migration groups, each with its per-leg scenarios.
    engine : list of Scenario
        State-only and DMA-copy scenarios (empty when ``settings.extras`` is false).
    """
    path = _path(settings.devices)
    groups: list[MigrateGroup] = []
    for size in settings.sizes:
        for mode, chans in (("copy", [None]), ("nocopy", settings.channels)):
            for ch in chans:
                legs = tuple(Scenario("migrate", size, settings.total_bytes, mode, d, ch) for d in path)
                groups.append(MigrateGroup(mode, size, settings.total_bytes, ch, path, legs))
    engine: list[Scenario] = []
    if settings.extras:
        for size in sorted({settings.sizes[0], settings.sizes[-1]}):
            engine.append(Scenario("state", size, settings.total_bytes, "state", "h2d"))
        ch = max(settings.channels)
        for layout in ("random", "contiguous"):
            engine.append(Scenario("dma", PAGE_SIZE, settings.total_bytes, "dma", "h2d", ch, layout))
    return groups, engine
