"""The local transport: a replica directory on this machine, as a Source or a Sink.

LocalSink is also what ``deltalog serve --stdio`` runs on the far side of
an ssh pipe when pushing, so every write of a sync goes through here (to
deltalog.receive, which applies it), whatever the transport.

A destination that does not exist yet is staged beside its final name, in
``.<name>.deltalog-sync/`` (locked with the same flock as a replica's
writer lock), and renamed into place only when complete; an interrupted
snapshot transfer resumes from the bytes already there. One that received
no byte (a deadline that expired first) removes the directory again: a first
sync that did not finish leaves either bytes to resume from or nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from contextlib import ExitStack

from .. import lineage, receive, tensorfiles
from .. import sync as sync_mod
from ..dtypes import STORAGE
from ..errors import IntegrityError, InvalidInput, NotAReplica, StorageError, TransportError, os_hint
from ..layout import LOG_DIR, is_replica, sync_staging_path
from ..lock import LOCK_FILE, WriterLock
from ..replica import Replica
from ..writer import FLUSH_SECONDS, boot_id

TRANSFER = "transfer.json"  # the manifest being fetched, beside the partial files
FOLLOW_FLUSH_SECONDS = 30.0  # a destination's tensor files are fsynced at least this often (see LocalSink)
_flushed_at: dict[str, float] = {}  # destination path -> when this process last fsynced its tensor files


def open_source(spec, options) -> "LocalSource":
    return LocalSource(spec.path)


def open_sink(spec, options) -> "LocalSink":
    return LocalSink(spec.path)


class LocalSource:
    """A replica directory we read from (no lock: readers never block the writer).

    Every :meth:`hello` after the first looks at the replica afresh: a
    long-lived source, as ``sync --follow`` and ``serve --stdio`` keep, must
    not serve rows through tensor-file maps another process has since
    renamed over (replay --in-place), nor through the log of a directory
    that was replaced. A chunk stream is never open across a hello.
    """

    local = True  # no network between it and a local sink: chunks go as plain values (sync._values_relative)

    def __init__(self, path: str):
        self.path = path
        self.replica = Replica.open(path)
        self._log_id = self._log_identity()
        self._files_id = _tensor_files_identity(self.replica)
        self._fresh = True  # the handle opened just now is the view for the first hello

    def _log_identity(self):
        return _log_identity(self.path)

    def hello(self) -> dict:
        if not self._fresh:
            self._refresh()
        self._fresh = False
        return sync_mod.source_hello(self.replica)

    def _refresh(self) -> None:
        if not is_replica(self.path):
            raise TransportError(f"{self.path}: the source replica went away",
                                 hint="it was there when this sync started")
        if self._log_identity() == self._log_id:
            # The same log: only the file maps can be stale, and only if a file was
            # replaced (replay --in-place renames over them). Keeping the maps of
            # unchanged files keeps their page tables: remapping at every round of
            # a follower made each row read a page fault again.
            files = _tensor_files_identity(self.replica)
            if files != self._files_id:
                self.replica.reload_tensor_files()
                self._files_id = files
            return
        # Another replica now lives at this path: drop ours (and with it the shared
        # environment of the old log) before opening the new one.
        self.replica.close()
        self.replica = None
        try:
            self.replica = Replica.open(self.path)
        except NotAReplica as exc:
            raise TransportError(f"{self.path}: the source replica went away ({exc})") from None
        self._log_id = self._log_identity()
        self._files_id = _tensor_files_identity(self.replica)

    def wait_for_head(self, since: int, timeout: float) -> int:
        return sync_mod.source_wait(self.replica, since, timeout)

    @property
    def reusable(self) -> bool:
        return self.replica is not None

    def plan(self, since: int, advanced, target: int) -> dict:
        return sync_mod.source_plan(self.replica, since, advanced, target)

    def chunks(self, since: int, advanced, target: int, max_chunk_bytes: int, base_values: bool = False):
        return sync_mod.source_chunks(self.replica, since, advanced, target, max_chunk_bytes, base_values)

    def snapshot_manifest(self, offset: int) -> dict:
        return sync_mod.source_snapshot_manifest(self.replica, offset)

    def state_digest_at(self, offset: int) -> str | None:
        return sync_mod.source_state_digest_at(self.replica, offset)

    def read_snapshot_file(self, offset: int, file: str, start: int, length: int) -> bytes:
        return sync_mod.source_read_snapshot_file(self.replica, offset, file, start, length)

    def close(self) -> None:
        if self.replica is not None:
            self.replica.close()
            self.replica = None


def _log_identity(path: str):
    """(device, inode) of a replica's log file: another replica at the same path has another one."""
    try:
        st = os.stat(os.path.join(path, LOG_DIR, "data.mdb"))
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _tensor_files_identity(replica: Replica) -> tuple:
    """(device, inode) of each tensor file and row digest file (None: missing).

    A file renamed over another (replay --in-place rebuilds a tensor file or
    its digest file that way) changes it; a map of the old file would keep
    reading and writing the old inode.
    """
    out = []
    for info in replica.tensors:
        for name in (info.file, getattr(info, "digest_file", None)):
            if name is None:
                continue
            try:
                st = os.stat(os.path.join(replica.path, tensorfiles.TENSOR_DIR, name))
            except OSError:
                out.append(None)
            else:
                out.append((st.st_dev, st.st_ino))
    return tuple(out)


