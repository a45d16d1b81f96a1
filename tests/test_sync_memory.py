"""Both ends of a sync hold one tensor's values at a time, not the chunk's or the sync's.

A memory bound, not a timing one: tracemalloc sees numpy's buffers and
Python's bytes, so its peak during the destination's work, minus the
record it must build for the log, follows the largest tensor's changed
rows. Holding every tensor's new and old values at once (what a chunk
applied in one piece costs, or a partial sync's chunks merged at once when
it finishes) breaks it.
"""

from __future__ import annotations

import shutil
import tracemalloc

import numpy as np
import pytest

from deltalog import Replica, receive
from deltalog import record as rec
from deltalog import sync as sync_mod
from deltalog.pending import read_pending
from deltalog.history import values_at
from deltalog.verify import verify

TENSORS = 8
ROWS = 4096
ELEMS = 64  # 256-byte rows: one tensor's changed rows are 1 MiB


def _model(rng) -> dict[str, np.ndarray]:
    # Small integers as floats: the values compress to almost nothing, so what the
    # chunk and the record weigh does not hide what the destination holds besides.
    return {f"emb{i}": rng.integers(0, 4, size=(ROWS, ELEMS)).astype(np.float32) for i in range(TENSORS)}


@pytest.mark.parametrize("keep", [False, True], ids=["decode-again", "keep-decoded"])
def test_a_whole_sync_holds_one_tensor_of_values_at_a_time(tmp_path, rng, monkeypatch, keep):
    # Below receive.KEEP_DECODED_BYTES the new values stay decoded for the row writes;
    # above it they are decoded again. Both are bounded, the first by that much more.
    kept = TENSORS if keep else 0
    monkeypatch.setattr(receive, "KEEP_DECODED_BYTES", (64 << 20) if keep else 0)
    src, dst = tmp_path / "src", tmp_path / "dst"
    model = _model(rng)
    with Replica.init(src, model, bucket_rows=64):
        pass
    shutil.copytree(src, dst)
    with Replica.open(src) as r:  # every row of every tensor changes: 8 MiB of rows in one chunk
        r.commit({name: (np.arange(ROWS), values + 1) for name, values in model.items()})
        target = r.head
        (blob,) = list(sync_mod.source_chunks(r, 0, {}, target, 64 << 20))
    blob = bytearray(blob)  # what the wire hands the destination
    largest = ROWS * ELEMS * 4

    with Replica.open(dst) as r, r.writing():
        tracemalloc.start()
        try:
            receive.apply_whole(r, blob, target, None)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        stored = len(r.record_blob(target))

    assert stored < 3 * largest  # the premise: the record is small next to the values
    # One tensor at a time: its new and old values and their transients (~4 tensors' worth),
    # plus the new values kept. Every tensor's new and old values at once would be 16 more
    # (holding the whole chunk decoded measured 22 here).
    assert peak - stored < (6 + kept) * largest, \
        f"peak {peak / largest:.1f} tensors' worth, record {stored / largest:.2f}"
    _synced(dst, model, target)


def test_a_sync_source_reads_and_compresses_one_tensor_at_a_time(tmp_path, rng):
    src = tmp_path / "src"
    model = _model(rng)
    with Replica.init(src, model, bucket_rows=64) as r:
        r.commit({name: (np.arange(ROWS), values + 1) for name, values in model.items()})
        tracemalloc.start()
        try:
            (blob,) = list(sync_mod.source_chunks(r, 0, {}, r.head, 64 << 20))
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    largest = ROWS * ELEMS * 4
    # The chunk's sections and the chunk, and one tensor's values with their transients (~6 here);
    # every tensor's values at once would be 8 tensors' worth more (reading them all first measured 15).
    assert peak < 2 * len(blob) + 6 * largest, f"peak {peak / largest:.1f} tensors' worth, chunk {len(blob) / largest:.2f}"


