"""Compiled byte parsers of the log importers (numba, ``cache=True``; imported by the importers on first use).

``int_lists`` reads the expert lists of a CSV routing log (``"[8, 26, 56]"``, one a row) straight from the bytes
of an Arrow string column in one pass, checking the grammar ``\\[\\d+(, ?\\d+)*\\]`` as it goes.
"""

from __future__ import annotations

import numba
import numpy as np

_SATURATE = 1 << 40  # absurdly long ids stop growing (the importer refuses anything above int16 anyway)


@numba.njit(cache=True)
def int_lists(data, offsets):  # pragma: no cover - compiled
    """(values int64 [rows * k], k, first bad row or -1) of the rows data[offsets[r]:offsets[r + 1]]; k is the
    count of the first row; a row that breaks the grammar or holds another count is the bad row."""
    rows = len(offsets) - 1
    k = 1
    for pos in range(offsets[0], offsets[1]):
        if data[pos] == 44:  # ','
            k += 1
    values = np.empty(rows * k, dtype=np.int64)
    for row in range(rows):
        pos, end = offsets[row], offsets[row + 1]
        if end - pos < 3 or data[pos] != 91:  # '['
            return values, k, row
        pos += 1
        count = 0
        closed = False
        while not closed:
            if pos >= end or data[pos] < 48 or data[pos] > 57:
                return values, k, row  # a number must start here
            value = 0
            while pos < end and 48 <= data[pos] <= 57:
                value = min(value * 10 + (data[pos] - 48), _SATURATE)
                pos += 1
            if count == k or pos >= end:
                return values, k, row
            values[row * k + count] = value
            count += 1
            if data[pos] == 93:  # ']'
                closed = True
            elif data[pos] != 44:  # ','
                return values, k, row
            pos += 1
            if not closed and pos < end and data[pos] == 32:  # one optional space after a comma
                pos += 1
        if pos != end or count != k:
            return values, k, row
    return values, k, -1


@numba.njit(cache=True)
def first_repeat(rows):  # pragma: no cover - compiled
    """The first row of a 2-D int array that holds a value twice, or -1 (k is small: pairwise, no sort)."""
    for row in range(rows.shape[0]):
        for i in range(1, rows.shape[1]):
            for j in range(i):
                if rows[row, i] == rows[row, j]:
                    return row
    return -1
