"""Ctrl-C during a migration lands between phases, never inside one.

A phase changes page tables and struct pages in several steps; a ``KeyboardInterrupt`` between two of them
would leave a half-moved folio that no undo can describe. While the core runs, SIGINT only sets a flag, and
:meth:`DeferredInterrupt.check` raises it at the next phase boundary, where every folio is either still mapped,
unmapped behind migration entries, or moved: states the put-back path restores.
"""

from __future__ import annotations

# The C functions behind the signal module: its Python wrappers convert handlers to and from enums, which costs
# several microseconds per call, and every migration call swaps the SIGINT handler twice.
import _signal
import signal
import threading
from types import FrameType, TracebackType

__all__ = ["DeferredInterrupt"]

# Per thread, whether it is the main thread (the one that receives signals): asked on every migration call, and
# threading's own test is two Python calls. A thread that forks keeps its answer in the child, where it may have
# become the main thread: the hold is then skipped, which changes nothing but when a Ctrl-C lands.
_THREAD = threading.local()


class DeferredInterrupt:
    """Context manager that holds SIGINT for the migration core and delivers it at phase boundaries.

    It only takes over where Python's own handler is installed, and only on the main thread (the one that
    receives signals); anywhere else it changes nothing.
    """

    __slots__ = ("_old", "pending")

    def __init__(self) -> None:
        self._old: object = None
        self.pending = False

    def __enter__(self) -> DeferredInterrupt:
        try:
            main = _THREAD.main
        except AttributeError:
            main = _THREAD.main = threading.current_thread() is threading.main_thread()
        if main and _signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            self._old = _signal.signal(signal.SIGINT, self._hold)
        return self

    def _hold(self, signum: int, frame: FrameType | None) -> None:
        self.pending = True

    def check(self) -> None:
        """Raise the held ``KeyboardInterrupt`` now (a phase boundary), if one arrived."""
        if self.pending:
            self.pending = False
            raise KeyboardInterrupt

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._old is not None:
            _signal.signal(signal.SIGINT, self._old)  # type: ignore[arg-type]
            self._old = None
        if self.pending and exc_type is None:
            self.pending = False
            raise KeyboardInterrupt
