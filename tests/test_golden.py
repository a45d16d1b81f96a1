"""Golden samples of format v1: what an old replica looks like must keep opening.

formats/golden/v1 was written once by formats/golden/make_golden.py and is
never regenerated; if these tests fail, the format changed (see FORMAT.md).
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from conftest import REPO, bits

from deltalog import Replica
from deltalog import record as rec
from deltalog.checkpoint import read_checkpoint
from deltalog.verify import verify

GOLDEN = os.path.join(REPO, "formats", "golden", "v1")


@pytest.fixture
def golden(tmp_path):
    shutil.copytree(os.path.join(GOLDEN, "replica"), tmp_path / "replica")  # opening writes lock.mdb
    with open(os.path.join(GOLDEN, "expected.json")) as f:
        return tmp_path / "replica", json.load(f)


def test_golden_replica_opens_verifies_and_holds_the_expected_tensors(golden):
    path, expected = golden
    with Replica.open(path) as r:
        assert (r.head, r.model_id, r.bucket_rows) == (expected["head"], expected["model_id"], expected["bucket_rows"])
        assert verify(r).ok
        want = read_checkpoint(os.path.join(GOLDEN, "expected.safetensors"))
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
            with open(os.path.join(GOLDEN, "records", f"{entry['offset']:04d}.dlrc"), "rb") as f:
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
