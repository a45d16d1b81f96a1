"""Where a commit's time goes: rows/s of Replica.commit at one batch size, optionally under cProfile.

    .venv/bin/python bench/commit_profile.py --rows-per-commit 8192 --gib 1 [--profile] [--steps]

One float32 table of 64-dim rows (256 B a row), --gib of it, in bench/work/commit-profile
(deleted at the end); 3 warm-up commits, then 27 timed ones of random distinct rows. This is
the by-hand companion of bench/run.py's commit section: the same path, one size, with the
profile that says which step (the synced LMDB commits, encoding, the bucket index) bounds it.

--steps times the steps that touch the kernel (the LMDB transactions, the row writes into the
tensor maps, the fsync of the tensor files) with the minor page faults they take, and reports
how many bytes the kernel counted as dirtied per row written (/proc/self/io write_bytes). A row
of 256 bytes stored through a shared map dirties the whole page-cache folio it lands in: 4 KiB
with small pages, up to 2 MiB where the file system caches files in large folios (ext4 on
Linux >= 6.16). Once the dirtied bytes pass the kernel's dirty_background threshold (10% of
available memory by default), writeback starts, cleans and write-protects folios, and every
later row store faults again: the commit cost then grows with the table (issue 15).
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import resource
import shutil
import time

import numpy as np

from deltalog import Replica
from deltalog import store as store_module
from deltalog import writer as writer_module

WORK = os.path.join(os.path.dirname(os.path.abspath(__file__)), "work", "commit-profile")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows-per-commit", type=int, default=8192)
    parser.add_argument("--gib", type=float, default=1.0, help="size of the table")
    parser.add_argument("--profile", action="store_true", help="print the 25 costliest calls (cumulative)")
    parser.add_argument("--cold", action="store_true",
                        help="drop the page cache after init (root; as after a reboot, or when other files evicted "
                             "the model's pages), so commits fault the table back in")
    parser.add_argument("--steps", action="store_true",
                        help="time the kernel-facing steps, with page faults and bytes dirtied per row")
    args = parser.parse_args()
    steps = _instrument() if args.steps else None
    shutil.rmtree(WORK, ignore_errors=True)
    os.makedirs(WORK)
    try:
        rng = np.random.default_rng(1)
        rows = int(args.gib * (1 << 30) / 256)
        Replica.init(os.path.join(WORK, "r"), {"emb": np.zeros((rows, 64), np.float32)}, bucket_rows=1024).close()
        if args.cold:
            os.sync()
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("1")
        batches = []
        for _ in range(30):
            idx = np.unique(rng.integers(0, rows, args.rows_per_commit))
            batches.append((idx, rng.standard_normal((len(idx), 64)).astype(np.float32)))
        with Replica.open(os.path.join(WORK, "r")) as r:
            for idx, values in batches[:3]:
                r.commit({"emb": (idx, values)})
            profile = cProfile.Profile() if args.profile else None
            if steps is not None:
                steps.clear()
            dirtied = _dirtied_bytes()
            started, n = time.perf_counter(), 0
            if profile:
                profile.enable()
            for idx, values in batches[3:]:
                r.commit({"emb": (idx, values)})
                n += len(idx)
            if profile:
                profile.disable()
            seconds = time.perf_counter() - started
            dirtied = _dirtied_bytes() - dirtied
            timed = {name: list(entry) for name, entry in (steps or {}).items()}  # close() flushes: not counted
        print(f"{args.rows_per_commit} rows per commit, {args.gib:g} GiB table: {n / seconds:,.0f} rows/s "
              f"({seconds / 27 * 1000:.1f} ms per commit)")
        if steps is not None:
            for name, (spent, faults, calls) in timed.items():
                print(f"  {name}: {spent / 27 * 1000:.1f} ms and {faults / 27:,.0f} minor faults per commit ({calls} calls)")
            if dirtied >= 0:
                print(f"  dirtied by the kernel's count (log writes included): {dirtied / n / 1024:,.1f} KiB per row written")
        if profile:
            pstats.Stats(profile).sort_stats("cumulative").print_stats(25)
    finally:
        shutil.rmtree(WORK, ignore_errors=True)


def _instrument() -> dict[str, list]:
    """Wrap the kernel-facing steps of a commit; returns {step: [seconds, minor faults, calls]}, filled as they run."""
    steps: dict[str, list] = {}

    def wrap(owner, attr: str, name: str) -> None:
        inner = getattr(owner, attr)

        def timed(*args, **kwargs):
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            started = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                entry = steps.setdefault(name, [0.0, 0, 0])
                entry[0] += time.perf_counter() - started
                entry[1] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
                entry[2] += 1

        setattr(owner, attr, timed)

    wrap(store_module.LogStore, "write", "LMDB write transactions")
    wrap(writer_module.Writer, "old_rows", "gather of the old rows")
    wrap(writer_module.Writer, "write_rows", "row stores into the tensor maps")
    wrap(writer_module.Writer, "_fsync_files", "fsync of the tensor files")
    return steps


def _dirtied_bytes() -> int:
    """Bytes this process dirtied in the page cache so far, as the kernel counts them (-1 where unknown)."""
    try:
        with open("/proc/self/io") as f:
            for line in f:
                if line.startswith("write_bytes:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return -1


if __name__ == "__main__":
    main()
