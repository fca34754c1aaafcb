"""Compiled byte parsers of the log importers (numba, ``cache=True``; imported by the importers on first use).

``int_lists`` reads the expert lists of a CSV routing log (``"[8, 26, 56]"``, one a row) straight from the bytes
of an Arrow string column in one pass, checking the grammar ``\\[\\d+(, ?\\d+)*\\]`` as it goes.
"""

from __future__ import annotations

import numba
import numpy as np

SATURATE = 1 << 40  # absurdly long ids stop growing (the importer refuses anything above int16 anyway)


@numba.njit(cache=True)
def int_lists(data, offsets, values):  # pragma: no cover - compiled
    """Parse the rows data[offsets[r]:offsets[r + 1]] into `values` (int16 [rows, k], k from the caller: the first
    row's count). Returns (first bad row or -1, first row holding an id above int16's range or -1, that id); a
    row that breaks the grammar or holds another count than k is the bad row, and ids stop at the first bad one."""
    rows, k = values.shape
    limit = np.iinfo(np.int16).max
    big_row, big = -1, 0
    for row in range(rows):
        pos, end = offsets[row], offsets[row + 1]
        if end - pos < 3 or data[pos] != 91:  # '['
            return row, big_row, big
        pos += 1
        count = 0
        closed = False
        while not closed:
            if pos >= end or data[pos] < 48 or data[pos] > 57:
                return row, big_row, big  # a number must start here
            value = 0
            while pos < end and 48 <= data[pos] <= 57:
                value = min(value * 10 + (np.int64(data[pos]) - 48), SATURATE)
                pos += 1
            if count == k or pos >= end:
                return row, big_row, big
            if value > limit and big_row < 0:
                big_row, big = row, value
            values[row, count] = value
            count += 1
            if data[pos] == 93:  # ']'
                closed = True
            elif data[pos] != 44:  # ','
                return row, big_row, big
            pos += 1
            if not closed and pos < end and data[pos] == 32:  # one optional space after a comma
                pos += 1
        if pos != end or count != k:
            return row, big_row, big
    return -1, big_row, big


@numba.njit(cache=True)
def first_repeat(rows):  # pragma: no cover - compiled
    """The first row of a 2-D int array that holds a value twice, or -1 (k is small: pairwise, no sort)."""
    for row in range(rows.shape[0]):
        for i in range(1, rows.shape[1]):
            for j in range(i):
                if rows[row, i] == rows[row, j]:
                    return row
    return -1
