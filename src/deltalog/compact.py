"""compact: fold the records older than a retention horizon into a snapshot.

Like Kafka's log compaction: the model at the horizon H becomes a new
snapshot, and the records at or before H (and every snapshot older than H)
are dropped. Offsets from H to the head stay retained (rollback, diff and
replay reach them as before); older ones raise OffsetNotRetained naming H.

H must be a retained offset (the current oldest or a record's offset), so
the first record kept applies on H and the log's base chain stays whole.
The snapshot at H is replayed from the previous snapshot plus the records
(deltalog.replay), never copied from the live tensor files, which might be
damaged: compaction must not bake damage into the only base left.

Crash safety, step by step (a kill -9 anywhere leaves a sound replica):

1. Without the writer lock (commits go on), build the snapshot in a staging
   directory ``snapshots/.compact-PID-XXXX/`` with tensorfiles.write_snapshot
   (temporary name, fsync, rename). A crash leaves a staging directory.
2. Under the writer lock: rename it to ``snapshots/OFFSET``, then in ONE
   LMDB write transaction register it, set meta ``oldest`` = H, delete the
   records <= H and the older snapshots' entries. Before the commit the
   replica is unchanged; after it, compacted.
3. Still under the lock, delete every snapshot directory that is not
   registered (the old snapshots, and garbage of earlier crashes) and the
   staging directories of dead processes. A reader streaming an old
   snapshot file keeps its open file (POSIX unlink semantics).

A compaction with nothing to fold still does step 3, so re-running one
after a crash completes it.

Bytes reclaimed are reported in two parts, because they are not alike:
``log_bytes_freed`` are record bytes freed inside LMDB's data file, whose
pages LMDB reuses for new records but which does not shrink;
``snapshot_bytes_removed`` are files deleted, returned to the file system.
"""

from __future__ import annotations

import os
import re
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from . import lineage, tensorfiles
from .errors import (DeltalogError, IntegrityError, InvalidInput, LockHeld, OffsetNotRetained, StorageError,
                     UnsupportedVersion, os_hint)
from .history import head_time
from .receive import unconfirmed
from .replay import tensors_at
from .lock import pid_alive
from .replica import Replica

Progress = Callable[[str, int, int], None]  # (stage, done, total)

STAGING_PREFIX = ".compact-"
_SNAPSHOT_NAME = re.compile(r"^\d{20}$")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?)\s*([smhdw]?)\s*$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str) -> float:
    """Seconds in '90', '90s', '15m', '12h', '7d' or '2w'; InvalidInput otherwise."""
    match = _DURATION.match(text or "")
    if not match:
        raise InvalidInput(f"bad duration {text!r}", hint="use a number with an optional unit s, m, h, d or w, e.g. 7d")
    return float(match.group(1)) * _UNITS[match.group(2)]


@dataclass
class CompactResult:
    oldest_offset: int
    previous_oldest: int
    head: int
    records_removed: int = 0
    log_bytes_freed: int = 0  # inside data.mdb: reused by LMDB, the file does not shrink
    snapshot_bytes_removed: int = 0  # files deleted from disk
    snapshot_bytes_written: int = 0  # the new snapshot
    snapshots_removed: list[int] = field(default_factory=list)
    garbage_removed: list[str] = field(default_factory=list)  # leftovers of crashed runs
    seconds: float = 0.0
    built_from: str = "log"  # what the new snapshot was made from: "log" (a replay) or "tensors"
    dry_run: bool = False  # nothing changed: the fields say what would

    @property
    def changed(self) -> bool:
        return self.oldest_offset != self.previous_oldest

    @property
    def bytes_reclaimed(self) -> int:
        return self.log_bytes_freed + self.snapshot_bytes_removed

    def to_json(self) -> dict:
        return {
            "oldest_offset": self.oldest_offset,
            "previous_oldest": self.previous_oldest,
            "head": self.head,
            "changed": self.changed,
            "records_removed": self.records_removed,
            "bytes_reclaimed": self.bytes_reclaimed,
            "log_bytes_freed": self.log_bytes_freed,
            "snapshot_bytes_removed": self.snapshot_bytes_removed,
            "snapshot_bytes_written": self.snapshot_bytes_written,
            "snapshots_removed": self.snapshots_removed,
            "garbage_removed": self.garbage_removed,
            "built_from": self.built_from,
            "dry_run": self.dry_run,
            "seconds": round(self.seconds, 3),
        }


