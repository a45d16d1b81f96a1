"""The state digest: one 64-bit fingerprint of a whole model, kept up to date in O(rows changed).

Two replicas at the same offset hold the same model only if they share its
history; offsets alone cannot tell a follower that took a stray commit, or
a primary restored from an old state after a failover, from a faithful
copy. The state digest can: it is a function of the tensors' bytes alone,

    D = sum over tensors t, rows r of  term(t, r, d(t, r))   (mod 2^64)
    term(t, r, d) = fmix64(d XOR fmix64(t * 2^40 + r + GOLDEN))

where d(t, r) is the row digest the replica already keeps for every row
(deltalog.rowdigest) and fmix64 is murmur3's finaliser (a bijection of
u64). For a fixed row, term is a bijection of d, and d changes with any
change of the row's bytes, so changing one row always changes D; changes to
several rows cancel out only by chance (about 2^-64). It is not a
cryptographic hash: it detects honest divergence, not an adversary.

Because D is a sum, a write of k rows moves it by sum(term(new) - term(old))
over those rows: commit, sync and rollback keep it in O(k) from the row
digests they compute anyway. Every record carries D before and after it
(``pre_digest``, ``post_digest``, as Litestream's LTX files carry pre- and
post-apply checksums), meta/state holds D at the head, and a snapshot's
manifest D at its offset. formats/FORMAT.md section 7 is normative.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from .rowdigest import fmix64, reference_fmix64
from .rowdigest import reference_digest as reference_row_digest

MASK = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15
ROW_BITS = 40  # rows of one tensor below 2^40 get keys no other row of the model has
_BLOCK = 1 << 20  # rows per pass of a from-scratch digest: bounded scratch memory


def terms(tensor_id: int, rows: np.ndarray, row_digests: np.ndarray) -> np.ndarray:
    """term(t, r, d) for each row of one tensor, as a u64 array."""
    keys = np.asarray(rows, dtype=np.uint64) + np.uint64(((tensor_id << ROW_BITS) + GOLDEN) & MASK)
    mixed = fmix64(keys)
    mixed ^= np.asarray(row_digests, dtype=np.uint64)
    return fmix64(mixed)


def _sum(values: np.ndarray) -> int:
    return int(np.sum(values, dtype=np.uint64)) & MASK  # wraps mod 2^64, as the definition asks


def rows_sum(tensor_id: int, rows: np.ndarray, row_digests: np.ndarray) -> int:
    """The sum of the terms of some rows of one tensor (mod 2^64)."""
    if not len(rows):
        return 0
    return _sum(terms(tensor_id, rows, row_digests))


def tensor_sum(tensor_id: int, row_digests: np.ndarray) -> int:
    """The sum of the terms of every row of a tensor, from its row digests (rows 0..n-1), in bounded memory."""
    total = 0
    for start in range(0, len(row_digests), _BLOCK):
        block = np.asarray(row_digests[start : start + _BLOCK])
        total += rows_sum(tensor_id, np.arange(start, start + len(block), dtype=np.uint64), block)
    return total & MASK


def advance(digest: int, changes: Iterable[tuple[int, np.ndarray, np.ndarray, np.ndarray]]) -> int:
    """The state digest after writes of (tensor id, rows, their old row digests, their new row digests)."""
    for tensor_id, rows, old, new in changes:
        digest += rows_sum(tensor_id, rows, new) - rows_sum(tensor_id, rows, old)
    return digest & MASK


def to_hex(digest: int | None) -> str | None:
    """The digest as 16 lowercase hex digits (None stays None): what JSON and messages show."""
    return None if digest is None else f"{digest & MASK:016x}"


def from_hex(text) -> int | None:
    """A digest from :func:`to_hex` text (None, or anything that is not 16 hex digits, is None)."""
    if not isinstance(text, str) or len(text) != 16:
        return None
    try:
        return int(text, 16)
    except ValueError:
        return None


def reference_digest(tensors: Iterable[tuple[int, list[bytes]]]) -> int:
    """The definition in plain Python, for tests and other implementations: (tensor id, row bytes) -> D."""
    total = 0
    for tensor_id, rows in tensors:
        for r, row in enumerate(rows):
            key = reference_fmix64(((tensor_id << ROW_BITS) + r + GOLDEN) & MASK)
            total += reference_fmix64(reference_row_digest(row) ^ key)
    return total & MASK


__all__ = ["advance", "from_hex", "reference_digest", "rows_sum", "tensor_sum", "terms", "to_hex"]
