"""``dmamig model``: the batch-offload RFC's benchmark run through the emulator and priced by a cost model.

The RFC moves 1 GiB between two nodes with ``move_pages`` for folio sizes 4K to 2M: the vanilla kernel (its
512-page batches, the CPU copying), DMA offload over 1 to 16 channels and the multi-threaded copy over 1 to 16
threads (both with the RFC's 1 GiB batch). Here each of those runs for real in the emulator on a smaller buffer
(:data:`REAL_BYTES` by default): the migration moves, verifies, and its core charges every operation it performs.
The charges are then scaled to 1 GiB (more batches of 512 pages for the vanilla kernel; one batch that many times
larger for the RFC's) and priced by the model under each channel or thread count. What the emulator does is thus
real; only the time is modelled, and every figure carries the model's name.

:func:`calibrate_here` measures what it can on this machine (the emulator's copy by folio size, its state work
per folio, its DMA submission and channels) and builds a preset from it; :func:`compare_here` then sets that
preset's modelled figures beside the measured ones of fresh runs.
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..cost_model import CostModel, CpuCopy, DmaCosts, KernelCosts, MtCopy, replay, scale_charges
from ..cost_model.clock import MoveCharge, UnmapCharge
from ..cost_model.presets import KERNEL_SHARES, RFC_BYTES
from ..cost_model.published import PublishedRow, rows_for
from ..errors import InvalidArgument
from ..migrate.options import RFC_DMA_OFFLOAD, MigrateOptions

__all__ = ["FOLIOS", "KINDS", "LANES", "REAL_BYTES", "ModelStudy", "calibrate_here", "compare_here", "findings",
           "heat_map", "run_study", "trace_runs"]

#: Folio sizes of the RFC's table: label -> order (base pages per folio = 2**order).
FOLIOS = {"4K": 0, "16K": 2, "64K": 4, "256K": 6, "1M": 8, "2M": 9}
#: Channel and thread counts of the grid.
LANES = (1, 2, 4, 8, 12, 16)
#: The runs: the vanilla kernel (CPU copy, 512-page batches), DMA offload and the multi-threaded copy (both with
#: the RFC's 1 GiB batch).
KINDS = ("vanilla", "dma", "mtcopy")
#: Bytes each real migration moves by default (then scaled to the RFC's 1 GiB).
REAL_BYTES = 32 << 20


def _options(kind: str) -> MigrateOptions:
    return MigrateOptions() if kind == "vanilla" else RFC_DMA_OFFLOAD


def _machine(real_bytes: int, page_size: int, **kw: Any) -> Any:
    from ..machine import Machine  # the study drives the facade; imported here so the module loads light

    pages = real_bytes // page_size
    return Machine(host_pages=pages + 1024, device_pages=1, devices=0, host_nodes=[pages + 1024, pages + 1024],
                   page_size=page_size, backend="cpu", **kw)


def _one_run(m: Any, kind: str, order: int, real_bytes: int, seed: int) -> Any:
    """Migrate ``real_bytes`` of folios of ``order`` from node 0 to node 1 as ``kind`` does; verify the bytes."""
    mm = m.address_space()
    try:
        addr = mm.mmap(real_bytes, order=order)
        data = np.random.default_rng(seed).integers(0, 256, real_bytes, dtype=np.uint8)
        mm.write(addr, data)
        engine = m.dma if kind == "dma" else None
        res = mm.migrate(addr, real_bytes, 1, engine=engine, options=_options(kind))
        if not res.ok or not np.array_equal(mm.read(addr, real_bytes), data) or mm.node_of(addr) != 1:
            raise RuntimeError(f"the {kind} migration of {real_bytes} bytes in order-{order} folios did not verify")
        return res
    finally:
        mm.close()


def trace_runs(real_bytes: int = REAL_BYTES, folios: Sequence[str] = tuple(FOLIOS),
               channels: int = 4, presets: Sequence[str] = ()) -> dict[tuple, Any]:
    """Run the study's migrations for real; their charges per ``(kind, folio)``, scaled to 1 GiB.

    The charges do not depend on the model (they count operations), so one set serves every model and every
    channel count. Published rows of ``presets`` measured on runs of another shape (one call of one THP, say)
    get a real run of that shape, unscaled, under ``(kind, folio, call_bytes)``.
    """
    if real_bytes <= 0 or real_bytes % (2 << 20):
        raise InvalidArgument(f"the real run's size must be a positive multiple of 2 MiB, got {real_bytes}")
    if RFC_BYTES % real_bytes:
        raise InvalidArgument(f"the real run's size must divide 1 GiB, got {real_bytes}")
    k = RFC_BYTES // real_bytes
    out = {}
    m = _machine(real_bytes, 4096, channels=channels, cost_model="zen3-ptdma")
    try:
        for i, folio in enumerate(folios):
            for kind in KINDS:
                res = _one_run(m, kind, FOLIOS[folio], real_bytes, seed=i)
                out[(kind, folio)] = scale_charges(res.modelled.charges, k, bigger_batches=kind != "vanilla")
        for r in (r for p in presets for r in rows_for(p)):
            key = (r.kind, r.folio, r.call_bytes)
            if r.kind in KINDS and r.call_bytes != RFC_BYTES and key not in out:
                out[key] = list(_one_run(m, r.kind, FOLIOS[r.folio], r.call_bytes, seed=0).modelled.charges)
    finally:
        m.close()
    return out


def _priced(model: CostModel, kind: str, lanes: int) -> CostModel:
    """The model as a run of ``kind`` over ``lanes`` channels or threads uses it."""
    if kind == "dma":
        return model.with_set(**{"dma.channels": lanes})
    if kind == "mtcopy":
        return model.with_set(**{"mtcopy.threads": lanes})
    return model.with_set(**{"mtcopy.threads": 0})


def _gbps(model: CostModel, charges: Any) -> float:
    t = replay(charges, model)
    return RFC_BYTES / t.wall_ns if t.wall_ns > 0 else 0.0


@dataclass
class ModelStudy:
    """The study's modelled grid under one model.

    Attributes
    ----------
    model : CostModel
        The model (its name labels every figure).
    real_bytes : int
        Bytes each real migration moved before scaling to 1 GiB.
    grid : dict
        ``(kind, folio, lanes) -> modelled GB/s``; the vanilla kernel has ``lanes`` 0.
    shares : dict
        ``folio -> the copy's modelled share`` of the vanilla kernel's migration.
    """

    model: CostModel
    real_bytes: int
    grid: dict[tuple[str, str, int], float] = field(default_factory=dict)
    shares: dict[str, float] = field(default_factory=dict)
    charges: dict[tuple, Any] = field(default_factory=dict, repr=False)

    def value(self, kind: str, folio: str, lanes: int) -> float | None:
        """The modelled GB/s of one cell, or None when the grid lacks it."""
        return self.grid.get((kind, folio, 0 if kind == "vanilla" else lanes))

    def published(self) -> list[dict[str, Any]]:
        """The preset's published rows with the modelled value beside each, and the error in percent."""
        rows = []
        for r in rows_for(self.model.name.split("[")[0]):
            mod = self._modelled_for(r)
            err = None if mod is None else (mod - r.value) / r.value * 100
            rows.append({"table": r.table, "kind": r.kind, "folio": r.folio, "lanes": r.lanes,
                         "published": r.value, "span": r.span, "calibration": r.calibration, "note": r.note,
                         "model": self.model.name, "modelled": mod, "error_pct": err})
        return rows

    def _modelled_for(self, r: PublishedRow) -> float | None:
        if r.kind in KINDS and r.call_bytes != RFC_BYTES:
            ch = self.charges.get((r.kind, r.folio, r.call_bytes))
            return None if ch is None else r.call_bytes / replay(ch, _priced(self.model, r.kind, r.lanes)).wall_ns
        if r.kind in KINDS and r.folio in FOLIOS:
            return self.value(r.kind, r.folio, r.lanes)
        if r.kind in ("ceiling", "dma-copy"):
            return _engine_alone(self.model.with_set(**{"dma.channels": r.lanes}), r)
        if r.kind == "copy-share":
            return self.copy_share(r.folio)
        return None

    def copy_share(self, folio: str) -> float | None:
        """The copy's modelled share of the vanilla kernel's migration at ``folio``."""
        return self.shares.get(folio)

    def as_dict(self) -> dict[str, Any]:
        """The study as plain values; every figure is under a ``modelled`` key, with the model's name."""
        return {"tool": "dmamig model", "model": self.model.name, "modelled": True,
                "scaled": {"real_bytes": self.real_bytes, "modelled_bytes": RFC_BYTES,
                           "how": "real migrations of real_bytes, charges scaled to 1 GiB"},
                "parameters": self.model.parameters(), "sources": list(self.model.sources),
                "grid": [{"kind": k, "folio": f, "lanes": n,
                          "batch_pages": _options(k).batch_pages, "modelled_gbps": v}
                         for (k, f, n), v in self.grid.items()],
                "modelled_copy_share": self.shares,
                "published": self.published(), "findings": findings(self)}


