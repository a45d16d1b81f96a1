"""The destination side of a sync: how what a source sends changes a replica.

Every function here runs under the destination's writer lock and changes it
through deltalog.writer, so each is crash-safe in the same way:

- :func:`apply_whole`: the only chunk of a sync becomes its "sync" record at
  once, logged then applied like a commit (every round of ``sync --follow``);
- :func:`apply_chunk`: one chunk of a budgeted sync, applied ahead of the head
  as *pending* state (meta ``sync.pending`` + ``sync.chunk.N``, with this
  replica's own old values for undo); the head stays the last complete offset;
- :func:`finish_sync`: the pending chunks become ONE "sync" record (their rows
  are already in the files, so only the log moves);
- :func:`abort_pending`: pending chunks undone (intent ``sync.abort``);
- :func:`revert_sync`: a sync that ``sync --check`` rejected is undone as if it
  never happened (intent ``sync.revert``; deltalog.guard decides when);
- :func:`restore_snapshot`: a replica rebased onto a snapshot its source sent
  (intent ``sync.restore``); :func:`init_from_snapshot`: a new replica made from one.

Lineage (deltalog.lineage): a source's chunk says its state digest at the
destination's head (``pre_digest``, when the source holds that offset) and at
the target (``post_digest``). The destination refuses a chunk whose
``pre_digest`` is not its own digest, and a sync whose rows, applied here,
do not give the source's ``post_digest``: both raise Diverged before the
head moves, so a replica never claims an offset whose model it does not hold.

:data:`INTENTS` is the registry of this module's intents and their finishers,
which the replica hands to its writer for recovery.
"""

from __future__ import annotations

import os
# shutil is imported where it is used: it loads bz2 and lzma, ~2 ms of every command (issue 15).
import time
from functools import partial
from typing import TYPE_CHECKING

import numpy as np

from . import codec, heap, kernels, layout, lineage, tensorfiles
from . import record as rec
from .dtypes import row_significance
from .errors import (
    Diverged,
    IntegrityError,
    InvalidInput,
    ModelMismatch,
    StorageError,
    TransportError,
    UnsupportedVersion,
)
from .pending import (
    CHUNK_KEY,
    PENDING_KEY,
    merged_tensor,
    pending_buckets,
    pending_state,
    pending_in_place,
    pending_views,
    read_pending,
)
from .store import packed_bytes
from .writer import Change, RowChange, RowWrite, Writer, create_replica, keep_past_digests

if TYPE_CHECKING:
    from .replica import Replica

RESTORE_KEY = "sync.restore"
REVERT_KEY = "sync.revert"
ABORT_KEY = "sync.abort"
UNCONFIRMED_KEY = "sync.unconfirmed"
FOLLOW_KEY = "follow"


# =============================================================================
# what the destination is, for the sync engine
# =============================================================================


def sink_state(replica: "Replica") -> dict:
    """The Sink.begin description of an existing replica (deltalog.transport.base)."""
    pending = pending_state(replica)
    state = replica.state
    return {
        "exists": True,
        "model_id": replica.model_id,
        "head": state.head,
        "state_digest": lineage.to_hex(state.digest),
        "oldest_offset": replica.oldest_offset,
        "bucket_rows": replica.bucket_rows,
        "tensors": [{"name": t.name, "dtype": t.dtype, "shape": list(t.shape)} for t in replica.tensors],
        "advanced": pending_buckets(pending),
        "pending_target": None if pending is None else pending["target"],
        "pending_buckets": 0 if pending is None else sum(len(b["b"]) for b in pending["buckets"].values()),
        "chunk_codecs": [codec.BASE_XOR_VALUES],  # what this destination decodes, beyond plain values
    }


def note_follow(replica: "Replica", follow: dict) -> None:
    replica.writer.put_meta(FOLLOW_KEY, follow)


def follow_state(replica: "Replica") -> dict | None:
    return replica.meta(FOLLOW_KEY)


def diverged(destination: str, offset: int, mine: int | None, theirs: int | None,
             source: str = "its source") -> Diverged:
    """The error for a destination whose model at ``offset`` is not its source's (the engine's too)."""
    return Diverged(
        f"{destination} holds another model than {source} at offset {offset}: "
        f"state digest {lineage.to_hex(mine)} there, {lineage.to_hex(theirs)} at the source"
    )


def unprovable(replica: "Replica", target: int) -> UnsupportedVersion:
    return UnsupportedVersion(
        f"{replica.path}: the source sent no state digest for offset {target}, so this sync cannot be "
        "proven to give its model",
        hint="upgrade deltalog on the source (state digests came with format 4)",
    )