def choose_horizon(
    replica: Replica,
    keep_after: int | None = None,
    keep_records: int | None = None,
    keep_age: float | None = None,
    now: float | None = None,
) -> int:
    """The retained offset that becomes the oldest; at most one policy may be given.

    - ``keep_after=X``: keep the offsets after X; H is the newest retained
      offset <= X (a follower may never have held X itself).
    - ``keep_records=N``: keep the newest N records.
    - ``keep_age=S``: keep every record written in the last S seconds (and
      all after the first of them).
    - none: fold everything up to the head (the log becomes empty).

    A horizon at or before the current oldest means nothing to fold.
    """
    if sum(x is not None for x in (keep_after, keep_records, keep_age)) > 1:
        raise InvalidInput("give at most one of --keep-after, --keep-records, --keep-age")
    state = replica.state
    oldest, head = replica.oldest_offset, state.head
    if keep_after is not None:
        if keep_after < 0:
            raise InvalidInput(f"--keep-after must be an offset >= 0, got {keep_after}")
        if keep_after > head:
            raise OffsetNotRetained(
                f"{replica.path}: offset {keep_after} is after the head {head}",
                hint=f"the oldest offset still available is {oldest}, the head is {head}",
            )
        horizon = replica.record_offset_at_or_before(keep_after)  # a follower may never have held keep_after
        return max(oldest if horizon is None else horizon, oldest)
    if keep_records is not None:
        if keep_records < 0:
            raise InvalidInput(f"--keep-records must be >= 0, got {keep_records}")
        horizon = replica.record_offset_from_end(keep_records)
        return oldest if horizon is None else horizon  # fewer records than asked to keep: nothing to fold
    if keep_age is not None:
        if keep_age < 0:
            raise InvalidInput(f"--keep-age must not be negative, got {keep_age}")
        cutoff = (time.time() if now is None else now) - keep_age
        horizon = oldest
        for summary in replica.iter_summaries():
            if summary.time > cutoff:
                break
            horizon = summary.offset
        return horizon
    return head


def compact(
    replica: Replica,
    keep_after: int | None = None,
    keep_records: int | None = None,
    keep_age: float | None = None,
    wait: float = 0.0,
    progress: Progress | None = None,
) -> CompactResult:
    """Fold the records at or before the chosen horizon into a snapshot and drop them."""
    started = time.monotonic()
    progress = progress or (lambda stage, done, total: None)
    previous_oldest = replica.oldest_offset
    horizon = _before_unconfirmed(replica, choose_horizon(replica, keep_after, keep_records, keep_age))
    root = os.path.join(replica.path, tensorfiles.SNAPSHOT_DIR)
    staging = None
    manifest = None
    try:
        if horizon > previous_oldest:
            manifest = replica.snapshot_manifest(horizon)
            if manifest is not None:  # e.g. made by make_snapshot: reuse it if intact
                problems = tensorfiles.verify_snapshot(replica.path, manifest)
                if problems:
                    raise IntegrityError(f"{replica.path}: cannot compact onto a damaged snapshot: {problems[0]}")
            else:
                staging = os.path.join(root, f"{STAGING_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}")
                try:
                    os.makedirs(staging)
                    # write_snapshot consumes the generator one tensor at a time: memory stays bounded by one tensor
                    manifest = tensorfiles.write_snapshot(
                        staging, horizon, replica.model_id, tensors_at(replica, horizon, progress),
                        made_at=head_time(replica, horizon),  # its record goes: the manifest keeps its time
                    )
                except OSError as exc:
                    raise StorageError(f"{root}: cannot write the snapshot: {exc.strerror}", hint=os_hint(exc)) from None
                expected, written = replica.state_digest_at(horizon), lineage.from_hex(manifest["state_digest"])
                if expected is not None and written != expected:  # the replay and the log disagree: keep both
                    raise IntegrityError(
                        f"{replica.path}: the model replayed at offset {horizon} has state digest "
                        f"{lineage.to_hex(written)}, the log says {lineage.to_hex(expected)}; nothing was compacted"
                    )
        progress("committing", 0, 1)
        with replica.writing(wait):
            result = CompactResult(oldest_offset=replica.oldest_offset, previous_oldest=previous_oldest, head=replica.head)
            if _before_unconfirmed(replica, horizon) != horizon:  # a guarded sync finished while we replayed
                raise LockHeld(f"{replica.path}: a sync awaiting its --check arrived while compacting; nothing was "
                               f"compacted", hint="run compact again")
            if manifest is not None and horizon > result.oldest_offset:
                _fold(replica, horizon, manifest, staging, result)
            _remove_garbage(replica, result)
        progress("committing", 1, 1)
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    result.seconds = time.monotonic() - started
    return result