_PEER_HINT = "the destination was left as it was; run 'deltalog verify' on the source"


def check_manifest_matches_model(hello: dict, manifest: dict) -> None:
    """IntegrityError unless a snapshot manifest lists exactly the hello's tensors, each with
    its dtype, its shape and the size they make (rows * row_elems * itemsize).

    The received files are checked against the manifest's nbytes and xxh3
    only, so a manifest that disagrees with the model (a buggy or hostile
    peer) would make a replica whose tensor files have the wrong size.
    """
    try:
        model = {t["name"]: (t["dtype"], [int(d) for d in t["shape"]]) for t in hello["tensors"]}
        listed = {t["name"]: t for t in manifest["tensors"]}
        same_id = manifest["model_id"] == hello["model_id"]
    except (KeyError, TypeError, ValueError):
        raise IntegrityError("the source's hello or snapshot manifest is malformed", hint=_PEER_HINT) from None
    if not same_id:
        raise IntegrityError("the source's snapshot manifest belongs to another model than its hello", hint=_PEER_HINT)
    if sorted(model) != sorted(listed) or len(listed) != len(manifest["tensors"]) or len(model) != len(hello["tensors"]):
        raise IntegrityError("the source's snapshot manifest does not list its tensors", hint=_PEER_HINT)
    for name, (dtype, shape) in model.items():
        if not isinstance(dtype, str) or dtype not in STORAGE or any(d < 0 for d in shape):
            raise IntegrityError(f"the source's model has an unusable tensor {name!r}: {dtype!r}{shape}", hint=_PEER_HINT)
        entry = listed[name]
        nbytes = tensorfiles.TensorInfo(0, name, dtype, tuple(shape)).nbytes
        if (entry.get("dtype"), entry.get("shape"), entry.get("nbytes")) != (dtype, shape, nbytes) or not (
            isinstance(entry.get("file"), str) and isinstance(entry.get("xxh3"), str)
        ):
            raise IntegrityError(
                f"the source's snapshot manifest disagrees with its model on tensor {name!r}: "
                f"{entry.get('dtype')!r}{entry.get('shape')} in {entry.get('nbytes')!r} bytes, "
                f"the model says {dtype}{shape} in {nbytes}",
                hint=_PEER_HINT,
            )


