"""Benchmark machines and the checks every timed repetition passes: pages on the right node, right content.

A fast wrong result is worse than a slow right one, so each repetition is verified after it ran and a
discrepancy raises :class:`VerificationError`, naming the scenario and the first bad page.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from .settings import PAGE_SIZE, BenchSettings

__all__ = ["VerificationError", "bench_machine", "check", "random_bytes", "range_pfns", "verify_no_leak",
           "verify_pages", "verify_result"]


class VerificationError(AssertionError):
    """A timed run produced wrong data or left pages in the wrong place."""


# -- machines ---------------------------------------------------------------------------------

def _node_pages(pages: int) -> int:
    # Room for the working set rounded up to whole 2 MiB pageblocks, plus one spare pageblock, so that order-9
    # destinations always find an aligned free block.
    return (-(-pages // 512) + 1) * 512


@contextmanager
def bench_machine(settings: BenchSettings, pages: int, channels: int, devices: int | None = None,
                  mode: str = "nocopy") -> Iterator[Any]:
    """A machine with room for ``pages`` base pages on every node, closed on exit.

    Parameters
    ----------
    settings : BenchSettings
        Backend and device count of the sweep.
    pages : int
        Base pages of the working set.
    channels : int
        DMA channels.
    devices : int, optional
        Device nodes; by default as many as a migration group's path visits (the sweep's, at most two: the
        device->device leg runs between the first two devices), with the sweep's topology among them.
    mode : {"nocopy", "copy"}
        What the machine migrates in: copy mode under the ``cpu`` baseline on CUDA gets host-mapped device frames
        (:meth:`~dmamig.bench.settings.BenchSettings.machine_device_frames`).
    """
    from ..machine import Machine

    n = _node_pages(pages)
    # Every device node holds room for the working set: a machine of all the sweep's devices (up to 8) would
    # allocate that many times the memory for legs that never reach the devices past the second.
    devices = devices or min(settings.devices, 2)
    m = Machine(host_pages=n, device_pages=n, devices=devices, page_size=PAGE_SIZE, backend=settings.backend,
                channels=channels, topology=settings.machine_topology(devices), dma_poll_us=settings.machine_poll(),
                dma_engine=settings.machine_dma_engine(), device_frames=settings.machine_device_frames(mode))
    try:
        yield m
    finally:
        m.close()


def range_pfns(mm: Any, addr: int, pages: int) -> np.ndarray:
    """The pfn backing each base page of ``[addr, addr + pages * PAGE_SIZE)``, in address order.

    Parameters
    ----------
    mm : AddressSpace
        The address space that maps the range.
    addr : int
        Page-aligned start address.
    pages : int
        Number of base pages.
    """
    pfns = mm.pfns_of(addr, pages * PAGE_SIZE)
    if (pfns < 0).any():
        raise VerificationError(f"range {addr:#x}+{pages} pages is not fully populated")
    return pfns


def random_bytes(nbytes: int, seed: int) -> np.ndarray:
    """``nbytes`` reproducible random bytes (a uint8 array) to write into a working set."""
    # Random bytes: a page copied to the wrong place, or not copied at all, changes its checksum.
    return np.frombuffer(np.random.default_rng(seed).bytes(nbytes), dtype=np.uint8)


def check(cond: bool, what: str, msg: str) -> None:
    """Raise :class:`VerificationError` with ``what: msg`` unless ``cond``."""
    if not cond:
        raise VerificationError(f"{what}: {msg}")


def verify_pages(m: Any, pfns: np.ndarray, node: int, ref: np.ndarray | None, what: str) -> None:
    """Check that every page is on ``node`` and (with ``ref``) that its checksum equals the source page's.

    Parameters
    ----------
    m : Machine
        The machine.
    pfns : numpy.ndarray
        The pages, in the order of ``ref``.
    node : int
        Where every page must be.
    ref : numpy.ndarray or None
        ``m.dma.checksum`` of the source pages, taken before migrating.
    what : str
        Names the run in the error message.

    Raises
    ------
    VerificationError
        On the first discrepancy, with the number of bad pages and the first one.
    """
    nid = m.frames.node_of_pfns(pfns)
    bad = np.flatnonzero(nid != node)
    check(bad.size == 0, what, f"{bad.size} pages are not on node {node} (first: page {bad[:1].tolist()}, "
                                f"on node {nid[bad[:1]].tolist()})")
    if ref is not None:
        sums = np.asarray(m.dma.checksum(pfns))
        bad = np.flatnonzero(sums != ref)
        check(bad.size == 0, what, f"{bad.size} of {pfns.size} pages have wrong content after migration "
                                    f"(first bad page index {bad[:1].tolist()})")


def verify_result(res: Any, pages: int, what: str) -> None:
    """Check that a migration moved all ``pages`` base pages: no failure, every status ``0``.

    Raises
    ------
    VerificationError
        Naming ``what``, the failure count and the first status codes.
    """
    status = np.asarray(res.status)
    bad = np.flatnonzero(status != 0)
    check(res.nr_failed == 0 and bad.size == 0, what,
           f"{res.nr_failed} pages failed to migrate (status {sorted(set(status[bad].tolist()))[:4]})")
    check(res.nr_succeeded == pages, what, f"{res.nr_succeeded} pages migrated, expected {pages}")


def verify_no_leak(m: Any, what: str) -> None:
    """Check that every node of ``m`` has all its frames free again (call it once every address space closed).

    Raises
    ------
    VerificationError
        Naming ``what`` and, per node that leaked, how many frames are still in use.
    """
    leaked = [(n.id, n.total_pages - n.free_pages) for n in m.nodes if n.free_pages != n.total_pages]
    check(not leaked, what, f"frames still in use after every address space closed (node, frames): {leaked}")
