"""Unit tests of the array codecs and the record encodings (v1: one trailer; v2: header and per-section checksums)."""

from __future__ import annotations

import os
import struct
import subprocess
import sys

import numpy as np
import pytest
import xxhash
from conftest import in_forked_child
from hypothesis import given, settings
from hypothesis import strategies as st

from deltalog import codec
from deltalog import record as rec
from deltalog.dtypes import STORAGE
from deltalog.errors import IntegrityError, UnsupportedVersion
from record_layout import v2_spans


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


ENCODINGS = [1, 2]


def two_tensor_record(rng) -> rec.Record:
    """A record of tensors "a" and "b", both with old values and versions: every kind of section."""
    r = make_record(rng, k=40, versions=True)
    b = make_record(rng, "float64", k=30, row_elems=5, versions=True).tensors[0]
    r.tensors[0].name, b.name = "a", "b"
    r.tensors.append(b)
    return r


def flipped(blob: bytes, pos: int) -> bytes:
    bad = bytearray(blob)
    bad[pos] ^= 0x40
    return bytes(bad)


@pytest.mark.parametrize("version", ENCODINGS)
@pytest.mark.parametrize("dtype", sorted(STORAGE))
def test_record_round_trips_every_dtype_bitwise(rng, dtype, version):
    r = make_record(rng, dtype)
    back = rec.decode(rec.encode(r, version))
    t, u = r.tensors[0], back.tensors[0]
    assert (back.offset, back.base, back.kind, back.model_id) == (7, 6, "commit", "m")
    assert np.array_equal(t.rows, u.rows)
    assert t.new.tobytes() == u.new.tobytes() and t.old.tobytes() == u.old.tobytes()
    assert u.dtype == dtype and u.versions is None


@pytest.mark.parametrize("version", ENCODINGS)
def test_versions_and_missing_old_round_trip(rng, version):
    r = make_record(rng, with_old=False, versions=True)
    back = rec.decode(rec.encode(r, version)).tensors[0]
    assert back.old is None
    assert np.array_equal(back.versions, r.tensors[0].versions)


def test_contiguous_rows_cost_almost_nothing():
    rows = np.arange(1_000_000, dtype=np.uint64)
    payload, size = codec.encode_indices(rows)
    assert size > 1_000_000  # one byte per gap before compression
    assert len(payload) < 1_000  # a run of 1s
    assert np.array_equal(codec.decode_indices(payload, size, len(rows), "t"), rows)


def test_v1_layout_matches_the_spec(rng):
    blob = rec.encode(make_record(rng), version=1)
    magic, version, flags, hlen = struct.unpack_from(">4sHHI", blob)
    assert (magic, version, flags) == (b"DLRC", 1, 0)
    (trailer,) = struct.unpack_from(">Q", blob, len(blob) - 8)
    assert trailer == xxhash.xxh3_64_intdigest(blob[:-8])
    header = rec.unpack(blob[12 : 12 + hlen], "t")
    sections = header["tensors"][0]["sections"]
    assert [sections[k][0] for k in ("index", "new", "old")] == ["delta-zstd", "shuffle-zstd", "xor-shuffle-zstd"]
    assert 12 + hlen + sum(s[1] for s in sections.values()) + 8 == len(blob)


def test_v2_layout_matches_the_spec(rng):
    blob = rec.encode(two_tensor_record(rng), version=2)
    magic, version, flags, hlen = struct.unpack_from(">4sHHI", blob)
    assert (magic, version, flags) == (b"DLRC", 2, 0)
    (header_sum,) = struct.unpack_from(">Q", blob, 12 + hlen)
    assert header_sum == xxhash.xxh3_64_intdigest(blob[: 12 + hlen])
    header = rec.unpack(blob[12 : 12 + hlen], "t")
    pos = 12 + hlen + 8
    for t in header["tensors"]:
        assert list(t["sections"]) == ["index", "new", "old", "versions"]  # in the order they follow each other
        for key in ("index", "new", "old", "versions"):
            codec_name, stored, _decoded, digest = t["sections"][key]
            assert digest == xxhash.xxh3_64_intdigest(blob[pos : pos + stored]), (t["name"], key)
            pos += stored
    assert pos == len(blob)  # no trailer: the sections end the record


