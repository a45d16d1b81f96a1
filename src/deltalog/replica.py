"""A replica: one model's tensor files, its delta log and its metadata.

Directory layout (formats/FORMAT.md is normative):

    DELTALOG            marker: "deltalog replica" + format version
    lock                writer lock (deltalog.lock)
    log/                LMDB environment (deltalog.store)
    tensors/NNNNN.bin   materialised rows, memory-mapped (deltalog.tensorfiles)
    tensors/NNNNN.digest  one digest per row (format v2; deltalog.rowdigest)
    snapshots/OFFSET/   immutable checksummed copies of all tensors

Write protocol (what makes kill -9 safe): a record is committed to the log
(durably, with state.applying = its offset) before any tensor byte changes;
then its rows are written and flushed; then state.applied advances. Records
hold absolute values, so a writer that finds applied < head simply re-applies
the records after ``applied``: recovery is idempotent.

Readers never take the lock. ``tensor()`` is a live memory map;
``read_tensor()`` returns a copy that is consistent with ``head``.

Row digests (format v2): every write of rows also writes their digests,
under the same protocol (page cache, fsynced by flush(), re-applied by
recovery), and every copy of rows out of the files (``read_rows``, the undo
values a record keeps) is checked against them, so bit rot in a live file
is an IntegrityError, never a shipped or reported number. A v1 replica has
no digest files: it is read unchecked, and its first writer upgrades it.
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from typing import TypeVar
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from . import record as rec
from . import kernels, tensorfiles
from .dtypes import STORAGE, as_float, logical_name, rows_differ, to_storage
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
from .lock import WriterLock
from .store import LogStore
from .tensorfiles import TensorInfo

MARKER = "DELTALOG"
LOG_DIR = "log"
FORMAT_VERSION = 3  # what this code writes (and the newest it reads)
READ_VERSION = 3  # the oldest code that can read what it writes; also the DELTALOG marker's number
DIGEST_VERSION = 2  # the first write version with row digest files (tensors/NNNNN.digest)
RECORD_V2_VERSION = 3  # the first write version whose log may hold records of encoding v2 (deltalog.record)
DEFAULT_BUCKET_ROWS = 1024
T = TypeVar("T")
_COMPARE_CHUNK_BYTES = 32 << 20  # bounded memory when comparing a checkpoint
# Tensor files are fsynced like a WAL checkpoint, not at every commit: the
# log already makes each record durable, and a kill -9 loses nothing that
# sits in the page cache. Only a machine crash can, and the boot id tells.
# Every fsync also write-protects the pages it cleaned, so the next commit's row
# writes fault again (1,000 scattered rows: 18.6 ms into clean pages, 0.16 ms
# into dirty ones): flushing seldom is much cheaper, and the log replays what a
# machine crash loses. The kernel's own writeback runs on a similar clock.
FLUSH_SECONDS = 30.0
FLUSH_RECORDS = 1024


@dataclass(frozen=True)
class State:
    head: int  # newest durable record
    applied: int  # newest record whose rows are in the tensor files (page cache)
    applying: int | None  # set while rows are being written
    flushed: int  # newest record whose rows are fsynced to disk
    boot: str  # boot id of the machine that last wrote the tensor files
    gen: int = 0  # bumped by every apply: readers compare it (a partial-sync chunk moves no offset)

    @property
    def settled(self) -> bool:
        """True when the tensor files hold exactly the model at head."""
        return self.applying is None and self.applied == self.head and (
            self.flushed == self.applied or self.boot == boot_id()
        )


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


def _marker_text() -> str:
    # The marker holds the read version, which every reader checks first: a
    # v1 or v2 reader refuses a marker above its own version. (Format 2 kept 1
    # here, so v1 readers opened it read-only; format 3 logs hold records they
    # cannot decode.)
    return f"deltalog replica\nformat {READ_VERSION}\n"


def _write_marker(path: str) -> None:
    """Replace the DELTALOG marker with this version's, durably: written aside, fsynced, renamed."""
    marker = os.path.join(path, MARKER)
    tmp = marker + ".upgrade-tmp"
    try:
        with open(tmp, "w") as f:
            f.write(_marker_text())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, marker)
        tensorfiles.fsync_dir(path)
    except OSError as exc:
        raise StorageError(f"{path}: cannot upgrade the {MARKER} marker: {exc.strerror or exc}") from None


