"""Element types deltalog stores, and how each maps onto numpy.

Tensors are stored little-endian. numpy has no bfloat16, so a bfloat16
tensor is held as its raw 16-bit patterns (uint16) and carries the logical
name "bfloat16" beside it; arithmetic (significance, diff norms) widens it
to float32 by shifting the bits, which is exact.
"""

from __future__ import annotations

import numpy as np

from .errors import InvalidInput

# logical name -> little-endian storage dtype
STORAGE: dict[str, np.dtype] = {
    "float64": np.dtype("<f8"),
    "float32": np.dtype("<f4"),
    "float16": np.dtype("<f2"),
    "bfloat16": np.dtype("<u2"),
    "int64": np.dtype("<i8"),
    "int32": np.dtype("<i4"),
    "int16": np.dtype("<i2"),
    "int8": np.dtype("i1"),
    "uint64": np.dtype("<u8"),
    "uint32": np.dtype("<u4"),
    "uint16": np.dtype("<u2"),
    "uint8": np.dtype("u1"),
    "bool": np.dtype("?"),
}

FLOAT_TYPES = frozenset({"float64", "float32", "float16", "bfloat16"})


def storage_dtype(name: str) -> np.dtype:
    try:
        return STORAGE[name]
    except KeyError:
        raise InvalidInput(
            f"unsupported dtype {name!r}",
            hint="supported: " + ", ".join(sorted(STORAGE)),
        ) from None


def logical_name(dtype: np.dtype) -> str:
    """Logical deltalog name of a numpy dtype (ml_dtypes' bfloat16 included)."""
    dtype = np.dtype(dtype)
    if dtype.name == "bfloat16":  # ml_dtypes, when a caller has it
        return "bfloat16"
    name = dtype.newbyteorder("=").name if dtype.byteorder not in "=|" else dtype.name
    if name not in STORAGE or name == "bfloat16":
        raise InvalidInput(
            f"unsupported dtype {dtype}",
            hint="supported: " + ", ".join(sorted(STORAGE)),
        )
    return name


def to_storage(array: np.ndarray, name: str) -> np.ndarray:
    """View or convert ``array`` to the storage dtype of logical type ``name``.

    Byte order is normalised to little-endian; values never change.
    """
    target = storage_dtype(name)
    if array.dtype == target:
        return array
    if name == "bfloat16":
        # raw 16-bit patterns (uint16/int16/void) or ml_dtypes' bfloat16
        if array.dtype.itemsize != 2 or not (array.dtype.kind in "uiV" or array.dtype.name == "bfloat16"):
            raise InvalidInput(f"dtype {array.dtype} cannot be stored as bfloat16")
        if array.dtype.kind == "V" or array.dtype.name == "bfloat16":
            array = array.view(np.uint16)
        return array.astype(target, copy=False)
    if logical_name(array.dtype) != name:
        raise InvalidInput(f"dtype {array.dtype} cannot be stored as {name}")
    return array.astype(target)  # byte swap only


def bits_dtype(name: str) -> np.dtype:
    """Unsigned integer dtype of the same width: compares values bitwise."""
    return np.dtype(f"<u{storage_dtype(name).itemsize}")


def as_float(array: np.ndarray, name: str) -> np.ndarray:
    """Widen stored values to a float dtype for arithmetic (exact for bfloat16)."""
    if name == "bfloat16":
        widened = np.array(array, dtype=np.uint32)  # an array even for 0-d input
        widened <<= 16
        return widened.view(np.float32)
    if name in ("float64", "float32"):
        return array
    if name in FLOAT_TYPES:
        return array.astype(np.float32)
    return array.astype(np.float64)


def rows_differ(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per row: do the bytes of ``a`` and ``b`` differ? (compared in the widest words that tile a row)."""
    a, b = np.ascontiguousarray(a), np.ascontiguousarray(b)
    row_bytes = a.shape[1] * a.dtype.itemsize if a.ndim == 2 else a.dtype.itemsize
    if not row_bytes or not len(a):
        return np.zeros(len(a), dtype=bool)
    word = next(w for w in (8, 4, 2, 1) if row_bytes % w == 0)
    words = np.dtype(f"<u{word}")
    return np.any(a.reshape(len(a), -1).view(words) != b.reshape(len(b), -1).view(words), axis=1)


def row_significance(old: np.ndarray, new: np.ndarray, dtype: str) -> np.ndarray:
    """Per row: sum |new - old|, accumulated in float64; NaN counts 0, infinities are capped."""
    from . import kernels  # here: kernels imports this module

    compiled = kernels.row_abs_sums(old, new, dtype)  # float rows, one pass (every commit and sync)
    if compiled is not None:
        return compiled
    if dtype == "bool":
        return np.count_nonzero(old != new, axis=1).astype(np.float64)
    with np.errstate(invalid="ignore", over="ignore"):  # NaN/inf payloads are legal values
        # Narrow floats subtract in float32 (exact for float16/bfloat16 inputs, and
        # what float32 training sees); float64 and integers in float64.
        delta = np.abs(as_float(new, dtype) - as_float(old, dtype))
        sums = delta.sum(axis=1, dtype=np.float64)
    bad = ~np.isfinite(sums)
    if bad.any():  # rare: redo only the rows that hold NaN or inf
        cap = 1e300 if delta.dtype == np.float64 else np.finfo(np.float32).max  # sums of caps stay finite
        fixed = np.nan_to_num(delta[bad], nan=0.0, posinf=cap, neginf=0.0)
        sums[bad] = fixed.sum(axis=1, dtype=np.float64)
    return sums
