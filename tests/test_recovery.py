"""Crash safety of commit: a crash at any point leaves a replica at the old or new head.

Two kinds of evidence: in-process crashes injected at the exact dangerous
points (after the log commit, mid-way through writing rows), and real
SIGKILLs of a child process committing in a loop, at random moments.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import REPO, Crash, apply_update, assert_same, crash_next_apply, crash_writer, random_model, random_update

from deltalog import Replica
from deltalog.verify import verify


@pytest.mark.parametrize("point", ["before-rows", "half-rows", "before-applied"])
def test_crash_between_log_commit_and_tensor_write_recovers_to_new_head(tmp_path, rng, monkeypatch, point):
    model = random_model(rng)
    path = tmp_path / "r"
    r = Replica.init(path, model, bucket_rows=16)
    first = random_update(rng, model)
    r.commit(first)
    apply_update(model, first)
    update = {"item_emb": (np.arange(0, 300, 7), rng.standard_normal((43, 8)).astype(np.float32))}

    crash_next_apply(monkeypatch, point)
    with pytest.raises(Crash):
        r.commit(update)
    crash_writer(r)
    monkeypatch.undo()

    with Replica.open(path) as reopened:  # open finds the abandoned write and finishes it
        apply_update(model, update)
        state = reopened.state
        assert (state.head, state.applied, state.applying, state.settled) == (2, 2, None, True)
        assert_same(reopened, model)
        assert verify(reopened).ok
    r.close()


def test_recovery_is_idempotent(tmp_path, rng):
    model = random_model(rng)
    with Replica.init(tmp_path / "r", model) as r:
        for _ in range(5):
            u = random_update(rng, model)
            r.commit(u)
            apply_update(model, u)

        def rewind(txn):  # pretend every record still has to be applied, twice over
            r.store.put_meta(txn, "state", {"head": 5, "applied": 0, "applying": 5})

        for _ in range(2):
            r.store.write(rewind)
            with r.writing():
                pass
        assert_same(r, model)


CHILD = r"""
import sys, numpy as np
sys.path.insert(0, {tests!r})
from conftest import random_model, random_update
from deltalog import Replica
rng = np.random.default_rng({seed})
model = random_model(rng, rows=3000, dim=16)
with Replica.open({path!r}) as r:
    for i in range({n}):
        off = r.commit(random_update(rng, model, max_rows=400))
        print(off, flush=True)
"""


def model_at(seed: int, head: int) -> dict[str, np.ndarray]:
    """The child's model after the commits that produced offsets 1..head (no-op commits append nothing)."""
    replay = np.random.default_rng(seed)
    model = random_model(replay, rows=3000, dim=16)
    offset = 0
    while offset < head:
        update = random_update(replay, model, max_rows=400)
        before = {k: v.copy() for k, v in model.items()}
        apply_update(model, update)
        offset += any(before[k].tobytes() != model[k].tobytes() for k in model)
    return model


def test_sigkill_during_commits_never_loses_a_returned_commit(tmp_path):
    """Kill a committing process at random moments; every kill point must leave an exact replica."""
    tests = os.path.join(REPO, "tests")
    n, kills = 60, 12  # 12 kill points, at random moments of a 60-commit run
    rng = np.random.default_rng(7)
    for attempt in range(kills):
        seed = 1000 + attempt
        path = tmp_path / f"r{attempt}"
        Replica.init(path, model_at(seed, 0), bucket_rows=64).close()
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD.format(tests=tests, seed=seed, path=str(path), n=n)],
            stdout=subprocess.PIPE, text=True,
        )
        time.sleep(0.25 + rng.random() * 0.6)  # interpreter start-up is ~0.2 s
        child.send_signal(signal.SIGKILL)
        out, _ = child.communicate()
        acknowledged = [int(x) for x in out.split()]
        with Replica.open(path) as r:
            head = r.head
            assert head >= (acknowledged[-1] if acknowledged else 0), "a commit that returned was lost"
            assert verify(r).ok
            assert_same(r, model_at(seed, head))
            r.commit({"step": ([0], np.array([123456], np.int64))})  # and the writer can go on


