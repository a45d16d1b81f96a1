"""The LMDB store: the size check made before LMDB maps data.mdb, and how LMDB failures are reported."""

from __future__ import annotations

import errno
import os
import subprocess
import sys

import lmdb
import numpy as np
import pytest

from deltalog import Replica
from deltalog.errors import IntegrityError, StorageError
from deltalog.lmdbfile import check_data_file, newest_meta
from deltalog.record import pack
from deltalog.store import LogStore, packed_bytes


def _short_but_healthy(path: str) -> int:
    """An environment whose newest transaction allocated overflow pages at the end and freed them again.

    LMDB never writes such pages, so the file ends before (last_pgno + 1) * psize:
    a healthy file that a plain size check would refuse. Returns the page count.
    """
    env = lmdb.open(path, map_size=1 << 30, max_dbs=1)
    db = env.open_db(b"named")  # as in a replica's log
    with env.begin(write=True, db=db) as txn:
        for i in range(2000):
            txn.put(b"%08d" % i, b"v" * 50)
    with env.begin(write=True, db=db) as txn:  # frees pages, so the next transaction reuses a free list
        for i in range(2000, 6000):
            txn.put(b"%08d" % i, b"v" * 50)
        for i in range(2000, 6000):
            txn.delete(b"%08d" % i)
    with env.begin(write=True, db=db) as txn:
        txn.put(b"big", b"z" * 100_000)
        txn.delete(b"big")  # its overflow pages: allocated at the end, freed, never written
    pages = env.info()["last_pgno"] + 1
    env.close()
    return pages


def test_meta_pages_read_as_lmdb_reads_them(tmp_path):
    path = str(tmp_path / "env")
    env = lmdb.open(path, map_size=1 << 30)
    for i in range(5):
        with env.begin(write=True) as txn:
            txn.put(b"%d" % i, b"x" * 3000)
    info, psize = env.info(), env.stat()["psize"]
    env.close()
    with open(os.path.join(path, "data.mdb"), "rb") as f:
        meta = newest_meta(f)
    assert (meta.psize, meta.last_pgno, meta.txnid) == (psize, info["last_pgno"], info["last_txnid"])


def test_a_file_short_only_by_free_pages_opens(tmp_path):
    path = str(tmp_path / "env")
    pages = _short_but_healthy(path)
    size = os.path.getsize(os.path.join(path, "data.mdb"))
    assert size < pages * 4096  # the situation exists: LMDB left free pages unwritten
    check_data_file(path)
    env = lmdb.open(path, map_size=1 << 30, max_dbs=1)
    with env.begin(db=env.open_db(b"named")) as txn:
        assert txn.get(b"big") is None and len(txn.get(b"00001999")) == 50
    env.close()