def plan(replica: Replica, keep_after: int | None = None, keep_records: int | None = None,
         keep_age: float | None = None, from_tensors: bool = False) -> CompactResult:
    """What :func:`compact` (or :func:`compact_from_tensors`) would do now, without the lock or a write."""
    previous_oldest, head = replica.oldest_offset, replica.head
    horizon = head if from_tensors else _before_unconfirmed(replica, choose_horizon(replica, keep_after, keep_records,
                                                                                    keep_age))
    result = CompactResult(oldest_offset=previous_oldest, previous_oldest=previous_oldest, head=head,
                           built_from="tensors" if from_tensors else "log", dry_run=True)
    if horizon <= previous_oldest and not from_tensors:
        return result
    result.oldest_offset = horizon
    for summary in replica.iter_summaries(upto=horizon):
        result.records_removed += 1
        result.log_bytes_freed += summary.nbytes
    for offset in replica.snapshot_offsets():
        if offset < horizon:
            result.snapshots_removed.append(offset)
            result.snapshot_bytes_removed += _tree_bytes(tensorfiles.snapshot_path(replica.path, offset))
    if from_tensors or replica.snapshot_manifest(horizon) is None:
        result.snapshot_bytes_written = sum(t.nbytes for t in replica.tensors)
    return result


def compact_from_tensors(replica: Replica, wait: float = 0.0) -> CompactResult:
    """Make the live tensor files the new base: a snapshot at the head written from them, nothing before it.

    The repair for a damaged log, snapshot or bucket index when the tensor
    files are intact (compact otherwise replays, which needs the log). They
    must be proven to hold the model at the head: the snapshot's state digest,
    computed from their bytes as they are copied, must be the head's (so a
    replica with no state digest yet cannot be proven, and is refused).
    Under the writer lock throughout: the files must not move while they are
    copied. Drops every record, every other snapshot and the bucket index.
    """
    started = time.monotonic()
    previous_oldest = replica.oldest_offset
    if replica.state_digest is None:  # before writing(): its upgrade would compute one from these very files
        raise UnsupportedVersion(
            f"{replica.path}: has no state digest yet, so its tensor files cannot be proven to hold its head",
            hint=tensorfiles.RESEED_HINT.format(path=replica.path),
        )
    root = os.path.join(replica.path, tensorfiles.SNAPSHOT_DIR)
    staging = os.path.join(root, f"{STAGING_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        with replica.writing(wait):
            pending = replica.pending_sync()
            if pending is not None:
                raise InvalidInput(f"{replica.path}: a partial sync to offset {pending['target']} is pending",
                                   hint="finish it with 'deltalog sync' from its source first")
            marker = unconfirmed(replica)
            if marker is not None:  # folding it would leave nothing to undo it with
                raise InvalidInput(f"{replica.path}: the sync to offset {marker['target']} awaits its --check",
                                   hint="run that 'deltalog sync ... --check' again to accept or undo it first")
            state = replica.state
            try:
                os.makedirs(staging)
                manifest = tensorfiles.write_snapshot(
                    staging, state.head, replica.model_id, [(t, replica.rows_view(t.name)) for t in replica.tensors],
                    made_at=_time_if_known(replica, state.head),
                )
            except OSError as exc:
                raise StorageError(f"{root}: cannot write the snapshot: {exc.strerror}", hint=os_hint(exc)) from None
            written = lineage.from_hex(manifest["state_digest"])
            if written != state.digest:
                raise IntegrityError(
                    f"{replica.path}: the tensor files give state digest {lineage.to_hex(written)}, the head "
                    f"{state.head} has {lineage.to_hex(state.digest)}: they do not hold its model",
                    hint=tensorfiles.RESEED_HINT.format(path=replica.path),
                )
            result = CompactResult(oldest_offset=previous_oldest, previous_oldest=previous_oldest, head=state.head,
                                   built_from="tensors")
            # registered or not, a snapshot at the head is replaced by ours in the fold below
            result.snapshot_bytes_written = _install(replica, staging, manifest)
            replica.flush()
            result.records_removed, result.log_bytes_freed, result.snapshots_removed = replica.writer.fold(
                state.head, manifest, clear_buckets=True)
            result.oldest_offset = state.head
            _remove_garbage(replica, result)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    result.seconds = time.monotonic() - started
    return result


def _before_unconfirmed(replica: Replica, horizon: int) -> int:
    """``horizon``, or an older one that leaves a sync its --check has not accepted yet in the log:
    undoing it (receive.revert_sync) needs its record and the head before it."""
    marker = unconfirmed(replica)
    return horizon if marker is None else max(replica.oldest_offset, min(horizon, int(marker["base"])))


def _time_if_known(replica: Replica, head: int) -> float | None:
    """When the head's model was made, or None when what says it is damaged: this is the repair."""
    try:
        return head_time(replica, head)
    except DeltalogError:
        return None


def _fold(replica: Replica, horizon: int, manifest: dict, staging: str | None, result: CompactResult) -> None:
    """Steps 2 of the module docstring: install the snapshot, one LMDB transaction. Lock held."""
    # records only disappear under the lock: another compaction (then horizon <= oldest and
    # we are not called) or a sync that rebased the replica on a snapshot
    if not replica.has_record(horizon):
        raise OffsetNotRetained(
            f"{replica.path}: offset {horizon} left the log while compacting (a sync rebased the replica?)",
            hint="run 'deltalog compact' again",
        )
    registered = replica.snapshot_manifest(horizon)
    if registered is not None:
        manifest = registered  # reused, or registered meanwhile by make_snapshot: ours is discarded
    elif staging is None:  # the snapshot we meant to reuse was unregistered: only a compaction does that
        raise IntegrityError(f"{replica.path}: snapshot {horizon} vanished during compaction", hint="retry")
    else:
        result.snapshot_bytes_written = _install(replica, staging, manifest)  # one there is unregistered garbage

    replica.flush()  # recovery after a machine crash replays records after 'flushed': keep them until synced
    result.records_removed, result.log_bytes_freed, result.snapshots_removed = replica.writer.fold(horizon, manifest)
    result.oldest_offset = horizon


def _install(replica: Replica, staging: str, manifest: dict) -> int:
    """Rename the snapshot built in ``staging`` to its place, replacing what is there; returns its bytes."""
    root = os.path.join(replica.path, tensorfiles.SNAPSHOT_DIR)
    final = tensorfiles.snapshot_path(replica.path, manifest["offset"])
    try:
        if os.path.lexists(final):
            shutil.rmtree(final)
        os.rename(tensorfiles.snapshot_path(staging, manifest["offset"]), final)
        tensorfiles.fsync_dir(root)
    except OSError as exc:
        raise StorageError(f"{final}: cannot install the snapshot: {exc.strerror}") from None
    return sum(t["nbytes"] for t in manifest["tensors"])


def _remove_garbage(replica: Replica, result: CompactResult) -> None:
    """Step 3: delete unregistered snapshot directories and dead staging directories. Lock held.

    Every snapshot directory is registered under the writer lock right after
    its rename, so while we hold the lock an unregistered one is garbage.
    """
    root = os.path.join(replica.path, tensorfiles.SNAPSHOT_DIR)
    registered = {tensorfiles.snapshot_dirname(o) for o in replica.snapshot_offsets()}
    dropped = {tensorfiles.snapshot_dirname(o) for o in result.snapshots_removed}
    try:
        entries = sorted(os.listdir(root))
    except FileNotFoundError:
        return
    for name in entries:
        path = os.path.join(root, name)
        if name in registered or not os.path.isdir(path) or os.path.islink(path):
            continue
        if _SNAPSHOT_NAME.match(name) or (name.endswith(".tmp") and _SNAPSHOT_NAME.match(name[:-4])):
            pass
        elif name.startswith(STAGING_PREFIX):
            if _alive(name[len(STAGING_PREFIX) :].split("-", 1)[0]):
                continue  # ours (removed by the caller) or a concurrent compaction's
        else:
            continue  # not ours to judge
        size = _tree_bytes(path)
        shutil.rmtree(path, ignore_errors=True)
        if os.path.exists(path):
            continue
        result.snapshot_bytes_removed += size
        if name not in dropped:
            result.garbage_removed.append(name)
    try:
        tensorfiles.fsync_dir(root)
    except OSError:
        pass


def _alive(pid_text: str) -> bool:
    try:
        pid = int(pid_text)
    except ValueError:
        return False
    return pid == os.getpid() or pid_alive(pid)


def _tree_bytes(path: str) -> int:
    total = 0
    for directory, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(directory, name)).st_size
            except OSError:
                pass
    return total


__all__ = ["CompactResult", "choose_horizon", "compact", "compact_from_tensors", "parse_duration", "plan"]
