"""The transport CONTRACT suite: every way of moving a model passes the same tests.

Transports: ``local`` (path to path), ``ssh-pull`` (host:path -> path),
``ssh-push`` (path -> host:path: the remote ``serve --stdio`` applies) over a
real sshd on 127.0.0.1 (tests/sshd_fixture.py), and ``http`` (a real
``serve-snapshot`` process, tests/http_fixture.py) when that helper exists.
Each test checks bitwise equality of every tensor, equal heads and a clean
``verify`` on the destination.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import sys
import subprocess
import time
from dataclasses import dataclass, field

import numpy as np
import pytest

from conftest import DELTALOG, bits, cli_json, compact_as_before_past_digests, random_update, run_cli
from deltalog import Replica
from deltalog import pending as pending_mod
from deltalog import record as rec
from deltalog import sync as sync_mod
from deltalog.errors import Diverged, LockHeld, ModelMismatch, TransportError
from deltalog.transport import TransportOptions, open_sink, open_source, parse_spec
from deltalog.verify import verify
from sshd_fixture import sshd  # noqa: F401  (fixture)

try:
    from http_fixture import serve_snapshot_url  # noqa: F401  (fixture)

    HAVE_HTTP = True
except ImportError:  # the HTTP helper's fixture is optional
    HAVE_HTTP = False

TRANSPORTS = ["local", "ssh-pull", "ssh-push", "http"]


# -- transports -----------------------------------------------------------------------


@dataclass
class Way:
    """How one transport names SRC and DST, for the library and for the CLI."""

    name: str
    request: object
    cli: list[str] = field(default_factory=list)
    options: TransportOptions = field(default_factory=TransportOptions)
    _urls: dict = field(default_factory=dict)

    def src(self, path) -> str:
        path = os.path.abspath(path)
        if self.name == "ssh-pull":
            return self.request.getfixturevalue("sshd").location(path)
        if self.name == "http":
            if path not in self._urls:
                self._urls[path] = self.request.getfixturevalue("serve_snapshot_url")(path)
            return self._urls[path]
        return path

    def dst(self, path) -> str:
        path = os.path.abspath(path)
        if self.name == "ssh-push":
            return self.request.getfixturevalue("sshd").location(path)
        return path


@pytest.fixture(params=TRANSPORTS)
def way(request) -> Way:
    name = request.param
    w = Way(name, request)
    if name.startswith("ssh"):
        server = request.getfixturevalue("sshd")
        w.cli = server.cli_options()
        w.options = TransportOptions(ssh_command=server.ssh_command, remote_deltalog=server.remote_deltalog)
    elif name == "http" and not HAVE_HTTP:
        pytest.skip("tests/http_fixture.py (the HTTP transport's fixture) is not present")
    return w


def do_sync(way: Way, src, dst, **kw) -> sync_mod.SyncResult:
    """One sync through ``way``, in-process (the far ends of ssh/http are real processes)."""
    s_text, d_text = way.src(src), way.dst(dst)
    source = open_source(s_text, way.options)
    try:
        sink = open_sink(d_text, way.options)
        try:
            return sync_mod.sync(source, sink, source_name=s_text, destination_name=d_text, **kw)
        finally:
            sink.close()
    finally:
        source.close()


def sync_cli(way: Way, src, dst, *args) -> subprocess.CompletedProcess:
    return run_cli("sync", way.src(src), way.dst(dst), *way.cli, *args)


# -- models ---------------------------------------------------------------------------


def make_model(rng, rows: int = 300) -> dict[str, np.ndarray]:
    return {
        "item_emb": rng.standard_normal((rows, 8)).astype(np.float32),
        "user_emb": rng.standard_normal((rows // 2, 8)).astype(np.float16),
        "dense": rng.standard_normal((16, 4, 2)).astype(np.float64),
        "bias": rng.standard_normal(rows // 3).astype(np.float32),
        "ids": rng.integers(-1000, 1000, size=(rows // 4, 3)).astype(np.int32),
        "mask": rng.integers(0, 2, size=rows // 5).astype(np.uint8),
        "step": np.array(0, dtype=np.int64),
    }


def new_source(tmp_path, rng, commits: int = 15, bucket_rows: int = 16, rows: int = 300):
    model = make_model(rng, rows)
    path = tmp_path / "src"
    with Replica.init(path, model, bucket_rows=bucket_rows) as r:
        for _ in range(commits):
            r.commit(random_update(rng, model))
    return path, model


def advance(path, rng, model, commits: int = 10, max_rows: int = 20) -> int:
    with Replica.open(path) as r:
        for _ in range(commits):
            r.commit(random_update(rng, model, max_rows=max_rows))
        return r.head


def at_head(replica: Replica, name: str) -> np.ndarray:
    """A tensor exactly at the replica's head: rows a pending partial sync brought ahead are put back."""
    values = replica.read_tensor(name)
    pending = pending_mod.merged_pending(replica).get(name)
    if pending is not None:
        flat = values.reshape(replica.info(name).rows, -1)
        flat[pending.rows.astype(np.intp)] = pending.old
    return values


def assert_synced(src, dst) -> None:
    """Same head, every tensor bitwise equal (at the source's head), verify clean."""
    with Replica.open(src) as a, Replica.open(dst) as b:
        assert b.head == a.head
        assert b.pending_sync() is None
        for name in a.tensor_names:
            assert np.array_equal(bits(at_head(a, name)), bits(b.read_tensor(name))), name
        report = verify(b)
        assert report.ok, report.problems


def assert_valid(dst) -> None:
    """The destination opens and verifies (whatever point a sync stopped at)."""
    with Replica.open(dst) as b:
        report = verify(b, wait=30)  # a killed client's remote end may still be winding down
        assert report.ok, report.problems


def record_count(path) -> int:
    with Replica.open(path) as r:
        return sum(1 for _ in r.iter_summaries())


# -- the contract -----------------------------------------------------------------------


def test_new_destination_then_incremental_then_noop(way, tmp_path, rng):
    src, model = new_source(tmp_path, rng)
    dst = tmp_path / "dst"
    dst.mkdir()  # an empty directory is filled like a missing one
    first = do_sync(way, src, dst)
    assert first.complete and first.created and first.snapshot_offset == 0
    assert_synced(src, dst)
    advance(src, rng, model)
    with Replica.open(src) as r:  # a hot row, written 50 times, is sent once with its latest value
        for i in range(50):
            r.commit({"item_emb": ([7], np.full((1, 8), i, np.float32))})
    second = do_sync(way, src, dst)
    assert second.complete and second.snapshot_offset is None and second.rows_sent > 0
    assert second.from_offset == first.to_offset
    assert_synced(src, dst)
    with Replica.open(dst) as b:
        assert b.read_tensor("item_emb")[7, 0] == 49
    records = record_count(dst)
    again = do_sync(way, src, dst)
    assert again.complete and again.chunks == 0 and again.bytes_sent == 0 and again.rows_sent == 0
    assert record_count(dst) == records
    assert_synced(src, dst)


def test_hot_rows_are_sent_once(tmp_path, rng):
    src, model = new_source(tmp_path, rng, commits=0)
    dst = tmp_path / "dst"
    way = Way("local", None)
    do_sync(way, src, dst)
    with Replica.open(src) as r:
        for i in range(50):
            r.commit({"item_emb": ([7], np.full((1, 8), i, np.float32))})
    assert do_sync(way, src, dst).rows_sent == 1
    assert_synced(src, dst)


