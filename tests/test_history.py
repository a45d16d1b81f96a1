"""Reading the log partially: each reader checks exactly the bytes it decodes.

A record of encoding v2 has a header checksum and one per section, so
history.changed_rows (row indices only) and history.values_at (the undo
values of a few tensors) hash only what they decode; damage there is an
IntegrityError, damage elsewhere does not stop them, and verify still
finds damage anywhere. A record of encoding v1 (written before its
replica was upgraded) has one checksum: any read of it checks all of it.
"""

from __future__ import annotations

import struct

import numpy as np
import pytest
import xxhash

from deltalog import Replica, history
from deltalog import record as rec
from deltalog.errors import IntegrityError
from deltalog.verify import verify
from record_layout import v2_spans


def _model() -> dict[str, np.ndarray]:
    return {
        "emb": np.arange(64 * 4, dtype=np.float32).reshape(64, 4),
        "dense": np.zeros((8, 3), np.float64),
    }


@pytest.fixture
def replica(tmp_path):
    """Offsets 1..3: each writes a few rows of "emb" and every row of "dense"."""
    with Replica.init(tmp_path / "r", _model(), bucket_rows=8) as r:
        for step in range(1, 4):
            rows = np.array([step, 10 + step, 40 + step])
            r.commit({"emb": (rows, np.full((3, 4), 100 * step, np.float32)),
                      "dense": (np.arange(8), np.full((8, 3), step, np.float64))})
    return tmp_path / "r"


def _damage(path, offset: int, where: str | tuple[str, str]) -> None:
    """Flip a byte of record ``offset`` in its header ("header") or in one (tensor, section)."""
    with Replica.open(path) as r:
        blob = bytearray(r.record_blob(offset))
        if where == "header":
            pos = 14
        else:
            start, stop = v2_spans(blob)[1][where]
            pos = (start + stop) // 2
        blob[pos] ^= 0x20
        r.store.write(lambda txn: txn.put(struct.pack(">Q", offset), bytes(blob), db=r.store.dbs["records"]))


def _put_v1(path, offset: int) -> None:
    """Store record ``offset`` re-encoded as v1, as a replica upgraded from format 2 holds its old records."""
    with Replica.open(path) as r:
        blob = rec.encode(rec.decode(r.record_blob(offset)), version=1)
        r.store.write(lambda txn: txn.put(struct.pack(">Q", offset), blob, db=r.store.dbs["records"]))


def test_changed_rows_refuses_a_damaged_index_section(replica):
    _damage(replica, 2, ("emb", "index"))
    with Replica.open(replica) as r:
        with pytest.raises(IntegrityError, match=r"record 2: checksum mismatch \(tensor 'emb', section index\)"):
            history.changed_rows(r, 0)
        assert history.changed_rows(r, 2)["emb"].tolist() == [3, 13, 43]  # record 2 is not read
        assert not verify(r).ok


@pytest.mark.parametrize("section", ["new", "old"])
def test_changed_rows_never_hashes_the_values(replica, section, monkeypatch):
    _damage(replica, 2, ("emb", section))
    hashed = []
    real = xxhash.xxh3_64_intdigest
    monkeypatch.setattr(xxhash, "xxh3_64_intdigest", lambda data: hashed.append(len(data)) or real(data))
    with Replica.open(replica) as r:
        rows = history.changed_rows(r, 0)
    assert rows["emb"].tolist() == [1, 2, 3, 11, 12, 13, 41, 42, 43]
    assert rows["dense"].tolist() == list(range(8))
    with Replica.open(replica) as r:
        blobs = [r.record_blob(o) for o in (1, 2, 3)]
    index_sizes = sorted(
        hi - lo for blob in blobs for (_n, key), (lo, hi) in v2_spans(blob)[1].items() if key == "index"
    )
    assert sorted(n for n in hashed if n in index_sizes) == index_sizes  # every index section, once
    assert len(hashed) == 3 + 6  # and the 3 headers: no value section
    with Replica.open(replica) as r:
        assert not verify(r).ok  # verify checks every byte


