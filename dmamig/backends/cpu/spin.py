"""Compiled primitives of polling loops: ``cpu_relax``, ``sched_yield``, a clock.

numba intrinsics that emit what a spin loop needs and numba does not offer on the CPU: the x86 PAUSE hint,
libc's ``sched_yield`` and ``clock_gettime`` (called by symbol, so the compiled code caches). With the atomic
loads and stores of :mod:`dmamig.atomics`, :mod:`dmamig.backends.cpu.ring_consumer` builds the CPU consumer of the DMA
channels' ring on them.

Linux and macOS with numba on a 64-bit Python; elsewhere :data:`SPIN_AVAILABLE` is False (with the reason in
:data:`SPIN_ERROR`) and nothing is compiled.
"""

from __future__ import annotations

import ctypes
import platform

import numpy as np

from .copy_loops import HAVE_NUMBA

__all__ = ["SPIN_AVAILABLE", "SPIN_ERROR"]

_CLOCK_MONOTONIC = 1 if platform.system() == "Linux" else 6  # CLOCK_MONOTONIC on Linux; on macOS it is 6

SPIN_ERROR: str | None = None
if platform.system() not in ("Linux", "Darwin"):  # pragma: no cover - Windows
    SPIN_ERROR = f"the loops call libc's sched_yield and clock_gettime, which {platform.system()} lacks"
if not HAVE_NUMBA:  # pragma: no cover - installs without numba
    SPIN_ERROR = "numba is not importable"
if ctypes.sizeof(ctypes.c_void_p) != 8:  # pragma: no cover
    SPIN_ERROR = "a 64-bit Python is needed"
#: Whether the primitives (and so polling channels) can run here.
SPIN_AVAILABLE = SPIN_ERROR is None


if SPIN_AVAILABLE:
    from llvmlite import ir
    from numba import njit, types
    from numba.core import cgutils
    from numba.extending import intrinsic

    _X86 = platform.machine().lower() in ("x86_64", "amd64")

    @intrinsic
    def cpu_relax(typingctx):
        """``cpu_relax()``: the x86 PAUSE hint inside a spin loop (nothing elsewhere)."""
        sig = types.void()

        def codegen(context, builder, signature, args):
            if _X86:
                fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), []),
                                                    "llvm.x86.sse2.pause")
                builder.call(fn, [])
            return context.get_dummy_value()

        return sig, codegen

    @intrinsic
    def sched_yield(typingctx):
        """libc's ``sched_yield()``: let another thread that is ready to run have this CPU."""
        sig = types.void()

        def codegen(context, builder, signature, args):
            fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.IntType(32), []), "sched_yield")
            builder.call(fn, [])
            return context.get_dummy_value()

        return sig, codegen

    @intrinsic
    def _clock_gettime(typingctx, clock, timespec):
        """libc's ``clock_gettime(clock, timespec)``, the timespec given by address."""
        sig = types.void(types.int32, types.intp)

        def codegen(context, builder, signature, args):
            fnty = ir.FunctionType(ir.IntType(32), [ir.IntType(32), ir.IntType(8).as_pointer()])
            fn = cgutils.get_or_insert_function(builder.module, fnty, "clock_gettime")
            builder.call(fn, [args[0], builder.inttoptr(args[1], ir.IntType(8).as_pointer())])
            return context.get_dummy_value()

        return sig, codegen

    @njit(nogil=True, cache=True)
    def now_ns(ts):  # pragma: no cover - compiled
        _clock_gettime(np.int32(_CLOCK_MONOTONIC), ts.ctypes.data)
        return ts[0] * 1_000_000_000 + ts[1]
