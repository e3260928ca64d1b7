"""ArrayTable: many arrays as one argument of a compiled call (dmamig.array_table)."""

from __future__ import annotations

import gc

import numpy as np
import pytest

from dmamig import InvalidArgument
from dmamig.array_table import SLOT_WORDS, TABLE_ERROR, TableLayout

pytestmark = pytest.mark.skipif(TABLE_ERROR is not None, reason=f"compiled tables cannot be read here: {TABLE_ERROR}")

LAYOUT = TableLayout(((np.int64, 1), (np.int32, 1), (np.bool_, 2), (np.int64, 3), (np.uint8, 1)), scalars=3)


_READ = []


def _reader():
    """The compiled reader of LAYOUT's tables (made once)."""
    if _READ:
        return _READ[0]
    from numba import njit

    from dmamig.array_table import table_array1, table_array2, table_array3, table_float

    @njit
    def read(words, at):
        a = table_array1(words, 0, np.int64)
        b = table_array1(words, 1, np.int32)
        c = table_array2(words, 2, np.bool_)
        d = table_array3(words, 3, np.int64)
        c[1, 2] = True  # written through, into the caller's array
        d[1, 2, 3] = -7
        return a.sum(), b.sum(), c.shape, d.shape, words[at], words[at + 1], table_float(words, at + 2)

    _READ.append(read)
    return read


def test_a_compiled_call_reads_and_writes_every_array_and_scalar_of_its_table():
    table = LAYOUT.table()
    a, b = np.arange(10, dtype=np.int64), np.arange(5, dtype=np.int32)
    c, d = np.zeros((2, 3), dtype=bool), np.zeros((2, 3, 4), dtype=np.int64)
    at = LAYOUT.scalar_word(0)
    table.set(0, (a, b, c, d), at, (11, -12))
    table.set_float(at + 2, 0.25)
    got = _reader()(table.words, at)
    assert got == (45, 10, (2, 3), (2, 3, 4), 11, -12, 0.25)
    assert c[1, 2] and d[1, 2, 3] == -7 and c.sum() == 1
    assert table.words[3 * SLOT_WORDS + 1:3 * SLOT_WORDS + 4].tolist() == [2, 3, 4]


def test_a_table_holds_its_arrays_until_their_slots_are_set_again():
    table = LAYOUT.table()
    table.set(0, (np.arange(1000, dtype=np.int64), np.arange(5, dtype=np.int32), np.zeros((2, 3), dtype=bool),
                  np.zeros((2, 3, 4), dtype=np.int64)))  # (the reader writes into the last two)
    gc.collect()  # the caller holds none of them: the table does
    assert table.held(0).sum() == 499500
    assert _reader()(table.words, LAYOUT.scalar_word(0))[0] == 499500
    table.set(0, (np.ones(3, dtype=np.int64),))
    assert table.held(0).tolist() == [1, 1, 1] and table.held(1).sum() == 10  # the others stay


@pytest.mark.parametrize("bad", [np.zeros(4, dtype=np.int32),  # another item size
                                 np.zeros((2, 2), dtype=np.int64),  # other dimensions
                                 np.zeros(8, dtype=np.int64)[::2]])  # not C order
def test_an_array_that_is_not_its_slot_s_kind_is_refused_and_nothing_changes(bad):
    table = LAYOUT.table()
    good = np.arange(3, dtype=np.int64)
    table.set(0, (good,))
    before = table.words.copy()
    with pytest.raises(InvalidArgument, match="slot 0"):
        table.set(0, (bad,), LAYOUT.scalar_word(0), (5,))
    assert np.array_equal(table.words, before) and table.held(0) is good


def test_slots_and_layouts_out_of_range_are_refused():
    table = LAYOUT.table()
    with pytest.raises(InvalidArgument, match="slots 4 to 5"):
        table.set(4, (np.zeros(1, dtype=np.uint8), np.zeros(1, dtype=np.uint8)))
    with pytest.raises(InvalidArgument, match="ndim must be 1, 2 or 3"):
        TableLayout(((np.int64, 4),))
    with pytest.raises(InvalidArgument, match="scalars must be >= 0"):
        TableLayout(((np.int64, 1),), scalars=-1)


def test_scalars_alone_are_written_without_a_compiled_call():
    table = LAYOUT.table()
    table.set(0, (), LAYOUT.scalar_word(1), (3, 4))
    assert table.words[LAYOUT.scalar_word(0):].tolist() == [0, 3, 4]