def test_budget_sends_most_significant_buckets_first_and_stays_honest(way, tmp_path, rng):
    model = {"emb": rng.standard_normal((80, 4)).astype(np.float32)}
    src, dst = tmp_path / "src", tmp_path / "dst"
    Replica.init(src, model, bucket_rows=16).close()
    do_sync(way, src, dst)
    with Replica.open(src) as r:
        base = r.read_tensor("emb")
        for step in range(3):  # bucket 3 moves by 100, bucket 1 by 10, the rest by 0.01
            rows = np.arange(80)
            delta = np.full(80, 0.01, np.float32)
            delta[3 * 16:4 * 16] = 100
            delta[1 * 16:2 * 16] = 10
            r.commit({"emb": (rows, base + (step + 1) * delta[:, None])})
        target = r.head
    with Replica.open(dst) as b:
        head = b.head
    held_before = []
    runs = 0
    while True:
        result = do_sync(way, src, dst, max_bytes=1, chunk_bytes=1)  # one bucket per run
        runs += 1
        if result.complete:
            break
        assert result.chunks == 1 and result.stopped_by == "max-bytes"
        with Replica.open(dst) as b:
            status = b.status()
            assert status["head"] == head  # the head stays the last complete offset
            assert status["pending_buckets"] == runs
            held = sorted(pending_mod.pending_buckets(b.pending_sync())["emb"])
            held_before.append(held)
        assert_valid(dst)
        if runs == 1:
            assert held == [3]
        if runs == 2:
            assert held == [1, 3]
    assert runs == 5  # one bucket per run; the run that moves the last one completes
    assert result.chunks == 1 and result.to_offset == target
    assert_synced(src, dst)


def _encoding(blob) -> int:
    return int.from_bytes(bytes(blob[4:6]), "big")


def test_chunks_cross_the_wire_as_v1_records_and_are_stored_as_v2(way, tmp_path, rng):
    """Every deltalog decodes what a source sends (record encoding v1); a destination stores
    encoding v2, the sections it received included (their checksums computed on arrival)."""
    src, model = new_source(tmp_path, rng)
    dst = tmp_path / "dst"
    do_sync(way, src, dst)
    advance(src, rng, model)
    with Replica.open(src) as a, Replica.open(dst) as b:
        since, target = b.head, a.head
        assert {_encoding(blob) for _o, blob in a.iter_record_blobs()} == {2}
    source = open_source(way.src(src), way.options)
    try:
        one = list(source.chunks(since, {}, target, 1 << 30))
        several = list(source.chunks(since, {}, target, 64))
    finally:
        source.close()
    assert len(one) == 1 and len(several) > 2
    assert {_encoding(blob) for blob in one + several} == {1}
    result = do_sync(way, src, dst, max_bytes=1, chunk_bytes=64)  # stops after one chunk: it stays pending
    assert not result.complete and result.chunks == 1
    with Replica.open(dst) as b:
        _pending, chunks = pending_mod.read_pending(b)
        assert [_encoding(blob) for blob in chunks] == [2]
    assert do_sync(way, src, dst).complete  # the rest, then all chunks become one record
    advance(src, rng, model)
    assert do_sync(way, src, dst).chunks == 1  # a one-chunk sync: the chunk is stored as its record
    assert_synced(src, dst)
    with Replica.open(dst) as b:
        stored = dict(b.iter_record_blobs())
    assert len(stored) == 3 and {_encoding(blob) for blob in stored.values()} == {2}  # the first came after the snapshot
    for blob in stored.values():
        rec.check(blob)


def test_partial_sync_resumes_after_the_source_advanced(way, tmp_path, rng):
    src, model = new_source(tmp_path, rng)
    dst = tmp_path / "dst"
    do_sync(way, src, dst)
    advance(src, rng, model, commits=10)
    first = do_sync(way, src, dst, max_bytes=1, chunk_bytes=1)
    assert not first.complete
    with Replica.open(dst) as b:
        pending_rows = sum(len(d.rows) for d in pending_mod.merged_pending(b).values())
    # Nothing that arrived is sent again while the source stands still.
    with Replica.open(src) as a, Replica.open(dst) as b:
        plan = sync_mod.source_plan(a, b.head, {}, a.head)
    second = do_sync(way, src, dst, max_bytes=1, chunk_bytes=1)
    assert second.rows_sent + first.rows_sent <= plan["rows"]
    assert pending_rows == first.rows_sent
    advance(src, rng, model, commits=10)
    final = do_sync(way, src, dst)
    assert final.complete
    assert_synced(src, dst)


def test_chain_through_a_follower(way, tmp_path, rng):
    """A -> B -> C: B (a follower, even mid-partial-sync) feeds C the model at B's head."""
    a, model = new_source(tmp_path, rng)
    b, c = tmp_path / "b", tmp_path / "c"
    hot = np.arange(16)  # bucket 0 of item_emb: written in both rounds, pending at B in the second

    def round_(scale: float) -> None:
        advance(a, rng, model, commits=4)
        with Replica.open(a) as r:
            r.commit({"item_emb": (hot, np.full((16, 8), scale, np.float32))})

    do_sync(way, a, b)
    do_sync(way, b, c)
    assert_synced(a, c)
    round_(1.0)
    assert do_sync(way, a, b).complete  # B one round ahead of C
    round_(1000.0)
    assert not do_sync(way, a, b, max_bytes=1, chunk_bytes=1).complete  # B holds bucket 0 pending
    with Replica.open(b) as r:
        assert 0 in pending_mod.pending_buckets(r.pending_sync())["item_emb"]
        assert r.tensor("item_emb")[0, 0] == 1000.0  # the pending value is in the tensor file already
        assert r.read_tensor("item_emb")[0, 0] == 1.0  # but readers of the model at the head see through it
    feed = do_sync(way, b, c)  # C gets B's head: bucket 0 as of round 1, not B's pending values
    assert feed.complete and feed.chunks > 0
    assert_synced(b, c)
    with Replica.open(c) as r:
        assert r.read_tensor("item_emb")[0, 0] == 1.0
    assert do_sync(way, a, b).complete
    assert do_sync(way, b, c).complete
    assert_synced(a, c)
    assert_synced(b, c)


def _compact_to_head(path) -> int:
    from deltalog.compact import compact

    with Replica.open(path) as r:
        compact(r)
        return r.oldest_offset


def _compact_as_before_past_digests(path) -> int:
    with Replica.open(path) as r:
        return compact_as_before_past_digests(r)


def test_destination_behind_the_source_retention_gets_a_snapshot(way, tmp_path, rng):
    """A follower whose head the source compacted away is proven to hold the source's history by the
    state digest compaction kept for that offset, then gets the source's snapshot and the log after it."""
    src, model = new_source(tmp_path, rng)
    dst = tmp_path / "dst"
    do_sync(way, src, dst)
    advance(src, rng, model, commits=5)
    oldest = _compact_to_head(src)
    advance(src, rng, model, commits=5)
    result = do_sync(way, src, dst)
    assert result.complete and result.snapshot_offset == oldest and not result.created
    assert_synced(src, dst)
    with Replica.open(dst) as b:
        assert b.oldest_offset == oldest


