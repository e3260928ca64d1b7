"""Compiled GIL-free copy kernels of the CPU backend (numba), with numpy fallbacks.

Two kernels, each taking whole arrays of runs so one call does a whole segment of work:

* :func:`copy_runs_stream` - the DMA channel kernel. It copies with *non-temporal* (streaming) 16-byte stores,
  as a DMA engine writes memory without dragging the destination through the CPU caches. On the 2-core
  reference machine this is what lets two channels beat a plain ``memcpy``: a cached store first reads the
  destination line (read-for-ownership), so a cached copy moves 3 bytes per byte copied, a streaming copy 2.
* :func:`copy_runs_cached` - ordinary ``memcpy`` per run (LLVM's memcpy intrinsic, i.e. libc's memcpy). Used
  for the migrating thread's synchronous folio copy (the kernel's ``folio_copy()`` is a cached copy too) and
  for DMA channels when a buffer is not 16-byte aligned or rows are not a multiple of 64 bytes.

Both are ``@njit(nogil=True, cache=True)`` with one signature each (C-contiguous 2-D uint8 buffers, int64 run
arrays), so the first call compiles once per machine and later processes load the cached machine code.

The kernels do no bounds checks (numba does not either): callers validate run bounds first, vectorized, see
:func:`check_runs`.
"""

from __future__ import annotations

import numpy as np

from ...dma.staging import stage_chunks
from ...errors import InvalidArgument

__all__ = ["HAVE_NUMBA", "NUMBA_ERROR", "aligned_zeros", "check_runs", "copy_runs_cached", "copy_runs_staged",
           "copy_runs_stream", "stream_copy_ok", "warm_up", "xor_pages"]

#: Byte alignment that streaming stores need on the destination (and that the source loads assume).
STREAM_ALIGN = 16
#: Bytes per unrolled streaming step; rows must be a multiple of it for the streaming kernel.
STREAM_STEP = 64

try:  # numba is a dependency, but the backend keeps working (more slowly) where it cannot be imported.
    from llvmlite import ir
    from numba import njit, types
    from numba.core import cgutils
    from numba.extending import intrinsic

    HAVE_NUMBA = True
    NUMBA_ERROR: str | None = None
except Exception as exc:  # pragma: no cover - exercised only on installs without numba
    HAVE_NUMBA = False
    NUMBA_ERROR = f"{type(exc).__name__}: {exc}"


if HAVE_NUMBA:

    @intrinsic
    def raw_memcpy(typingctx, dst, src, nbytes):
        """``memcpy(dst, src, nbytes)`` on raw addresses (LLVM's memcpy intrinsic: libc's tuned memcpy)."""
        sig = types.void(types.intp, types.intp, types.intp)

        def codegen(context, builder, signature, args):
            d, s, n = args
            p8 = ir.IntType(8).as_pointer()
            cgutils.raw_memcpy(builder, builder.inttoptr(d, p8), builder.inttoptr(s, p8), n, 1)
            return context.get_dummy_value()

        return sig, codegen

    @intrinsic
    def stream64(typingctx, dst, src):
        """Copy 64 bytes: four unaligned 16-byte loads, four aligned non-temporal 16-byte stores."""
        sig = types.void(types.intp, types.intp)

        def codegen(context, builder, signature, args):
            d, s = args
            vec = ir.VectorType(ir.IntType(64), 2)
            nontemporal = builder.module.add_metadata([ir.Constant(ir.IntType(32), 1)])
            for k in range(4):
                off = ir.Constant(ir.IntType(64), 16 * k)
                sp = builder.inttoptr(builder.add(s, off), vec.as_pointer())
                dp = builder.inttoptr(builder.add(d, off), vec.as_pointer())
                value = builder.load(sp, align=1)
                store = builder.store(value, dp, align=16)
                store.set_metadata("nontemporal", nontemporal)
            return context.get_dummy_value()

        return sig, codegen

    @intrinsic
    def _store_fence(typingctx):
        """A full fence: streaming stores are weakly ordered, so publish them before signalling completion."""
        sig = types.void()

        def codegen(context, builder, signature, args):
            builder.fence("seq_cst")
            return context.get_dummy_value()

        return sig, codegen

    @njit(nogil=True, cache=True)
    def _copy_runs_stream(src, dst, src_start, dst_start, npages):  # pragma: no cover - compiled
        row = src.shape[1]
        sbase = src.ctypes.data
        dbase = dst.ctypes.data
        for i in range(npages.shape[0]):
            s = sbase + src_start[i] * row
            d = dbase + dst_start[i] * row
            for off in range(0, npages[i] * row, 64):
                stream64(d + off, s + off)
        _store_fence()

    @njit(nogil=True, cache=True)
    def _copy_runs_cached(src, dst, src_start, dst_start, npages):  # pragma: no cover - compiled
        row = src.shape[1]
        sbase = src.ctypes.data
        dbase = dst.ctypes.data
        for i in range(npages.shape[0]):
            raw_memcpy(dbase + dst_start[i] * row, sbase + src_start[i] * row, npages[i] * row)

    @njit(nogil=True, cache=True)
    def _run_fault(src_rows, dst_rows, src_start, dst_start, npages):  # pragma: no cover - compiled
        # check_runs' three checks, in its order (a negative length first, then the source, the destination).
        for i in range(npages.shape[0]):
            if npages[i] < 0:
                return 1
        for i in range(npages.shape[0]):
            if src_start[i] < 0 or src_start[i] + npages[i] > src_rows:
                return 2
        for i in range(npages.shape[0]):
            if dst_start[i] < 0 or dst_start[i] + npages[i] > dst_rows:
                return 3
        return 0

    @njit(nogil=True, cache=True)
    def _xor_pages(words, idx):  # pragma: no cover - compiled
        acc = np.uint64(0)
        for i in range(idx.shape[0]):
            row = words[idx[i]]
            for w in range(row.shape[0]):
                acc ^= row[w]
        return acc


