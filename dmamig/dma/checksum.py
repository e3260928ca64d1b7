"""Per-page checksums: the numpy reference that ``kernels/page_checksum.cu`` reproduces bit for bit.

The checksum of one page is defined on its little-endian ``uint32`` words ``w[j]``, ``j = 0 .. page_size/4 - 1``:

.. code-block:: text

    x_j = w[j] | (j << 32)                          # the word tagged with its position
    m_j = x_j * 0x9E3779B97F4A7C15     (mod 2**64)  # odd multiplier: a bijection on uint64
    m_j = m_j ^ (m_j >> 31)                         # fold the high bits down (non-linear mixing)
    m_j = m_j * 0xBF58476D1CE4E5B9     (mod 2**64)
    checksum = sum_j m_j               (mod 2**64)

Why this shape: every step is exact in unsigned 64-bit arithmetic (numpy and CUDA wrap identically), the final
sum is associative and commutative so a GPU block can reduce it in any order and still match the sequential
reference exactly, and tagging each word with its position makes swapped or shifted words change the result
(a plain sum would not notice two words trading places). The multiply/xor-shift/multiply mix (from splitmix64)
spreads a one-bit change in a word over the whole 64-bit term, so single-bit flips always change the sum.
It is a corruption detector for tests and verification, not a cryptographic hash.
"""

from __future__ import annotations

import numpy as np

from ..errors import InvalidArgument

__all__ = ["CHECKSUM_MUL1", "CHECKSUM_MUL2", "CHECKSUM_SHIFT", "page_checksums"]

#: First multiplier (the 64-bit golden ratio, odd).
CHECKSUM_MUL1 = np.uint64(0x9E3779B97F4A7C15)
#: Second multiplier (splitmix64's first mixing constant, odd).
CHECKSUM_MUL2 = np.uint64(0xBF58476D1CE4E5B9)
#: Right shift of the xor-fold between the two multiplications.
CHECKSUM_SHIFT = np.uint64(31)

# Pages are reduced in chunks so the uint64 temporaries stay around a few MiB whatever the input size.
_CHUNK_BYTES = 4 << 20


def page_checksums(frames: np.ndarray) -> np.ndarray:
    """Checksum each row (page) of a 2-D uint8 array.

    Parameters
    ----------
    frames : numpy.ndarray
        ``(nr_pages, page_size)`` uint8 array; ``page_size`` must be a multiple of 4.

    Returns
    -------
    numpy.ndarray
        ``(nr_pages,)`` uint64 checksums, as defined in this module's docstring.

    Raises
    ------
    InvalidArgument
        ``frames`` is not a 2-D uint8 array or its rows are not a whole number of 32-bit words.
    """
    frames = np.asarray(frames)
    if frames.ndim != 2 or frames.dtype != np.uint8:
        raise InvalidArgument(f"frames must be a 2-D uint8 array (pages x page_size), got {frames.dtype} "
                              f"with shape {frames.shape}")
    nr_pages, page_size = frames.shape
    if page_size % 4:
        raise InvalidArgument(f"page_size must be a multiple of 4 bytes to checksum, got {page_size}")
    out = np.empty(nr_pages, dtype=np.uint64)
    if nr_pages == 0:
        return out
    nwords = page_size // 4
    tag = np.arange(nwords, dtype=np.uint64) << np.uint64(32)
    step = max(1, _CHUNK_BYTES // max(page_size, 1))
    for start in range(0, nr_pages, step):
        chunk = np.ascontiguousarray(frames[start:start + step])
        # '<u4' pins the word order to little endian, as the GPU reads it, whatever the host's byte order.
        m = chunk.view("<u4").astype(np.uint64)
        m |= tag
        m *= CHECKSUM_MUL1
        m ^= m >> CHECKSUM_SHIFT
        m *= CHECKSUM_MUL2
        # uint64 sums wrap mod 2**64, which is the definition (no float accumulator anywhere).
        out[start:start + chunk.shape[0]] = m.sum(axis=1, dtype=np.uint64)
    return out