def check_marker(path: str) -> None:
    """NotAReplica / UnsupportedVersion unless ``path`` holds a replica we can read."""
    marker = os.path.join(path, MARKER)
    if not os.path.isdir(path):
        raise NotAReplica(f"{path}: no such replica directory", hint="create one with 'deltalog init'")
    try:
        with open(marker) as f:
            lines = f.read(256).splitlines()
    except FileNotFoundError:
        raise NotAReplica(f"{path}: not a deltalog replica (no {MARKER} file)", hint="create one with 'deltalog init'") from None
    if not lines or lines[0] != "deltalog replica" or len(lines) < 2 or not lines[1].startswith("format "):
        raise IntegrityError(f"{path}: damaged {MARKER} marker file")
    try:
        version = int(lines[1].split()[1])
    except (IndexError, ValueError):
        raise IntegrityError(f"{path}: damaged {MARKER} marker file") from None
    if version > FORMAT_VERSION:  # the marker holds the replica's read version
        raise UnsupportedVersion(f"{path}: replica needs format v{version} to read, this deltalog reads up to v{FORMAT_VERSION}")


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
    prefix = _STAGING_PREFIX.format(name)
    try:
        entries = [e for e in os.listdir(parent) if e.startswith(prefix) and e[len(prefix):].isdigit()]
    except OSError:
        return
    for entry in entries:
        staging, pid = os.path.join(parent, entry), int(entry[len(prefix):])
        if pid == os.getpid() or _pid_alive(pid) or not os.path.isdir(staging):
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


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, as another user
        return True
    return True


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