@pytest.mark.parametrize("version", ENCODINGS)
def test_summary_needs_no_decompression(rng, version):
    r = make_record(rng, k=50)
    s = rec.summarize(rec.encode(r, version))
    assert (s.offset, s.base, s.kind, s.rows, s.significance) == (7, 6, "commit", len(r.tensors[0].rows), 2.5)


@pytest.mark.parametrize("version", ENCODINGS)
def test_flipped_byte_is_detected_anywhere(rng, version):
    blob = rec.encode(two_tensor_record(rng), version)
    rec.check(blob)
    for pos in range(len(blob)):
        bad = flipped(blob, pos)
        # A damaged version field can read as a newer encoding, which is refused as such (exit 4).
        refusal = (IntegrityError, UnsupportedVersion) if pos in (4, 5) else IntegrityError
        with pytest.raises(refusal):
            rec.check(bad)
        with pytest.raises(refusal):
            rec.decode(bad)


@pytest.mark.parametrize("version", ENCODINGS)
def test_truncation_is_detected(rng, version):
    blob = rec.encode(make_record(rng), version)
    for cut in (0, 5, 12, 19, 20, len(blob) // 2, len(blob) - 1):
        with pytest.raises(IntegrityError):
            rec.decode(blob[:cut])
        with pytest.raises(IntegrityError):
            rec.check(blob[:cut])


@pytest.mark.parametrize("version", ENCODINGS)
def test_bytes_after_the_last_section_are_refused(rng, version):
    blob = rec.encode(make_record(rng), version)
    if version == 1:  # the trailer moves: re-sign the longer record so only the layout can tell
        body = blob[:-8] + b"\0"
        longer = body + struct.pack(">Q", xxhash.xxh3_64_intdigest(body))
    else:
        longer = blob + b"\0"
    for read in (rec.check, rec.decode, lambda b: rec.decode(b, rows_only=True)):
        with pytest.raises(IntegrityError, match="unexplained bytes"):
            read(longer)


def test_newer_record_version_is_refused(rng):
    blob = bytearray(rec.encode(make_record(rng), version=2))
    struct.pack_into(">H", blob, 4, 3)
    (hlen,) = struct.unpack_from(">I", blob, 8)
    struct.pack_into(">Q", blob, 12 + hlen, xxhash.xxh3_64_intdigest(bytes(blob[: 12 + hlen])))
    for read in (rec.decode, rec.check, rec.summarize):
        with pytest.raises(UnsupportedVersion):
            read(bytes(blob))


def test_a_v1_reader_refuses_a_v2_record(rng, monkeypatch):
    blob = rec.encode(make_record(rng), version=2)
    monkeypatch.setattr(rec, "VERSION", 1)
    with pytest.raises(UnsupportedVersion, match="record format v2"):
        rec.decode(blob)


def test_v2_reader_checks_exactly_the_sections_it_decodes(rng):
    r = two_tensor_record(rng)
    blob = rec.encode(r, version=2)
    spans = v2_spans(blob)[1]
    for (name, key), (start, stop) in spans.items():
        bad = flipped(blob, (start + stop) // 2)
        with pytest.raises(IntegrityError, match=f"checksum mismatch \\(tensor '{name}', section {key}\\)"):
            rec.check(bad)
        with pytest.raises(IntegrityError):
            rec.decode(bad)  # every section decoded, every section checked
        rec.summarize(bad)  # the header alone: intact
        other = "b" if name == "a" else "a"
        assert rec.decode(bad, only={other}).tensors[0].name == other  # the damage is in a section not read
        if key in ("index", "versions"):
            with pytest.raises(IntegrityError):
                rec.decode(bad, rows_only=True)
            with pytest.raises(IntegrityError):
                rec.decode(bad, only={name}, with_old=False)
        else:  # values are not read for the rows
            back = rec.decode(bad, rows_only=True)
            assert [np.array_equal(t.rows, u.rows) for t, u in zip(back.tensors, r.tensors)] == [True, True]
            with pytest.raises(IntegrityError):
                rec.decode(bad, only={name})
        if key == "old":
            assert rec.decode(bad, with_old=False).tensors[1 if name == "b" else 0].old is None
        # A caller that ran check() itself says so: nothing is hashed again.
        assert rec.decode(blob, checked=True).rows == r.rows


def test_v2_header_damage_is_seen_by_every_reader(rng):
    blob = rec.encode(two_tensor_record(rng), version=2)
    (hlen,) = struct.unpack_from(">I", blob, 8)
    for pos in [*range(6, 8), *range(12, 12 + hlen + 8)]:  # flags, header, header checksum
        bad = flipped(blob, pos)
        for read in (rec.check, rec.decode, rec.summarize, lambda b: rec.decode(b, rows_only=True),
                     lambda b: rec.decode(b, only=set())):
            with pytest.raises(IntegrityError):
                read(bad)


def test_a_view_checks_each_section_once(rng, monkeypatch):
    blob = rec.encode(two_tensor_record(rng), version=2)
    hashed = []
    real = xxhash.xxh3_64_intdigest
    monkeypatch.setattr(xxhash, "xxh3_64_intdigest", lambda data: hashed.append(len(data)) or real(data))
    view = rec.RecordView(blob)
    assert len(hashed) == 1  # the header
    view.decode(rows_only=True)
    assert len(hashed) == 1 + 4  # index and versions of each tensor
    view.decode()
    assert len(hashed) == 1 + 8  # then new and old, once
    view.check()
    assert len(hashed) == 1 + 8


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
    version = data.draw(st.sampled_from(ENCODINGS))
    blob = bytearray(rec.encode(make_record(rng, k=data.draw(st.integers(1, 40))), version))
    for _ in range(data.draw(st.integers(1, 4))):
        blob[data.draw(st.integers(0, len(blob) - 1))] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(blob)))
    for read in (rec.decode, rec.check, rec.summarize, lambda b: rec.decode(b, rows_only=True)):
        try:
            read(bytes(blob[:cut]))
        except (IntegrityError, UnsupportedVersion):
            pass


