"""The replica store: init, commit semantics, bucket index, lock, errors."""

from __future__ import annotations

import os

import numpy as np
import pytest
from conftest import apply_update, assert_same, bits, random_model, random_update

from deltalog import Replica, store
from deltalog.dtypes import STORAGE
from deltalog.errors import IntegrityError, InvalidInput, LockHeld, ModelMismatch, NotAReplica, UnsupportedVersion
from deltalog.verify import verify


@pytest.fixture
def model(rng):
    return random_model(rng)


@pytest.fixture
def replica(tmp_path, model):
    r = Replica.init(tmp_path / "r", model, bucket_rows=16)
    yield r
    r.close()


def test_init_holds_the_model_at_offset_zero(replica, model):
    assert replica.head == 0 and replica.oldest_offset == 0
    assert_same(replica, model)
    status = replica.status()
    emb = next(t for t in status["tensors"] if t["name"] == "item_emb")
    assert emb == {"name": "item_emb", "shape": [300, 8], "dtype": "float32", "rows": 300, "buckets": 19, "bytes": 9600}
    assert status["snapshots"] == [0]


@pytest.mark.parametrize("dtype", sorted(STORAGE))
def test_every_dtype_round_trips_through_commits(tmp_path, rng, dtype):
    storage = STORAGE[dtype]
    raw = rng.integers(0, 256, size=(40, 3 * storage.itemsize), dtype=np.uint8)
    base = raw.view(storage) if dtype != "bool" else (raw[:, :3] % 2).astype(bool)
    raw2 = rng.integers(0, 256, size=(5, 3 * storage.itemsize), dtype=np.uint8)
    values = raw2.view(storage) if dtype != "bool" else (raw2[:, :3] % 2).astype(bool)
    with Replica.init(tmp_path / "r", {"t": (base, dtype)}, bucket_rows=8) as r:
        r.commit({"t": ([1, 7, 30, 31, 39], values)})
        expected = base.copy()
        expected[[1, 7, 30, 31, 39]] = values
        assert np.array_equal(bits(r.read_tensor("t")), bits(expected))
        assert verify(r).ok


def test_random_update_stream_matches_numpy(replica, model, rng):
    for _ in range(30):
        update = random_update(rng, model)
        replica.commit(update)
        apply_update(model, update)
    assert_same(replica, model)
    assert verify(replica).ok


def test_repeated_index_last_value_wins(replica):
    v = np.arange(24, dtype=np.float32).reshape(3, 8)
    replica.commit({"item_emb": ([4, 9, 4], v)})
    assert np.array_equal(replica.read_tensor("item_emb")[4], v[2])



def test_sorted_unique_rows_commit_like_any_order_and_keep_no_reference_to_the_values(tmp_path, model, rng):
    """Rows already sorted and unique skip the sort (no copies); the commit must be the same."""
    rows = np.array([1, 5, 9], dtype=np.int64)
    values = rng.standard_normal((3, model["item_emb"].shape[1])).astype(np.float32)
    heads = []
    for name, (r, v) in {"sorted": (rows, values), "shuffled": (rows[[2, 0, 1]], values[[2, 0, 1]])}.items():
        with Replica.init(tmp_path / name, model) as replica:
            given = v.copy()
            replica.commit({"item_emb": (r, given)})
            given[:] = 0  # the caller reuses its buffer: the replica is not affected
            assert np.array_equal(replica.read_tensor("item_emb")[rows], values)
            assert verify(replica).ok
            heads.append(replica.state.digest)
    assert heads[0] == heads[1]


def test_a_record_that_fails_to_encode_writes_nothing(replica, monkeypatch):
    """The record compresses on another thread while the bucket index fills: its failure
    still aborts the whole first transaction."""
    from deltalog import record

    before = replica.read_tensor("item_emb").copy()

    def broken(*args, **kwargs):
        raise RuntimeError("encode failed")

    monkeypatch.setattr(record, "encode", broken)
    with pytest.raises(RuntimeError, match="encode failed"):
        replica.commit({"item_emb": ([3], np.ones((1, before.shape[1]), np.float32))})
    monkeypatch.undo()
    assert replica.head == 0 and replica.state.settled
    assert list(replica.iter_summaries()) == []
    with replica.store.read() as txn:
        assert list(replica.store.get_buckets(txn, replica.info("item_emb").id)) == []
    assert np.array_equal(replica.read_tensor("item_emb"), before)
    assert replica.commit({"item_emb": ([3], np.ones((1, before.shape[1]), np.float32))}) == 1