# =============================================================================
# chunks
# =============================================================================


def _checked_chunk(replica: "Replica", blob, target: int, head: int, rows_only: bool = False):
    """Decode a chunk from a source and check it fits ``replica`` at ``head``: (view, record, [(n, info, delta)]),
    ``n`` the tensor's number in the chunk. ``rows_only``: the values are left encoded (RecordView.new_values)."""
    view = rec.RecordView(blob, "chunk from the source")
    record = view.decode(with_old=False, rows_only=rows_only, keep_encoded=True)
    if record.model_id != replica.model_id:
        raise ModelMismatch(f"the source's deltas belong to model {record.model_id}, "
                            f"{replica.path} holds {replica.model_id}")
    if record.kind != "sync" or record.offset != target or record.base != head or target <= head:
        raise TransportError(
            f"the source sent a chunk for {record.base}->{record.offset} ({record.kind}); "
            f"expected {head}->{target}")
    out = []
    for n, t in enumerate(record.tensors):
        try:
            info = replica.info(t.name)
        except InvalidInput:
            raise ModelMismatch(f"the source sent tensor {t.name!r}, unknown to {replica.path}") from None
        if t.dtype != info.dtype or t.new.shape[1:] != (info.row_elems,):
            raise ModelMismatch(f"tensor {t.name!r}: the source sends {t.dtype} rows of {t.new.shape[1]} values, "
                                f"{replica.path} holds {info.dtype} rows of {info.row_elems}")
        if len(t.rows) and int(t.rows[-1]) >= info.rows:
            raise ModelMismatch(f"tensor {t.name!r}: the source sends row {int(t.rows[-1])}, "
                                f"{replica.path} has {info.rows} rows")
        if t.versions is None or (len(t.rows) and (int(t.versions.min()) <= head or int(t.versions.max()) > target)):
            raise TransportError(f"tensor {t.name!r}: chunk row versions missing or outside ({head}, {target}]")
        if len(t.rows) > 1 and not bool(np.all(t.rows[1:] > t.rows[:-1])):
            raise TransportError(f"tensor {t.name!r}: chunk rows are not sorted and unique")
        if len(t.rows):
            out.append((n, info, t))
    _check_pre(replica, record, head)
    return view, record, out


def _check_pre(replica: "Replica", record: rec.Record, head: int) -> None:
    """Diverged unless the source's digest at our head (when it sent one) is ours."""
    mine = replica.state.digest
    if record.pre_digest is not None and mine is not None and record.pre_digest != mine:
        raise diverged(replica.path, head, mine, record.pre_digest)


def _check_post(replica: "Replica", head: int, target: int, claimed: int | None):
    """A check for Writer.append: Diverged unless our digest after the sync is the source's at ``target``."""

    def check(computed: int | None) -> None:
        if claimed is None:
            raise unprovable(replica, target)
        if computed != claimed:
            raise Diverged(
                f"{replica.path} holds another model than its source at offset {head}: the source's rows "
                f"for {head}->{target} give state digest {lineage.to_hex(computed)} here, "
                f"{lineage.to_hex(claimed)} at the source"
            )

    return check


# A chunk's new values stay decoded for its row writes while they total at most this;
# past it, each tensor's are decoded again from the chunk when written. Small syncs
# (every round of ``sync --follow``, a budgeted sync's small chunks) then pay no second
# decode, and a big chunk holds one tensor's values at a time (issue 15: memory
# <= 64 MiB + 2x the change).
KEEP_DECODED_BYTES = 16 << 20


class HandedOver:
    """A chunk handed to apply_whole or apply_chunk by a caller that keeps no other reference to
    it (the stdio server's request frame), so it can go before LMDB copies what it became."""

    __slots__ = ("blob",)

    def __init__(self, blob):
        self.blob = blob

    def take(self):
        blob, self.blob = self.blob, None
        return blob


def _keep_decoded(parts) -> tuple[bool, list[int]]:
    """(keep the new values decoded?, each tensor's value bytes) for a chunk's ``parts``."""
    value_bytes = [len(t.rows) * info.row_bytes for _n, info, t in parts]
    return sum(value_bytes) <= KEEP_DECODED_BYTES, value_bytes


def _received_values(replica: "Replica", view: rec.RecordView, n: int, info, delta: rec.TensorDelta, keep: bool):
    """Put tensor ``n`` of a received chunk on ``delta``: its new values, and this replica's old ones.

    Returns (the old values' row digests, None on a replica without digest files;
    how the row write gets the new values again: None when they are kept).
    """
    delta.old, old_digests = replica.writer.old_rows(info, delta.rows.astype(np.intp))  # checked against the row digests
    delta.new = view.new_values(n, base=delta.old if view.needs_base(n) else None)
    return old_digests, None if keep else (lambda: view.new_values(n))


