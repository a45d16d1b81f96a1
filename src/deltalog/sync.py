"""Sync: bring a destination replica up to a source's head, moving only changed rows.

Two parts, neither of which prints (the destination side, which applies
what arrives, is deltalog.receive):

Source side (what every server calls: local, ``serve --stdio``, HTTP)
    :func:`source_hello`, :func:`source_plan`, :func:`source_chunks`,
    :func:`source_snapshot_manifest`, :func:`snapshot_file_path`,
    :func:`source_read_snapshot_file`, :func:`source_wait` (the long-poll of
    ``sync --follow``). Rows changed in (since, target] are
    found from the log (per-row versions of coalesced sync records included),
    coalesced to one value per row read at exactly ``target``, grouped in
    whole buckets ordered by significance and encoded as "sync" records.
    Each says the source's state digest at ``since`` and at ``target``
    (deltalog.lineage), and the first one the records it stands for
    (:func:`source_history`), so a follower's log shows them as they were.

The engine
    :func:`sync` drives a Source and a Sink (deltalog.transport.base) under
    a byte budget and a deadline and returns a :class:`SyncResult`; it can
    be paced (``throttle``, for --bwlimit) and asked to stop between two
    chunks (``should_stop``, for signals). It refuses (Diverged) a
    destination that holds another model than the source at an offset they
    share, unless told to ``reseed`` it. deltalog.follow runs it in rounds.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

import numpy as np

from . import record as rec
from . import codec, heap, lineage, tensorfiles
from .dtypes import row_significance
from .errors import (
    HistoryUnproven,
    IntegrityError,
    InvalidInput,
    LockHeld,
    ModelMismatch,
    OffsetNotRetained,
    StorageError,
    TransportError,
    UnsupportedVersion,
)
from .history import head_time, values_at
from .receive import diverged
from .replica import Replica
from .transport.base import DEFAULT_CHUNK_BYTES, PROTOCOL_VERSION, RECORD_VERSION, SNAPSHOT_PIECE_BYTES

ROW_OVERHEAD = 8  # bytes per row for its index and version, in size estimates

Progress = Callable[[str, int, int], None]


# =============================================================================
# source side
# =============================================================================


def source_hello(replica: Replica) -> dict:
    """What a source tells a destination first (see deltalog.transport.base)."""
    state = _lineage_ready(replica)
    return {
        "protocol": PROTOCOL_VERSION,
        "model_id": replica.model_id,
        "head": state.head,
        "state_digest": lineage.to_hex(state.digest),
        "oldest_offset": replica.oldest_offset,
        "bucket_rows": replica.bucket_rows,
        "format_version": replica.format_version,
        "tensors": [{"name": t.name, "dtype": t.dtype, "shape": list(t.shape)} for t in replica.tensors],
        "snapshots": sorted(s["offset"] for s in replica.snapshots()),
        "time": time.time(),
        "head_time": head_time(replica, state.head),
        "chunk_codecs": [codec.BASE_XOR_VALUES],  # what this source can send (Source.chunks)
    }


def _lineage_ready(replica: Replica):
    """The replica's state, with its state digest computed first if it has none yet.

    A replica made by an older deltalog gets its digest from its first
    writer (the format 4 upgrade). A source that nobody has written since
    (an idle primary) takes the lock for that one upgrade when it is free;
    when a writer holds it, that writer upgrades it.
    """
    state = replica.state
    if state.digest is None and replica.writable_format:
        try:
            with replica.writing():
                pass
        except (LockHeld, StorageError):
            pass  # no digest: destinations refuse what they cannot check (UnsupportedVersion)
        state = replica.state
    return state


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
            held = {whole_number(b): whole_number(v) for b, v in dict(buckets).items()}
        except (TypeError, ValueError, OverflowError):
            raise InvalidInput("malformed partial-sync state (advanced buckets)") from None
        if any(not 0 <= x < 1 << 64 for pair in held.items() for x in pair):
            raise InvalidInput("malformed partial-sync state (a bucket or version out of range)")
        out[str(name)] = held
    return out


def whole_number(value) -> int:
    """An integer from JSON, msgpack or a query string (a bucket number may come as a string): 1.5,
    true and 1e400 are refused (TypeError, ValueError or OverflowError)."""
    if isinstance(value, bool) or isinstance(value, float):
        raise TypeError
    return int(value)


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
    if target != head and target != oldest and not replica.has_record(target):
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
                    sig = row_significance(t.old[keep], t.new[keep], t.dtype)
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
        "pre_digest": lineage.to_hex(replica.state_digest_at(since)),
        "post_digest": lineage.to_hex(replica.state_digest_at(target)),
        "rows": sum(t["rows"] for t in tensors),
        "buckets": sum(t["buckets"] for t in tensors),
        "bytes": sum(t["bytes"] for t in tensors),
        "tensors": tensors,
    }


def source_state_digest_at(replica: Replica, offset: int) -> str | None:
    """The source's state digest at ``offset`` (hex), or None when it cannot vouch for one: a
    retained offset's, else one whose record compaction dropped (Replica.past_state_digest).
    What proves that a destination older than the source's oldest offset holds its history."""
    offset = int(offset)
    if offset < 0 or offset > replica.head:
        return None
    digest = replica.state_digest_at(offset)
    return lineage.to_hex(digest if digest is not None else replica.past_state_digest(offset))


