"""State digests (deltalog.lineage): defined once, kept incrementally, checked everywhere they matter.

- the digest is the plain-Python definition, and every way a replica changes
  (commit, sync whole or partial, rollback, compaction, replay, a reverted
  sync, a rebase) keeps the incremental digest equal to a from-scratch one;
- a destination that holds another model than its source at an offset they
  share is refused (exit 13), with nothing written, and --reseed is the way
  past it; diff never calls two different models identical;
- verify checks the chain, and the log keeps the source records' kinds and
  reasons downstream (provenance).

The same scenarios over ssh and http are in tests/test_sync.py (the
transport contract suite), and a kill -9 during a reseed in tests/test_faults.py.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from conftest import apply_update, bits, compact_as_before_past_digests, random_model, random_update, run_cli

from deltalog import Replica, lineage, receive
from deltalog import record as rec
from deltalog.compact import compact
from deltalog.diff import ReplicaSide, diff
from deltalog.errors import Diverged, OffsetNotRetained
from deltalog.replay import repair_in_place
from deltalog.rollback import rollback
from deltalog.sync import sync
from deltalog.transport import TransportOptions, open_sink, open_source
from deltalog.verify import verify


def from_scratch(r: Replica) -> int:
    """The state digest of the replica's model at its head, by the plain-Python definition."""
    return lineage.reference_digest(
        (t.id, [row.tobytes() for row in r.read_tensor(t.name).reshape(t.rows, -1)]) for t in r.tensors
    )


def do_sync(src, dst, **kw):
    source, sink = open_source(str(src), TransportOptions()), None
    try:
        sink = open_sink(str(dst), TransportOptions())
        return sync(source, sink, source_name=str(src), destination_name=str(dst), **kw)
    finally:
        if sink is not None:
            sink.close()
        source.close()


def synced_pair(tmp_path, rng, rows: int, bucket_rows: int = 8, commits: int = 1):
    """(model, a, b): a primary with ``commits`` random commits, and b, a follower synced to it."""
    model = random_model(rng, rows=rows)
    a, b = tmp_path / "a", tmp_path / "b"
    with Replica.init(a, model, bucket_rows=bucket_rows) as r:
        for _ in range(commits):
            r.commit(random_update(rng, model))
    do_sync(a, b)
    return model, a, b


def stray_commit(path, rows=20) -> None:
    """A write on a serving replica that its source never made."""
    with Replica.open(path) as r:
        info = r.info("item_emb")
        r.commit({"item_emb": (np.arange(rows), np.full((rows, info.row_elems), 7.0, np.float32))})


def tensors_equal(a, b) -> bool:
    with Replica.open(a) as ra, Replica.open(b) as rb:
        return all(np.array_equal(bits(ra.read_tensor(n)), bits(rb.read_tensor(n))) for n in ra.tensor_names)


# -- the definition ------------------------------------------------------------------------------------


def test_the_digest_is_the_definition_and_every_row_counts(tmp_path, rng):
    model = random_model(rng, rows=40)
    with Replica.init(tmp_path / "r", model, bucket_rows=8) as r:
        assert r.state_digest == from_scratch(r)
        seen = {r.state_digest}
        for name in r.tensor_names:  # change one bit of one row of each tensor: a new digest each time
            info = r.info(name)
            row = r.read_tensor(name).reshape(info.rows, -1)[:1].copy()
            row.view(np.uint8)[0, 0] ^= 1
            r.commit({name: ([0], row.reshape((1, *info.shape[1:])) if info.shape else row.reshape(1))})
            assert r.state_digest == from_scratch(r) and r.state_digest not in seen, name
            seen.add(r.state_digest)
        assert r.status()["state_digest"] == lineage.to_hex(r.state_digest)


