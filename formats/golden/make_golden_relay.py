"""Write formats/golden/relay-v1: a tiny relay (file://) of the current relay format, for tests/test_relay.py.

    python formats/golden/make_golden_relay.py formats/golden/relay-v1

A small model, published after its first commits and again after more, so
the relay holds a snapshot and two segments. Only rerun it for a new relay
format version, into a new directory: old goldens stay as they were written.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile

import numpy as np

from deltalog import Replica
from deltalog.objstore import ObjectStore
from deltalog.relay import RELAY_VERSION, publish


def main(out: str) -> None:
    if os.path.basename(out.rstrip("/")) != f"relay-v{RELAY_VERSION}":
        sys.exit(f"{out}: this code writes relay format v{RELAY_VERSION}; name the directory relay-v{RELAY_VERSION}")
    if os.path.exists(out):
        sys.exit(f"{out} exists: goldens are never rewritten")
    rng = np.random.default_rng(7)
    model = {"emb": rng.standard_normal((64, 4)).astype(np.float32),
             "bias": rng.standard_normal(8).astype(np.float16)}
    with tempfile.TemporaryDirectory() as tmp:
        primary = os.path.join(tmp, "primary")
        store = ObjectStore(f"file://{os.path.abspath(out)}")
        with Replica.init(primary, model, bucket_rows=16, model_id="golden-relay") as r:
            for step in range(4):
                rows = np.array([step, 10 + step, 40 + step])
                r.commit({"emb": (rows, rng.standard_normal((3, 4)).astype(np.float32))})
                if step in (1, 3):
                    publish(r, store, "golden")
    shutil.rmtree(os.path.join(out, ".lock"), ignore_errors=True)
    if os.path.exists(os.path.join(out, ".lock")):
        os.remove(os.path.join(out, ".lock"))


if __name__ == "__main__":
    main(sys.argv[1])