class DeadlineReached(Exception):
    """Raised by a ``throttle`` (--bwlimit's token bucket) whose wait would run past --deadline."""


HISTORY_LIMIT = 10_000  # source records one sync record names at most (every rollback is kept)


def source_history(replica: Replica, since: int, target: int) -> list:
    """The records in (since, target] as a sync record's ``history`` (record.HISTORY_FIELDS), oldest first.

    A sync record of this replica stands for its own source's records, so
    its history is taken instead of itself: however many hops away, a
    follower's log names the records the model's writer made. Past
    HISTORY_LIMIT entries the oldest commits are left out; rollbacks never are.
    """
    out: list = []
    for s in replica.iter_summaries(since, target):
        if s.history is not None:
            out.extend(e for e in s.history if e[0] > since)
        else:
            out.append([s.offset, s.kind, s.time, s.rows, s.significance, s.target, s.reason, s.user, s.host])
    if len(out) > HISTORY_LIMIT:
        rollbacks = {i for i, e in enumerate(out) if e[1] == "rollback"}
        newest = set(range(len(out) - max(0, HISTORY_LIMIT - len(rollbacks)), len(out)))
        out = [e for i, e in enumerate(out) if i in rollbacks or i in newest]
    return out


# A chunk whose values total at most this is encoded two tensors at a time (codec.map_in_pairs):
# a one-shot sync or a follower's round waits for it. Above it, memory follows the change first.
PAIRED_CHUNK_BYTES = 16 << 20


def source_chunks(replica: Replica, since: int, advanced, target: int, max_chunk_bytes: int,
                  base_values: bool = False) -> Iterator[bytes]:
    """Encoded "sync" records bringing a replica at ``since`` to ``target`` (see Source.chunks).

    When everything fits in one chunk the order of buckets does not matter,
    so the records' values are not decompressed to rank them. ``base_values``:
    send the new values relative to the values at ``since`` (the destination's;
    codec.BASE_XOR_VALUES), for a destination that holds no partial sync.
    """
    if base_values and advanced:
        raise InvalidInput("values relative to the destination's need a destination without a partial sync")
    advanced = normalise_advanced(advanced)
    _check_range(replica, since, target)
    max_chunk_bytes = max(1, int(max_chunk_bytes))
    changes = _collect_changes(replica, since, target, advanced, exact_significance=False)
    total = sum(len(ch.rows) * (ch.info.row_bytes + ROW_OVERHEAD) for ch in changes)
    if total > max_chunk_bytes:  # several chunks: a budget may stop between them, so rank them exactly
        changes = _collect_changes(replica, since, target, advanced, exact_significance=True)
    order = _bucket_order(changes, replica.bucket_rows)
    row_cost = [ch.info.row_bytes + ROW_OVERHEAD for ch in changes]  # a property: not once per bucket
    # Every chunk says the state digests at both ends; the first also carries the history.
    claims = {"pre_digest": replica.state_digest_at(since), "post_digest": replica.state_digest_at(target),
              "history": source_history(replica, since, target)}
    batch: list[tuple[int, int, int]] = []
    size = 0
    for sig, ti, _bucket, start, stop in order:
        batch.append((ti, start, stop))
        size += (stop - start) * row_cost[ti]
        if size >= max_chunk_bytes:
            yield _encode_chunk(replica, changes, batch, since, target, claims, base_values)
            claims["history"] = None
            batch, size = [], 0
    if batch:
        yield _encode_chunk(replica, changes, batch, since, target, claims, base_values)


