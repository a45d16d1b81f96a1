"""The row-level hot loops, compiled when deltalog._kernels was built, numpy otherwise.

``pip install`` compiles src/deltalog/_kernels.c when a C compiler is there
(setup.py marks it optional). Without it every function here falls back to
numpy and gives the same answers, only slower; ``deltalog --version`` tells
which is in use. Set DELTALOG_NO_KERNELS=1 to force the numpy code (tests
run both and compare them).

What the compiled loops buy (bench/RESULTS.md): a diff reads a few
scattered rows from two large maps and reduces them. numpy gathers them
into fresh arrays, then widens, subtracts, squares and reduces in separate
passes; the compiled loop reads a small block of rows of both sides into
cache, checks their digests and compares them in one pass, fetching the
next block's rows while it computes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from . import rowdigest
from .dtypes import STORAGE

try:
    from . import _kernels
except ImportError:  # built without a C compiler: numpy does everything
    _kernels = None

_enabled = _kernels is not None and not os.environ.get("DELTALOG_NO_KERNELS")

# Element kinds compare_rows knows (the numbering is _kernels.c's).
_KINDS = {"float32": 0, "float64": 1, "bfloat16": 2}


def available() -> bool:
    """True when the compiled loops were built (whether or not they are in use)."""
    return _kernels is not None


def enabled() -> bool:
    return _enabled


def set_enabled(on: bool) -> bool:
    """Use the compiled loops (when built) or numpy; returns the previous setting. For tests."""
    global _enabled
    before = _enabled
    _enabled = bool(on) and _kernels is not None
    return before


def _rows2d(array: np.ndarray) -> np.ndarray:
    """``array`` as C-contiguous (rows, row elements)."""
    array = np.ascontiguousarray(array)
    if array.ndim == 0:
        return array.reshape(1, 1)
    return array.reshape(array.shape[0], int(np.prod(array.shape[1:], dtype=np.int64)))


def gather_rows(table: np.ndarray, rows: np.ndarray, digests: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """(copy of ``table[rows]``, their row digests or None): one pass over the rows when compiled.

    ``table`` is a tensor's (rows, ...) array, usually a memory map; ``rows``
    are in range (the caller checked them).
    """
    idx = np.asarray(rows, dtype=np.int64)
    row_bytes = table.itemsize * int(np.prod(table.shape[1:], dtype=np.int64)) if table.ndim else 0
    if not _enabled or not table.flags.c_contiguous or not row_bytes:
        values = np.take(table, idx, axis=0)
        return values, rowdigest.row_digests(values) if digests else None
    values = np.empty((len(idx), *table.shape[1:]), dtype=table.dtype)
    out = np.empty(len(idx), dtype=np.uint64) if digests else None
    if len(idx):
        _kernels.gather_rows(table.reshape(-1).view(np.uint8), row_bytes, idx, values.reshape(-1).view(np.uint8), out)
    return values, out


def row_digests(values: np.ndarray) -> np.ndarray:
    """rowdigest.row_digests, compiled when available."""
    if not _enabled:
        return rowdigest.row_digests(values)
    rows = _rows2d(values)
    out = np.empty(rows.shape[0], dtype=np.uint64)
    if rows.shape[0]:
        _kernels.row_digests(rows.reshape(-1).view(np.uint8), rows.shape[1] * rows.dtype.itemsize, out)
    return out


def touch_rows(table: np.ndarray, rows: np.ndarray) -> None:
    """Fault the pages of rows ``rows`` of a writable (rows, ...) map in as writable, contents unchanged.

    A store into a clean page of a shared file map takes a write fault
    (page_mkwrite: ~3 us); a writer calls this on another thread while its
    log fsyncs, so the row stores after it do not wait on faults (the caller
    must not write these rows until it returns). Compiled only: without the
    loops it does nothing (the stores then fault as before).
    """
    if not _enabled or not len(rows) or not table.flags.c_contiguous or not table.size:
        return
    row_bytes = table.itemsize * int(np.prod(table.shape[1:], dtype=np.int64))
    _kernels.touch_rows(table.reshape(-1).view(np.uint8), row_bytes, np.asarray(rows, dtype=np.int64))


def shuffle_planes(array: np.ndarray, xor_with: np.ndarray | None = None) -> np.ndarray:
    """The byte planes of a C-contiguous array, shape (itemsize, elements), uint8: plane j holds
    byte j of every element, XORed first with the same byte of ``xor_with`` when given
    (codec.py's value sections). One compiled pass; numpy copies plane by plane."""
    itemsize = array.dtype.itemsize
    raw = array.reshape(-1).view(np.uint8)
    other = None if xor_with is None else xor_with.reshape(-1).view(np.uint8)
    if other is not None and other.size != raw.size:
        raise ValueError("xor_with must have the size of the array")
    if itemsize == 1 and other is None:
        return raw.reshape(1, -1)  # one plane: the bytes themselves, no copy
    out = np.empty((itemsize, raw.size // itemsize), dtype=np.uint8)
    if _enabled:
        _kernels.shuffle_planes(raw, itemsize, out, other)
        return out
    if other is not None:
        raw = np.bitwise_xor(raw, other)
    elements = raw.reshape(-1, itemsize)
    for j in range(itemsize):  # one plane at a time: ~1.4x faster than a transposed copy
        out[j] = elements[:, j]
    return out


def join_planes(planes: np.ndarray, dtype: np.dtype, xor_with: np.ndarray | None = None) -> np.ndarray:
    """The elements (a new 1-d array of ``dtype``) whose byte planes are the uint8 array ``planes``:
    shuffle_planes' inverse, each element XORed with the same one of ``xor_with`` when given. One
    compiled pass; numpy copies plane by plane, then XORs."""
    itemsize = dtype.itemsize
    if planes.size % itemsize:
        raise ValueError("planes must hold a whole number of elements")
    out = np.empty(planes.size // itemsize, dtype=dtype)
    raw = out.view(np.uint8)
    other = None if xor_with is None else np.ascontiguousarray(xor_with).reshape(-1).view(np.uint8)
    if other is not None and other.size != raw.size:
        raise ValueError("xor_with must have the size of the elements")
    if _enabled:
        _kernels.join_planes(planes, itemsize, raw, other)
        return out
    elements, n = raw.reshape(-1, itemsize), out.size
    for j in range(itemsize):  # one plane at a time: ~5x faster than a transposed copy
        elements[:, j] = planes[j * n : (j + 1) * n]
    if other is not None:
        np.bitwise_xor(raw, other, out=raw)
    return out


@dataclass
class RowComparison:
    """compare_rows' answer for n rows of A and B."""

    status: np.ndarray  # uint8 per row: 0 same bytes, 1 differ (numbers below), 2 differ (the caller computes)
    row_squares: np.ndarray  # float64 per row: sum of squared deltas (status 1 rows; 0 elsewhere)
    sum_abs: float  # sum of |delta| over status 1 rows
    max_abs: float  # max |delta| over status 1 rows (0.0 if none)
    bad_a: int | None = None  # first position whose row on A does not match its digest
    bad_b: int | None = None

    @classmethod
    def joined(cls, parts: list["RowComparison"]) -> "RowComparison":
        """The comparison of consecutive runs of rows, as one (digest positions are not carried over)."""
        if len(parts) == 1:
            return parts[0]
        return cls(np.concatenate([p.status for p in parts]), np.concatenate([p.row_squares for p in parts]),
                   sum(p.sum_abs for p in parts), max(p.max_abs for p in parts))


_KIND_BITS = 3  # rows compared bitwise only: status 2 where they differ


def compare_rows(a: np.ndarray, b: np.ndarray, dtype: str, rows: np.ndarray | None = None,
                 a_digests: np.ndarray | None = None, b_digests: np.ndarray | None = None) -> RowComparison | None:
    """Compare rows of A and B in one pass; None when the compiled loops are off.

    Without ``rows``, ``a`` and ``b`` are the rows themselves (same shape).
    With ``rows`` (sorted int64 row numbers), ``a`` and ``b`` are whole
    tensors (memory maps: nothing is copied) and ``a_digests`` /
    ``b_digests``, when given, are their stored row digests, checked for
    every row visited. Deltas are B - A in float64, exact for float32,
    float64 and bfloat16; rows of other dtypes that differ get status 2.
    """
    if not _enabled:
        return None
    kind = _KINDS.get(dtype, _KIND_BITS)
    a2, b2 = _rows2d(a), _rows2d(b)
    if a2.dtype != STORAGE.get(dtype) or b2.dtype != a2.dtype:  # the loops read little-endian storage bytes
        return None
    row_bytes = a2.shape[1] * a2.dtype.itemsize
    n = a2.shape[0] if rows is None else len(rows)
    status = np.zeros(n, dtype=np.uint8)
    squares = np.zeros(n, dtype=np.float64)
    if not n or not row_bytes:
        return RowComparison(status, squares, 0.0, 0.0)
    if kind == _KIND_BITS:
        a2, b2 = a2.reshape(-1).view(np.uint8), b2.reshape(-1).view(np.uint8)
    index = None if rows is None else np.ascontiguousarray(rows, dtype=np.int64)
    sum_abs, max_abs, bad_a, bad_b = _kernels.compare_rows(a2, b2, row_bytes, kind, index, a_digests, b_digests,
                                                           status, squares)
    return RowComparison(status, squares, sum_abs, max_abs, None if bad_a < 0 else bad_a, None if bad_b < 0 else bad_b)


def row_abs_sums(old: np.ndarray, new: np.ndarray, dtype: str) -> np.ndarray | None:
    """Per row, sum |new - old| in float64, NaN as 0 and infinities capped: dtypes.row_significance
    in one pass (to rounding); None where it is not compiled or not for this dtype (float32 and
    float64 rows, the others go to numpy)."""
    kind = _KINDS.get(dtype)
    if not _enabled or kind not in (0, 1) or old.ndim != 2 or old.shape != new.shape or not old.shape[1]:
        return None
    storage = STORAGE[dtype]
    out = np.empty(len(old), dtype=np.float64)
    _kernels.row_abs_sums(np.ascontiguousarray(old, dtype=storage), np.ascontiguousarray(new, dtype=storage),
                          kind, old.shape[1], out)
    return out


__all__ = ["RowComparison", "available", "compare_rows", "enabled", "gather_rows", "row_abs_sums", "row_digests",
           "set_enabled"]
