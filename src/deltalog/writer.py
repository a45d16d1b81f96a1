"""The one way a replica changes: every write follows FORMAT.md section 6.

A :class:`Change` is two LMDB transactions with the tensor files written in
between:

1. ``log``: what the change records (a record, bucket entries, an intent,
   meta keys) and the fields of meta/state that move with it (the head, the
   state digest), with ``applying`` set: one fully synced transaction;
2. the rows and their row digests, written into the memory-mapped tensor
   files (the page cache; fsynced first when the change is ``durable``,
   because its head does not move and nothing else would tell a machine
   crash that rows were lost);
3. ``settle``: ``applied`` = the head, ``applying`` cleared, the boot id and
   ``gen`` + 1 (what lock-free readers compare), with the change's own last
   writes (dropping an intent, restoring bucket entries).

A change with nothing to write in between is one transaction.

A crash between 1 and 3 leaves an unsettled replica, which whoever takes the
lock next repairs (:meth:`Writer.recover`): it re-applies the records after
``applied`` (they hold absolute values), then runs the finisher of every
*intent* it finds in meta. An intent is a meta key that a change writes in
its first transaction to say what it is doing (``sync.restore``,
``sync.revert``, ...); its finisher is the function that does steps 2 and 3
of that change, and the change itself calls the same function after step
1. So recovery runs the code every normal write runs, and every finisher is
idempotent. The registry of intents is handed to the writer by the replica
(deltalog.receive defines the sync ones), so this module knows no intent by
name.

Also here: the flush schedule (tensor files are fsynced like a WAL
checkpoint), the upgrade of older formats, and the birth of a replica
directory (:func:`create_replica`), the one change that has no replica yet.
"""

from __future__ import annotations

import functools
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from . import codec, heap, kernels, layout, lineage, spill, tensorfiles
from . import record as rec
from .errors import DeltalogError, StorageError, UnsupportedVersion
from .lock import WriterLock
from .store import LogStore
from .tensorfiles import TensorInfo

if TYPE_CHECKING:
    from .replica import Replica

# Tensor files are fsynced like a WAL checkpoint, not at every commit: the
# log already makes each record durable, and a kill -9 loses nothing that
# sits in the page cache. Only a machine crash can, and the boot id tells.
# Every fsync also write-protects the pages it cleaned, so the next commit's row
# writes fault again (1,000 scattered rows: 18.6 ms into clean pages, 0.16 ms
# into dirty ones): flushing seldom is much cheaper, and the log replays what a
# machine crash loses. The kernel's own writeback runs on a similar clock.
FLUSH_SECONDS = 30.0
FLUSH_RECORDS = 1024

Txn = object  # an lmdb.Transaction; only deltalog.store's accessors touch it
Finisher = Callable[["Writer", object], None]  # (writer, the intent's value): steps 2 and 3 of its change


@dataclass(frozen=True)
class State:
    head: int  # newest durable record
    applied: int  # newest record whose rows are in the tensor files (page cache)
    applying: int | None  # set while rows are being written
    flushed: int  # newest record whose rows are fsynced to disk
    boot: str  # boot id of the machine that last wrote the tensor files
    gen: int = 0  # bumped by every apply: readers compare it (a partial-sync chunk moves no offset)
    digest: int | None = None  # the state digest of the model at head (format 4; deltalog.lineage)

    @property
    def settled(self) -> bool:
        """True when the tensor files hold exactly the model at head."""
        return self.applying is None and self.applied == self.head and (
            self.flushed == self.applied or self.boot == boot_id()
        )

    @classmethod
    def from_meta(cls, s: dict) -> "State":
        return cls(s["head"], s["applied"], s.get("applying"), s.get("flushed", s["applied"]), s.get("boot", ""),
                   s.get("gen", 0), s.get("digest"))


def boot_id() -> str:
    """Identity of this boot of the machine ('' where unknown: then every commit fsyncs)."""
    global _BOOT_ID
    if _BOOT_ID is None:
        try:
            with open("/proc/sys/kernel/random/boot_id") as f:
                _BOOT_ID = f.read().strip()
        except OSError:
            _BOOT_ID = ""
    return _BOOT_ID


_BOOT_ID: str | None = None


