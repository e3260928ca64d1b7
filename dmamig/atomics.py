"""Compiled memory-ordering primitives: acquire loads, release stores, plain loads and a full fence of int64 words
at raw addresses (numba intrinsics).

The DMA channel protocol (:mod:`dmamig.dma.ring`) is built on them: a submitter writes rows and then publishes a
tail with a release store; a consumer reads the tail with an acquire load before it trusts the rows, and
publishes a head with a release store after its copies; a waiter reads the head with an acquire load before it
trusts the destination bytes. On x86 the acquire and release forms compile to plain moves (its stores are
ordered), on Arm to ``ldar``/``stlr``; the compiler never reorders or hoists them either way. The full fence
orders a store before a later load (what x86 does not do on its own), for the two sides of a sleep/wake-up
hand-shake.

Available with numba on a 64-bit Python (:data:`ATOMICS_AVAILABLE`, reason in :data:`ATOMICS_ERROR`).
"""

from __future__ import annotations

import ctypes

__all__ = ["ATOMICS_AVAILABLE", "ATOMICS_ERROR", "full_fence", "load_acquire", "load_plain", "store_release"]

ATOMICS_ERROR: str | None = None
try:
    from llvmlite import ir
    from numba import types
    from numba.extending import intrinsic
except Exception as exc:  # pragma: no cover - installs without numba
    ATOMICS_ERROR = f"numba is not importable ({type(exc).__name__}: {exc})"
if ctypes.sizeof(ctypes.c_void_p) != 8:  # pragma: no cover
    ATOMICS_ERROR = "a 64-bit Python is needed"
#: Whether the primitives can be compiled here.
ATOMICS_AVAILABLE = ATOMICS_ERROR is None

if ATOMICS_AVAILABLE:

    @intrinsic
    def load_acquire(typingctx, addr):
        """An acquire load of the int64 at ``addr``: later reads see what was written before the matching
        release; never hoisted out of a polling loop."""
        sig = types.int64(types.intp)

        def codegen(context, builder, signature, args):
            return builder.load_atomic(builder.inttoptr(args[0], ir.IntType(64).as_pointer()), "acquire", 8)

        return sig, codegen

    @intrinsic
    def store_release(typingctx, addr, value):
        """A release store of ``value`` to the int64 at ``addr``: every earlier write is visible before it."""
        sig = types.void(types.intp, types.int64)

        def codegen(context, builder, signature, args):
            ptr = builder.inttoptr(args[0], ir.IntType(64).as_pointer())
            builder.store_atomic(args[1], ptr, "release", 8)
            return context.get_dummy_value()

        return sig, codegen

    @intrinsic
    def load_plain(typingctx, addr):
        """A plain load of the int64 at ``addr`` (row words, published before the job's release)."""
        sig = types.int64(types.intp)

        def codegen(context, builder, signature, args):
            return builder.load(builder.inttoptr(args[0], ir.IntType(64).as_pointer()), align=8)

        return sig, codegen

    @intrinsic
    def full_fence(typingctx):
        """A sequentially consistent fence: earlier stores are visible before later loads read (and weakly
        ordered streaming stores are published)."""
        sig = types.void()

        def codegen(context, builder, signature, args):
            builder.fence("seq_cst")
            return context.get_dummy_value()

        return sig, codegen