@given(st.lists(st.integers(0, 2**64 - 1), unique=True, max_size=300))
@settings(max_examples=100, deadline=None)
def test_index_codec_round_trips(values):
    rows = np.array(sorted(values), dtype=np.uint64)
    payload, size = codec.encode_indices(rows)
    assert np.array_equal(codec.decode_indices(payload, size, len(rows), "t"), rows)


@pytest.mark.parametrize("version", ENCODINGS)
def test_rows_only_decode_skips_values(rng, version):
    r = make_record(rng, k=30)
    back = rec.decode(rec.encode(r, version), rows_only=True).tensors[0]
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


@pytest.mark.parametrize("received, stored", [(1, 2), (2, 1), (2, 2)])
def test_kept_sections_move_between_encodings(rng, monkeypatch, received, stored):
    """A chunk arrives v1 (the wire) and is stored v2 (the log): the sections are the same bytes, hashed anew."""
    chunk = make_record(rng, k=40, with_old=False, versions=True)
    chunk.kind, chunk.offset = "sync", 9
    blob = rec.encode(chunk, version=received)
    got = rec.decode(blob, keep_encoded=True)
    got.tensors[0].old = np.flip(got.tensors[0].new, axis=0).copy()
    with monkeypatch.context() as m:  # the kept sections are not compressed again
        m.setattr(codec, "encode_values", lambda *a: pytest.fail("re-encoded a kept section"))
        m.setattr(codec, "encode_indices", lambda *a: pytest.fail("re-encoded a kept section"))
        m.setattr(codec, "encode_xor_values", lambda old, new, **_: (codec.compress(b"x" * old.nbytes), old.nbytes))
        out = rec.encode(got, version=stored)
    assert struct.unpack_from(">H", out, 4) == (stored,)
    rec.check(out)
    back = rec.decode(out, with_old=False).tensors[0]
    want = chunk.tensors[0]
    assert np.array_equal(back.rows, want.rows) and np.array_equal(back.versions, want.versions)
    assert back.new.tobytes() == want.new.tobytes()


