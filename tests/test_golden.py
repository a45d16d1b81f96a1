"""Golden samples of formats v1 to v4: what an old replica looks like must keep opening.

formats/golden/vN was written once by formats/golden/make_golden.py (v1 by
the code of version 1) and is never regenerated; if these tests fail, the
format changed (see FORMAT.md). v2 adds a row digest file per tensor; a v1
replica opens and reads unchecked. v3 stores records of encoding v2 (a
checksum per section) and says so in its marker, which v1 and v2 readers
refuse. v4 adds state digests (in meta/state, every record and every
snapshot manifest) and a sync record's history, keys a v3 reader ignores:
it opens v4 read-only. The first writer of a v1, v2 or v3 replica upgrades
it to v4; its old records stay as they are.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from conftest import REPO, Crash, bits

from deltalog import Replica, lineage, rowdigest
from deltalog import record as rec
from deltalog import layout
from deltalog import store as store_mod
from deltalog.checkpoint import read_checkpoint
from deltalog.errors import UnsupportedVersion
from deltalog.verify import verify

GOLDEN_ROOT = os.path.join(REPO, "formats", "golden")
VERSIONS = ["v1", "v2", "v3", "v4"]


@pytest.fixture(params=VERSIONS)
def golden(request, tmp_path):
    return _golden(request.param, tmp_path)


def _golden(version: str, tmp_path):
    """(a copy of the version's replica, its expected.json plus "dir": the golden directory)."""
    golden_dir = os.path.join(GOLDEN_ROOT, version)
    shutil.copytree(os.path.join(golden_dir, "replica"), tmp_path / "replica")  # opening writes lock.mdb
    with open(os.path.join(golden_dir, "expected.json")) as f:
        return tmp_path / "replica", {**json.load(f), "dir": golden_dir}


def _digest_files(path) -> dict[str, bytes]:
    """tensor name -> the bytes of its tensors/NNNNN.digest (None when there is none)."""
    with Replica.open(path) as r:
        infos = r.tensors
    out = {}
    for info in infos:
        file = os.path.join(path, "tensors", info.digest_file)
        out[info.name] = open(file, "rb").read() if os.path.exists(file) else None
    return out


def test_golden_replica_opens_verifies_and_holds_the_expected_tensors(golden):
    path, expected = golden
    with Replica.open(path) as r:
        assert (r.head, r.model_id, r.bucket_rows) == (expected["head"], expected["model_id"], expected["bucket_rows"])
        assert verify(r).ok
        want = read_checkpoint(os.path.join(expected["dir"], "expected.safetensors"))
        assert sorted(want) == sorted(r.tensor_names)
        for name, tensor in want.items():
            assert tensor.dtype == r.info(name).dtype
            assert np.array_equal(bits(r.read_tensor(name)), bits(tensor.array)), name


def test_golden_log_lists_the_expected_records(golden):
    path, expected = golden
    with Replica.open(path) as r:
        got = [{"offset": s.offset, "base": s.base, "kind": s.kind, "rows": s.rows, "reason": s.reason, "target": s.target}
               for s in r.iter_summaries()]
    listed = ("offset", "base", "kind", "rows", "reason", "target")
    assert got == [{k: e[k] for k in listed} for e in expected["records"]]


def _encoding(blob: bytes) -> int:
    return int.from_bytes(blob[4:6], "big")


def test_golden_record_files_decode_and_match_the_log(golden):
    path, expected = golden
    with Replica.open(path) as r:
        for entry in expected["records"]:
            with open(os.path.join(expected["dir"], "records", f"{entry['offset']:04d}.dlrc"), "rb") as f:
                blob = f.read()
            assert blob == r.record_blob(entry["offset"])
            assert _encoding(blob) == entry.get("encoding", 1)  # formats 1 and 2 hold encoding v1 only
            rec.check(blob)
            record = rec.decode(blob)
            assert (record.offset, record.base, record.kind) == (entry["offset"], entry["base"], entry["kind"])
            assert record.rows == entry["rows"]
            assert all(t.old is not None for t in record.tensors)


def test_golden_replica_accepts_new_commits(golden):
    path, _ = golden
    with Replica.open(path) as r:
        head = r.head
        assert r.commit({"counts": ([0], np.array([42], np.int64))}) == head + 1
        assert verify(r).ok


@pytest.mark.parametrize("version", ["v2", "v3", "v4"])
def test_golden_digest_files_hold_the_defined_digests(tmp_path, version):
    path, expected = _golden(version, tmp_path)
    fmt = expected["format"]
    with open(os.path.join(path, "DELTALOG")) as f:  # the read version: 1 (v1 readers open a v2 replica), then 3
        assert f.read() == f"deltalog replica\nformat {fmt['marker']}\n"
    files = _digest_files(path)
    with Replica.open(path) as r:
        assert (r.format_version, r.has_row_digests) == (fmt["write_version"], True)
        assert sorted(expected["digests"]) == sorted(r.tensor_names)
        for name, want_hex in expected["digests"].items():
            want = [int(h, 16) for h in want_hex]
            assert files[name] == np.array(want, dtype="<u8").tobytes(), name  # rows x u64 little-endian
            rows = r.rows_view(name)
            assert [rowdigest.reference_digest(row.tobytes()) for row in rows] == want, name
            assert rowdigest.row_digests(rows).tolist() == want, name
        assert r.info("empty").rows == 0 and files["empty"] == b""
        assert verify(r).ok


def test_golden_v4_state_digests_are_the_definition(tmp_path):
    """The head's digest is the tensors' by the plain-Python definition, and every record carries the
    digests before and after it, each the one after the record before (the first: the snapshot's)."""
    path, expected = _golden("v4", tmp_path)
    with Replica.open(path) as r:
        assert lineage.to_hex(r.state_digest) == expected["state_digest"]
        assert r.state_digest == _reference_state_digest(r)
        got = [(lineage.to_hex(s.pre_digest), lineage.to_hex(s.post_digest)) for s in r.iter_summaries()]
        assert got == [(e["pre_digest"], e["post_digest"]) for e in expected["records"]]
        snapshot = r.snapshots()[0]
        assert snapshot["state_digest"] == got[0][0]
        assert all(got[i][1] == got[i + 1][0] for i in range(len(got) - 1)) and got[-1][1] == expected["state_digest"]
        for e in expected["records"]:
            assert lineage.to_hex(r.state_digest_at(e["offset"])) == e["post_digest"]


def test_golden_v4_follower_keeps_its_sources_digests_and_history(tmp_path):
    """A follower made by two syncs: its sync records say the source's digests, its log the source's
    records (a rollback with its reason), and diff proves it the same model without reading a row."""
    from deltalog.diff import ReplicaSide, diff
    from deltalog.history import log_entries

    path, expected = _golden("v4", tmp_path)
    follower = tmp_path / "follower"
    shutil.copytree(os.path.join(expected["dir"], "follower"), follower)
    want = expected["follower"]
    with Replica.open(follower) as f, Replica.open(path) as p:
        assert (f.head, lineage.to_hex(f.state_digest)) == (want["head"], want["state_digest"])
        assert verify(f).ok
        records = [{"offset": s.offset, "base": s.base, "kind": s.kind, "rows": s.rows, "target": s.target,
                    "pre_digest": lineage.to_hex(s.pre_digest), "post_digest": lineage.to_hex(s.post_digest)}
                   for s in f.iter_summaries()]
        assert records == want["records"]
        keys = ("offset", "kind", "rows", "target", "reason", "synced_in", "retained")
        assert [{k: e[k] for k in keys} for e in log_entries(f)] == want["log"]
        for offset in (0, 2, 5):
            assert f.state_digest_at(offset) == p.state_digest_at(offset) is not None
        result = diff(ReplicaSide.at(p), ReplicaSide.at(f))
        assert result.identical and result.method == "digest" and result.rows_compared == 0


def test_golden_v4_opens_read_only_for_a_v3_reader(tmp_path, monkeypatch):
    """Format 4 only adds keys a v3 reader ignores (read version 3), but its writers would not keep
    the state digests: v3 code reads it and refuses to write."""
    path, expected = _golden("v4", tmp_path)
    monkeypatch.setattr(layout, "FORMAT_VERSION", 3)
    with Replica.open(path) as r:
        assert r.head == expected["head"] and not r.writable_format
        assert r.read_tensor("counts")[2] == 20
        assert [s.offset for s in r.iter_summaries()] == [e["offset"] for e in expected["records"]]
        with pytest.raises(UnsupportedVersion):
            r.commit({"counts": ([0], np.array([5], np.int64))})


def test_golden_v2_opens_read_only_for_a_v1_reader(tmp_path, monkeypatch):
    """A v1 reader (FORMAT_VERSION 1) accepts the marker and read_version 1, and refuses to write."""
    path, expected = _golden("v2", tmp_path)
    monkeypatch.setattr(layout, "FORMAT_VERSION", 1)
    with Replica.open(path) as r:
        assert r.head == expected["head"] and r.read_tensor("counts").shape == (7,)
        with pytest.raises(UnsupportedVersion):
            r.commit({"counts": ([0], np.array([5], np.int64))})


def test_golden_v3_is_refused_by_v1_and_v2_readers(tmp_path, monkeypatch):
    """Its records are of an encoding they cannot decode: the marker turns them away, and meta/format too."""
    path, _expected = _golden("v3", tmp_path)
    for old in (1, 2):
        monkeypatch.setattr(layout, "FORMAT_VERSION", old)
        with pytest.raises(UnsupportedVersion, match="needs format v3"):
            Replica.open(path)
        with open(os.path.join(path, "DELTALOG"), "w") as f:  # were the marker lost, meta/format still says 3
            f.write("deltalog replica\nformat 1\n")
        with pytest.raises(UnsupportedVersion, match="needs format v3"):
            Replica.open(path)
        _write_v3_marker(path)
    monkeypatch.setattr(rec, "VERSION", 1)  # and a v1 record reader refuses each record
    monkeypatch.setattr(layout, "FORMAT_VERSION", 3)
    with Replica.open(path) as r, pytest.raises(UnsupportedVersion, match="record format v2"):
        list(r.iter_summaries())


def _write_v3_marker(path) -> None:
    with open(os.path.join(path, "DELTALOG"), "w") as f:
        f.write("deltalog replica\nformat 3\n")


def _stored_records(path) -> dict[int, bytes]:
    with Replica.open(path) as r:
        return dict(r.iter_record_blobs())


def _assert_upgraded(path, old_records: dict[int, bytes], new_offset: int) -> None:
    """Marker 3, meta/format {4, 3}, the state digest of the tensors by the definition's plain-Python
    form; the old records are the same bytes, the new one is of encoding v2 and carries the digests."""
    with open(os.path.join(path, "DELTALOG")) as f:
        assert f.read() == "deltalog replica\nformat 3\n"
    with Replica.open(path) as r:
        assert r.format_version == 4 and r.status()["format_version"] == 4 and r.has_row_digests
        with r.store.read() as txn:
            assert r.store.get_meta(txn, "format") == {"write_version": 4, "read_version": 3}
        assert r.state_digest == _reference_state_digest(r)
        assert verify(r).ok
    stored = _stored_records(path)
    assert sorted(stored) == sorted([*old_records, new_offset])
    for offset, blob in old_records.items():
        assert stored[offset] == blob, offset  # never rewritten
    assert _encoding(stored[new_offset]) == 2
    rec.check(stored[new_offset])
    new = rec.summarize(stored[new_offset])
    assert new.pre_digest is not None and new.post_digest is not None


def _reference_state_digest(r: Replica) -> int:
    return lineage.reference_digest((t.id, [row.tobytes() for row in r.rows_view(t.name)]) for t in r.tensors)


def test_golden_v1_reads_unchecked_and_is_upgraded_by_its_first_write(tmp_path):
    path, expected = _golden("v1", tmp_path)
    assert all(d is None for d in _digest_files(path).values())
    with Replica.open(path) as r:
        assert (r.format_version, r.has_row_digests) == (1, False)
        counts = r.read_tensor("counts")  # read without digests
        assert verify(r).ok and r.format_version == 1  # verify only reads: no upgrade
    assert all(d is None for d in _digest_files(path).values())
    old_records = _stored_records(path)
    with Replica.open(path) as r:
        offset = r.commit({"counts": ([0], np.array([42], np.int64))})
        assert (r.format_version, r.has_row_digests) == (4, True)  # straight to 4: digests, records v2, state digest
        assert offset == expected["head"] + 1
        counts[0] = 42
        assert np.array_equal(r.read_tensor("counts"), counts)
        assert verify(r).ok
    _assert_upgraded(path, old_records, offset)
    files = _digest_files(path)
    with Replica.open(path) as r:
        for name in r.tensor_names:
            assert files[name] == rowdigest.row_digests(r.rows_view(name)).astype("<u8").tobytes(), name
        assert r.commit({"counts": ([1], np.array([7], np.int64))}) == offset + 1
        assert verify(r).ok


@pytest.mark.parametrize("version", ["v2", "v3"])
def test_golden_v2_and_v3_are_upgraded_by_their_first_write(tmp_path, version):
    path, expected = _golden(version, tmp_path)
    old_records = _stored_records(path)
    digests_before = _digest_files(path)
    with Replica.open(path) as r:
        assert verify(r).ok and r.format_version == int(version[1])  # verify only reads: no upgrade
        assert r.state_digest is None
        offset = r.commit({"counts": ([0], np.array([42], np.int64))})
        assert offset == expected["head"] + 1 and r.format_version == 4
    _assert_upgraded(path, old_records, offset)
    after = _digest_files(path)
    assert {n: d for n, d in after.items() if n != "counts"} == {n: d for n, d in digests_before.items() if n != "counts"}
    with Replica.open(path) as r:
        assert r.read_tensor("counts")[0] == 42  # checked against its rewritten digest


def _crash(*_args, **_kw):
    raise Crash


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_upgrade_interrupted_before_the_marker_leaves_the_old_format(tmp_path, monkeypatch, version):
    path, expected = _golden(version, tmp_path)
    old = int(version[1])
    old_records = _stored_records(path)
    with Replica.open(path) as r:
        monkeypatch.setattr(layout, "write_marker", _crash)  # after the digest files (from v1)
        with pytest.raises(Crash):
            r.commit({"counts": ([0], np.array([42], np.int64))})
        monkeypatch.undo()
        assert r.format_version == old
    assert _stored_records(path) == old_records
    monkeypatch.setattr(layout, "FORMAT_VERSION", old)  # the old version's code still opens it, as it was
    with Replica.open(path) as r:
        assert r.head == expected["head"] and verify(r).ok
    monkeypatch.undo()
    with Replica.open(path) as r:
        offset = r.commit({"counts": ([0], np.array([42], np.int64))})
    _assert_upgraded(path, old_records, offset)


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_upgrade_interrupted_between_marker_and_meta_is_redone(tmp_path, monkeypatch, version):
    """Marker 3, meta/format still old: older readers refuse it, this one reads it as the old format, and
    its next writer finishes the upgrade. No record of encoding v2 exists before meta/format says 3."""
    path, expected = _golden(version, tmp_path)
    old = int(version[1])
    old_records = _stored_records(path)
    with Replica.open(path) as r:
        monkeypatch.setattr(store_mod.LogStore, "write", _crash)  # the marker is written, meta/format not yet
        with pytest.raises(Crash):
            r.commit({"counts": ([0], np.array([42], np.int64))})
        monkeypatch.undo()
        assert r.format_version == old and r.record_encoding == 1
    with open(os.path.join(path, "DELTALOG")) as f:
        assert f.read() == "deltalog replica\nformat 3\n"
    assert _stored_records(path) == old_records
    if version == "v1":
        with open(os.path.join(path, "tensors", "00001.digest"), "r+b") as f:
            f.write(b"\xff" * 8)  # a v1 replica's digest files are ignored, whatever they hold
    monkeypatch.setattr(layout, "FORMAT_VERSION", old)
    with pytest.raises(UnsupportedVersion):
        Replica.open(path)
    monkeypatch.undo()
    with Replica.open(path) as r:
        assert r.format_version == old and r.head == expected["head"] and verify(r).ok
        offset = r.commit({"counts": ([0], np.array([42], np.int64))})
        assert r.format_version == 4
        for name in r.tensor_names:
            r.read_tensor(name)  # every row checked against the (rewritten) digests
    _assert_upgraded(path, old_records, offset)


def test_a_writer_that_opened_before_another_process_upgraded_writes_v2_records(tmp_path):
    path, expected = _golden("v2", tmp_path)
    early = Replica.open(path)  # stands for another process: its own handle, opened at format 2
    try:
        with Replica.open(path) as r:
            r.commit({"counts": ([0], np.array([42], np.int64))})
        assert early.record_encoding == 1
        offset = early.commit({"counts": ([1], np.array([43], np.int64))})  # re-reads meta/format under the lock
        assert early.format_version == 4 and _encoding(early.record_blob(offset)) == 2
        assert verify(early).ok
    finally:
        early.close()


def _sync(src, dst) -> None:
    from deltalog import sync as sync_mod
    from deltalog.transport import TransportOptions, open_sink, open_source

    source = open_source(str(src), TransportOptions())
    try:
        sink = open_sink(str(dst), TransportOptions())
        try:
            assert sync_mod.sync(source, sink, source_name=str(src), destination_name=str(dst)).complete
        finally:
            sink.close()
    finally:
        source.close()


def test_sync_between_formats(tmp_path):
    """A format 2 source feeds a new destination: being a source upgrades it (its state digest is
    computed once, under its lock); then it feeds a format 2 destination, which its first write
    upgrades. Both store encoding v2 and agree on the state digest."""
    a, _ = _golden("v2", tmp_path / "a")
    b, expected = _golden("v2", tmp_path / "b")
    c = tmp_path / "c"
    _sync(a, c)
    with Replica.open(a) as r:
        assert r.format_version == 4 and r.state_digest == _reference_state_digest(r)
    with Replica.open(c) as r:
        assert r.format_version == 4 and verify(r).ok
        assert {_encoding(blob) for _o, blob in r.iter_record_blobs()} == {2}
    b_records = _stored_records(b)
    with Replica.open(a) as r:
        offset = r.commit({"counts": ([3], np.array([-3], np.int64))})
    _sync(a, b)
    _assert_upgraded(b, b_records, offset)
    with Replica.open(a) as ra, Replica.open(b) as rb:
        assert ra.state_digest == rb.state_digest
        for name in ra.tensor_names:
            assert np.array_equal(bits(ra.read_tensor(name)), bits(rb.read_tensor(name))), name
