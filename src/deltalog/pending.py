"""A replica's partial-sync state: chunks applied ahead of its head.

A sync stopped by its budget (deltalog.sync) leaves chunks whose rows are
already in the tensor files while the head stays at the last complete
offset. They live in LMDB meta: ``sync.pending`` = {base, target, source,
chunks, buckets} and ``sync.chunk.N`` = encoded records holding the rows,
their new values and the values they replaced. Everything that reads the
model "at the head" (history, verify, replay, diff) must put those old
values back; this module is what they share, without depending on the
sync engine.

It also reads rows "at the head" for every such reader (:func:`head_values`),
which is what Replica.read_tensor stands on.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import numpy as np

from . import record as rec
from .errors import DeltalogError, IntegrityError

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
        return _read_chunks(replica, txn, replica.store.get_meta)


@contextmanager
def pending_in_place(replica: "Replica") -> Iterator[tuple[dict | None, list[memoryview]]]:
    """(sync.pending, its chunks) as :func:`read_pending` gives them, but as views into one
    read transaction, not copies: valid only inside the ``with`` (the pending chunks of a
    large sync weigh about its record; a finishing sync need not hold them twice)."""
    with replica.store.read() as txn:
        yield _read_chunks(replica, txn, replica.store.get_meta_blob)


def _read_chunks(replica: "Replica", txn, get) -> tuple[dict | None, list]:
    pending = replica.store.get_meta(txn, PENDING_KEY)
    if pending is None:
        return None, []
    blobs = []
    for n in range(pending["chunks"]):
        blob = get(txn, CHUNK_KEY.format(n))
        if blob is None:  # committed together with sync.pending: damage, not a race
            raise IntegrityError(f"{replica.path}: pending sync chunk {n} is missing")
        blobs.append(blob)
    return pending, blobs


def pending_buckets(pending: dict | None) -> dict[str, dict[int, int]]:
    """{tensor: {bucket: version}} of a pending partial sync (the destination's ``advanced``)."""
    if not pending:
        return {}
    return {name: dict(zip(b["b"], b["v"])) for name, b in pending["buckets"].items()}


def pending_views(replica: "Replica", blobs: list[bytes]) -> list[rec.RecordView]:
    """The pending chunks ``blobs`` opened for reading (headers checked), in the order they came."""
    return [rec.RecordView(blob, f"{replica.path}: pending sync chunk {n}") for n, blob in enumerate(blobs)]


def merged_tensor(views: list[rec.RecordView], name: str, rows_only: bool = False) -> rec.TensorDelta | None:
    """One tensor of the pending chunks ``views`` as one delta: newest value, first old value,
    newest version per row (None when no chunk holds it). Only that tensor is decoded, so a
    caller going tensor by tensor holds one tensor's values at a time, not every chunk's.
    ``rows_only``: its rows alone (no values, no versions)."""
    parts = [t for view in views for t in view.decode(only={name}, rows_only=rows_only).tensors]
    if not parts:
        return None
    if rows_only:
        rows = np.unique(np.concatenate([d.rows for d in parts]))
        return rec.TensorDelta(name, parts[0].dtype, rows, parts[0].new)
    if len(parts) == 1:  # each chunk's rows are sorted and unique
        d = parts[0]
        return rec.TensorDelta(name, d.dtype, d.rows, d.new, d.old, d.versions)
    rows = np.concatenate([d.rows for d in parts])
    order = np.argsort(rows, kind="stable")  # chunks in arrival order within a row
    rows = rows[order]
    change = rows[1:] != rows[:-1]
    first, last = np.r_[True, change], np.r_[change, True]
    rows, first, last = rows[last], order[first], order[last]
    versions = np.concatenate([d.versions for d in parts])[last]

    def gathered(key: str, at: np.ndarray) -> np.ndarray:
        # The parts' values go once joined: a tensor's values are held about twice, not three times.
        joined = np.concatenate([getattr(d, key) for d in parts])
        for d in parts:
            setattr(d, key, None)
        return joined[at]

    new = gathered("new", last)
    return rec.TensorDelta(name, parts[0].dtype, rows, new, gathered("old", first), versions)


def _merge_pending(replica: "Replica", blobs: list[bytes]) -> dict[str, rec.TensorDelta]:
    """Pending chunks as one delta per tensor (see :func:`merged_tensor`)."""
    views = pending_views(replica, blobs)
    names = dict.fromkeys(name for view in views for name in view.tensor_names())
    return {name: merged_tensor(views, name) for name in names}


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


def head_values(replica: "Replica", rows: dict[str, np.ndarray]) -> tuple[int, dict[str, np.ndarray]]:
    """(head, {name: values of ``rows[name]`` at the head}), read consistently across tensors.

    The tensor files hold the head, except for rows a pending partial sync
    already wrote: for those the value at the head is the
    one the first pending chunk replaced, and it is put back here.
    """
    for _attempt in range(100):
        marker = pending_marker(replica)
        head, values, torn = None, {}, False
        for name, wanted in rows.items():
            h, current = replica.read_rows(name, wanted)
            if head is not None and h != head:  # a writer moved between tensors
                torn = True
                break
            head, values[name] = h, current
        if torn or pending_marker(replica) != marker:
            continue
        if marker is not None and not _put_back_pending(replica, marker, values, rows):
            continue  # the partial sync moved on before its chunks were read: read the rows again
        return (replica.head if head is None else head), values
    raise DeltalogError(f"{replica.path}: the replica kept changing under the read", hint="retry")


_pending_cache: dict = {}  # (path, marker) -> {name: (rows, old)}: one entry, for repeated reads


def _put_back_pending(replica: "Replica", marker, values: dict[str, np.ndarray], rows: dict[str, np.ndarray]) -> bool:
    """Put back the head values of rows the pending partial sync ``marker`` wrote; False if it moved on."""
    key = (replica.path, marker)
    held = _pending_cache.get(key)
    if held is None:
        merged = merged_pending_at(replica, marker)
        if merged is None:
            return False
        held = {name: (d.rows, d.old) for name, d in merged.items()}
        _pending_cache.clear()
        _pending_cache[key] = held
    for name, (prows, pold) in held.items():
        if name not in rows or not len(prows):
            continue
        wanted = rows[name]
        pos = np.searchsorted(prows, wanted)
        posc = np.minimum(pos, len(prows) - 1)
        hit = (pos < len(prows)) & (prows[posc] == wanted)
        if hit.any():
            values[name][hit] = pold[posc[hit]]
    return True