def test_a_relay_that_caught_up_by_snapshot_still_vouches_for_its_own_followers(way, tmp_path, rng):
    """A -> B (through ``way``) -> C. B falls behind A's compaction and is rebased onto A's snapshot,
    proven; C, still on an offset B's rebase dropped, must then be proven by B: B keeps the digests of
    the history it dropped, as a compaction does (a reseed would not)."""
    src, model = new_source(tmp_path, rng, commits=3)
    relay, leaf = tmp_path / "relay", tmp_path / "leaf"
    assert do_sync(way, src, relay).complete
    assert run_cli("sync", relay, leaf).returncode == 0  # leaf at 3
    advance(src, rng, model, commits=2)
    assert do_sync(way, src, relay).complete  # relay at 5
    advance(src, rng, model, commits=3)
    oldest = _compact_to_head(src)  # the relay is behind it
    result = do_sync(way, src, relay)
    assert result.complete and result.snapshot_offset == oldest
    proc = run_cli("sync", relay, leaf, "--json")  # the leaf is behind the relay's oldest now
    assert proc.returncode == 0, proc.stderr
    assert_synced(src, leaf)


def test_a_diverged_destination_behind_the_source_retention_is_refused(way, tmp_path, rng):
    """A stray commit on a follower stays refused (exit 13, nothing written) after the source compacted
    past the follower's head: that the source can no longer send records from there does not make
    replacing the follower's own history by its snapshot any less a loss. --reseed still does it."""
    src, model = new_source(tmp_path, rng, commits=3)
    dst = tmp_path / "dst"
    assert do_sync(way, src, dst).complete
    _stray_commit(dst)
    advance(src, rng, model, commits=3)
    _compact_to_head(src)
    before = _log_of(dst)
    for args in ((), ("--dry-run",), ("--max-bytes", "2K")):
        proc = sync_cli(way, src, dst, "--json", *args)
        assert proc.returncode == 13, proc.stderr
        err = json.loads(proc.stdout)["error"]
        assert err["type"] == "Diverged" and "--reseed" in err["hint"] and "Traceback" not in proc.stderr
        assert _log_of(dst) == before
    proc = sync_cli(way, src, dst, "--reseed", "--json")
    assert proc.returncode == 0, proc.stderr
    assert_synced(src, dst)


def test_an_unprovable_destination_behind_the_source_retention_is_refused(way, tmp_path, rng):
    """A source compacted before it kept past digests cannot vouch for a follower's head: the sync
    refuses (exit 7, naming --reseed) and writes nothing, faithful follower or not."""
    src, model = new_source(tmp_path, rng)
    dst = tmp_path / "dst"
    assert do_sync(way, src, dst).complete
    advance(src, rng, model, commits=5)
    oldest = _compact_as_before_past_digests(src)
    before = _log_of(dst)
    proc = sync_cli(way, src, dst, "--json")
    assert proc.returncode == 7, proc.stderr
    err = json.loads(proc.stdout)["error"]
    assert err["type"] == "HistoryUnproven" and "--reseed" in err["hint"] and f"oldest offset {oldest}" in err["message"]
    assert _log_of(dst) == before
    assert sync_cli(way, src, dst, "--reseed").returncode == 0
    assert_synced(src, dst)


def test_a_first_sync_from_a_snapshot_head_keeps_the_time_it_was_made(way, tmp_path, rng):
    """Compacted to its head, a source has no record that says when its head was made; the snapshot's
    manifest does, and every transport carries it to the new replica (status: head_time, lag_seconds)."""
    from deltalog.compact import compact
    from deltalog.history import head_time

    src, _model = new_source(tmp_path, rng, commits=3)
    with Replica.open(src) as r:
        made = head_time(r, r.head)
        compact(r)
        assert r.oldest_offset == r.head and head_time(r, r.head) == made
    dst = tmp_path / "dst"
    result = do_sync(way, src, dst)
    assert result.complete and result.snapshot_offset == result.head
    with Replica.open(dst) as b:
        assert head_time(b, b.head) == made


def test_another_models_deltas_are_refused(way, tmp_path, rng):
    src, _ = new_source(tmp_path, rng, commits=2)
    other = tmp_path / "other"
    Replica.init(other, make_model(rng), bucket_rows=16).close()
    before = record_count(other)
    with pytest.raises(ModelMismatch):
        do_sync(way, src, other)
    proc = sync_cli(way, src, other)
    assert proc.returncode == 6, proc.stderr
    assert "model" in proc.stderr and "Traceback" not in proc.stderr
    assert record_count(other) == before
    assert_valid(other)


def _stray_commit(path) -> None:
    """A write on a serving replica that its source never made."""
    with Replica.open(path) as r:
        r.commit({"item_emb": (np.arange(20), np.full((20, 8), 7.0, np.float32))})


def _log_of(path) -> tuple:
    with Replica.open(path) as r:
        return r.head, r.state_digest, dict(r.iter_record_blobs())


