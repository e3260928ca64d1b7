"""Scenario names and batching settings in words, for tables, plots and comparisons.

A scenario has a stable machine id (``migrate/h2d/4k/nocopy/ch2``, used to match a run with its baseline) and a
name a person reads (``host->device, 4K pages, no-copy, 2 DMA channels``). Batching settings other than the
kernel's are spelled out as well: ``pipelined (16 batches/step, DMA overlaps next unmap)``.
"""

from __future__ import annotations

from typing import Any

from ..errors import InvalidArgument
from ..migrate.options import NR_MAX_BATCHED_MIGRATION, RFC_DMA_OFFLOAD, MigrateOptions

__all__ = [
    "COPY_BASELINES",
    "COPY_BASELINE_CHOICES",
    "COPY_BASELINE_OF",
    "DIRECTIONS",
    "NOT_A_MIGRATION",
    "batching_class",
    "check_copy_baseline",
    "copy_baseline_tag",
    "describe_options",
    "folio_words",
    "format_number",
    "format_rate",
    "format_size",
    "options_id",
    "options_of",
    "scenario_name",
    "settings_words",
]

#: What copy mode measures, by name: the divisor of every no-copy / copy ratio. On the CPU backend the migrating
#: thread copies (the kernel's folio_copy). On CUDA the CPU cannot touch device memory on a PCIe card, so copy
#: mode is by default one synchronous DMA per folio, as a driver without batching copies device-private memory;
#: ``cpu`` there (``dmamig bench --copy-baseline cpu``) has the migrating CPU copy into device frames in pinned,
#: host-mapped memory, as it can copy into device memory over a cache-coherent link: on a PCIe card a proxy.
COPY_BASELINES = {
    "cpu": "the migrating CPU copies each folio (memcpy); on cuda into device frames in host-mapped memory, as "
           "over a cache-coherent link (Grace Hopper C2C): a proxy where the card is on PCIe",
    "sync-dma": "one synchronous DMA copy per folio (a driver without batching)",
}
#: The copy baseline of each backend, when none is asked for.
COPY_BASELINE_OF = {"cpu": "cpu", "cuda": "sync-dma"}
#: The copy baselines each backend can measure, its default first.
COPY_BASELINE_CHOICES = {"cpu": ("cpu",), "cuda": ("sync-dma", "cpu")}



def check_copy_baseline(name: object, backend: str) -> str:
    """``name`` when ``backend`` can measure that copy baseline (:data:`COPY_BASELINE_CHOICES`).

    Raises
    ------
    InvalidArgument
        An unknown name, or one the backend cannot measure; the message says which it can.
    """
    allowed = COPY_BASELINE_CHOICES.get(backend, ())
    if not isinstance(name, str) or name not in COPY_BASELINES:
        raise InvalidArgument(f"copy baseline must be one of {', '.join(map(repr, COPY_BASELINES))}, got {name!r}")
    if name not in allowed:
        why = (": the cpu backend's copy mode always is the migrating CPU's memcpy, it has no DMA to copy "
               "synchronously" if backend == "cpu" else "")
        raise InvalidArgument(f"copy baseline {name!r} cannot run on the {backend} backend, which measures "
                              f"{', '.join(map(repr, allowed)) or 'none'}{why}")
    return name


def copy_baseline_tag(name: str | None, backend: str | None) -> str:
    """A copy baseline's name as a table cell: ``cpu, proxy`` for the CPU's memcpy on CUDA (host-mapped device
    frames stand for a coherent link's device memory), else the name; empty for none."""
    if not name:
        return ""
    return f"{name}, proxy" if name == "cpu" and backend == "cuda" else name


#: Short names of the migration directions, in report order.
DIRECTIONS = {
    "h2d": "host->device",
    "d2h": "device->host",
    "d2d": "device->device",
}

#: Batching text of raw DMA copies, which migrate nothing.
NOT_A_MIGRATION = "not a migration"


def format_size(nbytes: int) -> str:
    """Render a byte count compactly with binary units: ``4096`` -> ``"4K"``, ``2097152`` -> ``"2M"``."""
    for unit, scale in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if nbytes >= scale and nbytes % scale == 0:
            return f"{nbytes // scale}{unit}"
    if nbytes >= 1 << 20:
        return f"{nbytes / (1 << 20):.1f}M"
    return f"{nbytes}B"


def format_number(value: float | None, fmt: str = "{:.2f}") -> str:
    """``value`` formatted with ``fmt``, or ``-`` when there is none (a table cell)."""
    return "-" if value is None else fmt.format(value)


