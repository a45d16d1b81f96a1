"""Where a commit's time goes: rows/s of Replica.commit at one batch size, optionally under cProfile.

    .venv/bin/python bench/commit_profile.py --rows-per-commit 8192 --gib 1 [--profile]

One float32 table of 64-dim rows (256 B a row), --gib of it, in bench/work/commit-profile
(deleted at the end); 3 warm-up commits, then 27 timed ones of random distinct rows. This is
the by-hand companion of bench/run.py's commit section: the same path, one size, with the
profile that says which step (the synced LMDB commits, encoding, the bucket index) bounds it.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import shutil
import time

import numpy as np

from deltalog import Replica

WORK = os.path.join(os.path.dirname(os.path.abspath(__file__)), "work", "commit-profile")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows-per-commit", type=int, default=8192)
    parser.add_argument("--gib", type=float, default=1.0, help="size of the table")
    parser.add_argument("--profile", action="store_true", help="print the 25 costliest calls (cumulative)")
    args = parser.parse_args()
    shutil.rmtree(WORK, ignore_errors=True)
    os.makedirs(WORK)
    try:
        rng = np.random.default_rng(1)
        rows = int(args.gib * (1 << 30) / 256)
        Replica.init(os.path.join(WORK, "r"), {"emb": np.zeros((rows, 64), np.float32)}, bucket_rows=1024).close()
        batches = []
        for _ in range(30):
            idx = np.unique(rng.integers(0, rows, args.rows_per_commit))
            batches.append((idx, rng.standard_normal((len(idx), 64)).astype(np.float32)))
        with Replica.open(os.path.join(WORK, "r")) as r:
            for idx, values in batches[:3]:
                r.commit({"emb": (idx, values)})
            profile = cProfile.Profile() if args.profile else None
            started, n = time.perf_counter(), 0
            if profile:
                profile.enable()
            for idx, values in batches[3:]:
                r.commit({"emb": (idx, values)})
                n += len(idx)
            if profile:
                profile.disable()
            seconds = time.perf_counter() - started
        print(f"{args.rows_per_commit} rows per commit, {args.gib:g} GiB table: {n / seconds:,.0f} rows/s "
              f"({seconds / 27 * 1000:.1f} ms per commit)")
        if profile:
            pstats.Stats(profile).sort_stats("cumulative").print_stats(25)
    finally:
        shutil.rmtree(WORK, ignore_errors=True)


if __name__ == "__main__":
    main()