def aligned_zeros(rows: int, cols: int, align: int = 4096) -> np.ndarray:
    """A zero-filled C-contiguous ``(rows, cols)`` uint8 array whose first byte is ``align``-byte aligned.

    Frames start on a page boundary, as physical frames do, which also satisfies the streaming kernel. The
    buffer comes from ``np.zeros`` (calloc), so untouched frames cost no memory until first written.
    """
    nbytes = rows * cols
    raw = np.zeros(nbytes + align, dtype=np.uint8)
    skip = (-raw.ctypes.data) % align
    return raw[skip:skip + nbytes].reshape(rows, cols)


def _as_runs(a: np.ndarray) -> np.ndarray:
    # One signature only: contiguous int64 (a broadcast or strided view would compile a second specialisation).
    return np.ascontiguousarray(a, dtype=np.int64)


def check_runs(src: np.ndarray, dst: np.ndarray, src_start: np.ndarray, dst_start: np.ndarray,
               npages: np.ndarray) -> None:
    """Validate that every run lies inside its buffer (the compiled kernels do not check).

    Raises
    ------
    InvalidArgument
        Buffers of different row sizes, or a run outside ``src``/``dst``.
    """
    if src.ndim != 2 or dst.ndim != 2 or src.shape[1] != dst.shape[1]:
        raise InvalidArgument(f"source and destination frames must be 2-D with equal rows, got {src.shape} "
                              f"and {dst.shape}")
    if npages.size == 0:
        return
    if HAVE_NUMBA and src_start.dtype == dst_start.dtype == npages.dtype == np.int64:
        fault = int(_run_fault(src.shape[0], dst.shape[0], src_start, dst_start, npages))  # one pass, no temporaries
    else:
        fault = 1 if int(npages.min()) < 0 else 0
        for code, start, limit in ((2, src_start, src.shape[0]), (3, dst_start, dst.shape[0])):
            if not fault and (int(start.min()) < 0 or int((start + npages).max()) > limit):
                fault = code
    if fault == 1:
        raise InvalidArgument("run lengths must be >= 0")
    if fault:
        name, limit = ("source", src.shape[0]) if fault == 2 else ("destination", dst.shape[0])
        raise InvalidArgument(f"a {name} run falls outside the {limit} frames of its buffer")


def stream_copy_ok(src: np.ndarray, dst: np.ndarray) -> bool:
    """Whether the streaming kernel can copy between these buffers (alignment and row size allow it)."""
    return (HAVE_NUMBA and src.shape[1] % STREAM_STEP == 0 and dst.ctypes.data % STREAM_ALIGN == 0
            and src.flags.c_contiguous and dst.flags.c_contiguous)


def _fallback(src: np.ndarray, dst: np.ndarray, src_start: np.ndarray, dst_start: np.ndarray,
              npages: np.ndarray) -> None:
    # numpy fallback: single pages by fancy indexing in bounded chunks (one temporary per chunk), longer runs
    # by slices (each a memcpy that releases the GIL).
    single = npages == 1
    if single.any():
        s1, d1 = src_start[single], dst_start[single]
        for a in range(0, s1.size, 4096):
            dst[d1[a:a + 4096]] = src[s1[a:a + 4096]]
    for s, d, n in zip(src_start[~single].tolist(), dst_start[~single].tolist(), npages[~single].tolist()):
        dst[d:d + n] = src[s:s + n]