def run_study(model: CostModel, charges: dict[tuple[str, str], Any], real_bytes: int,
              lanes: Sequence[int] = LANES) -> ModelStudy:
    """Price the study's charges under ``model``: the vanilla kernel, and DMA and mtcopy per lane count."""
    study = ModelStudy(model, real_bytes, charges=charges)
    for key, ch in charges.items():
        if len(key) != 2:
            continue  # a published row's own run
        kind, folio = key
        if kind == "vanilla":
            base = _priced(model, kind, 0)
            t = replay(ch, base)
            study.grid[(kind, folio, 0)] = RFC_BYTES / t.wall_ns
            study.shares[folio] = t.ops_ns["copy"] / t.wall_ns
            continue
        for n in lanes:
            study.grid[(kind, folio, n)] = _gbps(_priced(model, kind, n), ch)
    return study


def _engine_alone(model: CostModel, r: PublishedRow) -> float:
    """A copy of ``r.call_bytes`` with no migration around it. ``contiguous``: one buffer, one descriptor (the
    ceiling's ``cudaMemcpyAsync``); ``4K-contiguous`` and ``4K-random``: ``dma.copy`` of 4K pages, each an entry
    of the submission, coalesced into one run or not at all. The charges are the engine's part of a batch (no
    kernel work)."""
    pages = r.call_bytes // model.page_size
    entries = ((pages, 1),) if r.folio == "contiguous" else ((1, pages),)
    runs = ((1, pages),) if "random" in r.folio else ((pages, 1),)
    t = replay([UnmapCharge(0, (), 0, 0, entries, runs), MoveCharge(0, (), 0, (), waited=True)], model)
    return r.call_bytes / t.wall_ns