def _sealed(info, delta: rec.TensorDelta, load=None, written: bool = False) -> tuple[rec.TensorDelta, RowWrite]:
    """(``delta`` with every section encoded now and its values let go, the write of its rows).

    What a destination keeps of a tensor it is done with, so it holds one
    tensor's values at a time, not a chunk's or a sync's: the sections (those
    received are stored as they came; the undo section is encoded here) and
    the new values' row digests. The write keeps the new values, or with
    ``load`` decodes them again when the rows are written; rows already
    ``written`` (a finished partial sync) keep only their digests.
    """
    values = None if load is not None or written else delta.new
    write = RowWrite(info, delta.rows, values, kernels.row_digests(delta.new), load=load)
    # The old values are our copy, read for the last time; a destination's memory follows the change.
    sealed = rec.compressed(delta, spoil_old=True, low_memory=True)
    delta.new, delta.old = sealed.new, None  # the chunk's decoded record holds ``delta`` too
    return sealed, write


def _own_change(info, delta: rec.TensorDelta, old_digests: np.ndarray | None = None, load=None,
                written: bool = False) -> RowChange:
    """One tensor's part of this replica's "sync" record: ``delta`` (new values, this replica's old
    ones) with its significance taken against those old values, sealed (:func:`_sealed`)."""
    row_sig = row_significance(delta.old, delta.new, info.dtype)
    delta.significance = float(row_sig.sum())
    if old_digests is None:
        old_digests = kernels.row_digests(delta.old)
    sealed, write = _sealed(info, delta, load, written)
    return RowChange(info, sealed, row_sig, old_digests, write)


def apply_whole(replica: "Replica", blob, target: int, follow: dict | None) -> int:
    """Apply the ONLY chunk of a sync as its final record, the way a commit is applied; returns its rows.

    The fast path of small syncs (every round of ``sync --follow``): no
    pending partial-sync state, no fsync of the tensor files. One
    transaction logs the record (new values, this replica's old values,
    per-row versions, the source's history), the bucket versions, the
    follower metadata and head = target; then the rows are written; then a
    second transaction marks them applied. The tensor files are fsynced later
    (LocalSink's schedule): after a machine crash the log re-applies what the
    page cache lost, as for commits.
    """
    head = replica.head
    if pending_state(replica) is not None:
        raise IntegrityError(f"{replica.path}: a partial sync is pending; its chunks must be finished, not bypassed")
    changes, record = _received_changes(replica, blob, target, head, logged=lambda i: partial(_logged_values, replica,
                                                                                            target, i))
    replica.writer.append(
        "sync", changes, offset=target, target=target, history=record.history,
        log=None if follow is None else (lambda txn: replica.store.put_meta(txn, FOLLOW_KEY, follow)),
        expect_digest=_check_post(replica, head, target, record.post_digest),
    )
    return sum(len(c.delta.rows) for c in changes)


def _received_changes(replica: "Replica", chunk, target: int, head: int, logged, own: bool = True):
    """(the changes of a received chunk, sealed tensor by tensor; the chunk's Record, values not decoded).

    ``own``: each change's significance is this replica's own (a record), else the source's (a
    stored pending chunk). ``logged(i)`` makes the ``load`` of the i-th change's row write from
    the log, for a chunk handed over (:class:`HandedOver`): the chunk is then referenced only
    by the sections it gives the record, and goes when they are copied into it, before LMDB
    copies the record. So does a tensor whose values came relative to ours (the values they
    were relative to are overwritten by then). Otherwise the row writes decode the chunk again
    (or keep the values).
    """
    handed = isinstance(chunk, HandedOver)
    blob = chunk.take() if handed else chunk
    view, record, parts = _checked_chunk(replica, blob, target, head, rows_only=True)
    keep, value_bytes = _keep_decoded(parts)
    # Largest first: a tensor's values and their transients come on top of the sections sealed
    # before it, so the largest one's come when the fewest are held (4 GiB, a minute of
    # changes: the far end's peak +154..159 -> +141..142 MiB). The changes keep the chunk's order.
    order = sorted(range(len(parts)), key=lambda i: -value_bytes[i])
    # The rows are known now, long before the record: their pages fault in on another core
    # while this one decodes and re-encodes, and the reads of their old values fault no more.
    replica.writer.touch_ahead([(parts[i][1], parts[i][2].rows) for i in order])
    changes: list = [None] * len(parts)
    for i in order:
        n, info, t = parts[i]
        old_digests, load = _received_values(replica, view, n, info, t, keep)
        if (handed or view.needs_base(n)) and load is not None:  # relative values: the old ones are gone then
            load = logged(i)
        if own:
            changes[i] = _own_change(info, t, old_digests, load)
        else:  # a pending chunk: the source's significance stays, as the chunk said it; no index work
            sealed, write = _sealed(info, t, load)
            changes[i] = RowChange(info, sealed, None, None, write)
        heap.release(value_bytes[i])  # this tensor's arrays are gone: their pages too, before the next one's
    record.tensors = []  # the values' sections: the changes hold them now
    return changes, record