def _check_state_meta(path: str, state, oldest) -> None:
    """IntegrityError unless meta/state and meta/oldest hold what :attr:`Replica.state` reads."""
    optional_ints = ("flushed", "gen")
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
        self._store = store
        self._lock = WriterLock(path)
        self._read_maps: dict[int, np.ndarray] = {}
        self._write_maps: dict[int, np.ndarray] = {}
        self._mapped: dict[str, tuple[int, int]] = {}  # path -> (st_dev, st_ino) of each file when mapped
        self._dirty: set[int] = set()  # tensor ids this handle wrote since its last flush (close() flushes then)
        self._dirty_since: float | None = None  # when this handle first wrote rows after its last flush
        with store.read() as txn:
            fmt = store.get_meta(txn, "format")
            model = store.get_meta(txn, "model")
        if fmt is None or model is None:
            raise IntegrityError(f"{path}: log holds no model metadata")
        _check_format_meta(path, fmt)
        if fmt["read_version"] > FORMAT_VERSION:
            raise UnsupportedVersion(f"{path}: replica needs format v{fmt['read_version']} to read")
        _check_model_meta(path, model)  # after the version check: a newer format may lay it out otherwise
        self._set_format(fmt)
        self.model_id: str = model["model_id"]
        self.bucket_rows: int = model["bucket_rows"]
        self.created: float = model.get("created", 0.0)
        self._tensors = [
            TensorInfo(i, t["name"], t["dtype"], tuple(t["shape"])) for i, t in enumerate(model["tensors"])
        ]
        self._by_name = {t.name: t for t in self._tensors}
        self._check_head()

    def _set_format(self, fmt: dict) -> None:
        self.format_version: int = fmt["write_version"]
        self._writable_format = fmt["write_version"] <= FORMAT_VERSION
        self._digests = fmt["write_version"] >= DIGEST_VERSION  # tensors/NNNNN.digest exist and are kept
        # The encoding of the records this handle writes: v2 only once meta/format
        # (written after the marker) says that every reader able to open the replica decodes it.
        self.record_encoding: int = 2 if fmt["write_version"] >= RECORD_V2_VERSION else 1

    @property
    def has_row_digests(self) -> bool:
        """Whether this replica keeps tensors/NNNNN.digest (format v2 and later; a v1 replica until its first write)."""
        return self._digests

    def _refresh_format(self) -> None:
        """Re-read meta/format (lock held): another process may have upgraded the replica since open."""
        with self._store.read() as txn:
            fmt = self._store.get_meta(txn, "format")
        _check_format_meta(self.path, fmt)
        if fmt["write_version"] != self.format_version:
            self._set_format(fmt)

    def _upgrade_format(self) -> None:
        """Format 1 or 2 -> 3 (lock held, tensors settled), each step durable before the next:

        1. from format 1: every row digest file, fsynced;
        2. the DELTALOG marker says ``format 3``: from here v1 and v2 deltalog refuse to open the replica;
        3. meta/format = {3, 3}, one transaction: only then does a handle write v2 records.

        Idempotent: a crash before step 2 leaves the old format (a format 1
        replica ignores digest files); one between 2 and 3 leaves a replica
        that only this version opens, still of the old format, which its next
        writer upgrades again. So no reader ever meets a record it cannot decode.
        """
        if self.format_version >= FORMAT_VERSION or not self._writable_format:
            return
        if not self._digests:
            tensor_dir = os.path.join(self.path, tensorfiles.TENSOR_DIR)
            for info in self._tensors:
                tensorfiles.write_digest_file(self._digest_path(info), self._writable(info))
            tensorfiles.fsync_dir(tensor_dir)
        _write_marker(self.path)
        fmt = {"write_version": FORMAT_VERSION, "read_version": READ_VERSION}
        self._store.write(lambda txn: self._store.put_meta(txn, "format", fmt))
        self._set_format(fmt)

    def _check_head(self) -> None:
        """IntegrityError unless meta/state is well formed and its head is the log's last
        record (or the oldest offset, when the log holds no record after it).

        Every writer moves the head and the records in one transaction
        (commit, sync, a reverted sync, compaction, a rebase onto a
        snapshot), so a disagreement is damage: trusting the head would
        label the model at one offset as another. It costs one cursor step.
        """
        with self._store.read() as txn:
            state = self._store.get_meta(txn, "state")
            oldest = self._store.get_meta(txn, "oldest", 0)
            last = self._store.last_offset(txn)
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
    ) -> "Replica":
        """Create a replica at ``path`` holding ``tensors`` at offset 0.

        ``tensors`` maps names to arrays (or CheckpointTensor / (array, dtype)).
        The replica is built beside ``path`` and renamed into place, so a
        crash leaves either nothing or a complete replica.
        """
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
            manifest = tensorfiles.write_snapshot(tmp, 0, model_id, arrays)
            store = LogStore.create(os.path.join(tmp, LOG_DIR))
            try:
                def setup(txn):
                    store.put_meta(txn, "format", {"write_version": FORMAT_VERSION, "read_version": READ_VERSION})
                    store.put_meta(
                        txn,
                        "model",
                        {
                            "model_id": model_id,
                            "bucket_rows": int(bucket_rows),
                            "tensors": [i.to_meta() for i in infos],
                            "created": time.time(),
                        },
                    )
                    store.put_meta(
                        txn, "state", {"head": 0, "applied": 0, "applying": None, "flushed": 0, "boot": boot_id()}
                    )
                    store.put_meta(txn, "oldest", 0)
                    store.put_snapshot(txn, manifest)

                store.write(setup)
            finally:
                store.close()
            with open(os.path.join(tmp, MARKER), "w") as f:
                f.write(_marker_text())
                f.flush()
                os.fsync(f.fileno())
            tensorfiles.fsync_dir(tmp)
            if os.path.isdir(path):
                os.rmdir(path)  # empty, checked above
            os.rename(tmp, path)
            tensorfiles.fsync_dir(parent)
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
        check_marker(path)
        store = LogStore(os.path.join(path, LOG_DIR))
        try:
            replica = cls(path, store)
        except BaseException:
            store.close()
            raise
        try:
            replica._repair_if_abandoned()
        except BaseException:
            replica.close()
            raise
        return replica

    def close(self) -> None:
        if self._dirty and self._lock.try_acquire():
            try:
                self.flush()
            finally:
                self._lock.release()
        self._read_maps.clear()
        self._write_maps.clear()
        self._lock.release()
        self._store.close()

    def __enter__(self) -> "Replica":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- reading --------------------------------------------------------------

    @property
    def state(self) -> State:
        with self._store.read() as txn:
            s = self._store.get_meta(txn, "state")
        return State(
            s["head"], s["applied"], s.get("applying"), s.get("flushed", s["applied"]), s.get("boot", ""), s.get("gen", 0)
        )

    def _put_state(self, txn, **changes) -> None:
        state = self._store.get_meta(txn, "state")
        state.setdefault("flushed", state["applied"])
        state.update(changes)
        self._store.put_meta(txn, "state", state)

    @property
    def head(self) -> int:
        """Newest durable offset."""
        return self.state.head

    @property
    def oldest_offset(self) -> int:
        with self._store.read() as txn:
            return self._store.get_meta(txn, "oldest", 0)

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

    def _tensor_path(self, info: TensorInfo) -> str:
        return os.path.join(self.path, tensorfiles.TENSOR_DIR, info.file)

    def _digest_path(self, info: TensorInfo) -> str:
        return os.path.join(self.path, tensorfiles.TENSOR_DIR, info.digest_file)

    def _digest_map(self, info: TensorInfo, writable: bool) -> np.ndarray:
        """(rows,) u64 map of a tensor's row digests; cached beside the row maps, under key ~id."""
        maps = self._write_maps if writable else self._read_maps
        view = maps.get(~info.id)
        if view is None:
            view = maps[~info.id] = tensorfiles.map_digests(self._digest_path(info), info, writable=writable)
            self._note_mapped(self._digest_path(info))
        return view

    def _check_digests(self, name: str, idx: np.ndarray, digests: np.ndarray, stored: np.ndarray) -> None:
        """IntegrityError naming the first of rows ``idx`` whose computed digest is not the ``stored`` one."""
        bad = np.flatnonzero(digests != stored)
        if len(bad):
            raise self.digest_error(name, int(idx[bad[0]]))

    def _gather_old(self, info: TensorInfo, idx: np.ndarray) -> np.ndarray:
        """A checked copy of rows ``idx`` of the tensor file (lock held): values a record will keep as undo values."""
        values, digests = kernels.gather_rows(self._writable(info), idx, digests=self._digests)
        if self._digests:
            self._check_digests(info.name, idx, digests, self._digest_map(info, writable=True)[idx])
        return values

    def rows_view(self, name: str) -> np.ndarray:
        """Read-only (rows, row_elems) live view of a tensor's storage."""
        info = self.info(name)
        view = self._read_maps.get(info.id)
        if view is None:
            view = self._read_maps[info.id] = tensorfiles.map_rows(self._tensor_path(info), info, writable=False)
            self._note_mapped(self._tensor_path(info))
        return view

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
        from .history import head_values  # history builds on this module

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
            self._check_digests(name, idx, digests, stored)
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
                stored = self._digest_map(info, writable=False) if self._digests else None
                result = read(self.rows_view(name), stored)
                if self.state == before:
                    return before.head, result
            elif self._lock.try_acquire():  # the writer died mid-apply: repair
                try:
                    self._recover()
                    if not self._writable_format:
                        raise UnsupportedVersion(
                            f"{self.path}: a newer deltalog's writer died mid-write; open it with that version to repair it"
                        )
                finally:
                    self._lock.release()
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
        with self._store.read() as txn:
            return self._store.get_snapshots(txn)

    def record_blob(self, offset: int) -> bytes:
        """The encoded record at ``offset`` (a copy)."""
        with self._store.read() as txn:
            blob = self._store.get_record(txn, offset)
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
            with self._store.read() as txn:
                batch = []
                for offset, blob in self._store.iter_records(txn, after=after, upto=upto):
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
            with self._store.read() as txn:
                for n, (offset, view) in enumerate(self._store.iter_records(txn, after=since, upto=upto)):
                    yield offset, view
                    last = offset
                    if n + 1 == batch:
                        break
            if last is None:
                return
            since = last

    def iter_summaries(self, since: int = -1) -> Iterator[rec.RecordSummary]:
        """Headers of the records after ``since``, oldest first."""
        with self._store.read() as txn:
            for offset, blob in self._store.iter_records(txn, after=since):
                yield rec.summarize(blob, f"{self.path}: record {offset}")

    def bucket_index(self, name: str) -> dict[int, tuple[int, float]]:
        """bucket -> (version, significance) for every bucket ever touched."""
        info = self.info(name)
        with self._store.read() as txn:
            return {b: (v, s) for b, v, s in self._store.get_buckets(txn, info.id)}

    # -- writing ----------------------------------------------------------------

    @contextmanager
    def writing(self, wait: float = 0.0, upgrade: bool = True) -> Iterator[None]:
        """Hold the writer lock, with the tensors brought up to the log's head.

        An older replica (format 1 or 2) is upgraded to the current format
        first (see _upgrade_format), unless ``upgrade`` is False (verify: it only reads).
        """
        if not self._writable_format:
            raise UnsupportedVersion(f"{self.path}: written by a newer deltalog; opened read-only")
        if self._lock.held:  # re-entrant within one Replica
            yield
            return
        self._lock.acquire(wait)
        try:
            self._recover()  # re-reads meta/format first: another process may have upgraded it
            if not self._writable_format:
                raise UnsupportedVersion(f"{self.path}: written by a newer deltalog; opened read-only")
            if upgrade:
                self._upgrade_format()
            yield
        finally:
            self._lock.release()

    def commit(self, updates: Mapping[str, tuple], wait: float = 0.0) -> int:
        """Append one record with new values for some rows; returns the new head.

        ``updates`` maps tensor name -> (row_indices, values), values shaped
        (k, *shape[1:]) or (k, row_elems) in the tensor's dtype. Rows whose
        values do not change are left out; a commit that changes nothing
        appends nothing and returns the current head. If an index repeats,
        its last value wins.
        """
        deltas = [self._check_update(name, rows, values) for name, (rows, values) in updates.items()]
        with self.writing(wait):
            return self._append("commit", deltas, drop_unchanged=True)

    def commit_checkpoint(self, tensors: Mapping, metadata: Mapping[str, str] | None = None, wait: float = 0.0) -> int:
        """Append one record holding the rows where a full checkpoint differs from head."""
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
            for name, _dtype, array in items:
                info = self.info(name)
                rows, values = self._changed_rows(info, array.reshape(info.rows, info.row_elems))
                if len(rows):
                    deltas.append((info, rows, values))
            return self._append("commit", deltas, drop_unchanged=False)

    def _changed_rows(self, info: TensorInfo, new: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Rows where ``new`` differs bitwise from the tensor file, in bounded chunks."""
        current = self._writable(info)
        step = max(1, _COMPARE_CHUNK_BYTES // max(1, info.row_bytes))
        found_rows, found_values = [], []
        for start in range(0, info.rows, step):
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
        # Sort and keep the last value of a repeated index.
        rows = rows.astype(np.uint64)
        order = np.argsort(rows, kind="stable")
        rows, values = rows[order], values[order]
        if k > 1:
            last = np.append(rows[1:] != rows[:-1], True)
            rows, values = rows[last], values[last]
        return info, rows, np.ascontiguousarray(values)

    def _writable(self, info: TensorInfo) -> np.ndarray:
        view = self._write_maps.get(info.id)
        if view is None:
            view = self._write_maps[info.id] = tensorfiles.map_rows(self._tensor_path(info), info, writable=True)
            self._note_mapped(self._tensor_path(info))
        return view

    def _note_mapped(self, path: str) -> None:
        try:
            st = os.stat(path)
        except OSError:
            return
        self._mapped[path] = (st.st_dev, st.st_ino)

    def _drop_replaced_maps(self) -> None:
        """Forget every memory map if a mapped file was renamed over since (lock held; a stat per file).

        ``replay --in-place`` in another process replaces a damaged tensor
        file or only its digest file; a long-lived handle (a training job,
        a follower between rounds) must not go on writing into the old inode.
        """
        for path, ident in self._mapped.items():
            try:
                st = os.stat(path)
            except OSError:
                st = None
            if st is None or (st.st_dev, st.st_ino) != ident:
                self.reload_tensor_files()
                return

    def append_record(
        self,
        kind: str,
        updates: Mapping[str, tuple],
        *,
        offset: int | None = None,
        reason: str | None = None,
        target: int | None = None,
        row_versions: Mapping[str, np.ndarray] | None = None,
        drop_unchanged: bool = False,
    ) -> int:
        """Log and apply one record of ``kind`` ('rollback', 'sync', ...); the caller holds :meth:`writing`.

        ``updates`` maps name -> (rows, values) as for :meth:`commit`.
        ``offset`` defaults to head + 1; a sync passes the source's offset
        (it must exceed the head). ``row_versions`` gives, per tensor, the
        offset that last wrote each row (aligned with the sorted, de-duplicated
        rows), which sets bucket versions to match the source's exactly.
        """
        if not self._lock.held:
            raise DeltalogError("append_record needs the writer lock: call it inside Replica.writing()")
        deltas = [self._check_update(name, rows, values) for name, (rows, values) in updates.items()]
        return self._append(kind, deltas, drop_unchanged, reason, target, offset, row_versions)

    def _append(
        self,
        kind: str,
        deltas: list[tuple[TensorInfo, np.ndarray, np.ndarray]],
        drop_unchanged: bool,
        reason: str | None = None,
        target: int | None = None,
        offset: int | None = None,
        row_versions: Mapping[str, np.ndarray] | None = None,
    ) -> int:
        """Log, then apply, one record built from (info, sorted rows, new values). Lock held."""
        state = self.state
        self._refuse_if_pending_sync()
        offset = state.head + 1 if offset is None else int(offset)
        if offset <= state.head:
            raise InvalidInput(f"{self.path}: offset {offset} is not after the head {state.head}")
        tensor_deltas = []
        for info, rows, new in deltas:
            versions = None if row_versions is None else row_versions.get(info.name)
            if versions is not None:
                versions = np.asarray(versions, dtype=np.uint64)
                if versions.shape != rows.shape:
                    raise InvalidInput(f"tensor {info.name!r}: {len(versions)} row versions for {len(rows)} rows")
            idx = rows.astype(np.intp)
            old = self._gather_old(info, idx)  # checked against the row digests: these become undo values
            if drop_unchanged:
                keep = rows_differ(old, new)
                if not keep.all():
                    rows, new, old = rows[keep], new[keep], old[keep]
                    versions = None if versions is None else versions[keep]
            if len(rows) == 0:
                continue
            row_sig = _row_significance(old, new, info.dtype)
            tensor_deltas.append(
                (info, rec.TensorDelta(info.name, info.dtype, rows, new, old, versions, float(row_sig.sum())), row_sig)
            )
        if not tensor_deltas and kind == "commit":
            return state.head
        record = rec.Record(
            offset=offset,
            base=state.head,
            kind=kind,
            time=time.time(),
            model_id=self.model_id,
            tensors=[d for _i, d, _s in tensor_deltas],
            reason=reason,
            target=target,
        )
        blob = rec.encode(record, self.record_encoding)

        def log_it(txn):
            self._store.put_record(txn, offset, blob)
            for info, delta, row_sig in tensor_deltas:
                self._bump_buckets(txn, info, delta.rows, row_sig, offset, delta.versions)
            self._put_state(txn, head=offset, applying=offset)

        self._store.write(log_it)
        self._apply(record)
        self._set_applied(offset)
        # A WAL checkpoint once the oldest unflushed write is FLUSH_SECONDS old (not
        # "a second since the last flush"): one long operation, such as a rollback of
        # many records, returns once its record is durable instead of also waiting
        # for the fsync of every page it just wrote.
        if not boot_id() or time.monotonic() - (self._dirty_since or time.monotonic()) > FLUSH_SECONDS or (
            offset - self.state.flushed >= FLUSH_RECORDS
        ):
            self.flush()
        return offset

    def _bump_buckets(
        self, txn, info: TensorInfo, rows: np.ndarray, row_sig: np.ndarray, offset: int, row_versions: np.ndarray | None
    ) -> None:
        """Set each touched bucket's version (the newest offset that wrote a row in it) and add its significance."""
        buckets = (rows // np.uint64(self.bucket_rows)).astype(np.int64)
        starts = np.flatnonzero(np.r_[True, buckets[1:] != buckets[:-1]])
        if not len(starts):
            return
        sums = np.add.reduceat(row_sig, starts)
        if row_versions is None:
            versions = np.full(len(starts), offset, dtype=np.uint64)
        else:
            versions = np.maximum.reduceat(np.asarray(row_versions, dtype=np.uint64), starts)
        self._store.bump_buckets(txn, info.id, buckets[starts], versions, sums)

    def _apply(self, record: rec.Record) -> None:
        """Write a record's new values into the tensor files (the page cache; see flush())."""
        for delta in record.tensors:
            info = self.info(delta.name)
            idx = delta.rows.astype(np.intp)
            digests = self._digest_map(info, writable=True) if self._digests else None  # a missing file fails before any write
            self._writable(info)[idx] = delta.new
            if digests is not None:
                digests[idx] = kernels.row_digests(delta.new)
            self._dirty.add(info.id)
        if self._dirty_since is None:
            self._dirty_since = time.monotonic()

    def flush(self) -> None:
        """fsync the tensor files and record that they are durable up to ``applied`` (lock held).

        Every file, not only those this handle wrote: an earlier writer that
        was killed may have left pages of other files unsynced. The row
        digest files go with them.
        """
        try:
            for info in self._tensors:
                paths = [self._tensor_path(info)] if info.nbytes else []
                if self._digests and info.rows:
                    paths.append(self._digest_path(info))
                for path in paths:
                    fd = os.open(path, os.O_RDONLY)
                    try:
                        os.fsync(fd)  # all dirty pages of the file, whichever mapping wrote them
                    finally:
                        os.close(fd)
        except OSError as exc:
            raise StorageError(f"{self.path}: cannot write tensor files: {exc.strerror}") from None
        self._dirty.clear()
        self._dirty_since = None
        self._store.write(lambda txn: self._put_state(txn, flushed=self._store.get_meta(txn, "state")["applied"]))

    def _set_applied(self, offset: int) -> None:
        def mark(txn):
            gen = self._store.get_meta(txn, "state").get("gen", 0) + 1
            self._put_state(txn, applied=offset, applying=None, boot=boot_id(), gen=gen)

        self._store.write(mark)

    def _recover(self) -> None:
        """Re-apply records the tensor files may lack (lock held; idempotent).

        After a kill -9 that is (applied, head]; after a machine crash the
        page cache is gone too, so it is (flushed, head].
        """
        self._drop_replaced_maps()  # files replaced by a replay --in-place elsewhere: map the new ones
        self._refresh_format()  # this handle may predate an upgrade: write digests if the replica has them
        if not self._writable_format:
            return  # a newer deltalog's replica: only its writers may repair it
        state = self.state
        if state.settled:
            return
        start = state.applied if state.boot == boot_id() and boot_id() else min(state.applied, state.flushed)
        with self._store.read() as txn:
            for offset, blob in self._store.iter_records(txn, after=start, upto=state.head):
                self._apply(rec.decode(blob, f"{self.path}: record {offset}", with_old=False))
        self._recover_sync_state()
        self._set_applied(self.state.head)  # re-read: finishing a sync revert moves the head back
        self.flush()

    def _repair_if_abandoned(self) -> None:
        """On open: if a writer died mid-way and nobody holds the lock, finish its work."""
        state = self.state
        if not state.settled and self._writable_format:
            if self._lock.try_acquire():
                try:
                    self._recover()
                finally:
                    self._lock.release()

    # -- partial sync (deltalog.sync owns these meta keys: sync.pending, sync.chunk.N, sync.restore, follow)

    def pending_sync(self) -> dict | None:
        """The pending partial sync (meta "sync.pending"), or None."""
        with self._store.read() as txn:
            return self._store.get_meta(txn, "sync.pending")

    def _refuse_if_pending_sync(self) -> None:
        pending = self.pending_sync()
        if pending is not None:
            raise InvalidInput(
                f"{self.path}: a partial sync to offset {pending['target']} is pending",
                hint="complete it with 'deltalog sync' from its source before writing here",
            )

    def _recover_sync_state(self) -> None:
        """Finish sync work a crash interrupted (lock held; idempotent): the file copy
        of a snapshot restore, and the rows of pending partial-sync chunks."""
        with self._store.read() as txn:
            restoring = self._store.get_meta(txn, "sync.restore")
            pending = self._store.get_meta(txn, "sync.pending")
        if restoring is not None:
            from .sync import copy_snapshot_into_tensors  # sync imports this module

            manifest = next(m for m in self.snapshots() if m["offset"] == restoring)
            self._write_maps.clear()
            self._read_maps.clear()
            copy_snapshot_into_tensors(self.path, manifest)
            self._store.write(lambda txn: txn.delete(b"sync.restore", db=self._store.dbs["meta"]))
        with self._store.read() as txn:
            reverting = self._store.get_meta(txn, "sync.revert")
        if reverting is not None:
            from .guard import finish_revert  # guard imports this module

            finish_revert(self, reverting)
        for n in range(pending["chunks"] if pending else 0):
            with self._store.read() as txn:
                blob = self._store.get_meta(txn, f"sync.chunk.{n:08d}")
            if blob is None:
                raise IntegrityError(f"{self.path}: pending sync chunk {n} is missing")
            self._apply(rec.decode(blob, f"{self.path}: pending sync chunk {n}", with_old=False))

    def _sync_status(self) -> dict:
        """status() fields of a follower (source, lag) and of a partial sync (pending_buckets)."""
        with self._store.read() as txn:
            follow = self._store.get_meta(txn, "follow")
            pending = self._store.get_meta(txn, "sync.pending")
        out: dict = {}
        if follow:
            in_sync_at = follow.get("in_sync_at")
            out.update(
                source=follow.get("source"),
                source_head=follow.get("source_head"),
                lag_offsets=max(0, int(follow.get("source_head") or 0) - self.head),
                lag_seconds=None if in_sync_at is None else round(max(0.0, time.time() - in_sync_at), 3),
                last_sync=follow.get("synced_at"),
            )
        if pending:
            out.update(
                pending_buckets=sum(len(b["b"]) for b in pending["buckets"].values()),
                pending_target=pending["target"],
            )
        return out

    @property
    def store(self) -> LogStore:
        """The LMDB store, for operation modules (compact, sync); writes need :meth:`writing`."""
        return self._store

    def make_snapshot(self) -> dict:
        """Write an immutable snapshot of the tensors at head and register it (lock held)."""
        if not self._lock.held:
            raise DeltalogError("make_snapshot needs the writer lock: call it inside Replica.writing()")
        head = self.head
        if self._digests:  # a snapshot is checksummed whole: check its rows before they are sealed in it
            for t in self._tensors:
                stored = self._digest_map(t, writable=True)
                for start, digests in tensorfiles.digest_blocks(self._writable(t)):
                    bad = np.flatnonzero(digests != stored[start : start + len(digests)])
                    if len(bad):
                        raise self.digest_error(t.name, start + int(bad[0]))
        manifest = tensorfiles.write_snapshot(
            self.path, head, self.model_id, [(t, self._writable(t)) for t in self._tensors]
        )
        self._store.write(lambda txn: self._store.put_snapshot(txn, manifest))
        return manifest

    def reload_tensor_files(self) -> None:
        """Forget cached memory maps after tensor files were replaced (replay --in-place renames over them)."""
        self._read_maps.clear()
        self._write_maps.clear()
        self._mapped.clear()

    # -- reports ------------------------------------------------------------------

    def status(self) -> dict:
        state = self.state
        return {
            "path": os.path.abspath(self.path),
            "head": state.head,
            "model_id": self.model_id,
            "format_version": self.format_version,
            "oldest_offset": self.oldest_offset,
            "bucket_rows": self.bucket_rows,
            "pending_apply": state.head - state.applied if state.applied != state.head else 0,
            "log_bytes": self._store.usage_bytes(),
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


def _row_significance(old: np.ndarray, new: np.ndarray, dtype: str) -> np.ndarray:
    """Per row: sum |new - old|, accumulated in float64; NaN counts 0, infinities are capped."""
    if dtype == "bool":
        return np.count_nonzero(old != new, axis=1).astype(np.float64)
    with np.errstate(invalid="ignore", over="ignore"):  # NaN/inf payloads are legal values
        # Narrow floats subtract in float32 (exact for float16/bfloat16 inputs, and
        # what float32 training sees); float64 and integers in float64.
        delta = np.abs(as_float(new, dtype) - as_float(old, dtype))
        sums = delta.sum(axis=1, dtype=np.float64)
    bad = ~np.isfinite(sums)
    if bad.any():  # rare: redo only the rows that hold NaN or inf
        cap = 1e300 if delta.dtype == np.float64 else np.finfo(np.float32).max  # sums of caps stay finite
        fixed = np.nan_to_num(delta[bad], nan=0.0, posinf=cap, neginf=0.0)
        sums[bad] = fixed.sum(axis=1, dtype=np.float64)
    return sums
