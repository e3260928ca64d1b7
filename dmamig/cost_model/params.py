"""The parameters of a cost model: what each operation of a migration costs on the hardware it describes.

A :class:`CostModel` groups four sets of parameters, each a frozen dataclass that checks its values:
:class:`KernelCosts` (the kernel's work per operation, in nanoseconds), :class:`CpuCopy` (the migrating thread's
copy), :class:`DmaCosts` (the DMA engine and its driver) and :class:`MtCopy` (the batch-copy RFC's multi-threaded
CPU copy). A parameter is named ``section.field`` (``dma.channels``, ``kernel.ipi_ns``), as ``--set`` takes it.

Times are nanoseconds, bandwidths bytes per second (a ``*_bw`` field), counts integers. Every bad value raises
:class:`~dmamig.errors.InvalidArgument` naming the parameter, what was wrong and what is allowed.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from ..errors import InvalidArgument

__all__ = ["COMPLETIONS", "DMA_SPLITS", "MT_SPLITS", "SECTIONS", "CostModel", "CpuCopy", "DmaCosts",
           "KernelCosts", "MtCopy"]

#: How a wait learns that a DMA submission finished: one interrupt per channel, the waiter woken by the last
#: (a wake-up latency), or the waiter polling the channels' status (half a polling period late on average).
COMPLETIONS = ("interrupt", "poll")
#: How a submission's folios are spread over the channels: ``even`` gives each channel the same number of folios,
#: one descriptor per folio (the batch-offload RFC's dcbm driver); ``balance`` first coalesces folios contiguous
#: on both sides into one descriptor and then balances the channels by bytes (dmamig's own planner).
DMA_SPLITS = ("even", "balance")
#: How the multi-threaded copy splits a batch: each thread whole folios (``folio``), or each thread a part of
#: every folio (``part``).
MT_SPLITS = ("folio", "part")


def _check_number(where: str, value: Any, low: float, low_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidArgument(f"{where} must be a finite number, got {value!r}")
    if value < low or (low_open and value == low):
        bound = f"> {low:g}" if low_open else f">= {low:g}"
        raise InvalidArgument(f"{where} must be {bound}, got {value!r}")
    return float(value)


def _check_int(where: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise InvalidArgument(f"{where} must be an integer >= {low}, got {value!r}")
    return value


def _check_choice(where: str, value: Any, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise InvalidArgument(f"{where} must be one of {', '.join(allowed)}; got {value!r}")
    return str(value)


def _check_fields(obj: Any, section: str) -> None:
    """Check every field of a parameter set by its name: ``*_bw`` > 0, integers >= their floor, the rest >= 0."""
    for f in fields(obj):
        where = f"cost model parameter {section}.{f.name}"
        value = getattr(obj, f.name)
        if f.name in ("completion",):
            _check_choice(where, value, COMPLETIONS)
        elif f.name == "split":
            _check_choice(where, value, DMA_SPLITS if section == "dma" else MT_SPLITS)
        elif f.type in ("int", int):
            _check_int(where, value, 0 if f.name == "threads" else 1)
        elif f.name.endswith("_bw"):
            # A cap of 0 means "no cap"; any other bandwidth must be positive.
            _check_number(where, value, 0.0, low_open=not f.name.startswith("cap"))
        elif f.name == "residency":
            if _check_number(where, value, 0.0) > 1.0:
                raise InvalidArgument(f"{where} must be a fraction from 0 to 1, got {value!r}")
        else:
            _check_number(where, value, 0.0)


@dataclass(frozen=True)
class KernelCosts:
    """The kernel's own work per operation of ``migrate_pages()``, in nanoseconds.

    Parameters
    ----------
    call_ns : float
        Per call: the system call, the lists, the result.
    isolate_ns : float
        Per folio of the call: the page-table walk of ``move_pages`` and isolation from the LRU.
    alloc_ns, alloc_page_ns : float
        Destination allocation: per folio, and per base page of the folio (a large folio's struct pages).
    lock_ns : float
        Per folio lock attempt.
    rmap_ns, unmap_ns : float
        The reverse-map walk per folio unmapped, and the unmap of each mapping it finds.
    entry_install_ns, entry_remove_ns : float
        Installing a migration entry, and replacing it by the new PTE (or the old one on undo), per mapping.
    tlb_flush_ns, ipi_ns : float
        The TLB flush of a batch on this CPU, and the interprocessor interrupt per other CPU to notify.
    cpus : int
        CPUs a flush must reach (the migrating one included): the flush costs
        ``tlb_flush_ns + ipi_ns * (cpus - 1)``.
    freeze_ns : float
        The reference freeze (the expected-count check) per folio per move pass.
    mapping_ns : float
        Moving the mapping (``folio_migrate_mapping``) per folio.
    state_ns : float
        Transferring the state flags (``folio_migrate_flags``) per folio.
    putback_ns, free_page_ns : float
        Finishing a folio (new one to the LRU, old one freed), per folio and per base page freed.
    """

    call_ns: float
    isolate_ns: float
    alloc_ns: float
    alloc_page_ns: float
    lock_ns: float
    rmap_ns: float
    unmap_ns: float
    entry_install_ns: float
    entry_remove_ns: float
    tlb_flush_ns: float
    ipi_ns: float
    cpus: int
    freeze_ns: float
    mapping_ns: float
    state_ns: float
    putback_ns: float
    free_page_ns: float

    def __post_init__(self) -> None:
        _check_fields(self, "kernel")

    def flush_ns(self) -> float:
        """One batch's TLB flush, IPIs included."""
        return self.tlb_flush_ns + self.ipi_ns * (self.cpus - 1)


@dataclass(frozen=True)
class CpuCopy:
    """The migrating thread's copy of a folio (``folio_copy``).

    Parameters
    ----------
    bw_4k, bw_2m : float
        Bytes per second copying a 4 KiB and a 2 MiB folio whose source is not in the cache; between the two
        the bandwidth is interpolated on the logarithm of the folio size, and held beyond them.
    call_ns : float
        Fixed cost per folio copied.
    cached_bw : float
        Bytes per second when the source is in the cache.
    residency : float
        Fraction of the sources in the cache (0 to 1): the copy runs at ``cached_bw`` for that fraction.
    """

    bw_4k: float
    bw_2m: float
    call_ns: float
    cached_bw: float
    residency: float = 0.0

    def __post_init__(self) -> None:
        _check_fields(self, "copy")

    def bandwidth(self, folio_bytes: float) -> float:
        """Bytes per second copying one folio of ``folio_bytes`` (uncached part and cached part combined)."""
        lo, hi = math.log2(4096), math.log2(2 << 20)
        x = min(max(math.log2(max(folio_bytes, 1.0)), lo), hi)
        t = (x - lo) / (hi - lo)
        cold = math.exp(math.log(self.bw_4k) * (1 - t) + math.log(self.bw_2m) * t)
        # Time per byte adds up over the two parts (a harmonic mean of the two bandwidths).
        return 1.0 / ((1 - self.residency) / cold + self.residency / self.cached_bw)

    def folio_ns(self, folio_bytes: float) -> float:
        """Nanoseconds to copy one folio of ``folio_bytes``."""
        return self.call_ns + folio_bytes / self.bandwidth(folio_bytes) * 1e9


@dataclass(frozen=True)
class DmaCosts:
    """A DMA engine and its driver.

    Parameters
    ----------
    channels : int
        Channels a submission is spread over.
    channel_bw, cap_bw : float
        Bytes per second of one channel, and of all channels together (``0``: no cap).
    call_ns : float
        Host work per submission: the channel requests, the scatter-gather table, the IOMMU mapping.
    channel_call_ns : float
        Host work per channel used by a submission (its descriptor list started, its completion armed).
    desc_ns : float
        Host work per folio submitted (its descriptor prepared and submitted; with ``balance``, its entry in
        the plan), serial on the migrating thread.
    desc_hw_ns : float
        The engine's own time per descriptor, on its channel (fetch, completion write).
    completion : {"interrupt", "poll"}
        How the waiter learns the submission finished (:data:`COMPLETIONS`).
    irq_ns : float
        With ``interrupt``: wake-up latency after the last channel's interrupt.
    poll_ns : float
        With ``poll``: the polling period (the waiter sees the end half a period late on average).
    split : {"even", "balance"}
        How folios are spread over channels (:data:`DMA_SPLITS`).
    """

    channels: int
    channel_bw: float
    cap_bw: float
    call_ns: float
    channel_call_ns: float
    desc_ns: float
    desc_hw_ns: float
    completion: str
    irq_ns: float
    poll_ns: float
    split: str

    def __post_init__(self) -> None:
        _check_fields(self, "dma")


@dataclass(frozen=True)
class MtCopy:
    """The multi-threaded CPU copy of a batch (the batch-copy RFC's mtcopy).

    Parameters
    ----------
    threads : int
        Copy threads; ``0``: the migrating thread copies each folio itself (no batch copy).
    thread_bw, cap_bw : float
        Bytes per second of one copy thread, and of all together (``0``: no cap).
    dispatch_ns : float
        Host work per thread per batch: queueing its work and waking it.
    split : {"folio", "part"}
        Each thread whole folios, or each thread a part of every folio (:data:`MT_SPLITS`).
    part_ns : float
        Fixed cost per part a thread copies.
    """

    threads: int
    thread_bw: float
    cap_bw: float
    dispatch_ns: float
    split: str
    part_ns: float = 0.0

    def __post_init__(self) -> None:
        _check_fields(self, "mtcopy")


#: The parameter sets of a model, by the section name ``--set`` uses.
SECTIONS = {"kernel": KernelCosts, "copy": CpuCopy, "dma": DmaCosts, "mtcopy": MtCopy}


@dataclass(frozen=True)
class CostModel:
    """A cost model: what every operation of a migration costs on one machine, with the sources of its values.

    Parameters
    ----------
    name : str
        The label every modelled figure carries (a preset's name, or ``name+changes`` after :meth:`with_set`).
    kernel, copy, dma, mtcopy : KernelCosts, CpuCopy, DmaCosts, MtCopy
        The parameters.
    page_size : int
        Bytes per base page of the modelled machine.
    sources : tuple of str
        Where the values come from, and which published row set which parameter.
    """

    name: str
    kernel: KernelCosts
    copy: CpuCopy
    dma: DmaCosts
    mtcopy: MtCopy
    page_size: int = 4096
    sources: tuple[str, ...] = field(default=(), compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise InvalidArgument(f"a cost model's name must be a non-empty string, got {self.name!r}")
        for section, cls in SECTIONS.items():
            if not isinstance(getattr(self, section), cls):
                raise InvalidArgument(f"cost model {self.name}: {section} must be a {cls.__name__}, got "
                                      f"{type(getattr(self, section)).__name__}")
        _check_int(f"cost model {self.name}: page_size", self.page_size, 64)

    def get(self, name: str) -> Any:
        """The value of the parameter ``section.field`` (e.g. ``"dma.channels"``)."""
        section, key = self._split(name)
        return getattr(getattr(self, section), key)

    def with_set(self, **changes: Any) -> CostModel:
        """A copy with parameters changed, given as ``{"dma.channels": 16}`` keyword pairs via ``**``.

        The copy's name records the changes (``zen3-ptdma[dma.channels=16]``) so its figures are labelled
        with what they were computed under.
        """
        model = self
        for name, value in changes.items():
            section, key = self._split(name)
            current = getattr(model, section)
            model = replace(model, **{section: replace(current, **{key: _coerce(name, value, getattr(current, key))})})
        if changes:
            words = ",".join(f"{k}={_fmt(v)}" for k, v in changes.items())
            model = replace(model, name=f"{self.name}[{words}]")
        return model

    def with_name(self, name: str) -> CostModel:
        """The same parameters under another name."""
        return replace(self, name=name)

    def parameters(self) -> dict[str, Any]:
        """Every parameter as ``{"section.field": value}``."""
        return {f"{s}.{k}": v for s in SECTIONS for k, v in asdict(getattr(self, s)).items()}

    def as_dict(self) -> dict[str, Any]:
        """The model as plain values (for a preset file and for JSON results)."""
        return {"name": self.name, "page_size": self.page_size, "sources": list(self.sources),
                **{s: asdict(getattr(self, s)) for s in SECTIONS}}

    @classmethod
    def from_dict(cls, doc: Any, where: str = "cost model") -> CostModel:
        """A model from :meth:`as_dict`'s form; an unknown or missing parameter is an error naming it."""
        if not isinstance(doc, dict):
            raise InvalidArgument(f"{where} must be a JSON object, got {type(doc).__name__}")
        parts = {}
        for section, kind in SECTIONS.items():
            values = doc.get(section)
            if not isinstance(values, dict):
                raise InvalidArgument(f"{where}: section {section!r} is missing or not an object")
            names = {f.name for f in fields(kind)}
            unknown = sorted(set(values) - names)
            if unknown:
                raise InvalidArgument(f"{where}: unknown parameter {section}.{unknown[0]}; {section} has "
                                      f"{', '.join(sorted(names))}")
            try:
                parts[section] = kind(**values)
            except TypeError as exc:
                raise InvalidArgument(f"{where}: section {section}: {exc}") from None
        return cls(name=doc.get("name", "unnamed"), page_size=doc.get("page_size", 4096),
                   sources=tuple(doc.get("sources", ())), **parts)

    @staticmethod
    def _split(name: str) -> tuple[str, str]:
        section, _, key = str(name).partition(".")
        if section not in SECTIONS or key not in {f.name for f in fields(SECTIONS[section])}:
            allowed = ", ".join(f"{s}.{f.name}" for s, k in SECTIONS.items() for f in fields(k))
            raise InvalidArgument(f"unknown cost model parameter {name!r}; parameters are {allowed}")
        return section, key


def _coerce(name: str, value: Any, current: Any) -> Any:
    """A ``--set`` value (text or number) as the type of the parameter it replaces."""
    if not isinstance(value, str):
        return value
    if isinstance(current, str):
        return value
    try:
        number = float(value)
    except ValueError:
        raise InvalidArgument(f"cost model parameter {name} takes a number, got {value!r}") from None
    if isinstance(current, int) and not isinstance(current, bool):
        if number != int(number):
            raise InvalidArgument(f"cost model parameter {name} must be an integer, got {value!r}")
        return int(number)
    return number


def _fmt(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)
