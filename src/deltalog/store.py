"""The replica's LMDB environment: metadata, the record log, the bucket index.

Named databases (formats/FORMAT.md lists every key):

    meta       short ASCII keys -> msgpack values (format, model, state, ...)
    records    u64 big-endian offset -> encoded record (deltalog.record)
    buckets    u32 tensor id + u64 bucket, big-endian -> (u64 version, f64 significance)
    snapshots  u64 big-endian offset -> msgpack snapshot manifest

Big-endian integer keys sort numerically under LMDB's bytewise order, so a
cursor walks the log in offset order.

py-lmdb allows one Environment per path per process, so environments are
shared through a reference-counted registry. Write transactions retry after
growing the map when it is full, and adopt a map another process grew.
"""

from __future__ import annotations

import errno
import os
import struct
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import lmdb
import numpy as np

from . import lineage
from .errors import IntegrityError, StorageError
from .lmdbfile import check_data_file
from .record import pack, unpack

T = TypeVar("T")

DB_NAMES = (b"meta", b"records", b"buckets", b"snapshots")
INITIAL_MAP_SIZE = 1 << 36  # 64 GiB of address space; the file stays as small as its data
_OFFSET = struct.Struct(">Q")
_BUCKET_KEY = struct.Struct(">IQ")
_BUCKET_VALUE = struct.Struct(">Qd")
_BUCKET_KEY_DTYPE = np.dtype([("tensor", ">u4"), ("bucket", ">u8")])  # the same layouts, for arrays of them
_BUCKET_VALUE_DTYPE = np.dtype([("version", ">u8"), ("significance", ">f8")])

PAST_DIGESTS_KEPT = 1 << 20  # meta/past_digests keeps the newest this many (16 MiB of offsets and digests)
_PAST_DIGESTS_KEY = "past_digests"

_FULL_DISK_BYTES = 16 << 20  # below this much free space an EIO from a write is taken for a full disk


class _DamagedEntry(Exception):
    """A key or value of the wrong length in the log (LogStore.read/write name the replica)."""


# What a damaged log raises: LMDB checksums nothing, but it checks page types
# and page numbers; our fixed-size keys and values check their lengths.
_DAMAGE_ERRORS = (lmdb.CorruptedError, lmdb.PageNotFoundError, _DamagedEntry)

_registry: dict[str, list] = {}  # realpath -> [Environment, refcount, {name: database handle}]
_registry_lock = threading.Lock()


_BIN_HEADER = {0xC4: 2, 0xC5: 3, 0xC6: 5}  # msgpack bin 8/16/32: marker -> where the bytes start


def packed_bytes(parts: list) -> bytes:
    """What pack() makes of ``b"".join(parts)`` (a msgpack bin), joined once: a stored pending
    sync chunk is a large bytes value, and its pieces need not be joined twice."""
    n = sum(memoryview(p).nbytes for p in parts)
    if n < 1 << 8:
        header = bytes((0xC4, n))
    elif n < 1 << 16:
        header = b"\xc5" + n.to_bytes(2, "big")
    elif n < 1 << 32:
        header = b"\xc6" + n.to_bytes(4, "big")
    else:
        raise ValueError("a msgpack bin holds at most 4 GiB")
    return b"".join([header, *parts])


def offset_key(offset: int) -> bytes:
    return _OFFSET.pack(offset)


def key_offset(key) -> int:
    return _unpack(_OFFSET, key, "record key")[0]


def _unpack(layout: struct.Struct, raw, what: str) -> tuple:
    raw = bytes(raw)
    if len(raw) != layout.size:
        raise _DamagedEntry(f"a {what} of {len(raw)} bytes, not {layout.size}")
    return layout.unpack(raw)


def bucket_key(tensor_id: int, bucket: int) -> bytes:
    return _BUCKET_KEY.pack(tensor_id, bucket)


