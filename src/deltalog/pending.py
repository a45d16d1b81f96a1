"""A replica's partial-sync state: chunks applied ahead of its head.

A sync stopped by its budget (deltalog.sync) leaves chunks whose rows are
already in the tensor files while the head stays at the last complete
offset. They live in LMDB meta: ``sync.pending`` = {base, target, source,
chunks, buckets} and ``sync.chunk.N`` = encoded records holding the rows,
their new values and the values they replaced. Everything that reads the
model "at the head" (history, verify, replay, diff) must put those old
values back; this module is what they share, without depending on the
sync engine.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from . import record as rec
from .errors import IntegrityError

if TYPE_CHECKING:
    from .replica import Replica

PENDING_KEY = "sync.pending"
CHUNK_KEY = "sync.chunk.{:08d}"


def pending_marker(replica: "Replica"):
    """Something that changes whenever the pending state does (None when there is none)."""
    return _marker(pending_state(replica))


def _marker(pending: dict | None):
    return None if pending is None else (pending["base"], pending["chunks"], pending["target"])


def pending_state(replica: "Replica") -> dict | None:
    """The replica's pending partial sync: {base, target, source, chunks, buckets} or None."""
    with replica.store.read() as txn:
        return replica.store.get_meta(txn, PENDING_KEY)


def read_pending(replica: "Replica") -> tuple[dict | None, list[bytes]]:
    """(sync.pending, its chunks) read in ONE transaction, copied out of it.

    A reader does not hold the lock, so a sync may add a chunk or finish
    (deleting every chunk) at any moment: reading sync.pending and then each
    chunk in separate transactions could pair one state's list with another
    state's chunks. One LMDB read transaction sees one committed state.
    """
    with replica.store.read() as txn:
        pending = replica.store.get_meta(txn, PENDING_KEY)
        if pending is None:
            return None, []
        blobs = []
        for n in range(pending["chunks"]):
            blob = replica.store.get_meta(txn, CHUNK_KEY.format(n))
            if blob is None:  # committed together with sync.pending: damage, not a race
                raise IntegrityError(f"{replica.path}: pending sync chunk {n} is missing")
            blobs.append(blob)
    return pending, blobs


def pending_buckets(pending: dict | None) -> dict[str, dict[int, int]]:
    """{tensor: {bucket: version}} of a pending partial sync (the destination's ``advanced``)."""
    if not pending:
        return {}
    return {name: dict(zip(b["b"], b["v"])) for name, b in pending["buckets"].items()}


def _merge_pending(replica: "Replica", blobs: list[bytes]) -> dict[str, rec.TensorDelta]:
    """Pending chunks as one delta per tensor: newest value, first old value, newest version."""
    parts: dict[str, list[rec.TensorDelta]] = {}
    for n, blob in enumerate(blobs):
        record = rec.decode(blob, f"{replica.path}: pending sync chunk {n}")
        for t in record.tensors:
            parts.setdefault(t.name, []).append(t)
    merged = {}
    for name, deltas in parts.items():
        rows = np.concatenate([d.rows for d in deltas])
        new = np.concatenate([d.new for d in deltas])
        old = np.concatenate([d.old for d in deltas])
        versions = np.concatenate([d.versions for d in deltas])
        order = np.argsort(rows, kind="stable")  # chunks in arrival order within a row
        rows, new, old, versions = rows[order], new[order], old[order], versions[order]
        first = np.r_[True, rows[1:] != rows[:-1]]
        last = np.r_[rows[1:] != rows[:-1], True]
        merged[name] = rec.TensorDelta(name, deltas[0].dtype, rows[last], new[last], old[first], versions[last])
    return merged


def merged_pending(replica: "Replica") -> dict[str, rec.TensorDelta]:
    """{tensor: rows, newest values, values at the head, versions} of a pending partial sync ({} if none),
    all from one committed state of it."""
    _pending, blobs = read_pending(replica)
    return _merge_pending(replica, blobs)


def merged_pending_at(replica: "Replica", marker) -> dict[str, rec.TensorDelta] | None:
    """:func:`merged_pending` of the pending state ``marker`` (from :func:`pending_marker`) names,
    or None when the state has moved on since: a lock-free reader that read rows
    under ``marker`` must then read them again."""
    pending, blobs = read_pending(replica)
    return _merge_pending(replica, blobs) if _marker(pending) == marker else None