class LocalSink:
    """A replica directory we write into (created by a snapshot transfer when missing)."""

    local = True

    def __init__(self, path: str):
        self.path = os.path.abspath(path)
        self.replica: Replica | None = None
        self._stack = ExitStack()
        self._staging: str | None = None  # new replica being built beside self.path
        self._staging_lock: WriterLock | None = None
        self._hello: dict | None = None
        self._manifest: dict | None = None  # the source's snapshot manifest
        self._wanted: dict | None = None  # what a snapshot transfer fetches (transfer.json)
        self._files: dict[str, str] = {}  # source file name -> local path
        self._handles: dict[str, object] = {}
        self._wait = 0.0
        self._applied = False  # this round wrote rows (else a no-op round: a moment to flush)
        self._idle_round = False
        self._identity: tuple | None = None  # the replica's files when opened (see _current_identity)

    # -- state -----------------------------------------------------------------

    def begin(self, wait: float, dry_run: bool = False) -> dict:
        self._wait = wait
        if self.replica is not None:  # another round of sync --follow (after end_round)
            if not dry_run and self._identity == self._current_identity():
                self._stack.enter_context(self.replica.writing(wait))
                if self._identity == self._current_identity():  # nothing replaced it while we waited
                    self.replica.writer.finish_checkpoint_if_done()
                    return receive.sink_state(self.replica)
                self._release()
            self._drop_replica()
        while True:
            if is_replica(self.path):
                self._open_replica()
                if not dry_run:
                    self._stack.enter_context(self.replica.writing(wait))
                    self._flush_older_writes()
                return receive.sink_state(self.replica)
            if os.path.exists(self.path) and (not os.path.isdir(self.path) or os.listdir(self.path)):
                raise NotAReplica(f"{self.path}: exists and is not a deltalog replica",
                                  hint="sync into a replica of the same model, a new path or an empty directory")
            if dry_run:
                return self._new_state()
            parent = os.path.dirname(self.path)
            if not os.path.isdir(parent):
                raise NotAReplica(f"{self.path}: parent directory {parent} does not exist",
                                  hint=f"create it first (mkdir -p {parent}), or check the path")
            staging = sync_staging_path(self.path)
            try:
                os.makedirs(staging, exist_ok=True)
            except OSError as exc:
                raise StorageError(f"{staging}: cannot create ({exc.strerror})") from None
            lock = WriterLock(staging)
            lock.acquire(wait)
            if is_replica(self.path) or not lock.still_linked():  # another sync created it, or removed
                lock.release()                                    # its empty staging, while we waited
                continue
            self._staging, self._staging_lock = staging, lock
            return self._new_state()

    def _open_replica(self) -> None:
        log = _log_identity(self.path)  # before opening: a replacement after it shows at the next begin
        self.replica = Replica.open(self.path)
        self._identity = (log, _tensor_files_identity(self.replica))  # before the first map, likewise

    def _current_identity(self) -> tuple:
        """The log's and the tensor files' identities: what a kept-open replica must still be."""
        log = _log_identity(self.path)
        files = _tensor_files_identity(self.replica) if self.replica is not None else None
        return log, files

    @staticmethod
    def _new_state() -> dict:
        return {"exists": False, "model_id": None, "head": None, "oldest_offset": None, "bucket_rows": None,
                "tensors": [], "advanced": {}, "pending_target": None, "pending_buckets": 0}

    def _need_replica(self) -> Replica:
        if self.replica is None:
            raise InvalidInput(f"{self.path}: no replica yet (a snapshot transfer must come first)")
        return self.replica

    # -- log transfer -----------------------------------------------------------

    def apply_chunk(self, blob, target: int, source: str) -> dict:
        self._applied = True
        return receive.apply_chunk(self._need_replica(), blob, target, source)

    def apply_final(self, blob, target: int, follow: dict) -> dict:
        self._applied = True
        replica = self._need_replica()
        rows = receive.apply_whole(replica, blob, target, self._merged_follow(follow))
        return {**receive.sink_state(replica), "rows": rows}

    def finish(self, target: int, follow: dict, digest: str | None = None) -> dict:
        replica = self._need_replica()
        receive.finish_sync(replica, target, self._merged_follow(follow), lineage.from_hex(digest))
        return receive.sink_state(replica)

    def abort_pending(self) -> dict:
        replica = self._need_replica()
        receive.abort_pending(replica)
        return receive.sink_state(replica)

    def state_digest_at(self, offset: int) -> str | None:
        """The destination's state digest at ``offset`` (hex), or None when it cannot tell."""
        replica = self._need_replica()
        return lineage.to_hex(replica.state_digest_at(int(offset)))

    def note_follow(self, follow: dict) -> None:
        if self.replica is not None:
            receive.note_follow(self.replica, self._merged_follow(follow))
            self._idle_round = "in_sync_at" in follow and not self._applied

    def _merged_follow(self, follow: dict) -> dict:
        previous = receive.follow_state(self.replica) or {}
        merged = {**follow}
        if "in_sync_at" not in merged and previous.get("in_sync_at") is not None:
            merged["in_sync_at"] = previous["in_sync_at"]
        return merged

    # -- snapshot transfer ---------------------------------------------------------

    def _keeps_history(self) -> bool:
        """Whether the engine proved this replica held the source's model at its head (sync: not a reseed)."""
        return bool((self._hello or {}).get("history_proven"))

    def _snapshot_root(self) -> str:
        return self.replica.path if self.replica is not None else self._staging

    def snapshot_begin(self, hello: dict, manifest: dict) -> dict[str, int]:
        if self.replica is None and self._staging is None:
            raise InvalidInput("snapshot_begin before begin")
        check_manifest_matches_model(hello, manifest)  # before anything is created from them
        names = [t["name"] for t in hello["tensors"]]
        if self.replica is not None:
            sync_mod.check_same_model(hello, receive.sink_state(self.replica), self.path)
        self._hello, self._manifest = hello, manifest
        offset = int(manifest["offset"])
        partial = os.path.join(self._snapshot_root(), tensorfiles.SNAPSHOT_DIR,
                               tensorfiles.snapshot_dirname(offset) + ".partial")
        wanted = self._wanted = {
            "offset": offset, "model_id": manifest["model_id"],
            "tensors": [{k: t[k] for k in ("name", "file", "nbytes", "xxh3")} for t in manifest["tensors"]]}
        try:
            with open(os.path.join(partial, TRANSFER)) as f:
                have = json.load(f)
        except (OSError, ValueError):
            have = None
        if have != wanted:  # another snapshot (or none) was being fetched: start over
            shutil.rmtree(partial, ignore_errors=True)
            os.makedirs(partial)
            with open(os.path.join(partial, TRANSFER), "w") as f:
                json.dump(wanted, f)
                f.flush()
                os.fsync(f.fileno())
        ids = {name: i for i, name in enumerate(names)}
        held = {}
        self._files = {}
        for entry in manifest["tensors"]:
            local = os.path.join(partial, f"{ids[entry['name']]:05d}.bin")
            self._files[entry["file"]] = local
            if not os.path.exists(local):
                open(local, "wb").close()  # a zero-byte tensor gets no pieces, but its file must exist
            size = os.path.getsize(local)
            if size > int(entry["nbytes"]):
                os.truncate(local, 0)
                size = 0
            held[entry["file"]] = size
        self._partial = partial
        return held

    def snapshot_write(self, file: str, start: int, data) -> None:
        local = self._files.get(file)
        if local is None:
            raise InvalidInput(f"snapshot file {file!r} is not in the manifest being received")
        fh = self._handles.get(file)
        if fh is None:
            fh = self._handles[file] = open(local, "ab")
        if fh.tell() != start:
            raise IntegrityError(f"snapshot file {file}: piece at {start} but {fh.tell()} bytes held")
        try:
            fh.write(data)
        except OSError as exc:
            raise StorageError(f"{local}: cannot write ({exc.strerror})", hint=os_hint(exc)) from None

    def snapshot_commit(self) -> dict:
        manifest, hello = self._manifest, self._hello
        if manifest is None:
            raise InvalidInput("snapshot_commit before snapshot_begin")
        for fh in self._handles.values():
            fh.flush()
            os.fsync(fh.fileno())
            fh.close()
        self._handles = {}
        local_tensors = []
        for entry in manifest["tensors"]:
            local = self._files[entry["file"]]
            size = os.path.getsize(local) if os.path.exists(local) else 0
            if size != int(entry["nbytes"]) or tensorfiles.file_digest(local) != entry["xxh3"]:
                os.truncate(local, 0) if os.path.exists(local) else None
                raise IntegrityError(f"snapshot file {entry['file']} from the source fails its checksum "
                                     f"({size} of {entry['nbytes']} bytes)", hint=receive.REFETCH_HINT)
            local_tensors.append({**{k: entry[k] for k in ("name", "dtype", "shape", "nbytes", "xxh3")},
                                  "file": os.path.basename(local)})
        offset = int(manifest["offset"])
        local_manifest = {"offset": offset, "model_id": manifest["model_id"], "tensors": local_tensors,
                          "bucket_versions": manifest.get("bucket_versions") or {}}
        made_at = tensorfiles.manifest_time(manifest)
        if made_at is not None:  # when the writer made this state: head_time once it is our head
            local_manifest["time"] = made_at
        claimed = lineage.from_hex(manifest.get("state_digest"))
        if claimed is not None:  # the source's claim: checked against the files before they are adopted
            local_manifest["state_digest"] = lineage.to_hex(claimed)
        partial = self._partial
        os.remove(os.path.join(partial, TRANSFER))
        with open(os.path.join(partial, tensorfiles.MANIFEST), "w") as f:
            json.dump({k: local_manifest[k] for k in tensorfiles.MANIFEST_FILE_KEYS if k in local_manifest}, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        tensorfiles.fsync_dir(partial)
        if self.replica is not None and offset in self.replica.snapshot_offsets():
            # A snapshot of this replica's own sits at that offset (a reseed of another
            # history): it is swapped for the received one under the restore's intent.
            receive.restore_snapshot(self.replica, local_manifest, staged=partial, keep_history=self._keeps_history())
            return receive.sink_state(self.replica)
        final = partial[: -len(".partial")]
        if os.path.exists(final):  # unregistered: left by a crashed run
            shutil.rmtree(final)
        os.rename(partial, final)
        tensorfiles.fsync_dir(os.path.dirname(final))
        if self.replica is not None:
            receive.restore_snapshot(self.replica, local_manifest, keep_history=self._keeps_history())
            return receive.sink_state(self.replica)
        try:
            receive.init_from_snapshot(self._staging, self.path, hello, local_manifest)
        except StorageError:  # a full disk: keep what arrived as a transfer the next run resumes
            os.rename(final, partial)
            with open(os.path.join(partial, TRANSFER), "w") as f:
                json.dump(self._wanted, f)
            raise
        self._staging_lock.release()  # the lock file moved in with the rename; take it as the replica's
        self._staging_lock = self._staging = None
        self._open_replica()
        self._stack.enter_context(self.replica.writing(max(self._wait, 30.0)))
        return receive.sink_state(self.replica)

    def _flush_on_schedule(self) -> None:
        """Fsync the tensor files every FOLLOW_FLUSH_SECONDS, or in an idle round, not at every close.

        A sync applied as one record (apply_final) leaves rows in the page
        cache only; Replica.close would fsync them, which for a follower
        running a round every few ms is most of the round (an fsync of
        scattered rows costs 100+ ms), and for a one-shot ``deltalog sync``
        a quarter of its time (0.39 s of 1.6 s for a minute of changes to a
        1 GiB model). The log is the write-ahead log: ``flushed`` lags the
        head, so after a machine crash recovery re-applies those records, as
        it does for commits (contract 1 holds either way). The kernel writes
        dirty pages back within ~30 s by itself, so a flush at that age is
        cheap: a follower's comes FOLLOW_FLUSH_SECONDS after its first round,
        a one-shot sync's with the next sync (:meth:`_flush_older_writes`).
        A round that applied nothing (the source was idle) flushes at once.
        """
        replica = self.replica
        if not replica.writer.unflushed:
            state = replica.state
            # an idle moment: make the follower's files durable now
            if self._idle_round and state.flushed < state.applied and replica.writer.flush_if_free():
                _flushed_at[self.path] = time.monotonic()
            return
        state = replica.state
        now = time.monotonic()
        last = _flushed_at.setdefault(self.path, now)  # the first sync of this process starts its clock
        if now - last < FOLLOW_FLUSH_SECONDS and boot_id() and state.applying is None:
            replica.writer.defer_flush()  # Replica.close would fsync; the schedule says not yet
        else:
            _flushed_at[self.path] = now

    def _flush_older_writes(self) -> None:
        """Fsync the tensor files before the first sync of this process writes, when an earlier one
        left rows to the page cache FLUSH_SECONDS ago or more (a one-shot sync, commit or rollback
        defers its fsync): the kernel has written them back by then, so this fsync is cheap, where
        the same one after this sync's writes would wait for them too. Recovery after a machine
        crash then re-applies no more than a sync's worth of records, however often cron runs it."""
        if self.path in _flushed_at:  # a follower's later round: its own schedule
            return
        state = self.replica.state
        if not state.settled or state.flushed >= state.applied:
            return
        oldest = next(self.replica.iter_summaries(state.flushed, state.applied), None)
        if oldest is not None and time.time() - oldest.time >= FLUSH_SECONDS:
            self.replica.writer.flush()

    # -- rounds (sync --follow) ----------------------------------------------------

    @property
    def reusable(self) -> bool:
        """True when :meth:`end_round` can keep this sink for another :meth:`begin` (a replica is open)."""
        return self.replica is not None and self._staging_lock is None and not self._handles

    def end_round(self) -> None:
        """Release the writer lock but keep the replica open for the next round.

        Reopening the replica every round (a follower runs one per commit at
        the source) threw its memory maps away, and with them their page
        tables: every row read or written in the next round was a page fault
        again, and unmapping a 512 MiB map that was touched all over cost as
        much. The next :meth:`begin` takes the lock again and reopens only if
        another replica, or another tensor file, is now at the path.
        """
        self._release()
        self._flush_on_schedule()
        replica = self.replica
        if replica.writer.unflushed:  # due now: what Replica.close would have done, but not in the way
            replica.writer.checkpoint_in_background()
        self._applied = False
        self._idle_round = False

    def _release(self) -> None:
        self._stack.close()
        self._stack = ExitStack()

    def _drop_replica(self) -> None:
        if self.replica is None:
            return
        try:
            self._flush_on_schedule()
            self.replica.close()  # waits for a background checkpoint; releases everything even if it failed
        finally:
            self.replica = None

    def close(self) -> None:
        for fh in self._handles.values():
            try:
                fh.close()
            except OSError:
                pass
        self._handles = {}
        self._release()
        self._drop_replica()
        if self._staging_lock is not None:
            if not _holds_received_bytes(self._staging):  # a first sync that moved nothing leaves nothing
                shutil.rmtree(self._staging, ignore_errors=True)
            self._staging_lock.release()
            self._staging_lock = self._staging = None


def _holds_received_bytes(staging: str) -> bool:
    """Whether a first sync's staging directory holds snapshot bytes the next run would resume from
    (anything but its lock file and the transfer's bookkeeping)."""
    for root, _dirs, files in os.walk(staging):
        for name in files:
            if name not in (LOCK_FILE, TRANSFER):
                try:
                    if os.path.getsize(os.path.join(root, name)):
                        return True
                except OSError:
                    pass
    return False
