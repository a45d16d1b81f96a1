"""Golden samples of formats v1 and v2: what an old replica looks like must keep opening.

formats/golden/vN was written once by formats/golden/make_golden.py (v1 by
the code of version 1) and is never regenerated; if these tests fail, the
format changed (see FORMAT.md). v2 adds a row digest file per tensor; a v1
replica opens and reads unchecked, and its first writer upgrades it.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from conftest import REPO, bits

from deltalog import Replica, rowdigest
from deltalog import record as rec
from deltalog import replica as replica_mod
from deltalog.checkpoint import read_checkpoint
from deltalog.errors import UnsupportedVersion
from deltalog.verify import verify

GOLDEN_ROOT = os.path.join(REPO, "formats", "golden")
VERSIONS = ["v1", "v2"]


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
    assert got == expected["records"]


def test_golden_record_files_decode_and_match_the_log(golden):
    path, expected = golden
    with Replica.open(path) as r:
        for entry in expected["records"]:
            with open(os.path.join(expected["dir"], "records", f"{entry['offset']:04d}.dlrc"), "rb") as f:
                blob = f.read()
            assert blob == r.record_blob(entry["offset"])
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


def test_golden_v2_digest_files_hold_the_defined_digests(tmp_path):
    path, expected = _golden("v2", tmp_path)
    with open(os.path.join(path, "DELTALOG")) as f:
        assert f.read() == "deltalog replica\nformat 1\n"  # the read version: v1 readers still open it
    files = _digest_files(path)
    with Replica.open(path) as r:
        assert (r.format_version, r.has_row_digests) == (2, True)
        assert sorted(expected["digests"]) == sorted(r.tensor_names)
        for name, want_hex in expected["digests"].items():
            want = [int(h, 16) for h in want_hex]
            assert files[name] == np.array(want, dtype="<u8").tobytes(), name  # rows x u64 little-endian
            rows = r.rows_view(name)
            assert [rowdigest.reference_digest(row.tobytes()) for row in rows] == want, name
            assert rowdigest.row_digests(rows).tolist() == want, name
        assert r.info("empty").rows == 0 and files["empty"] == b""
        assert verify(r).ok


def test_golden_v2_opens_read_only_for_a_v1_reader(tmp_path, monkeypatch):
    """A v1 reader (FORMAT_VERSION 1) accepts the marker and read_version 1, and refuses to write."""
    path, expected = _golden("v2", tmp_path)
    monkeypatch.setattr(replica_mod, "FORMAT_VERSION", 1)
    with Replica.open(path) as r:
        assert r.head == expected["head"] and r.read_tensor("counts").shape == (7,)
        with pytest.raises(UnsupportedVersion):
            r.commit({"counts": ([0], np.array([5], np.int64))})


def test_golden_v1_reads_unchecked_and_is_upgraded_by_its_first_write(tmp_path):
    path, expected = _golden("v1", tmp_path)
    assert all(d is None for d in _digest_files(path).values())
    with Replica.open(path) as r:
        assert (r.format_version, r.has_row_digests) == (1, False)
        counts = r.read_tensor("counts")  # read without digests
        assert verify(r).ok and r.format_version == 1  # verify only reads: no upgrade
    assert all(d is None for d in _digest_files(path).values())
    with Replica.open(path) as r:
        offset = r.commit({"counts": ([0], np.array([42], np.int64))})
        assert (r.format_version, r.has_row_digests) == (2, True)
        assert offset == expected["head"] + 1
        counts[0] = 42
        assert np.array_equal(r.read_tensor("counts"), counts)
        assert verify(r).ok
    with open(os.path.join(path, "DELTALOG")) as f:
        assert f.read() == "deltalog replica\nformat 1\n"
    files = _digest_files(path)
    with Replica.open(path) as r:
        assert r.format_version == 2 and r.status()["format_version"] == 2
        with r.store.read() as txn:
            assert r.store.get_meta(txn, "format") == {"write_version": 2, "read_version": 1}
        for name in r.tensor_names:
            assert files[name] == rowdigest.row_digests(r.rows_view(name)).astype("<u8").tobytes(), name


def test_golden_v1_upgrade_interrupted_before_its_transaction_is_redone(tmp_path, monkeypatch):
    path, _expected = _golden("v1", tmp_path)

    class Crash(BaseException):
        pass

    def crash(self, fn):
        raise Crash

    with Replica.open(path) as r:
        monkeypatch.setattr(replica_mod.LogStore, "write", crash)  # after the digest files, before meta/format
        with pytest.raises(Crash):
            r.commit({"counts": ([0], np.array([42], np.int64))})
        monkeypatch.undo()
        assert r.format_version == 1
    with open(os.path.join(path, "tensors", "00001.digest"), "r+b") as f:
        f.write(b"\xff" * 8)  # a v1 replica's digest files are ignored, whatever they hold
    with Replica.open(path) as r:
        assert r.format_version == 1 and verify(r).ok
        r.commit({"counts": ([0], np.array([42], np.int64))})
        assert r.format_version == 2
        assert verify(r).ok
        for name in r.tensor_names:
            r.read_tensor(name)  # every row checked against the rewritten digests
