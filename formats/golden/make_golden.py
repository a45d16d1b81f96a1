"""Regenerate a golden sample directory: run ONLY when deliberately adding a format version.

    python formats/golden/make_golden.py formats/golden/v4

Writes, from a fixed seed:
  replica/           a tiny replica (every dtype kind, 0-d to 3-d, commit + rollback records)
  records/OFFSET.dlrc  each record's encoded bytes, the portable form
  expected.safetensors  the tensors at the head
  expected.json      head, model id, and per record: kind, base, rows, reason, target;
                     from v2 on also the row digests of each tensor at the head (hex);
                     from v3 on also each record's encoding (the u16 after the magic);
                     from v4 on also the state digest at the head and each record's
                     pre and post digests (hex), and the follower's (below)
  follower/          (v4 on) a replica made and fed by two syncs of replica/: sync
                     records whose history names the source's records
Golden files are committed; tests/test_golden.py reads them with the current code.
The directory's name (vN) must be the format version the current code writes:
v1 was written by the code of version 1, v2 adds a tensor of 0 rows, v3 (records
of encoding v2) adds a sync record with per-row versions after a gap in the offsets
(written with a writer API that no longer exists), v4 (state digests) the follower.
This script writes the current version only.
"""

import json
import os
import shutil
import sys

import numpy as np

from deltalog import lineage, rowdigest
from deltalog.checkpoint import write_checkpoint
from deltalog.layout import FORMAT_VERSION, READ_VERSION
from deltalog.replica import Replica
from deltalog.sync import sync
from deltalog.transport import TransportOptions, open_sink, open_source


def _sync(src: str, dst: str) -> None:
    source, sink = open_source(src, TransportOptions()), open_sink(dst, TransportOptions())
    try:
        assert sync(source, sink, source_name="golden-primary", destination_name="golden-follower").complete
    finally:
        sink.close()
        source.close()


def main(out: str) -> None:
    if os.path.exists(out):
        sys.exit(f"{out} exists: golden samples are never overwritten; make a new version directory")
    version = os.path.basename(os.path.normpath(out))
    if version != f"v{FORMAT_VERSION}":
        sys.exit(f"{out}: this code writes format v{FORMAT_VERSION}; name the directory v{FORMAT_VERSION}")
    rng = np.random.default_rng(20261123)
    tensors = {
        "item_emb": (rng.standard_normal((12, 4)).astype(np.float32), "float32"),
        "user_emb": ((rng.standard_normal((6, 2, 2)).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16), "bfloat16"),
        "bias": (rng.standard_normal(5).astype(np.float16), "float16"),
        "dense.w": (rng.standard_normal((3, 3)), "float64"),
        "counts": (np.arange(7, dtype=np.int64), "int64"),
        "mask": (np.array([True, False, True]), "bool"),
        "step": (np.array(0, dtype=np.int32), "int32"),
    }
    if FORMAT_VERSION >= 2:
        tensors["empty"] = (np.zeros((0, 4), np.float32), "float32")  # 0 rows: an empty digest file
    replica_dir = os.path.join(out, "replica")
    os.makedirs(out)
    follower_dir = os.path.join(out, "follower")
    r = Replica.init(replica_dir, tensors, bucket_rows=4, model_id=f"golden-{version}")
    r.commit({"item_emb": ([0, 5, 11], rng.standard_normal((3, 4)).astype(np.float32)),
              "step": ([0], np.array([1], np.int32))})
    r.commit({"dense.w": (np.arange(3), rng.standard_normal((3, 3))),  # a dense layer: every row
              "bias": ([1, 2, 3], rng.standard_normal(3).astype(np.float16)),
              "counts": ([6], np.array([-1], np.int64)),
              "step": ([0], np.array([2], np.int32))})
    _sync(replica_dir, follower_dir)  # the follower: snapshot 0, then a sync record at 2 naming 1 and 2
    r.commit({"user_emb": ([4], (rng.standard_normal((1, 2, 2)).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)),
              "mask": ([1], np.array([True])),
              "item_emb": ([5], np.full((1, 4), np.nan, np.float32))})
    with r.writing():
        r.append_record("rollback", {"item_emb": ([5], np.zeros((1, 4), np.float32))}, reason="golden rollback", target=2)
    r.commit({"counts": ([2, 3], np.array([20, 30], np.int64)), "step": ([0], np.array([5], np.int32))})
    _sync(replica_dir, follower_dir)  # a sync record at 5 naming 3, the rollback 4, and 5
    os.makedirs(os.path.join(out, "records"))
    records = []
    for offset, blob in r.iter_record_blobs():
        with open(os.path.join(out, "records", f"{offset:04d}.dlrc"), "wb") as f:
            f.write(blob)
    for s in r.iter_summaries():
        records.append({"offset": s.offset, "base": s.base, "kind": s.kind, "rows": s.rows, "reason": s.reason, "target": s.target})
        if FORMAT_VERSION >= 3:
            records[-1]["encoding"] = int.from_bytes(r.record_blob(s.offset)[4:6], "big")
    write_checkpoint(os.path.join(out, "expected.safetensors"),
                     {name: (r.read_tensor(name), r.info(name).dtype) for name in r.tensor_names})
    expected = {"head": r.head, "model_id": r.model_id, "bucket_rows": r.bucket_rows, "records": records}
    if FORMAT_VERSION >= 2:  # the digests at the head, by the definition's plain-Python form
        expected["format"] = {"write_version": r.format_version, "marker": READ_VERSION}
        expected["digests"] = {
            name: [f"{rowdigest.reference_digest(row.tobytes()):016x}" for row in r.rows_view(name)]
            for name in r.tensor_names
        }
    expected["state_digest"] = lineage.to_hex(r.state_digest)
    for entry, s in zip(records, r.iter_summaries()):
        entry.update(pre_digest=lineage.to_hex(s.pre_digest), post_digest=lineage.to_hex(s.post_digest))
    with Replica.open(follower_dir) as f:
        from deltalog.history import log_entries

        expected["follower"] = {
            "head": f.head,
            "state_digest": lineage.to_hex(f.state_digest),
            "records": [{"offset": s.offset, "base": s.base, "kind": s.kind, "rows": s.rows, "target": s.target,
                         "pre_digest": lineage.to_hex(s.pre_digest), "post_digest": lineage.to_hex(s.post_digest)}
                        for s in f.iter_summaries()],
            "log": [{k: e[k] for k in ("offset", "kind", "rows", "target", "reason", "synced_in", "retained")}
                    for e in log_entries(f)],
        }
    with open(os.path.join(out, "expected.json"), "w") as f:
        json.dump(expected, f, indent=1)
    r.close()
    for d in (replica_dir, follower_dir):
        os.remove(os.path.join(d, "log", "lock.mdb"))  # runtime state, recreated on open


if __name__ == "__main__":
    main(sys.argv[1])