def test_a_file_missing_pages_in_use_is_refused(tmp_path):
    path = str(tmp_path / "env")
    _short_but_healthy(path)
    data = os.path.join(path, "data.mdb")
    os.truncate(data, os.path.getsize(data) // 2 // 4096 * 4096)
    with pytest.raises(IntegrityError, match="truncated"):
        check_data_file(path)


@pytest.mark.parametrize("size", [0, 100])
def test_a_file_without_its_meta_pages_is_refused(tmp_path, size):
    path = str(tmp_path / "env")
    _short_but_healthy(path)
    os.truncate(os.path.join(path, "data.mdb"), size)
    with pytest.raises(IntegrityError, match="truncated"):
        check_data_file(path)


def test_a_truncated_replica_log_is_refused_before_lmdb_maps_it(tmp_path):
    path = tmp_path / "r"
    with Replica.init(path, {"emb": np.zeros((2000, 64), np.float32)}, bucket_rows=64) as r:
        r.commit({"emb": (np.arange(2000), np.ones((2000, 64), np.float32))})
    data = path / "log" / "data.mdb"
    os.truncate(data, os.path.getsize(data) // 2 // 4096 * 4096)
    with pytest.raises(IntegrityError, match="truncated"):
        Replica.open(path)


class _FakeLmdbError(lmdb.Error):
    def __init__(self, code: int):
        super().__init__(f"mdb_txn_commit: {os.strerror(code)}")
        self.code = code


@pytest.fixture
def replica_store(tmp_path):
    """The LogStore of a new one-tensor replica, closed afterwards."""
    Replica.init(tmp_path / "r", {"a": np.zeros(4, np.float32)}).close()
    store = LogStore(str(tmp_path / "r" / "log"))
    yield store
    store.close()


def _raise_lmdb_error(code: int):
    def fail(txn):
        raise _FakeLmdbError(code)

    return fail


@pytest.mark.parametrize("code, free, words", [
    (errno.ENOSPC, 1 << 40, "disk full"),
    (errno.EIO, 0, "disk full"),  # LMDB's short write on a full disk
    (errno.EIO, 1 << 40, "I/O error"),  # space left: the device failed
    (errno.EACCES, 1 << 40, "cannot write"),
])
def test_os_level_lmdb_failures_are_storage_errors(replica_store, monkeypatch, code, free, words):
    monkeypatch.setattr(replica_store, "_free_bytes", lambda: free)
    with pytest.raises(StorageError, match=words):
        replica_store.write(_raise_lmdb_error(code))


def test_other_lmdb_failures_stay_internal_errors(replica_store):
    with pytest.raises(lmdb.Error):
        replica_store.write(_raise_lmdb_error(errno.EINVAL))


def test_a_bucket_key_of_the_wrong_length_is_an_integrity_error(replica_store):
    store = replica_store
    store.write(lambda txn: txn.put(b"\0" * 8 + b"\1", b"x" * 16, db=store.dbs["buckets"]))
    with pytest.raises(IntegrityError, match="bucket key of 9 bytes"), store.read() as txn:
        list(store.get_buckets(txn, 0))



def test_bump_buckets_keeps_keys_that_end_in_zero_bytes_and_adds_significance(replica_store):
    """Keys and values are cut from arrays: bucket 0, 256 and 2**40 of tensor 0 end in NUL bytes,
    which a fixed-width bytes view would strip (and then write other keys)."""
    store = replica_store
    buckets = np.array([0, 1, 256, 1 << 40], dtype=np.int64)
    store.write(lambda txn: store.bump_buckets(txn, 0, buckets, np.array([5, 5, 6, 7], np.uint64),
                                               np.array([0.5, 1.0, 2.0, 4.0])))
    store.write(lambda txn: store.bump_buckets(txn, 0, buckets[[0, 3]], np.array([9, 0], np.uint64),
                                               np.array([0.25, 1.0])))
    with store.read() as txn:
        got = sorted(store.get_buckets(txn, 0))
    assert got == [(0, 9, 0.75), (1, 5, 1.0), (256, 6, 2.0), (1 << 40, 0, 5.0)]


def test_a_bucket_value_of_the_wrong_length_is_an_integrity_error_when_bumped(replica_store):
    store = replica_store
    store.write(lambda txn: txn.put(b"\0" * 12, b"x" * 15, db=store.dbs["buckets"]))
    with pytest.raises(IntegrityError, match="bucket entry of the wrong length"):
        store.write(lambda txn: store.bump_buckets(txn, 0, np.array([0]), np.array([1], np.uint64), np.ones(1)))

# -- metadata a replica is opened with -------------------------------------------------------------


def _rewrite_meta(path, key: str, change) -> None:
    from deltalog.record import pack, unpack

    store = LogStore(str(path / "log"))
    try:
        def rewrite(txn):
            value = unpack(bytes(txn.get(key.encode(), db=store.dbs["meta"])), key)
            txn.put(key.encode(), pack(change(value)), db=store.dbs["meta"])

        store.write(rewrite)
    finally:
        store.close()


def _tensor0(change):
    def apply(model):
        change(model["tensors"][0])
        return model

    return apply


@pytest.mark.parametrize("key, change, words", [
    ("model", lambda m: {k: v for k, v in m.items() if k != "bucket_rows"}, "bucket_rows"),
    ("model", lambda m: {**m, "bucket_rows": "16"}, "bucket_rows"),
    ("model", lambda m: {**m, "model_id": 7}, "model_id"),
    ("model", lambda m: {**m, "tensors": {}}, "no tensors"),
    ("model", _tensor0(lambda t: t.pop("dtype")), "dtype"),
    ("model", _tensor0(lambda t: t.update(dtype="complex64")), "dtype"),
    ("model", _tensor0(lambda t: t.update(shape=[4, "8"])), "shape"),
    ("model", _tensor0(lambda t: t.update(shape=None)), "shape"),
    ("model", _tensor0(lambda t: t.update(name="zzz")), "sorted"),
    ("model", lambda m: [m], "not a map"),
    ("format", lambda f: {"write_version": 1}, "meta/format"),
])
def test_malformed_model_metadata_is_an_integrity_error(tmp_path, key, change, words):
    path = tmp_path / "r"
    Replica.init(path, {"a": np.zeros((4, 8), np.float32), "b": np.zeros(3, np.int32)}).close()
    _rewrite_meta(path, key, change)
    with pytest.raises(IntegrityError, match=words):
        Replica.open(path)


@pytest.mark.parametrize("commits, change, words", [
    (2, lambda s: {**s, "head": 1}, "the head is 1 but the log's last record is 2"),
    (2, lambda s: {**s, "head": 3}, "the head is 3 but the log's last record is 2"),
    (0, lambda s: {**s, "head": 1}, "no record after the oldest offset 0"),
    (1, lambda s: {k: v for k, v in s.items() if k != "head"}, "meta/state"),
    (1, lambda s: {**s, "applying": "1"}, "meta/state"),
])
def test_a_head_that_disagrees_with_the_log_is_refused_at_open(tmp_path, commits, change, words):
    path = tmp_path / "r"
    with Replica.init(path, {"a": np.zeros((4, 2), np.float32)}) as r:
        for n in range(commits):
            r.commit({"a": ([n], np.full((1, 2), n + 1, np.float32))})
    _rewrite_meta(path, "state", change)
    with pytest.raises(IntegrityError, match=words):
        Replica.open(path)


@pytest.mark.parametrize("n", [0, 1, 255, 256, 65535, 65536, 300_000])
def test_a_value_packed_from_pieces_is_what_pack_makes_and_reads_in_place(replica_store, n):
    data = bytes(range(256)) * (n // 256) + bytes(n % 256)
    packed = packed_bytes([data[: n // 3], memoryview(data)[n // 3 :]])
    assert packed == pack(data)
    replica_store.write(lambda txn: replica_store.put_meta_packed(txn, "blob", packed))
    with replica_store.read() as txn:
        assert replica_store.get_meta(txn, "blob") == data
        view = replica_store.get_meta_blob(txn, "blob")
        assert isinstance(view, memoryview) and view == data


def test_a_meta_value_that_is_no_byte_string_is_refused_as_a_blob(replica_store):
    replica_store.write(lambda txn: replica_store.put_meta(txn, "blob", {"a": 1}))
    with replica_store.read() as txn, pytest.raises(IntegrityError, match="not a byte string"):
        replica_store.get_meta_blob(txn, "blob")


# -- the bucket cache: a writer's bumps read only the entries it has not seen -------------------


def _buckets(path) -> list:
    with Replica.open(path) as r, r.store.read() as txn:
        return [sorted(r.store.get_buckets(txn, info.id)) for info in r.tensors]


def _count_bucket_reads(monkeypatch) -> list[int]:
    """How many bucket entries each bump that read any read from LMDB (not from the cache)."""
    reads: list[int] = []
    read = LogStore._read_buckets

    def counted(self, txn, tensor_id, buckets):
        reads.append(len(buckets))
        return read(self, txn, tensor_id, buckets)

    monkeypatch.setattr(LogStore, "_read_buckets", counted)
    return reads


def _steps(seed: int, count: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"t": (rng.choice(4096, 300, replace=False), rng.standard_normal((300, 4)).astype(np.float32))}
            for _ in range(count)]


def _reference(tmp_path, model, commits: list[dict]) -> list:
    """The bucket table after ``commits``, each by a handle of its own (every entry read from LMDB)."""
    path = tmp_path / "reference"
    Replica.init(path, model, bucket_rows=8).close()
    for updates in commits:
        with Replica.open(path) as r:
            r.commit(updates)
    return _buckets(path)


@pytest.mark.parametrize("other", ["handle", "process"])
def test_a_writer_sees_the_buckets_another_writer_bumped_between_its_commits(tmp_path, monkeypatch, other):
    """A long-lived handle keeps the entries its bumps wrote, and its next commit reads none of them
    again, until another writer commits: its cache must then be dropped, or that writer's
    significance would be overwritten with a stale sum."""
    model = {"t": np.zeros((4096, 4), np.float32)}
    path = tmp_path / "r"
    Replica.init(path, model, bucket_rows=8).close()
    first, theirs, last = _steps(1, 3)
    reads = _count_bucket_reads(monkeypatch)
    with Replica.open(path) as mine:
        mine.commit(first)
        mine.commit(first | {"t": (first["t"][0], first["t"][1] + 1)})  # the same buckets again
        assert len(reads) == 1 and reads[0] > 0, "the second commit of the same rows read its buckets again"
        if other == "handle":
            with Replica.open(path) as r:
                r.commit(theirs)
        else:
            script = ("import sys, numpy as np; from deltalog import Replica\n"
                      "rows = np.load(sys.argv[2]); values = np.load(sys.argv[3])\n"
                      "with Replica.open(sys.argv[1]) as r: r.commit({'t': (rows, values)})\n")
            np.save(tmp_path / "rows.npy", theirs["t"][0])
            np.save(tmp_path / "values.npy", theirs["t"][1])
            subprocess.run([sys.executable, "-c", script, str(path), str(tmp_path / "rows.npy"),
                            str(tmp_path / "values.npy")], check=True)
        reads.clear()
        mine.commit(last)
        assert reads and reads[0] > 0, "the commit after another writer's trusted its cache"
    second = first | {"t": (first["t"][0], first["t"][1] + 1)}
    assert _buckets(path) == _reference(tmp_path, model, [first, second, theirs, last])


def test_the_bucket_cache_holds_nothing_of_a_transaction_that_did_not_commit(replica_store):
    store = replica_store
    store.writer_lock_held = lambda: True
    one = np.array([0, 3], dtype=np.int64)
    versions = np.array([1, 1], np.uint64)
    store.write(lambda txn: store.bump_buckets(txn, 0, one, versions, np.array([1.0, 2.0])))

    def bump_then_fail(txn):
        store.bump_buckets(txn, 0, one, versions + 1, np.array([10.0, 20.0]))
        raise RuntimeError("the transaction's body failed")

    with pytest.raises(RuntimeError):
        store.write(bump_then_fail)
    store.write(lambda txn: store.bump_buckets(txn, 0, one, versions + 2, np.array([100.0, 200.0])))
    with store.read() as txn:
        assert sorted(store.get_buckets(txn, 0)) == [(0, 3, 101.0), (3, 3, 202.0)]


@pytest.mark.parametrize("change", ["put", "delete", "clear"])
def test_every_other_change_of_the_bucket_table_empties_the_cache(replica_store, change):
    store = replica_store
    store.writer_lock_held = lambda: True
    one = np.array([0, 3], dtype=np.int64)
    store.write(lambda txn: store.bump_buckets(txn, 0, one, np.array([1, 1], np.uint64), np.array([1.0, 2.0])))
    other = {
        "put": lambda txn: store.put_bucket(txn, 0, 3, 7, 0.5),
        "delete": lambda txn: store.delete_bucket(txn, 0, 3),
        "clear": lambda txn: store.clear_buckets(txn),
    }[change]
    store.write(other)
    store.write(lambda txn: store.bump_buckets(txn, 0, one, np.array([2, 2], np.uint64), np.array([10.0, 20.0])))
    third = {"put": 20.5, "delete": 20.0, "clear": 20.0}[change]
    first = 10.0 if change == "clear" else 11.0
    with store.read() as txn:
        assert sorted(store.get_buckets(txn, 0)) == [(0, 2, first), (3, 2, third)]


def test_a_handle_without_the_writer_lock_keeps_no_bucket_cache(replica_store, monkeypatch):
    """Without the lock another writer could commit between this handle's commit and its look at
    LMDB's transaction id: nothing proves the cache current then."""
    store = replica_store
    reads = _count_bucket_reads(monkeypatch)
    one = np.array([0, 3], dtype=np.int64)
    for _ in range(2):
        store.write(lambda txn: store.bump_buckets(txn, 0, one, np.array([1, 1], np.uint64), np.ones(2)))
    assert reads == [2, 2]