def findings(study: ModelStudy) -> dict[str, Any]:
    """The RFC's qualitative findings, checked on the modelled grid (none of them is fitted).

    - ``one_channel_loses_below_2m``: one DMA channel is slower than the vanilla kernel at every size below 2M;
    - ``first_channels_beating_cpu_at_4k``: the fewest channels whose offload passes the vanilla kernel at 4K
      (the finding holds when that is "several", 4 or more);
    - ``gain_8_to_16``: per folio size, the throughput at 16 channels over that at 8 (returns diminish when it is
      well under 2; the finding holds when every size gains less than 1.5x).
    """
    below = [f for f in FOLIOS if f != "2M" and study.value("dma", f, 1) is not None]
    loses = {f: study.value("dma", f, 1) < study.value("vanilla", f, 0) for f in below}
    first = next((n for n in LANES if (study.value("dma", "4K", n) or 0) > (study.value("vanilla", "4K", 0) or 0)),
                 None)
    gain = {f: study.value("dma", f, 16) / study.value("dma", f, 8) for f in FOLIOS
            if study.value("dma", f, 8) and study.value("dma", f, 16)}
    return {"model": study.model.name,
            "one_channel_loses_below_2m": {"holds": all(loses.values()) if loses else None, "per_folio": loses},
            "first_channels_beating_cpu_at_4k": {"channels": first, "holds": first is not None and first >= 4},
            "gain_8_to_16": {"per_folio": gain, "holds": all(g < 1.5 for g in gain.values()) if gain else None}}


