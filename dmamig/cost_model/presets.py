"""The presets: ``zen3-ptdma``, ``e5-ioat`` and ``h200-ce``, each derived in code from its published rows.

Each builder below states which row sets which parameter, and which values are assumptions that no available row
sets (named *assumed*). The arithmetic is the calibration: change a row in :mod:`.published` and the preset
follows. A preset is also a JSON file (:func:`load_model` reads one, :meth:`CostModel.as_dict` writes one), which
is how ``dmamig model --calibrate`` stores a preset measured on this machine.

The kernel's work per operation is one breakdown (:data:`KERNEL_SHARES`) of the per-page non-copy cost, scaled
per preset: the published rows give the total of a 4K migration and the copy's share of it, not each operation.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InvalidArgument
from .params import CostModel, CpuCopy, DmaCosts, KernelCosts, MtCopy
from .published import PublishedRow, rows_for

__all__ = ["KERNEL_SHARES", "PRESETS", "RFC_BYTES", "load_model", "preset"]

#: The RFC's benchmark moves 1 GiB (``move_pages`` between two nodes).
RFC_BYTES = 1 << 30
_K4, _M2 = 4096, 2 << 20
_N4 = RFC_BYTES // _K4  # base pages in the RFC's run
_N2 = RFC_BYTES // _M2  # 2 MiB folios in the RFC's run

#: Assumed split of the kernel's per-folio work of a 4K migration over its operations (fractions; the rows give
#: only the total). Per mapping: rmap's unmap, the entry's install and removal (one mapping in these runs).
KERNEL_SHARES = {"isolate_ns": 0.18, "alloc_ns": 0.14, "lock_ns": 0.03, "rmap_ns": 0.08, "unmap_ns": 0.06,
                 "entry_install_ns": 0.06, "freeze_ns": 0.04, "mapping_ns": 0.06, "state_ns": 0.08,
                 "entry_remove_ns": 0.13, "putback_ns": 0.14}
#: Assumed per-base-page cost of a large folio's struct pages at allocation and at free (ns).
_PAGE_NS = 2.0


def _row(preset_name: str, kind: str, folio: str, lanes: int) -> PublishedRow:
    for r in rows_for(preset_name, calibration=True):
        if (r.kind, r.folio, r.lanes) == (kind, folio, lanes):
            return r
    raise KeyError(f"{preset_name}: no calibration row {kind} {folio} x{lanes}")


def _gbps_ns(nbytes: float, gbps: float) -> float:
    """Nanoseconds to move ``nbytes`` at ``gbps`` GB/s."""
    return nbytes / gbps


def _kernel(per_folio_ns: float, *, call_ns: float, tlb_flush_ns: float, ipi_ns: float, cpus: int) -> KernelCosts:
    """Kernel costs whose per-folio operations add up to ``per_folio_ns`` in :data:`KERNEL_SHARES`' shares."""
    return KernelCosts(call_ns=call_ns, alloc_page_ns=_PAGE_NS, free_page_ns=_PAGE_NS, tlb_flush_ns=tlb_flush_ns,
                       ipi_ns=ipi_ns, cpus=cpus, **{k: s * per_folio_ns for k, s in KERNEL_SHARES.items()})


def _folio_work(k: KernelCosts, pages: int) -> float:
    """The kernel's work for one folio of ``pages`` base pages mapped once (no flush, no call)."""
    return (k.isolate_ns + k.alloc_ns + k.lock_ns + k.rmap_ns + k.unmap_ns + k.entry_install_ns + k.freeze_ns
            + k.mapping_ns + k.state_ns + k.entry_remove_ns + k.putback_ns
            + (k.alloc_page_ns + k.free_page_ns) * pages)