def test_the_same_model_has_the_same_digest_however_it_was_built(tmp_path, rng):
    model = random_model(rng, rows=30)
    update = random_update(rng, model)
    with Replica.init(tmp_path / "a", model, model_id="m") as a:
        a.commit(update)
        digest = a.state_digest
    apply_update(model, update)
    with Replica.init(tmp_path / "b", model, model_id="another") as b:  # init from the result: offset 0
        assert b.state_digest == digest  # a function of the tensors' bytes, not of the history or the id


def test_reference_digest_examples():
    """Fixed values of the definition (FORMAT.md section 7 quotes them), for other implementations."""
    assert lineage.reference_digest([]) == 0
    one = lineage.reference_digest([(0, [bytes(8)])])
    assert one == lineage.rows_sum(0, np.array([0], np.uint64), np.array([0], np.uint64))
    two = lineage.reference_digest([(0, [b"\x01" + bytes(7)]), (1, [bytes(4), bytes(4)])])
    assert (f"{one:016x}", f"{two:016x}") == ("1fb14caadc3526c1", "0549092652227b40")


# -- incremental == from scratch, whatever happens ---------------------------------------------------------


def test_incremental_digests_equal_from_scratch_after_every_kind_of_change(tmp_path, rng):
    """Random commits, rollbacks, syncs (whole, partial, multi-hop), compactions, replays and a
    reverted guarded sync: after each, every replica's digest is its tensors' digest."""
    model = random_model(rng, rows=120)
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    Replica.init(a, model, bucket_rows=8).close()

    def check_all():
        for path in (a, b, c):
            if not os.path.exists(path):
                continue
            with Replica.open(path) as r:
                assert r.state_digest == from_scratch(r) == r.digest_of_files(), path
                assert r.state_digest_at(r.head) == r.state_digest

    for step in range(40):
        action = rng.choice(["commit", "commit", "commit", "rollback", "sync", "partial", "hop", "compact",
                             "replay", "revert"])
        if action == "commit":
            with Replica.open(a) as r:
                r.commit(random_update(rng, model))
        elif action == "rollback":
            with Replica.open(a) as r:
                retained = [r.oldest_offset] + [s.offset for s in r.iter_summaries()]
                rollback(r, int(rng.choice(retained)), reason=f"step {step}")
        elif action == "sync":
            do_sync(a, b)
        elif action == "partial" and os.path.exists(b):
            do_sync(a, b, max_bytes=600, chunk_bytes=200)  # may stop with chunks pending
        elif action == "hop" and os.path.exists(b):
            with Replica.open(b) as r:
                pending = r.pending_sync()
            if pending is None:
                do_sync(b, c)
        elif action == "compact":
            with Replica.open(a) as r:
                compact(r, keep_records=int(rng.integers(0, 4)))
        elif action == "replay":
            with Replica.open(a) as r:
                repair_in_place(r)
        elif action == "revert" and os.path.exists(b):
            with Replica.open(b) as r:
                if r.pending_sync() is None and r.head != r.oldest_offset:
                    digest_before = None
                    with r.writing():
                        target = r.head
                        summary = rec.summarize(r.record_blob(target))
                        if summary.kind == "sync":  # undo the last sync as a rejecting --check would
                            digest_before = summary.pre_digest
                            receive.revert_sync(r, {"target": target, "base": summary.base, "buckets": {}})
                    if digest_before is not None:
                        assert r.state_digest == digest_before
        check_all()
    do_sync(a, b)
    do_sync(b, c)
    check_all()
    with Replica.open(a) as ra, Replica.open(b) as rb, Replica.open(c) as rc:
        assert ra.state_digest == rb.state_digest == rc.state_digest
        for r in (ra, rb, rc):
            assert verify(r).ok, verify(r).problems


