"""Where a commit's time goes: rows/s of Replica.commit at one batch size, optionally under cProfile.

    .venv/bin/python bench/commit_profile.py --rows-per-commit 8192 --gib 1 [--profile] [--steps] \
        [--reader-between] [--dirty-background-mib N] [--workload bench]

One float32 table of 64-dim rows (256 B a row), --gib of it, in bench/work/commit-profile
(deleted at the end); 3 warm-up commits, then --commits (27) timed ones of random distinct rows,
each made before its timer starts. This is
the by-hand companion of bench/run.py's commit section: the same path, one size, with the
profile that says which step (the synced LMDB commits, encoding, the bucket index) bounds it.
``--workload bench`` commits bench/run.py's own stream instead (bench/workload.py's model at
--gib: Zipf-drawn embedding rows, ~8 k a step at 1 GiB and ~23 k at 4 GiB, plus the 3.3 MB of
dense layers every step; --rows-per-commit is then ignored), its steps made before the timer
against a copy of the model. Every run also prints the CPU time (user + system, every thread
of the process) the timed commits took: on 2 cores, that over 2 is the floor of their wall time.

--steps times the steps that touch the kernel (the LMDB transactions, the row writes into the
tensor maps, the fsync of the tensor files) with the minor page faults they take, and reports
how many bytes the kernel counted as dirtied per row written (/proc/self/io write_bytes). A row
of 256 bytes stored through a shared map dirties the whole page-cache folio it lands in: 4 KiB
with small pages, up to 2 MiB where the file system caches files in large folios (ext4 on
Linux >= 6.16). Once the dirtied bytes pass the kernel's dirty_background threshold (10% of
available memory by default), writeback starts, cleans and write-protects folios, and every
later row store faults again: the commit cost then grows with the table (issue 15).

--reader-between plays a backup of the live replica between the warm-up and the timed commits:
the writer flushes, its pages are unmapped and evicted (as memory pressure would: here its maps
are dropped and the files' cache with POSIX_FADV_DONTNEED), then `cat` reads each live file to
/dev/null, which caches it in large folios again where the kernel does that. deltalog caches a
big model in small pages (tensorfiles.prefers_small_pages: past half of dirty_background) and its
writer notices large folios and re-caches (tensorfiles.SmallPageGuard); the line "re-cached"
says how often that happened in the timed commits.

--dirty-background-mib N sets vm.dirty_background_bytes to N MiB for the run (root; restored at
the end) so that a small table meets what a table past half of the default threshold meets
(10% of available memory: ~2.3 GB on a 24 GB machine, so 1 GiB is under it and 4 GiB past it).
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import os
import pstats
import resource
import shutil
import subprocess
import sys
import time

import numpy as np

from deltalog import Replica, tensorfiles
from deltalog import store as store_module
from deltalog import writer as writer_module

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import workload  # noqa: E402  (bench/workload.py)

WORK = os.path.join(os.path.dirname(os.path.abspath(__file__)), "work", "commit-profile")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows-per-commit", type=int, default=8192)
    parser.add_argument("--gib", type=float, default=1.0, help="size of the table")
    parser.add_argument("--commits", type=int, default=27,
                        help="timed commits (27; a few hundred show the steady state of a long-lived writer: "
                             "its maps populated, and past 30 s or 1024 records a flush of the tensor files)")
    parser.add_argument("--profile", action="store_true", help="print the 25 costliest calls (cumulative)")
    parser.add_argument("--cold", action="store_true",
                        help="drop the page cache after init (root; as after a reboot, or when other files evicted "
                             "the model's pages), so commits fault the table back in")
    parser.add_argument("--steps", action="store_true",
                        help="time the kernel-facing steps, with page faults and bytes dirtied per row")
    parser.add_argument("--reader-between", action="store_true",
                        help="evict the live files and cat them to /dev/null between warm-up and timed commits")
    parser.add_argument("--dirty-background-mib", type=int, default=None,
                        help="set vm.dirty_background_bytes to this many MiB for the run (root; restored)")
    parser.add_argument("--workload", choices=("uniform", "bench"), default="uniform",
                        help="uniform: one table, random distinct rows (default); bench: bench/run.py's stream")
    args = parser.parse_args()
    steps = _instrument() if args.steps else None
    restore = _set_dirty_background(args.dirty_background_mib << 20) if args.dirty_background_mib else None
    shutil.rmtree(WORK, ignore_errors=True)
    os.makedirs(WORK)
    try:
        if args.workload == "bench":
            batch = _bench_steps(os.path.join(WORK, "r"), args.gib, 3 + args.commits)
        else:
            batch = _uniform_steps(os.path.join(WORK, "r"), args.gib, args.rows_per_commit)
        if args.cold:
            os.sync()
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("1")

        with Replica.open(os.path.join(WORK, "r")) as r:
            for _ in range(3):
                r.commit(batch())
            if args.reader_between:
                _backup_reads(r)
            guard = getattr(r.writer, "page_guard", None)  # deltalog before the guard has none
            recaches = guard.recaches if guard is not None else None
            profile = cProfile.Profile() if args.profile else None
            if steps is not None:
                steps.clear()
            n = 0
            each = []  # (seconds, bytes dirtied, rows) of each timed commit
            cpu = 0.0
            for _ in range(args.commits):
                updates = batch()
                rows = sum(len(idx) for idx, _values in updates.values())
                if profile:
                    profile.enable()
                cpu_before = _cpu_seconds()
                began, dirtied_before = time.perf_counter(), _dirtied_bytes()
                r.commit(updates)
                each.append((time.perf_counter() - began, _dirtied_bytes() - dirtied_before, rows))
                cpu += _cpu_seconds() - cpu_before
                if profile:
                    profile.disable()
                n += rows
            seconds = sum(t for t, _d, _n in each)
            dirtied = sum(d for _t, d, _n in each) if _dirtied_bytes() >= 0 else -1
            timed = {name: list(entry) for name, entry in (steps or {}).items()}  # close() flushes: not counted
            if guard is not None:
                recaches = guard.recaches - recaches
        what = (f"{args.rows_per_commit} rows per commit, {args.gib:g} GiB table" if args.workload == "uniform"
                else f"bench workload, {n / len(each):,.0f} rows per commit, {args.gib:g} GiB model")
        print(f"{what}: {n / seconds:,.0f} rows/s ({seconds / len(each) * 1000:.1f} ms per commit, {len(each)} commits)")
        print(f"  CPU (user + system, all threads): {cpu / len(each) * 1000:.1f} ms per commit")
        print(f"  per commit: p50 {np.median([t for t, _d, _n in each]) * 1000:.1f} ms, "
              f"first {each[0][0] * 1000:.1f} ms, p99 {np.percentile([t for t, _d, _n in each], 99) * 1000:.1f} ms, "
              f"slowest {max(t for t, _d, _n in each) * 1000:.1f} ms")
        if steps is not None:
            for name, (spent, faults, calls) in timed.items():
                print(f"  {name}: {spent / len(each) * 1000:.1f} ms and {faults / len(each):,.0f} minor faults per commit "
                      f"({calls} calls)")
            if dirtied >= 0:
                print(f"  dirtied by the kernel's count (log writes included): {dirtied / n / 1024:,.1f} KiB per row written "
                      f"(first timed commit {each[0][1] / each[0][2] / 1024:,.1f}, the others "
                      f"{sum(d for _t, d, _n in each[1:]) / sum(k for _t, _d, k in each[1:]) / 1024:,.1f})")
        print(f"  re-cached in small pages by the writer: {recaches if recaches is not None else 'n/a (no guard)'}")
        if profile:
            pstats.Stats(profile).sort_stats("cumulative").print_stats(25)
    finally:
        shutil.rmtree(WORK, ignore_errors=True)
        if restore is not None:
            restore()


def _uniform_steps(path: str, gib: float, rows_per_commit: int):
    """Make a one-table replica at ``path``; the maker of its commits' updates (random distinct rows)."""
    rng = np.random.default_rng(1)
    rows = int(gib * (1 << 30) / 256)
    Replica.init(path, {"emb": np.zeros((rows, 64), np.float32)}, bucket_rows=1024).close()

    def batch() -> dict:
        idx = np.unique(rng.integers(0, rows, rows_per_commit))
        return {"emb": (idx, rng.standard_normal((len(idx), 64)).astype(np.float32))}

    return batch