def _acquire_env(path: str) -> tuple[lmdb.Environment, dict]:
    """The shared environment of ``path`` and its named database handles (opened once per environment).

    The handles are opened here, before the environment is published, and
    reused by every later LogStore: ``open_db`` runs a write transaction
    while holding the GIL, so calling it while another thread of this
    process holds a write transaction on the environment (a commit while a
    reader opens the replica) would deadlock.
    """
    real = os.path.realpath(path)
    with _registry_lock:
        entry = _registry.get(real)
        if entry is None:
            check_data_file(real)  # a truncated file would kill us with SIGBUS once mapped
            env = _open_env(path, real)
            try:
                with env.begin(write=False) as txn:
                    missing = [n for n in DB_NAMES if txn.get(n) is None]
                if missing:
                    # Only init creates databases; a reader must not write.
                    raise IntegrityError(f"{path}: log is missing databases {[m.decode() for m in missing]}")
                dbs = {n.decode(): env.open_db(n, create=False) for n in DB_NAMES}
            except lmdb.Error as exc:
                env.close()
                raise IntegrityError(f"{path}: cannot open the log ({exc})") from None
            except BaseException:
                env.close()
                raise
            entry = _registry[real] = [env, 0, dbs]
        entry[1] += 1
        return entry[0], entry[2]


def _open_env(path: str, real: str) -> lmdb.Environment:
    """The environment at ``real``, read-write, or read-only when this user may not write it.

    A replica another user owns is still readable when its ``lock.mdb`` is
    writable: LMDB's readers need write access only to that file (their
    slot in its table of readers, which keeps a writer from reusing the
    pages they read). On a read-only mount LMDB would skip that table, and
    a writer elsewhere could then change the pages under the reader, so
    that is refused.
    """
    options = dict(map_size=INITIAL_MAP_SIZE, max_dbs=len(DB_NAMES), subdir=True, create=False, max_readers=256)
    try:
        return lmdb.open(real, **options)
    except lmdb.Error as exc:
        if "Read-only file system" in str(exc):
            raise StorageError(f"{path}: on a read-only file system, where LMDB's readers cannot register "
                               f"(a writer elsewhere could change what they read)",
                               hint="mount it read-write, or read a copy made with cp -a") from None
        if not _denied(exc):
            raise IntegrityError(f"{path}: cannot open the log ({exc})") from None
    try:
        return lmdb.open(real, readonly=True, **options)
    except lmdb.Error as exc:
        if _denied(exc):
            lock = os.path.join(path, "lock.mdb")
            raise StorageError(f"{path}: cannot open the log: permission denied",
                               hint=f"a reader needs write access to {lock}, LMDB's table of readers") from None
        raise IntegrityError(f"{path}: cannot open the log ({exc})") from None


def _denied(exc: lmdb.Error) -> bool:
    """Whether LMDB failed for want of permission (py-lmdb reports EACCES as ReadonlyError)."""
    return isinstance(exc, lmdb.ReadonlyError) or "Permission denied" in str(exc)


def _release_env(path: str) -> None:
    real = os.path.realpath(path)
    with _registry_lock:
        entry = _registry.get(real)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            entry[0].close()
            del _registry[real]


_CACHED_BUCKETS_MAX = 1 << 22  # buckets per tensor (9 bytes each): a larger one is read entry by entry


def _bucket_keys(tensor_id: int, buckets: np.ndarray) -> list[bytes]:
    keys = np.empty(len(buckets), dtype=_BUCKET_KEY_DTYPE)
    keys["tensor"] = tensor_id
    keys["bucket"] = buckets
    return keys.view(f"V{_BUCKET_KEY.size}").tolist()


class _BucketTable:
    """One tensor's cached bucket entries, by bucket number: whether it is known (every bucket
    a bump wrote has an entry) and its significance (a bump replaces the version: not kept)."""

    def __init__(self, size: int):
        self.known = np.zeros(size, dtype=bool)
        self.significance = np.zeros(size, dtype=np.float64)

    def grown(self, size: int) -> "_BucketTable":
        bigger = _BucketTable(max(size, 2 * len(self.known)))
        bigger.known[: len(self.known)] = self.known
        bigger.significance[: len(self.known)] = self.significance
        return bigger


