"""compact: fold old records into a snapshot; retained offsets stay exact; kill -9 safe."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
from conftest import apply_update as apply_updates
from conftest import bits
import pytest

from deltalog import tensorfiles
from deltalog.compact import choose_horizon, compact, parse_duration
from deltalog.errors import InvalidInput, LockHeld, OffsetNotRetained
from deltalog.history import values_at
from deltalog.replay import repair_in_place, replay_to_checkpoint
from deltalog.replica import Replica
from deltalog.rollback import rollback
from deltalog.verify import verify

PY = sys.executable


# -- helpers (local: this suite does not lean on other suites' fixtures) -------------------


def make_model(rng: np.random.Generator, rows: int = 64, dim: int = 8) -> dict[str, np.ndarray]:
    return {
        "emb": rng.standard_normal((rows, dim)).astype(np.float32),
        "emb16": rng.standard_normal((rows // 2, dim)).astype(np.float16),
        "ids": rng.integers(-100, 100, (rows, 3)).astype(np.int32),
        "bias": rng.standard_normal(rows).astype(np.float32),
        "flags": rng.integers(-5, 5, rows // 4).astype(np.int8),
        "scale": np.array(1.5, np.float64),
    }


def random_updates(rng: np.random.Generator, model: dict[str, np.ndarray]) -> dict[str, tuple]:
    names = [n for n in model if rng.random() < 0.5] or [str(rng.choice(list(model)))]
    updates = {}
    for name in names:
        arr = model[name]
        n = arr.shape[0] if arr.ndim else 1
        k = int(rng.integers(1, max(2, min(n // 3, 200))))
        rows = rng.choice(n, size=k, replace=False)
        shape = (k, *arr.shape[1:]) if arr.ndim else (k,)
        values = (rng.standard_normal(shape) if arr.dtype.kind == "f" else rng.integers(-100, 100, shape)).astype(arr.dtype)
        updates[name] = (rows, values)
    return updates


def same(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and np.array_equal(bits(a), bits(b))


def snapshot_of(model):
    return {k: np.array(v) for k, v in model.items()}


def build(tmp_path, seed: int = 0, commits: int = 12, rows: int = 64, dim: int = 8, name: str = "replica"):
    rng = np.random.default_rng(seed)
    model = make_model(rng, rows, dim)
    path = str(tmp_path / name)
    states = {0: snapshot_of(model)}
    with Replica.init(path, model, bucket_rows=8) as r:
        for _ in range(commits):
            updates = random_updates(rng, model)
            apply_updates(model, updates)
            states[r.commit(updates)] = snapshot_of(model)
    return path, states


def assert_offset(replica: Replica, offset: int, want: dict[str, np.ndarray]) -> None:
    """values_at(offset) over every row equals the kept state."""
    rows = {i.name: np.arange(i.rows, dtype=np.uint64) for i in replica.tensors}
    _head, values = values_at(replica, offset, rows)
    for info in replica.tensors:
        assert same(values[info.name].reshape(info.shape), want[info.name]), (offset, info.name)


def run_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "deltalog", *map(str, args)], capture_output=True, text=True, timeout=60)


def snapshot_dirs(path: str) -> list[str]:
    return sorted(os.listdir(os.path.join(path, tensorfiles.SNAPSHOT_DIR)))


# -- library -----------------------------------------------------------------------------------


def test_compaction_keeps_every_retained_offset_and_drops_the_rest(tmp_path):
    path, states = build(tmp_path, seed=1, commits=16)
    with Replica.open(path) as r:
        rollback(r, 4, reason="bad")  # offset 17, a rollback record survives compaction too
        states[17] = states[4]
        result = compact(r, keep_after=8)
        assert (result.oldest_offset, result.previous_oldest, result.head) == (8, 0, 17) and result.changed
        assert result.records_removed == 8 and result.snapshots_removed == [0]
        assert result.bytes_reclaimed == result.log_bytes_freed + result.snapshot_bytes_removed > 0
        assert result.log_bytes_freed > 0 and result.snapshot_bytes_removed > 0
        assert result.snapshot_bytes_written == sum(i.nbytes for i in r.tensors)
        assert r.oldest_offset == 8 and [s["offset"] for s in r.snapshots()] == [8]
        assert snapshot_dirs(path) == [tensorfiles.snapshot_dirname(8)]
        report = verify(r)
        assert report.ok, report.problems
        for offset in range(8, 18):
            assert_offset(r, offset, states[offset])
        for offset in (0, 3, 7):
            with pytest.raises(OffsetNotRetained) as info:
                values_at(r, offset, {"emb": np.arange(2, dtype=np.uint64)})
            assert "oldest offset still available is 8" in info.value.one_line()
            with pytest.raises(OffsetNotRetained):
                rollback(r, offset)
        # the compacted replica keeps working: replay, rollback, commit, compact again
        out = str(tmp_path / "at8.npz")
        assert replay_to_checkpoint(r, out, offset=8).snapshots_used == [8]
        assert rollback(r, 8).offset == 18
        states[18] = states[8]
        for name, want in states[8].items():
            assert same(r.read_tensor(name), want)
        r.commit({"bias": ([1, 2], np.array([7.0, 8.0], np.float32))})
        again = compact(r, keep_records=2)  # keeps 18 and 19: 17 becomes the oldest
        assert again.oldest_offset == 17 and verify(r).ok
        assert_offset(r, 17, states[17])
        assert_offset(r, 18, states[18])


def test_compaction_builds_from_the_log_not_from_live_tensor_files(tmp_path):
    path, states = build(tmp_path, seed=2)
    with Replica.open(path) as r:
        with open(os.path.join(path, "tensors", r.info("emb").file), "r+b") as f:
            f.write(b"\x00" * 32)  # silent damage in the live file
        compact(r)  # fold everything: horizon = head
        assert r.oldest_offset == 12
        snap = tensorfiles.snapshot_path(path, 12)
        emb = np.fromfile(os.path.join(snap, r.info("emb").file), dtype=np.float32).reshape(64, 8)
        assert same(emb, states[12]["emb"])  # the damage did not become the base
        assert repair_in_place(r).repaired == ["emb"]
        assert verify(r).ok


def test_horizon_policies(tmp_path):
    path, _states = build(tmp_path, seed=3, commits=10)
    with Replica.open(path) as r:
        assert choose_horizon(r) == 10
        assert choose_horizon(r, keep_after=4) == 4
        assert choose_horizon(r, keep_records=3) == 7
        assert choose_horizon(r, keep_records=0) == 10
        assert choose_horizon(r, keep_records=50) == 0
        times = [s.time for s in r.iter_summaries()]
        assert choose_horizon(r, keep_age=0.0, now=times[5]) == max(i + 1 for i, t in enumerate(times) if t <= times[5])
        assert choose_horizon(r, keep_age=1.0, now=times[-1] + 1.0) == 10
        assert choose_horizon(r, keep_age=3600.0, now=times[0] + 60) == 0
        with pytest.raises(OffsetNotRetained):
            choose_horizon(r, keep_after=11)
        with pytest.raises(InvalidInput):
            choose_horizon(r, keep_after=3, keep_records=2)
        # a follower's log has gaps: a horizon inside one rounds down to the record before it
        with r.writing():
            r.append_record("sync", {"bias": ([0], np.array([42.0], np.float32))}, offset=20, target=20)
        assert choose_horizon(r, keep_after=15) == 10
        result = compact(r, keep_after=15)
        assert result.oldest_offset == 10 and verify(r).ok
        nothing = compact(r, keep_after=5)  # at or before the oldest: nothing to fold
        assert not nothing.changed and nothing.bytes_reclaimed == 0 and r.oldest_offset == 10
    assert parse_duration("90") == 90 and parse_duration("15m") == 900 and parse_duration("7d") == 7 * 86400
    assert parse_duration("1.5h") == 5400
    with pytest.raises(InvalidInput):
        parse_duration("soon")


def test_compaction_reuses_a_registered_snapshot(tmp_path):
    path, states = build(tmp_path, seed=4, commits=6)
    with Replica.open(path) as r:
        with r.writing():
            r.make_snapshot()  # at 6
        r.commit({"bias": ([3], np.array([1.0], np.float32))})
        inode = os.stat(tensorfiles.snapshot_path(path, 6)).st_ino
        result = compact(r, keep_after=6)
        assert result.oldest_offset == 6 and result.snapshot_bytes_written == 0
        assert os.stat(tensorfiles.snapshot_path(path, 6)).st_ino == inode
        assert verify(r).ok
        assert_offset(r, 6, states[6])


def test_compaction_removes_leftovers_of_crashed_runs_only(tmp_path):
    path, _states = build(tmp_path, seed=5, commits=4)
    root = os.path.join(path, tensorfiles.SNAPSHOT_DIR)
    garbage = [tensorfiles.snapshot_dirname(3), tensorfiles.snapshot_dirname(2) + ".tmp", ".compact-999999999-dead"]
    kept = [tensorfiles.snapshot_dirname(9) + ".partial", "notes"]  # a resumable sync download; not ours
    for name in garbage + kept:
        os.makedirs(os.path.join(root, name))
        with open(os.path.join(root, name, "00000.bin"), "wb") as f:
            f.write(b"x" * 100)
    with Replica.open(path) as r:
        result = compact(r, keep_after=0)  # nothing to fold, but leftovers go
        assert not result.changed and sorted(result.garbage_removed) == sorted(garbage)
        assert result.snapshot_bytes_removed == 300
        assert snapshot_dirs(path) == sorted([tensorfiles.snapshot_dirname(0), *kept])
        assert verify(r).ok


def test_compaction_needs_the_writer_lock_for_its_switch(tmp_path):
    path, _states = build(tmp_path, seed=6, commits=4)
    with Replica.open(path) as holder, holder.writing(), Replica.open(path) as other:
        with pytest.raises(LockHeld):
            compact(other, keep_after=2)
        assert other.oldest_offset == 0
        assert [n for n in snapshot_dirs(path) if n.startswith(".compact-")] == []  # staging removed
    with Replica.open(path) as r:
        assert compact(r, keep_after=2).oldest_offset == 2 and verify(r).ok


# -- CLI ---------------------------------------------------------------------------------------


def test_cli_compact(tmp_path):
    path, _states = build(tmp_path, seed=7, commits=8)
    proc = run_cli("compact", path, "--keep-after", 5, "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["oldest_offset"] == 5 and data["bytes_reclaimed"] > 0 and data["changed"]
    assert data["bytes_reclaimed"] == data["log_bytes_freed"] + data["snapshot_bytes_removed"]
    human = run_cli("compact", path, "--keep-records", 2)
    assert human.returncode == 0 and "oldest offset 5 -> 6" in human.stdout
    assert json.loads(run_cli("status", path, "--json").stdout)["oldest_offset"] == 6

    gone = run_cli("replay", path, "--to", 3, "--out", tmp_path / "x.npz")
    assert gone.returncode == 7 and gone.stderr.count("\n") == 1 and "Traceback" not in gone.stderr
    assert "oldest offset still available is 6" in gone.stderr

    assert run_cli("compact", path, "--keep-after", 1, "--keep-records", 2).returncode == 2
    assert run_cli("compact", path, "--keep-age", "soon").returncode == 2
    beyond = run_cli("compact", path, "--keep-after", 99, "--json")
    assert beyond.returncode == 7 and json.loads(beyond.stdout)["error"]["exit_code"] == 7
    assert run_cli("compact", path, "--keep-age", "1d").returncode == 0  # records are newer: nothing to fold
    assert run_cli("verify", path).returncode == 0


# -- kill -9 -------------------------------------------------------------------------------------

# The child pauses a few ms around each step that changes the disk (snapshot write, rename,
# LMDB transaction, directory removal), so that random kill times land in every window
# between steps, not mostly inside the snapshot build. The kill itself is a real SIGKILL.
_COMPACT_ONCE = """
import os, shutil, sys, time
from deltalog import store, tensorfiles
from deltalog.replica import Replica
from deltalog.compact import compact