@dataclass
class RowWrite:
    """New values for some rows of one tensor, and their row digests (computed once, when first needed)."""

    info: TensorInfo
    rows: np.ndarray  # uint64, sorted, unique
    values: np.ndarray | None  # (len(rows), row_elems), storage dtype; None: ``load`` makes them
    digests: np.ndarray | None = None
    # Makes the values when they are written, for a change that does not keep every
    # tensor's values in memory at once (a sync destination decodes them again).
    load: Callable[[], np.ndarray] | None = None

    def row_digests(self, values: np.ndarray | None = None) -> np.ndarray:
        """The row digests of the new values (``values``: them, loaded already)."""
        if self.digests is None:
            self.digests = kernels.row_digests(self.loaded() if values is None else values)
        return self.digests

    def loaded(self) -> np.ndarray:
        return self.values if self.values is not None else self.load()


@dataclass
class RowChange:
    """One tensor's part of a record: the delta, and what the log's indexes need of it."""

    info: TensorInfo
    delta: rec.TensorDelta  # rows, new and old values, versions, significance
    row_sig: np.ndarray  # sum |new - old| per row (bucket significance)
    old_digests: np.ndarray  # the row digests of delta.old (the state digest moves by new minus old)
    write: RowWrite | None = None  # the rows to write; by default delta.new

    def __post_init__(self):
        if self.write is None:
            self.write = RowWrite(self.info, self.delta.rows, self.delta.new)

    def lineage(self) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
        return self.info.id, self.delta.rows, self.old_digests, self.write.row_digests()


@dataclass
class Change:
    """One change of a replica, in the order of the module docstring."""

    log: Callable[[Txn], None] | None = None  # the first transaction's own writes
    state: dict = field(default_factory=dict)  # meta/state fields it sets (head, digest, applying)
    rows: Sequence[RowWrite] = ()  # then written into the tensor files
    apply: Callable[[], None] | None = None  # other work of step 2 (copying a snapshot over the files)
    durable: bool = False  # fsync the files before the second transaction
    settle: Callable[[Txn], None] | None = None  # the second transaction's own writes
    settled: dict = field(default_factory=dict)  # meta/state fields it sets besides applied, applying, boot, gen
    logged: Callable[[], None] | None = None  # called once the first transaction committed (frees what only it used)