def _encode_chunk(replica, changes, batch, since, target, claims: dict, base_values: bool = False) -> bytes:
    picked: dict[int, list[np.ndarray]] = {}
    for ti, start, stop in batch:
        picked.setdefault(ti, []).append(np.arange(start, stop))
    rows_by_name, sel = {}, {}
    for ti, idx in picked.items():
        idx = np.sort(np.concatenate(idx))
        sel[ti] = idx
        rows_by_name[changes[ti].info.name] = changes[ti].rows[idx]

    def sealed(ti: int) -> rec.TensorDelta:  # a tensor's sections; its values go once they are compressed
        ch, idx = changes[ti], sel[ti]
        name = ch.info.name
        _head, values = values_at(replica, target, {name: rows_by_name[name]})  # at target, whatever the head now
        base = values_at(replica, since, {name: rows_by_name[name]})[1].pop(name) if base_values else None
        out = rec.compressed(rec.TensorDelta(name, ch.info.dtype, rows_by_name[name], values.pop(name), None,
                                             ch.versions[idx], float(ch.row_sig[idx].sum()), base=base))
        del base
        heap.release(len(idx) * ch.info.row_bytes * (2 if base_values else 1))  # that tensor's values are gone
        return out

    order = sorted(sel, key=lambda t: changes[t].info.id)
    costs = [len(sel[ti]) * changes[ti].info.row_bytes for ti in order]
    if sum(costs) <= PAIRED_CHUNK_BYTES:  # the largest tensor alone, smaller ones in pairs
        tensors = codec.map_in_pairs(sealed, order, costs)
    else:  # one at a time: a second thread's heap kept ~70 MiB more at 4 GiB (bench, 3 minutes of lag)
        tensors = [sealed(ti) for ti in order]
    record = rec.Record(offset=target, base=since, kind="sync", time=time.time(), model_id=replica.model_id,
                        tensors=tensors, target=target, **claims)
    return rec.encode(record, RECORD_VERSION)  # for a peer: the wire's encoding, whatever the log stores


