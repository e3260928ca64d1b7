"""Counters of the DMA engine: :class:`DmaStats`, and how the channels' own counters are folded into it.

The engine counts what it submits; each channel counts what it copies (busy seconds, calls, routes, restarts).
A reset cannot zero a channel's counters, so the engine keeps a *baseline* per channel (its counters at the
last reset) and a snapshot reports each channel's counters minus its baseline.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .channel import CHANNEL_COUNTERS

__all__ = ["Baseline", "DmaStats", "baseline_of", "with_channels", "zero_baseline"]


@dataclass
class DmaStats:
    """Counters of a :class:`~dmamig.dma.engine.DmaEngine` since it was created or last reset.

    Attributes
    ----------
    bytes : int
        Bytes submitted for copying (including submissions that then failed).
    pages : int
        Base pages submitted.
    submissions : int
        Non-empty :meth:`~dmamig.dma.engine.DmaEngine.copy` calls.
    runs : int
        Runs after coalescing and splitting.
    kernel_launches : int
        Gather/scatter kernel launches (one per segment of short runs).
    memcpy_calls : int
        Single large copies issued (one per long run).
    batch_calls : int
        Batched copy calls issued (cuMemcpyBatchAsync).
    peer_runs, peer_bytes : int
        Device-to-device runs and bytes copied directly between devices with peer access.
    staged_runs, staged_bytes : int
        Device-to-device runs and bytes staged through host memory (devices without peer access): each byte
        is copied twice, into a channel's bounce buffer and out of it. Counted by the channels as they copy.
    busy_seconds : list of float
        Per channel: seconds spent copying (completed work); the channels of every device, in the order the
        devices were first used.
    busy_by_device : dict of int to float
        The same seconds summed per device whose channels ran them.
    errors : int
        Submissions that failed (injected or real).
    channel_restarts : int
        Channel workers found dead and started again.
    """

    bytes: int = 0
    pages: int = 0
    submissions: int = 0
    runs: int = 0
    kernel_launches: int = 0
    memcpy_calls: int = 0
    batch_calls: int = 0
    peer_runs: int = 0
    peer_bytes: int = 0
    staged_runs: int = 0
    staged_bytes: int = 0
    busy_seconds: list[float] = field(default_factory=list)
    busy_by_device: dict[int, float] = field(default_factory=dict)
    errors: int = 0
    channel_restarts: int = 0


#: A channel's counters at the engine's last reset: ``(busy seconds, CHANNEL_COUNTERS, restarts)``.
Baseline = tuple[float, dict[str, int], int]


def zero_baseline() -> Baseline:
    """The baseline of a channel opened after the last reset: it counts from zero."""
    return (0.0, dict.fromkeys(CHANNEL_COUNTERS, 0), 0)


def baseline_of(ch: Any) -> Baseline:
    """``ch``'s counters now, the baseline a reset takes."""
    return (ch.busy_seconds, dict(ch.counters), getattr(ch, "restarts", 0))


def with_channels(s: DmaStats, lanes: list[tuple[int, list[Any]]], base: dict[int, Baseline]) -> DmaStats:
    """``s`` (the engine's own counters, empty per-channel fields) plus each channel's counters since its
    baseline; ``lanes`` lists ``(device, channels)`` in the order the devices were first used."""
    for dev, lane in lanes:
        total = 0.0
        for ch in lane:
            busy0, c0, r0 = base[id(ch)]
            counters = ch.counters
            for key in CHANNEL_COUNTERS:
                setattr(s, key, getattr(s, key) + counters.get(key, 0) - c0.get(key, 0))
            busy = ch.busy_seconds - busy0
            s.busy_seconds.append(busy)
            total += busy
            s.channel_restarts += getattr(ch, "restarts", 0) - r0
        s.busy_by_device[dev] = total
    return s
