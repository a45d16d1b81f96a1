"""A replica: one model's tensor files, its delta log and its metadata.

Directory layout (formats/FORMAT.md is normative; deltalog.layout names it):

    DELTALOG            marker: "deltalog replica" + format version
    lock                writer lock (deltalog.lock)
    log/                LMDB environment (deltalog.store)
    tensors/NNNNN.bin   materialised rows, memory-mapped (deltalog.tensorfiles)
    tensors/NNNNN.digest  one digest per row (format v2; deltalog.rowdigest)
    snapshots/OFFSET/   immutable checksummed copies of all tensors

This module is the reading side and the front door: opening, reading rows
consistently without the lock, and building the records of commits and
rollbacks. Every change it makes goes through its :class:`deltalog.writer.Writer`
(``replica.writer``), which logs, writes rows and digests, settles and
recovers, in the one order that makes kill -9 safe.

Readers never take the lock. ``tensor()`` is a live memory map;
``read_tensor()`` returns a copy that is consistent with ``head``.

Row digests (format v2): every write of rows also writes their digests, and
every copy of rows out of the files (``read_rows``, the undo values a record
keeps) is checked against them, so bit rot in a live file is an
IntegrityError, never a shipped or reported number. A v1 replica has no
digest files: it is read unchecked, and its first writer upgrades it.

State digest (format 4, deltalog.lineage): meta/state holds a fingerprint
of the model at the head, and every record the fingerprint before and after
it, so two replicas can prove they hold the same model at an offset.
"""

from __future__ import annotations

import os
# shutil is imported where it is used: it loads bz2 and lzma, ~2 ms of every command (issue 15).
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from typing import TypeVar

import numpy as np

from . import kernels, layout, lineage, receive, tensorfiles
from . import record as rec
from .dtypes import STORAGE, as_float, logical_name, row_significance, rows_differ, to_storage
from .errors import (
    DeltalogError,
    IntegrityError,
    InvalidInput,
    ModelMismatch,
    NotAReplica,
    OffsetNotRetained,
    StorageError,
    UnsupportedVersion,
)
from .lock import WriterLock, pid_alive
from .pending import head_values, merged_pending
from .store import LogStore
from .tensorfiles import TensorInfo
from .writer import RowChange, State, Writer, create_replica

DEFAULT_BUCKET_ROWS = 1024
T = TypeVar("T")
_COMPARE_CHUNK_BYTES = 32 << 20  # bounded memory when comparing a checkpoint


def _normalise_tensors(tensors: Mapping) -> list[tuple[str, str, np.ndarray]]:
    """(name, logical dtype, storage array) for CheckpointTensor / ndarray / (array, dtype) values."""
    out = []
    for name in sorted(tensors):
        value = tensors[name]
        if not isinstance(name, str) or not name:
            raise InvalidInput(f"tensor names must be non-empty strings, got {name!r}")
        if hasattr(value, "array") and hasattr(value, "dtype") and isinstance(value.dtype, str):
            array, dtype = value.array, value.dtype
        elif isinstance(value, tuple):
            array, dtype = value
        else:
            array = np.asarray(value)
            dtype = logical_name(array.dtype)
        out.append((name, dtype, to_storage(np.asarray(array), dtype)))
    return out


_STAGING_PREFIX = ".{}.init-"  # + the pid of the init building it, beside the target


def _remove_dead_inits(parent: str, name: str) -> None:
    """Remove the staging directories that inits of ``name`` killed mid-way left behind.

    A live init holds the flock on its staging directory's lock file, so one
    whose lock can be taken was abandoned. Its pid must also not be a live
    process: that covers the moment between an init creating its directory
    and locking it. A reused pid only delays the removal to a later init.
    """
    import shutil

    prefix = _STAGING_PREFIX.format(name)
    try:
        entries = [e for e in os.listdir(parent) if e.startswith(prefix) and e[len(prefix):].isdigit()]
    except OSError:
        return
    for entry in entries:
        staging, pid = os.path.join(parent, entry), int(entry[len(prefix):])
        if pid == os.getpid() or pid_alive(pid) or not os.path.isdir(staging):
            continue
        lock = WriterLock(staging)
        try:
            if not lock.try_acquire():
                continue  # its init lives (in another pid namespace)
        except OSError:
            continue  # another init is removing it
        try:
            shutil.rmtree(staging, ignore_errors=True)
        finally:
            lock.release()


UNOPENABLE_HINT = ("no command can open a replica whose own metadata is damaged: 'deltalog sync HEALTHY_REPLICA "
                   "NEW_DIR' makes a copy to put in its place, or restore it from a backup")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_format_meta(path: str, fmt) -> None:
    """IntegrityError unless meta/format holds the two versions as integers."""
    if not isinstance(fmt, dict) or not all(_is_int(fmt.get(k)) for k in ("write_version", "read_version")):
        raise IntegrityError(f"{path}: damaged log metadata: meta/format is {fmt!r:.100}")