def zen3_ptdma() -> CostModel:
    """The AMD RFC's machine: AMD Zen 3 EPYC, two nodes, PTDMA channels (the dcbm driver)."""
    name = "zen3-ptdma"
    share = _row(name, "copy-share", "4K", 0).value
    # Assumed: a syscall's own cost, the local flush and one IPI (the benchmark's one thread runs on one CPU, so a
    # flush reaches one other CPU at most), the copy's fixed cost per folio.
    call_ns, flush_ns, ipi_ns, cpus, copy_call_ns = 2000.0, 500.0, 1500.0, 2, 20.0
    # V3 1a 4K: the time per page of the vanilla kernel; V1: the copy's share of it.
    t4 = _gbps_ns(_K4, _row(name, "vanilla", "4K", 0).value)
    copy4 = t4 * share
    flush = flush_ns + ipi_ns * (cpus - 1)
    per_folio = t4 - copy4 - flush / 512 - call_ns / _N4 - 2 * _PAGE_NS
    kernel = _kernel(per_folio, call_ns=call_ns, tlb_flush_ns=flush_ns, ipi_ns=ipi_ns, cpus=cpus)
    bw4 = _K4 / (copy4 - copy_call_ns) * 1e9
    # V3 1a 2M: one 2 MiB folio per 512-page batch; what the kernel's work and the flush leave is the copy.
    t2 = _gbps_ns(_M2, _row(name, "vanilla", "2M", 0).value)
    copy2 = t2 - _folio_work(kernel, 512) - flush - call_ns / _N2
    bw2 = _M2 / (copy2 - copy_call_ns) * 1e9
    copy = CpuCopy(bw_4k=bw4, bw_2m=bw2, call_ns=copy_call_ns, cached_bw=2 * bw4)
    # DMA, one 1 GiB batch: the thread does the kernel's work for every folio, submits, waits, moves.
    # Assumed: the host's costs per submission, per channel and per descriptor, and the interrupt's wake-up.
    dcall, dchan, ddesc, irq = 20_000.0, 5_000.0, 50.0, 10_000.0
    cpu4 = _N4 * _folio_work(kernel, 1) + flush + call_ns + dcall + dchan + ddesc * _N4
    # V3 1c 4K, 1 channel: the engine's time per 4K descriptor.
    per4 = (_gbps_ns(RFC_BYTES, _row(name, "dma", "4K", 1).value) - cpu4 - irq) / _N4
    # V3 1c 2M, 16 channels: the engine's time per 2 MiB descriptor (32 per channel).
    cpu2 = _N2 * _folio_work(kernel, 512) + flush + call_ns + dcall + 16 * dchan + ddesc * _N2
    per2 = (_gbps_ns(RFC_BYTES, _row(name, "dma", "2M", 16).value) - cpu2 - irq) / (_N2 / 16)
    # Two sizes, two unknowns: the per-descriptor cost and the channel's bandwidth.
    chan_bw = (_M2 - _K4) / (per2 - per4) * 1e9
    desc_hw = per4 - _K4 / chan_bw * 1e9
    dma = DmaCosts(channels=16, channel_bw=chan_bw, cap_bw=0.0, call_ns=dcall, channel_call_ns=dchan, desc_ns=ddesc,
                   desc_hw_ns=desc_hw, completion="interrupt", irq_ns=irq, poll_ns=1000.0, split="even")
    # V3 1b 2M, 16 threads: assumed, a thread copies as the vanilla kernel's one does (no 1-thread row in the
    # reference) and a thread costs 5 us to dispatch; what is left of the row's time is the copy at the cap.
    dispatch = 5000.0
    t_mt = _gbps_ns(RFC_BYTES, _row(name, "mtcopy", "2M", 16).value)
    copy_mt = t_mt - _N2 * _folio_work(kernel, 512) - flush - call_ns - 16 * dispatch
    threads_alone = (_N2 / 16) * (_M2 / bw2 * 1e9)
    cap = RFC_BYTES / copy_mt * 1e9 if copy_mt > threads_alone else 0.0
    mt = MtCopy(threads=0, thread_bw=bw2, cap_bw=cap, dispatch_ns=dispatch, split="folio")
    sources = (
        "AMD batch-copy / DMA-offload RFC (Shivank Garg; AMD Zen 3 EPYC, PTDMA; move_pages of 1 GB between two "
        "nodes), as kept in reference/linux-migration.md and in the issue that asked for this model",
        "V3 1a 4K (3.7 GB/s) and V1 (3700 cycles per page of migrate_pages, 800 of folio_copy): kernel work per "
        "folio (split by KERNEL_SHARES, assumed) and copy.bw_4k",
        "V3 1a 2M (10.85 GB/s): copy.bw_2m",
        "V3 1c 4K x1 (1.19 GB/s) and 2M x16 (63.7 GB/s): dma.desc_hw_ns and dma.channel_bw",
        "V3 1b 2M x16 (36.65 GB/s): mtcopy.cap_bw (mtcopy.thread_bw assumed = copy.bw_2m)",
        "assumed (no row sets them): kernel.call_ns, tlb_flush_ns, ipi_ns, cpus, alloc_page_ns, free_page_ns; "
        "copy.call_ns, cached_bw; dma.call_ns, channel_call_ns, desc_ns, irq_ns, cap_bw (none); "
        "mtcopy.dispatch_ns",
    )
    return CostModel(name=name, kernel=kernel, copy=copy, dma=dma, mtcopy=mt, sources=sources)