def test_rows_are_stored_only_after_the_background_touch_of_their_pages_ended(replica, monkeypatch):
    """The writer faults the pages in on another thread (same bytes stored back) while the log
    fsyncs; a row stored before that thread is done could be overwritten with its old byte."""
    import threading
    import time

    from deltalog import kernels, writer

    if not kernels.enabled():
        pytest.skip("the touch needs the compiled loops")
    events = []
    touch, write_rows = kernels.touch_rows, writer.Writer.write_rows

    def slow_touch(table, rows):
        events.append(("touch starts", threading.get_ident()))
        time.sleep(0.2)  # longer than the transaction: the writer must wait for it
        touch(table, rows)
        events.append(("touch ends", threading.get_ident()))

    def recorded_write_rows(self, writes, **kwargs):
        if writes:
            events.append(("rows stored", threading.get_ident()))
        return write_rows(self, writes, **kwargs)

    monkeypatch.setattr(kernels, "touch_rows", slow_touch)
    monkeypatch.setattr(writer.Writer, "write_rows", recorded_write_rows)
    values = np.full((2, replica.info("item_emb").row_elems), 3.0, np.float32)
    replica.commit({"item_emb": ([1, 7], values)})
    names = [name for name, _thread in events]
    assert names.index("rows stored") > max(i for i, name in enumerate(names) if name == "touch ends")
    assert events[0][1] != threading.get_ident()  # it did run on another thread
    assert np.array_equal(replica.read_tensor("item_emb")[[1, 7]], values)

def test_a_child_forked_after_a_commit_commits_too(tmp_path, model):
    """A commit encodes on a background thread; a forked child has none of the parent's threads."""
    from conftest import in_forked_child

    with Replica.init(tmp_path / "parent", model) as replica:
        replica.commit({"item_emb": ([1], np.ones((1, model["item_emb"].shape[1]), np.float32))})
    Replica.init(tmp_path / "child", model).close()

    def child() -> bool:
        with Replica.open(tmp_path / "child") as replica:
            return replica.commit({"item_emb": ([2], np.ones((1, model["item_emb"].shape[1]), np.float32))}) == 1

    in_forked_child(child)

def test_unchanged_rows_are_not_logged_and_empty_commit_appends_nothing(replica):
    current = replica.read_tensor("item_emb")[[3, 4]]
    assert replica.commit({"item_emb": ([3, 4], current)}) == 0
    assert list(replica.iter_summaries()) == []
    changed = current.copy()
    changed[1, 0] += 1
    assert replica.commit({"item_emb": ([3, 4], changed)}) == 1
    (summary,) = replica.iter_summaries()
    assert summary.rows == 1 and summary.significance == pytest.approx(1.0)


def test_a_large_commit_with_unchanged_rows_logs_only_the_changed_ones(tmp_path):
    """A large delta's index and new values start compressing before the unchanged rows are known
    (record.Sections.early): when some are dropped, those sections must be made again."""
    from deltalog import record as rec

    rng = np.random.default_rng(5)
    table = rng.standard_normal((4096, 64)).astype(np.float32)
    rows = np.arange(0, 4096, 2)
    values = table[rows].copy()
    assert values.nbytes >= rec.EARLY_SECTION_BYTES
    values[::3] += 1  # a third of the rows change
    with Replica.init(tmp_path / "r", {"t": table}) as r:
        assert r.commit({"t": (rows, values)}) == 1
        changed = rows[::3]
        with r.store.read() as txn:
            record = rec.decode(bytes(r.store.get_record(txn, 1)), "record 1")
        (delta,) = record.tensors
        assert np.array_equal(delta.rows, changed.astype(np.uint64))
        assert bits(delta.new).tobytes() == bits(values[::3]).tobytes()
        assert bits(delta.old).tobytes() == bits(table[changed]).tobytes()
        assert verify(r).ok


def test_a_commit_leaves_no_page_touch_behind(replica):
    """A commit starts faulting in its rows' pages before it gathers their old values
    (Writer.touch_ahead); one that changes nothing, or fails, must not leave that touch for the
    next change, whose page guard would count what it dirtied as its own."""
    with replica.writing():
        current = replica.read_tensor("item_emb")[[3, 4]]
        assert replica.commit({"item_emb": ([3, 4], current)}) == 0  # nothing changes
        assert replica.writer._touching_ahead is None
        live = replica.writer.rows(replica.info("item_emb")).view(np.uint32)
        live[10, 0] ^= 1  # a row that no longer matches its row digest: the commit fails on it
        with pytest.raises(IntegrityError):
            replica.commit({"item_emb": ([10], np.ones((1, current.shape[1]), np.float32))})
        assert replica.writer._touching_ahead is None
        live[10, 0] ^= 1
        changed = current + 1
        assert replica.commit({"item_emb": ([3, 4], changed)}) == 1
        assert replica.writer._touching_ahead is None
    assert bits(replica.read_tensor("item_emb")[[3, 4]]).tobytes() == bits(changed).tobytes()


def test_values_in_row_or_original_shape(replica):
    replica.commit({"dense": ([2], np.ones((1, 4, 2))), "step": ([0], np.array([5]))})
    replica.commit({"dense": ([3], np.ones((1, 8)))})
    assert replica.read_tensor("dense")[2:4].sum() == 16 and int(replica.read_tensor("step")) == 5