def copy_runs_stream(src: np.ndarray, dst: np.ndarray, src_start: np.ndarray, dst_start: np.ndarray,
                     npages: np.ndarray) -> None:
    """Copy runs ``dst[dst_start[i]:+npages[i]] = src[src_start[i]:+npages[i]]`` with streaming stores.

    Parameters
    ----------
    src, dst : numpy.ndarray
        C-contiguous 2-D uint8 frame buffers with equal row sizes.
    src_start, dst_start, npages : numpy.ndarray
        Integer run descriptors (already validated with :func:`check_runs`).

    Notes
    -----
    Releases the GIL for the whole call. Falls back to :func:`copy_runs_cached` when the buffers do not meet
    the streaming kernel's alignment (see :func:`stream_copy_ok`), and to numpy copies without numba.
    """
    if not HAVE_NUMBA:
        _fallback(src, dst, src_start, dst_start, npages)
    elif stream_copy_ok(src, dst):
        _copy_runs_stream(src, dst, _as_runs(src_start), _as_runs(dst_start), _as_runs(npages))
    else:
        _copy_runs_cached(src, dst, _as_runs(src_start), _as_runs(dst_start), _as_runs(npages))


def copy_runs_cached(src: np.ndarray, dst: np.ndarray, src_start: np.ndarray, dst_start: np.ndarray,
                     npages: np.ndarray) -> None:
    """Copy runs with an ordinary (cached) ``memcpy`` each, in order; parameters as :func:`copy_runs_stream`."""
    if HAVE_NUMBA and src.flags.c_contiguous and dst.flags.c_contiguous:
        _copy_runs_cached(src, dst, _as_runs(src_start), _as_runs(dst_start), _as_runs(npages))
    else:
        _fallback(src, dst, src_start, dst_start, npages)


def copy_runs_staged(src: np.ndarray, dst: np.ndarray, bounce: np.ndarray, src_start: np.ndarray,
                     dst_start: np.ndarray, npages: np.ndarray, stream: bool = True) -> tuple[int, int]:
    """Copy runs from ``src`` to ``dst`` through the host ``bounce`` buffer: two copies per chunk, the second
    after the first (how a copy between devices without peer access goes through host memory).

    Parameters
    ----------
    src, dst : numpy.ndarray
        Frame buffers, as :func:`copy_runs_stream`.
    bounce : numpy.ndarray
        ``(capacity, page_size)`` uint8 staging buffer; chunks of ``capacity`` pages go through it in turn.
    src_start, dst_start, npages : numpy.ndarray
        Runs, already validated with :func:`check_runs`.
    stream : bool
        Write ``dst`` with streaming stores (a DMA channel) or cached ones (the migrating thread's copy).
        The bounce buffer is always written with cached stores: it is read back at once, from the cache.

    Returns
    -------
    tuple of int
        ``(chunks, pieces)``: bounce-buffer fills, and run pieces copied into it (runs cut at its boundaries).
    """
    pieces = stage_chunks(src_start, dst_start, npages, int(bounce.shape[0]))
    out = copy_runs_stream if stream else copy_runs_cached
    for k in range(pieces.nr_chunks):
        s, d, n, b = pieces.chunk(k)
        copy_runs_cached(src, bounce, s, b, n)  # hop 1: source device -> host
        out(bounce, dst, b, d, n)  # hop 2: host -> destination device, after hop 1
    return pieces.nr_chunks, int(pieces.npages.size)


def xor_pages(frames: np.ndarray, idx: np.ndarray) -> int:
    """Read every byte of the frames at ``idx`` and fold them: the XOR of their 64-bit words.

    A device's read touch on the CPU backend: one pass over the pages with no temporary buffer, so the
    read costs what reading the memory costs. The fold only keeps the reads from being optimized away.
    """
    idx = np.ascontiguousarray(idx, dtype=np.int64)
    if HAVE_NUMBA and frames.flags.c_contiguous and frames.shape[1] % 8 == 0:
        return int(_xor_pages(frames.view(np.uint64), idx))
    words = frames[idx].reshape(-1)
    words = words[: words.size - words.size % 8].view(np.uint64)
    return int(np.bitwise_xor.reduce(words)) if words.size else 0


def warm_up() -> None:
    """Compile (or load from the cache) both kernels now rather than inside the first timed copy."""
    if not HAVE_NUMBA:
        return
    a = aligned_zeros(2, 64)
    b = aligned_zeros(2, 64)
    one = np.ones(1, dtype=np.int64)
    zero = np.zeros(1, dtype=np.int64)
    _copy_runs_stream(a, b, zero, one, one)
    _copy_runs_cached(a, b, zero, one, one)
