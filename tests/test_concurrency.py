"""Concurrency: readers beside writers in other processes, two syncs into one replica, a cron loop.

The writer's updates are a pure function of the offset (:func:`update_for`),
so this process knows the model at every offset the writer reaches and can
check that every read, wherever it happens, is exactly the model at some
head: never a torn mix of two.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import DELTALOG, REPO, apply_update, bits, random_update, run_cli
from http_fixture import running_server
from sshd_fixture import sshd  # noqa: F401  (fixture)

from deltalog import Replica
from deltalog import sync as sync_mod
from deltalog.checkpoint import read_checkpoint, read_checkpoint_metadata
from deltalog.compact import compact
from deltalog.diff import ReplicaSide, diff
from deltalog.errors import LockHeld
from deltalog.history import head_values
from deltalog.rollback import rollback
from deltalog.store import LogStore
from deltalog.transport import open_sink, open_source
from deltalog.verify import verify

TESTS = os.path.join(REPO, "tests")


def same(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and np.array_equal(bits(a), bits(b))


def base_model() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "emb": rng.standard_normal((2000, 8)).astype(np.float32),
        "half": rng.standard_normal((500, 4)).astype(np.float16),
        "bias": rng.standard_normal(2000).astype(np.float32),
        "step": np.array(0, np.int64),
    }


def update_for(offset: int, model: dict[str, np.ndarray]) -> dict[str, tuple]:
    """The writer's update that makes ``offset``: a function of the offset alone (always a change)."""
    rng = np.random.default_rng(1000 + offset)
    rows = np.sort(rng.choice(2000, 120, replace=False))
    half = np.sort(rng.choice(500, 30, replace=False))
    return {
        "emb": (rows, rng.standard_normal((120, 8)).astype(np.float32)),
        "half": (half, rng.standard_normal((30, 4)).astype(np.float16)),
        "bias": (rows[:40], rng.standard_normal(40).astype(np.float32)),
        "step": ([0], np.array([offset], np.int64)),
    }


def states_upto(n: int) -> dict[int, dict[str, np.ndarray]]:
    model = base_model()
    states = {0: {k: v.copy() for k, v in model.items()}}
    for offset in range(1, n + 1):
        apply_update(model, update_for(offset, model))
        states[offset] = {k: v.copy() for k, v in model.items()}
    return states