def paused(fn):
    def run(*args, **kwargs):
        time.sleep(0.004)
        try:
            return fn(*args, **kwargs)
        finally:
            time.sleep(0.004)
    return run

tensorfiles.write_snapshot = paused(tensorfiles.write_snapshot)
store.LogStore.write = paused(store.LogStore.write)
os.rename = paused(os.rename)
shutil.rmtree = paused(shutil.rmtree)
r = Replica.open(sys.argv[1])
print("ready", flush=True)
started = time.monotonic()
compact(r, keep_after=int(sys.argv[2]))
print(time.monotonic() - started, flush=True)
"""


def test_kill_9_during_compaction(tmp_path):
    template, states = build(tmp_path, seed=8, commits=12, rows=8192, dim=16, name="template")
    head, horizon = 12, 7

    def spawn(path):
        child = subprocess.Popen([PY, "-c", _COMPACT_ONCE, path, str(horizon)],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert child.stdout.readline().strip() == b"ready", child.stderr.read()
        return child

    calibrate = str(tmp_path / "calibrate")
    shutil.copytree(template, calibrate)
    child = spawn(calibrate)
    duration = float(child.stdout.readline())
    child.wait()
    child.stdout.close()
    child.stderr.close()

    rng = np.random.default_rng(8)
    outcomes = set()
    for attempt in range(15):
        path = str(tmp_path / f"attempt{attempt}")
        shutil.copytree(template, path)
        child = spawn(path)
        time.sleep(float(rng.uniform(0.0, duration * 1.2)))
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        child.stdout.close()
        child.stderr.close()
        with Replica.open(path) as r:
            report = verify(r)
            assert report.ok, (attempt, report.problems)
            assert r.head == head and r.oldest_offset in (0, horizon)
            outcomes.add(r.oldest_offset)
            for name, want in states[head].items():
                assert same(r.read_tensor(name), want), (attempt, name)
            assert_offset(r, r.oldest_offset, states[r.oldest_offset])
            assert_offset(r, horizon, states[horizon])
            again = compact(r, keep_after=horizon)  # completes whatever was interrupted
            assert r.oldest_offset == horizon and verify(r).ok
            assert snapshot_dirs(path) == [tensorfiles.snapshot_dirname(horizon)], (attempt, again.to_json())
        shutil.rmtree(path)
    assert 0 in outcomes  # at least one kill landed before the switch