@pytest.mark.parametrize("width", [1, 2, 4, 8])
def test_index_codec_refuses_a_repeated_row_in_every_width(width):
    rows = np.array([3, 3 + (1 << (8 * width - 1)), 2 * 3 + (1 << (8 * width - 1))], dtype=np.uint64)
    payload, size = codec.encode_indices(rows)
    assert codec.decompress(payload, size, "t")[0] == width
    assert np.array_equal(codec.decode_indices(payload, size, len(rows), "t"), rows)
    raw = bytearray(codec.decompress(payload, size, "t"))
    raw[1 + 1] = raw[1 + 2] = 0  # the low byte plane: gaps 1 and 2 lose their low bytes
    for j in range(1, width):
        raw[1 + j * 3 + 1] = raw[1 + j * 3 + 2] = 0  # and every other plane: both gaps become 0
    with pytest.raises(IntegrityError, match="not strictly increasing"):
        codec.decode_indices(codec.compress(bytes(raw)), len(raw), len(rows), "t")


def test_a_child_forked_after_a_parallel_encode_encodes_too():
    """run_jobs keeps a thread pool, and zstd contexts keep threads too; a forked child has none of them."""
    big = np.random.default_rng(0).standard_normal((4, 1 << 18)).astype(np.float32)  # 4 MiB: the parallel path
    codec.encode_values(np.tile(big, 2))  # 8 MiB: zstd's own worker threads, whose context the child must not free
    jobs = [lambda row=row: codec.encode_values(row) for row in big]
    want = [payload for payload, _size in codec.run_jobs(jobs, big.nbytes)]
    in_forked_child(lambda: [payload for payload, _size in codec.run_jobs(jobs, big.nbytes)] == want)


