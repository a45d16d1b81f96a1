"""Sync: bring a destination replica up to a source's head, moving only changed rows.

Three parts, none of which prints:

Source side (what every server calls: local, ``serve --stdio``, HTTP)
    :func:`source_hello`, :func:`source_plan`, :func:`source_chunks`,
    :func:`source_snapshot_manifest`, :func:`snapshot_file_path`,
    :func:`source_read_snapshot_file`, :func:`source_wait` (the long-poll of
    ``sync --follow``). Rows changed in (since, target] are
    found from the log (per-row versions of coalesced sync records included),
    coalesced to one value per row read at exactly ``target``, grouped in
    whole buckets ordered by significance and encoded as "sync" records.

Destination side (partial-sync state on a replica; the writer lock held)
    :func:`apply_chunk` applies one chunk atomically and durably as *pending*
    state: in one LMDB transaction the chunk (with the destination's own old
    values, for undo) is logged under meta ``sync.chunk.N``, meta
    ``sync.pending`` records the buckets it brought and their original index
    entries, the bucket versions move to the source's, and state.applying is
    set; then the rows are written and flushed; then applying is cleared. A
    crash in between is repaired by Replica._recover (re-applies the pending
    chunks; values are absolute). The head does not move: it stays the last
    complete offset. :func:`finish_sync` replaces all pending chunks by ONE
    "sync" record at the target (new = newest chunk's value, old = the first
    chunk's old value, per-row versions) in one transaction; the rows are
    already in the files, so only the log and the state move.
    :func:`apply_whole` is the fast path of a sync that is a single chunk
    (every round of ``sync --follow``): the chunk becomes that record at once,
    logged then applied exactly as a commit is, with no pending state and the
    tensor files fsynced on the commit schedule (the log is the write-ahead
    log). :func:`abort_pending` undoes pending chunks. :func:`restore_snapshot`
    rebases a replica that fell behind the source's retention.

The engine
    :func:`sync` drives a Source and a Sink (deltalog.transport.base) under
    a byte budget and a deadline and returns a :class:`SyncResult`; it can
    be paced (``throttle``, for --bwlimit) and asked to stop between two
    chunks (``should_stop``, for signals). deltalog.follow runs it in rounds.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

import numpy as np

from . import record as rec
from . import tensorfiles
from .errors import (
    IntegrityError,
    InvalidInput,
    ModelMismatch,
    OffsetNotRetained,
    TransportError,
)
from .history import values_at
from .pending import CHUNK_KEY, PENDING_KEY, merged_pending, pending_buckets, pending_state
from .replica import Replica, _row_significance, boot_id
from .store import bucket_key
from .transport.base import DEFAULT_CHUNK_BYTES, PROTOCOL_VERSION, RECORD_VERSION, SNAPSHOT_PIECE_BYTES

RESTORE_KEY = "sync.restore"
FOLLOW_KEY = "follow"
ROW_OVERHEAD = 8  # bytes per row for its index and version, in size estimates

Progress = Callable[[str, int, int], None]


def _put_state(store, txn, **changes) -> None:
    """Update fields of meta "state", keeping the ones this module does not know."""
    state = store.get_meta(txn, "state")
    state.update(changes)
    store.put_meta(txn, "state", state)


def _durable(replica: Replica) -> None:
    """fsync the tensor files a sync step wrote (Replica.flush where the replica has it)."""
    flush = getattr(replica, "flush", None)
    if flush is not None:
        flush()


# =============================================================================
# source side
# =============================================================================


def source_hello(replica: Replica) -> dict:
    """What a source tells a destination first (see deltalog.transport.base)."""
    return {
        "protocol": PROTOCOL_VERSION,
        "model_id": replica.model_id,
        "head": replica.head,
        "oldest_offset": replica.oldest_offset,
        "bucket_rows": replica.bucket_rows,
        "format_version": replica.format_version,
        "tensors": [{"name": t.name, "dtype": t.dtype, "shape": list(t.shape)} for t in replica.tensors],
        "snapshots": sorted(s["offset"] for s in replica.snapshots()),
        "time": time.time(),
    }


HEAD_POLL_SECONDS = 0.002  # how often a waiting source re-reads its head (one LMDB read, ~10 us)


def source_wait(replica: Replica, since: int, timeout: float, poll: float = HEAD_POLL_SECONDS,
                idle: Callable[[float], bool] | None = None) -> int:
    """The replica's head as soon as it differs from ``since``, or after ``timeout`` seconds (Source.wait_for_head).

    The head is re-read from the log every ``poll`` seconds: a commit or a
    finished sync by another process shows at the next read, with no
    notification machinery to go stale. ``idle(seconds)`` replaces the sleep
    between reads; it returns True to stop waiting early (the stdio server
    uses it to notice a client that hung up).
    """
    deadline = time.monotonic() + max(0.0, float(timeout))
    while True:
        head = replica.head
        left = deadline - time.monotonic()
        if head != since or left <= 0:
            return head
        pause = min(poll, left)
        if idle is not None:
            if idle(pause):
                return replica.head
        else:
            time.sleep(pause)


def normalise_advanced(advanced) -> dict[str, dict[int, int]]:
    """``advanced`` as {str: {int: int}} (JSON carries bucket numbers as strings)."""
    out: dict[str, dict[int, int]] = {}
    for name, buckets in (advanced or {}).items():
        try:
            out[str(name)] = {int(b): int(v) for b, v in dict(buckets).items()}
        except (TypeError, ValueError):
            raise InvalidInput("malformed partial-sync state (advanced buckets)") from None
    return out


@dataclass
class _TensorChanges:
    """Rows of one tensor to send: sorted rows, their versions and bucket boundaries."""

    info: tensorfiles.TensorInfo
    rows: np.ndarray  # uint64, sorted unique
    versions: np.ndarray  # uint64, aligned with rows
    row_sig: np.ndarray  # float64, aligned with rows (sum |delta| since `since`)


def _check_range(replica: Replica, since: int, target: int) -> None:
    head, oldest = replica.head, replica.oldest_offset
    if since < oldest:
        raise OffsetNotRetained(
            f"{replica.path}: offset {since} is older than the oldest offset kept ({oldest})",
            hint="a snapshot transfer is needed",
        )
    if target > head:
        raise OffsetNotRetained(f"{replica.path}: target {target} is past the head {head}")
    if target != head and target != oldest:
        with replica.store.read() as txn:
            present = replica.store.get_record(txn, target) is not None
        if not present:
            raise OffsetNotRetained(f"{replica.path}: offset {target} is not retained")


def _collect_changes(replica: Replica, since: int, target: int, advanced: dict[str, dict[int, int]],
                     exact_significance: bool = True) -> list[_TensorChanges]:
    """Rows written in (since, target] (per-row versions honoured), minus what ``advanced`` holds.

    Each row's significance is the sum of |new - old| over the records that
    wrote it, which takes decompressing every record's values. That order
    matters only when the changes span several chunks (a budget may stop
    between them); otherwise (``exact_significance=False``) only the
    row-index and version sections are decoded and every row of a record
    gets that tensor's mean: per tensor, the sums stay exact.
    """
    parts: dict[str, list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = {}
    if target > since:
        for offset, view in replica.iter_record_views(since, target):
            record = rec.decode(view, f"{replica.path}: record {offset}", rows_only=not exact_significance)
            for t in record.tensors:
                versions = (
                    np.asarray(t.versions, dtype=np.uint64)
                    if t.versions is not None
                    else np.full(len(t.rows), offset, dtype=np.uint64)
                )
                keep = versions > np.uint64(since)
                if not keep.any():
                    continue
                if not exact_significance:
                    sig = np.full(int(keep.sum()), t.significance / max(1, len(t.rows)))
                elif t.old is not None:
                    sig = _row_significance(t.old[keep], t.new[keep], t.dtype)
                else:
                    sig = np.zeros(int(keep.sum()), dtype=np.float64)
                parts.setdefault(t.name, []).append((t.rows[keep], versions[keep], sig))
    out = []
    for info in replica.tensors:
        chunks = parts.get(info.name)
        if not chunks:
            continue
        rows = np.concatenate([c[0] for c in chunks])
        versions = np.concatenate([c[1] for c in chunks])
        sig = np.concatenate([c[2] for c in chunks])
        order = np.lexsort((versions, rows))
        rows, versions, sig = rows[order], versions[order], sig[order]
        last = np.r_[rows[1:] != rows[:-1], True] if len(rows) else np.zeros(0, bool)
        starts = np.flatnonzero(np.r_[True, rows[1:] != rows[:-1]]) if len(rows) else np.zeros(0, np.intp)
        row_sig = np.add.reduceat(sig, starts) if len(rows) else sig
        rows, versions = rows[last], versions[last]
        held = advanced.get(info.name)
        if held:
            buckets = rows // np.uint64(replica.bucket_rows)
            hb = np.array(sorted(held), dtype=np.uint64)
            hv = np.array([held[int(b)] for b in hb], dtype=np.uint64)
            pos = np.searchsorted(hb, buckets)
            pos_c = np.minimum(pos, len(hb) - 1)
            is_held = (pos < len(hb)) & (hb[pos_c] == buckets)
            floor = np.where(is_held, hv[pos_c], np.uint64(since))
            keep = versions > floor
            rows, versions, row_sig = rows[keep], versions[keep], row_sig[keep]
        if len(rows):
            out.append(_TensorChanges(info, rows, versions, row_sig))
    return out


def _bucket_order(changes: list[_TensorChanges], bucket_rows: int) -> list[tuple[float, int, int, int, int]]:
    """(significance, tensor index, bucket, row start, row stop) per bucket, most significant first."""
    buckets = []
    for ti, ch in enumerate(changes):
        b = (ch.rows // np.uint64(bucket_rows)).astype(np.int64)
        starts = np.flatnonzero(np.r_[True, b[1:] != b[:-1]])
        stops = np.r_[starts[1:], len(b)]
        sums = np.add.reduceat(ch.row_sig, starts)
        for s, start, stop, bucket in zip(sums.tolist(), starts.tolist(), stops.tolist(), b[starts].tolist()):
            buckets.append((s, ti, bucket, start, stop))
    buckets.sort(key=lambda x: (-x[0], changes[x[1]].info.id, x[2]))
    return buckets


def source_plan(replica: Replica, since: int, advanced, target: int) -> dict:
    """What :func:`source_chunks` would send, without reading values (dry runs, progress)."""
    advanced = normalise_advanced(advanced)
    _check_range(replica, since, target)
    changes = _collect_changes(replica, since, target, advanced, exact_significance=False)
    tensors = []
    for ch in changes:
        n = len(ch.rows)
        nb = len(np.unique(ch.rows // np.uint64(replica.bucket_rows)))
        tensors.append({"name": ch.info.name, "rows": n, "buckets": nb,
                        "bytes": n * (ch.info.row_bytes + ROW_OVERHEAD), "significance": float(ch.row_sig.sum())})
    return {
        "since": since,
        "target": target,
        "rows": sum(t["rows"] for t in tensors),
        "buckets": sum(t["buckets"] for t in tensors),
        "bytes": sum(t["bytes"] for t in tensors),
        "tensors": tensors,
    }


def source_chunks(replica: Replica, since: int, advanced, target: int, max_chunk_bytes: int) -> Iterator[bytes]:
    """Encoded "sync" records bringing a replica at ``since`` to ``target`` (see Source.chunks).

    When everything fits in one chunk the order of buckets does not matter,
    so the records' values are not decompressed to rank them.
    """
    advanced = normalise_advanced(advanced)
    _check_range(replica, since, target)
    max_chunk_bytes = max(1, int(max_chunk_bytes))
    changes = _collect_changes(replica, since, target, advanced, exact_significance=False)
    total = sum(len(ch.rows) * (ch.info.row_bytes + ROW_OVERHEAD) for ch in changes)
    if total > max_chunk_bytes:  # several chunks: a budget may stop between them, so rank them exactly
        changes = _collect_changes(replica, since, target, advanced, exact_significance=True)
    order = _bucket_order(changes, replica.bucket_rows)
    row_cost = [ch.info.row_bytes + ROW_OVERHEAD for ch in changes]  # a property: not once per bucket
    batch: list[tuple[int, int, int]] = []
    size = 0
    for sig, ti, _bucket, start, stop in order:
        batch.append((ti, start, stop))
        size += (stop - start) * row_cost[ti]
        if size >= max_chunk_bytes:
            yield _encode_chunk(replica, changes, batch, since, target)
            batch, size = [], 0
    if batch:
        yield _encode_chunk(replica, changes, batch, since, target)


def _encode_chunk(replica, changes, batch, since, target) -> bytes:
    picked: dict[int, list[np.ndarray]] = {}
    for ti, start, stop in batch:
        picked.setdefault(ti, []).append(np.arange(start, stop))
    rows_by_name, sel = {}, {}
    for ti, idx in picked.items():
        idx = np.sort(np.concatenate(idx))
        sel[ti] = idx
        rows_by_name[changes[ti].info.name] = changes[ti].rows[idx]
    _head, values = values_at(replica, target, rows_by_name)
    tensors = []
    for ti in sorted(sel, key=lambda t: changes[t].info.id):
        ch, idx = changes[ti], sel[ti]
        tensors.append(
            rec.TensorDelta(
                ch.info.name, ch.info.dtype, ch.rows[idx], values[ch.info.name], None,
                ch.versions[idx], float(ch.row_sig[idx].sum()),
            )
        )
    record = rec.Record(offset=target, base=since, kind="sync", time=time.time(), model_id=replica.model_id,
                        tensors=tensors, target=target)
    return rec.encode(record, RECORD_VERSION)  # for a peer: the wire's encoding, whatever the log stores


def source_snapshot_manifest(replica: Replica, offset: int) -> dict:
    """The manifest of the snapshot at ``offset``, plus the bucket versions a new replica starts from.

    ``bucket_versions`` holds the source's bucket versions capped at
    ``offset`` (a bucket written later gets ``offset``: at most that new at
    the snapshot, which the records after it then correct exactly).
    """
    manifest = next((m for m in replica.snapshots() if m["offset"] == offset), None)
    if manifest is None:
        raise OffsetNotRetained(f"{replica.path}: no snapshot at offset {offset}",
                                hint=f"snapshots: {sorted(m['offset'] for m in replica.snapshots())}")
    versions = {}
    for info in replica.tensors:
        index = replica.bucket_index(info.name)
        if index:
            buckets = sorted(index)
            versions[info.name] = {"buckets": buckets, "versions": [min(index[b][0], offset) for b in buckets]}
    return {**manifest, "bucket_versions": versions}


def snapshot_file_path(replica: Replica, offset: int, file: str) -> tuple[str, int]:
    """(path, size) of a file of the snapshot at ``offset``; only files its manifest lists."""
    manifest = next((m for m in replica.snapshots() if m["offset"] == offset), None)
    if manifest is None:
        raise OffsetNotRetained(f"{replica.path}: no snapshot at offset {offset}")
    entry = next((t for t in manifest["tensors"] if t["file"] == file), None)
    if entry is None:
        raise InvalidInput(f"snapshot {offset} has no file {file!r}")
    return os.path.join(tensorfiles.snapshot_path(replica.path, offset), entry["file"]), int(entry["nbytes"])


def source_read_snapshot_file(replica: Replica, offset: int, file: str, start: int, length: int) -> bytes:
    """Bytes [start, start+length) of a snapshot file (fewer at its end)."""
    path, size = snapshot_file_path(replica, offset, file)
    if start < 0 or length < 0 or start > size:
        raise InvalidInput(f"snapshot {offset} file {file}: range {start}+{length} outside its {size} bytes")
    length = min(length, size - start, 256 << 20)
    try:
        with open(path, "rb") as f:
            f.seek(start)
            data = f.read(length)
    except OSError as exc:
        raise IntegrityError(f"{path}: cannot read snapshot file ({exc.strerror})") from None
    if len(data) != length:
        raise IntegrityError(f"{path}: snapshot file is truncated")
    return data


# =============================================================================
# destination side: partial-sync state on a replica (writer lock held)
# =============================================================================


def _bucket_maxima(rows: np.ndarray, versions: np.ndarray, bucket_rows: int) -> tuple[list[int], list[int]]:
    buckets = (rows // np.uint64(bucket_rows)).astype(np.int64)
    starts = np.flatnonzero(np.r_[True, buckets[1:] != buckets[:-1]])
    return buckets[starts].tolist(), np.maximum.reduceat(versions, starts).tolist()


def _checked_chunk(replica: Replica, blob, target: int, head: int):
    """Decode a chunk from a source and check it fits ``replica`` at ``head``: (record, [(info, delta)])."""
    record = rec.decode(blob, "chunk from the source", with_old=False, keep_encoded=True)
    if record.model_id != replica.model_id:
        raise ModelMismatch(f"the source's deltas belong to model {record.model_id}, "
                            f"{replica.path} holds {replica.model_id}")
    if record.kind != "sync" or record.offset != target or record.base != head or target <= head:
        raise TransportError(
            f"the source sent a chunk for {record.base}->{record.offset} ({record.kind}); "
            f"expected {head}->{target}")
    out = []
    for t in record.tensors:
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
            out.append((info, t))
    return record, out


def apply_whole(replica: Replica, blob, target: int, follow: dict | None) -> int:
    """Apply the ONLY chunk of a sync as its final record, the way a commit is applied; returns its rows.

    The fast path of small syncs (every round of ``sync --follow``): no
    pending partial-sync state, no fsync of the tensor files. One
    transaction logs the record (new values, this replica's old values,
    per-row versions), the bucket versions, the follower metadata and
    head = applying = target; then the rows are written; then a second
    transaction marks them applied. A crash in between is repaired by
    Replica._recover (it re-applies the record), and the tensor files are
    fsynced later (LocalSink's schedule): after a machine crash the log
    re-applies what the page cache lost, as for commits.
    """
    head = replica.state.head
    if pending_state(replica) is not None:
        raise IntegrityError(f"{replica.path}: a partial sync is pending; its chunks must be finished, not bypassed")
    _record, parts = _checked_chunk(replica, blob, target, head)
    deltas, sigs = [], []
    for info, t in parts:
        old = replica._gather_old(info, t.rows.astype(np.intp))  # checked against the row digests
        row_sig = _row_significance(old, t.new, info.dtype)
        deltas.append((info, rec.TensorDelta(t.name, t.dtype, t.rows, t.new, old, t.versions, float(row_sig.sum()),
                                             encoded=t.encoded)))  # the received sections are stored as they came
        sigs.append(row_sig)
    record = rec.Record(offset=target, base=head, kind="sync", time=time.time(), model_id=replica.model_id,
                        tensors=[d for _i, d in deltas], target=target)
    blob_out = rec.encode(record, replica.record_encoding)  # kept sections get their v2 checksums here
    store = replica.store

    def log_it(txn):
        store.put_record(txn, target, blob_out)
        for (info, d), row_sig in zip(deltas, sigs):
            replica._bump_buckets(txn, info, d.rows, row_sig, target, d.versions)
        if follow is not None:
            store.put_meta(txn, FOLLOW_KEY, follow)
        _put_state(store, txn, head=target, applying=target)

    store.write(log_it)
    replica._apply(record)
    replica._set_applied(target)
    return sum(len(d.rows) for _i, d in deltas)


def apply_chunk(replica: Replica, blob, target: int, source: str) -> dict:
    """Apply one chunk from a source as pending partial-sync state (atomic, durable)."""
    state = replica.state
    head = state.head
    _record, parts = _checked_chunk(replica, blob, target, head)
    pending = pending_state(replica)
    if pending is not None and (pending["base"] != head or pending["target"] > target):
        raise IntegrityError(f"{replica.path}: pending sync to {pending['target']} does not fit a sync to {target}")
    deltas, bucket_updates = [], []
    for info, t in parts:
        old = replica._gather_old(info, t.rows.astype(np.intp))  # checked against the row digests
        deltas.append(rec.TensorDelta(t.name, t.dtype, t.rows, t.new, old, t.versions, t.significance,
                                      encoded=t.encoded))
        bucket_updates.append((info, *_bucket_maxima(t.rows, t.versions, replica.bucket_rows)))
    stored = rec.encode(rec.Record(offset=target, base=head, kind="sync", time=time.time(),
                                   model_id=replica.model_id, tensors=deltas, target=target), replica.record_encoding)
    store = replica.store
    result = {}

    def log_it(txn):
        p = store.get_meta(txn, PENDING_KEY) or {"base": head, "target": target, "source": source,
                                                  "chunks": 0, "buckets": {}}
        n = p["chunks"]
        store.put_meta(txn, CHUNK_KEY.format(n), stored)
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
        _put_state(store, txn, applying=target)
        result["pending_buckets"] = sum(len(e["b"]) for e in p["buckets"].values())

    store.write(log_it)
    replica._apply(rec.Record(offset=target, base=head, kind="sync", time=0.0, model_id=replica.model_id,
                              tensors=deltas))
    # fsync before clearing applying: the head does not move, so nothing else would tell a
    # machine crash that these rows were lost with the page cache.
    _durable(replica)
    replica._set_applied(head)
    return {"rows": sum(len(d.rows) for d in deltas), "pending_buckets": result["pending_buckets"]}


def finish_sync(replica: Replica, target: int, follow: dict | None) -> int:
    """Replace the pending chunks by one "sync" record at ``target`` (one transaction); returns the head."""
    state = replica.state
    head = state.head
    pending = pending_state(replica)
    if target <= head:
        raise InvalidInput(f"{replica.path}: sync target {target} is not after the head {head}")
    if pending is not None and (pending["base"] != head or pending["target"] > target):
        raise IntegrityError(f"{replica.path}: pending sync to {pending['target']} does not fit a sync to {target}")
    merged = merged_pending(replica) if pending else {}
    tensors, sigs = [], []
    for info in replica.tensors:
        d = merged.get(info.name)
        if d is None or not len(d.rows):
            continue
        row_sig = _row_significance(d.old, d.new, info.dtype)
        d.significance = float(row_sig.sum())
        tensors.append((info, d))
        sigs.append(row_sig)
    record = rec.Record(offset=target, base=head, kind="sync", time=time.time(), model_id=replica.model_id,
                        tensors=[d for _i, d in tensors], target=target)
    blob = rec.encode(record, replica.record_encoding)
    store = replica.store

    def log_it(txn):
        store.put_record(txn, target, blob)
        for (info, d), row_sig in zip(tensors, sigs):
            replica._bump_buckets(txn, info, d.rows, row_sig, target, d.versions)
        if pending is not None:
            for n in range(pending["chunks"]):
                txn.delete(CHUNK_KEY.format(n).encode(), db=store.dbs["meta"])
            txn.delete(PENDING_KEY.encode(), db=store.dbs["meta"])
        if follow is not None:
            store.put_meta(txn, FOLLOW_KEY, follow)
        # The pending chunks' rows are already in the tensor files, fsynced by
        # apply_chunk (or re-applied by recovery): the record only has to be
        # logged. `flushed` stays where it is, so after a machine crash the
        # log re-applies this record too, which is harmless (absolute values).
        gen = store.get_meta(txn, "state").get("gen", 0) + 1
        _put_state(store, txn, head=target, applied=target, applying=None, boot=boot_id(), gen=gen)

    store.write(log_it)
    return target


def abort_pending(replica: Replica) -> None:
    """Undo a pending partial sync: rows back to their values at the head, bucket index restored."""
    pending = pending_state(replica)
    if pending is None:
        return
    head = replica.head
    merged = merged_pending(replica)
    store = replica.store
    store.write(lambda txn: _put_state(store, txn, applying=head))
    undo = [rec.TensorDelta(d.name, d.dtype, d.rows, d.old) for d in merged.values()]
    replica._apply(rec.Record(offset=head, base=head, kind="sync", time=0.0, model_id=replica.model_id, tensors=undo))
    _durable(replica)

    def drop(txn):
        for name, entry in pending["buckets"].items():
            tid = replica.info(name).id
            for b, ov, os_ in zip(entry["b"], entry["ov"], entry["os"]):
                if ov < 0:
                    txn.delete(bucket_key(tid, b), db=store.dbs["buckets"])
                else:
                    store.put_bucket(txn, tid, b, ov, os_)
        for n in range(pending["chunks"]):
            txn.delete(CHUNK_KEY.format(n).encode(), db=store.dbs["meta"])
        txn.delete(PENDING_KEY.encode(), db=store.dbs["meta"])
        _put_state(store, txn, applying=None)

    store.write(drop)


def sink_state(replica: Replica) -> dict:
    """The Sink.begin description of an existing replica."""
    pending = pending_state(replica)
    return {
        "exists": True,
        "model_id": replica.model_id,
        "head": replica.head,
        "oldest_offset": replica.oldest_offset,
        "bucket_rows": replica.bucket_rows,
        "tensors": [{"name": t.name, "dtype": t.dtype, "shape": list(t.shape)} for t in replica.tensors],
        "advanced": pending_buckets(pending),
        "pending_target": None if pending is None else pending["target"],
        "pending_buckets": 0 if pending is None else sum(len(b["b"]) for b in pending["buckets"].values()),
    }


def note_follow(replica: Replica, follow: dict) -> None:
    replica.store.write(lambda txn: replica.store.put_meta(txn, FOLLOW_KEY, follow))


def follow_state(replica: Replica) -> dict | None:
    with replica.store.read() as txn:
        return replica.store.get_meta(txn, FOLLOW_KEY)


def copy_snapshot_into_tensors(replica_dir: str, manifest: dict) -> None:
    """Overwrite the tensor files with the snapshot's files, in place, fsynced (bounded memory);
    then write each one's row digest file (snapshots carry none: their files are checksummed whole)."""
    snap = tensorfiles.snapshot_path(replica_dir, manifest["offset"])
    for n, entry in enumerate(manifest["tensors"]):
        src = os.path.join(snap, entry["file"])
        dst = os.path.join(replica_dir, tensorfiles.TENSOR_DIR, entry["file"])
        with open(src, "rb") as fin, open(dst, "r+b" if os.path.exists(dst) else "wb") as fout:
            while piece := fin.read(16 << 20):
                fout.write(piece)
            fout.truncate()
            fout.flush()
            os.fsync(fout.fileno())
        info = tensorfiles.TensorInfo(n, entry["name"], entry["dtype"], tuple(entry["shape"]))
        tensorfiles.write_digests_of_file(dst, info)


def _bucket_version_items(replica: Replica, manifest: dict):
    """(tensor id, bucket, version) from a source manifest's bucket_versions, capped at its offset."""
    cap = manifest["offset"]
    for name, entry in (manifest.get("bucket_versions") or {}).items():
        try:
            info = replica.info(name)
        except InvalidInput:
            continue
        nb = info.buckets(replica.bucket_rows)
        for b, v in zip(entry.get("buckets", []), entry.get("versions", [])):
            if 0 <= int(b) < nb:
                yield info.id, int(b), min(int(v), cap)


def init_from_snapshot(staging: str, path: str, hello: dict, manifest: dict) -> None:
    """Turn ``staging`` (holding a verified snapshots/<offset>/) into a replica, then rename it to ``path``.

    The lower-level twin of Replica.init for bounded memory: tensor files are
    copied from the snapshot file by file, never loaded whole. The new
    replica has the source's model id, bucket size and tensor layout, and
    starts at the snapshot's offset (oldest = head = offset).
    """
    from . import replica as replica_mod
    from .store import LogStore

    offset = manifest["offset"]
    os.makedirs(os.path.join(staging, tensorfiles.TENSOR_DIR), exist_ok=True)
    local_manifest = {k: manifest[k] for k in ("offset", "model_id", "tensors")}
    snap = tensorfiles.snapshot_path(staging, offset)
    for n, entry in enumerate(local_manifest["tensors"]):
        dst = os.path.join(staging, tensorfiles.TENSOR_DIR, entry["file"])
        shutil.copyfile(os.path.join(snap, entry["file"]), dst)
        with open(dst, "rb+") as f:
            os.fsync(f.fileno())
        info = tensorfiles.TensorInfo(n, entry["name"], entry["dtype"], tuple(entry["shape"]))
        tensorfiles.write_digests_of_file(dst, info)  # format v2: the follower's rows are checked too
    tensorfiles.fsync_dir(os.path.join(staging, tensorfiles.TENSOR_DIR))
    log_dir = os.path.join(staging, replica_mod.LOG_DIR)
    shutil.rmtree(log_dir, ignore_errors=True)  # a half-made log from a crashed attempt
    store = LogStore.create(log_dir)
    try:
        infos = [tensorfiles.TensorInfo(i, t["name"], t["dtype"], tuple(t["shape"])) for i, t in enumerate(hello["tensors"])]

        def setup(txn):
            store.put_meta(txn, "format", {"write_version": replica_mod.FORMAT_VERSION,
                                           "read_version": replica_mod.READ_VERSION})
            store.put_meta(txn, "model", {"model_id": hello["model_id"], "bucket_rows": int(hello["bucket_rows"]),
                                          "tensors": [i.to_meta() for i in infos], "created": time.time()})
            store.put_meta(txn, "state", {"head": offset, "applied": offset, "applying": None, "flushed": offset})
            store.put_meta(txn, "oldest", offset)
            store.put_snapshot(txn, local_manifest)
            names = {i.name: i for i in infos}
            for name, entry in (manifest.get("bucket_versions") or {}).items():
                info = names.get(name)
                if info is None:
                    continue
                for b, v in zip(entry.get("buckets", []), entry.get("versions", [])):
                    if 0 <= int(b) < info.buckets(int(hello["bucket_rows"])):
                        store.put_bucket(txn, info.id, int(b), min(int(v), offset), 0.0)

        store.write(setup)
    finally:
        store.close()
    with open(os.path.join(staging, replica_mod.MARKER), "w") as f:
        f.write(replica_mod._marker_text())
        f.flush()
        os.fsync(f.fileno())
    tensorfiles.fsync_dir(staging)
    if os.path.isdir(path):
        os.rmdir(path)  # an empty directory the user made for it
    os.rename(staging, path)
    tensorfiles.fsync_dir(os.path.dirname(os.path.abspath(path)))


def restore_snapshot(replica: Replica, manifest: dict) -> None:
    """Rebase a replica on a snapshot already complete under snapshots/ (lock held).

    One transaction drops the old log, pending state and bucket index, registers
    the snapshot, sets oldest = head = its offset and marks ``sync.restore``;
    then the snapshot's files are copied over the tensor files; then the mark
    goes. A crash in between is finished by Replica._recover.
    """
    offset = manifest["offset"]
    store = replica.store
    local_manifest = {k: manifest[k] for k in ("offset", "model_id", "tensors")}
    old_snaps = [m["offset"] for m in replica.snapshots() if m["offset"] != offset]

    def rebase(txn):
        store.delete_records(txn, upto=(1 << 64) - 1)
        pending = store.get_meta(txn, PENDING_KEY)
        if pending is not None:
            for n in range(pending["chunks"]):
                txn.delete(CHUNK_KEY.format(n).encode(), db=store.dbs["meta"])
            txn.delete(PENDING_KEY.encode(), db=store.dbs["meta"])
        txn.drop(store.dbs["buckets"], delete=False)
        for tid, b, v in _bucket_version_items(replica, manifest):
            store.put_bucket(txn, tid, b, v, 0.0)
        for o in old_snaps:
            store.delete_snapshot(txn, o)
        store.put_snapshot(txn, local_manifest)
        store.put_meta(txn, "oldest", offset)
        store.put_meta(txn, RESTORE_KEY, offset)
        _put_state(store, txn, head=offset, applied=offset, applying=offset, flushed=offset)

    store.write(rebase)
    replica._write_maps.clear()
    replica._read_maps.clear()
    copy_snapshot_into_tensors(replica.path, local_manifest)

    def done(txn):
        txn.delete(RESTORE_KEY.encode(), db=store.dbs["meta"])
        _put_state(store, txn, applying=None)

    store.write(done)
    for o in old_snaps:
        shutil.rmtree(tensorfiles.snapshot_path(replica.path, o), ignore_errors=True)


# =============================================================================
# the engine
# =============================================================================


@dataclass
class SyncResult:
    """What one sync run did (the JSON of ``deltalog sync``)."""

    source: str
    destination: str
    from_offset: int
    to_offset: int
    head: int = 0
    source_head: int | None = None  # the source's head when this run started (what to wait past)
    rows_sent: int = 0
    bytes_sent: int = 0
    chunks: int = 0
    complete: bool = False
    seconds: float = 0.0
    pending_buckets: int = 0
    snapshot_offset: int | None = None
    snapshot_bytes: int = 0
    created: bool = False
    dry_run: bool = False
    stopped_by: str | None = None  # "max-bytes" | "deadline" | "signal" when stopped before the end
    plan: dict | None = None  # dry run: what would move
    note: str | None = None

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class Budget:
    max_bytes: int | None = None
    deadline: float | None = None  # seconds from the start
    started: float = field(default_factory=time.monotonic)

    def exhausted(self, spent: int, next_bytes: int, first: bool) -> str | None:
        """Why the next ``next_bytes`` may not go now, or None. The first piece always goes."""
        if self.deadline is not None and time.monotonic() - self.started >= self.deadline and not first:
            return "deadline"
        if self.max_bytes is not None and spent + next_bytes > self.max_bytes and not first:
            return "max-bytes"
        return None


def check_same_model(hello: dict, state: dict, dst: str) -> None:
    """ModelMismatch unless the destination holds the source's model (id, layout, buckets)."""
    if state["model_id"] != hello["model_id"]:
        raise ModelMismatch(f"{dst} holds model {state['model_id']}, the source holds {hello['model_id']}",
                            hint="sync only between replicas of one model")
    mine = [(t["name"], t["dtype"], list(t["shape"])) for t in state["tensors"]]
    theirs = [(t["name"], t["dtype"], list(t["shape"])) for t in hello["tensors"]]
    if mine != theirs or state["bucket_rows"] != hello["bucket_rows"]:
        raise ModelMismatch(f"{dst} has another tensor layout or bucket size than the source")


WHOLE_SYNC_CHUNK_BYTES = 64 << 20  # an unbudgeted sync up to this size is one chunk: one record, one transaction


def _chunk_bytes(budget: Budget, chunk_bytes: int | None) -> int:
    """Uncompressed row bytes per chunk. A budget needs small chunks to stop between;
    without one, fewer chunks mean less work: a sync that fits in one chunk is applied
    as its final record at once (no partial-sync state, one transaction). Memory then
    follows the changed rows, up to WHOLE_SYNC_CHUNK_BYTES."""
    if chunk_bytes is None:
        budgeted = budget.max_bytes is not None or budget.deadline is not None
        chunk_bytes = DEFAULT_CHUNK_BYTES if budgeted else WHOLE_SYNC_CHUNK_BYTES
    if budget.max_bytes is None:
        return chunk_bytes
    return max(1, min(chunk_bytes, budget.max_bytes // 4))


def sync(
    source,
    sink,
    *,
    source_name: str,
    destination_name: str,
    max_bytes: int | None = None,
    deadline: float | None = None,
    dry_run: bool = False,
    wait: float = 0.0,
    chunk_bytes: int | None = None,
    piece_bytes: int = SNAPSHOT_PIECE_BYTES,
    progress: Progress | None = None,
    throttle: Callable[[int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> SyncResult:
    """Bring ``sink`` up to ``source``'s head (or as far as the budget allows).

    ``throttle(n)`` is called with the size of every chunk or snapshot piece
    received, before it is applied, and may sleep (--bwlimit's token bucket).
    ``should_stop()`` is asked before each one is applied: True stops the
    run there (``stopped_by="signal"``), every chunk applied so far kept as
    resumable partial-sync state, exactly as a budget stops it.
    """
    report = progress is not None
    throttle = throttle or (lambda n: None)
    should_stop = should_stop or (lambda: False)
    progress = progress or (lambda stage, done, total: None)
    budget = Budget(max_bytes, deadline)
    hello = source.hello()
    if hello.get("protocol") != PROTOCOL_VERSION:
        raise TransportError(f"{source_name}: speaks sync protocol v{hello.get('protocol')}, we speak v{PROTOCOL_VERSION}")
    state = sink.begin(wait, dry_run)
    target = int(hello["head"])
    result = SyncResult(source_name, destination_name, from_offset=state["head"], to_offset=target,
                        head=state["head"], source_head=target, dry_run=dry_run,
                        pending_buckets=state.get("pending_buckets", 0))
    existed = state["exists"]
    if existed:
        check_same_model(hello, state, destination_name)
    follow = {"source": source_name, "source_head": target, "source_time": hello.get("time"), "synced_at": time.time()}

    def finish_result() -> SyncResult:
        result.seconds = round(time.monotonic() - budget.started, 6)
        return result

    # --- snapshot transfer: a new destination, or one older than the source keeps
    need_snapshot = not state["exists"] or state["head"] < hello["oldest_offset"]
    if not need_snapshot and state["head"] >= target:
        # Nothing this source can add (a partial sync from a newer source, if any, stays pending).
        result.complete = True
        result.to_offset = state["head"]
        if state["head"] > target:
            result.note = f"the destination (head {state['head']}) is ahead of the source (head {target})"
        elif not dry_run:
            sink.note_follow({**follow, "in_sync_at": follow["synced_at"]})
        return finish_result()
    if need_snapshot:
        candidates = [s for s in hello["snapshots"] if hello["oldest_offset"] <= s <= target]
        if not candidates:
            raise OffsetNotRetained(f"{source_name}: no snapshot between its oldest offset {hello['oldest_offset']} "
                                    f"and its head {target} to start {destination_name} from")
        snap = max(candidates)
        manifest = source.snapshot_manifest(snap)
        if manifest.get("model_id") != hello["model_id"] or manifest.get("offset") != snap:
            raise TransportError(f"{source_name}: snapshot manifest does not match its hello")
        result.snapshot_offset = snap
        total = sum(int(e["nbytes"]) for e in manifest["tensors"])
        result.snapshot_bytes = total
        if dry_run:
            result.plan = _dry_plan(source, snap, {}, target)
            result.plan["snapshot_bytes"] = total
            return finish_result()
        held = sink.snapshot_begin(hello, manifest)
        done = sum(min(held.get(e["file"], 0), int(e["nbytes"])) for e in manifest["tensors"])
        first = True
        for entry in manifest["tensors"]:
            size = int(entry["nbytes"])
            pos = min(held.get(entry["file"], 0), size)
            while pos < size:
                n = min(max(1, int(piece_bytes)), size - pos)
                if budget.max_bytes is not None:
                    n = min(n, max(1, budget.max_bytes // 4))
                why = budget.exhausted(result.bytes_sent, n, first)
                if why:
                    result.stopped_by = why
                    return finish_result()
                data = source.read_snapshot_file(snap, entry["file"], pos, n)
                if len(data) != n:
                    raise TransportError(f"{source_name}: snapshot file {entry['file']} came short "
                                         f"({len(data)} of {n} bytes at {pos})")
                throttle(n)
                if should_stop():
                    result.stopped_by = "signal"
                    return finish_result()
                sink.snapshot_write(entry["file"], pos, data)
                pos += n
                done += n
                result.bytes_sent += n
                first = False
                progress("snapshot", done, total)
        state = sink.snapshot_commit()
        result.created = not existed
        result.head = state["head"]
        if state["head"] >= target:
            result.complete = True
            result.to_offset = state["head"]
            sink.note_follow({**follow, "in_sync_at": follow["synced_at"]})
            return finish_result()

    # --- a partial sync that cannot be continued to this source's head is undone
    if state.get("pending_target") and state["pending_target"] > target:
        if dry_run:
            result.note = (f"the destination holds a partial sync to {state['pending_target']}, "
                           f"newer than the source's head; it would be undone")
        else:
            state = sink.abort_pending()

    since = state["head"]
    advanced = state.get("advanced") or {}
    if dry_run:
        result.plan = _dry_plan(source, since, advanced, target)
        return finish_result()
    plan_total = None
    if report and hasattr(source, "plan"):  # a progress bar wants a total; costs a second pass at the source
        try:
            plan_total = source.plan(since, advanced, target)["rows"]
        except (TransportError, AttributeError, NotImplementedError):
            plan_total = None
    first = result.snapshot_offset is None
    stream = source.chunks(since, advanced, target, _chunk_bytes(budget, chunk_bytes))
    # A sync that is one chunk is applied as its final record at once (Sink.apply_final)
    # when the destination has no partial state; a wrapper sink (guard) opts out by
    # not defining the method on its class.
    whole = not advanced and not state.get("pending_target") and callable(getattr(type(sink), "apply_final", None))
    finished = True
    fast = False
    try:
        for blob, only in _mark_only(stream, peek=whole):
            why = budget.exhausted(result.bytes_sent, len(blob), first)
            if why:
                result.stopped_by = why
                finished = False
                break
            throttle(len(blob))
            if should_stop():
                result.stopped_by = "signal"
                finished = False
                break
            if only:
                state = sink.apply_final(blob, target, {**follow, "in_sync_at": follow["synced_at"]})
                fast = True
                result.chunks = 1
                result.rows_sent = int(state["rows"])
                result.bytes_sent += len(blob)
                progress("rows", result.rows_sent, plan_total or 0)
                break
            applied = sink.apply_chunk(blob, target, source_name)
            first = False
            result.chunks += 1
            result.rows_sent += applied["rows"]
            result.bytes_sent += len(blob)
            result.pending_buckets = applied["pending_buckets"]
            progress("rows", result.rows_sent, plan_total or 0)
    finally:
        close = getattr(stream, "close", None)
        if close is not None and not finished:
            close()
    if fast:
        result.complete = True
        result.pending_buckets = 0
        result.head = state["head"]
    elif finished:
        state = sink.finish(target, {**follow, "in_sync_at": follow["synced_at"]})
        result.complete = True
        result.pending_buckets = 0
        result.head = state["head"]
    else:
        sink.note_follow(follow)
    return finish_result()


def _mark_only(stream, peek: bool):
    """(blob, only) for each blob of ``stream``; ``only`` is True for a first blob that is also the last.

    Knowing that takes reading the second blob before the first is applied,
    so it is done only when asked (``peek``).
    """
    it = iter(stream)
    first = next(it, None)
    if first is None:
        return
    if not peek:
        yield first, False
    else:
        second = next(it, None)
        yield first, second is None
        if second is None:
            return
        yield second, False
    for blob in it:
        yield blob, False


def _dry_plan(source, since: int, advanced: dict, target: int) -> dict:
    """What a sync would move, from Source.plan when the source has it, else from its chunk headers."""
    if hasattr(source, "plan"):
        try:
            return source.plan(since, advanced, target)
        except NotImplementedError:
            pass
    tensors: dict[str, dict] = {}
    nbytes = 0
    for blob in source.chunks(since, advanced, target, DEFAULT_CHUNK_BYTES):
        summary = rec.summarize(blob)
        nbytes += summary.nbytes
        for t in summary.tensors:
            entry = tensors.setdefault(t["name"], {"name": t["name"], "rows": 0, "bytes": 0, "significance": 0.0})
            entry["rows"] += t["rows"]
            entry["significance"] += t["significance"]
    return {"since": since, "target": target, "rows": sum(t["rows"] for t in tensors.values()),
            "bytes": nbytes, "tensors": list(tensors.values())}