def changed_rows(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> dict[str, int]:
    out = {}
    for name, before in a.items():
        rows = before.shape[0] if before.ndim else 1
        out[name] = int(np.any(bits(before).reshape(rows, -1) != bits(b[name]).reshape(rows, -1), axis=1).sum())
    return out


def local_sync(src, dst, **kw) -> sync_mod.SyncResult:
    source, sink = open_source(str(src)), open_sink(str(dst))
    try:
        return sync_mod.sync(source, sink, source_name=str(src), destination_name=str(dst), **kw)
    finally:
        sink.close()
        source.close()


_WRITER = r"""
import sys, time
sys.path.insert(0, {tests!r})
from test_concurrency import base_model, update_for
from deltalog import Replica
with Replica.open({path!r}) as r:
    for offset in range(1, {n} + 1):
        assert r.commit(update_for(offset, None)) == offset
        if offset % 15 == 0:
            with r.writing():
                r.make_snapshot()  # serve-snapshot's 'latest' moves on
        time.sleep(0.01)
"""

_SYNCER = r"""
import random, sys
sys.path.insert(0, {tests!r})
from test_concurrency import local_sync
from deltalog import Replica
chooser = random.Random(3)
while True:
    budget = chooser.choice([None, None, 3000, 20000])  # partial syncs too: pending buckets at the readers
    result = local_sync({src!r}, {dst!r}, max_bytes=budget, chunk_bytes=4000, wait=20)
    with Replica.open({src!r}) as s:
        if result.complete and result.head == {n} == s.head:
            break
"""


def _http_get(port: int, path: str) -> tuple[int, dict, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def test_readers_see_exact_heads_while_commits_and_syncs_run(tmp_path):
    n = 60
    states = states_upto(n)
    src, dst, pulled = tmp_path / "src", tmp_path / "dst", tmp_path / "pulled"
    Replica.init(src, base_model(), bucket_rows=64, model_id="concurrency").close()
    assert local_sync(src, dst).complete
    counts = {"replica reads": 0, "diffs": 0, "diffs refused (partial sync)": 0, "status": 0,
              "http status": 0, "http downloads": 0, "http pulls": 0}
    with running_server(src, "--quiet") as server:
        writer = subprocess.Popen([sys.executable, "-c", _WRITER.format(tests=TESTS, path=str(src), n=n)],
                                  stderr=subprocess.PIPE, text=True)
        syncer = subprocess.Popen([sys.executable, "-c", _SYNCER.format(tests=TESTS, src=str(src), dst=str(dst), n=n)],
                                  stderr=subprocess.PIPE, text=True)
        last_status, last_http_head = -1, -1
        try:
            round_ = 0
            while writer.poll() is None or syncer.poll() is None:
                round_ += 1
                # 1. the whole model, consistently, from both replicas (DST mid-partial-sync included)
                for path in (src, dst):
                    with Replica.open(path) as r:
                        head, values = head_values(r, {i.name: np.arange(i.rows) for i in r.tensors})
                        one = r.read_tensor("emb")  # a single tensor: the model at some head
                        for info in r.tensors:
                            assert same(values[info.name].reshape(info.shape), states[head][info.name]), (path, head)
                        assert any(same(one, states[h]["emb"]) for h in range(head, n + 1)), path
                    counts["replica reads"] += 1
                # 2. diff between the two replicas, each pinned at its head
                with Replica.open(src) as a, Replica.open(dst) as b:
                    try:
                        result = diff(ReplicaSide.at(a), ReplicaSide.at(b))
                    except LockHeld:
                        counts["diffs refused (partial sync)"] += 1
                    else:
                        want = changed_rows(states[result.a_offset], states[result.b_offset])
                        assert {t.name: t.changed_rows for t in result.tensors} == want, (result.a_offset, result.b_offset)
                        counts["diffs"] += 1
                # 3. the HTTP server: status, a snapshot download, a pull sync
                status, _, body = _http_get(server.port, "/v1/status")
                assert status == 200
                head = json.loads(body)["head"]
                assert head >= last_http_head
                last_http_head = head
                counts["http status"] += 1
                if round_ % 3 == 0:
                    status, headers, body = _http_get(server.port, "/v1/snapshot/latest")
                    assert status == 200 and int(headers["content-length"]) == len(body)
                    file = tmp_path / "latest.safetensors"
                    file.write_bytes(body)
                    offset = int(read_checkpoint_metadata(str(file))["deltalog.offset"])
                    ckpt = read_checkpoint(str(file))
                    for name, want in states[offset].items():
                        assert same(np.asarray(ckpt[name].array), want), (offset, name)
                    counts["http downloads"] += 1
                if round_ % 4 == 0:
                    result = local_sync(server.url, pulled)
                    assert result.complete
                    with Replica.open(pulled) as p:
                        for name, want in states[p.head].items():
                            assert same(p.read_tensor(name), want), (p.head, name)
                    counts["http pulls"] += 1
                # 4. the CLI, as a monitoring script runs it
                if round_ % 5 == 0:
                    proc = run_cli("status", dst, "--json")
                    assert proc.returncode == 0, proc.stderr
                    head = json.loads(proc.stdout)["head"]
                    assert head >= last_status
                    last_status = head
                    counts["status"] += 1
        finally:
            for child in (writer, syncer):
                try:
                    child.wait(timeout=120)
                except subprocess.TimeoutExpired:
                    child.kill()
                    child.wait()
        assert writer.returncode == 0, writer.stderr.read()
        assert syncer.returncode == 0, syncer.stderr.read()
    print(f"\n[concurrency] reads during {n} commits and a sync loop: {counts}")
    assert counts["replica reads"] >= 10 and counts["http status"] >= 5
    for path in (src, dst):
        with Replica.open(path) as r:
            assert r.head == n and verify(r).ok
            for name, want in states[n].items():
                assert same(r.read_tensor(name), want), (path, name)


def follower_with_two_pending_chunks(tmp_path) -> tuple:
    """(src at offset 6, dst at 0 holding a partial sync of two chunks towards 6)."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    with Replica.init(src, base_model(), bucket_rows=64) as r:
        assert local_sync(src, dst).complete
        for offset in range(1, 7):
            r.commit(update_for(offset, None))
    for _ in range(2):
        assert not local_sync(src, dst, max_bytes=1, chunk_bytes=1).complete
    return src, dst


def read_through(reader: Replica, read) -> tuple:
    """(tensor "emb", head) read by ``reader`` with its store's read transactions made by ``read``; closes it."""
    reader.store.read = read
    try:
        return reader.read_tensor("emb"), reader.head
    finally:
        reader.close()


def test_reading_a_follower_while_its_partial_sync_finishes(tmp_path):
    """A reader is between two pending chunks when the sync completes (deterministic interleaving).

    The sync completes right after the reader has read chunk 0: a reader
    that reads chunk 1 in another transaction finds it gone; one that reads
    the pending list and all its chunks in one transaction still sees them.
    """
    states = states_upto(6)
    src, dst = follower_with_two_pending_chunks(tmp_path)
    reader = Replica.open(dst)
    real_read = reader.store.read
    chunk_reads = []

    class ReaderTxn:
        def __init__(self, txn):
            self._txn = txn

        def get(self, key, *args, **kwargs):
            value = self._txn.get(key, *args, **kwargs)
            if bytes(key).startswith(b"sync.chunk."):
                chunk_reads.append(bytes(key))
                if len(chunk_reads) == 1:  # chunk 0 read, chunk 1 not yet: the sync completes now
                    assert local_sync(src, dst).complete
            return value

        def __getattr__(self, name):
            return getattr(self._txn, name)

    @contextlib.contextmanager
    def read():
        with real_read() as txn:
            yield ReaderTxn(txn)

    values, head = read_through(reader, read)
    assert len(chunk_reads) >= 2, "the interleaving did not happen"
    assert head == 6
    assert any(same(values, states[h]["emb"]) for h in (0, head)), "a torn read"


def test_reading_a_follower_whose_partial_sync_finishes_before_the_chunks_are_read(tmp_path):
    """The sync completes after the reader read its rows and checked the pending marker, before the chunks."""
    states = states_upto(6)
    src, dst = follower_with_two_pending_chunks(tmp_path)
    reader = Replica.open(dst)
    real_read = reader.store.read
    fired = []

    def read():
        if sys._getframe(1).f_code.co_name == "read_pending" and not fired:
            fired.append(1)
            assert local_sync(src, dst).complete
        return real_read()

    values, head = read_through(reader, read)
    assert fired, "the interleaving did not happen"
    assert any(same(values, states[h]["emb"]) for h in (0, head)), "a torn read"


# -- two syncs into one destination ---------------------------------------------------------------


def _pending_chunks(path) -> int:
    """Chunks a running sync has applied at ``path`` (read without the lock, as any reader may)."""
    store = LogStore(os.path.join(path, "log"))
    try:
        with store.read() as txn:
            pending = store.get_meta(txn, "sync.pending")
        return 0 if pending is None else pending["chunks"]
    finally:
        store.close()


@pytest.fixture
def behind(tmp_path, rng):
    """(src, dst, model): dst a follower of src, 40 commits of many small buckets behind."""
    model = {"emb": rng.standard_normal((6000, 8)).astype(np.float32), "bias": np.zeros(6000, np.float32)}
    src, dst = tmp_path / "src", tmp_path / "dst"
    with Replica.init(src, model, bucket_rows=16) as r:
        pass
    assert local_sync(src, dst).complete
    with Replica.open(src) as r:
        for _ in range(40):
            update = random_update(rng, model, max_rows=150)
            r.commit(update)
            apply_update(model, update)
    return src, dst, model


def _start_slow_sync(src, dst, *extra) -> subprocess.Popen:
    """A sync of one bucket per chunk (each one a durable step), paced by --bwlimit to take ~5 s
    however fast the machine is: slow enough to be caught holding the lock by the commands a test
    runs meanwhile (unpaced it took ~1.5 s, which three CLI runs on a loaded machine outlasted)."""
    proc = subprocess.Popen([*DELTALOG, "sync", str(src), str(dst), "--chunk-bytes", "1", "--bwlimit", "60K", "--json",
                             *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while _pending_chunks(dst) == 0:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.005)
    return proc


def test_second_sync_into_one_destination_exits_9_or_waits(behind, sshd, tmp_path):
    """While a sync writes DST: a second sync (local, or pushed over ssh) and a commit exit 9; --wait waits."""
    src, dst, model = behind
    ckpt = tmp_path / "other.npz"
    np.savez(ckpt, **{n: v + 1 for n, v in model.items()})
    first = _start_slow_sync(src, dst)
    try:
        second = run_cli("sync", src, dst, "--json")
        pushed = run_cli("sync", src, sshd.location(dst), *sshd.cli_options())  # the lock held, seen over ssh
        committed = run_cli("commit", dst, "--from", ckpt)
        waiter = subprocess.Popen([*DELTALOG, "sync", str(src), str(dst), "--wait", "60", "--json"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert first.poll() is None, "the first sync ended before the others tried: nothing was tested"
    finally:
        out, err = first.communicate(timeout=120)
    assert first.returncode == 0, err
    assert json.loads(out)["complete"] is True
    for proc in (second, pushed, committed):
        assert proc.returncode == 9, (proc.returncode, proc.stderr)
        assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
        assert "locked by another writer" in proc.stderr and "--wait" in proc.stderr
    assert json.loads(second.stdout)["error"]["exit_code"] == 9
    out, err = waiter.communicate(timeout=120)
    assert waiter.returncode == 0, err
    assert json.loads(out)["complete"] is True  # it waited, then found nothing left to do
    with Replica.open(src) as a, Replica.open(dst) as b:
        assert a.head == b.head and verify(b).ok
        for name, want in model.items():
            assert same(b.read_tensor(name), want), name


# -- a cron loop -------------------------------------------------------------------------------------------


def test_cron_loop_of_200_syncs_with_commits_in_between(tmp_path, rng):
    """200 syncs (budgets, partial syncs, a chain, rollbacks, compactions) in-process, a few by CLI; exact at the end."""
    model = {
        "emb": rng.standard_normal((400, 8)).astype(np.float32),
        "half": rng.standard_normal((100, 4)).astype(np.float16),
        "ids": rng.integers(-50, 50, (80, 2)).astype(np.int32),
        "step": np.array(0, np.int64),
    }
    src, dst, hop = tmp_path / "src", tmp_path / "dst", tmp_path / "hop"
    states = {0: {k: v.copy() for k, v in model.items()}}
    r = Replica.init(src, model, bucket_rows=16, model_id="cron")
    stats = {"complete": 0, "partial": 0, "snapshot transfers": 0, "cli": 0, "chain": 0, "rollbacks": 0, "compactions": 0}
    try:
        for i in range(200):
            for _ in range(int(rng.integers(0, 3))):
                update = random_update(rng, model)
                before = r.head
                offset = r.commit(update)
                apply_update(model, update)
                if offset != before:
                    states[offset] = {k: v.copy() for k, v in model.items()}
            if i % 23 == 11 and r.head > 3:
                target = int(rng.integers(max(r.oldest_offset, r.head - 6), r.head))
                if target in states and (target == r.oldest_offset or target != r.head):
                    result = rollback(r, target, reason=f"cron {i}")
                    if result.changed:
                        model = {k: v.copy() for k, v in states[target].items()}
                        states[result.offset] = {k: v.copy() for k, v in model.items()}
                        stats["rollbacks"] += 1
            if i % 37 == 36:
                compact(r, keep_records=3)  # a follower further behind needs a snapshot transfer
                stats["compactions"] += 1
            if i % 50 == 25:  # as cron runs it
                proc = run_cli("sync", src, dst, "--quiet", "--max-bytes", "2000")
                assert proc.returncode in (0, 1) and proc.stdout == "" and proc.stderr == "", proc.stderr
                stats["cli"] += 1
                continue
            budget = [None, None, None, 1500][int(rng.integers(0, 4))]
            result = local_sync(src, dst, max_bytes=budget, chunk_bytes=800)
            stats["complete" if result.complete else "partial"] += 1
            stats["snapshot transfers"] += result.snapshot_offset is not None
            with Replica.open(dst) as d:  # after every run: the exact model at its head
                for name in d.tensor_names:
                    assert same(d.read_tensor(name), states[d.head][name]), (i, d.head, name)
                if result.complete:
                    assert d.head == r.head and d.pending_sync() is None
            if i % 5 == 0:
                local_sync(dst, hop)  # a follower feeding another, whatever state it is in
                stats["chain"] += 1
        while not local_sync(src, dst).complete:
            pass
        assert local_sync(dst, hop).complete
        proc = run_cli("sync", dst, hop, "--json")
        assert proc.returncode == 0 and json.loads(proc.stdout)["complete"], proc.stderr
        for path in (dst, hop):
            with Replica.open(path) as d:
                assert d.head == r.head
                report = verify(d)
                assert report.ok, report.problems
                for name, want in model.items():
                    assert same(d.read_tensor(name), want), (path, name)
    finally:
        r.close()
    print(f"\n[cron] 200 sync runs, head {states and max(states)}: {stats}")
    assert stats["partial"] > 10 and stats["snapshot transfers"] >= 1 and stats["rollbacks"] >= 3