def apply_chunk(replica: "Replica", blob, target: int, source: str) -> dict:
    """Apply one chunk from a source as pending partial-sync state (atomic, durable).

    Tensor by tensor, as :func:`apply_whole`: the chunk is stored with this
    replica's old values (its undo) and its rows written, holding one
    tensor's values at a time.
    """
    head = replica.head
    pending = pending_state(replica)
    if pending is not None and (pending["base"] != head or pending["target"] > target):
        raise IntegrityError(f"{replica.path}: pending sync to {pending['target']} does not fit a sync to {target}")
    store = replica.store
    result = {}
    changes, record = _received_changes(replica, blob, target, head, own=False,
                                        logged=lambda i: partial(_stored_chunk_values, replica, result, i))
    deltas = [c.delta for c in changes]
    writes = [c.write for c in changes]
    bucket_updates = [(c.info, *_bucket_maxima(c.delta.rows, c.delta.versions, replica.bucket_rows)) for c in changes]
    del changes
    # The stored chunk keeps the source's claims: its digest at the target, and its history.
    # It is joined once, into the meta value it is stored as.
    stored = [packed_bytes(rec.encode_parts(
        rec.Record(offset=target, base=head, kind="sync", time=time.time(), model_id=replica.model_id, tensors=deltas,
                   target=target, pre_digest=record.pre_digest, post_digest=record.post_digest,
                   history=record.history),
        replica.record_encoding))]
    for d in deltas:  # in the stored chunk now: not twice in memory while LMDB copies it
        d.encoded = None
    heap.release(len(stored[0]))

    def log_it(txn):
        p = store.get_meta(txn, PENDING_KEY) or {"base": head, "target": target, "source": source,
                                                  "chunks": 0, "buckets": {}}
        n = result["chunk"] = p["chunks"]
        store.put_meta_packed(txn, CHUNK_KEY.format(n), stored[0])
        for info, buckets, versions in bucket_updates:
            entry = p["buckets"].setdefault(info.name, {"b": [], "v": [], "ov": [], "os": []})
            where = {b: i for i, b in enumerate(entry["b"])}
            for b, v in zip(buckets, versions):
                prior = store.get_bucket(txn, info.id, b)
                i = where.get(b)
                if i is None:
                    entry["b"].append(b)
                    entry["v"].append(v)
                    entry["ov"].append(-1 if prior is None else prior[0])
                    entry["os"].append(0.0 if prior is None else prior[1])
                else:
                    entry["v"][i] = v
                store.put_bucket(txn, info.id, b, v, 0.0 if prior is None else prior[1])
        p.update(chunks=n + 1, target=target, source=source)
        store.put_meta(txn, PENDING_KEY, p)
        result["pending_buckets"] = sum(len(e["b"]) for e in p["buckets"].values())

    # Durable: the head does not move, so nothing else would tell a machine crash
    # that these rows were lost with the page cache.
    replica.writer.transition(Change(log=log_it, state={"applying": target}, rows=writes, durable=True,
                                     logged=stored.clear))  # only the first transaction needs it
    return {"rows": sum(len(d.rows) for d in deltas), "pending_buckets": result["pending_buckets"]}


def _logged_values(replica: "Replica", offset: int, n: int) -> np.ndarray:
    """The new values of tensor number ``n`` of the record at ``offset``, decoded from the log."""
    with replica.store.read() as txn:  # decoded values are fresh arrays: nothing outlives the transaction
        return rec.RecordView(replica.store.get_record(txn, offset), f"{replica.path}: record {offset}").new_values(n)


def _stored_chunk_values(replica: "Replica", result: dict, n: int) -> np.ndarray:
    """The new values of tensor number ``n`` of the pending chunk apply_chunk just stored (``result["chunk"]``)."""
    key = CHUNK_KEY.format(result["chunk"])
    with replica.store.read() as txn:
        return rec.RecordView(replica.store.get_meta_blob(txn, key), f"{replica.path}: pending sync chunk "
                              f"{result['chunk']}").new_values(n)


