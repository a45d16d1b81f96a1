"""Unit tests of the array codecs and the record encoding (format v1)."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from deltalog import codec
from deltalog import record as rec
from deltalog.dtypes import STORAGE
from deltalog.errors import IntegrityError, UnsupportedVersion


def make_record(rng, dtype="float32", k=5, row_elems=3, with_old=True, versions=False) -> rec.Record:
    storage = STORAGE[dtype]
    rows = np.unique(rng.integers(0, 10_000, size=k)).astype(np.uint64)
    raw = rng.integers(0, 256, size=(len(rows), row_elems * storage.itemsize), dtype=np.uint8)
    new = raw.view(storage) if dtype != "bool" else (raw % 2).astype(bool)
    old = np.flip(new, axis=0).copy() if with_old else None
    return rec.Record(
        offset=7, base=6, kind="commit", time=123.5, model_id="m",
        tensors=[rec.TensorDelta("t", dtype, rows, np.ascontiguousarray(new), old,
                                 rows * 3 if versions else None, 2.5)],
    )


@pytest.mark.parametrize("dtype", sorted(STORAGE))
def test_record_round_trips_every_dtype_bitwise(rng, dtype):
    r = make_record(rng, dtype)
    back = rec.decode(rec.encode(r))
    t, u = r.tensors[0], back.tensors[0]
    assert (back.offset, back.base, back.kind, back.model_id) == (7, 6, "commit", "m")
    assert np.array_equal(t.rows, u.rows)
    assert t.new.tobytes() == u.new.tobytes() and t.old.tobytes() == u.old.tobytes()
    assert u.dtype == dtype and u.versions is None


def test_versions_and_missing_old_round_trip(rng):
    r = make_record(rng, with_old=False, versions=True)
    back = rec.decode(rec.encode(r)).tensors[0]
    assert back.old is None
    assert np.array_equal(back.versions, r.tensors[0].versions)


def test_contiguous_rows_cost_almost_nothing():
    rows = np.arange(1_000_000, dtype=np.uint64)
    payload, size = codec.encode_indices(rows)
    assert size > 1_000_000  # one byte per gap before compression
    assert len(payload) < 1_000  # a run of 1s
    assert np.array_equal(codec.decode_indices(payload, size, len(rows), "t"), rows)


def test_layout_matches_the_spec(rng):
    blob = rec.encode(make_record(rng))
    magic, version, flags, hlen = struct.unpack_from(">4sHHI", blob)
    assert (magic, version, flags) == (b"DLRC", 1, 0)
    (trailer,) = struct.unpack_from(">Q", blob, len(blob) - 8)
    assert trailer == xxhash.xxh3_64_intdigest(blob[:-8])
    header = rec.unpack(blob[12 : 12 + hlen], "t")
    sections = header["tensors"][0]["sections"]
    assert [sections[k][0] for k in ("index", "new", "old")] == ["delta-zstd", "shuffle-zstd", "xor-shuffle-zstd"]
    assert 12 + hlen + sum(s[1] for s in sections.values()) + 8 == len(blob)


def test_summary_needs_no_decompression(rng):
    r = make_record(rng, k=50)
    s = rec.summarize(rec.encode(r))
    assert (s.offset, s.base, s.kind, s.rows, s.significance) == (7, 6, "commit", len(r.tensors[0].rows), 2.5)


def test_flipped_byte_is_detected_anywhere(rng):
    blob = rec.encode(make_record(rng))
    for pos in range(0, len(blob), 7):
        bad = bytearray(blob)
        bad[pos] ^= 0x40
        with pytest.raises(IntegrityError):
            rec.decode(bytes(bad))


def test_truncation_is_detected(rng):
    blob = rec.encode(make_record(rng))
    for cut in (0, 5, 12, len(blob) // 2, len(blob) - 1):
        with pytest.raises(IntegrityError):
            rec.decode(blob[:cut])


def test_newer_record_version_is_refused(rng):
    blob = bytearray(rec.encode(make_record(rng)))
    struct.pack_into(">H", blob, 4, 2)
    body = bytes(blob[:-8])
    blob[-8:] = struct.pack(">Q", xxhash.xxh3_64_intdigest(body))
    with pytest.raises(UnsupportedVersion):
        rec.decode(bytes(blob))


def test_decoder_refuses_to_inflate_beyond_declared_size():
    bomb = codec.compress(bytes(10_000_000))
    with pytest.raises(IntegrityError):
        codec.decompress(bomb, 1000, "bomb")


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=2048))
def test_random_bytes_never_crash_the_decoder(data):
    try:
        rec.decode(data)
    except (IntegrityError, UnsupportedVersion):
        pass
    try:
        rec.summarize(data)
    except (IntegrityError, UnsupportedVersion):
        pass


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_mutated_valid_records_never_crash_the_decoder(data):
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    blob = bytearray(rec.encode(make_record(rng, k=data.draw(st.integers(1, 40)))))
    for _ in range(data.draw(st.integers(1, 4))):
        blob[data.draw(st.integers(0, len(blob) - 1))] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(blob)))
    try:
        rec.decode(bytes(blob[:cut]))
    except (IntegrityError, UnsupportedVersion):
        pass


@given(st.lists(st.integers(0, 2**64 - 1), unique=True, max_size=300))
@settings(max_examples=100, deadline=None)
def test_index_codec_round_trips(values):
    rows = np.array(sorted(values), dtype=np.uint64)
    payload, size = codec.encode_indices(rows)
    assert np.array_equal(codec.decode_indices(payload, size, len(rows), "t"), rows)


def test_rows_only_decode_skips_values(rng):
    r = make_record(rng, k=30)
    back = rec.decode(rec.encode(r), rows_only=True).tensors[0]
    assert np.array_equal(back.rows, r.tensors[0].rows)
    assert back.new.shape == (0, r.tensors[0].new.shape[1]) and back.old is None


def test_sections_kept_from_a_decode_are_stored_as_they_came(rng, monkeypatch):
    """A sync destination stores the sections it received: re-encoding reuses them byte for byte."""
    chunk = make_record(rng, k=40, with_old=False, versions=True)
    chunk.kind, chunk.offset = "sync", 9
    blob = rec.encode(chunk)
    got = rec.decode(blob, keep_encoded=True)
    assert sorted(got.tensors[0].encoded) == ["index", "new", "versions"]
    with monkeypatch.context() as m:  # nothing may be compressed again
        m.setattr(codec, "encode_values", lambda *a: pytest.fail("re-encoded a kept section"))
        m.setattr(codec, "encode_indices", lambda *a: pytest.fail("re-encoded a kept section"))
        assert rec.encode(got) == blob
    t = got.tensors[0]
    t.old = np.flip(t.new, axis=0).copy()  # the destination adds its own undo values
    stored = rec.decode(rec.encode(got)).tensors[0]
    assert stored.new.tobytes() == chunk.tensors[0].new.tobytes()
    assert stored.old.tobytes() == t.old.tobytes()
    assert np.array_equal(stored.versions, chunk.tensors[0].versions)
    assert np.array_equal(stored.rows, chunk.tensors[0].rows)
    # Reuse must be asked for: a plain decode keeps nothing.
    assert rec.decode(blob).tensors[0].encoded is None
