"""The modelled clock: each operation the migration core really performed, charged at a cost model's prices.

The core reports a batch in two halves, in the order they happen, so that a pipelined step's DMA copy overlaps
the next step's unmap on the modelled clock exactly as it did in the run:

- :class:`UnmapCharge`, once the batch is unmapped, flushed and (with an engine) submitted: the folios tried
  (allocation and lock), those unmapped with their mappings (rmap walk, unmap, migration entries), the TLB
  flushes, and the DMA submission (its folios and its coalesced runs);
- :class:`MoveCharge`, once the batch is moved and undone: the DMA wait, the fallback copies, the reference
  freezes, the folios moved (mapping, state, entries, putback and free) with those the CPU copied, and the undone.

The clock keeps two timelines: the migrating thread's and, per channel, the DMA engine's. A submission starts on
each channel when both the thread has submitted it and the channel has finished its earlier work; the wait ends
when the last channel does, plus the completion's latency. A charge is a record of counts (folio sizes as a
histogram), so a run's charges can be replayed under another model or scaled to a larger run
(:func:`replay`).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from .params import CostModel

__all__ = ["OPS", "CallCharge", "Hist", "ModelClock", "ModelledTime", "MoveCharge", "UnmapCharge", "histogram",
           "replay", "scale_charges"]

#: Folio sizes and their counts: ``((base pages per folio, folios), ...)``.
Hist = tuple[tuple[int, int], ...]

#: Where modelled time goes, per operation, in the order the core performs them.
OPS = ("call", "isolate", "alloc", "lock", "rmap_unmap", "entry_install", "tlb_flush", "dma_submit", "dma_wait",
       "copy", "ref_freeze", "mapping", "state", "entry_remove", "putback", "undo")


def histogram(nr: Any) -> Hist:
    """Folio sizes in base pages (an array, one entry per folio) as a :data:`Hist`."""
    arr = np.asarray(nr)
    if arr.size == 0:
        return ()
    lo = int(arr.min())
    if lo == int(arr.max()):
        return ((lo, int(arr.size)),)  # one folio size, the usual batch: no sort
    sizes, counts = np.unique(arr, return_counts=True)
    return tuple(zip(sizes.tolist(), counts.tolist()))


def _folios(h: Hist) -> int:
    return sum(c for _, c in h)


def _pages(h: Hist) -> int:
    return sum(n * c for n, c in h)


def _scaled(h: Hist, k: int) -> Hist:
    return tuple((n, c * k) for n, c in h)


@dataclass(frozen=True)
class CallCharge:
    """The start of a ``migrate_pages()`` call.

    Attributes
    ----------
    folios : int
        Folios the call isolated.
    """

    folios: int

    def scaled(self, k: int) -> CallCharge:
        """The same call over ``k`` times the folios."""
        return CallCharge(self.folios * k)


@dataclass(frozen=True)
class UnmapCharge:
    """The first half of a batch (see the module's description).

    Attributes
    ----------
    tried : int
        Folio attempts over the unmap passes (each allocates a destination and takes the lock).
    unmapped : Hist
        The folios unmapped, by size.
    mappings : int
        Their mappings (one rmap unmap and one migration entry each).
    flushes : int
        TLB flushes (one per batch of the step).
    dma_folios, dma_runs : Hist
        The DMA submission's folios, and its runs once coalesced (empty: no submission).
    """

    tried: int
    unmapped: Hist
    mappings: int
    flushes: int
    dma_folios: Hist = ()
    dma_runs: Hist = ()

    def scaled(self, k: int) -> UnmapCharge:
        """The same batch ``k`` times larger (its per-batch work, the flushes, unchanged)."""
        return replace(self, tried=self.tried * k, unmapped=_scaled(self.unmapped, k), mappings=self.mappings * k,
                       dma_folios=_scaled(self.dma_folios, k), dma_runs=_scaled(self.dma_runs, k))


@dataclass(frozen=True)
class MoveCharge:
    """The second half of a batch (see the module's description).

    Attributes
    ----------
    freezes : int
        Reference freezes: the folios of every move pass.
    moved : Hist
        The folios moved, by size.
    mappings : int
        Their mappings (one migration entry replaced each).
    cpu_copied : Hist
        The folios the CPU copied in the move loop (copy mode).
    fallback_pages : int
        Base pages the CPU copied because their DMA copy failed.
    undone, undone_mappings : int
        Folios undone after the last pass, and their mappings.
    waited : bool
        Whether the batch waited for its own DMA submission.
    """

    freezes: int
    moved: Hist
    mappings: int
    cpu_copied: Hist
    fallback_pages: int = 0
    undone: int = 0
    undone_mappings: int = 0
    waited: bool = False  # the batch waited for its own DMA submission (the oldest one not yet waited for)

    def scaled(self, k: int) -> MoveCharge:
        """The same batch ``k`` times larger."""
        return replace(self, freezes=self.freezes * k, moved=_scaled(self.moved, k), mappings=self.mappings * k,
                       cpu_copied=_scaled(self.cpu_copied, k), fallback_pages=self.fallback_pages * k,
                       undone=self.undone * k, undone_mappings=self.undone_mappings * k)


Charge = CallCharge | UnmapCharge | MoveCharge


@dataclass(frozen=True)
class ModelledTime:
    """What a cost model says a migration took: never a measurement, always labelled with its model.

    Attributes
    ----------
    model : str
        The cost model's name (a preset's, with any changed parameters).
    wall_ns : float
        Modelled time of the whole call on the migrating thread (waits for the DMA engine included).
    cpu_ns : float
        Modelled busy time of the migrating thread (waits excluded; a polled wait counts as busy).
    dma_busy_ns : float
        Modelled busy time of the DMA channels, summed.
    ops_ns : dict
        Modelled time per operation (:data:`OPS`).
    pages : int
        Base pages moved.
    charges : tuple
        The charges the core made, in order (for :func:`replay`).
    """

    model: str
    wall_ns: float
    cpu_ns: float
    dma_busy_ns: float
    ops_ns: dict[str, float]
    pages: int
    charges: tuple[Charge, ...] = field(default=(), repr=False, compare=False)

    def gbps(self, page_size: int = 4096) -> float:
        """Modelled throughput, GB/s (1e9 bytes per second) of pages moved."""
        return self.pages * page_size / self.wall_ns if self.wall_ns > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        """Plain values for JSON. Every key says it is modelled; the model's name is beside them."""
        return {"model": self.model, "modelled_wall_ns": self.wall_ns, "modelled_cpu_ns": self.cpu_ns,
                "modelled_dma_busy_ns": self.dma_busy_ns,
                "modelled_ops_ns": {k: v for k, v in self.ops_ns.items() if v}, "modelled_pages": self.pages}


class ModelClock:
    """A modelled clock for one migration call under ``model`` (see the module's description).

    Parameters
    ----------
    model : CostModel
        The prices.
    """

    def __init__(self, model: CostModel):
        self.model = model
        self.t_cpu = 0.0  # the migrating thread's clock
        self.cpu_busy = 0.0
        self.dma_busy = 0.0
        self.channel_free = [0.0] * model.dma.channels  # when each channel finishes its queued work
        self.pending: deque[float] = deque()  # end times of submitted copies not yet waited for, in order
        self.ops = dict.fromkeys(OPS, 0.0)
        self.pages = 0
        self.charges: list[Charge] = []

    # -- the charges ---------------------------------------------------------------------------------------------
    def charge(self, c: Charge) -> None:
        """Apply one charge (what the core reports, or a replayed one)."""
        self.charges.append(c)
        if isinstance(c, CallCharge):
            k = self.model.kernel
            self._cpu("call", k.call_ns)
            self._cpu("isolate", k.isolate_ns * c.folios)
        elif isinstance(c, UnmapCharge):
            self._unmap(c)
        else:
            self._move(c)

    def _cpu(self, op: str, ns: float) -> None:
        self.t_cpu += ns
        self.cpu_busy += ns
        self.ops[op] += ns

    def _unmap(self, c: UnmapCharge) -> None:
        k = self.model.kernel
        unmapped = _folios(c.unmapped)
        self._cpu("alloc", k.alloc_ns * c.tried + k.alloc_page_ns * _pages(c.unmapped))
        self._cpu("lock", k.lock_ns * c.tried)
        self._cpu("rmap_unmap", k.rmap_ns * unmapped + k.unmap_ns * c.mappings)
        self._cpu("entry_install", k.entry_install_ns * c.mappings)
        self._cpu("tlb_flush", k.flush_ns() * c.flushes)
        if c.dma_folios:
            self._submit(c)

    def _submit(self, c: UnmapCharge) -> None:
        d, ps = self.model.dma, self.model.page_size
        # Per channel: (descriptors, bytes). "even": the RFC's driver gives each channel the same number of
        # folios, one descriptor each; "balance": coalesced runs, balanced by bytes.
        n = d.channels
        if d.split == "even":
            folios = _folios(c.dma_folios)
            used = min(n, folios)
            per = [(desc, pages * ps) for desc, pages in _even_shares(c.dma_folios, used)]
        else:
            runs = _folios(c.dma_runs) or _folios(c.dma_folios)
            pages = _pages(c.dma_folios)
            used = min(n, pages)
            # Long runs are cut so that every channel gets the same bytes; the cuts add at most one descriptor
            # per channel.
            per = [(math.ceil((runs + used - 1) / used), pages * ps / used)] * used if used else []
        self._cpu("dma_submit", d.call_ns + d.channel_call_ns * used + d.desc_ns * _folios(c.dma_folios))
        start = self.t_cpu
        total_bytes = sum(p[1] for p in per)
        end = start
        for ch, (desc, nbytes) in enumerate(per):
            busy = desc * d.desc_hw_ns + nbytes / d.channel_bw * 1e9
            begin = max(start, self.channel_free[ch])
            self.channel_free[ch] = begin + busy
            self.dma_busy += busy
            end = max(end, begin + busy)
        if d.cap_bw > 0:
            # All channels together move no more than the cap: the submission lasts at least its bytes at the cap.
            floor = start + total_bytes / d.cap_bw * 1e9
            if floor > end:
                for ch in range(len(per)):
                    self.channel_free[ch] = max(self.channel_free[ch], floor)
                end = floor
        self.pending.append(end)

    def _move(self, c: MoveCharge) -> None:
        k, d = self.model.kernel, self.model.dma
        if c.waited and self.pending:
            end = self.pending.popleft()
            latency = d.irq_ns if d.completion == "interrupt" else d.poll_ns / 2
            ready = end + latency
            if ready > self.t_cpu:
                wait = ready - self.t_cpu
                self.t_cpu = ready
                self.ops["dma_wait"] += wait
                if d.completion == "poll":
                    self.cpu_busy += wait  # a polling waiter spins
        if c.fallback_pages:
            self._cpu("copy", self._fallback_ns(c))
        self._cpu("ref_freeze", k.freeze_ns * c.freezes)
        if c.cpu_copied:
            self._cpu("copy", self._copy_ns(c.cpu_copied))
        moved = _folios(c.moved)
        self._cpu("mapping", k.mapping_ns * moved)
        self._cpu("state", k.state_ns * moved)
        self._cpu("entry_remove", k.entry_remove_ns * c.mappings)
        self._cpu("putback", k.putback_ns * moved + k.free_page_ns * _pages(c.moved))
        self._cpu("undo", (k.entry_remove_ns + k.lock_ns) * c.undone + k.entry_remove_ns * c.undone_mappings)
        self.pages += _pages(c.moved)

    def _fallback_ns(self, c: MoveCharge) -> float:
        """The migrating thread copies the pages a failed DMA copy hit, at the size of the batch's folios."""
        ps = self.model.page_size
        folio_pages = max(_pages(c.moved) / max(_folios(c.moved), 1), 1.0)
        nfolios = c.fallback_pages / folio_pages
        return nfolios * self.model.copy.folio_ns(folio_pages * ps)

    def _copy_ns(self, h: Hist) -> float:
        """The CPU copy of a batch's folios: the migrating thread's, folio by folio, or the threads' batch copy."""
        ps, cp, mt = self.model.page_size, self.model.copy, self.model.mtcopy
        if mt.threads == 0:
            return sum(c * cp.folio_ns(n * ps) for n, c in h)
        t = mt.threads
        total = _pages(h) * ps
        if mt.split == "folio":
            # Each thread whole folios, handed out evenly by count: the busiest thread has the most bytes.
            longest = max(pages for _, pages in _even_shares(h, min(t, _folios(h)))) * ps
            parts = math.ceil(_folios(h) / t)
        else:
            longest = total / t
            parts = _folios(h)
        busy = longest / mt.thread_bw * 1e9 + parts * mt.part_ns
        if mt.cap_bw > 0:
            busy = max(busy, total / mt.cap_bw * 1e9)
        return mt.dispatch_ns * t + busy

    # -- the result -------------------------------------------------------------------------------------------
    def result(self) -> ModelledTime:
        """The modelled time so far (every submission waited for)."""
        return ModelledTime(self.model.name, self.t_cpu, self.cpu_busy, self.dma_busy, dict(self.ops), self.pages,
                            tuple(self.charges))


def _even_shares(h: Hist, used: int) -> list[tuple[int, float]]:
    """(descriptors, base pages) per channel when folios are dealt out evenly by count, one descriptor each.

    Within each folio size the folios are dealt round robin; the busiest channel gets the rounded-up share.
    """
    if used <= 0:
        return []
    shares = [[0, 0.0] for _ in range(used)]
    start = 0
    for n, c in h:
        base, extra = divmod(c, used)
        for i in range(used):
            j = (start + i) % used
            got = base + (1 if i < extra else 0)
            shares[j][0] += got
            shares[j][1] += got * n
        start = (start + extra) % used
    return [(d, pages) for d, pages in shares]


def replay(charges: Any, model: CostModel) -> ModelledTime:
    """The modelled time of recorded ``charges`` under ``model``: the same run priced by another model."""
    clock = ModelClock(model)
    for c in charges:
        clock.charge(c)
    return clock.result()


def scale_charges(charges: Any, k: int, bigger_batches: bool) -> list[Charge]:
    """The charges of a run ``k`` times larger.

    ``bigger_batches``: each batch holds ``k`` times the folios (a batch that held the whole run, as the RFC's
    1 GiB batch does); otherwise there are ``k`` times as many batches of the same size (the kernel's 512-page
    batches). The call's own cost stays once either way; its isolation scales.
    """
    charges = list(charges)
    calls = [c.scaled(k) for c in charges if isinstance(c, CallCharge)]
    batches = [c for c in charges if not isinstance(c, CallCharge)]
    if bigger_batches:
        return calls + [c.scaled(k) for c in batches]
    return calls + batches * k