def test_bucket_index_tracks_versions_and_significance(replica):
    replica.commit({"item_emb": ([0, 17], np.ones((2, 8), np.float32))})
    replica.commit({"item_emb": ([18], np.ones((1, 8), np.float32))})
    index = replica.bucket_index("item_emb")
    assert set(index) == {0, 1}
    assert index[0][0] == 1 and index[1][0] == 2
    assert index[1][1] > index[0][1] > 0


@pytest.mark.parametrize(
    "update, message",
    [
        ({"nope": ([0], np.zeros((1, 8), np.float32))}, "unknown tensor"),
        ({"item_emb": ([0], np.zeros((1, 7), np.float32))}, "values shaped"),
        ({"item_emb": ([0], np.zeros((1, 8), np.float64))}, "dtype float64"),
        ({"item_emb": ([300], np.zeros((1, 8), np.float32))}, "out of range"),
        ({"item_emb": ([-1], np.zeros((1, 8), np.float32))}, "out of range"),
        ({"item_emb": ([0.5], np.zeros((1, 8), np.float32))}, "integer"),
    ],
)
def test_bad_updates_are_refused_and_nothing_is_written(replica, update, message):
    good = {"bias": ([0], np.array([9.0], np.float32))}
    with pytest.raises(InvalidInput, match=message):
        replica.commit({**good, **update})
    assert replica.head == 0 and list(replica.iter_summaries()) == []


def test_commit_checkpoint_logs_only_changed_rows(replica, model):
    new = {k: v.copy() for k, v in model.items()}
    new["item_emb"][[5, 250]] += 1
    new["step"] = np.array(3, dtype=np.int64)
    offset = replica.commit_checkpoint(new)
    (summary,) = replica.iter_summaries()
    assert offset == 1 and summary.rows == 3
    assert_same(replica, new)
    assert replica.commit_checkpoint(new) == 1  # nothing changed: no record


def test_commit_checkpoint_of_another_model_is_refused(replica, model):
    other = dict(model)
    other["extra"] = np.zeros(3, np.float32)
    with pytest.raises(ModelMismatch, match="unknown"):
        replica.commit_checkpoint(other)
    wrong_shape = dict(model)
    wrong_shape["bias"] = np.zeros(7, np.float32)
    with pytest.raises(ModelMismatch, match="bias"):
        replica.commit_checkpoint(wrong_shape)
    with pytest.raises(ModelMismatch, match="belongs to model"):
        replica.commit_checkpoint(model, {"deltalog.model_id": "someone-else"})


def test_second_writer_gets_lock_held_but_readers_are_not_blocked(replica, tmp_path):
    with replica.writing():
        with Replica.open(tmp_path / "r") as other:
            assert other.head == 0  # opening and reading never block
            other.read_tensor("bias")
            with pytest.raises(LockHeld):
                other.commit({"bias": ([0], np.array([1.0], np.float32))})
    replica.commit({"bias": ([0], np.array([1.0], np.float32))})  # lock released


def test_init_refuses_existing_directory_and_leaves_nothing_on_failure(tmp_path, model):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    with pytest.raises(NotAReplica, match="already exists"):
        Replica.init(tmp_path / "full", model)
    with pytest.raises(InvalidInput):
        Replica.init(tmp_path / "bad", {"t": np.zeros(3, dtype=np.complex64)})
    assert sorted(os.listdir(tmp_path)) == ["full"]  # no temp directory left behind


def test_open_refuses_non_replicas_and_newer_formats(tmp_path, replica):
    with pytest.raises(NotAReplica):
        Replica.open(tmp_path / "missing")
    with pytest.raises(NotAReplica):
        Replica.open(tmp_path)
    marker = tmp_path / "r" / "DELTALOG"
    marker.write_text("deltalog replica\nformat 99\n")
    with pytest.raises(UnsupportedVersion):
        Replica.open(tmp_path / "r")


def test_map_grows_instead_of_failing(tmp_path, monkeypatch, rng):
    monkeypatch.setattr(store, "INITIAL_MAP_SIZE", 1 << 20)  # 1 MiB: full after a few records
    big = rng.standard_normal((4000, 64)).astype(np.float32)
    with Replica.init(tmp_path / "r", {"t": big}) as r:
        for i in range(6):
            r.commit({"t": (np.arange(i * 500, i * 500 + 500), rng.standard_normal((500, 64)).astype(np.float32))})
        assert r.head == 6 and r.store.env.info()["map_size"] > 1 << 20
        assert verify(r).ok


def test_two_handles_in_one_process_share_the_environment(replica, tmp_path):
    with Replica.open(tmp_path / "r") as again:
        replica.commit({"bias": ([1], np.array([2.0], np.float32))})
        assert again.head == 1
    assert replica.head == 1  # closing one handle keeps the other working
