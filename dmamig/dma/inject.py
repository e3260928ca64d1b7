"""Fault injection on DMA submissions: the ``dma_submit`` shortcut, which fault a channel share suffers, and
the emulation of faults on channels that cannot fail inside their own worker.

The engine consults these only while its fault points are armed, so an unarmed run never enters this module.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ..errors import DmaError
from ..fault_injection import FaultAttr, FaultPoints
from .channel import ChannelWork, Completion
from .fence import FailedCompletion, FaultedCompletion

__all__ = ["add_submit_errors", "emulate_fault", "share_fault"]


def add_submit_errors(faults: FaultPoints, n: int) -> None:
    """Make the next ``n`` submissions fail on top of those still pending; ``0`` cancels them (the caller
    checked ``n`` and holds the engine lock). A probabilistic ``dma_submit`` setting is replaced."""
    attr = faults.get("dma_submit")
    pending = attr.times if (attr is not None and attr.probability == 1.0 and attr.interval == 1
                             and attr.space == 0 and attr.times > 0) else 0
    if n == 0:
        faults.clear("dma_submit")
    else:
        faults.set("dma_submit", FaultAttr(probability=1.0, times=pending + int(n), seed=0))


def share_fault(faults: FaultPoints, work: list[ChannelWork], page_size: int) -> str | None:
    """Which injected fault (if any) a channel share suffers: decided here, on the submitting thread,
    so that a seeded run draws the same faults whatever the channel timing."""
    size = int(sum(int(w.npages.sum()) for w in work)) * page_size
    for point, fault in (("channel_crash", "crash"), ("dma_copy", "copy"), ("dma_complete", "complete")):
        if faults.should_fail(point, size):
            return fault
    return None


def emulate_fault(ch: Any, work: list[ChannelWork], fault: str, seq: int) -> Completion:
    """Submit ``work`` with an injected ``fault`` to a channel whose ``injects_faults`` is false."""
    # A channel that cannot fail inside its own worker (a CUDA stream): copy about half of the share for
    # a mid-copy fault or a crash, all of it for a completion fault, and report the error on completion.
    if fault != "complete":
        work = [dataclasses.replace(w, src_start=w.src_start[:k], dst_start=w.dst_start[:k],
                                    npages=w.npages[:k])
                for w in work if (k := w.npages.size // 2) > 0]
    error = DmaError(f"injected {fault} fault on DMA channel {ch.index} (submission #{seq})")
    return FaultedCompletion(ch.submit(work) if work else FailedCompletion(error), error)