class Writer:
    """Changes one replica, holding its writer lock; owned by a :class:`deltalog.replica.Replica`."""

    def __init__(self, replica: "Replica", intents: Sequence[tuple[str, Finisher]]):
        self.replica = replica
        self.path = replica.path
        self.store: LogStore = replica.store
        self.maps: tensorfiles.TensorMaps = replica.maps
        self.lock = WriterLock(replica.path)
        self.store.writer_lock_held = lambda lock=self.lock: lock.held  # the store's bucket cache asks
        self._intents = list(intents)  # in the order recovery runs them
        self._finishers = dict(self._intents)
        self._dirty: set[int] = set()  # tensor ids written since the last flush (close() flushes then)
        self._dirty_since: float | None = None  # when rows were first written after the last flush
        self._checkpoint: Checkpoint | None = None  # the schedule's fsync, running beside the changes
        self.page_guard = tensorfiles.SmallPageGuard(self.maps)  # large folios brought back by other readers
        self._touching_ahead = None  # touch_ahead's future, until the next transition takes it

    # -- the lock ---------------------------------------------------------------

    @property
    def held(self) -> bool:
        return self.lock.held

    def _require_lock(self) -> None:
        if not self.lock.held:
            raise DeltalogError(f"{self.path}: changing a replica needs its writer lock: use Replica.writing()")

    @contextmanager
    def writing(self, wait: float = 0.0, upgrade: bool = True) -> Iterator[None]:
        """Hold the writer lock, with the tensors brought up to the log's head (re-entrant).

        An older replica is upgraded to the current format first
        (:meth:`upgrade`), unless ``upgrade`` is False (verify: it only reads).
        """
        replica = self.replica
        if not replica.writable_format:
            raise UnsupportedVersion(f"{self.path}: written by a newer deltalog; opened read-only")
        if self.lock.held:
            yield
            return
        self.lock.acquire(wait)
        self.maps.reads_share_writes = True
        try:
            self.recover()  # re-reads meta/format first: another process may have upgraded it
            if not replica.writable_format:
                raise UnsupportedVersion(f"{self.path}: written by a newer deltalog; opened read-only")
            if upgrade:
                self.upgrade()
            yield
        finally:
            try:
                self.end_touch_ahead()  # not left running once the lock is given up
            finally:
                self.lock.release()

    # -- what a change reads first --------------------------------------------------

    def rows(self, info: TensorInfo) -> np.ndarray:
        """The writable (rows, row_elems) map of a tensor file (lock held)."""
        return self.maps.rows(info, writable=True)

    def old_rows(self, info: TensorInfo, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(a copy of rows ``idx``, their row digests), checked against the stored digests (lock held).

        These become a record's undo values, so a damaged row is refused
        (IntegrityError), never sealed into the log. Digests are None on a
        replica without digest files (format 1, before its upgrade).
        """
        digests = self.replica.has_row_digests
        values, computed = kernels.gather_rows(self.rows(info), idx, digests=digests)
        if digests:
            self.replica.check_digests(info.name, idx, computed, self.maps.digests(info, writable=True)[idx])
        return values, computed

    # -- the transition ---------------------------------------------------------------

    def transition(self, change: Change) -> None:
        """Carry out ``change`` (lock held): log it, write its rows, settle."""
        self._require_lock()
        if not change.rows and change.apply is None:  # nothing to write in between: one transaction

            def once(txn):
                if change.log is not None:
                    change.log(txn)
                if change.settle is not None:
                    change.settle(txn)
                self._settle_state(txn, {**change.state, **change.settled}, durable=False)

            self.store.write(once)
            return
        touched = None
        if change.log is not None or change.state:

            def first(txn):
                if change.log is not None:
                    change.log(txn)
                state = self.store.get_meta(txn, "state")
                self._put_state(txn, **{"applying": change.state.get("head", state["head"]), **change.state})

            touching, self._touching_ahead = self._touching_ahead, None  # this change's rows (touch_ahead)
            if touching is None:
                touching = self._touch_in_background([(w.info, w.rows) for w in change.rows])
            try:
                self.store.write(first)
            finally:
                touched = _outcome(touching)  # waits: no row is stored while the touch runs
            if change.logged is not None:
                change.logged()
        self.write_rows(change.rows, touched=touched)
        if change.apply is not None:
            change.apply()
        if change.durable:
            self._fsync_files()
        self.settle(change)
        if not change.durable:
            self._flush_on_schedule()

    def settle(self, change: Change) -> None:
        """Step 3 of ``change``: its own last writes, and the rows marked applied (one transaction)."""

        def second(txn):
            if change.settle is not None:
                change.settle(txn)
            self._settle_state(txn, change.settled, durable=change.durable)

        self.store.write(second)

    def run_intent(self, key: str, value, log: Callable[[Txn], None] | None = None, **state) -> None:
        """Start a change whose rest is the finisher of intent ``key``: record the intent (with
        ``log`` and ``state``) in one transaction, then finish it as recovery would."""
        self._require_lock()
        finisher = self._finishers[key]

        def intend(txn):
            if log is not None:
                log(txn)
            self.store.put_meta(txn, key, value)
            self._put_state(txn, **state)

        self.store.write(intend)
        finisher(self, value)

    def append(
        self,
        kind: str,
        changes: Sequence[RowChange],
        *,
        offset: int,
        reason: str | None = None,
        target: int | None = None,
        history: list | None = None,
        log: Callable[[Txn], None] | None = None,
        rows_written: bool = False,
        expect_digest: Callable[[int], None] | None = None,
        started: rec.Sections | None = None,
    ) -> rec.Record:
        """Log and apply one record of ``changes`` at ``offset``, on top of the head (lock held).

        The record carries the state digest before and after it (the head's,
        moved by each row's new digest minus its old one). ``expect_digest``
        sees the new digest before anything is written and may refuse it (a
        sync destination checks it against its source's). ``log`` adds
        writes to the first transaction (follower metadata, dropping a
        partial sync's chunks). ``rows_written``: the rows are already in the
        tensor files (a finished partial sync), so the change is one transaction.
        ``started``: the deltas' sections, already compressing (rec.Sections).
        """
        state = self.replica.state
        pre = state.digest
        post = lineage.advance(pre, (c.lineage() for c in changes)) if pre is not None else None
        if expect_digest is not None:
            expect_digest(post)
        record = rec.Record(
            offset=offset, base=state.head, kind=kind, time=time.time(), model_id=self.replica.model_id,
            tensors=[c.delta for c in changes], reason=reason, target=target,
            pre_digest=pre, post_digest=post, history=history, user=_user(), host=_host(),
        )
        encoding = self.replica.record_encoding
        if any(t.encoded for t in record.tensors):  # a sync's sections, given encoded: encode only joins them
            parts = rec.encode_parts(record, encoding)
            for t in record.tensors:  # the parts hold them now: joined, they go (not twice in memory)
                t.encoded = None
            blob = spill.join(parts, self.replica.path)  # a large one in the page cache: LMDB copies it
            heap.release(len(blob))  # about what the sections weighed
            encoded = [blob]
            del blob
        else:  # compress on other cores while the first transaction fills the bucket index
            encoded = [codec.in_background(functools.partial(rec.encode, record, encoding, started))]

        def log_it(txn):
            try:
                for c in changes:
                    self.bump_buckets(txn, c.info, c.delta.rows, c.row_sig, offset, c.delta.versions)
            finally:
                blob = encoded[0].result() if isinstance(encoded[0], Future) else encoded[0]  # never left running
            encoded[0] = blob  # the body may run again (after the map grows): encode once
            self.store.put_record(txn, offset, blob)
            if log is not None:
                log(txn)

        new_state = {"head": offset, "applying": offset, "digest": post}
        self.transition(Change(log=log_it, state=new_state, rows=() if rows_written else [c.write for c in changes],
                               logged=encoded.clear))
        return record

    def fold(self, horizon: int, manifest: dict, clear_buckets: bool = False) -> tuple[int, int, list[int]]:
        """Compaction's switch (lock held): register the snapshot at ``horizon``, make it the oldest
        offset and drop the records up to it and the older snapshots, in one transaction.
        ``clear_buckets`` empties the bucket index too (every bucket then counts as written at or
        before the oldest offset, which is true once nothing before the head is kept).

        Returns (records removed, their bytes, the snapshot offsets dropped).
        """
        folded: dict = {}

        def fold(txn):
            if clear_buckets:
                self.store.clear_buckets(txn)
            folded["dropped"] = [o for o in self.store.snapshot_offsets(txn) if o < horizon]
            folded["removed"] = keep_past_digests(self.store, txn, self.path, horizon, folded["dropped"],
                                                  (horizon, lineage.from_hex(manifest.get("state_digest"))))
            self.store.put_snapshot(txn, manifest)
            self.store.put_meta(txn, "oldest", horizon)
            folded["freed"] = self.store.delete_records(txn, upto=horizon)
            for offset in folded["dropped"]:
                self.store.delete_snapshot(txn, offset)

        self.transition(Change(log=fold))
        return folded["removed"], folded["freed"], folded["dropped"]

    def register_snapshot(self, manifest: dict) -> None:
        """Register a complete snapshot directory (lock held)."""
        self.transition(Change(log=lambda txn: self.store.put_snapshot(txn, manifest)))

    # -- pieces of a change -------------------------------------------------------------

    def bump_buckets(self, txn, info: TensorInfo, rows: np.ndarray, row_sig: np.ndarray, offset: int,
                     row_versions: np.ndarray | None) -> None:
        """Set each touched bucket's version (the newest offset that wrote a row in it) and add its significance."""
        bucket_rows = self.replica.bucket_rows
        buckets = (rows // np.uint64(bucket_rows)).astype(np.int64)
        starts = np.flatnonzero(np.r_[True, buckets[1:] != buckets[:-1]])
        if not len(starts):
            return
        sums = np.add.reduceat(row_sig, starts)
        if row_versions is None:
            versions = np.full(len(starts), offset, dtype=np.uint64)
        else:
            versions = np.maximum.reduceat(np.asarray(row_versions, dtype=np.uint64), starts)
        self.store.bump_buckets(txn, info.id, buckets[starts], versions, sums)

    def touch_ahead(self, rows: Sequence[tuple[TensorInfo, np.ndarray]]) -> None:
        """Start the page touch of the next change's rows now (lock held), for a caller that knows
        them long before it has the change: a sync destination, which reads and re-encodes a chunk
        tensor by tensor first. Its write faults are then taken on another core meanwhile, not
        behind the log's fsync, and its own reads of those rows fault no more. The next
        transition takes it as its own touch. Every row store waits for it, and so do the
        lock's release and the replica's close: it never runs over maps that go away."""
        self._require_lock()
        self.end_touch_ahead()
        self._touching_ahead = self._touch_in_background(rows)

    def end_touch_ahead(self) -> None:
        """Wait for a :meth:`touch_ahead` still running (it does nothing then)."""
        touching, self._touching_ahead = self._touching_ahead, None
        _outcome(touching)

    def _touch_in_background(self, rows: Sequence[tuple[TensorInfo, np.ndarray]]):
        """Start faulting in, writable, the pages that ``rows`` (info, row indices) will be stored
        into (their tensor files and row digest files), on another thread while the first
        transaction commits and fsyncs; a future of what that thread dirtied (for the page guard:
        None when it does not watch), or None. Contents stay unchanged, so this may run before the
        record is durable."""
        if not rows or not kernels.enabled():
            return None
        targets = []
        for info, indices in rows:
            idx = indices.astype(np.int64)
            targets.append((self.rows(info), idx))  # the maps are opened here, on the writer's thread
            if self.replica.has_row_digests:
                targets.append((self.maps.digests(info, writable=True), idx))
        watching = self.page_guard.watching(self.replica.tensors)

        def touch() -> int | None:
            before = tensorfiles.thread_dirtied_bytes() if watching else None
            for table, idx in targets:
                kernels.touch_rows(table, idx)
            after = tensorfiles.thread_dirtied_bytes() if before is not None else None
            return None if after is None else after - before

        return codec.in_background(touch, lane="touch")  # not behind the record's encoding, which waits

    def write_rows(self, writes: Sequence[RowWrite], touched: int | None = None) -> None:
        """Write rows and their digests into the tensor files (the page cache; see :meth:`flush`).

        If the stores dirtied large folios, the files are fsynced and re-cached in small pages
        (tensorfiles.SmallPageGuard). ``touched``: what the touch of these rows' pages dirtied
        on another thread just before (:meth:`_touch_in_background`)."""
        self.end_touch_ahead()  # a store racing the touch's store of the old byte could lose its value
        digests = self.replica.has_row_digests
        mark = self.page_guard.mark(self.replica.tensors) if writes else None
        for w in writes:
            idx = w.rows.astype(np.intp)
            stored = self.maps.digests(w.info, writable=True) if digests else None  # a missing file fails first
            values = w.loaded()  # once: ``load`` may decode them
            self.rows(w.info)[idx] = values
            if stored is not None:
                stored[idx] = w.row_digests(values)
            del values
            self._dirty.add(w.info.id)
        if writes and self._dirty_since is None:
            self._dirty_since = time.monotonic()
        self.page_guard.check(mark, [(w.info, len(w.rows)) for w in writes], self.replica.tensors, self._fsync_files,
                              dirtied_elsewhere=touched or 0)

    def put_meta(self, key: str, value) -> None:
        """Bookkeeping that is not part of the model (follower metadata, a check's marker); lock held."""
        self._require_lock()
        self.store.write(lambda txn: self.store.put_meta(txn, key, value))

    def delete_meta(self, key: str) -> None:
        self._require_lock()
        self.store.write(lambda txn: self.store.delete_meta(txn, key))

    def _put_state(self, txn, **changes) -> None:
        state = self.store.get_meta(txn, "state")
        state.setdefault("flushed", state["applied"])
        state.update(changes)
        self._put_state_meta(txn, state)

    def _put_state_meta(self, txn, state: dict) -> None:
        if state.get("digest") is None:  # unknown (a replica before format 4): no key, not nil
            state.pop("digest", None)
        self.store.put_meta(txn, "state", state)

    def _settle_state(self, txn, fields: dict, durable: bool) -> None:
        """applied = head, applying cleared, this boot, gen + 1; and ``flushed`` = applied when every
        tensor file was just fsynced (a durable change)."""
        state = self.store.get_meta(txn, "state")
        state.setdefault("flushed", state["applied"])
        state.update(fields)
        state.update(applied=state["head"], applying=None, boot=boot_id(), gen=state.get("gen", 0) + 1)
        # A change may move the head back (a reverted sync): nothing after it is flushed either.
        state["flushed"] = state["head"] if durable else min(state["flushed"], state["head"])
        self._put_state_meta(txn, state)

    # -- durability ---------------------------------------------------------------------

    def _file_paths(self) -> list[str]:
        """Every tensor file and row digest file of the model."""
        paths = []
        for info in self.replica.tensors:
            if info.nbytes:
                paths.append(self.maps.path(info))
            if self.replica.has_row_digests and info.rows:
                paths.append(self.maps.digest_path(info))
        return paths

    def _fsync_paths(self, paths: Sequence[str]) -> None:
        try:
            for path in paths:
                fd = os.open(path, os.O_RDONLY)
                try:
                    os.fsync(fd)  # all dirty pages of the file, whichever mapping wrote them
                finally:
                    os.close(fd)
        except OSError as exc:
            raise StorageError(f"{self.path}: cannot write tensor files: {exc.strerror}") from None

    def _fsync_files(self) -> None:
        """fsync every tensor file and row digest file: an earlier writer that was killed may have
        left pages of files this handle never wrote."""
        self._fsync_paths(self._file_paths())
        self._dirty.clear()
        self._dirty_since = None

    def start_checkpoint(self) -> "Checkpoint | None":
        """Start fsyncing the tensor files on another thread, as :meth:`flush` would, without
        holding anything: a follower keeps applying rounds meanwhile (an fsync of a table that
        random rows dirtied all over takes a second or more, and stalled every update behind it).
        :meth:`finish_checkpoint` then moves ``flushed``. None when the state cannot be vouched
        for (unsettled, or no state digest to check the model against later).
        """
        state = self.replica.state
        if not state.settled or state.applied != state.head or state.digest is None:
            return None
        checkpoint = Checkpoint(state.applied, state.digest, self._fsync_paths, self._file_paths())
        self.defer_flush()  # close() need not fsync what the checkpoint covers
        return checkpoint

    def finish_checkpoint(self, checkpoint: "Checkpoint") -> bool:
        """Once ``checkpoint`` has fsynced every file (it waits for that), record ``flushed`` =
        its offset (lock held), if that still says the truth: the head has not gone back below
        it and the model at that offset is the one it started from (a revert since then could
        have rewritten rows the fsync saw). True if ``flushed`` moved; the fsync's own error
        (StorageError: the files could not be written) is raised, as :meth:`flush` would."""
        checkpoint.thread.join()
        if checkpoint.error is not None:
            raise checkpoint.error
        self._require_lock()
        state = self.replica.state
        if state.head < checkpoint.offset or state.flushed >= checkpoint.offset:
            return False
        if self.replica.state_digest_at(checkpoint.offset) != checkpoint.digest:
            return False
        self.store.write(lambda txn: self._put_state(txn, flushed=checkpoint.offset))
        return True

    def flush(self) -> None:
        """fsync the tensor files and record that they are durable up to ``applied`` (lock held)."""
        self._fsync_files()
        self.store.write(lambda txn: self._put_state(txn, flushed=self.store.get_meta(txn, "state")["applied"]))

    def _flush_on_schedule(self) -> None:
        # A WAL checkpoint once the oldest unflushed write is FLUSH_SECONDS old (not
        # "a second since the last flush"): one long operation, such as a rollback of
        # many records, returns once its record is durable instead of also waiting
        # for the fsync of every page it just wrote. The fsync runs on a thread of its
        # own while changes go on, and a later change records what it made durable:
        # in line, the fsync of a table that random rows dirtied all over stalled one
        # commit in every 30 s for most of a second (bench/run.py: 0.84 s at 1 GiB).
        if self._checkpoint is not None:
            self.finish_checkpoint_if_done()
        elif self._dirty and self.flush_due():
            self.checkpoint_in_background()

    def checkpoint_in_background(self) -> None:
        """The WAL checkpoint that is due, on a thread of its own (:meth:`start_checkpoint`); one at
        a time: while one runs, the next is due a schedule from now. In line (if the lock is ours
        or free) when the state cannot be vouched for, or without a boot id: a reboot could not be
        told apart, so the files must be durable before the change returns. The writer's own
        schedule and a follower's (transport.local.LocalSink) both start it."""
        if self._checkpoint is None:
            self._checkpoint = self.start_checkpoint() if boot_id() else None
            if self._checkpoint is None:
                self.flush_if_free()
                return
        self.defer_flush()

    def finish_checkpoint_if_done(self) -> None:
        """Record what the background checkpoint made durable once it has ended (if the lock is ours
        or free); one still running is left for later."""
        running = self._checkpoint
        if running is not None and running.done:
            self._checkpoint = None
            self.finish_checkpoint_if_free(running)

    def end_checkpoint(self) -> None:
        """Wait for the schedule's background fsync, if one runs, and record what it made durable
        (when the lock is ours or free): a handle that closes leaves no fsync behind."""
        running, self._checkpoint = self._checkpoint, None
        if running is not None:
            self.finish_checkpoint_if_free(running)

    def flush_due(self) -> bool:
        """Whether the WAL-checkpoint schedule says fsync now (always without a boot id: a reboot
        could not be told apart, so nothing may be left for recovery to re-apply)."""
        state = self.replica.state
        return not boot_id() or time.monotonic() - (self._dirty_since or time.monotonic()) > FLUSH_SECONDS or (
            state.applied - state.flushed >= FLUSH_RECORDS
        )

    @property
    def unflushed(self) -> bool:
        """Whether this handle wrote rows that are not fsynced yet."""
        return bool(self._dirty)

    def defer_flush(self) -> None:
        """Leave this handle's unflushed rows to the page cache: close() will not fsync them.

        Safe because the log is the write-ahead log (``flushed`` stays
        behind, so recovery after a machine crash re-applies them); a
        follower uses it to fsync on its own clock, not every round.
        """
        self._dirty.clear()
        self._dirty_since = None

    def flush_if_free(self) -> bool:
        """Flush now if no other writer holds the lock; True if it did (a handle between its changes)."""
        return self._if_free(self.flush)

    def finish_checkpoint_if_free(self, checkpoint: "Checkpoint") -> None:
        """:meth:`finish_checkpoint` if no other writer holds the lock; else only wait for its fsync
        (``flushed`` then stays where it is)."""
        if not self._if_free(lambda: self.finish_checkpoint(checkpoint)):
            checkpoint.thread.join()

    def _if_free(self, work: Callable[[], None]) -> bool:
        """Run ``work`` holding the lock: this handle's, or taken for it if it is free; True if it ran."""
        if self.lock.held:
            work()
            return True
        if not self.lock.try_acquire():
            return False
        try:
            work()
        finally:
            self.lock.release()
        return True

    # -- recovery -------------------------------------------------------------------------

    def recover(self) -> None:
        """Finish whatever a writer that died left undone (lock held; idempotent).

        The records after ``applied`` are re-applied (after a machine crash,
        after ``flushed``: the page cache is gone too); then each intent
        found in meta is finished, in registry order; then the replica is
        marked settled and flushed.
        """
        replica = self.replica
        self.maps.forget_if_replaced()  # files replaced by a replay --in-place elsewhere: map the new ones
        replica.refresh_format()  # this handle may predate an upgrade: write digests if the replica has them
        if not replica.writable_format:
            return  # a newer deltalog's replica: only its writers may repair it
        state = replica.state
        if state.settled:
            return
        start = state.applied if state.boot == boot_id() and boot_id() else min(state.applied, state.flushed)
        with self.store.read() as txn:
            for offset, blob in self.store.iter_records(txn, after=start, upto=state.head):
                record = rec.decode(blob, f"{self.path}: record {offset}", with_old=False)
                self.write_rows([RowWrite(replica.info(t.name), t.rows, t.new) for t in record.tensors])
        for key, finish in self._intents:
            with self.store.read() as txn:
                value = self.store.get_meta(txn, key)
            if value is not None:
                finish(self, value)
        self.store.write(lambda txn: self._settle_state(txn, {}, durable=False))
        self.flush()

    def repair_if_abandoned(self) -> None:
        """If a writer died mid-way and nobody holds the lock, finish its work (on open, by readers)."""
        if not self.replica.state.settled and self.replica.writable_format and self.lock.try_acquire():
            try:
                self.recover()
            finally:
                self.lock.release()

    # -- upgrades ---------------------------------------------------------------------------

    def upgrade(self) -> None:
        """Format 1, 2 or 3 -> 4 (lock held, tensors settled), each step durable before the next:

        1. from format 1: every row digest file, fsynced;
        2. from format 1 or 2: the DELTALOG marker says ``format 3``: from here
           v1 and v2 deltalog refuse to open the replica;
        3. one transaction: meta/format = {4, 3} and the state digest of the
           head, computed once from the row digests.

        Idempotent: a crash before step 3 leaves the old format, which its
        next writer upgrades again (FORMAT.md section 1). A format 4 state
        without a digest (never written by deltalog) gets it the same way.
        """
        replica = self.replica
        if not replica.writable_format:
            return
        if replica.format_version >= layout.FORMAT_VERSION and replica.state.digest is not None:
            return
        if not replica.has_row_digests:
            for info in replica.tensors:
                tensorfiles.write_digest_file(self.maps.digest_path(info), self.rows(info))
            tensorfiles.recache_model_files([self.maps.digest_path(i) for i in replica.tensors],
                                            tensorfiles.model_file_bytes(replica.tensors))
            tensorfiles.fsync_dir(self.maps.dir)
        if replica.format_version < layout.RECORD_V2_VERSION:
            layout.write_marker(self.path)
        fmt = {"write_version": layout.FORMAT_VERSION, "read_version": layout.READ_VERSION}
        digest = replica.digest_of_files()  # from the digest files, which exist by now

        def upgrade(txn):
            self.store.put_meta(txn, "format", fmt)
            self._put_state(txn, digest=digest)

        self.store.write(upgrade)
        replica.set_format(fmt)


class Checkpoint:
    """An fsync of every tensor file, started on a thread of its own (:meth:`Writer.start_checkpoint`):
    every row of the model at ``offset`` (state digest ``digest``) was in the page cache before it began."""

    def __init__(self, offset: int, digest: int, fsync: Callable[[Sequence[str]], None], paths: Sequence[str]):
        self.offset, self.digest = offset, digest
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(fsync, paths), name="deltalog-checkpoint", daemon=True)
        self.thread.start()

    def _run(self, fsync: Callable[[Sequence[str]], None], paths: Sequence[str]) -> None:
        try:
            fsync(paths)
        except BaseException as exc:  # noqa: BLE001 - raised by finish_checkpoint, on the writer's thread
            self.error = exc

    @property
    def done(self) -> bool:
        return not self.thread.is_alive()


def _outcome(future):
    """Wait for ``future`` (None: nothing to wait for); its result, or None if it failed (a touch's
    failure only costs speed: the row stores fault as they would have)."""
    if future is None or future.exception() is not None:
        return None
    return future.result()


def _user() -> str:
    """Who writes a record: the login name, or the uid where there is none (a container)."""
    import getpass  # here: with termios, ~1.5 ms of every command that writes no record

    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry for the uid, and no $USER
        return str(os.getuid())


def _host() -> str:
    return os.uname().nodename  # what socket.gethostname() returns, without loading socket (~2 ms)


def keep_past_digests(store: LogStore, txn, path: str, upto: int, snapshots: Sequence[int],
                      base: tuple[int, int | None], known: dict[int, int] | None = None) -> int:
    """Keep (meta/past_digests) the state digests of the records up to ``upto`` and of the
    ``snapshots`` that the caller drops in this transaction, plus ``known`` ones; returns how many
    records there are. Call it before the transaction moves the log's base to ``base`` (the new
    oldest offset and its snapshot's state digest), which the kept digests are then tied to.

    So a follower whose head they were can still be proven to hold this
    history (sync). A header or manifest that cannot be read gives no digest
    (compaction from the tensor files drops a damaged log, and a damaged
    manifest, all the same).
    """
    past: dict[int, int] = dict(known or {})
    records = 0
    for offset, blob in store.iter_records(txn, upto=upto):
        records += 1
        try:
            digest = rec.summarize(blob, f"{path}: record {offset}").post_digest
        except DeltalogError:
            continue
        if digest is not None:
            past.setdefault(offset, digest)
    for offset in snapshots:
        try:
            digest = lineage.from_hex(store.get_snapshot(txn, offset).get("state_digest"))
        except DeltalogError:
            continue
        if digest is not None:
            past.setdefault(offset, digest)
    known_offsets = sorted(past)
    store.add_past_digests(txn, known_offsets, [past[o] for o in known_offsets], *base)
    return records


def create_replica(staging: str, path: str, *, model: dict, offset: int, manifest: dict,
                   bucket_entries: Sequence[tuple[int, int, int]] = (), digest: int) -> None:
    """Turn ``staging`` (its tensor files, digest files and snapshot at ``offset`` written and
    fsynced) into a replica, then rename it to ``path``: a replica exists completely or not at all.

    ``model`` is meta/model; ``bucket_entries`` (tensor id, bucket, version)
    start the bucket index; ``digest`` is the state digest at ``offset``.
    """
    store = LogStore.create(os.path.join(staging, layout.LOG_DIR))
    try:

        def setup(txn):
            store.put_meta(txn, "format", {"write_version": layout.FORMAT_VERSION, "read_version": layout.READ_VERSION})
            store.put_meta(txn, "model", model)
            store.put_meta(txn, "state", {"head": offset, "applied": offset, "applying": None, "flushed": offset,
                                          "boot": boot_id(), "gen": 0, "digest": digest})
            store.put_meta(txn, "oldest", offset)
            store.put_snapshot(txn, manifest)
            for tensor_id, bucket, version in bucket_entries:
                store.put_bucket(txn, tensor_id, bucket, version, 0.0)

        store.write(setup)
    finally:
        store.close()
    with open(os.path.join(staging, layout.MARKER), "w") as f:
        f.write(layout.marker_text())
        f.flush()
        os.fsync(f.fileno())
    tensorfiles.fsync_dir(staging)
    if os.path.isdir(path):
        os.rmdir(path)  # an empty directory the user made for it (checked by the caller)
    os.rename(staging, path)
    tensorfiles.fsync_dir(os.path.dirname(os.path.abspath(path)))
