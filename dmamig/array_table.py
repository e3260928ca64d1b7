"""Many arrays as one argument of a compiled call: a table of their addresses and shapes.

numba converts each array argument of a call on its own (a type check, a reference, a structure to fill), so a
call that takes two dozen arrays spends more on its arguments than a small batch's work costs. An
:class:`ArrayTable` writes each array's address and shape into one int64 array, :attr:`ArrayTable.words`,
beside a few int64 (or float64) scalars, and keeps the arrays; the compiled side takes ``words`` and reads each
array back with :func:`table_array1` (``table_array2``, ``table_array3`` by dimensions; no copy, no reference):
an array read so is valid while the table holds it, until its slot is set again or the table goes.

The table checks what goes in, once, when a slot is set: each array's item size, dimensions and C order
against its slot's layout (one compiled call for a group of slots); the compiled reader then takes the slot's
dtype on trust. What it reads is writable, and unchecked by bounds, as any compiled array: a read-only array
is not protected by its flag once in a table, and an index past an array's end is not caught.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .errors import InvalidArgument

__all__ = ["ArrayTable", "SLOT_WORDS", "TABLE_ERROR", "TableLayout", "pointer", "table_array1",
           "table_array2", "table_array3", "table_float"]

#: Words of a slot: the array's address, then its shape (up to three dimensions).
SLOT_WORDS = 4

try:
    from numba import carray, literal_unroll, njit, types
    from numba.extending import intrinsic

    #: Why compiled callers cannot read tables here (``None`` where they can).
    TABLE_ERROR: str | None = None
except Exception:  # pragma: no cover - numba is a dependency
    TABLE_ERROR = "numba is not importable"


def _pack(words, layout, first, arrays, at, values):  # pragma: no cover - compiled
    """Slots ``first``, ``first + 1``, ... of ``words`` from ``arrays``, each checked against its row of
    ``layout`` (item size, dimensions); then, where ``at`` >= 0, ``values`` into ``words[at:]``. Returns the
    first slot refused, or -1 (then every slot and value was written)."""
    k = first
    for a in literal_unroll(arrays):
        if a.itemsize != layout[k, 0] or a.ndim != layout[k, 1] or not a.flags.c_contiguous:
            return k
        k += 1
    k = first * SLOT_WORDS
    for a in literal_unroll(arrays):
        words[k] = a.ctypes.data
        for d in range(a.ndim):
            words[k + 1 + d] = a.shape[d]
        k += SLOT_WORDS
    if at >= 0:
        k = at
        for v in literal_unroll(values):
            words[k] = v
            k += 1
    return -1


if TABLE_ERROR is None:
    _pack = njit(nogil=True, cache=True)(_pack)

    @intrinsic
    def pointer(typingctx, address, dtype):
        """The integer ``address`` as a pointer to items of ``dtype`` (a numpy scalar type), for ``carray``."""
        item = dtype.dtype

        def codegen(context, builder, signature, args):
            return builder.inttoptr(args[0], context.get_data_type(item).as_pointer())

        return types.CPointer(item)(types.intp, dtype), codegen

    @njit(nogil=True, cache=True, inline="always")
    def table_array1(words, slot, dtype):  # pragma: no cover - compiled
        """The 1-D array of ``slot`` (items of ``dtype``), over its own memory."""
        k = slot * SLOT_WORDS
        return carray(pointer(words[k], dtype), words[k + 1])

    @njit(nogil=True, cache=True, inline="always")
    def table_array2(words, slot, dtype):  # pragma: no cover - compiled
        """The 2-D array of ``slot``."""
        k = slot * SLOT_WORDS
        return carray(pointer(words[k], dtype), (words[k + 1], words[k + 2]))

    @njit(nogil=True, cache=True, inline="always")
    def table_array3(words, slot, dtype):  # pragma: no cover - compiled
        """The 3-D array of ``slot``."""
        k = slot * SLOT_WORDS
        return carray(pointer(words[k], dtype), (words[k + 1], words[k + 2], words[k + 3]))

    @njit(nogil=True, cache=True, inline="always")
    def table_float(words, at):  # pragma: no cover - compiled
        """The float64 scalar at word ``at`` (:meth:`ArrayTable.set_float`)."""
        return words[at:at + 1].view(np.float64)[0]
else:  # pragma: no cover
    pointer = table_array1 = table_array2 = table_array3 = table_float = None


class TableLayout:
    """What the slots of an :class:`ArrayTable` hold, and how many scalars follow them (made once per kind of
    table; :meth:`table` makes the tables).

    Parameters
    ----------
    slots : sequence of (dtype, ndim)
        Per slot, what its array holds: items of ``dtype`` in ``ndim`` (1 to 3) dimensions, C order.
    scalars : int
        Words after the slots for scalars; scalar ``i`` is word :meth:`scalar_word` ``(i)``.
    """

    __slots__ = ("rows", "scalars", "slots", "words")

    def __init__(self, slots: Sequence[tuple[Any, int]], scalars: int = 0) -> None:
        rows = []
        for dtype, ndim in slots:
            if ndim not in (1, 2, 3):
                raise InvalidArgument(f"TableLayout: ndim must be 1, 2 or 3, got {ndim!r}")
            rows.append((np.dtype(dtype).itemsize, ndim))
        if int(scalars) < 0:
            raise InvalidArgument(f"TableLayout: scalars must be >= 0, got {scalars!r}")
        #: Per slot: item size in bytes, dimensions.
        self.rows = np.array(rows, dtype=np.int64).reshape(len(rows), 2)
        #: Slots, scalars, and words of a table.
        self.slots, self.scalars = len(rows), int(scalars)
        self.words = self.slots * SLOT_WORDS + self.scalars

    def scalar_word(self, i: int) -> int:
        """The word of scalar ``i`` (in a compiled reader, a constant)."""
        return self.slots * SLOT_WORDS + i

    def table(self) -> ArrayTable:
        """A new table of this layout: every slot unset (address 0, no items), every scalar 0."""
        return ArrayTable(self)


class ArrayTable:
    """Arrays and scalars of a compiled call, in one int64 array (:attr:`words`), laid out as ``layout`` says
    (:meth:`TableLayout.table` makes them)."""

    __slots__ = ("_held", "_layout", "words")

    def __init__(self, layout: TableLayout) -> None:
        self._layout = layout
        #: The table: ``SLOT_WORDS`` words per slot, then the scalars.
        self.words = np.zeros(layout.words, dtype=np.int64)
        self._held: list[np.ndarray | None] = [None] * layout.slots

    def set(self, first: int, arrays: tuple[np.ndarray, ...], at: int = 0, values: tuple[int, ...] = ()) -> None:
        """Put ``arrays`` in slots ``first``, ``first + 1``, ... and hold them; write the integers ``values``
        into words ``at``, ``at + 1``, ... (one compiled call). A refused array changes nothing.

        Raises
        ------
        InvalidArgument
            An array whose item size, dimensions or order is not its slot's, or more arrays than slots.
        """
        layout = self._layout
        if first < 0 or first + len(arrays) > layout.slots:
            raise InvalidArgument(f"ArrayTable.set: slots {first} to {first + len(arrays) - 1} of {layout.slots}")
        if not arrays:
            self.words[at:at + len(values)] = values
            return
        if not values:  # (numba iterates no empty tuple)
            at, values = -1, (0,)
        bad = _pack(self.words, layout.rows, first, arrays, at, values)
        if bad >= 0:
            a = arrays[bad - first]
            size, ndim = layout.rows[bad].tolist()
            raise InvalidArgument(f"ArrayTable slot {bad} takes C-ordered {ndim}-D arrays of {size}-byte items, "
                                  f"got {a.ndim}-D {a.dtype} (C order: {a.flags.c_contiguous})")
        self._held[first:first + len(arrays)] = arrays

    def set_float(self, at: int, value: float) -> None:
        """Write the float64 ``value`` into word ``at`` (read compiled with :func:`table_float`)."""
        self.words[at:at + 1].view(np.float64)[0] = value

    def held(self, slot: int) -> np.ndarray | None:
        """The array of ``slot`` (``None`` until set)."""
        return self._held[slot]
