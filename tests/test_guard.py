"""sync --check: an update the check rejects is undone, exactly, and the exit code says so."""

from __future__ import annotations

import json

import numpy as np
from conftest import assert_same, bits, cli_json, random_model, random_update, run_cli

from deltalog import Replica, receive
from deltalog.verify import verify


def _setup(tmp_path, rng):
    model = random_model(rng)
    src, dst = tmp_path / "a", tmp_path / "b"
    with Replica.init(src, model, bucket_rows=16) as a:
        a.commit(random_update(rng, model))
    cli_json("sync", src, dst)
    with Replica.open(dst) as b:
        before = {n: b.read_tensor(n) for n in b.tensor_names}
        index = {n: b.bucket_index(n) for n in b.tensor_names}
    with Replica.open(src) as a:
        for _ in range(3):
            a.commit(random_update(rng, model))
    return src, dst, before, index


def test_rejected_sync_is_undone_exactly_and_exits_10(tmp_path, rng):
    src, dst, before, index = _setup(tmp_path, rng)
    proc = run_cli("sync", src, dst, "--check", 'test "$DELTALOG_HEAD" != 4 && exit 0; exit 3', "--json")
    assert proc.returncode == 10 and "rejected offset 4" in proc.stderr
    verdict = json.loads(proc.stdout)["check"]
    assert verdict == {"command": verdict["command"], "offset": 4, "exit_code": 3, "accepted": False, "reverted_to": 1}
    with Replica.open(dst) as b:
        assert b.head == 1 and [s.offset for s in b.iter_summaries()] == [1]
        assert_same(b, before)
        assert {n: b.bucket_index(n) for n in b.tensor_names} == index  # bucket versions as before
        assert verify(b).ok
    # the next guarded run fetches the same update and rejects it again; an accepting check keeps it
    assert run_cli("sync", src, dst, "--check", "false").returncode == 10
    assert run_cli("sync", src, dst, "--check", "true").returncode == 0
    with Replica.open(dst) as b, Replica.open(src) as a:
        assert b.head == 4 and receive.unconfirmed(b) is None
        for name in a.tensor_names:
            assert np.array_equal(bits(b.read_tensor(name)), bits(a.read_tensor(name)))


def test_a_crash_during_the_check_is_judged_by_the_next_guarded_run(tmp_path, rng):
    src, dst, before, _ = _setup(tmp_path, rng)
    # The check 'crashes' the sync: kill -9 of its own parent (the deltalog process) mid-check.
    proc = run_cli("sync", src, dst, "--check", "kill -9 $PPID; sleep 5")
    assert proc.returncode != 0
    with Replica.open(dst) as b:
        assert b.head == 4 and receive.unconfirmed(b) is not None  # applied, not yet accepted
    proc = run_cli("sync", src, dst, "--check", "false", "--json")
    assert proc.returncode == 10
    with Replica.open(dst) as b:
        assert b.head == 1 and receive.unconfirmed(b) is None
        assert_same(b, before)
        assert verify(b).ok


def test_an_interrupted_revert_is_finished_by_recovery(tmp_path, rng, monkeypatch):
    src, dst, before, index = _setup(tmp_path, rng)
    assert run_cli("sync", src, dst).returncode == 0  # unguarded: accepted as is
    with Replica.open(dst) as b, b.writing():
        marker = {"target": b.head, "base": 1, "buckets": {}}  # what a guarded finish leaves (no bucket entries here)

        def intend(txn):  # what revert_sync's first transaction writes
            b.store.put_meta(txn, receive.REVERT_KEY, marker)
            b.store.put_meta(txn, "state", {**b.store.get_meta(txn, "state"), "applying": 1})

        b.store.write(intend)  # the process dies right after recording its intent
        b.writer.lock.release()
    with Replica.open(dst) as b:  # open finds the intent and finishes the revert
        assert b.head == 1 and b.state.settled
        assert_same(b, before)


def test_check_needs_a_local_destination(tmp_path):
    proc = run_cli("sync", tmp_path / "a", "host:/x", "--check", "true")
    assert proc.returncode == 11 and "local DST" in proc.stderr


def test_compaction_leaves_a_sync_awaiting_its_check_undoable(tmp_path, rng):
    """Folding an unaccepted sync's record would leave its undo nothing to work with: the head went
    back below the oldest offset and no command could open the replica (a code review found it)."""
    src, dst, before, _ = _setup(tmp_path, rng)
    proc = run_cli("sync", src, dst, "--check", "kill -9 $PPID; sleep 5")
    assert proc.returncode != 0
    out = cli_json("compact", dst)  # stops before the unaccepted sync's record
    assert out["oldest_offset"] == 1 and out["head"] == 4
    proc = run_cli("compact", dst, "--from-tensors")
    assert proc.returncode == 11 and "awaits its --check" in proc.stderr
    assert run_cli("sync", src, dst, "--check", "false").returncode == 10  # the undo still works
    with Replica.open(dst) as b:
        assert b.head == 1 and receive.unconfirmed(b) is None
        assert_same(b, before)
        assert verify(b).ok
