"""Published throughput figures the presets are calibrated on, and those they are only compared with.

Every figure carries its source and whether it is a calibration *input* (a preset's parameter is set from it)
or a *check* (a prediction is compared with it; nothing is fitted to it). Figures are GB/s (1e9 bytes per
second) unless the row says otherwise.

Sources, as the project's reference notes keep them (``reference/linux-migration.md``, "Published throughput"):

- the AMD batch-copy and DMA-offload RFC (Shivank Garg, AMD Zen 3 EPYC with PTDMA, ``move_pages`` of 1 GB
  between two nodes): the V1 cover letter's cycles per page, and the V3 tables 1a (vanilla kernel), 1b
  (multi-threaded copy) and 1c (DMA offload). The reference keeps some cells as a range; a range is kept here
  as ``(low, high)`` with the value a preset is calibrated to named in ``value``;
- Zi Yan's 2019 RFC (Xeon E5-2650 v3, I/OAT DMA);
- this project's H200 run, ``benchmarks/results/cuda-h200-2026-11-25/README.md``.

The V3 cells the calibration would also take (1c: 1 channel at 2M, 16 channels at 4K; 1b: 1 thread at 4K and
2M, 16 threads at 4K) are not in the reference notes; the parameters they would set are set otherwise, as each
preset says, and those cells are printed as predictions.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["PUBLISHED", "PublishedRow", "rows_for"]


@dataclass(frozen=True)
class PublishedRow:
    """One published figure.

    Attributes
    ----------
    preset : str
        The preset whose machine it was measured on.
    table : str
        Where it was published (``V3 1c``, ``Zi Yan 2019``, ...).
    kind : str
        ``vanilla`` (the kernel's serial copy, 512-page batches), ``dma`` (offload, the RFC's batch), ``mtcopy``
        (multi-threaded copy, the RFC's batch), ``copy-share`` (the copy's fraction of a vanilla migration),
        ``ceiling`` or ``dma-copy`` (the copy engine alone).
    folio : str
        Folio size (``4K`` ... ``2M``), or what a ``cycles`` row measures.
    lanes : int
        DMA channels or copy threads (0 for the vanilla kernel).
    value : float
        The figure a preset is calibrated to (or compared with).
    calibration : bool
        True: an input of the preset. False: a check only.
    span : tuple of float, optional
        ``(low, high)`` where the reference gives a range.
    note : str
        What the row is and how it is read.
    call_bytes : int
        Bytes one migration call moved in the measurement: the RFC's runs move 1 GiB in one call; Zi Yan's
        figures are one call of 512 base pages or of one THP. A model is compared with a row on a run of that
        shape. ``dma-copy`` rows are the engine alone (``dma.copy`` of that many bytes, no migration).
    """

    preset: str
    table: str
    kind: str
    folio: str
    lanes: int
    value: float
    calibration: bool
    span: tuple[float, float] | None = None
    note: str = ""
    call_bytes: int = 1 << 30


PUBLISHED: tuple[PublishedRow, ...] = (
    # -- zen3-ptdma: the AMD RFC -----------------------------------------------------------------------------
    PublishedRow("zen3-ptdma", "V1", "copy-share", "4K", 0, 800 / 3700, True,
                 note="folio_copy's 800 of migrate_pages' 3700 cycles per 4K page (2 GHz), kept as the copy's share "
                      "of a 4K migration: as absolute times (1.85 us a page) they do not fit V3 1a's 3.7 GB/s "
                      "(1.11 us a page); the V1 kernel is an older one"),
    PublishedRow("zen3-ptdma", "V3", "copy-share", "4K", 0, 0.35, False,
                 note="'folio_copy share of move_pages: 4K x512 ~35%' (a check)"),
    PublishedRow("zen3-ptdma", "V3", "copy-share", "2M", 0, 0.97, False,
                 note="'folio_copy share of move_pages: 2M x512 ~97%' (a check)"),
    PublishedRow("zen3-ptdma", "V3 1a", "vanilla", "4K", 0, 3.7, True, span=(1.7, 3.7),
                 note="the reference gives 1.7-3.7; calibrated to 3.7, the V3 table's end of the range"),
    PublishedRow("zen3-ptdma", "V3 1a", "vanilla", "2M", 0, 10.85, True, span=(10.7, 11.0),
                 note="the reference gives 10.7-11.0; calibrated to the middle"),
    PublishedRow("zen3-ptdma", "V3 1c", "dma", "4K", 1, 1.19, True,
                 note="'DMA slower than CPU for 4K (1.19)': one channel"),
    PublishedRow("zen3-ptdma", "V3 1c", "dma", "2M", 16, 63.7, True, span=(55.5, 63.7),
                 note="16 channels, '~6x' the vanilla 2M: the top of the reference's 55.5-63.7"),
    PublishedRow("zen3-ptdma", "V3 1b", "mtcopy", "2M", 16, 36.65, True, span=(35.9, 37.4),
                 note="the reference gives 35.9-37.4 for 8-16 threads; calibrated to the middle"),
    PublishedRow("zen3-ptdma", "V3 1b", "mtcopy", "2M", 8, 36.65, False, span=(35.9, 37.4),
                 note="8 threads: the same range (a check: threads beyond 8 add little)"),
    # -- e5-ioat: Zi Yan's 2019 RFC --------------------------------------------------------------------------
    PublishedRow("e5-ioat", "Zi Yan 2019", "vanilla", "4K", 0, 0.85, True,
                 note="migrate_pages of 512 base pages", call_bytes=2 << 20),
    PublishedRow("e5-ioat", "Zi Yan 2019", "vanilla", "2M", 0, 2.39, True, note="one THP",
                 call_bytes=2 << 20),
    PublishedRow("e5-ioat", "Zi Yan 2019", "mtcopy", "2M", 16, 7.65, True, span=(7.4, 7.9),
                 note="one THP, 16 copy threads, each a part of the folio", call_bytes=2 << 20),
    PublishedRow("e5-ioat", "Zi Yan 2019", "dma", "2M", 16, 4.32, True, note="one THP, 16 I/OAT channels",
                 call_bytes=2 << 20),
    PublishedRow("e5-ioat", "Zi Yan 2019", "vanilla", "4K", 0, 0.31, False,
                 note="migrate_pages of one base page (a check of the per-call cost)", call_bytes=4096),
    # -- h200-ce: this project's H200 run (host to device) ---------------------------------------------------
    PublishedRow("h200-ce", "H200 run", "ceiling", "contiguous", 4, 55.5, True,
                 note="pinned cudaMemcpyAsync host->device: the copy engines' cap"),
    PublishedRow("h200-ce", "H200 run", "dma-copy", "4K-random", 4, 30.72, True,
                 note="dma.copy of random 4K pages, 4 channels: sets the per-descriptor engine cost"),
    PublishedRow("h200-ce", "H200 run", "dma-copy", "4K-contiguous", 4, 47.62, False,
                 note="dma.copy of contiguous 4K pages, 4 channels (a check of coalescing)"),
)


def rows_for(preset: str, calibration: bool | None = None) -> list[PublishedRow]:
    """The published rows of a preset's machine (only inputs, only checks, or all)."""
    return [r for r in PUBLISHED if r.preset == preset and (calibration is None or r.calibration == calibration)]