class _BucketCache:
    """The bucket entries this handle's bumps read or wrote, kept for its next commits.

    A training step touches thousands of buckets, and a get per bucket was a
    fifth of a commit's time. The cache is trusted only while it is
    provably the table's state: ``as_of`` is LMDB's id of the last committed
    transaction, read right after this handle's own commit while its writer
    held the lock (so nobody else could commit in between), and the first
    bump of a transaction uses the cache only when that transaction's id
    follows ``as_of``. Any commit since, by any process or any version of
    deltalog, moved LMDB's id on and empties the cache. Every change of the
    table but a bump (a put, a delete, a clear) and every transaction that
    does not commit empties it too.
    """

    def __init__(self):
        self.as_of: int | None = None
        self.tables: dict[int, _BucketTable] = {}
        self.txn_id: int | None = None  # the transaction the cache was last checked for

    def forget(self) -> None:
        self.as_of, self.txn_id = None, None
        self.tables.clear()

    def table(self, txn, tensor_id: int, size: int) -> _BucketTable | None:
        """The cached entries of ``tensor_id`` (at least ``size`` of them), checked current for ``txn``."""
        txn_id = txn.id()
        if txn_id != self.txn_id:
            if self.as_of is None or txn_id != self.as_of + 1:
                self.tables.clear()
            self.txn_id = txn_id
        if size > _CACHED_BUCKETS_MAX:
            return None
        table = self.tables.get(tensor_id)
        if table is None:
            table = self.tables[tensor_id] = _BucketTable(size)
        elif len(table.known) < size:
            table = self.tables[tensor_id] = table.grown(size)
        return table