def e5_ioat() -> CostModel:
    """Zi Yan's machine (2019 RFC): Xeon E5-2650 v3, two sockets, I/OAT DMA."""
    name = "e5-ioat"
    call_ns, flush_ns, ipi_ns, cpus, copy_call_ns = 2000.0, 500.0, 2000.0, 2, 20.0
    flush = flush_ns + ipi_ns * (cpus - 1)
    base = zen3_ptdma().kernel
    w1, w512 = _folio_work(base, 1), _folio_work(base, 512)
    # Assumed: the kernel's operations cost a common multiple s of zen3-ptdma's, and the copy runs at one
    # bandwidth at 4K and 2M (no row sets their ratio on this machine). The two vanilla rows set s and it.
    t4 = _gbps_ns(512 * _K4, _row(name, "vanilla", "4K", 0).value)  # one call of 512 base pages
    t2 = _gbps_ns(_M2, _row(name, "vanilla", "2M", 0).value)  # one call of one THP
    # t4 = call + flush + 512 * (s*w1 + copy_call) + 512*4096 * x;  t2 = call + flush + s*w512 + copy_call + 2M * x
    a = np.array([[512 * w1, 512 * _K4], [w512, _M2]])
    b = np.array([t4 - call_ns - flush - 512 * copy_call_ns, t2 - call_ns - flush - copy_call_ns])
    s, x = (float(v) for v in np.linalg.solve(a, b))
    kernel = _kernel(s * (w1 - 2 * _PAGE_NS), call_ns=call_ns, tlb_flush_ns=flush_ns, ipi_ns=ipi_ns, cpus=cpus)
    bw = 1e9 / x
    copy = CpuCopy(bw_4k=bw, bw_2m=bw, call_ns=copy_call_ns, cached_bw=2 * bw)
    thp = call_ns + flush + _folio_work(kernel, 512)
    # 16 copy threads on one THP, each a part: assumed a thread copies at the kernel's bandwidth and costs 5 us
    # to dispatch; the row sets the cap.
    dispatch = 5000.0
    copy_mt = _gbps_ns(_M2, _row(name, "mtcopy", "2M", 16).value) - thp - 16 * dispatch
    cap = _M2 / copy_mt * 1e9 if copy_mt > _M2 / 16 / bw * 1e9 else 0.0
    mt = MtCopy(threads=0, thread_bw=bw, cap_bw=cap, dispatch_ns=dispatch, split="part")
    # 16 I/OAT channels on one THP, its bytes balanced over them: assumed host costs and a 1 us descriptor; the
    # row sets the channel's bandwidth.
    dcall, dchan, ddesc, desc_hw, irq = 20_000.0, 2_000.0, 100.0, 1000.0, 10_000.0
    host = thp + dcall + 16 * dchan + ddesc + irq
    per_chan = _gbps_ns(_M2, _row(name, "dma", "2M", 16).value) - host - desc_hw
    dma = DmaCosts(channels=16, channel_bw=(_M2 / 16) / per_chan * 1e9, cap_bw=0.0, call_ns=dcall,
                   channel_call_ns=dchan, desc_ns=ddesc, desc_hw_ns=desc_hw, completion="interrupt", irq_ns=irq,
                   poll_ns=1000.0, split="balance")
    sources = (
        "Zi Yan, 2019 RFC on accelerating page migration (Xeon E5-2650 v3, I/OAT), as kept in "
        "reference/linux-migration.md",
        "migrate_pages of 512 base pages (0.85 GB/s) and of one THP (2.39 GB/s): the kernel's costs, as a "
        "multiple of zen3-ptdma's, and copy.bw_4k = copy.bw_2m (their equality assumed)",
        "one THP with 16 threads (7.65 GB/s, middle of 7.4-7.9): mtcopy.cap_bw",
        "one THP over 16 I/OAT channels (4.32 GB/s): dma.channel_bw",
        "assumed (no row sets them): kernel.call_ns, tlb_flush_ns, ipi_ns, cpus; the kernel's split over "
        "operations (KERNEL_SHARES); dma.call_ns, channel_call_ns, desc_ns, desc_hw_ns, irq_ns; mtcopy.dispatch_ns",
        "the kernel of 2019 flushed the TLB per folio; the model charges the flushes the emulator counts (one per "
        "batch, as since 6.3)",
    )
    return CostModel(name=name, kernel=kernel, copy=copy, dma=dma, mtcopy=mt, sources=sources)