def test_abort_of_a_partial_sync_bumps_the_generation(tmp_path, rng):
    """Lock-free readers compare gen before and after a copy: undoing pending rows must show."""
    model, a, b = synced_pair(tmp_path, rng, rows=200, bucket_rows=4)
    with Replica.open(a) as r:
        for _ in range(4):
            r.commit(random_update(rng, model, max_rows=60))
    result = do_sync(a, b, max_bytes=300, chunk_bytes=100)
    assert not result.complete
    with Replica.open(b) as r, r.writing():
        assert r.pending_sync() is not None
        before = r.state
        receive.abort_pending(r)
        after = r.state
        assert r.pending_sync() is None and after.head == before.head and after.gen > before.gen
        assert after.digest == before.digest == from_scratch(r)


# -- the two scenarios of a broken history ---------------------------------------------------------------------


def test_a_follower_with_a_stray_commit_is_refused_until_reseeded(tmp_path, rng):
    model = random_model(rng, rows=100)
    a, b = tmp_path / "a", tmp_path / "b"
    Replica.init(a, model, bucket_rows=8).close()
    assert run_cli("sync", a, b).returncode == 0
    stray_commit(b)  # B's offset 1 is not A's
    with Replica.open(a) as r:
        r.commit(random_update(rng, model))
        r.commit(random_update(rng, model))
    with Replica.open(b) as r:
        before = (r.head, r.state_digest, dict(r.iter_record_blobs()))
    proc = run_cli("sync", a, b, "--json")
    assert proc.returncode == 13, proc.stderr
    err = json.loads(proc.stdout)["error"]
    assert err["type"] == "Diverged" and err["exit_code"] == 13 and "--reseed" in err["hint"]
    assert "offset 1" in err["message"] and lineage.to_hex(before[1]) in err["message"]
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    with Replica.open(b) as r:  # nothing was written
        assert (r.head, r.state_digest, dict(r.iter_record_blobs())) == before
        assert verify(r).ok  # B is consistent: it is just not A
    assert run_cli("sync", a, b, "--dry-run").returncode == 13  # a dry run tells the same
    assert run_cli("diff", a, b).returncode == 1  # never "identical"
    proc = run_cli("sync", a, b, "--reseed", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["snapshot_offset"] == 0
    assert tensors_equal(a, b)
    with Replica.open(a) as ra, Replica.open(b) as rb:
        assert (ra.head, ra.state_digest) == (rb.head, rb.state_digest) and verify(rb).ok
    assert run_cli("diff", a, b).returncode == 0
    assert run_cli("sync", a, b).returncode == 0  # and it follows again


def test_compaction_keeps_the_state_digests_of_the_records_it_drops(tmp_path, rng, monkeypatch):
    """meta/past_digests: each dropped offset's post digest (and a dropped snapshot's), the newest
    store.PAST_DIGESTS_KEPT of them; not retained offsets all the same; forgotten by a rebase."""
    from deltalog import store as store_mod

    model = random_model(rng, rows=60)
    a = tmp_path / "a"
    with Replica.init(a, model, bucket_rows=8) as r:
        for _ in range(6):
            r.commit(random_update(rng, model))
        before = {o: r.state_digest_at(o) for o in range(r.head + 1)}
        compact(r, keep_records=2)  # drops snapshot 0 and records 1..4
        assert r.oldest_offset == 4
        assert {o: r.past_state_digest(o) for o in range(4)} == {o: before[o] for o in range(4)}
        assert r.past_state_digest(5) is None and r.past_state_digest(-1) is None
        with pytest.raises(OffsetNotRetained):  # a digest kept is no retained offset
            ReplicaSide.at(r, 2)
        monkeypatch.setattr(store_mod, "PAST_DIGESTS_KEPT", 3)
        for _ in range(3):
            r.commit(random_update(rng, model))
        compact(r, keep_records=1)  # head 9: drops snapshot 4 and records 5..8; 0..8 known, the newest 3 kept
        with r.store.read() as txn:
            offsets, _digests = r.store.past_digests(txn)
        assert offsets.tolist() == [6, 7, 8]
        assert [r.past_state_digest(o) for o in (5, 6)] == [None, before[6]]
        # Tied to the log's base: an older deltalog that moved it (compacting, or reseeding onto
        # another history) knew nothing of them, so they no longer count.
        compact_as_before_past_digests(r)
        assert r.past_state_digest(6) is None
        # A value that cannot be read proves nothing: unknown, never an error.
        r.store.write(lambda txn: r.store.put_meta(txn, "past_digests", {"offsets": b"\x01", "digests": b""}))
        assert r.past_state_digest(6) is None
    b = tmp_path / "b"
    assert run_cli("sync", a, b).returncode == 0
    with Replica.open(b) as r:  # a history of b's own, compacted
        r.commit(random_update(rng, model))
        r.commit(random_update(rng, model))
        compact(r)
        own = r.head - 1
        assert r.past_state_digest(own) is not None
    proc = run_cli("sync", a, b, "--reseed")
    assert proc.returncode == 0, proc.stderr
    with Replica.open(b) as r:  # b's old history is not a's: its past digests went with it
        assert r.past_state_digest(own) is None


def test_equal_heads_with_different_models_are_refused(tmp_path, rng):
    """The bug this guards: both at offset 2, 20 rows apart, and sync said 'up to date'."""
    model, a, b = synced_pair(tmp_path, rng, rows=100)
    stray_commit(b)
    with Replica.open(a) as r:
        r.commit(random_update(rng, model))
        assert r.head == 2
    proc = run_cli("sync", a, b)
    assert proc.returncode == 13 and "offset 2" in proc.stderr, proc.stderr
    with pytest.raises(Diverged):
        do_sync(a, b)


def test_a_failover_primary_restored_from_an_old_state_is_refused(tmp_path, rng):
    """A new primary restored from a backup taken at offset 2 commits other updates at 3, 4, ...:
    followers of the old primary refuse it, whether it is ahead of them or behind."""
    import shutil

    model = random_model(rng, rows=100)
    old, new, f = tmp_path / "old", tmp_path / "new", tmp_path / "f"
    with Replica.init(old, model, bucket_rows=8, model_id="m") as r:
        r.commit(random_update(rng, model))
        r.commit(random_update(rng, model))
    shutil.copytree(old, new)  # the backup
    with Replica.open(old) as r:
        for _ in range(3):
            r.commit(random_update(rng, model))
            do_sync(old, f)  # f holds every offset of the old primary: 3, 4, 5
    other = random_model(np.random.default_rng(99), rows=100)
    with Replica.open(new) as r:
        r.commit(random_update(rng, other))  # offset 3, another model
    # behind the follower, on another history, at an offset the follower holds
    proc = run_cli("sync", new, f, "--json")
    assert proc.returncode == 13 and "offset 3" in json.loads(proc.stdout)["error"]["message"]
    with Replica.open(new) as r:
        for _ in range(4):
            r.commit(random_update(rng, other))  # now ahead: 7
    with Replica.open(f) as r:
        before = r.state_digest
    proc = run_cli("sync", new, f)
    assert proc.returncode == 13, proc.stderr
    with Replica.open(f) as r:
        assert r.head == 5 and r.state_digest == before
    assert run_cli("sync", old, f).returncode == 0  # the old primary still feeds it


def test_a_source_behind_at_an_offset_the_destination_never_held_is_a_noop_that_says_so(tmp_path, rng):
    model = random_model(rng, rows=60)
    a, b = tmp_path / "a", tmp_path / "b"
    with Replica.init(a, model, bucket_rows=8) as r:
        for _ in range(3):
            r.commit(random_update(rng, model))
    import shutil

    shutil.copytree(a, tmp_path / "a_at_3")
    with Replica.open(a) as r:
        r.commit(random_update(rng, model))
        r.commit(random_update(rng, model))
    assert run_cli("sync", a, b).returncode == 0  # b: snapshot 0 and one record at 5
    out = json.loads(run_cli("sync", tmp_path / "a_at_3", b, "--json").stdout)
    assert out["complete"] and out["to_offset"] == 5 and "not known" in out["note"]


# -- provenance ------------------------------------------------------------------------------------------------


def test_a_rollback_upstream_shows_as_a_rollback_with_its_reason_two_hops_away(tmp_path, rng):
    model = random_model(rng, rows=60)
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    with Replica.init(a, model, bucket_rows=8) as r:
        r.commit(random_update(rng, model))
        r.commit(random_update(rng, model))
        rollback(r, 1, reason="CTR drop")
        r.commit(random_update(rng, model))
    do_sync(a, b)
    do_sync(b, c)
    proc = run_cli("log", c, "--json")
    records = json.loads(proc.stdout)["records"]
    assert [(e["offset"], e["kind"]) for e in records] == [(1, "commit"), (2, "commit"), (3, "rollback"), (4, "commit")]
    roll = records[2]
    assert (roll["target"], roll["reason"], roll["synced_in"], roll["retained"]) == (1, "CTR drop", 4, False)
    assert records[-1]["retained"] and records[-1]["post_digest"] is not None
    with Replica.open(a) as r:
        assert records[-1]["post_digest"] == lineage.to_hex(r.state_digest)
    human = run_cli("log", c).stdout
    assert "rollback" in human and "CTR drop" in human and "sync 4" in human
    stored = json.loads(run_cli("log", c, "--json", "--stored").stdout)["records"]
    assert [(e["offset"], e["kind"]) for e in stored] == [(4, "sync")]
    since = json.loads(run_cli("log", c, "--json", "--since", "2").stdout)["records"]
    assert [e["offset"] for e in since] == [3, 4]


# -- verify --------------------------------------------------------------------------------------------------


def _rewrite_state(path, **fields) -> None:
    with Replica.open(path) as r:
        r.store.write(lambda txn: r.store.put_meta(txn, "state", {**r.store.get_meta(txn, "state"), **fields}))


def test_verify_checks_the_head_digest_against_the_tensors(tmp_path, rng):
    model = random_model(rng, rows=40)
    with Replica.init(tmp_path / "r", model) as r:
        r.commit(random_update(rng, model))
        good = r.state_digest
    _rewrite_state(tmp_path / "r", digest=good ^ 1)
    with Replica.open(tmp_path / "r") as r:
        problems = verify(r).problems
    assert any("the tensor files give state digest" in p for p in problems), problems
    assert any("the head's state digest" in p for p in problems), problems


def test_verify_checks_each_records_digests_against_its_rows(tmp_path, rng):
    model = random_model(rng, rows=40)
    path = tmp_path / "r"
    with Replica.init(path, model) as r:
        for _ in range(3):
            r.commit(random_update(rng, model))
        record = rec.decode(r.record_blob(2))
        record.post_digest ^= 1 << 40  # a record whose digest does not follow from its rows
        blob = rec.encode(record)
        r.store.write(lambda txn: txn.put((2).to_bytes(8, "big"), blob, db=r.store.dbs["records"]))
        problems = verify(r).problems
    assert any(p.startswith("record 2: its rows make state digest") for p in problems), problems
    assert any(p.startswith("record 3: its state digest before") for p in problems), problems


def test_verify_checks_snapshot_digests(tmp_path, rng):
    model = random_model(rng, rows=40)
    path = tmp_path / "r"
    with Replica.init(path, model) as r:
        manifest = r.snapshots()[0]
        manifest["state_digest"] = lineage.to_hex(lineage.from_hex(manifest["state_digest"]) ^ 2)
        r.store.write(lambda txn: r.store.put_snapshot(txn, manifest))
        problems = verify(r).problems
    assert any("snapshot 0: its files give state digest" in p for p in problems), problems


def test_a_replica_made_from_a_snapshot_keeps_and_checks_its_sources_state_digest(tmp_path, rng, monkeypatch):
    # The source's manifest says the snapshot's state digest: the new replica checks its files
    # against it before adopting them, and its own manifest.json says it too.
    from deltalog import sync as sync_mod
    from deltalog.errors import IntegrityError

    _model, a, b = synced_pair(tmp_path, rng, rows=40)
    with Replica.open(a) as r:
        claimed = r.snapshots()[0]["state_digest"]
    (written,) = [json.load(open(p)) for p in (b / "snapshots").glob("*/manifest.json")]
    assert written["state_digest"] == claimed

    real = sync_mod.source_snapshot_manifest

    def lying(replica, offset):
        manifest = real(replica, offset)
        return {**manifest, "state_digest": lineage.to_hex(lineage.from_hex(manifest["state_digest"]) ^ 2)}

    monkeypatch.setattr(sync_mod, "source_snapshot_manifest", lying)
    with pytest.raises(IntegrityError, match="its manifest says"):
        do_sync(a, tmp_path / "c")
    assert not (tmp_path / "c" / "DELTALOG").exists()


# -- diff ----------------------------------------------------------------------------------------------------


def test_equal_digests_make_diff_o1_and_status_shows_them(tmp_path, rng):
    _model, a, b = synced_pair(tmp_path, rng, rows=80, commits=3)
    sa = json.loads(run_cli("status", a, "--json").stdout)
    sb = json.loads(run_cli("status", b, "--json").stdout)
    assert sa["state_digest"] == sb["state_digest"] and len(sa["state_digest"]) == 16
    out = json.loads(run_cli("diff", a, b, "--json").stdout)
    assert out["identical"] and out["method"] == "digest" and out["rows_compared"] == 0
    assert out["a"]["state_digest"] == out["b"]["state_digest"] == sa["state_digest"]
    with Replica.open(a) as ra, Replica.open(b) as rb:
        result = diff(ReplicaSide.at(ra, 1), ReplicaSide.at(rb))  # b never held 1; a's log ties them at 3
        assert result.method == "log" and result.anchor == 3 and not result.identical


def test_follow_stops_on_a_diverged_destination_and_reseed_is_not_for_follow(tmp_path, rng):
    model, a, b = synced_pair(tmp_path, rng, rows=60)
    stray_commit(b)  # b is ahead of a, on a branch: still the same model at a's head, so nothing to refuse yet
    with Replica.open(a) as r:
        r.commit(random_update(rng, model))
        r.commit(random_update(rng, model))
    proc = run_cli("sync", a, b, "--follow", "--interval", "0.2")  # not retried: it would never heal
    assert proc.returncode == 13 and "Diverged" not in proc.stderr and "--reseed" in proc.stderr, proc.stderr
    proc = run_cli("sync", a, b, "--follow", "--reseed")
    assert proc.returncode == 2 and "--reseed" in proc.stderr


def test_a_dry_run_into_an_older_format_replica_reports_instead_of_refusing(tmp_path):
    """Only a writer computes a replica's first state digest; a dry run writes nothing, so it goes on."""
    import shutil

    from conftest import REPO

    v3 = os.path.join(REPO, "formats", "golden", "v3", "replica")
    src, dst = tmp_path / "src", tmp_path / "dst"
    shutil.copytree(v3, src)
    shutil.copytree(v3, dst)
    with Replica.open(src) as r:
        r.commit({"counts": ([0], np.array([42], np.int64))})  # upgrades the source: it has a digest now
    proc = run_cli("sync", src, dst, "--dry-run", "--json")
    assert proc.returncode == 0, proc.stderr
    with Replica.open(dst) as r:
        assert r.format_version == 3 and r.state_digest is None  # the dry run wrote nothing
    proc = run_cli("sync", src, dst, "--json")
    assert proc.returncode == 0, proc.stderr
    with Replica.open(dst) as r, Replica.open(src) as s:
        assert r.format_version == 4 and r.state_digest == s.state_digest