def _check_model_meta(path: str, model) -> None:
    """IntegrityError unless meta/model has every key this code reads, of the right type.

    It decoded as msgpack, but a damaged value must be refused here, not
    surface later as a KeyError or TypeError (an internal error).
    """

    def damaged(what: str) -> IntegrityError:
        return IntegrityError(f"{path}: damaged log metadata: meta/model {what}")

    if not isinstance(model, dict):
        raise damaged("is not a map")
    if not isinstance(model.get("model_id"), str):
        raise damaged("has no model_id")
    if not _is_int(model.get("bucket_rows")) or model["bucket_rows"] < 1:
        raise damaged(f"has bucket_rows {model.get('bucket_rows')!r}")
    if not isinstance(model.get("created", 0.0), (int, float)):
        raise damaged(f"has created {model.get('created')!r:.50}")
    tensors = model.get("tensors")
    if not isinstance(tensors, list) or not tensors:
        raise damaged("lists no tensors")
    for i, t in enumerate(tensors):
        if not isinstance(t, dict) or not isinstance(t.get("name"), str) or not t["name"]:
            raise damaged(f"tensor {i} has no name")
        if not isinstance(t.get("dtype"), str) or t["dtype"] not in STORAGE:
            raise damaged(f"tensor {t['name']!r} has dtype {t.get('dtype')!r:.50}")
        shape = t.get("shape")
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise damaged(f"tensor {t['name']!r} has shape {shape!r:.50}")
    names = [t["name"] for t in tensors]
    if names != sorted(set(names)):  # tensor ids are positions in the list sorted by name
        raise damaged("tensor names are not sorted and unique")


_FLOATS = ("float64", "float32", "float16", "bfloat16")


def _nonfinite_rows(info: TensorInfo, values: np.ndarray) -> np.ndarray:
    """Which rows of ``values`` (a floating-point tensor's, storage dtype) hold NaN or an infinity."""
    with np.errstate(invalid="ignore"):
        return ~np.isfinite(as_float(np.asarray(values), info.dtype)).all(axis=1)


def _refuse_nonfinite(info: TensorInfo, rows: np.ndarray, values: np.ndarray) -> None:
    """InvalidInput if any of the rows to commit of a floating-point tensor holds NaN or an infinity."""
    if info.dtype not in _FLOATS or not len(rows):
        return
    bad = _nonfinite_rows(info, values)
    if bad.any():
        raise InvalidInput(
            f"tensor {info.name!r}: {int(bad.sum()):,} of the {len(rows):,} rows to commit hold NaN or "
            f"infinity (first: row {int(rows[np.flatnonzero(bad)[0]])}); nothing was committed",
            hint="fix the checkpoint, or pass --allow-nonfinite to commit them anyway",
        )