def heat_map(model: CostModel, charges: dict[tuple[str, str], Any], folio: str, desc_ns: Sequence[float],
             channel_bw: Sequence[float]) -> np.ndarray:
    """No-copy ÷ copy throughput (DMA offload over the vanilla kernel) at ``folio`` over a grid of the engine's
    per-descriptor cost (rows) and channel bandwidth (columns), at the model's channel count."""
    base = replay(charges[("vanilla", folio)], _priced(model, "vanilla", 0)).wall_ns
    out = np.empty((len(desc_ns), len(channel_bw)))
    for i, d in enumerate(desc_ns):
        for j, bw in enumerate(channel_bw):
            m = model.with_set(**{"dma.desc_hw_ns": float(d), "dma.channel_bw": float(bw)})
            out[i, j] = base / replay(charges[("dma", folio)], m).wall_ns
    return out


# -- this machine ----------------------------------------------------------------------------------------------
def _median_runs(m: Any, kind: str, order: int, real_bytes: int, repeat: int) -> list[Any]:
    return [_one_run(m, kind, order, real_bytes, seed=r) for r in range(repeat)]


def _per_folio(res: Any, phases: Sequence[str]) -> float:
    return sum(res.phase_ns[p] for p in phases)


def calibrate_here(real_bytes: int = 32 << 20, repeat: int = 5, channels: int = 4,
                   name: str = "this-machine") -> tuple[CostModel, dict[str, Any]]:
    """Measure this machine's emulator and build a preset from it (returned with what was measured).

    Measured, on a machine without a cost model (so that no bookkeeping of a model is in the times): the copy
    per folio at 4K and 2M (copy mode's ``copy`` phase, plus the time its state phases take beyond no-copy's),
    the state work per folio (every phase of the no-copy run but the submission and the wait, split by :data:`~dmamig.cost_model.presets.KERNEL_SHARES`; the extra per base page from 2M), the time
    per batch outside the phases, the DMA submission per batch (a call and a cost per folio, from 4K and 2M) and
    the channels' throughput (the DMA wait, both sizes). The emulator's TLB flush is a counter: it costs nothing
    here, and the time per batch outside the phases is charged with it, the one operation per batch.
    """
    m = _machine(real_bytes, 4096, channels=channels)
    try:
        copy = {o: _median_runs(m, "vanilla", o, real_bytes, repeat) for o in (0, 9)}
        nocopy = {o: _median_runs(m, "dma", o, real_bytes, repeat) for o in (0, 9)}
    finally:
        m.close()

    def med(runs: list[Any], fn: Any) -> float:
        return statistics.median(fn(r) for r in runs)

    folios = {0: real_bytes // 4096, 9: real_bytes // (2 << 20)}
    batches = {0: real_bytes // (512 * 4096), 9: folios[9]}
    state_phases = ("isolate", "unmap", "move", "undo", "putback")
    # The state work is taken from the no-copy runs. In copy mode the same work runs slower (the copy streams
    # the data through the caches the page state lives in); that difference is charged to the copy, whose cost
    # it is.
    state = {o: med(nocopy[o], lambda r: _per_folio(r, state_phases)) / folios[o] for o in (0, 9)}
    state_copy = {o: med(copy[o], lambda r: _per_folio(r, state_phases)) / folios[o] for o in (0, 9)}
    copy_ns = {o: med(copy[o], lambda r: r.phase_ns["copy"]) / folios[o] + max(0.0, state_copy[o] - state[o])
               for o in (0, 9)}
    outside = med(copy[0] + copy[9], lambda r: (r.wall_ns - sum(r.phase_ns.values())) / batches[0])
    per_page = max(0.0, (state[9] - state[0]) / 511)
    per_folio = max(state[0] - per_page, 1.0)
    kernel = KernelCosts(call_ns=0.0, alloc_page_ns=per_page / 2, free_page_ns=per_page / 2, tlb_flush_ns=outside,
                         ipi_ns=0.0, cpus=os.cpu_count() or 1, **{k: s * per_folio for k, s in KERNEL_SHARES.items()})
    cpu = CpuCopy(bw_4k=4096 / copy_ns[0] * 1e9, bw_2m=(2 << 20) / copy_ns[9] * 1e9, call_ns=0.0,
                  cached_bw=4096 / copy_ns[0] * 1e9)
    # The DMA submission per batch of 512 pages: 512 folios at 4K, one at 2M.
    submit = {o: med(nocopy[o], lambda r: r.phase_ns["submit"]) / batches[o] for o in (0, 9)}
    desc_ns = max(0.0, (submit[0] - submit[9]) / 511)
    call_ns = max(0.0, submit[9] - desc_ns)
    wait = med(nocopy[0] + nocopy[9], lambda r: r.phase_ns["dma_wait"] / batches[0])
    cap = 512 * 4096 / max(wait, 1.0) * 1e9
    lanes = min(channels, os.cpu_count() or 1)
    dma = DmaCosts(channels=channels, channel_bw=cap / lanes, cap_bw=cap, call_ns=call_ns, channel_call_ns=0.0,
                   desc_ns=desc_ns, desc_hw_ns=0.0, completion="poll", irq_ns=0.0, poll_ns=0.0, split="balance")
    mt = MtCopy(threads=0, thread_bw=cpu.bw_2m, cap_bw=0.0, dispatch_ns=0.0, split="folio")
    sources = (f"measured on this machine by dmamig model --calibrate: {real_bytes >> 20} MiB migrations between "
               f"two host nodes, median of {repeat}, CPU backend, {channels} DMA channels, {os.cpu_count()} CPUs",
               "copy.bw_4k, copy.bw_2m: copy mode's copy phase per folio, plus what copy mode's state phases take "
               "beyond no-copy's (the copy's damage to the caches)",
               "kernel.*: no-copy's state phases per folio (split by KERNEL_SHARES); the per-batch time outside "
               "the phases as kernel.tlb_flush_ns (the emulator's flush itself is a counter)",
               "dma.call_ns, dma.desc_ns: the submit phase per batch at 4K and 2M; dma.cap_bw: a batch's 2 MiB "
               "over the median DMA wait (4K and 2M); dma.desc_hw_ns 0 (the runs coalesce: one per batch)")
    model = CostModel(name=name, kernel=kernel, copy=cpu, dma=dma, mtcopy=mt, sources=sources)
    measured = {"copy_ns_per_folio": copy_ns, "state_ns_per_folio": state, "state_ns_per_folio_copy_mode": state_copy,
                "outside_ns_per_batch": outside,
                "submit_ns_per_batch": submit, "dma_wait_ns_per_batch": wait}
    return model, measured


def compare_here(model: CostModel, real_bytes: int = 32 << 20, repeat: int = 3,
                 channels: int = 4) -> list[dict[str, Any]]:
    """Fresh faithful runs on this machine (copy and no-copy, 4K and 2M): measured time (on a machine without a
    cost model) beside ``model``'s time for the charges of the same run on a machine with it. Measured and
    modelled stay in their own, labelled fields."""
    rows = []
    plain = _machine(real_bytes, 4096, channels=channels)
    priced = _machine(real_bytes, 4096, channels=channels, cost_model=model)
    try:
        for folio in ("4K", "2M"):
            for kind, mode in (("vanilla", "copy"), ("dma", "no-copy")):
                measured = _median_runs(plain, kind, FOLIOS[folio], real_bytes, repeat)
                wall = statistics.median(r.wall_ns for r in measured)
                t = _one_run(priced, kind, FOLIOS[folio], real_bytes, seed=0).modelled
                rows.append({"folio": folio, "mode": mode, "batch_pages": _options(kind).batch_pages,
                             "measured_gbps": real_bytes / wall, "model": model.name,
                             "modelled_gbps": real_bytes / t.wall_ns,
                             "modelled_over_measured_gbps": wall / t.wall_ns, "error_pct": (wall / t.wall_ns - 1) * 100,
                             "modelled_ops_ns": _top_ops(t.ops_ns)})
    finally:
        plain.close()
        priced.close()
    return rows


def _top_ops(ops: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in sorted(ops.items(), key=lambda kv: -kv[1]) if v}