def _bench_steps(path: str, gib: float, count: int):
    """Make bench/run.py's model at ``path``; the maker of ``count`` steps of its stream, made now
    against a copy of the model (each step's values follow from the ones before)."""
    specs = workload.model_spec(gib)
    model = workload.make_model(specs, seed=0)
    Replica.init(path, model, bucket_rows=1024, model_id="deltalog-bench").close()
    current = {name: values.reshape(values.shape[0], -1) for name, values in model.items()}
    stream = workload.Stream(specs, seed=1)
    steps = []
    for _ in range(count):
        updates = stream.step(lambda name, rows: np.array(current[name][rows]))
        for name, (rows, values) in updates.items():
            current[name][rows] = values.reshape(len(rows), -1)
        steps.append(updates)
    del model, current
    made = iter(steps)
    return lambda: next(made)


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _backup_reads(r: Replica) -> None:
    """What a backup does to a live replica after memory pressure: flushed pages unmapped and
    evicted, then every live file read by `cat` (large folios again, where the kernel uses them)."""
    r.flush()  # dirty pages cannot be evicted
    r.maps.forget()  # reclaim unmaps a page before it evicts it; the writer maps the files again
    gc.collect()
    paths = tensorfiles.live_file_paths(r.maps.dir, r.tensors)
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    for path in paths:
        subprocess.run(["cat", path], stdout=subprocess.DEVNULL, check=True)


def _set_dirty_background(nbytes: int):
    """Set vm.dirty_background_bytes; returns what restores the old setting (bytes, or the ratio)."""
    names = ("/proc/sys/vm/dirty_background_bytes", "/proc/sys/vm/dirty_background_ratio")
    old = {}
    for name in names:
        with open(name) as f:
            old[name] = f.read().strip()
    with open(names[0], "w") as f:
        f.write(str(nbytes))

    def restore() -> None:
        # Writing one of the pair zeroes the other: write back the one that was set.
        name = names[0] if old[names[0]] != "0" else names[1]
        with open(name, "w") as f:
            f.write(old[name])

    return restore


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
