"""The values of a sweep as a command line gives them: byte sizes, folio sizes and the numeric sweep axes.

Each parser refuses bad input with a message that says what is allowed. The page and folio sizes they check
against live here too. Everything here is pure.
"""

from __future__ import annotations

import re

from .naming import format_size

__all__ = [
    "MAX_FOLIO_ORDER",
    "PAGE_SIZE",
    "folio_order",
    "folio_sizes",
    "parse_batch_pages",
    "parse_batches_per_step",
    "parse_channels",
    "parse_folio_sizes",
    "parse_int_list",
    "parse_pipeline",
    "parse_poll_us",
    "parse_size",
]

#: Base page size every sweep uses (the kernel's on x86-64).
PAGE_SIZE = 4096
#: Largest folio order a node serves (2 MiB folios of 4 KiB pages).
MAX_FOLIO_ORDER = 9

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


def parse_int_list(text: str, what: str, low: int, high: int, example: str) -> list[int]:
    """Parse a comma-separated list of whole numbers in ``low..high`` into sorted, distinct values.

    One parser for every numeric sweep axis, so that each rejects bad input with the same kind of message;
    ``what`` names one value (``"channel count"``) and ``example`` shows a valid list.

    Raises
    ------
    ValueError
        On an empty list, a non-integer or a value outside ``low..high``.
    """
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    if not items:
        raise ValueError(f"expected a comma-separated list of {what}s, e.g. {example}")
    out = set()
    for item in items:
        if not (item.isascii() and item.isdigit()) or not low <= int(item) <= high:
            raise ValueError(f"{item!r} is not a {what}; use whole numbers from {low} to {high}, e.g. {example}")
        out.add(int(item))
    return sorted(out)


def parse_channels(text: str) -> list[int]:
    """Parse a comma-separated list of DMA channel counts (``1,2,4``), each in 1..64.

    Raises
    ------
    ValueError
        On an empty list, a non-integer or a count outside 1..64.
    """
    return parse_int_list(text, "channel count", 1, 64, "1,2,4")


def parse_batch_pages(text: str) -> list[int]:
    """Parse a comma-separated list of batch sizes in base pages (``512,2048``), each in 1..262144.

    ``512`` is the kernel's ``NR_MAX_BATCHED_MIGRATION``; any other value is an experiment setting.

    Raises
    ------
    ValueError
        On an empty list, a non-integer or a size outside 1..262144.
    """
    return parse_int_list(text, "batch size in pages", 1, 1 << 18, "512,2048")


def parse_batches_per_step(text: str) -> list[int]:
    """Parse a comma-separated list of batches per step (``1,16``), each in 1..1024; ``1`` is the kernel's.

    Raises
    ------
    ValueError
        On an empty list, a non-integer or a count outside 1..1024.
    """
    return parse_int_list(text, "batches-per-step count", 1, 1024, "1,16")


def parse_pipeline(text: str) -> list[int]:
    """Parse a comma-separated list of DMA pipeline depths (``0,1``), each in 0..8; ``0`` is the kernel's.

    Raises
    ------
    ValueError
        On an empty list, a non-integer or a depth outside 0..8.
    """
    return parse_int_list(text, "pipeline depth", 0, 8, "0,1")


def parse_poll_us(text: str) -> float:
    """Parse a DMA poll window in microseconds, 0 (channels sleep) to 1000000.

    Raises
    ------
    ValueError
        On anything but a plain decimal number in that range.
    """
    t = text.strip()
    try:
        if not t or not t.isascii() or t.lower() in ("nan", "inf", "-inf", "+inf", "infinity"):
            raise ValueError
        value = float(t)
    except ValueError:
        raise ValueError(f"expected a number of microseconds from 0 to 1000000, e.g. 1000 (or 0: channels "
                         f"sleep), got {text!r}") from None
    if not 0 <= value <= 1e6:
        raise ValueError(f"a poll window is 0 to 1000000 microseconds, got {text!r}")
    return value


def folio_order(folio_bytes: int) -> int:
    """The order of a folio of ``folio_bytes`` bytes (``4K`` -> 0, ``64K`` -> 4, ``2M`` -> 9)."""
    return (folio_bytes // PAGE_SIZE).bit_length() - 1