class LogStore:
    """Transactions over one replica's LMDB environment."""

    def __init__(self, path: str):
        self.path = path
        self.env, self.dbs = _acquire_env(path)
        self._closed = False
        self._buckets = _BucketCache()
        # Set by the replica's writer: whether it holds the writer lock, without which no
        # deltalog commits (the bucket cache is kept only across commits made holding it).
        self.writer_lock_held: Callable[[], bool] = lambda: False

    @classmethod
    def create(cls, path: str) -> "LogStore":
        os.makedirs(path, exist_ok=True)
        env = lmdb.open(path, map_size=INITIAL_MAP_SIZE, max_dbs=len(DB_NAMES), subdir=True)
        try:
            with env.begin(write=True) as txn:
                for name in DB_NAMES:
                    env.open_db(name, txn=txn, create=True)
        finally:
            env.close()
        return cls(path)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            _release_env(self.path)

    # -- transactions --------------------------------------------------------

    @contextmanager
    def read(self) -> Iterator[lmdb.Transaction]:
        try:
            txn = self.env.begin(write=False, buffers=True)
        except lmdb.MapResizedError:
            self.env.set_mapsize(0)
            txn = self.env.begin(write=False, buffers=True)
        try:
            yield txn
        except _DAMAGE_ERRORS as exc:
            raise self._damaged(exc) from None
        finally:
            txn.abort()

    def write(self, body: Callable[[lmdb.Transaction], T]) -> T:
        """Run ``body`` in a write transaction and commit it durably.

        ``body`` may run more than once (after the map grows), so it must
        only write through the transaction it is given. A failed commit
        leaves the log as it was (LMDB writes the meta page last).
        """
        while True:
            try:
                try:
                    with self.env.begin(write=True) as txn:
                        result = body(txn)
                except BaseException:
                    self._buckets.forget()  # it may hold entries of the transaction that did not commit
                    raise
                # Only the writer lock's holder knows that no other commit came in between.
                self._buckets.as_of = self.env.info()["last_txnid"] if self.writer_lock_held() else None
                return result
            except lmdb.MapFullError:
                self.env.set_mapsize(self.env.info()["map_size"] * 2)
            except lmdb.MapResizedError:
                self.env.set_mapsize(0)
            except _DAMAGE_ERRORS as exc:
                raise self._damaged(exc) from None
            except lmdb.Error as exc:
                storage = self._storage_error(exc)
                if storage is None:
                    raise
                raise storage from None

    def _damaged(self, exc: Exception) -> IntegrityError:
        return IntegrityError(f"{self.path}: the log is damaged ({exc})")

    def _storage_error(self, exc: lmdb.Error) -> StorageError | None:
        """The StorageError an OS-level LMDB failure means, or None for other errors (bugs)."""
        if self.env.flags().get("readonly"):  # opened read-only: this process may not write it (_open_env)
            return StorageError(f"{self.path}: cannot write the log: permission denied",
                                hint="run as a user that may write the replica")
        code = getattr(exc, "code", 0)
        if code in (errno.ENOSPC, errno.EDQUOT):
            return StorageError(f"{self.path}: disk full ({exc})", hint="free disk space and retry")
        if code == errno.EIO:
            # LMDB reports a short write as EIO, and a full disk is what
            # makes writes come up short; else it is the device failing.
            if self._free_bytes() < _FULL_DISK_BYTES:
                return StorageError(f"{self.path}: disk full (a log write came up short)", hint="free disk space and retry")
            return StorageError(f"{self.path}: I/O error writing the log ({exc})", hint="check the disk (dmesg)")
        if code in (errno.EACCES, errno.EPERM, errno.EROFS):
            return StorageError(f"{self.path}: cannot write the log ({exc})", hint="check permissions and mounts")
        return None

    def _free_bytes(self) -> int:
        try:
            st = os.statvfs(self.path)
        except OSError:
            return 0
        return st.f_bavail * st.f_frsize

    # -- typed accessors ------------------------------------------------------

    def get_meta(self, txn, key: str, default=None):
        raw = txn.get(key.encode(), db=self.dbs["meta"])
        if raw is None:
            return default
        return unpack(raw, f"{self.path}: meta {key}")

    def put_meta(self, txn, key: str, value) -> None:
        txn.put(key.encode(), pack(value), db=self.dbs["meta"])

    def get_meta_blob(self, txn, key: str) -> memoryview | None:
        """A meta value that is one bytes string (a pending sync chunk), as a view into
        ``txn``'s memory (LMDB's map): no copy, but valid only while ``txn`` is open."""
        raw = txn.get(key.encode(), db=self.dbs["meta"])
        if raw is None:
            return None
        view = memoryview(raw)
        start = _BIN_HEADER.get(view[0]) if len(view) else None
        if start is not None and start + int.from_bytes(view[1:start], "big") == len(view):
            return view[start:]
        value = unpack(raw, f"{self.path}: meta {key}")
        if not isinstance(value, bytes):
            raise IntegrityError(f"{self.path}: meta {key} is not a byte string")
        return memoryview(value)

    def put_meta_packed(self, txn, key: str, packed: bytes) -> None:
        """Store a value packed already (:func:`packed_bytes`)."""
        txn.put(key.encode(), packed, db=self.dbs["meta"])

    def delete_meta(self, txn, key: str) -> None:
        txn.delete(key.encode(), db=self.dbs["meta"])

    def get_record(self, txn, offset: int):
        """The encoded record at ``offset`` as a buffer valid inside ``txn``, or None."""
        return txn.get(offset_key(offset), db=self.dbs["records"])

    def put_record(self, txn, offset: int, blob: bytes) -> None:
        if not txn.put(offset_key(offset), blob, db=self.dbs["records"], overwrite=False):
            raise IntegrityError(f"{self.path}: a record already exists at offset {offset}")

    def delete_record(self, txn, offset: int) -> None:
        txn.delete(offset_key(offset), db=self.dbs["records"])

    def offset_at_or_before(self, txn, offset: int) -> int | None:
        """The newest record offset <= ``offset``, or None."""
        cursor = txn.cursor(db=self.dbs["records"])
        found = cursor.prev() if cursor.set_range(offset_key(offset + 1)) else cursor.last()
        return key_offset(cursor.key()) if found else None

    def offset_from_end(self, txn, back: int) -> int | None:
        """The offset of the record ``back`` records before the newest (0: the newest), or None."""
        cursor = txn.cursor(db=self.dbs["records"])
        if not cursor.last():
            return None
        for _ in range(back):
            if not cursor.prev():
                return None
        return key_offset(cursor.key())

    def last_offset(self, txn) -> int | None:
        """The offset of the newest record, or None when the log holds none."""
        cursor = txn.cursor(db=self.dbs["records"])
        return key_offset(cursor.key()) if cursor.last() else None

    def iter_records(self, txn, after: int = -1, upto: int | None = None) -> Iterator[tuple[int, memoryview]]:
        """(offset, blob) for records with after < offset <= upto, in order."""
        cursor = txn.cursor(db=self.dbs["records"])
        found = cursor.set_range(offset_key(after + 1)) if after >= 0 else cursor.first()
        while found:
            offset = key_offset(cursor.key())
            if upto is not None and offset > upto:
                break
            yield offset, cursor.value()
            found = cursor.next()

    def delete_records(self, txn, upto: int) -> int:
        """Delete records with offset <= upto; returns the bytes they held."""
        freed = 0
        cursor = txn.cursor(db=self.dbs["records"])
        found = cursor.first()
        # After deleting the last record, delete() returns True but leaves the cursor unpositioned (empty key).
        while found and cursor.key() and key_offset(cursor.key()) <= upto:
            freed += len(cursor.value())
            found = cursor.delete()
        return freed

    def get_buckets(self, txn, tensor_id: int) -> Iterator[tuple[int, int, float]]:
        """(bucket, version, significance) of every recorded bucket of a tensor."""
        cursor = txn.cursor(db=self.dbs["buckets"])
        found = cursor.set_range(bucket_key(tensor_id, 0))
        while found:
            tid, bucket = _unpack(_BUCKET_KEY, cursor.key(), "bucket key")
            if tid != tensor_id:
                break
            version, significance = _unpack(_BUCKET_VALUE, cursor.value(), "bucket entry")
            yield bucket, version, significance
            found = cursor.next()

    def get_bucket(self, txn, tensor_id: int, bucket: int) -> tuple[int, float] | None:
        raw = txn.get(bucket_key(tensor_id, bucket), db=self.dbs["buckets"])
        return None if raw is None else _unpack(_BUCKET_VALUE, raw, "bucket entry")

    # Every change of the bucket table but a bump forgets the cache (see _BucketCache).

    def put_bucket(self, txn, tensor_id: int, bucket: int, version: int, significance: float) -> None:
        self._buckets.forget()
        txn.put(bucket_key(tensor_id, bucket), _BUCKET_VALUE.pack(version, significance), db=self.dbs["buckets"])

    def delete_bucket(self, txn, tensor_id: int, bucket: int) -> None:
        self._buckets.forget()
        txn.delete(bucket_key(tensor_id, bucket), db=self.dbs["buckets"])

    def clear_buckets(self, txn) -> None:
        """Empty the bucket index (a replica rebased onto a snapshot starts it again)."""
        self._buckets.forget()
        txn.drop(self.dbs["buckets"], delete=False)

    def bump_buckets(self, txn, tensor_id: int, buckets: np.ndarray, versions: np.ndarray, added: np.ndarray) -> None:
        """Set the versions of many buckets of one tensor and add to their significance.

        ``buckets`` sorted and unique, ``versions`` and ``added`` aligned with
        them. A training step touches thousands of buckets, so the keys and
        values are cut from one array each (void views: bytes objects, trailing
        NULs kept) and written with one putmulti. The prior entries come from
        the cache of this handle's earlier bumps where it is current, else with
        a get per bucket.
        """
        if not len(buckets):
            return
        buckets = np.asarray(buckets, dtype=np.int64)
        table = self._buckets.table(txn, tensor_id, int(buckets[-1]) + 1)
        significance = np.asarray(added, dtype=np.float64).copy()
        if table is None:  # too large a tensor to cache
            present, prior = self._read_buckets(txn, tensor_id, buckets)
        else:
            present = table.known[buckets]
            prior = table.significance[buckets]
            unknown = np.flatnonzero(~present)
            if len(unknown):
                found, values = self._read_buckets(txn, tensor_id, buckets[unknown])
                present[unknown] = found
                prior[unknown] = values
        significance[present] += prior[present]
        values = np.empty(len(buckets), dtype=_BUCKET_VALUE_DTYPE)
        values["version"] = versions
        values["significance"] = significance
        cursor = txn.cursor(db=self.dbs["buckets"])
        cursor.putmulti(zip(_bucket_keys(tensor_id, buckets), values.view(f"V{_BUCKET_VALUE.size}").tolist()))
        if table is not None:  # what this transaction wrote (forgotten if it does not commit)
            table.known[buckets] = True
            table.significance[buckets] = significance

    def _read_buckets(self, txn, tensor_id: int, buckets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(whether each bucket has an entry, its significance or 0) for sorted ``buckets``."""
        get = txn.cursor(db=self.dbs["buckets"]).get  # a get per key: faster than getmulti, which builds a tuple per key
        prior = [get(key) for key in _bucket_keys(tensor_id, buckets)]
        present = np.fromiter((value is not None for value in prior), dtype=bool, count=len(prior))
        significance = np.zeros(len(buckets), dtype=np.float64)
        if present.any():
            raw = b"".join([value for value in prior if value is not None])
            if len(raw) != int(present.sum()) * _BUCKET_VALUE.size:
                raise _DamagedEntry("a bucket entry of the wrong length")
            significance[present] = np.frombuffer(raw, dtype=_BUCKET_VALUE_DTYPE)["significance"]
        return present, significance

    def get_snapshots(self, txn) -> list[dict]:
        cursor = txn.cursor(db=self.dbs["snapshots"])
        return [unpack(value, f"{self.path}: snapshot manifest {key_offset(key)}") for key, value in cursor]

    def snapshot_offsets(self, txn) -> list[int]:
        """The offsets of the registered snapshots, from the keys alone: what works on a log whose
        manifests are damaged (a rebase or compaction drops them, verify names them)."""
        cursor = txn.cursor(db=self.dbs["snapshots"])
        return [key_offset(key) for key in cursor.iternext(keys=True, values=False)]

    def get_snapshot(self, txn, offset: int) -> dict | None:
        """The manifest registered at ``offset`` (None: none); IntegrityError when it cannot be read."""
        raw = txn.get(offset_key(offset), db=self.dbs["snapshots"])
        return None if raw is None else unpack(raw, f"{self.path}: snapshot manifest {offset}")

    def put_snapshot(self, txn, manifest: dict) -> None:
        txn.put(offset_key(manifest["offset"]), pack(manifest), db=self.dbs["snapshots"])

    def delete_snapshot(self, txn, offset: int) -> None:
        txn.delete(offset_key(offset), db=self.dbs["snapshots"])

    # -- the state digests at offsets compaction dropped (formats/FORMAT.md, meta/past_digests) --

    def past_digests(self, txn) -> tuple[np.ndarray, np.ndarray]:
        """(offsets, state digests) of states whose records compaction dropped, offsets ascending.

        Empty when there are none, when the value is malformed (a digest
        that cannot be read proves nothing: a sync that needed it refuses),
        and when the log no longer starts where the value says it did: they
        were written for a log whose oldest offset and snapshot digest they
        name, and any other writer that replaced the log's base since (an
        older deltalog's compaction or reseed, which knew nothing of them)
        may have put another history there.
        """
        empty = np.empty(0, dtype=np.uint64)
        try:
            value = self.get_meta(txn, _PAST_DIGESTS_KEY)
            offsets = np.frombuffer(value["offsets"], dtype="<u8")
            digests = np.frombuffer(value["digests"], dtype="<u8")
            anchor = (value["oldest"], value["oldest_digest"])
        except (IntegrityError, TypeError, KeyError, ValueError):
            return empty, empty
        if len(offsets) != len(digests) or (len(offsets) > 1 and not np.all(offsets[1:] > offsets[:-1])):
            return empty, empty
        if anchor[1] is None or anchor != self._base(txn):
            return empty, empty
        return offsets.astype(np.uint64), digests.astype(np.uint64)

    def _base(self, txn) -> tuple[int, int | None] | None:
        """(oldest offset, the state digest of its snapshot) as the log holds them now."""
        try:
            oldest = self.get_meta(txn, "oldest", 0)
            manifest = self.get_snapshot(txn, oldest)
        except IntegrityError:
            return None
        return oldest, lineage.from_hex(manifest.get("state_digest") if isinstance(manifest, dict) else None)

    def add_past_digests(self, txn, offsets, digests, oldest: int, oldest_digest: int | None) -> None:
        """Keep the state digests of offsets whose records are being dropped (the newest
        PAST_DIGESTS_KEPT), for the log that starts, once this transaction commits, at ``oldest``
        with a snapshot of state digest ``oldest_digest`` (what :meth:`past_digests` checks)."""
        old_offsets, old_digests = self.past_digests(txn)  # read before the caller moves the base
        offsets = np.concatenate([old_offsets, np.asarray(offsets, dtype=np.uint64)])
        digests = np.concatenate([old_digests, np.asarray(digests, dtype=np.uint64)])
        # Sorted by offset; of an offset given twice, the digest added last is kept.
        order = np.lexsort((-np.arange(len(offsets)), offsets))
        offsets, digests = offsets[order], digests[order]
        first = np.r_[True, offsets[1:] != offsets[:-1]]
        offsets, digests = offsets[first][-PAST_DIGESTS_KEPT:], digests[first][-PAST_DIGESTS_KEPT:]
        self.put_meta(txn, _PAST_DIGESTS_KEY, {"offsets": offsets.astype("<u8").tobytes(),
                                               "digests": digests.astype("<u8").tobytes(),
                                               "oldest": int(oldest), "oldest_digest": oldest_digest})

    def clear_past_digests(self, txn) -> None:
        """Forget them: the replica took on another history (a snapshot from its source replaced its log)."""
        self.delete_meta(txn, _PAST_DIGESTS_KEY)

    def usage_bytes(self) -> int:
        info, stat = self.env.info(), self.env.stat()
        return (info["last_pgno"] + 1) * stat["psize"]