def test_after_a_reboot_unflushed_records_are_reapplied(tmp_path, rng, monkeypatch):
    """A machine crash loses page-cache writes; the boot id changes and recovery starts at 'flushed'."""
    from deltalog import writer as writer_mod

    monkeypatch.setattr(writer_mod, "FLUSH_SECONDS", 1e9)  # no periodic flush during the test
    model = random_model(rng)
    path = tmp_path / "r"
    with Replica.init(path, model, bucket_rows=16) as r:
        r.flush()
        flushed = r.state.flushed
        for _ in range(3):
            u = random_update(rng, model)
            r.commit(u)
            apply_update(model, u)
        r.writer.defer_flush()  # leave the last commits unflushed, as a crash would
    assert Replica.open(path).state.flushed == flushed  # close() could not flush: nothing dirty was known
    # Simulate lost pages: put the snapshot's bytes back into the tensor files.
    with Replica.open(path) as r:
        for info in r.tensors:
            src = path / "snapshots" / f"{0:020d}" / info.file
            (path / "tensors" / info.file).write_bytes(src.read_bytes())
        assert r.state.settled  # same boot: nothing looks wrong, as expected
    monkeypatch.setattr(writer_mod, "_BOOT_ID", "another-boot")
    with Replica.open(path) as r:  # reboot detected: records after 'flushed' re-applied
        assert r.state.settled and r.state.flushed == r.head
        assert_same(r, model)
        assert verify(r).ok


def test_a_background_checkpoint_moves_flushed_only_to_what_it_covered(tmp_path, rng, monkeypatch):
    """Writer.start_checkpoint fsyncs on another thread with no lock held; finish_checkpoint then
    records its offset (not the head the writer reached meanwhile), and refuses when the model at
    that offset is no longer the one it started from."""
    path = tmp_path / "r"
    model = random_model(rng)
    Replica.init(path, model).close()
    with Replica.open(path) as r:
        with r.writing():
            r.commit(random_update(rng, model))
            r.writer.defer_flush()
            checkpoint = r.writer.start_checkpoint()
            assert checkpoint is not None and checkpoint.offset == 1
            r.commit(random_update(rng, model))  # while it runs
            r.writer.defer_flush()
            assert r.writer.finish_checkpoint(checkpoint)
            assert r.state.flushed == 1 and r.head == 2
            later = r.writer.start_checkpoint()
            monkeypatch.setattr(type(r), "state_digest_at", lambda self, offset: 12345)  # as after a revert
            assert not r.writer.finish_checkpoint(later)
            assert r.state.flushed == 1


def test_a_background_checkpoint_that_cannot_write_says_so(tmp_path, rng, monkeypatch):
    """An fsync error on the checkpoint's thread is raised where it is finished, as flush() raises it."""
    from deltalog import writer
    from deltalog.errors import StorageError

    path = tmp_path / "r"
    model = random_model(rng)
    Replica.init(path, model).close()

    def failing(self, paths):
        raise StorageError(f"{self.path}: cannot write tensor files: Input/output error")

    with Replica.open(path) as r, r.writing():
        r.commit(random_update(rng, model))
        monkeypatch.setattr(writer.Writer, "_fsync_paths", failing)
        checkpoint = r.writer.start_checkpoint()
        with pytest.raises(StorageError, match="cannot write tensor files"):
            r.writer.finish_checkpoint(checkpoint)
        assert r.state.flushed == 0
        monkeypatch.undo()


def test_the_scheduled_fsync_runs_beside_the_commits(tmp_path, rng, monkeypatch):
    """The WAL checkpoint that comes due every FLUSH_SECONDS no longer stalls the commit that finds it
    due: its fsync runs on another thread, a later commit records what it made durable, and close
    waits for one still running. Without a boot id the fsync stays in line (recovery could not
    tell a reboot)."""
    import threading

    from deltalog import writer

    path = tmp_path / "r"
    model = random_model(rng)
    Replica.init(path, model).close()
    monkeypatch.setattr(writer, "FLUSH_SECONDS", 0.0)  # due at every commit
    release = threading.Event()
    real_fsync = writer.Writer._fsync_paths

    def slow_fsync(self, paths):
        assert release.wait(30), "the fsync was never released"
        real_fsync(self, paths)

    monkeypatch.setattr(writer.Writer, "_fsync_paths", slow_fsync)
    with Replica.open(path) as r:
        r.commit(random_update(rng, model))  # comes due: the checkpoint starts and the commit returns
        assert r.state.flushed == 0 and r.head == 1
        r.commit(random_update(rng, model))  # the fsync still runs: nothing recorded, none started
        assert r.state.flushed == 0
        release.set()
        r.writer._checkpoint.thread.join(30)
        r.commit(random_update(rng, model))  # records what the checkpoint covered: offset 1
        assert r.state.flushed == 1 and r.head == 3
        release.clear()
        r.commit(random_update(rng, model))  # the next one starts, from the head it leaves (4)
        assert r.writer._checkpoint is not None and r.writer._checkpoint.offset == 4
        threading.Timer(0.2, release.set).start()
    with Replica.open(path) as r:  # close waited for it and recorded it, then flushed the rest
        assert r.state.flushed == r.head == 4
    monkeypatch.setattr(writer, "_BOOT_ID", "")
    release.set()
    with Replica.open(path) as r:
        r.commit(random_update(rng, model))
        assert r.writer._checkpoint is None and r.state.flushed == r.head == 5