def _refuse_nonfinite_model(info: TensorInfo, rows: np.ndarray) -> None:
    """InvalidInput if a floating-point tensor holds NaN or an infinity (read in bounded steps)."""
    if info.dtype not in _FLOATS or not info.rows:
        return
    step = max(1, _COMPARE_CHUNK_BYTES // max(1, info.row_bytes))
    bad, first = 0, None
    for start in range(0, info.rows, step):
        rows_bad = _nonfinite_rows(info, rows[start : start + step])
        if rows_bad.any():
            first = start + int(np.flatnonzero(rows_bad)[0]) if first is None else first
            bad += int(rows_bad.sum())
    if bad:
        raise InvalidInput(
            f"tensor {info.name!r}: {bad:,} of its {info.rows:,} rows hold NaN or infinity (first: row {first}); "
            f"nothing was created",
            hint="fix the checkpoint, or pass --allow-nonfinite to start from it anyway",
        )


def _check_reason(text: str | None, what: str) -> None:
    if text is not None and (not isinstance(text, str) or len(text) > rec.MAX_REASON):
        raise InvalidInput(f"--{what} must be text of at most {rec.MAX_REASON} characters")


def _check_state_meta(path: str, state, oldest) -> None:
    """IntegrityError unless meta/state and meta/oldest hold what :attr:`Replica.state` reads."""
    optional_ints = ("flushed", "gen", "digest")
    if not (
        isinstance(state, dict)
        and _is_int(state.get("head"))
        and _is_int(state.get("applied"))
        and (state.get("applying") is None or _is_int(state["applying"]))
        and all(_is_int(state[k]) for k in optional_ints if k in state)
        and isinstance(state.get("boot", ""), str)
        and _is_int(oldest)
    ):
        raise IntegrityError(f"{path}: damaged log metadata: meta/state is {state!r:.100}, meta/oldest {oldest!r:.30}")


class Replica:
    """One replica directory. Use :meth:`init` or :meth:`open`; close when done."""

    def __init__(self, path: str, store: LogStore):
        self.path = path
        self.store = store  # the LMDB log (deltalog.store); changes go through self.writer
        self.maps = tensorfiles.TensorMaps(path)
        with store.read() as txn:
            fmt = store.get_meta(txn, "format")
            model = store.get_meta(txn, "model")
        if fmt is None or model is None:
            raise IntegrityError(f"{path}: log holds no model metadata")
        _check_format_meta(path, fmt)
        if fmt["read_version"] > layout.FORMAT_VERSION:
            raise UnsupportedVersion(f"{path}: replica needs format v{fmt['read_version']} to read")
        _check_model_meta(path, model)  # after the version check: a newer format may lay it out otherwise
        self.set_format(fmt)
        self.model_id: str = model["model_id"]
        self.bucket_rows: int = model["bucket_rows"]
        self.created: float = model.get("created", 0.0)
        self._tensors = [
            TensorInfo(i, t["name"], t["dtype"], tuple(t["shape"])) for i, t in enumerate(model["tensors"])
        ]
        self._by_name = {t.name: t for t in self._tensors}
        self._check_head()
        self.writer = Writer(self, receive.INTENTS)

    # -- format -------------------------------------------------------------------

    def set_format(self, fmt: dict) -> None:
        """Take meta/format's versions: what this handle may write, and how."""
        self.format_version: int = fmt["write_version"]
        self.writable_format = fmt["write_version"] <= layout.FORMAT_VERSION
        self._digests = fmt["write_version"] >= layout.DIGEST_VERSION  # tensors/NNNNN.digest exist and are kept
        # The encoding of the records this handle writes: v2 only once meta/format
        # (written after the marker) says that every reader able to open the replica decodes it.
        self.record_encoding: int = 2 if fmt["write_version"] >= layout.RECORD_V2_VERSION else 1

    def refresh_format(self) -> None:
        """Re-read meta/format (lock held): another process may have upgraded the replica since open."""
        fmt = self.meta("format")
        _check_format_meta(self.path, fmt)
        if fmt["write_version"] != self.format_version:
            self.set_format(fmt)

    @property
    def has_row_digests(self) -> bool:
        """Whether this replica keeps tensors/NNNNN.digest (format v2 and later; a v1 replica until its first write)."""
        return self._digests

    def _check_head(self) -> None:
        """IntegrityError unless meta/state is well formed and its head is the log's last
        record (or the oldest offset, when the log holds no record after it).

        Every writer moves the head and the records in one transaction
        (commit, sync, a reverted sync, compaction, a rebase onto a
        snapshot), so a disagreement is damage: trusting the head would
        label the model at one offset as another. It costs one cursor step.
        """
        with self.store.read() as txn:
            state = self.store.get_meta(txn, "state")
            oldest = self.store.get_meta(txn, "oldest", 0)
            last = self.store.last_offset(txn)
        _check_state_meta(self.path, state, oldest)
        head = state["head"]
        if last is None and head != oldest:
            problem = f"the head is {head} but the log holds no record after the oldest offset {oldest}"
        elif last is not None and (head != last or last <= oldest):
            problem = f"the head is {head} but the log's last record is {last} (oldest offset {oldest})"
        else:
            return
        raise IntegrityError(
            f"{self.path}: damaged state: {problem}",
            hint="restore the replica from a copy, or sync a new one from another replica",
        )

    # -- lifecycle ------------------------------------------------------------

    @classmethod
    def init(
        cls,
        path: str | os.PathLike,
        tensors: Mapping,
        bucket_rows: int = DEFAULT_BUCKET_ROWS,
        model_id: str | None = None,
        allow_nonfinite: bool = True,
    ) -> "Replica":
        """Create a replica at ``path`` holding ``tensors`` at offset 0.

        ``tensors`` maps names to arrays (or CheckpointTensor / (array, dtype)).
        The replica is built beside ``path`` and renamed into place, so a
        crash leaves either nothing or a complete replica.
        ``allow_nonfinite=False`` refuses (InvalidInput, nothing created) a
        model holding NaN or an infinity, as ``deltalog init`` asks.
        """
        import shutil

        path = os.fspath(path)
        if bucket_rows < 1:
            raise InvalidInput(f"--bucket-rows must be at least 1, got {bucket_rows}")
        if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
            raise NotAReplica(f"{path}: already exists and is not empty", hint="choose a new directory")
        model_id = model_id or uuid.uuid4().hex
        if not model_id.isprintable() or len(model_id) > 200:
            raise InvalidInput("--model-id must be printable text of at most 200 characters")
        items = _normalise_tensors(tensors)
        if not items:
            raise InvalidInput("a model needs at least one tensor")
        infos = [TensorInfo(i, name, dtype, tuple(int(d) for d in arr.shape)) for i, (name, dtype, arr) in enumerate(items)]
        if not allow_nonfinite:
            for info, (_n, _d, arr) in zip(infos, items):
                _refuse_nonfinite_model(info, arr.reshape(info.rows, info.row_elems))
        parent = os.path.dirname(os.path.abspath(path))
        name = os.path.basename(os.path.abspath(path))
        _remove_dead_inits(parent, name)
        tmp = os.path.join(parent, f"{_STAGING_PREFIX.format(name)}{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        staging_lock = WriterLock(tmp)  # held while building: see _remove_dead_inits
        try:
            os.makedirs(os.path.join(tmp, tensorfiles.TENSOR_DIR))
            staging_lock.acquire()
            arrays = []
            for info, (_n, _d, arr) in zip(infos, items):
                tensorfiles.write_array_file(os.path.join(tmp, tensorfiles.TENSOR_DIR, info.file), arr)
                tensorfiles.write_digest_file(
                    os.path.join(tmp, tensorfiles.TENSOR_DIR, info.digest_file), arr.reshape(info.rows, info.row_elems)
                )
                arrays.append((info, arr))
            tensorfiles.fsync_dir(os.path.join(tmp, tensorfiles.TENSOR_DIR))
            created = time.time()  # init makes the state at offset 0: its snapshot's time
            manifest = tensorfiles.write_snapshot(tmp, 0, model_id, arrays, made_at=created)
            tensorfiles.recache_live_files(os.path.join(tmp, tensorfiles.TENSOR_DIR), infos)
            model = {"model_id": model_id, "bucket_rows": int(bucket_rows), "tensors": [i.to_meta() for i in infos],
                     "created": created}
            create_replica(tmp, path, model=model, offset=0, manifest=manifest,
                           digest=lineage.from_hex(manifest["state_digest"]))
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise StorageError(f"{path}: cannot create replica: {exc.strerror or exc}") from None
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        finally:
            staging_lock.release()  # after the rename it is the replica's writer lock: open() takes it
        return cls.open(path)

    @classmethod
    def open(cls, path: str | os.PathLike) -> "Replica":
        """Open an existing replica. Never blocks on a writer."""
        path = os.fspath(path)
        layout.check_marker(path)
        store = LogStore(os.path.join(path, layout.LOG_DIR))
        try:
            replica = cls(path, store)
        except IntegrityError as exc:
            store.close()
            # What every command needs first is damaged: 'verify' cannot open it either.
            raise IntegrityError(str(exc), hint=UNOPENABLE_HINT) from None
        except BaseException:
            store.close()
            raise
        try:
            replica.writer.repair_if_abandoned()
        except BaseException:
            replica.close()
            raise
        return replica

    def close(self, flush: bool = True) -> None:
        """Release the replica. Tensor pages this handle wrote are fsynced first (the WAL checkpoint
        on close), unless ``flush`` is False and the schedule is not due: then they stay in the page
        cache like a long-running writer's, and after a machine crash recovery re-applies their
        records from the log (``flushed`` stays behind). A short-lived command uses it to return
        once its record is durable, as the library call does."""
        try:
            self.writer.end_checkpoint()  # an fsync of the schedule's, still running
            if self.writer.unflushed:
                if flush or self.writer.flush_due():
                    self.writer.flush_if_free()
                else:
                    self.writer.defer_flush()
        finally:  # released even when the files could not be written (that error is raised after)
            self.writer.end_touch_ahead()  # its thread stores into the maps about to go
            self.maps.forget()
            self.writer.lock.release()
            self.store.close()

    def __enter__(self) -> "Replica":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- reading --------------------------------------------------------------

    @property
    def state(self) -> State:
        return State.from_meta(self.meta("state"))

    def meta(self, key: str, default=None):
        """The value of one meta key (formats/FORMAT.md section 3), read in its own transaction."""
        with self.store.read() as txn:
            return self.store.get_meta(txn, key, default)

    @property
    def head(self) -> int:
        """Newest durable offset."""
        return self.state.head

    @property
    def oldest_offset(self) -> int:
        return self.meta("oldest", 0)

    @property
    def state_digest(self) -> int | None:
        """The state digest of the model at the head (deltalog.lineage); None before format 4."""
        return self.state.digest

    def state_digest_at(self, offset: int) -> int | None:
        """The state digest of the model at a retained ``offset``, or None when the log cannot tell.

        The head's, else the next record's when it applies on ``offset`` (its
        pre digest: what reads only the records after ``offset`` needs no
        more), else the record at ``offset`` (its post digest), else the
        oldest snapshot's. Offsets written before the replica had state
        digests (format 4) have none; so has a record whose header is damaged
        (whatever reads it will say so).
        """
        with self.store.read() as txn:
            state = self.store.get_meta(txn, "state")
            if offset == state["head"] and state.get("digest") is not None:
                return state["digest"]
            for next_offset, next_blob in self.store.iter_records(txn, after=offset):
                summary = rec.summarize(next_blob, f"{self.path}: record {next_offset}")
                if summary.base == offset and summary.pre_digest is not None:
                    return summary.pre_digest
                break
            blob = self.store.get_record(txn, offset)
            if blob is not None:
                try:
                    summary = rec.summarize(blob, f"{self.path}: record {offset}")
                except IntegrityError:
                    return None
                if summary.post_digest is not None:
                    return summary.post_digest
            if offset == self.store.get_meta(txn, "oldest", 0):
                manifest = self.store.get_snapshot(txn, offset)
                if manifest is not None:
                    return lineage.from_hex(manifest.get("state_digest"))
        return None

    def past_state_digest(self, offset: int) -> int | None:
        """The state digest at an offset whose record compaction dropped, or None when it was not
        kept (meta/past_digests: the newest store.PAST_DIGESTS_KEPT of them; none before this
        version compacted, none after a reseed replaced the log). Such an offset is not retained:
        nothing can be rebuilt there, but a follower that stands on it can be proven to hold this
        replica's history (sync)."""
        with self.store.read() as txn:
            offsets, digests = self.store.past_digests(txn)
        i = int(np.searchsorted(offsets, np.uint64(offset))) if offset >= 0 else len(offsets)
        return int(digests[i]) if i < len(offsets) and int(offsets[i]) == offset else None

    def digest_of_files(self) -> int:
        """The state digest of the model at the head, computed from the row digest files
        (rows a pending partial sync wrote ahead of the head count at their head values)."""
        total = 0
        for info in self._tensors:
            total += lineage.tensor_sum(info.id, self.maps.digests(info))
        for name, d in merged_pending(self).items():
            info = self.info(name)
            total += lineage.rows_sum(info.id, d.rows, kernels.row_digests(d.old))
            total -= lineage.rows_sum(info.id, d.rows, kernels.row_digests(d.new))
        return total & lineage.MASK

    def has_record(self, offset: int) -> bool:
        with self.store.read() as txn:
            return self.store.get_record(txn, offset) is not None

    @property
    def tensor_names(self) -> list[str]:
        return [t.name for t in self._tensors]

    @property
    def tensors(self) -> list[TensorInfo]:
        return list(self._tensors)

    def info(self, name: str) -> TensorInfo:
        try:
            return self._by_name[name]
        except KeyError:
            raise InvalidInput(
                f"unknown tensor {name!r}", hint="known: " + ", ".join(self.tensor_names[:10])
            ) from None

    def digest_path(self, info: TensorInfo) -> str:
        """The path of a tensor's row digest file."""
        return self.maps.digest_path(info)

    def check_digests(self, name: str, idx: np.ndarray, digests: np.ndarray, stored: np.ndarray) -> None:
        """IntegrityError naming the first of rows ``idx`` whose computed digest is not the ``stored`` one."""
        bad = np.flatnonzero(digests != stored)
        if len(bad):
            raise self.digest_error(name, int(idx[bad[0]]))

    def rows_view(self, name: str) -> np.ndarray:
        """Read-only (rows, row_elems) live view of a tensor's storage."""
        return self.maps.rows(self.info(name))

    def tensor(self, name: str) -> np.ndarray:
        """Read-only live view of a tensor in its original shape and storage dtype.

        It reflects writes as they happen and is not checked against the row
        digests; use :meth:`read_tensor` for a copy that is guaranteed
        consistent with one head and checked.
        """
        view = self.rows_view(name).reshape(self.info(name).shape)
        view.flags.writeable = False
        return view

    def read_tensor(self, name: str) -> np.ndarray:
        """A copy of a tensor exactly as of :attr:`head` (waits out a writer; rows a
        pending partial sync wrote ahead of the head are shown at their head value)."""
        info = self.info(name)
        _head, values = head_values(self, {name: np.arange(info.rows)})
        return values[name].reshape(info.shape)

    def read_rows(self, name: str, rows: np.ndarray, timeout: float = 30.0) -> tuple[int, np.ndarray]:
        """(head, copy of ``rows`` of a tensor as of that head), waiting out a writer.

        Costs O(len(rows)), whatever the tensor's size. The rows are checked
        against their digests (format v2): a damaged row is an IntegrityError.
        """
        idx = np.asarray(rows, dtype=np.intp)

        def gather(view: np.ndarray, stored: np.ndarray | None) -> tuple:
            # One pass: each row is copied and hashed while it is in cache.
            values, digests = kernels.gather_rows(view, idx, digests=stored is not None)
            return values, digests, None if stored is None else np.take(stored, idx)

        head, (values, digests, stored) = self.read_in_place(name, gather, timeout)
        if stored is not None:  # not torn by a writer: now the digests must match
            self.check_digests(name, idx, digests, stored)
        return head, values

    def read_in_place(self, name: str, read: Callable[[np.ndarray, np.ndarray | None], T],
                      timeout: float = 30.0) -> tuple[int, T]:
        """(head, ``read(rows, digests)``) where ``read`` ran while the files held that head untouched.

        ``read`` gets the live read-only (rows, row_elems) view of the tensor
        and its stored row digests (None on a v1 replica), reads what it needs
        without copying, and must not keep either view. It runs again when a
        writer touched the files meanwhile, and waits out (or repairs) a
        writer that is mid-apply. Checking rows against the digests is the
        caller's part: only a result returned here is free of torn reads.
        """
        info = self.info(name)
        deadline = time.monotonic() + timeout
        while True:
            before = self.state
            if before.settled:
                stored = self.maps.digests(info) if self._digests else None
                result = read(self.rows_view(name), stored)
                if self.state == before:
                    return before.head, result
            elif self.writer.lock.try_acquire():  # the writer died mid-apply: repair
                try:
                    self.writer.recover()
                    if not self.writable_format:
                        raise UnsupportedVersion(
                            f"{self.path}: a newer deltalog's writer died mid-write; open it with that version to repair it"
                        )
                finally:
                    self.writer.lock.release()
                continue
            if time.monotonic() > deadline:
                raise DeltalogError(f"{self.path}: a writer kept the tensors busy for {timeout:.0f} s")
            time.sleep(0.002)

    def digest_error(self, name: str, row: int) -> IntegrityError:
        """The error for row ``row`` of ``name`` not matching its digest (a damaged tensor file)."""
        return IntegrityError(
            f"{self.path}: tensor {name!r} row {row}: its bytes in {tensorfiles.TENSOR_DIR}/{self.info(name).file} "
            "do not match the row's digest (damaged tensor file)",
            hint=tensorfiles.REPAIR_HINT.format(path=self.path),
        )

    def snapshots(self) -> list[dict]:
        with self.store.read() as txn:
            return self.store.get_snapshots(txn)

    def snapshot_offsets(self) -> list[int]:
        """The offsets of the registered snapshots (their manifests unread: they may be damaged)."""
        with self.store.read() as txn:
            return self.store.snapshot_offsets(txn)

    def snapshot_manifest(self, offset: int) -> dict | None:
        """The manifest registered at ``offset``, or None; IntegrityError when it cannot be read."""
        with self.store.read() as txn:
            return self.store.get_snapshot(txn, offset)

    def record_blob(self, offset: int) -> bytes:
        """The encoded record at ``offset`` (a copy)."""
        with self.store.read() as txn:
            blob = self.store.get_record(txn, offset)
            if blob is None:
                raise OffsetNotRetained(
                    f"{self.path}: no record at offset {offset}",
                    hint=f"the log holds offsets after {self.oldest_offset} up to {self.head}",
                )
            return bytes(blob)

    def iter_record_blobs(self, since: int = -1, upto: int | None = None) -> Iterator[tuple[int, bytes]]:
        """(offset, encoded record) after ``since``, oldest first; each blob a copy.

        Fetched in small batches so no read transaction is held while the
        caller works (a long-lived reader would stop LMDB reusing pages).
        """
        after = since
        while True:
            with self.store.read() as txn:
                batch = []
                for offset, blob in self.store.iter_records(txn, after=after, upto=upto):
                    batch.append((offset, bytes(blob)))
                    if len(batch) == 64:
                        break
            if not batch:
                return
            yield from batch
            after = batch[-1][0]

    def iter_record_views(self, since: int = -1, upto: int | None = None,
                          batch: int = 64) -> Iterator[tuple[int, memoryview]]:
        """(offset, zero-copy view of the encoded record) for since < offset <= upto.

        A view is valid only until the next item is requested: decode what
        you need from it first. Reading a few index sections of an 8 MB
        record then costs no copy of it. The read transaction is renewed
        every ``batch`` records, so none is held for long.
        """
        if upto is None:
            upto = self.head
        while upto > since:
            last = None
            with self.store.read() as txn:
                for n, (offset, view) in enumerate(self.store.iter_records(txn, after=since, upto=upto)):
                    yield offset, view
                    last = offset
                    if n + 1 == batch:
                        break
            if last is None:
                return
            since = last

    def iter_summaries(self, since: int = -1, upto: int | None = None) -> Iterator[rec.RecordSummary]:
        """Headers of the records in (since, upto], oldest first."""
        for offset, view in self.iter_record_views(since, self.head if upto is None else upto):
            yield rec.summarize(view, f"{self.path}: record {offset}")

    def record_offset_at_or_before(self, offset: int) -> int | None:
        """The newest record offset <= ``offset`` (None when the log holds none)."""
        with self.store.read() as txn:
            return self.store.offset_at_or_before(txn, offset)

    def record_offset_from_end(self, back: int) -> int | None:
        """The offset of the record ``back`` records before the newest (0: the newest), or None."""
        with self.store.read() as txn:
            return self.store.offset_from_end(txn, back)

    def bucket_index(self, name: str) -> dict[int, tuple[int, float]]:
        """bucket -> (version, significance) for every bucket ever touched."""
        info = self.info(name)
        with self.store.read() as txn:
            return {b: (v, s) for b, v, s in self.store.get_buckets(txn, info.id)}

    # -- writing ----------------------------------------------------------------

    def writing(self, wait: float = 0.0, upgrade: bool = True):
        """Hold the writer lock, with the tensors brought up to the log's head (re-entrant).

        An older replica is upgraded to the current format first, unless
        ``upgrade`` is False (verify: it only reads). See Writer.writing.
        """
        return self.writer.writing(wait, upgrade)

    def commit(self, updates: Mapping[str, tuple], wait: float = 0.0, message: str | None = None) -> int:
        """Append one record with new values for some rows; returns the new head.

        ``updates`` maps tensor name -> (row_indices, values), values shaped
        (k, *shape[1:]) or (k, row_elems) in the tensor's dtype. Rows whose
        values do not change are left out; a commit that changes nothing
        appends nothing and returns the current head. If an index repeats,
        its last value wins. ``message`` is kept in the record (its reason),
        with the user and host that wrote it.
        """
        _check_reason(message, "message")
        deltas = [self._check_update(name, rows, values) for name, (rows, values) in updates.items()]
        with self.writing(wait):
            return self._append("commit", deltas, drop_unchanged=True, reason=message)

    def commit_checkpoint(self, tensors: Mapping, metadata: Mapping[str, str] | None = None, wait: float = 0.0,
                          message: str | None = None, allow_nonfinite: bool = True,
                          progress: Callable[[str, int, int], None] | None = None) -> int:
        """Append one record holding the rows where a full checkpoint differs from head.

        ``allow_nonfinite=False`` refuses (InvalidInput, nothing written) rows
        to commit that hold NaN or an infinity: what ``deltalog commit`` asks
        unless given --allow-nonfinite, since a diverged training run is the
        usual reason for them. ``progress(stage, done, total)`` sees the rows
        compared ("comparing rows"), then "logging".
        """
        progress = progress or (lambda stage, done, total: None)
        _check_reason(message, "message")
        other = (metadata or {}).get("deltalog.model_id")
        if other and other != self.model_id:
            raise ModelMismatch(f"checkpoint belongs to model {other}, replica {self.path} holds {self.model_id}")
        items = _normalise_tensors(tensors)
        names = [n for n, _d, _a in items]
        if names != self.tensor_names:
            missing = sorted(set(self.tensor_names) - set(names))
            extra = sorted(set(names) - set(self.tensor_names))
            parts = ([f"missing {missing[:5]}"] if missing else []) + ([f"unknown {extra[:5]}"] if extra else [])
            raise ModelMismatch(
                f"checkpoint does not match the model of {self.path}: " + ", ".join(parts),
                hint="a checkpoint must hold exactly the replica's tensors",
            )
        for name, dtype, array in items:
            info = self.info(name)
            if dtype != info.dtype or tuple(array.shape) != info.shape:
                raise ModelMismatch(
                    f"tensor {name!r}: checkpoint has {dtype}{list(array.shape)}, replica has {info.dtype}{list(info.shape)}"
                )
        with self.writing(wait):
            deltas = []
            total, done = sum(self.info(name).rows for name, _d, _a in items), 0
            for name, _dtype, array in items:
                info = self.info(name)
                rows, values = self._changed_rows(info, array.reshape(info.rows, info.row_elems),
                                                  lambda n: progress("comparing rows", done + n, total))
                done += info.rows
                if len(rows):
                    if not allow_nonfinite:
                        _refuse_nonfinite(info, rows, values)
                    deltas.append((info, rows, values))
            progress("logging", 0, 1)
            return self._append("commit", deltas, drop_unchanged=False, reason=message)

    def _changed_rows(self, info: TensorInfo, new: np.ndarray,
                      compared: Callable[[int], None]) -> tuple[np.ndarray, np.ndarray]:
        """Rows where ``new`` differs bitwise from the tensor file, in bounded chunks (lock held);
        ``compared(n)`` after each chunk, with the rows compared so far."""
        current = self.writer.rows(info)
        step = max(1, _COMPARE_CHUNK_BYTES // max(1, info.row_bytes))
        found_rows, found_values = [], []
        for start in range(0, info.rows, step):
            compared(start)
            stop = min(info.rows, start + step)
            chunk = np.asarray(new[start:stop])
            differs = rows_differ(chunk, current[start:stop])
            idx = np.flatnonzero(differs)
            if idx.size:
                found_rows.append(idx.astype(np.uint64) + np.uint64(start))
                found_values.append(chunk[idx])
        if not found_rows:
            return np.empty(0, np.uint64), np.empty((0, info.row_elems), info.storage)
        return np.concatenate(found_rows), np.concatenate(found_values)

    def _check_update(self, name: str, rows, values) -> tuple[TensorInfo, np.ndarray, np.ndarray]:
        info = self.info(name)
        rows = np.asarray(rows)
        if rows.ndim == 0:
            rows = rows.reshape(1)
        if rows.ndim != 1 or (rows.size and rows.dtype.kind not in "iu"):
            raise InvalidInput(f"tensor {name!r}: row indices must be a 1-D integer array")
        values = np.asarray(values)
        try:
            values = to_storage(values, info.dtype)
        except InvalidInput:
            raise InvalidInput(
                f"tensor {name!r}: values have dtype {values.dtype}, the tensor is {info.dtype}",
                hint=f"cast them first, e.g. values.astype(np.{info.dtype})" if info.dtype != "bfloat16" else None,
            ) from None
        k = rows.shape[0]
        if values.shape not in ((k, *info.shape[1:]), (k, info.row_elems)) and not (
            not info.shape and values.shape in ((k,), (k, 1))
        ):
            raise InvalidInput(
                f"tensor {name!r}: values shaped {list(values.shape)}, expected {[k, *info.shape[1:]]} "
                f"or {[k, info.row_elems]} for {k} rows"
            )
        if k and (rows.min() < 0 or rows.max() >= info.rows):
            raise InvalidInput(f"tensor {name!r}: row index out of range [0, {info.rows})")
        values = values.reshape(k, info.row_elems)
        rows = rows.astype(np.uint64)
        if k > 1 and not np.all(rows[1:] > rows[:-1]):  # else already sorted and unique (np.unique's output): no copies
            # Sort and keep the last value of a repeated index.
            order = np.argsort(rows, kind="stable")
            rows, values = rows[order], values[order]
            last = np.append(rows[1:] != rows[:-1], True)
            rows, values = rows[last], values[last]
        return info, rows, np.ascontiguousarray(values)

    def append_record(
        self,
        kind: str,
        updates: Mapping[str, tuple],
        *,
        offset: int | None = None,
        reason: str | None = None,
        target: int | None = None,
        drop_unchanged: bool = False,
    ) -> int:
        """Log and apply one record of ``kind`` ('rollback', ...); the caller holds :meth:`writing`.

        ``updates`` maps name -> (rows, values) as for :meth:`commit`.
        ``offset`` defaults to head + 1 (and must be after the head).
        ``drop_unchanged``: rows that already hold their values are left out,
        and when none is left nothing is appended and the head is returned.
        """
        if not self.writer.held:
            raise DeltalogError("append_record needs the writer lock: call it inside Replica.writing()")
        deltas = [self._check_update(name, rows, values) for name, (rows, values) in updates.items()]
        return self._append(kind, deltas, drop_unchanged, reason, target, offset)

    def _append(
        self,
        kind: str,
        deltas: list[tuple[TensorInfo, np.ndarray, np.ndarray]],
        drop_unchanged: bool,
        reason: str | None = None,
        target: int | None = None,
        offset: int | None = None,
    ) -> int:
        """Log, then apply, one record built from (info, sorted rows, new values). Lock held."""
        head = self.head
        self._refuse_if_pending_sync()
        offset = head + 1 if offset is None else int(offset)
        if offset <= head:
            raise InvalidInput(f"{self.path}: offset {offset} is not after the head {head}")
        # The pages the rows go to are faulted in, writable, on another thread from now on (at
        # 4 GiB, ~4,000 write faults a commit of 8 k rows): begun at the transition, that touch
        # outlasted the log's fsync.
        self.writer.touch_ahead([(info, rows) for info, rows, _new in deltas if len(rows)])
        try:
            return self._log_and_apply(kind, deltas, drop_unchanged, reason, target, head, offset)
        finally:
            self.writer.end_touch_ahead()  # never left for another change (a no-op once the transition took it)

    def _log_and_apply(self, kind: str, deltas: list[tuple[TensorInfo, np.ndarray, np.ndarray]],
                       drop_unchanged: bool, reason: str | None, target: int | None, head: int, offset: int) -> int:
        """:meth:`_append` once its offset is settled and its rows' touch started."""
        # Each tensor's sections compress on other cores as soon as its delta is known (its index
        # and new values even before the old values are gathered), while this thread works out the
        # rest: the old values, the significance, the state digest and the bucket index.
        sections = rec.Sections()
        kept = []
        for info, rows, new in deltas:
            early = sections.early(rows, new)
            old, old_digests = self.writer.old_rows(info, rows.astype(np.intp))  # checked: they become undo values
            if drop_unchanged:
                keep = rows_differ(old, new)
                if not keep.all():
                    rows, new, old, old_digests = rows[keep], new[keep], old[keep], old_digests[keep]
                    early = None  # started for rows the delta no longer holds
            if len(rows):
                delta = rec.TensorDelta(info.name, info.dtype, rows, new, old)
                sections.add(delta, early)
                kept.append((info, delta, old_digests))
        if not kept and (kind == "commit" or drop_unchanged):
            return head
        started = sections.start() if kept else None
        changes = []
        for info, delta, old_digests in kept:
            row_sig = row_significance(delta.old, delta.new, info.dtype)
            delta.significance = float(row_sig.sum())
            changes.append(RowChange(info, delta, row_sig, old_digests))
        self.writer.append(kind, changes, offset=offset, reason=reason, target=target, started=started)
        return offset

    def flush(self) -> None:
        """fsync the tensor files and record that they are durable up to ``applied``."""
        self.writer.flush()

    # -- partial sync (deltalog.receive owns these meta keys: sync.pending, sync.chunk.N, sync.restore, follow)

    def pending_sync(self) -> dict | None:
        """The pending partial sync (meta "sync.pending"), or None."""
        return self.meta(receive.PENDING_KEY)

    def _refuse_if_pending_sync(self) -> None:
        pending = self.pending_sync()
        if pending is not None:
            raise InvalidInput(
                f"{self.path}: a partial sync to offset {pending['target']} is pending",
                hint="complete it with 'deltalog sync' from its source before writing here",
            )

    def _sync_status(self) -> dict:
        """status() fields of a follower (source, lag) and of a partial sync (pending_buckets)."""
        with self.store.read() as txn:
            follow = self.store.get_meta(txn, receive.FOLLOW_KEY)
            pending = self.store.get_meta(txn, receive.PENDING_KEY)
        out: dict = {}
        if follow:
            in_sync_at = follow.get("in_sync_at")
            out.update(
                source=follow.get("source"),
                source_head=follow.get("source_head"),
                lag_offsets=max(0, int(follow.get("source_head") or 0) - self.head),
                lag_seconds=None if in_sync_at is None else round(max(0.0, time.time() - in_sync_at), 3),
                last_sync=follow.get("synced_at"),
                lag_as_of=follow.get("synced_at"),  # what the last sync saw (deltalog.lag.refresh makes it live)
                lag_live=False,
            )
        if pending:
            out.update(
                pending_buckets=sum(len(b["b"]) for b in pending["buckets"].values()),
                pending_target=pending["target"],
            )
        return out

    def make_snapshot(self) -> dict:
        """Write an immutable snapshot of the tensors at head and register it (lock held)."""
        if not self.writer.held:
            raise DeltalogError("make_snapshot needs the writer lock: call it inside Replica.writing()")
        state = self.state
        if self._digests:  # a snapshot is checksummed whole: check its rows before they are sealed in it
            for t in self._tensors:
                stored = self.maps.digests(t, writable=True)
                for start, digests in tensorfiles.digest_blocks(self.writer.rows(t)):
                    bad = np.flatnonzero(digests != stored[start : start + len(digests)])
                    if len(bad):
                        raise self.digest_error(t.name, start + int(bad[0]))
        from .history import head_time

        manifest = tensorfiles.write_snapshot(
            self.path, state.head, self.model_id, [(t, self.writer.rows(t)) for t in self._tensors],
            made_at=head_time(self, state.head),
        )
        written = lineage.from_hex(manifest["state_digest"])
        if state.digest is not None and written != state.digest:
            raise IntegrityError(
                f"{self.path}: the tensor files give state digest {lineage.to_hex(written)}, the head "
                f"{state.head} has {lineage.to_hex(state.digest)}: they do not hold the model at the head",
                hint=tensorfiles.REPAIR_HINT.format(path=self.path),
            )
        self.writer.register_snapshot(manifest)
        return manifest

    def reload_tensor_files(self) -> None:
        """Forget cached memory maps after tensor files were replaced (replay --in-place renames over them)."""
        self.maps.forget()

    # -- reports ------------------------------------------------------------------

    def status(self) -> dict:
        state = self.state
        return {
            "path": os.path.abspath(self.path),
            "head": state.head,
            "model_id": self.model_id,
            "state_digest": lineage.to_hex(state.digest),
            "format_version": self.format_version,
            "oldest_offset": self.oldest_offset,
            "bucket_rows": self.bucket_rows,
            "pending_apply": state.head - state.applied if state.applied != state.head else 0,
            "log_bytes": self.store.usage_bytes(),
            "tensors": [
                {
                    "name": t.name,
                    "shape": list(t.shape),
                    "dtype": t.dtype,
                    "rows": t.rows,
                    "buckets": t.buckets(self.bucket_rows),
                    "bytes": t.nbytes,
                }
                for t in self._tensors
            ],
            "snapshots": [s["offset"] for s in self.snapshots()],
            **self._sync_status(),
        }
