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

from collections.abc import Iterator
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
    pending = pending_state(replica)
    return None if pending is None else (pending["base"], pending["chunks"], pending["target"])


def pending_state(replica: "Replica") -> dict | None:
    """The replica's pending partial sync: {base, target, source, chunks, buckets} or None."""
    with replica.store.read() as txn:
        return replica.store.get_meta(txn, PENDING_KEY)


def iter_pending_chunks(replica: "Replica") -> Iterator[bytes]:
    pending = pending_state(replica)
    if pending is None:
        return
    for n in range(pending["chunks"]):
        with replica.store.read() as txn:
            blob = replica.store.get_meta(txn, CHUNK_KEY.format(n))
        if blob is None:
            raise IntegrityError(f"{replica.path}: pending sync chunk {n} is missing")
        yield blob


def pending_buckets(pending: dict | None) -> dict[str, dict[int, int]]:
    """{tensor: {bucket: version}} of a pending partial sync (the destination's ``advanced``)."""
    if not pending:
        return {}
    return {name: dict(zip(b["b"], b["v"])) for name, b in pending["buckets"].items()}


def _merge_pending(replica: "Replica") -> dict[str, rec.TensorDelta]:
    """All pending chunks as one delta per tensor: newest value, first old value, newest version."""
    parts: dict[str, list[rec.TensorDelta]] = {}
    for n, blob in enumerate(iter_pending_chunks(replica)):
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
    """{tensor: rows, newest values, values at the head, versions} of a pending partial sync ({} if none)."""
    return _merge_pending(replica) if pending_state(replica) is not None else {}