_RETAINED_AFTER_LARGE_SECTIONS = """
import numpy as np
from deltalog import codec
def anon_mib():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssAnon")) / 1024
planes = codec.shuffle(np.random.default_rng(0).standard_normal(8 << 20).astype(np.float32))  # 32 MiB
before = anon_mib()
codec.run_jobs([lambda: len(codec.compress(planes))] * 2, 2 * planes.nbytes)  # on the pool's threads
codec.compress(planes)  # and on this one
print(anon_mib() - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_large_sections_leave_no_compression_buffers_behind():
    """zstd's multithreaded context keeps its workers' buffers for as long as it lives (16 MiB
    after a 32 MiB input): kept per thread, every thread that once compressed a large section
    held them (a sync destination's peak memory, issue 15)."""
    # A fixed mmap threshold: freed buffers go back to the system, not to malloc's arenas,
    # so what is left is what is still allocated.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 << 10)}
    out = subprocess.run([sys.executable, "-c", _RETAINED_AFTER_LARGE_SECTIONS], env=env, check=True,
                         capture_output=True, text=True).stdout
    assert float(out) < 8, f"{float(out):.1f} MiB of anonymous memory kept after compressing"


@pytest.mark.skipif(codec._THREADS < 2, reason="one core: zstd's own workers are never asked for")
def test_sections_side_by_side_compress_on_one_thread_each(monkeypatch):
    """The section pool already puts one section on each core: a multithreaded zstd context
    there would only add workers (and their buffers). Alone, a large section gets one."""
    asked = []
    parameters = codec._parameters
    monkeypatch.setattr(codec, "_parameters", lambda threads: asked.append(threads) or parameters(threads))
    planes = codec.shuffle(np.random.default_rng(0).standard_normal(2 << 20).astype(np.float32))  # 8 MiB
    codec.run_jobs([lambda: codec.compress(planes)] * 2, 2 * planes.nbytes)
    assert all(threads == 0 for threads in asked), asked
    codec.compress(planes)
    assert asked[-1] == codec._THREADS


@pytest.mark.parametrize("compiled", [True, False])
@pytest.mark.parametrize("dtype", sorted(STORAGE))
def test_an_undo_section_computed_in_place_is_the_same_bytes(rng, dtype, compiled):
    """A destination that is done with its old values lets the xor overwrite them: same section.
    (The compiled loops XOR while they make the byte planes and need no temporary at all.)"""
    from deltalog import kernels

    if compiled and not kernels.available():
        pytest.skip("deltalog._kernels was not built")
    before = kernels.set_enabled(compiled)
    try:
        t = make_record(rng, dtype, k=300, row_elems=7, versions=True).tensors[0]
        want = rec.compressed(t).encoded
        spoilt = t.old.copy()
        assert codec.encode_xor_values(spoilt, t.new, in_place=True) == want["old"]
        if not compiled:  # no copy made: the xor went into the old values
            assert spoilt.tobytes() == np.bitwise_xor(t.old.view(np.uint8), t.new.view(np.uint8)).tobytes()
        got = rec.compressed(rec.TensorDelta(t.name, t.dtype, t.rows, t.new, t.old.copy(), t.versions), spoil_old=True)
        assert got.encoded == want and got.old is None and len(got.new) == 0
    finally:
        kernels.set_enabled(before)


def test_encode_parts_join_to_the_record(rng):
    r = make_record(rng, k=50, versions=True)
    for version in ENCODINGS:
        assert b"".join(rec.encode_parts(r, version)) == rec.encode(r, version)


# -- values relative to the destination's (a sync chunk's base-xor codec) -------------------


def test_values_relative_to_a_nearby_base_cost_fewer_bytes(rng):
    """What the codec is for: training moves values a little, so XORed with what the destination
    holds, the sign, exponent and top mantissa bits cancel."""
    base = (rng.random((20_000, 64), dtype=np.float32) - np.float32(0.5)) * np.float32(0.1)
    new = base - np.float32(0.001) * rng.standard_normal(base.shape, dtype=np.float32)
    assert len(codec.encode_xor_values(base, new)[0]) < 0.9 * len(codec.encode_values(new)[0])


def chunk_with_base(rng, dtype="float32"):
    r = make_record(rng, dtype, k=50, with_old=False, versions=True)
    t = r.tensors[0]
    base = np.ascontiguousarray(np.flip(t.new, axis=0))
    r.kind = "sync"
    r.tensors = [rec.TensorDelta(t.name, t.dtype, t.rows, t.new, None, t.versions, 1.0, base=base)]
    return r, t.new, base


@pytest.mark.parametrize("version", ENCODINGS)
@pytest.mark.parametrize("dtype", sorted(STORAGE))
def test_a_chunk_relative_to_the_destination_decodes_only_with_its_values(rng, version, dtype):
    r, new, base = chunk_with_base(rng, dtype)
    blob = rec.encode(r, version)
    view = rec.RecordView(blob)
    assert view.needs_base(0)
    back = view.new_values(0, base=base)
    assert back.dtype == new.dtype and back.tobytes() == new.tobytes()  # any bits: NaNs, infinities
    with pytest.raises(IntegrityError, match="relative to a destination"):
        view.new_values(0)
    with pytest.raises(IntegrityError, match="relative to a destination"):
        rec.decode(blob)  # verify, replay and the log never see such a record; a reader of one refuses it


@pytest.mark.parametrize("stored", ENCODINGS)
def test_a_relative_section_is_the_destinations_undo_as_it_came(rng, stored):
    """The destination stores the section it received as its undo section (no second compression):
    new XOR base, decoded against the new values, is the base it held."""
    r, new, base = chunk_with_base(rng)
    kept = rec.decode(rec.encode(r, 1), rows_only=True, keep_encoded=True).tensors[0]
    assert set(kept.encoded) == {"index", "old", "versions"}  # never the new values as they came
    mine = rec.TensorDelta(kept.name, kept.dtype, kept.rows, new, base.copy(), kept.versions, 1.0, kept.encoded)
    record = rec.Record(offset=7, base=6, kind="sync", time=1.0, model_id="m", tensors=[rec.compressed(mine)])
    blob = rec.encode(record, stored)
    assert bytes(kept.encoded["old"][0]) in blob
    back = rec.decode(blob).tensors[0]
    assert back.new.tobytes() == new.tobytes() and back.old.tobytes() == base.tobytes()


def test_compressed_keeps_the_codec_of_new_values(rng):
    r, new, base = chunk_with_base(rng)
    r.tensors = [rec.compressed(r.tensors[0])]
    assert r.tensors[0].base is None and r.tensors[0].new_codec == codec.BASE_XOR_VALUES
    view = rec.RecordView(rec.encode(r, 1))
    assert view.new_values(0, base=base).tobytes() == new.tobytes()


def test_new_values_of_an_unknown_codec_are_refused(rng):
    r = make_record(rng, with_old=False)
    r.tensors[0].new_codec = "lz4-someday"
    with pytest.raises(IntegrityError, match="unknown codec 'lz4-someday'"):
        rec.decode(rec.encode(r, 2))


def _recording_job(costs: dict, log: list, fail: str | None = None):
    """A job that notes what is in flight (by cost) while it runs, and returns its item doubled."""
    import threading
    import time

    lock = threading.Lock()
    running: dict = {}

    def job(item):
        with lock:
            running[item] = costs[item]
            log.append(sum(running.values()))
        time.sleep(0.03)
        with lock:
            del running[item]
        if item == fail:
            raise ValueError(item)
        return item * 2

    return job


def test_pairs_run_two_at_a_time_within_the_costliest_alone_and_keep_their_order(monkeypatch):
    monkeypatch.setattr(codec, "_THREADS", 2)
    costs = {"a": 4 << 20, "big": 10 << 20, "b": 3 << 20, "c": 3 << 20, "d": 6 << 20}
    in_flight: list = []
    items = list(costs)
    out = codec.map_in_pairs(_recording_job(costs, in_flight), items, [costs[i] for i in items])
    assert out == [i * 2 for i in items]
    assert max(in_flight) <= costs["big"]  # never more than the costliest held alone
    assert max(in_flight) > max(costs[i] for i in items if i != "big")  # but pairs did run together


def test_pairs_stop_at_a_failure_with_nothing_left_running(monkeypatch):
    monkeypatch.setattr(codec, "_THREADS", 2)
    costs = {"a": 4 << 20, "b": 4 << 20, "c": 4 << 20, "d": 4 << 20}
    in_flight: list = []
    items = list(costs)
    job = _recording_job(costs, in_flight, fail="a")
    with pytest.raises(ValueError):
        codec.map_in_pairs(job, items, [costs[i] for i in items])
    started = len(in_flight)
    assert started < len(items)  # stopped submitting
    import time
    time.sleep(0.1)
    assert len(in_flight) == started  # and nothing was still queued to start


def test_small_work_is_not_handed_to_threads(monkeypatch):
    import threading

    seen = []
    codec.map_in_pairs(lambda i: seen.append(threading.get_ident()), [1, 2, 3], [100, 100, 100])
    assert set(seen) == {threading.get_ident()}


@pytest.mark.parametrize("dtype", ["float32", "float16", "float64", "int32", "uint16"])
def test_values_compressed_a_plane_at_a_time_decode_as_the_one_pass_ones(monkeypatch, dtype):
    rng = np.random.default_rng(7)
    new = (rng.standard_normal((3000, 7)) * 1000).astype(dtype)
    old = (new.astype(np.float64) + rng.integers(-2, 3, new.shape)).astype(dtype)
    monkeypatch.setattr(codec, "PLANE_BY_PLANE_BYTES", 0)
    for encode, decode, args in (
        (codec.encode_values, lambda p, n: codec.decode_values(p, n, new.dtype, new.shape, "t"), (new,)),
        (codec.encode_xor_values, lambda p, n: codec.decode_xor_values(p, n, new, "t"), (old, new)),
    ):
        by_plane, size = encode(*args, by_plane=True)
        one_pass, one_size = encode(*args)
        assert size == one_size == new.nbytes
        assert codec.decompress(by_plane, size, "t") == codec.decompress(one_pass, size, "t")  # the same planes
        assert np.array_equal(decode(bytes(by_plane), size), args[0])


def test_a_large_section_compressed_a_plane_at_a_time_holds_no_copy_of_its_values(monkeypatch):
    """A sync destination's memory follows the change: the one-pass kernel makes every byte
    plane at once (a copy of the values) before zstd reads them; plane by plane holds one."""
    import tracemalloc

    rng = np.random.default_rng(8)
    new = rng.standard_normal((40000, 64)).astype(np.float32)  # ~10 MiB
    old = new + np.float32(1e-3)
    monkeypatch.setattr(codec, "PLANE_BY_PLANE_BYTES", 1 << 20)
    peaks = {}
    for by_plane in (False, True):
        tracemalloc.start()
        try:
            codec.encode_xor_values(old, new, by_plane=by_plane)
            peaks[by_plane] = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    # Plane by plane: a quarter of the values for the plane, and the output's worst case
    # (allocated, its pages untouched until written). One pass: the planes and that output.
    assert peaks[True] < 1.5 * new.nbytes < peaks[False], peaks