def h200_ce() -> CostModel:
    """A GPU copy engine (NVIDIA H200, host to device), from this project's own H200 run."""
    name = "h200-ce"
    kernel = zen3_ptdma().kernel
    ceiling = _row(name, "ceiling", "contiguous", 4).value
    rand4 = _row(name, "dma-copy", "4K-random", 4).value
    # The emulator's submission on that host, per 512-page batch: 114 us at 2M with one channel (one run) is
    # the call; 279 us at 4K with four channels against 167 us with one, the cost per channel.
    call_ns, chan_ns = 114_000.0, (279_000.0 - 167_000.0) / 3
    # dma.copy of random 4K pages (1 GiB) over 4 channels: the copy engines run at the link's cap (one engine can
    # fill the link: channel_bw = the ceiling; their own cost per descriptor assumed hidden, 0); what the row's
    # time leaves per page is the host's work per descriptor. (The 4K batch's submit, 167 us for 512 pages,
    # would give 104 ns per descriptor: more than this row leaves.)
    desc_hw = 0.0
    desc_ns = _K4 / rand4 - _K4 / ceiling - (call_ns + 4 * chan_ns) / _N4
    dma = DmaCosts(channels=4, channel_bw=ceiling * 1e9, cap_bw=ceiling * 1e9, call_ns=call_ns,
                   channel_call_ns=chan_ns, desc_ns=desc_ns, desc_hw_ns=desc_hw, completion="poll", irq_ns=10_000.0,
                   poll_ns=1000.0, split="balance")
    # The copy mode on a GPU is the sync-dma baseline: one cudaMemcpyAsync per folio (about 2.7 us per 4 KiB
    # folio in all: 1404 us per 512-folio batch; 98 us for a 2 MiB batch's copy).
    copy = CpuCopy(bw_4k=22e9, bw_2m=22e9, call_ns=2556.0, cached_bw=22e9)
    mt = MtCopy(threads=0, thread_bw=22e9, cap_bw=ceiling * 1e9, dispatch_ns=5000.0, split="folio")
    sources = (
        "this project's H200 run, benchmarks/results/cuda-h200-2026-11-25/README.md (host to device)",
        "pinned cudaMemcpyAsync ceiling (55.5 GB/s): dma.channel_bw and dma.cap_bw",
        "dma.copy of random 4K pages, 4 channels (30.72 GB/s): dma.desc_ns (dma.desc_hw_ns assumed 0)",
        "per 512-page batch: submit 114 us (2M, 1 channel), 167 us (4K, 1 channel), 279 us (4K, 4 channels): "
        "dma.call_ns, dma.channel_call_ns (the emulator's submission on that host)",
        "copy 4K's CPU copy 1404 us per 512 folios, copy 2M's 98 us: copy.call_ns and copy.bw_* (the sync-dma "
        "baseline, one runtime call per folio)",
        "kernel costs: zen3-ptdma's (the H200 run measured the emulator's state work, not a kernel's)",
    )
    return CostModel(name=name, kernel=kernel, copy=copy, dma=dma, mtcopy=mt, sources=sources)


#: The presets by name.
PRESETS = {"zen3-ptdma": zen3_ptdma, "e5-ioat": e5_ioat, "h200-ce": h200_ce}


def preset(name: str) -> CostModel:
    """The preset called ``name`` (:data:`PRESETS`)."""
    if name not in PRESETS:
        raise InvalidArgument(f"unknown cost model preset {name!r}; presets are {', '.join(PRESETS)} (or a preset "
                              f"file written by dmamig model --calibrate)")
    return PRESETS[name]()


def load_model(spec: Any) -> CostModel:
    """A cost model from a :class:`CostModel`, a preset's name, or the path of a preset JSON file."""
    if isinstance(spec, CostModel):
        return spec
    if isinstance(spec, str) and spec in PRESETS:
        return preset(spec)
    if isinstance(spec, (str, Path)):
        path = Path(spec)
        if not path.is_file():
            raise InvalidArgument(f"cost model {str(spec)!r} is neither a preset ({', '.join(PRESETS)}) nor a "
                                  f"preset file")
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise InvalidArgument(f"cost model file {path}: not readable JSON ({exc})") from None
        return CostModel.from_dict(doc, where=f"cost model file {path}")
    raise InvalidArgument(f"cost_model must be a CostModel, a preset name ({', '.join(PRESETS)}) or a preset "
                          f"file path, got {type(spec).__name__}")