def test_a_diverged_destination_is_refused_until_reseeded(way, tmp_path, rng):
    """A follower that took a stray commit: the next sync refuses (exit 13) and writes nothing,
    whether the budget is whole or small; --reseed makes it the source's model again."""
    src, model = new_source(tmp_path, rng, commits=3)
    dst = tmp_path / "dst"
    assert do_sync(way, src, dst).complete
    _stray_commit(dst)
    advance(src, rng, model, commits=2)
    before = _log_of(dst)
    for budget in ((), ("--max-bytes", "2K", "--chunk-bytes", "512")):
        proc = sync_cli(way, src, dst, "--json", *budget)
        assert proc.returncode == 13, proc.stderr
        err = json.loads(proc.stdout)["error"]
        assert err["type"] == "Diverged" and "--reseed" in err["hint"] and "Traceback" not in proc.stderr
        assert _log_of(dst) == before
    with pytest.raises(Diverged):
        do_sync(way, src, dst)
    assert _log_of(dst) == before
    proc = sync_cli(way, src, dst, "--reseed", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["snapshot_offset"] == 0
    assert_synced(src, dst)
    with Replica.open(src) as a, Replica.open(dst) as b:
        assert a.state_digest == b.state_digest
    advance(src, rng, model, commits=2)
    assert do_sync(way, src, dst).complete  # and it follows again
    assert_synced(src, dst)


def test_a_failover_primary_on_another_history_is_refused(way, tmp_path, rng):
    """The primary fails over to a copy restored from offset 2, which then commits other updates:
    its followers refuse it, ahead of them or behind, and stay as they were."""
    src, model = new_source(tmp_path, rng, commits=2)
    restored = tmp_path / "restored"
    shutil.copytree(src, restored)  # the backup the new primary starts from
    dst = tmp_path / "dst"
    assert do_sync(way, src, dst).complete
    for _ in range(3):  # the follower holds every offset of the old primary: 3, 4, 5
        advance(src, rng, model, commits=1)
        assert do_sync(way, src, dst).complete
    other = make_model(np.random.default_rng(7))
    advance(restored, rng, other, commits=1)  # 3, on another history: behind the follower
    before = _log_of(dst)
    with pytest.raises(Diverged, match="offset 3"):
        do_sync(way, restored, dst)
    advance(restored, rng, other, commits=3)  # 6: ahead of it
    with pytest.raises(Diverged):
        do_sync(way, restored, dst)
    assert _log_of(dst) == before
    assert_valid(dst)
    assert do_sync(way, src, dst).complete  # the old primary still feeds it


def test_cli_json_budget_exit_codes_and_follower_status(way, tmp_path, rng):
    src, model = new_source(tmp_path, rng, commits=5)
    dst = tmp_path / "dst"
    proc = sync_cli(way, src, dst, "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    for key in ("from_offset", "to_offset", "rows_sent", "bytes_sent", "chunks", "complete", "seconds",
                "pending_buckets"):
        assert key in data
    assert data["complete"] is True and data["created"] is True and data["from_offset"] is None
    head = advance(src, rng, model, commits=5)
    proc = sync_cli(way, src, dst, "--json", "--max-bytes", "1", "--chunk-bytes", "1")
    assert proc.returncode == 1, proc.stderr
    data = json.loads(proc.stdout)
    assert data["complete"] is False and data["chunks"] == 1 and data["pending_buckets"] == 1
    assert data["to_offset"] == head
    status = json.loads(run_cli("status", dst, "--json", check=True).stdout)
    assert status["pending_buckets"] == 1 and status["head"] == data["from_offset"]
    assert status["lag_offsets"] == head - status["head"] and status["source"]
    proc = sync_cli(way, src, dst, "--quiet")
    assert proc.returncode == 0 and proc.stdout == "" and proc.stderr == ""
    status = json.loads(run_cli("status", dst, "--json", check=True).stdout)
    assert status["lag_offsets"] == 0 and "pending_buckets" not in status and status["lag_seconds"] >= 0
    assert_synced(src, dst)


def test_dry_run_writes_nothing(way, tmp_path, rng):
    src, model = new_source(tmp_path, rng, commits=5)
    new = tmp_path / "new"
    proc = sync_cli(way, src, new, "--dry-run", "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["dry_run"] and data["snapshot_offset"] == 0 and data["plan"]["rows"] > 0
    assert not new.exists() and not list(tmp_path.glob(".new*"))
    dst = tmp_path / "dst"
    do_sync(way, src, dst)
    advance(src, rng, model, commits=3)
    records = record_count(dst)
    proc = sync_cli(way, src, dst, "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert "would sync" in proc.stdout
    assert record_count(dst) == records


def test_snapshot_transfer_resumes_under_a_budget(way, tmp_path, rng):
    src, _ = new_source(tmp_path, rng, commits=0, rows=2000)  # all in the snapshot: bytes_sent counts it alone
    dst = tmp_path / "dst"
    with Replica.open(src) as r:
        total = sum(t.nbytes for t in r.tensors)
    first = do_sync(way, src, dst, max_bytes=total // 2)
    assert not first.complete and first.stopped_by == "max-bytes" and 0 < first.bytes_sent <= total // 2
    assert not dst.exists()  # never a partial replica under its final name
    second = do_sync(way, src, dst)
    assert second.complete and second.snapshot_bytes == total
    assert second.bytes_sent == total - first.bytes_sent  # what arrived is not fetched again
    assert_synced(src, dst)


# -- crash safety ------------------------------------------------------------------------


def _kill_sync_at_random_points(way: Way, src, dst, attempts: int, seed: int) -> None:
    chooser = random.Random(seed)
    argv = [*DELTALOG, "sync", way.src(src), way.dst(dst), *way.cli, "--chunk-bytes", "1", "--quiet"]
    for _ in range(attempts):
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(chooser.uniform(0.3, 1.2))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        time.sleep(0.2)  # let a remote serve --stdio notice its client is gone
        if os.path.exists(os.path.join(dst, "DELTALOG")):
            assert_valid(dst)


@pytest.mark.parametrize("kill_side", ["client"])
def test_killed_sync_leaves_a_valid_destination_and_resumes(way, tmp_path, rng, kill_side):
    src, model = new_source(tmp_path, rng, commits=5, rows=4000)
    dst = tmp_path / "dst"
    do_sync(way, src, dst)
    advance(src, rng, model, commits=40, max_rows=200)
    _kill_sync_at_random_points(way, src, dst, attempts=3 if way.name == "local" else 1, seed=len(way.name))
    with Replica.open(dst) as b:
        pending = sum(len(d.rows) for d in pending_mod.merged_pending(b).values())
        since = b.head
        advanced = pending_mod.pending_buckets(b.pending_sync())
    with Replica.open(src) as a:
        total = sync_mod.source_plan(a, since, {}, a.head)["rows"]
        remaining = sync_mod.source_plan(a, since, advanced, a.head)["rows"]
    assert remaining + pending == total  # the buckets that arrived are not sent again
    result = do_sync(way, src, dst, wait=30)
    assert result.complete and result.rows_sent == remaining
    assert_synced(src, dst)


def test_killed_first_sync_never_leaves_a_partial_destination(tmp_path, rng):
    src, _ = new_source(tmp_path, rng, commits=30, rows=4000)
    dst = tmp_path / "dst"
    way = Way("local", None)
    chooser = random.Random(7)
    argv = [*DELTALOG, "sync", str(src), str(dst), "--chunk-bytes", "1", "--max-bytes", "20000", "--quiet"]
    for _ in range(3):
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(chooser.uniform(0.25, 0.8))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if dst.exists():
            assert_valid(dst)
    while not do_sync(way, src, dst, max_bytes=1 << 20).complete:
        pass
    assert_synced(src, dst)


# -- local-only behaviour ------------------------------------------------------------------


def test_source_advancing_during_a_sync(tmp_path, rng):
    """Values are read at exactly the target even when the source commits mid-stream."""
    src, model = new_source(tmp_path, rng)
    dst = tmp_path / "dst"
    way = Way("local", None)
    do_sync(way, src, dst)
    advance(src, rng, model, commits=10)
    with Replica.open(src) as r:
        target = r.head
        expected = {name: r.read_tensor(name) for name in r.tensor_names}

    class Moving:
        def __init__(self):
            self.inner = open_source(str(src))

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def chunks(self, *args):
            for n, blob in enumerate(self.inner.chunks(*args)):
                if n == 1:
                    advance(src, rng, model, commits=5, max_rows=200)  # overwrite rows still to come
                yield blob

    source, sink = Moving(), open_sink(str(dst))
    try:
        result = sync_mod.sync(source, sink, source_name=str(src), destination_name=str(dst), chunk_bytes=1)
    finally:
        sink.close()
        source.inner.close()
    assert result.complete and result.head == target and result.chunks > 2
    with Replica.open(dst) as b:
        for name, values in expected.items():
            assert np.array_equal(bits(b.read_tensor(name)), bits(values)), name
        assert verify(b).ok
    assert do_sync(way, src, dst).complete
    assert_synced(src, dst)


def test_second_sync_into_a_locked_destination_fails_or_waits(tmp_path, rng):
    src, model = new_source(tmp_path, rng, commits=3)
    dst = tmp_path / "dst"
    way = Way("local", None)
    do_sync(way, src, dst)
    advance(src, rng, model, commits=2)
    with Replica.open(dst) as b, b.writing():
        with pytest.raises(LockHeld):
            do_sync(way, src, dst)
        proc = run_cli("sync", src, dst)
        assert proc.returncode == 9, proc.stderr
        waiter = subprocess.Popen([*DELTALOG, "sync", str(src), str(dst), "--wait", "20", "--json"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(1.0)
    out, err = waiter.communicate(timeout=60)
    assert waiter.returncode == 0, err
    assert json.loads(out)["complete"]
    assert_synced(src, dst)


def test_two_syncs_creating_one_destination(tmp_path, rng):
    src, _ = new_source(tmp_path, rng, commits=3)
    dst = tmp_path / "dst"
    way = Way("local", None)
    sink = open_sink(str(dst))
    sink.begin(0.0)  # holds the staging lock of the new replica
    try:
        with pytest.raises(LockHeld):
            do_sync(way, src, dst)
    finally:
        sink.close()
    assert do_sync(way, src, dst).complete
    assert_synced(src, dst)


def test_pending_sync_blocks_other_writers(tmp_path, rng):
    src, model = new_source(tmp_path, rng, commits=3)
    dst = tmp_path / "dst"
    way = Way("local", None)
    do_sync(way, src, dst)
    advance(src, rng, model, commits=3)
    assert not do_sync(way, src, dst, max_bytes=1, chunk_bytes=1).complete
    with Replica.open(dst) as b:
        with pytest.raises(Exception, match="partial sync"):
            b.commit({"item_emb": ([0], np.zeros((1, 8), np.float32))})


def test_source_behind_a_pending_partial_sync_undoes_it(tmp_path, rng):
    """DST holds buckets of offset t1 pending; a source at t0 < t1 cannot finish them: they are undone."""
    src, model = new_source(tmp_path, rng, commits=3)
    lagging = tmp_path / "lagging"
    dst = tmp_path / "dst"
    way = Way("local", None)
    do_sync(way, src, dst)
    do_sync(way, src, lagging)
    advance(src, rng, model, commits=2)
    do_sync(way, src, lagging)
    advance(src, rng, model, commits=4)
    assert not do_sync(way, src, dst, max_bytes=1, chunk_bytes=1).complete
    result = do_sync(way, lagging, dst)
    assert result.complete
    assert_synced(lagging, dst)
    assert do_sync(way, src, dst).complete
    assert_synced(src, dst)


def test_peer_that_vanishes_mid_transfer_is_a_transport_error(sshd, tmp_path, rng):
    src, model = new_source(tmp_path, rng, commits=20, rows=2000)
    dst = tmp_path / "dst"
    script = tmp_path / "dying-deltalog"
    script.write_text(f"#!/bin/sh\n{sshd.remote_deltalog} \"$@\" | (dd bs=1 count=30000 2>/dev/null; kill -9 0)\n")
    script.chmod(0o755)
    proc = run_cli("sync", sshd.location(src), dst, "--ssh-command", sshd.ssh_command,
                   "--remote-deltalog", str(script), "--chunk-bytes", "1", "--timeout", "30")
    assert proc.returncode == 8, proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    if dst.exists():
        assert_valid(dst)
    proc = run_cli("sync", sshd.location(src), dst, "--ssh-command", sshd.ssh_command,
                   "--remote-deltalog", "echo garbage; true")
    assert proc.returncode == 8 and "garbled" in proc.stderr
    proc = run_cli("sync", sshd.location(src), dst, *sshd.cli_options())
    assert proc.returncode == 0, proc.stderr
    assert_synced(src, dst)


def test_unreachable_host_and_bad_specs(tmp_path, rng):
    src, _ = new_source(tmp_path, rng, commits=1)
    proc = run_cli("sync", src, "127.0.0.1:/nowhere", "--ssh-command", "ssh -p 1 -o ConnectTimeout=3")
    assert proc.returncode == 8 and "Connection refused" in proc.stderr
    proc = run_cli("sync", src, src)
    assert proc.returncode == 11
    proc = run_cli("sync", src, "http://127.0.0.1:1/")
    assert proc.returncode == 11 and "pull only" in proc.stderr
    with pytest.raises(TransportError):
        open_source("127.0.0.1:/x", TransportOptions(ssh_command="/nonexistent-ssh"))


def test_spec_parsing():
    assert parse_spec("/a/b").scheme == "local"
    assert parse_spec("./host:x").scheme == "local"
    assert parse_spec("rel/dir:x").scheme == "local"
    s = parse_spec("me@box:models/r1")
    assert (s.scheme, s.host, s.path) == ("ssh", "me@box", "models/r1")
    s = parse_spec("[::1]:/srv/m")
    assert (s.scheme, s.host, s.path) == ("ssh", "[::1]", "/srv/m")
    assert parse_spec("https://h:8765").scheme == "https"


def test_snapshot_transfer_of_a_model_with_an_empty_tensor(tmp_path):
    """A zero-row tensor has no snapshot pieces to send; its file must still be created."""
    src, dst = tmp_path / "a", tmp_path / "b"
    with Replica.init(src, {"empty": np.zeros((0, 3), np.float32), "x": np.ones(4, np.float32)}) as r:
        r.commit({"x": ([1], np.array([5.0], np.float32))})
    result = cli_json("sync", src, dst)
    assert result["complete"] is True and result["to_offset"] == 1
    with Replica.open(dst) as b:
        assert b.read_tensor("empty").shape == (0, 3)
        assert b.read_tensor("x").tolist() == [1.0, 5.0, 1.0, 1.0]


def test_a_partially_synced_replica_reads_as_its_head(tmp_path, rng):
    """Rows a budget-stopped sync already wrote are ahead of the head: every reader of
    'the model at head' (read_tensor, values_at, so diff/rollback/replay) must not see them."""
    from deltalog.history import values_at

    src, dst = tmp_path / "a", tmp_path / "b"
    model = {"emb": rng.standard_normal((4000, 16)).astype(np.float32)}
    with Replica.init(src, model, bucket_rows=64) as a:
        cli_json("sync", src, dst)
        for _ in range(5):
            rows = np.unique(rng.integers(0, 4000, 600))
            a.commit({"emb": (rows, rng.standard_normal((len(rows), 16)).astype(np.float32))})
        partial = json.loads(run_cli("sync", src, dst, "--max-bytes", "20000", "--chunk-bytes", "8192", "--json").stdout)
        assert partial["complete"] is False and partial["pending_buckets"] > 0
        with Replica.open(dst) as b:
            assert b.head == 0 and pending_mod.pending_state(b) is not None
            expected = model["emb"]  # the model at b's head (0)
            raw = np.asarray(b.rows_view("emb"))
            assert not np.array_equal(bits(raw), bits(expected))  # the files are ahead: the test can fail
            assert np.array_equal(bits(b.read_tensor("emb")), bits(expected))
            _head, got = values_at(b, 0, {"emb": np.arange(4000)})
            assert np.array_equal(bits(got["emb"]), bits(expected))
        cli_json("sync", src, dst)
        with Replica.open(dst) as b:
            assert np.array_equal(bits(b.read_tensor("emb")), bits(a.read_tensor("emb")))


# -- budgets: --deadline, --bwlimit, what a partial sync holds --------------------------------


class FakeClock:
    """A monotonic clock that moves only when told (sleep advances it): budgets tested without wall time."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def _wide_source(tmp_path, rng, rows: int = 4000):
    """A follower of a model whose every row then changes: many buckets, several chunks of 8 KiB."""
    src, dst = tmp_path / "a", tmp_path / "b"
    model = {"emb": rng.standard_normal((rows, 16)).astype(np.float32)}
    Replica.init(src, model, bucket_rows=64).close()
    do_sync(Way("local", None), src, dst)
    with Replica.open(src) as a:
        a.commit({"emb": (np.arange(rows), rng.standard_normal((rows, 16)).astype(np.float32))})
    return src, dst


def test_a_deadline_already_passed_moves_nothing_even_for_a_one_chunk_sync(way, tmp_path, rng):
    src, model = new_source(tmp_path, rng, commits=3)
    dst = tmp_path / "dst"
    do_sync(way, src, dst)
    before = advance(src, rng, model, commits=0)
    advance(src, rng, model, commits=3)  # a few rows: the whole sync is one chunk
    result = do_sync(way, src, dst, deadline=0.0)
    assert not result.complete and result.stopped_by == "deadline"
    assert result.chunks == 0 and result.bytes_sent == 0 and result.pending_buckets == 0
    with Replica.open(dst) as b:
        assert b.head == before and b.pending_sync() is None
    new = tmp_path / "new"  # a first sync: not even the snapshot transfer is started
    beside = sorted(os.listdir(tmp_path))
    result = do_sync(way, src, new, deadline=0.0)
    assert not result.complete and result.stopped_by == "deadline" and result.bytes_sent == 0
    assert sorted(os.listdir(tmp_path)) == beside  # neither the replica nor an empty staging directory
    assert run_cli("status", new).returncode == 3
    said = sync_cli(way, src, new, "--deadline", "0")  # and the command says so, not "it resumes"
    assert said.returncode == 1 and "before anything moved" in said.stdout + said.stderr, said.stderr
    assert "resumes" not in said.stdout + said.stderr
    assert do_sync(way, src, dst, deadline=600.0).complete
    assert_synced(src, dst)


def test_a_first_sync_waiting_on_a_staging_that_its_holder_removes_starts_a_new_one(tmp_path):
    """The holder of a staging directory that moved nothing removes it when it ends; a sync that
    waited for its lock must not then build in a directory that is gone, under a lock no one sees."""
    import threading

    from deltalog.layout import sync_staging_path
    from deltalog.lock import WriterLock
    from deltalog.transport.local import LocalSink

    dst = tmp_path / "new"
    staging = sync_staging_path(str(dst))
    os.makedirs(staging)
    holder = WriterLock(staging)
    holder.acquire()
    sink, began = LocalSink(str(dst)), threading.Event()
    waiter = threading.Thread(target=lambda: (sink.begin(wait=30.0), began.set()))
    waiter.start()
    time.sleep(0.2)  # the sink is waiting for the lock
    shutil.rmtree(staging)
    holder.release()
    waiter.join(30)
    try:
        assert began.is_set()
        assert os.path.isdir(staging) and sink._staging_lock.still_linked()
    finally:
        sink.close()
    assert not os.path.exists(staging)  # it moved nothing either


def test_the_deadline_stops_before_the_first_chunk_asked_for_after_it(tmp_path, rng):
    src, dst = _wide_source(tmp_path, rng)
    clock = FakeClock()

    def one_second_per_chunk(n):
        clock.now += 1.0

    result = do_sync(Way("local", None), src, dst, deadline=2.5, started=0.0, clock=clock,
                     throttle=one_second_per_chunk, chunk_bytes=8192)
    # chunks asked for at t = 0, 1, 2 go (the one in flight at 2.5 finishes); none is asked for at 3
    assert result.stopped_by == "deadline" and not result.complete and result.chunks == 3
    assert result.seconds == 3.0
    status = json.loads(run_cli("status", dst, "--json", check=True).stdout)
    assert status["head"] == result.head == 0
    assert (status["pending_buckets"], status["pending_target"]) == (result.pending_buckets, result.pending_target)
    assert result.pending_buckets > 0 and result.pending_target == result.to_offset
    again = do_sync(Way("local", None), src, dst, deadline=2.5, started=0.0, clock=FakeClock(), chunk_bytes=8192)
    assert again.complete and again.pending_buckets == 0 and again.pending_target is None
    assert_synced(src, dst)


def test_bwlimit_holds_the_average_on_a_short_transfer(tmp_path, rng):
    """The bucket starts empty: a transfer smaller than a second's worth still takes bytes / rate."""
    from deltalog.follow import TokenBucket

    src, dst = tmp_path / "a", tmp_path / "b"
    model = {"emb": rng.standard_normal((512, 16)).astype(np.float32)}
    Replica.init(src, model, bucket_rows=64).close()
    do_sync(Way("local", None), src, dst)
    with Replica.open(src) as a:
        a.commit({"emb": (np.arange(0, 512, 7), rng.standard_normal((74, 16)).astype(np.float32))})
    rate = 1_000_000  # far more than the transfer: an "overshoot" would take no time at all
    clock = FakeClock()
    bucket = TokenBucket(rate, clock=clock, sleep=clock.sleep)
    result = do_sync(Way("local", None), src, dst, throttle=bucket.take, clock=clock)
    assert result.complete and 0 < result.bytes_sent < rate
    assert result.seconds >= result.bytes_sent / rate
    assert_synced(src, dst)


def test_bwlimit_paces_snapshot_pieces_before_asking_for_them(tmp_path, rng):
    from deltalog.follow import TokenBucket

    src, dst = tmp_path / "a", tmp_path / "b"
    Replica.init(src, {"emb": rng.standard_normal((4096, 16)).astype(np.float32)}, bucket_rows=64).close()
    rate, piece = 100_000, 32 << 10
    clock = FakeClock()
    bucket = TokenBucket(rate, clock=clock, sleep=clock.sleep)
    source, sink = open_source(str(src)), open_sink(str(dst))
    asked = []  # (time a piece was asked for, bytes asked for up to and including it)
    read = source.read_snapshot_file

    def timed_read(offset, file, start, length):
        asked.append((clock.now, (asked[-1][1] if asked else 0) + length))
        return read(offset, file, start, length)

    source.read_snapshot_file = timed_read
    try:
        result = sync_mod.sync(source, sink, source_name=str(src), destination_name=str(dst), throttle=bucket.take,
                               clock=clock, piece_bytes=piece)
    finally:
        sink.close()
        source.close()
    assert result.complete and len(asked) == result.snapshot_bytes // piece > 4
    for when, total in asked:  # never ahead of the rate: each piece's bytes were paid for before it moved
        assert when >= total / rate - 1e-9
    assert_synced(src, dst)


# -- values relative to the destination's own ---------------------------------------------------


@pytest.fixture
def chunk_codecs(monkeypatch):
    """The codecs of the new values in every chunk the engine hands to a sink, whatever the
    transport (the engine runs in this process; the far end of ssh or http does not)."""
    seen: list[set[str]] = []

    def spy(method):
        def wrapper(self, blob, *args, **kwargs):
            view = rec.RecordView(blob)
            seen.append({"base-xor" if view.needs_base(n) else "plain" for n in range(len(view.tensor_names()))})
            return method(self, blob, *args, **kwargs)
        return wrapper

    from deltalog.transport.local import LocalSink
    from deltalog.transport.ssh import SshSink

    for cls in (LocalSink, SshSink):
        monkeypatch.setattr(cls, "apply_final", spy(cls.apply_final))
        monkeypatch.setattr(cls, "apply_chunk", spy(cls.apply_chunk))
    return seen


@pytest.mark.parametrize("chunk_bytes", [None, 64])  # one chunk (its record at once) or several (pending first)
def test_values_cross_a_network_relative_to_the_destination(way, tmp_path, rng, chunk_codecs, chunk_bytes):
    """Over ssh and http a chunk's values are sent relative to the destination's own (fewer bytes),
    between two local directories as they are; either way the destination ends up bitwise the source."""
    src, model = new_source(tmp_path, rng)
    dst = tmp_path / "dst"
    do_sync(way, src, dst)
    advance(src, rng, model, commits=10)
    with Replica.open(src) as r:  # a hot row written again and again: one step away from B's value
        for i in range(5):
            r.commit({"item_emb": ([7], np.full((1, 8), i, np.float32))})
    result = do_sync(way, src, dst, chunk_bytes=chunk_bytes)
    assert result.complete and (result.chunks > 2) == (chunk_bytes is not None)
    expected = {"plain"} if way.name == "local" else {"base-xor"}
    assert chunk_codecs and all(codecs == expected for codecs in chunk_codecs)
    assert_synced(src, dst)
    with Replica.open(dst) as b:  # the log stores plain values and its own undo, as for any sync
        for _offset, blob in b.iter_record_blobs():
            view = rec.RecordView(blob)
            assert not any(view.needs_base(n) for n in range(len(view.tensor_names())))
        assert b.read_tensor("item_emb")[7, 0] == 4


def ssh_pull(request) -> Way:
    """The ssh-pull way alone, for a test about what the engine asks of a remote source."""
    server = request.getfixturevalue("sshd")
    return Way("ssh-pull", request, options=TransportOptions(ssh_command=server.ssh_command,
                                                             remote_deltalog=server.remote_deltalog))


def test_a_partial_sync_is_continued_with_plain_values(tmp_path, rng, chunk_codecs, request):
    """The rows a destination holds ahead of its head are not at ``since``: no relative values then."""
    way = ssh_pull(request)
    src, model = new_source(tmp_path, rng)
    dst = tmp_path / "dst"
    do_sync(way, src, dst)
    advance(src, rng, model, commits=10)
    chunk_codecs.clear()
    assert not do_sync(way, src, dst, max_bytes=1, chunk_bytes=1).complete
    assert chunk_codecs == [{"base-xor"}]
    chunk_codecs.clear()
    assert do_sync(way, src, dst).complete
    assert chunk_codecs and all(codecs == {"plain"} for codecs in chunk_codecs)
    assert_synced(src, dst)


def test_a_peer_that_does_not_name_the_codec_gets_plain_values(tmp_path, rng, chunk_codecs, request, monkeypatch):
    """An older destination's state names no chunk codecs: it is sent values it decodes."""
    from deltalog import receive

    way = ssh_pull(request)
    src, model = new_source(tmp_path, rng)
    dst = tmp_path / "dst"
    do_sync(way, src, dst)
    advance(src, rng, model)
    real = receive.sink_state
    monkeypatch.setattr(receive, "sink_state", lambda replica: {k: v for k, v in real(replica).items()
                                                                if k != "chunk_codecs"})
    chunk_codecs.clear()
    assert do_sync(way, src, dst).complete
    assert chunk_codecs == [{"plain"}]
    assert_synced(src, dst)


# -- when a destination's tensor files are fsynced ------------------------------------------------


def test_a_one_shot_sync_returns_once_its_record_is_durable(tmp_path, rng, monkeypatch):
    """Like commit and rollback: the sync record is synced, the rows follow the WAL-checkpoint schedule
    (no fsync of every file it touched at exit), and a machine crash that loses them is repaired
    from the log."""
    from deltalog import writer as writer_mod

    src, model = new_source(tmp_path, rng)
    dst = tmp_path / "dst"
    assert run_cli("sync", src, dst, "--json").returncode == 0
    with Replica.open(dst) as b:
        before_head, before_flushed = b.head, b.state.flushed
    advance(src, rng, model)
    tensors = os.path.join(dst, "tensors")
    before = {f: open(os.path.join(tensors, f), "rb").read() for f in os.listdir(tensors)}
    proc = run_cli("sync", src, dst, "--json")
    assert proc.returncode == 0 and json.loads(proc.stdout)["complete"], proc.stderr
    with Replica.open(dst) as b:
        assert (b.state.flushed, b.state.settled) == (before_flushed, True) and b.head > before_head
    for f, data in before.items():  # a machine crash: the page cache's writes since 'flushed' are lost
        with open(os.path.join(tensors, f), "wb") as out:
            out.write(data)
    monkeypatch.setattr(writer_mod, "_BOOT_ID", "another-boot")
    with Replica.open(dst) as b:  # the reboot is seen: the sync record is applied again
        assert b.state.settled and b.state.flushed == b.head
    assert_synced(src, dst)


def test_the_next_sync_fsyncs_what_an_earlier_one_left_once_it_is_old(tmp_path, rng, monkeypatch):
    """Rows a sync left to the page cache are fsynced by the next sync before it writes, once they are
    FLUSH_SECONDS old (cheap then: the kernel wrote them back), so recovery never has much to redo."""
    from deltalog.transport import local

    src, model = new_source(tmp_path, rng)
    dst = tmp_path / "dst"
    assert run_cli("sync", src, dst).returncode == 0
    advance(src, rng, model)
    assert run_cli("sync", src, dst).returncode == 0
    with Replica.open(dst) as b:
        deferred = b.head
        assert b.state.flushed < deferred
    advance(src, rng, model)
    monkeypatch.setattr(local, "_flushed_at", {})  # a new process, as cron starts one
    way = Way("local", None)
    assert do_sync(way, src, dst).complete  # the records are younger than FLUSH_SECONDS: left alone
    with Replica.open(dst) as b:
        assert b.state.flushed < deferred
    advance(src, rng, model)
    monkeypatch.setattr(local, "_flushed_at", {})
    monkeypatch.setattr(local, "FLUSH_SECONDS", 0.0)  # now they are old enough
    assert do_sync(way, src, dst).complete
    with Replica.open(dst) as b:
        assert b.state.flushed > deferred and b.state.flushed < b.head  # the earlier rows, not its own
    assert_synced(src, dst)


def _destination_behind(tmp_path, rng):
    """(source, destination one commit behind it, the source's head)."""
    from conftest import random_model

    src, dst = tmp_path / "src", tmp_path / "dst"
    model = random_model(rng, rows=400, dim=16)
    Replica.init(src, model, bucket_rows=32).close()
    shutil.copytree(src, dst)
    with Replica.open(src) as r:
        r.commit({name: (np.arange(0, len(v), 3), v[::3] + 1) for name, v in model.items() if v.ndim})
        return src, dst, r.head


def _slow_touch_events(monkeypatch):
    """Record, in order, the touch-ahead's start, each page touch's start and end (the first one
    slow), the old values' reads and the row stores of a sync destination."""
    import threading

    from deltalog import kernels, writer

    if not kernels.enabled():
        pytest.skip("the touch needs the compiled loops")
    events = []
    touch, touch_ahead = kernels.touch_rows, writer.Writer.touch_ahead
    old_rows, write_rows = writer.Writer.old_rows, writer.Writer.write_rows

    def slow_touch(table, rows):
        events.append(("touch starts", threading.get_ident()))
        if sum(name == "touch starts" for name, _ in events) == 1:
            time.sleep(0.3)  # longer than decoding the chunk: what comes after must wait for it
        touch(table, rows)
        events.append(("touch ends", threading.get_ident()))

    def recorded(name, fn):
        def call(self, *args, **kwargs):
            events.append((name, threading.get_ident()))
            return fn(self, *args, **kwargs)
        return call

    monkeypatch.setattr(kernels, "touch_rows", slow_touch)
    monkeypatch.setattr(writer.Writer, "touch_ahead", recorded("touch ahead", touch_ahead))
    monkeypatch.setattr(writer.Writer, "old_rows", recorded("old values read", old_rows))
    monkeypatch.setattr(writer.Writer, "write_rows",
                        lambda self, writes, **kw: (writes and events.append(("rows stored", 0)), write_rows(self, writes, **kw))[1])
    return events


def test_a_sync_destination_touches_the_rows_pages_once_before_it_reads_their_old_values(tmp_path, rng, monkeypatch):
    """The destination knows the rows from the chunk's index: their pages fault in, writable, on
    another thread while it decodes and re-encodes the chunk, instead of behind the log's fsync
    after it; the row stores still wait for that thread, and no second touch is started."""
    from deltalog import receive

    src, dst, target = _destination_behind(tmp_path, rng)
    with Replica.open(src) as r:
        (blob,) = list(sync_mod.source_chunks(r, 0, {}, target, 64 << 20))
    events = _slow_touch_events(monkeypatch)
    with Replica.open(dst) as r, r.writing():
        receive.apply_whole(r, bytearray(blob), target, None)
        tensors = len(r.tensors) - 1  # all but the scalar
    names = [name for name, _ in events]
    assert "touch ahead" in names and names.index("touch ahead") < names.index("old values read")
    assert names.count("touch starts") == 2 * tensors  # each tensor's rows and row digests, once
    last_touch = max(i for i, name in enumerate(names) if name == "touch ends")
    assert names.index("rows stored") > last_touch
    with Replica.open(src) as a, Replica.open(dst) as b:
        for info in a.tensors:
            assert np.array_equal(bits(a.read_tensor(info.name)), bits(b.read_tensor(info.name)))


def test_a_sync_destination_that_fails_after_its_touch_ahead_waits_for_it(tmp_path, rng, monkeypatch):
    """A chunk refused half way (a damaged row of ours) must not leave the touch running over maps
    that the replica is about to close: giving up the lock waits for it."""
    from deltalog import receive
    from deltalog.errors import IntegrityError

    src, dst, target = _destination_behind(tmp_path, rng)
    with Replica.open(src) as r:
        (blob,) = list(sync_mod.source_chunks(r, 0, {}, target, 64 << 20))
    with Replica.open(dst) as r:
        damaged = r.maps.rows(r.info("bias"), writable=True)
        damaged[3] = damaged[3] + 1  # a row the chunk rewrites, no longer its digest
        del damaged
    events = _slow_touch_events(monkeypatch)
    with Replica.open(dst) as r:
        with pytest.raises(IntegrityError), r.writing():
            receive.apply_whole(r, bytearray(blob), target, None)
        names = [name for name, _ in events]
        assert "old values read" in names and "rows stored" not in names
        assert names.count("touch ends") == names.count("touch starts") > 0  # over before the lock went
        assert r.head == 0


def test_waiting_for_a_process_returns_its_status_or_times_out():
    """ssh's end is waited for on a pidfd where there is one (Popen.wait polls every 50 ms)."""
    from deltalog.transport.ssh import _wait_for_exit

    quick = subprocess.Popen(["sh", "-c", "exit 3"])
    _wait_for_exit(quick, 10.0)
    assert quick.returncode == 3
    _wait_for_exit(quick, 10.0)  # already reaped: still its status
    assert quick.returncode == 3
    slow = subprocess.Popen(["sleep", "30"])
    try:
        with pytest.raises(subprocess.TimeoutExpired):
            _wait_for_exit(slow, 0.05)
        assert slow.returncode is None
    finally:
        slow.kill()
        slow.wait()


F_GETPIPE_SZ = 1032  # Linux


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="pipe sizes are Linux's")
def test_both_ends_of_an_ssh_sync_widen_their_pipes(sshd, tmp_path, rng):
    """A chunk crosses two pipes; at 64 KiB each, every 64 KiB was a hand-off between processes
    (11 MB took ~0.14 s through ssh on loopback, ~0.04 s with 1 MiB pipes)."""
    import fcntl

    from deltalog import wire

    src, _ = new_source(tmp_path, rng, commits=1)
    server = subprocess.Popen([sys.executable, "-m", "deltalog", "serve", "--stdio", str(src)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        wire.write_frame(server.stdin, wire.hello_request("source"))
        answer, _ = wire.read_frame(server.stdout)  # the server is serving: its pipes are set up
        assert answer["type"] == "hello"
        for pipe in (server.stdin, server.stdout):
            assert fcntl.fcntl(pipe.fileno(), F_GETPIPE_SZ) == wire.PIPE_BYTES
    finally:
        server.stdin.close()
        server.wait(timeout=30)
    source = open_source(sshd.location(src), TransportOptions(ssh_command=sshd.ssh_command,
                                                              remote_deltalog=sshd.remote_deltalog))
    try:
        for pipe in (source.conn.proc.stdin, source.conn.proc.stdout):
            assert fcntl.fcntl(pipe.fileno(), F_GETPIPE_SZ) == wire.PIPE_BYTES
        assert source.hello()["head"] == 1
    finally:
        source.close()


def test_an_older_server_without_digests_means_no_proof_not_an_error(tmp_path):
    """A source from before /v1/digest and the ssh digest_at request has no digest to give (the sync
    then refuses, exit 7); an error the endpoint itself answers is raised as what it is."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from deltalog.errors import NotAReplica
    from deltalog.transport.http import HttpSource
    from deltalog.transport.ssh import SshSource

    answers = {"kind": "NotFound"}

    class Old(BaseHTTPRequestHandler):
        def do_GET(self):
            body = json.dumps({"error": {"type": answers["kind"], "message": "not found", "hint": None,
                                         "exit_code": 8}}).encode()
            self.send_response(404)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Old)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        source = HttpSource(f"http://127.0.0.1:{server.server_address[1]}")
        assert source.state_digest_at(5) is None
        answers["kind"] = "NotAReplica"
        with pytest.raises(NotAReplica):
            source.state_digest_at(5)
        source.close()
    finally:
        server.shutdown()

    class OldPipe:
        busy = False

        def request_unchecked(self, kind, args=None, payload=None, **fields):
            return {"type": "error", "error_type": "TransportError", "message": f"unknown request {kind!r}"}, b""

    ssh = SshSource.__new__(SshSource)
    ssh.conn = OldPipe()
    assert ssh.state_digest_at(5) is None