def _changed_everywhere(tmp_path, rng, model=None):
    """(source, destination at offset 0, target): every row of every tensor changed at the source."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    model = _model(rng) if model is None else model
    with Replica.init(src, model, bucket_rows=64):
        pass
    shutil.copytree(src, dst)
    with Replica.open(src) as r:
        r.commit({name: (np.arange(ROWS), values + 1) for name, values in model.items()})
        target = r.head
    return src, dst, model, target


def _peak(work) -> int:
    tracemalloc.start()
    try:
        work()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def _synced(dst, model, target) -> None:
    with Replica.open(dst) as r:
        assert r.head == target
        for name, values in model.items():
            assert np.array_equal(r.rows_view(name)[:], values + 1)
    with Replica.open(dst) as r:
        assert verify(r).ok


def test_a_partial_sync_chunk_is_applied_one_tensor_at_a_time(tmp_path, rng, monkeypatch):
    # One chunk of a budgeted (or bigger than one chunk) sync holding every tensor: applying it
    # as pending state follows its largest tensor too, not the chunk.
    monkeypatch.setattr(receive, "KEEP_DECODED_BYTES", 0)
    src, dst, model, target = _changed_everywhere(tmp_path, rng)
    with Replica.open(src) as r:
        (blob,) = list(sync_mod.source_chunks(r, 0, {}, target, 64 << 20))
    blob = bytearray(blob)
    largest = ROWS * ELEMS * 4
    with Replica.open(dst) as r, r.writing():
        peak = _peak(lambda: receive.apply_chunk(r, blob, target, "src"))
        (stored,) = read_pending(r)[1]
        receive.finish_sync(r, target, None)
    # The stored chunk and its sections, and one tensor's values with their transients (~2 here);
    # the whole chunk decoded at once measured 20 tensors' worth over the stored chunk twice.
    assert peak - 2 * len(stored) < 4 * largest, f"peak {peak / largest:.1f} tensors' worth"
    _synced(dst, model, target)


def test_a_sync_of_many_chunks_finishes_one_tensor_at_a_time(tmp_path, rng):
    # Chunks of about one tensor's rows, ranked by significance so tensors spread over them:
    # finishing merges the chunks into one record tensor by tensor.
    src, dst, model, target = _changed_everywhere(tmp_path, rng)
    largest = ROWS * ELEMS * 4
    with Replica.open(src) as r:
        chunks = [bytearray(b) for b in sync_mod.source_chunks(r, 0, {}, target, largest)]
    assert len(chunks) >= TENSORS
    with Replica.open(dst) as r, r.writing():
        for blob in chunks:
            receive.apply_chunk(r, blob, target, "src")
        del chunks
        pending = sum(len(b) for b in read_pending(r)[1])
        peak = _peak(lambda: receive.finish_sync(r, target, None))
        stored = len(r.record_blob(target))
    assert stored < 3 * largest and pending < 3 * largest  # the premise: records are small next to the values
    # The record's sections, plus one tensor's merged new and old values and what compressing
    # both at once takes (~7 tensors' worth); the chunks are read in place, not copied (they
    # weigh about the record: copying them measured 10 here). Every chunk decoded and merged
    # at once measured 37.
    assert peak - stored < 8 * largest, \
        f"peak {peak / largest:.1f} tensors' worth, record {stored / largest:.2f}, chunks {pending / largest:.2f}"
    _synced(dst, model, target)


@pytest.mark.parametrize("final", [True, False], ids=["whole", "pending-chunk"])
def test_a_chunk_handed_over_is_gone_when_lmdb_copies_what_it_became(tmp_path, rng, monkeypatch, final):
    # The stdio server keeps no reference to a request's chunk (receive.HandedOver): when LMDB
    # copies the record (or the stored pending chunk), only that is held, not the chunk besides.
    # Random values: the chunk weighs what its rows do, so holding it would show.
    from deltalog.store import LogStore

    monkeypatch.setattr(receive, "KEEP_DECODED_BYTES", 0)
    model = {f"emb{i}": rng.standard_normal((ROWS, ELEMS)).astype(np.float32) for i in range(TENSORS)}
    src, dst, model, target = _changed_everywhere(tmp_path, rng, model)
    with Replica.open(src) as r:
        (blob,) = list(sync_mod.source_chunks(r, 0, {}, target, 64 << 20))
    wire = len(blob)
    held = {}
    put = "put_record" if final else "put_meta_packed"
    real = getattr(LogStore, put)

    def measured(self, txn, key, value):
        held.setdefault("current", tracemalloc.get_traced_memory()[0])
        held["value"] = len(value)
        return real(self, txn, key, value)

    monkeypatch.setattr(LogStore, put, measured)
    with Replica.open(dst) as r, r.writing():
        tracemalloc.start()  # it sees what is allocated from here on: the chunk as the server reads it
        try:
            handed = receive.HandedOver(bytearray(blob))
            if final:
                receive.apply_whole(r, handed, target, None)
            else:
                receive.apply_chunk(r, handed, target, "src")
                receive.finish_sync(r, target, None)
        finally:
            tracemalloc.stop()
    assert wire > 6 * ROWS * ELEMS  # the premise: the chunk is not small
    # Besides what LMDB copies: ~0.2 chunks' worth (row digests, indexes); the chunk kept measured 1.2.
    assert held["current"] - held["value"] < wire / 2, \
        f"held {held['current'] / wire:.2f} chunks' worth, copying {held['value'] / wire:.2f}"
    _synced(dst, {name: values for name, values in model.items()}, target)


@pytest.mark.parametrize("spill", [True, False], ids=["spilled", "in-memory"])
def test_a_large_record_is_joined_in_the_page_cache_not_the_heap(tmp_path, rng, monkeypatch, spill):
    # LMDB copies the record it is given into pages of its own: joined in the heap, the record
    # would be there twice while it is logged. From spill.SPILL_BYTES on it is joined in an
    # unnamed file instead, so the heap holds little of it while LMDB copies it, and the
    # replica's directory is left as it was.
    import os

    from deltalog import spill as spill_mod
    from deltalog.store import LogStore

    monkeypatch.setattr(receive, "KEEP_DECODED_BYTES", 0)
    monkeypatch.setattr(spill_mod, "SPILL_BYTES", 0 if spill else 1 << 40)
    model = {f"emb{i}": rng.standard_normal((ROWS, ELEMS)).astype(np.float32) for i in range(TENSORS)}
    src, dst, model, target = _changed_everywhere(tmp_path, rng, model)
    with Replica.open(src) as r:
        (blob,) = list(sync_mod.source_chunks(r, 0, {}, target, 64 << 20))
    held = {}
    real = LogStore.put_record

    def measured(self, txn, offset, value):
        held["current"] = tracemalloc.get_traced_memory()[0]
        held["value"] = len(value)
        return real(self, txn, offset, value)

    monkeypatch.setattr(LogStore, "put_record", measured)
    before = sorted(os.listdir(dst))
    with Replica.open(dst) as r, r.writing():
        tracemalloc.start()
        try:
            receive.apply_whole(r, receive.HandedOver(bytearray(blob)), target, None)
        finally:
            tracemalloc.stop()
    assert held["value"] > 6 * ROWS * ELEMS  # the premise: the record is not small
    if spill:  # row digests and indexes: ~0.2 records' worth; the record joined in the heap is 1 more
        assert held["current"] < held["value"] / 2, f"held {held['current'] / held['value']:.2f} records' worth"
    else:
        assert held["current"] > held["value"]
    assert sorted(os.listdir(dst)) == before
    _synced(dst, model, target)


def _uneven_change(tmp_path, rng):
    """(source, destination at 0, target, names in the model's order): the last tensor of the
    model changes the most bytes, so a tensor-by-tensor loop in that order meets it last."""
    sizes = {"a_small": 200, "b_small": 300, "c_medium": 1000, "z_large": ROWS}
    model = {name: rng.standard_normal((rows, ELEMS)).astype(np.float32) for name, rows in sizes.items()}
    src, dst = tmp_path / "src", tmp_path / "dst"
    with Replica.init(src, model, bucket_rows=64):
        pass
    shutil.copytree(src, dst)
    with Replica.open(src) as r:
        r.commit({name: (np.arange(len(v)), v + 1) for name, v in model.items()})
        names = [info.name for info in r.tensors]
        target = r.head
    assert names[-1] == "z_large"  # the premise: in the model's order it comes last
    return src, dst, target, names


def _order_seen(monkeypatch, module, name: str) -> list:
    """Patch ``module.name`` (a function whose arguments include a tensor's info or name) to note
    the tensor each call is about, in call order."""
    seen, original = [], getattr(module, name)

    def noted(*args, **kwargs):
        for a in args:
            label = getattr(a, "name", a) if not isinstance(a, (list, dict)) else None
            if isinstance(label, str) and label.endswith(("_small", "_medium", "_large")):
                seen.append(label)
                break
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, noted)
    return seen


def test_a_destination_seals_the_largest_tensor_first_and_logs_in_the_models_order(tmp_path, rng, monkeypatch):
    """Each tensor's values come on top of the sections sealed before it: the largest is done
    while the fewest are held (4 GiB, a minute of changes: +155 -> +142 MiB at the far end)."""
    src, dst, target, names = _uneven_change(tmp_path, rng)
    with Replica.open(src) as r:
        (blob,) = list(sync_mod.source_chunks(r, 0, {}, target, 64 << 20))
    seen = _order_seen(monkeypatch, receive, "_received_values")
    with Replica.open(dst) as r, r.writing():
        receive.apply_whole(r, bytearray(blob), target, None)
        logged = rec.RecordView(r.record_blob(target), "record").tensor_names()
    assert seen[0] == "z_large" and sorted(seen) == sorted(names)
    assert logged == names
    with Replica.open(dst) as r:
        assert verify(r).ok


def test_a_finished_partial_sync_merges_the_largest_tensor_first_and_logs_in_the_models_order(
        tmp_path, rng, monkeypatch):
    src, dst, target, names = _uneven_change(tmp_path, rng)
    with Replica.open(src) as r:
        chunks = [bytearray(b) for b in sync_mod.source_chunks(r, 0, {}, target, 300 * ELEMS * 4)]
    assert len(chunks) > 1
    seen = _order_seen(monkeypatch, receive, "merged_tensor")
    with Replica.open(dst) as r, r.writing():
        for blob in chunks:
            receive.apply_chunk(r, blob, target, "src")
        receive.finish_sync(r, target, None)
        logged = rec.RecordView(r.record_blob(target), "record").tensor_names()
    assert seen[0] == "z_large" and sorted(seen) == sorted(names)
    assert logged == names
    with Replica.open(dst) as r:
        assert verify(r).ok


def test_a_destination_compressing_plane_by_plane_syncs_exactly(tmp_path, rng, monkeypatch):
    """Whole and partial syncs, with every section of the destination's records compressed a
    byte plane at a time (codec.PLANE_BY_PLANE_BYTES is 4 MiB; here every section qualifies)."""
    from deltalog import codec

    monkeypatch.setattr(codec, "PLANE_BY_PLANE_BYTES", 0)
    src, dst, target, names = _uneven_change(tmp_path, rng)
    other = tmp_path / "other"
    shutil.copytree(dst, other)
    with Replica.open(src) as r:
        (whole,) = list(sync_mod.source_chunks(r, 0, {}, target, 64 << 20))
        chunks = [bytearray(b) for b in sync_mod.source_chunks(r, 0, {}, target, 300 * ELEMS * 4)]
    with Replica.open(dst) as r, r.writing():
        receive.apply_whole(r, bytearray(whole), target, None)
    with Replica.open(other) as r, r.writing():
        for blob in chunks:
            receive.apply_chunk(r, blob, target, "src")
        receive.finish_sync(r, target, None)
    with Replica.open(src) as a:
        for path in (dst, other):
            with Replica.open(path) as b:
                assert b.head == target and verify(b).ok
                assert b.state_digest_at(target) == a.state_digest_at(target)
                for name in names:
                    assert np.array_equal(b.rows_view(name)[:], a.rows_view(name)[:])
                record = rec.RecordView(b.record_blob(target), "record").decode()
                for t in record.tensors:  # the undo values decode to what the rows held before
                    _head, before = values_at(a, 0, {t.name: t.rows})
                    assert np.array_equal(t.old, before[t.name])


@pytest.mark.parametrize("paired", [True, False])
def test_a_source_encodes_tensors_in_pairs_only_for_a_small_chunk(tmp_path, rng, monkeypatch, paired):
    """Pairs cost a second thread's heap: a chunk past PAIRED_CHUNK_BYTES goes one tensor at a time."""
    import threading

    from deltalog import codec

    monkeypatch.setattr(codec, "_THREADS", 2)
    monkeypatch.setattr(sync_mod, "PAIRED_CHUNK_BYTES", (1 << 40) if paired else 0)
    src, _dst, target, _names = _uneven_change(tmp_path, rng)
    threads, values_at = set(), sync_mod.values_at
    monkeypatch.setattr(sync_mod, "values_at",
                        lambda *a, **k: (threads.add(threading.get_ident()), values_at(*a, **k))[1])
    with Replica.open(src) as r:
        (blob,) = list(sync_mod.source_chunks(r, 0, {}, target, 64 << 20))
    assert (threading.get_ident() not in threads) == paired and len(threads) == (2 if paired else 1)
    assert len(blob) > 0