def test_values_at_refuses_the_damaged_values_it_needs_and_reads_past_others(replica):
    _damage(replica, 2, ("emb", "old"))
    with Replica.open(replica) as r:
        rows = {"emb": np.array([2, 3], np.uint64), "dense": np.arange(8, dtype=np.uint64)}
        with pytest.raises(IntegrityError, match=r"record 2: checksum mismatch \(tensor 'emb', section old\)"):
            history.values_at(r, 1, rows)  # row 2's value at 1 is the undo value record 2 holds
        # The value at 1 of row 3 comes from record 3, and of "dense" from record 2's own, intact sections.
        head, values = history.values_at(r, 1, {"emb": np.array([3], np.uint64), "dense": rows["dense"]})
        assert head == 3
        assert values["emb"].tolist() == [[12, 13, 14, 15]]
        assert np.all(values["dense"] == 1)
        with pytest.raises(IntegrityError):
            rec.decode(r.record_blob(2))


def test_log_refuses_a_damaged_header(replica):
    _damage(replica, 2, "header")
    with Replica.open(replica) as r:
        with pytest.raises(IntegrityError, match="record 2: header checksum mismatch"):
            list(r.iter_summaries())
        with pytest.raises(IntegrityError, match="record 2: header checksum mismatch"):
            history.changed_rows(r, 0)
        assert not verify(r).ok


def test_a_v1_record_in_the_log_is_checked_whole_by_every_reader(replica):
    _put_v1(replica, 2)
    with Replica.open(replica) as r:
        assert r.record_blob(2)[4:6] == b"\x00\x01" and verify(r).ok
        assert history.changed_rows(r, 0)["emb"].tolist() == [1, 2, 3, 11, 12, 13, 41, 42, 43]
        _head, values = history.values_at(r, 1, {"emb": np.array([2], np.uint64)})
        assert values["emb"].tolist() == [[8, 9, 10, 11]]
    with Replica.open(replica) as r:  # damage in its values: even a rows-only read sees it
        blob = bytearray(r.record_blob(2))
        blob[len(blob) - 20] ^= 0x20
        r.store.write(lambda txn: txn.put(struct.pack(">Q", 2), bytes(blob), db=r.store.dbs["records"]))
        with pytest.raises(IntegrityError, match="record 2: checksum mismatch"):
            history.changed_rows(r, 0)
        assert history.changed_rows(r, 2)["emb"].tolist() == [3, 13, 43]  # record 2 is not read
        assert not verify(r).ok


@pytest.mark.parametrize("chunks", [
    [[0, 1, 2, 3], [2, 3, 4], [5, 6]],  # runs that overlap or touch: one run
    [[0, 1, 2], [4, 5]],  # runs with a hole
    [[5, 6, 7], [0, 1, 2, 3, 4]],
    [[1, 3, 4], [2, 3, 9]],
    [[7], [7], [7]],
    [[], [4, 5], []],
    [[], []],
])
@pytest.mark.parametrize("bound", [None, 10, 1000, 6])  # 10: a mask; 1000: too sparse for one; 6: rows past it
def test_sorted_union_is_the_sorted_distinct_rows(chunks, bound):
    arrays = [np.array(c, dtype=np.uint64) for c in chunks]
    got = history.sorted_union(arrays, bound)
    assert got.dtype == np.uint64
    assert got.tolist() == sorted(set().union(*map(set, chunks)))


@pytest.mark.parametrize("dense", [True, False])
def test_sorted_union_marks_a_dense_change_and_sorts_a_sparse_one(monkeypatch, dense):
    rng = np.random.default_rng(3)
    bound = 50_000 if dense else 5_000_000
    chunks = [np.unique(rng.integers(0, 50_000, 2_000)).astype(np.uint64) for _ in range(20)]
    want = np.unique(np.concatenate(chunks))
    sorts = []
    real_sort = np.sort
    monkeypatch.setattr(np, "sort", lambda *a, **k: sorts.append(1) or real_sort(*a, **k))
    got = history.sorted_union(chunks, bound)
    assert got.dtype == np.uint64 and np.array_equal(got, want)
    assert bool(sorts) != dense  # 40,000 rows of a 50,000-row table: a mask, no sort