def _bucket_maxima(rows: np.ndarray, versions: np.ndarray, bucket_rows: int) -> tuple[list[int], list[int]]:
    buckets = (rows // np.uint64(bucket_rows)).astype(np.int64)
    starts = np.flatnonzero(np.r_[True, buckets[1:] != buckets[:-1]])
    return buckets[starts].tolist(), np.maximum.reduceat(versions, starts).tolist()


def finish_sync(replica: "Replica", target: int, follow: dict | None, expected: int | None = None) -> int:
    """Replace the pending chunks by one "sync" record at ``target`` (one transaction); returns the head.

    The rows are already in the tensor files (fsynced by apply_chunk, or
    re-applied by recovery), so only the log moves. The chunks are merged
    tensor by tensor (one tensor's values in memory at a time, however many
    chunks the sync took). When the rows, taken as
    a change of the model at the head, do not give the source's digest at
    the target (its chunks' claim, or ``expected`` from its hello), the
    pending chunks are undone and Diverged raised.
    """
    head = replica.head
    if target <= head:
        raise InvalidInput(f"{replica.path}: sync target {target} is not after the head {head}")
    with pending_in_place(replica) as (pending, blobs):  # read in place: the chunks weigh about the record
        if pending is not None and (pending["base"] != head or pending["target"] > target):
            raise IntegrityError(f"{replica.path}: pending sync to {pending['target']} does not fit a sync to {target}")
        newest = rec.summarize(blobs[-1], f"{replica.path}: pending sync chunk {len(blobs) - 1}") if blobs else None
        history = _carried_history(replica, blobs)
        ours = newest is not None and newest.offset == target and newest.post_digest is not None
        claimed = newest.post_digest if ours else expected
        if expected is not None and claimed != expected:
            raise TransportError(f"the source's chunks say state digest {lineage.to_hex(claimed)} at offset {target}, "
                                 f"its hello {lineage.to_hex(expected)}")
        changes = _merged_changes(replica, blobs)  # nothing of the chunks' memory outlives the transaction
        del blobs
    check = _check_post(replica, head, target, claimed)

    def check_or_undo(computed):
        try:
            check(computed)
        except Diverged:
            abort_pending(replica)
            raise

    def log_it(txn):
        if pending is not None:
            _drop_pending(replica.store, txn, pending)
        if follow is not None:
            replica.store.put_meta(txn, FOLLOW_KEY, follow)

    # `flushed` stays where it is: after a machine crash the log re-applies this
    # record too, which is harmless (absolute values).
    replica.writer.append("sync", changes, offset=target, target=target, history=history,
                          log=log_it, rows_written=True, expect_digest=check_or_undo)
    return target


def _carried_history(replica: "Replica", blobs: list) -> list | None:
    """The source's history a pending sync's chunks carry: the first chunk of a run has it, the
    others None (sync.source_chunks), so the newest chunk of a sync that took several has none."""
    for n, blob in enumerate(blobs):
        history = rec.summarize(blob, f"{replica.path}: pending sync chunk {n}").history
        if history is not None:
            return history
    return None


def _merged_changes(replica: "Replica", blobs: list[bytes]) -> list[RowChange]:
    """The pending chunks ``blobs`` as the changes of one record, merged and sealed tensor by
    tensor: one tensor's values in memory at a time, never every chunk's."""
    views = pending_views(replica, blobs)
    held = [view.tensor_rows() for view in views]
    rows_at_most = {info.name: sum(h.get(info.name, 0) for h in held) * info.row_bytes for info in replica.tensors}
    changes = {}
    # Largest first, as _received_changes: its merge comes on top of the fewest sealed sections.
    for info in sorted(replica.tensors, key=lambda info: -rows_at_most[info.name]):
        d = merged_tensor(views, info.name)
        if d is not None and len(d.rows):
            nbytes = d.new.nbytes + d.old.nbytes
            heap.release(nbytes)  # what merging them took, before compressing them takes as much again
            changes[info.id] = _own_change(info, d, written=True)  # apply_chunk wrote its rows
            del d
            heap.release(nbytes)
    return [changes[info.id] for info in replica.tensors if info.id in changes]  # in the model's order


def _drop_pending(store, txn, pending: dict) -> None:
    for n in range(pending["chunks"]):
        store.delete_meta(txn, CHUNK_KEY.format(n))
    store.delete_meta(txn, PENDING_KEY)


def _restore_bucket_entries(replica: "Replica", txn, buckets: dict) -> None:
    """Put back bucket index entries as a partial sync found them (ov -1: the bucket had none)."""
    for name, entry in buckets.items():
        tid = replica.info(name).id
        for b, ov, os_ in zip(entry["b"], entry["ov"], entry["os"]):
            if ov < 0:
                replica.store.delete_bucket(txn, tid, b)
            else:
                replica.store.put_bucket(txn, tid, b, ov, os_)


def abort_pending(replica: "Replica") -> None:
    """Undo a pending partial sync: rows back to their values at the head, bucket index restored."""
    if pending_state(replica) is None:
        return
    replica.writer.run_intent(ABORT_KEY, {"head": replica.head}, applying=replica.head)


def _finish_abort(writer: Writer, _value) -> None:
    replica = writer.replica
    _pending, blobs = read_pending(replica)
    views = pending_views(replica, blobs)
    undo = []
    for name in dict.fromkeys(name for view in views for name in view.tensor_names()):
        # Each tensor's old values made when its rows are written: one tensor's values at a time.
        rows = merged_tensor(views, name, rows_only=True).rows
        undo.append(RowWrite(replica.info(name), rows, None, load=lambda name=name: merged_tensor(views, name).old))

    def drop(txn):
        current = replica.store.get_meta(txn, PENDING_KEY)
        if current is not None:
            _restore_bucket_entries(replica, txn, current["buckets"])
            _drop_pending(replica.store, txn, current)
        replica.store.delete_meta(txn, ABORT_KEY)

    writer.transition(Change(rows=undo, durable=True, settle=drop))


def _reapply_pending(writer: Writer, pending: dict) -> None:
    """Recovery: write the rows of every pending chunk again (absolute values; the head is not theirs)."""
    replica = writer.replica
    _p, blobs = read_pending(replica)
    for n, blob in enumerate(blobs):
        record = rec.decode(blob, f"{replica.path}: pending sync chunk {n}", with_old=False)
        writer.write_rows([RowWrite(replica.info(t.name), t.rows, t.new) for t in record.tensors])


# =============================================================================
# a sync that its check rejected (deltalog.guard)
# =============================================================================


def unconfirmed(replica: "Replica") -> dict | None:
    """The marker of a sync not yet accepted by its check, if it still describes the head."""
    marker = replica.meta(UNCONFIRMED_KEY)
    return marker if marker is not None and marker["target"] == replica.head else None


def mark_unconfirmed(replica: "Replica", target: int) -> None:
    """Before a guarded sync finishes: remember how to undo it (lock held)."""
    pending = pending_state(replica)
    state = replica.state
    replica.writer.put_meta(UNCONFIRMED_KEY, {"target": target, "base": state.head, "digest": state.digest,
                                              "buckets": pending["buckets"] if pending else {}})


def confirm(replica: "Replica") -> None:
    replica.writer.delete_meta(UNCONFIRMED_KEY)


def revert_sync(replica: "Replica", marker: dict) -> None:
    """Undo the sync record at the head that ``marker`` describes, as if it never happened (lock held).

    Not a rollback record: a follower keeps its source's offsets, and a local
    record would take an offset that belongs to the source.
    """
    replica.writer.run_intent(REVERT_KEY, marker, applying=marker["base"])


def _finish_revert(writer: Writer, marker: dict) -> None:
    """Write the undo values, fsync, then drop the record in one transaction (idempotent)."""
    replica = writer.replica
    target, base = marker["target"], marker["base"]
    undo, digest = [], marker.get("digest")
    if replica.has_record(target):  # else the final transaction already ran
        record = rec.decode(replica.record_blob(target), f"{replica.path}: record {target}")
        undo = [RowWrite(replica.info(t.name), t.rows, t.old) for t in record.tensors if t.old is not None]
        digest = record.pre_digest if record.pre_digest is not None else digest

    def drop(txn):
        store = replica.store
        if store.get_record(txn, target) is not None:
            store.delete_record(txn, target)
        _restore_bucket_entries(replica, txn, marker["buckets"])
        store.delete_meta(txn, REVERT_KEY)
        store.delete_meta(txn, UNCONFIRMED_KEY)

    writer.transition(Change(rows=undo, durable=True, settle=drop, settled={"head": base, "digest": digest}))


# =============================================================================
# snapshots
# =============================================================================


REFETCH_HINT = ("run the sync again to fetch it anew; if it fails the same way, the source's snapshot is damaged: "
                "'deltalog verify' on the source names the repair")


def snapshot_digest(directory: str, manifest: dict) -> int:
    """The state digest of a snapshot's files in ``directory`` (reads every byte)."""
    total = 0
    for n, entry in enumerate(manifest["tensors"]):
        info = tensorfiles.TensorInfo(n, entry["name"], entry["dtype"], tuple(entry["shape"]))
        total += tensorfiles.file_state_sum(os.path.join(directory, entry["file"]), info)
    return total & lineage.MASK


def _check_claim(where: str, manifest: dict, digest: int) -> None:
    claimed = lineage.from_hex(manifest.get("state_digest"))
    if claimed is not None and claimed != digest:
        raise IntegrityError(f"{where}: the snapshot's files give state digest {lineage.to_hex(digest)}, "
                             f"its manifest says {lineage.to_hex(claimed)}", hint=REFETCH_HINT)


def _bucket_entries(replica_tensors, bucket_rows: int, manifest: dict):
    """(tensor id, bucket, version) from a source manifest's bucket_versions, capped at its offset."""
    cap = manifest["offset"]
    by_name = {t.name: t for t in replica_tensors}
    for name, entry in (manifest.get("bucket_versions") or {}).items():
        info = by_name.get(name)
        if info is None:
            continue
        nb = info.buckets(bucket_rows)
        for b, v in zip(entry.get("buckets", []), entry.get("versions", [])):
            if 0 <= int(b) < nb:
                yield info.id, int(b), min(int(v), cap)


def _local_manifest(manifest: dict, digest: int) -> dict:
    local = {**{k: manifest[k] for k in ("offset", "model_id", "tensors")}, "state_digest": lineage.to_hex(digest)}
    made_at = tensorfiles.manifest_time(manifest)
    if made_at is not None:
        local["time"] = made_at
    return local


def restore_snapshot(replica: "Replica", manifest: dict, staged: str | None = None, keep_history: bool = False) -> None:
    """Rebase a replica on a snapshot its source sent (lock held).

    ``keep_history``: the sync proved the replica held the source's model at
    its head (not a reseed), so the state digests of the records and
    snapshots the rebase drops stay in meta/past_digests, as compaction
    keeps them: a follower standing on one of them can still be proven to
    hold this history. Otherwise they are another history's and go.

    The snapshot's files are complete under ``snapshots/OFFSET/``, or, when
    a snapshot of this replica's own is registered at that offset (a reseed
    of another history), complete in ``staged`` and swapped in by the
    finisher. One transaction drops the old log, pending state and bucket
    index, registers the snapshot, sets oldest = head = its offset and its
    state digest, and records the intent ``sync.restore``; then the files are
    copied over the tensor files; then the intent goes.
    """
    import shutil

    offset = manifest["offset"]
    where = staged or tensorfiles.snapshot_path(replica.path, offset)
    digest = snapshot_digest(where, manifest)
    _check_claim(f"{replica.path}: snapshot {offset}", manifest, digest)
    local = _local_manifest(manifest, digest)
    old_snaps = [o for o in replica.snapshot_offsets() if o != offset]
    store = replica.store
    entries = list(_bucket_entries(replica.tensors, replica.bucket_rows, manifest))

    def rebase(txn):
        if keep_history:  # proven the source's: what it leaves behind still vouches for its followers
            state = store.get_meta(txn, "state")
            head = {state["head"]: state["digest"]} if state.get("digest") is not None else {}
            keep_past_digests(store, txn, replica.path, (1 << 64) - 1, old_snaps, (offset, digest), known=head)
        else:
            store.clear_past_digests(txn)  # they were its old history's, not the source's
        store.delete_records(txn, upto=(1 << 64) - 1)
        pending = store.get_meta(txn, PENDING_KEY)
        if pending is not None:
            _drop_pending(store, txn, pending)
        store.clear_buckets(txn)
        for tid, b, v in entries:
            store.put_bucket(txn, tid, b, v, 0.0)
        for o in old_snaps:
            store.delete_snapshot(txn, o)
        store.put_snapshot(txn, local)
        store.put_meta(txn, "oldest", offset)
        store.delete_meta(txn, UNCONFIRMED_KEY)  # it described a head this replica no longer has

    intent = {"offset": offset, "staged": None if staged is None else os.path.basename(staged)}
    replica.writer.run_intent(RESTORE_KEY, intent, log=rebase, head=offset, applied=offset, applying=offset,
                              flushed=offset, digest=digest)
    for o in old_snaps:
        shutil.rmtree(tensorfiles.snapshot_path(replica.path, o), ignore_errors=True)


def _finish_restore(writer: Writer, intent) -> None:
    """Swap a staged snapshot in (if any), copy it over the tensor files, drop the intent (idempotent)."""
    import shutil

    replica = writer.replica
    if not isinstance(intent, dict):  # format 3 wrote the offset alone
        intent = {"offset": intent, "staged": None}
    offset = intent["offset"]
    final = tensorfiles.snapshot_path(replica.path, offset)
    if intent.get("staged"):
        staged = os.path.join(os.path.dirname(final), intent["staged"])
        if os.path.isdir(staged):  # not swapped in yet
            if os.path.lexists(final):
                shutil.rmtree(final)
            os.rename(staged, final)
            tensorfiles.fsync_dir(os.path.dirname(final))
    manifest = next(m for m in replica.snapshots() if m["offset"] == offset)
    writer.maps.forget()

    def copy() -> None:
        tensorfiles.copy_snapshot_into_tensors(replica.path, manifest)

    writer.transition(Change(apply=copy, settle=lambda txn: replica.store.delete_meta(txn, RESTORE_KEY)))


def init_from_snapshot(staging: str, path: str, hello: dict, manifest: dict) -> None:
    """Turn ``staging`` (holding a verified snapshots/<offset>/) into a replica, then rename it to ``path``.

    The lower-level twin of Replica.init for bounded memory: tensor files are
    copied from the snapshot file by file, never loaded whole. The new
    replica has the source's model id, bucket size and tensor layout, and
    starts at the snapshot's offset (oldest = head = offset).
    """
    import shutil

    try:
        _build_from_snapshot(staging, path, hello, manifest)
    except (OSError, StorageError) as exc:
        # What is only a copy goes, so a full disk is not left fuller; the received
        # snapshot stays, for the next run to resume from.
        for name in (tensorfiles.TENSOR_DIR, layout.LOG_DIR):
            shutil.rmtree(os.path.join(staging, name), ignore_errors=True)
        reason = exc.strerror if isinstance(exc, OSError) else str(exc)
        raise StorageError(
            f"{path}: cannot create the replica from the received snapshot: {reason or exc}",
            hint=f"free disk space (it needs about twice the model's size) and run the sync again: it "
                 f"resumes from the snapshot kept in {staging} (delete that directory to give up)",
        ) from None


def _build_from_snapshot(staging: str, path: str, hello: dict, manifest: dict) -> None:
    import shutil

    offset = manifest["offset"]
    os.makedirs(os.path.join(staging, tensorfiles.TENSOR_DIR), exist_ok=True)
    snap = tensorfiles.snapshot_path(staging, offset)
    infos = [tensorfiles.TensorInfo(i, t["name"], t["dtype"], tuple(t["shape"])) for i, t in enumerate(hello["tensors"])]
    digest = 0
    for info, entry in zip(infos, manifest["tensors"]):
        dst = os.path.join(staging, tensorfiles.TENSOR_DIR, entry["file"])
        shutil.copyfile(os.path.join(snap, entry["file"]), dst)
        with open(dst, "rb+") as f:
            os.fsync(f.fileno())
        tensorfiles.write_digests_of_file(dst, info)  # the follower's rows are checked too
        digest += lineage.tensor_sum(info.id, tensorfiles.map_digests(tensorfiles.digest_path(dst), info, False))
    digest &= lineage.MASK
    _check_claim(f"{path}: snapshot {offset}", manifest, digest)
    tensorfiles.recache_live_files(os.path.join(staging, tensorfiles.TENSOR_DIR), infos)
    tensorfiles.fsync_dir(os.path.join(staging, tensorfiles.TENSOR_DIR))
    log_dir = os.path.join(staging, layout.LOG_DIR)
    shutil.rmtree(log_dir, ignore_errors=True)  # a half-made log from a crashed attempt
    model = {"model_id": hello["model_id"], "bucket_rows": int(hello["bucket_rows"]),
             "tensors": [i.to_meta() for i in infos], "created": time.time()}
    create_replica(staging, path, model=model, offset=offset, manifest=_local_manifest(manifest, digest),
                   bucket_entries=list(_bucket_entries(infos, int(hello["bucket_rows"]), manifest)), digest=digest)


# The intents of this module and their finishers, in the order recovery runs them
# (after the records past `applied` are re-applied): a rebase first, then undoing a
# rejected sync or a partial one, then re-writing the rows of a partial sync that stays.
INTENTS = [
    (RESTORE_KEY, _finish_restore),
    (REVERT_KEY, _finish_revert),
    (ABORT_KEY, _finish_abort),
    (PENDING_KEY, _reapply_pending),
]
