"""rollback: a record restoring an earlier offset, bitwise, and forward again; kill -9 safe."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
from conftest import apply_update as apply_updates
from conftest import bits
import pytest

from deltalog import record as rec
from deltalog.compact import compact
from deltalog.errors import InvalidInput, LockHeld, OffsetNotRetained
from deltalog.replica import Replica
from deltalog.rollback import rollback
from deltalog.verify import verify

PY = sys.executable


# -- helpers (kept local so this suite does not depend on others' fixtures) -------------


def make_model(rng: np.random.Generator, rows: int = 64) -> dict[str, np.ndarray]:
    return {
        "emb": rng.standard_normal((rows, 8)).astype(np.float32),
        "emb16": rng.standard_normal((rows // 2, 4)).astype(np.float16),
        "ids": rng.integers(-100, 100, (rows, 3)).astype(np.int32),
        "bias": rng.standard_normal(rows).astype(np.float32),
        "flags": rng.integers(-5, 5, rows // 4).astype(np.int8),
        "scale": np.array(1.5, np.float64),
    }


def random_updates(rng: np.random.Generator, model: dict[str, np.ndarray]) -> dict[str, tuple]:
    """Sparse updates (sometimes a contiguous run) of a random subset of tensors; unique rows."""
    names = [n for n in model if rng.random() < 0.5] or [str(rng.choice(list(model)))]
    updates = {}
    for name in names:
        arr = model[name]
        n = arr.shape[0] if arr.ndim else 1
        k = int(rng.integers(1, max(2, n // 4)))
        if rng.random() < 0.3:
            start = int(rng.integers(0, n - k + 1))
            rows = np.arange(start, start + k)
        else:
            rows = rng.choice(n, size=k, replace=False)
        shape = (k, *arr.shape[1:]) if arr.ndim else (k,)
        if arr.dtype.kind == "f":
            values = rng.standard_normal(shape).astype(arr.dtype)
        else:
            values = rng.integers(-100, 100, shape).astype(arr.dtype)
        updates[name] = (rows, values)
    return updates


def apply_updates(model: dict[str, np.ndarray], updates: dict[str, tuple]) -> None:
    for name, (rows, values) in updates.items():
        arr = model[name]
        flat = arr.reshape(arr.shape[0] if arr.ndim else 1, -1)
        flat[np.asarray(rows)] = np.asarray(values).reshape(len(rows), -1)


def assert_state(replica: Replica, expected: dict[str, np.ndarray], what: str = "") -> None:
    for name, want in expected.items():
        got = replica.read_tensor(name)
        assert got.shape == want.shape and got.dtype == want.dtype, (what, name)
        assert np.array_equal(bits(got), bits(want)), f"{what}: tensor {name} differs"


def copy_model(model: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in model.items()}


def build(tmp_path, seed: int, commits: int = 12, rows: int = 64) -> tuple[str, dict[int, dict[str, np.ndarray]]]:
    """A replica with ``commits`` random commits; returns (path, {offset: state})."""
    rng = np.random.default_rng(seed)
    model = make_model(rng, rows)
    path = str(tmp_path / f"r{seed}")
    states = {0: copy_model(model)}
    with Replica.init(path, model, bucket_rows=8) as r:
        for _ in range(commits):
            updates = random_updates(rng, model)
            apply_updates(model, updates)
            offset = r.commit(updates)
            states[offset] = copy_model(model)
        assert_state(r, model, "after commits")
    return path, states


def run_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "deltalog", *map(str, args)], capture_output=True, text=True, timeout=60)


# -- library -----------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [1, 2])
def test_roll_back_and_forward_across_random_records(tmp_path, seed):
    path, states = build(tmp_path, seed, commits=20)
    rng = np.random.default_rng(100 + seed)
    with Replica.open(path) as r:
        original_head = r.head
        for step in range(14):
            if step % 3 == 2:  # roll forward: back to the offset just before the last rollback
                target = r.head - 1
            else:
                target = int(rng.choice(sorted(states)))
            before = r.head
            result = rollback(r, target, reason=f"step {step}")
            assert result.target == target and result.previous_head == before
            if result.changed:
                assert result.offset == before + 1 == r.head
                summary = next(r.iter_summaries(since=before))
                assert (summary.kind, summary.reason, summary.target) == ("rollback", f"step {step}", target)
                assert summary.rows == result.rows > 0
            else:
                assert r.head == before
            states[r.head] = states[target]
            assert_state(r, states[target], f"rollback to {target}")
            assert verify(r).ok
        # every offset of the history is still reachable, rollbacks included
        for offset in (0, original_head, r.head - 1):
            rollback(r, offset)
            assert_state(r, states[offset], f"final rollback to {offset}")
        report = verify(r)
        assert report.ok, report.problems


def test_rollback_writes_only_rows_changed_since_target(tmp_path):
    path, states = build(tmp_path, 3, commits=10)
    with Replica.open(path) as r:
        target = 6
        changed = {}
        for offset, blob in r.iter_record_blobs(since=target):
            for t in rec.decode(blob).tensors:
                changed.setdefault(t.name, set()).update(t.rows.tolist())
        result = rollback(r, target)
        record = rec.decode(r.record_blob(result.offset))
        assert record.kind == "rollback" and record.target == target and record.base == 10
        for t in record.tensors:
            assert set(t.rows.tolist()) <= changed[t.name]
            assert t.old is not None  # a rollback is undoable like any record
        assert result.rows <= sum(len(v) for v in changed.values())


def _maps_of(path: str) -> dict[str, list[str]]:
    """{tensor file name: the permissions of each of this process's maps of it} (/proc/self/maps)."""
    found: dict[str, list[str]] = {}
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split()
            if len(fields) >= 6 and fields[5].startswith(os.path.join(path, "tensors") + os.sep):
                found.setdefault(os.path.basename(fields[5]), []).append(fields[1])
    return found


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads /proc/self/maps")
def test_a_writing_handle_reads_through_the_map_it_writes_through(tmp_path, monkeypatch):
    """A rollback reads every changed row, then writes it: one map per file, not a read-only one
    and a writable one (twice the page faults, twice the unmapping at close)."""
    path, states = build(tmp_path, 5, commits=10)
    seen = []
    append_record = Replica.append_record
    monkeypatch.setattr(Replica, "append_record", lambda self, *a, **k: (seen.append(_maps_of(path)),
                                                                          append_record(self, *a, **k))[1])
    with Replica.open(path) as r:
        r.rows_view("emb")
        assert _maps_of(path)[r.info("emb").file] == ["r--s"]  # a reader maps read-only
        rollback(r, 3)
        seen.append(_maps_of(path))
        assert len(seen) == 2 and seen[0], seen  # the rows read (before the record), and after it
        for maps in seen:
            assert all(perms == ["rw-s"] for perms in maps.values()), maps
        assert not r.rows_view("emb").flags.writeable
        with pytest.raises(ValueError):
            r.rows_view("emb")[0, 0] = 1.0
        assert_state(r, states[3])
    assert _maps_of(path) == {}  # closed: nothing left mapped


def test_rollback_to_current_state_appends_nothing(tmp_path):
    path, states = build(tmp_path, 4, commits=5)
    with Replica.open(path) as r:
        result = rollback(r, 5)
        assert not result.changed and result.offset == 5 and r.head == 5
        rollback(r, 2)
        head = r.head
        again = rollback(r, 2)  # the tensors already equal offset 2
        assert not again.changed and again.offset == head == r.head
        forward = rollback(r, 5)
        assert forward.changed and r.head == head + 1
        assert_state(r, states[5])


def test_rollback_outside_retention(tmp_path):
    path, _states = build(tmp_path, 5, commits=8)
    with Replica.open(path) as r:
        with pytest.raises(OffsetNotRetained):
            rollback(r, 9)  # beyond the head
        compact(r, keep_after=4)
        with pytest.raises(OffsetNotRetained) as info:
            rollback(r, 3)
        assert "4" in info.value.one_line()
        assert r.head == 8
        with pytest.raises(InvalidInput):
            rollback(r, 5, reason="x" * 5000)


def test_rollback_respects_the_writer_lock(tmp_path):
    path, _states = build(tmp_path, 6, commits=3)
    with Replica.open(path) as holder, holder.writing(), Replica.open(path) as other:
        with pytest.raises(LockHeld):
            rollback(other, 1)


# -- CLI ---------------------------------------------------------------------------------


def test_cli_rollback_json_log_and_errors(tmp_path):
    path, states = build(tmp_path, 7, commits=6)
    proc = run_cli("rollback", path, "--to", 2, "--reason", "bad model", "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["offset"] == 7 and data["target"] == 2 and data["previous_head"] == 6 and data["changed"]
    assert data["rows"] > 0 and data["reason"] == "bad model"
    log = json.loads(run_cli("log", path, "--json").stdout)["records"]
    assert (log[-1]["kind"], log[-1]["reason"], log[-1]["target"]) == ("rollback", "bad model", 2)
    with Replica.open(path) as r:
        assert_state(r, states[2])

    noop = run_cli("rollback", path, "--to", 7, "--json")
    assert noop.returncode == 0 and json.loads(noop.stdout)["changed"] is False

    human = run_cli("rollback", path, "--to", 6)
    assert human.returncode == 0 and "rolled back" in human.stdout

    assert run_cli("compact", path, "--keep-after", 3).returncode == 0
    gone = run_cli("rollback", path, "--to", 1)
    assert gone.returncode == 7
    assert gone.stderr.count("\n") == 1 and "Traceback" not in gone.stderr
    assert "oldest offset still available is 3" in gone.stderr
    gone_json = run_cli("rollback", path, "--to", 1, "--json")
    assert gone_json.returncode == 7 and json.loads(gone_json.stdout)["error"]["exit_code"] == 7

    assert run_cli("rollback", path).returncode == 2  # --to is required
    assert run_cli("rollback", str(tmp_path / "nope"), "--to", 1).returncode == 3
    with Replica.open(path) as r, r.writing():
        locked = run_cli("rollback", path, "--to", 4)
    assert locked.returncode == 9 and "Traceback" not in locked.stderr


def test_cli_rollback_returns_before_the_rows_are_fsynced_and_a_reboot_reapplies_them(tmp_path, monkeypatch):
    """The command returns once its record is durable, as the library call does: the rows it wrote
    follow the WAL-checkpoint schedule, and a machine crash that loses them is repaired from the log."""
    from deltalog import writer as writer_mod

    path, states = build(tmp_path, 8, commits=6)  # closed by the library: flushed == head
    tensors = os.path.join(path, "tensors")
    before = {f: open(os.path.join(tensors, f), "rb").read() for f in os.listdir(tensors)}
    proc = run_cli("rollback", path, "--to", 2, "--json")
    assert proc.returncode == 0 and json.loads(proc.stdout)["changed"], proc.stderr
    with Replica.open(path) as r:
        assert (r.state.flushed, r.head) == (6, 7)  # not fsynced at exit: left to the schedule
        assert_state(r, states[2], "rolled back")
    for f, data in before.items():  # a machine crash: the page cache's writes since 'flushed' are lost
        with open(os.path.join(tensors, f), "wb") as out:
            out.write(data)
    monkeypatch.setattr(writer_mod, "_BOOT_ID", "another-boot")
    with Replica.open(path) as r:  # the reboot is seen: the rollback record is applied again
        assert r.state.settled and r.state.flushed == r.head == 7
        assert_state(r, states[2], "after the reboot")
        assert verify(r).ok


def test_close_without_flush_still_fsyncs_when_a_reboot_could_not_be_told(tmp_path, monkeypatch):
    from deltalog import writer as writer_mod

    path, states = build(tmp_path, 9, commits=4)
    r = Replica.open(path)
    rollback(r, 1)
    r.close(flush=False)
    with Replica.open(path) as r:
        assert r.state.flushed == 4 and r.head == 5  # deferred: the schedule is not due
    monkeypatch.setattr(writer_mod, "_BOOT_ID", "")  # no boot id: recovery could not know to re-apply
    r = Replica.open(path)
    rollback(r, 2)
    r.close(flush=False)
    with Replica.open(path) as r:
        assert r.state.flushed == r.head == 6


# -- kill -9 -----------------------------------------------------------------------------

_ROLLBACK_LOOP = """
import sys
from deltalog.replica import Replica
from deltalog.rollback import rollback
path, targets = sys.argv[1], [int(t) for t in sys.argv[2].split(",")]
r = Replica.open(path)
print("ready", flush=True)
i = 0
while True:
    rollback(r, targets[i % len(targets)], reason="loop")
    i += 1
"""


def test_kill_9_mid_rollback_leaves_old_or_new_head(tmp_path):
    path, states = build(tmp_path, 8, commits=10, rows=2048)
    rng = np.random.default_rng(8)
    targets = [2, 9, 5]
    for attempt in range(10):
        child = subprocess.Popen([PY, "-c", _ROLLBACK_LOOP, path, ",".join(map(str, targets))],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert child.stdout.readline().strip() == b"ready", child.stderr.read()
        time.sleep(float(rng.uniform(0.0, 0.2)))  # a rollback here takes ~20 ms
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        child.stdout.close()
        child.stderr.close()
        with Replica.open(path) as r:
            report = verify(r)
            assert report.ok, (attempt, report.problems)
            head = r.head
            if head not in states:
                summary = next(r.iter_summaries(since=head - 1))
                assert summary.kind == "rollback" and summary.target in targets
                states[head] = states[summary.target]
            assert_state(r, states[head], f"attempt {attempt}, head {head}")
    with Replica.open(path) as r:
        assert r.head > 10  # the loop did append rollbacks