def source_snapshot_manifest(replica: Replica, offset: int) -> dict:
    """The manifest of the snapshot at ``offset``, plus the bucket versions a new replica starts from.

    ``bucket_versions`` holds the source's bucket versions capped at
    ``offset`` (a bucket written later gets ``offset``: at most that new at
    the snapshot, which the records after it then correct exactly).
    """
    manifest = next((m for m in replica.snapshots() if m["offset"] == offset), None)
    if manifest is None:
        raise OffsetNotRetained(f"{replica.path}: no snapshot at offset {offset!r}",
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
        raise OffsetNotRetained(f"{replica.path}: no snapshot at offset {offset!r}")
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
    pending_buckets: int = 0  # buckets the destination holds ahead of its head (status's pending_buckets)
    pending_target: int | None = None  # the offset those buckets lead to (status's pending_target)
    snapshot_offset: int | None = None
    snapshot_bytes: int = 0
    created: bool = False
    dry_run: bool = False
    stopped_by: str | None = None  # "max-bytes" | "deadline" | "signal" when stopped before the end
    plan: dict | None = None  # dry run: what would move
    note: str | None = None
    tensors: list[dict] = field(default_factory=list)  # per tensor: rows and bytes sent, snapshot bytes, significance

    def to_json(self) -> dict:
        return asdict(self)

    def account(self, name: str, rows: int = 0, nbytes: int = 0, snapshot_bytes: int = 0,
                significance: float = 0.0) -> None:
        """Add what was sent of one tensor (the per-tensor report of ``sync --stats``)."""
        entry = next((t for t in self.tensors if t["name"] == name), None)
        if entry is None:
            entry = {"name": name, "rows": 0, "bytes": 0, "snapshot_bytes": 0, "significance": 0.0}
            self.tensors.append(entry)
        entry["rows"] += rows
        entry["bytes"] += nbytes
        entry["snapshot_bytes"] += snapshot_bytes
        entry["significance"] += significance

    def account_chunk(self, blob) -> None:
        for t in rec.summarize(blob, "chunk").tensors:
            self.account(t["name"], rows=t["rows"], nbytes=t["bytes"], significance=t["significance"])


@dataclass
class Budget:
    """What a run may spend: bytes (--max-bytes) and time (--deadline).

    The deadline counts on the monotonic clock (immune to wall-clock steps)
    from ``started``: the CLI passes the moment the command began, before it
    connected to the source, so connecting and the hello count too. It is
    checked before each chunk or snapshot piece is requested, the first one
    included: no chunk starts once it has passed (one in flight finishes and
    is applied), so a deadline shorter than the setup moves nothing. The byte
    budget has the opposite guarantee: its first piece always goes, so a
    budget smaller than one bucket still makes progress.
    """

    max_bytes: int | None = None
    deadline: float | None = None  # seconds from ``started``
    started: float = field(default_factory=time.monotonic)
    clock: Callable[[], float] = time.monotonic

    def out_of_time(self) -> bool:
        """Whether no new chunk may start now (the deadline has passed)."""
        return self.deadline is not None and self.clock() - self.started >= self.deadline

    def over_bytes(self, spent: int, next_bytes: int, first: bool) -> bool:
        """Whether ``next_bytes`` more would exceed --max-bytes. The first piece always goes."""
        return self.max_bytes is not None and spent + next_bytes > self.max_bytes and not first


def check_same_model(hello: dict, state: dict, dst: str) -> None:
    """ModelMismatch unless the destination holds the source's model (id, layout, buckets)."""
    if state["model_id"] != hello["model_id"]:
        raise ModelMismatch(f"{dst} holds model {state['model_id']}, the source holds {hello['model_id']}",
                            hint="sync only between replicas of one model")
    if not same_layout(state, hello):
        raise ModelMismatch(f"{dst} has another tensor layout or bucket size than the source")


def same_layout(a: dict, b: dict) -> bool:
    """Whether two descriptions (hello, sink state, relay head) have the same tensors and bucket size."""
    def layout(d):
        return [(t["name"], t["dtype"], list(t["shape"])) for t in d["tensors"]], d["bucket_rows"]
    return layout(a) == layout(b)


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
    reseed: bool = False,
    started: float | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> SyncResult:
    """Bring ``sink`` up to ``source``'s head (or as far as the budget allows).

    ``deadline`` is in seconds of ``clock`` (monotonic) from ``started``
    (default: now); no chunk or snapshot piece is requested once it has
    passed, the first one included (see :class:`Budget`).

    ``throttle(n)`` is called with the size of every snapshot piece before
    it is requested and of every chunk as it arrives, before it is applied,
    and may sleep (--bwlimit's token bucket); it raises DeadlineReached when
    its wait would run past --deadline, which stops the run there as the
    deadline does (that chunk is not applied).
    ``should_stop()`` is asked before each one is applied: True stops the
    run there (``stopped_by="signal"``), every chunk applied so far kept as
    resumable partial-sync state, exactly as a budget stops it.

    Lineage: the destination must hold the source's model at the offsets
    they share (deltalog.lineage). Equal heads with different state digests,
    a destination ahead of the source that held another model at the
    source's head, and (checked by the sink, chunk by chunk) rows that do
    not turn the destination into the source's model all raise Diverged
    before anything moves. ``reseed`` replaces the destination by the
    source's newest snapshot and the log after it instead, whatever it held.
    """
    report = progress is not None
    throttle = throttle or (lambda n: None)
    should_stop = should_stop or (lambda: False)
    progress = progress or (lambda stage, done, total: None)
    budget = Budget(max_bytes, deadline, clock() if started is None else started, clock)
    hello = source.hello()
    if hello.get("protocol") != PROTOCOL_VERSION:
        raise TransportError(f"{source_name}: speaks sync protocol v{hello.get('protocol')}, we speak v{PROTOCOL_VERSION}")
    if lineage.from_hex(hello.get("state_digest")) is None:
        raise UnsupportedVersion(
            f"{source_name}: the source sends no state digest, so what it sends cannot be proven to fit "
            f"{destination_name}",
            hint="upgrade deltalog on the source, or run any write there once (state digests came with format 4)",
        )
    state = sink.begin(wait, dry_run)
    target = int(hello["head"])
    result = SyncResult(source_name, destination_name, from_offset=state["head"], to_offset=target,
                        head=state["head"], source_head=target, dry_run=dry_run,
                        pending_buckets=state.get("pending_buckets", 0),
                        pending_target=state.get("pending_target"))
    existed = state["exists"]
    if existed:
        check_same_model(hello, state, destination_name)
    follow = {"source": source_name, "source_head": target, "source_time": hello.get("time"), "synced_at": time.time()}

    def finish_result() -> SyncResult:
        if result.complete or not result.pending_buckets:  # as status says it: no partial sync, no target
            result.pending_buckets, result.pending_target = 0, None
        result.seconds = round(clock() - budget.started, 6)
        return result

    # --- snapshot transfer: a new destination, one older than the source keeps, or a reseed
    need_snapshot = not state["exists"] or state["head"] < hello["oldest_offset"] or reseed
    proven = False  # the destination's history checked against the source's before a snapshot replaces it
    if existed and not reseed and state["head"] < hello["oldest_offset"]:
        proven = _check_lineage_before_oldest(source, hello, state, source_name, destination_name)
    if not need_snapshot:
        unchecked = _check_lineage(hello, state, sink, source_name, destination_name)
    if not need_snapshot and state["head"] >= target:
        # Nothing this source can add (a partial sync from a newer source, if any, stays pending).
        result.complete = True
        result.to_offset = state["head"]
        if state["head"] > target:
            result.note = f"the destination (head {state['head']}) is ahead of the source (head {target})"
            if unchecked:
                result.note += f"; {unchecked}"
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
        if budget.out_of_time():  # nothing is staged for a transfer that may not start
            result.stopped_by = "deadline"
            return finish_result()
        # A destination proven to hold the source's history keeps the digests of what it drops
        # (its own followers may stand on them); a reseeded one held another history.
        held = sink.snapshot_begin({**hello, "history_proven": True} if proven else hello, manifest)
        done = sum(min(held.get(e["file"], 0), int(e["nbytes"])) for e in manifest["tensors"])
        first = True
        for entry in manifest["tensors"]:
            size = int(entry["nbytes"])
            pos = min(held.get(entry["file"], 0), size)
            while pos < size:
                n = min(max(1, int(piece_bytes)), size - pos)
                if budget.max_bytes is not None:
                    n = min(n, max(1, budget.max_bytes // 4))
                why = "deadline" if budget.out_of_time() else (
                    "max-bytes" if budget.over_bytes(result.bytes_sent, n, first) else None)
                if why:
                    result.stopped_by = why
                    return finish_result()
                try:
                    throttle(n)  # paced before the request: the piece's bytes are paid for before they move
                except DeadlineReached:  # --bwlimit could not let it arrive before --deadline
                    result.stopped_by = "deadline"
                    return finish_result()
                data = source.read_snapshot_file(snap, entry["file"], pos, n)
                if len(data) != n:
                    raise TransportError(f"{source_name}: snapshot file {entry['file']} came short "
                                         f"({len(data)} of {n} bytes at {pos})")
                if should_stop():
                    result.stopped_by = "signal"
                    return finish_result()
                sink.snapshot_write(entry["file"], pos, data)
                result.account(entry["name"], snapshot_bytes=n)
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
    if not dry_run:  # after a snapshot install or an undone partial sync, what the destination holds now
        result.pending_buckets = state.get("pending_buckets", 0)
        result.pending_target = state.get("pending_target")
    if dry_run:
        result.plan = _dry_plan(source, since, advanced, target)
        pre = lineage.from_hex(result.plan.get("pre_digest"))
        if pre is not None and lineage.from_hex(state.get("state_digest")) not in (None, pre):
            raise diverged(destination_name, since, lineage.from_hex(state.get("state_digest")), pre, source_name)
        return finish_result()
    plan_total = None
    if report and hasattr(source, "plan"):  # a progress bar wants a total; costs a second pass at the source
        try:
            plan_total = source.plan(since, advanced, target)["rows"]
        except (TransportError, AttributeError, NotImplementedError):
            plan_total = None
    first = result.snapshot_offset is None
    if budget.out_of_time():  # not even the first chunk is asked for (Budget)
        result.stopped_by = "deadline"
        sink.note_follow(follow)
        return finish_result()
    relative = {"base_values": True} if _values_relative(source, sink, hello, state, advanced) else {}
    stream = source.chunks(since, advanced, target, _chunk_bytes(budget, chunk_bytes), **relative)
    # A sync that is one chunk is applied as its final record at once (Sink.apply_final)
    # when the destination has no partial state; a wrapper sink (guard) opts out by
    # not defining the method on its class.
    whole = not advanced and not state.get("pending_target") and callable(getattr(type(sink), "apply_final", None))
    finished = True
    fast = False
    try:
        for blob, only in _mark_only(stream, peek=whole, may_read=lambda: not budget.out_of_time()):
            if blob is None:  # the deadline passed before the next chunk was asked for
                result.stopped_by = "deadline"
                finished = False
                break
            if budget.over_bytes(result.bytes_sent, len(blob), first):
                result.stopped_by = "max-bytes"
                finished = False
                break
            try:
                throttle(len(blob))
            except DeadlineReached:  # paced by --bwlimit, it could not be applied before --deadline
                result.stopped_by = "deadline"
                finished = False
                break
            if should_stop():
                result.stopped_by = "signal"
                finished = False
                break
            if only:
                state = sink.apply_final(blob, target, {**follow, "in_sync_at": follow["synced_at"]})
                result.account_chunk(blob)
                fast = True
                result.chunks = 1
                result.rows_sent = int(state["rows"])
                result.bytes_sent += len(blob)
                progress("rows", result.rows_sent, plan_total or 0)
                break
            applied = sink.apply_chunk(blob, target, source_name)
            result.account_chunk(blob)
            first = False
            result.chunks += 1
            result.rows_sent += applied["rows"]
            result.bytes_sent += len(blob)
            result.pending_buckets = applied["pending_buckets"]
            result.pending_target = target
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
        state = sink.finish(target, {**follow, "in_sync_at": follow["synced_at"]}, hello["state_digest"])
        result.complete = True
        result.pending_buckets = 0
        result.head = state["head"]
    else:
        sink.note_follow(follow)
    return finish_result()


def _values_relative(source, sink, hello: dict, state: dict, advanced: dict) -> bool:
    """Whether to ask for values relative to the destination's own (codec.BASE_XOR_VALUES).

    They cost fewer bytes on the wire (1.31x compression where plain values
    give 1.17x on bench/workload.py's stream) for a second read of the log at
    the source (the destination stores what it receives as its undo section:
    no more work there), so: when both ends name the codec (older peers do
    not), when a network lies between them (not two local directories), and
    when the destination holds no partial sync, so that every row it is sent
    is at ``since``, what the values are relative to.
    """
    spoken = all(codec.BASE_XOR_VALUES in (d.get("chunk_codecs") or ()) for d in (hello, state))
    local = getattr(source, "local", False) and getattr(sink, "local", False)
    return spoken and not local and not advanced and not state.get("pending_target")


def _check_lineage(hello: dict, state: dict, sink, source_name: str, destination_name: str) -> str | None:
    """Diverged unless the destination held the source's model wherever the two can be compared now.

    Equal heads compare the digests at once. A destination ahead of the
    source compares its digest at the source's head, when it holds that
    offset; when it does not, what it is cannot be checked here (the answer
    says so: nothing moves either way). A destination behind is checked by
    the sink with every chunk (receive.py). Returns a note when unchecked.
    """
    theirs, mine, head, target = hello["state_digest"], state.get("state_digest"), state["head"], int(hello["head"])
    if "state_digest" not in state:  # an older deltalog at the far end of ssh
        raise UnsupportedVersion(f"{destination_name}: the destination reports no state digest, so a sync into it "
                                 "cannot be proven exact", hint="upgrade deltalog on the destination (format 4)")
    if mine is None:  # a dry run into a replica of an older format: its first write computes the digest
        return "its history is not checked yet (it has no state digest until its first write)"
    if head == target and mine != theirs:
        raise diverged(destination_name, head, lineage.from_hex(mine), lineage.from_hex(theirs), source_name)
    if head > target:
        probe = getattr(sink, "state_digest_at", None)
        at = probe(target) if probe is not None else None
        if at is None:
            return f"it does not hold offset {target}, so whether it shares the source's history is not known"
        if at != theirs:
            raise diverged(destination_name, target, lineage.from_hex(at), lineage.from_hex(theirs), source_name)
    return None


def _check_lineage_before_oldest(source, hello: dict, state: dict, source_name: str, destination_name: str) -> bool:
    """True once a destination older than the source's oldest offset is proven to hold the source's
    model at its head: the source's state digest there (compaction keeps the digests of the records
    it drops) is the destination's. Replacing it otherwise would drop, unnoticed, whatever another
    history gave it (a stray commit, a failover primary's writes).

    Diverged when the digests differ; HistoryUnproven (exit 7) when there is nothing to compare:
    the source has no digest for that offset (it compacted before it kept them, keeps only the
    newest, never held it, or is an older deltalog), or the destination has none yet."""
    head, mine = state["head"], lineage.from_hex(state.get("state_digest"))
    if mine is None:  # a dry run into an older format: its first write computes the digest
        raise HistoryUnproven(
            f"{destination_name}: its head {head} is older than {source_name}'s oldest offset "
            f"{hello['oldest_offset']}, and it has no state digest yet to prove it holds that history",
            hint="sync without --dry-run (its upgrade computes one), or pass --reseed to replace it",
        )
    ask = getattr(source, "state_digest_at", None)
    theirs = lineage.from_hex(ask(head)) if ask is not None else None
    if theirs is None:
        raise HistoryUnproven(
            f"{destination_name}: its head {head} is older than {source_name}'s oldest offset "
            f"{hello['oldest_offset']}, and {source_name} has no state digest for offset {head}, "
            f"so {destination_name} cannot be proven to hold its history",
            hint=f"pass --reseed to replace {destination_name} by the source's snapshot and log",
        )
    if theirs != mine:
        raise diverged(destination_name, head, mine, theirs, source_name)
    return True


def _mark_only(stream, peek: bool, may_read: Callable[[], bool] = lambda: True):
    """(blob, only) for each blob of ``stream``; ``only`` is True for a first blob that is also the last.

    Knowing that takes reading the second blob before the first is applied,
    so it is done only when asked (``peek``). ``may_read()`` is asked before
    each blob after the first is requested (the deadline): False yields
    (None, False) and ends. A peek it refuses is not made, and the first
    blob goes as an ordinary chunk.
    """
    it = iter(stream)
    first = next(it, None)
    if first is None:
        return
    if not peek or not may_read():
        yield first, False
    else:
        second = next(it, None)
        yield first, second is None
        if second is None:
            return
        yield second, False
    while True:
        if not may_read():
            yield None, False
            return
        blob = next(it, None)
        if blob is None:
            return
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