def format_rate(value: float | None) -> str:
    """A rate with a k/M/G suffix, e.g. ``1.25M``; ``-`` when there is none."""
    if value is None:
        return "-"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= scale:
            return f"{value / scale:.2f}{unit}"
    return f"{value:.0f}"


def folio_words(folio_bytes: int) -> str:
    """``4K pages`` for base pages, ``64K folios`` / ``2M folios`` for large folios."""
    return "4K pages" if folio_bytes <= 4096 else f"{format_size(folio_bytes)} folios"


def _channels_words(n: int | None) -> str:
    return f"{n} DMA channel" + ("" if n == 1 else "s")


def _setting_parts(options: MigrateOptions) -> list[str]:
    parts = []
    if options.batch_pages != NR_MAX_BATCHED_MIGRATION:
        parts.append(f"{options.batch_pages}-page batches")
    if options.batches_per_step != 1:
        parts.append(f"{options.batches_per_step} batches/step")
    if options.pipeline_depth == 1:
        parts.append("DMA overlaps next unmap")
    elif options.pipeline_depth > 1:
        parts.append(f"DMA of {options.pipeline_depth} steps overlaps next unmaps")
    return parts


def settings_words(options: MigrateOptions | None) -> str:
    """Only the settings that differ from the kernel's (``16 batches/step``), or ``faithful``."""
    if options is None:
        return NOT_A_MIGRATION
    return "faithful" if options.faithful else ", ".join(_setting_parts(options))


def describe_options(options: MigrateOptions | None) -> str:
    """The batching of a migration in words.

    ``faithful`` for the kernel's batching; otherwise ``pipelined (...)`` when one step's DMA copy overlaps the
    next step's unmap, or ``experiment (...)``, with the settings that differ from the kernel's in brackets.

    Parameters
    ----------
    options : MigrateOptions or None
        ``None`` for a scenario that migrates nothing (a raw DMA copy).
    """
    if options is None:
        return NOT_A_MIGRATION
    if options.faithful:
        return "faithful"
    if options == RFC_DMA_OFFLOAD:
        return f"DMA-offload RFC preset ({settings_words(options)})"
    kind = "pipelined" if options.pipeline_depth else "experiment"
    return f"{kind} ({settings_words(options)})"


def options_id(options: MigrateOptions | None) -> str:
    """The id suffix of a batching setting: empty for the kernel's, else e.g. ``/batch2048-steps16-pipe1``.

    Faithful scenarios keep the ids they had before settings were recorded, so old baselines still match.
    """
    if options is None or options.faithful:
        return ""
    short = {"batch_pages": "batch", "batches_per_step": "steps", "pipeline_depth": "pipe",
             "unaudited_no_copy": "unaudited-"}
    return "/" + "-".join(f"{short[n]}{v}" for n, v in options.changes())


def options_of(rec: dict[str, Any]) -> MigrateOptions | None:
    """The MigrateOptions a result record ran with; ``None`` when not recorded or not a migration."""
    o = rec.get("options")
    if not o:
        return None
    return MigrateOptions(batch_pages=int(o["batch_pages"]), batches_per_step=int(o["batches_per_step"]),
                          pipeline_depth=int(o["pipeline_depth"]))


def batching_class(rec: dict[str, Any]) -> str:
    """``faithful``, ``experiment`` or ``n/a`` (not a migration) for a record."""
    if rec["kind"] == "dma":
        return "n/a"
    o = options_of(rec)
    return "faithful" if o is None or o.faithful else "experiment"


def scenario_name(kind: str, direction: str, folio_bytes: int, mode: str, channels: int | None,
                  layout: str = "", options: MigrateOptions | None = None) -> str:
    """A scenario's name in words, e.g. ``host->device, 4K pages, no-copy, 2 DMA channels``.

    Experiment settings are appended (``..., pipelined (16 batches/step, DMA overlaps next unmap)``); the
    kernel's batching adds nothing, so the headline names stay short.
    """
    extra = "" if options is None or options.faithful else f", {describe_options(options)}"
    if kind == "state":
        return f"state-only migration (NO_COPY), {folio_words(folio_bytes)}{extra}"
    if kind == "dma":
        return f"DMA copy, {layout} {folio_words(folio_bytes)}, {_channels_words(channels)}"
    where = DIRECTIONS.get(direction, direction)
    how = "copy" if mode == "copy" else f"no-copy, {_channels_words(channels)}"
    return f"{where}, {folio_words(folio_bytes)}, {how}{extra}"
