"""deltalog status with several replicas: one row each, lag against the newest head, error rows."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import random_model, run_cli
from http_fixture import serve_snapshot_url  # noqa: F401
from sshd_fixture import sshd  # noqa: F401  (fixture)

from deltalog import Replica
from deltalog.checkpoint import write_checkpoint


@pytest.fixture
def fleet(tmp_path, rng):
    model = random_model(rng)
    write_checkpoint(str(tmp_path / "base.npz"), {k: (v, str(v.dtype)) for k, v in model.items()})
    changed = {k: v.copy() for k, v in model.items()}
    changed["item_emb"][[1, 2]] += 1
    write_checkpoint(str(tmp_path / "next.npz"), {k: (v, str(v.dtype)) for k, v in changed.items()})
    run_cli("init", tmp_path / "a", "--from", tmp_path / "base.npz", "--model-id", "demo", check=True)
    run_cli("sync", tmp_path / "a", tmp_path / "b", check=True)
    run_cli("commit", tmp_path / "a", "--from", tmp_path / "next.npz", check=True)
    return tmp_path


def test_lag_offsets_and_error_row(fleet):
    a, b, missing = fleet / "a", fleet / "b", fleet / "missing"
    proc = run_cli("status", a, b, missing, "--json")
    assert proc.returncode == 3, proc.stderr  # NotAReplica, the first failure
    rows = json.loads(proc.stdout)
    assert [r["location"] for r in rows] == [str(a), str(b), str(missing)]
    ra, rb, rm = rows
    assert ra["head"] == 1 and ra["lag_offsets"] == 0 and ra["model_id"] == "demo" and ra["error"] is None
    assert rb["head"] == 0 and rb["lag_offsets"] == 1 and rb["state_digest"] != ra["state_digest"]
    assert rm["error"] and rm["head"] is None
    assert set(ra) == {"location", "model_id", "head", "state_digest", "head_time", "head_time_unknown", "lag_offsets",
                       "lag_seconds", "error"}
    assert ra["lag_seconds"] == 0.0 and ra["head_time_unknown"] is None
    # b: a's init snapshot, which keeps init's time
    with Replica.open(a) as r:
        created = r.created
    assert rb["head_time"] == created and rb["lag_seconds"] == round(ra["head_time"] - created, 3)

    human = run_cli("status", a, b, missing)
    assert human.returncode == 3
    assert str(b) in human.stdout and "error" in human.stdout

    ok = run_cli("status", a, b, "--json")
    assert ok.returncode == 0 and len(json.loads(ok.stdout)) == 2


def test_http_replica_row(fleet, serve_snapshot_url):  # noqa: F811
    url = serve_snapshot_url(fleet / "a")
    proc = run_cli("status", url, fleet / "b", "--json", "--timeout", "10")
    assert proc.returncode == 0, proc.stderr
    rh, rb = json.loads(proc.stdout)
    assert rh["location"] == url and rh["head"] == 1 and rh["lag_offsets"] == 0
    assert rb["lag_offsets"] == 1


def test_single_local_keeps_detailed_output(fleet):
    out = run_cli("status", fleet / "a", check=True).stdout
    assert out.startswith("replica ") and "item_emb" in out


def test_lag_seconds_is_how_much_older_the_head_is(fleet):
    """lag_seconds: the primary's time of the newest head minus its time of this replica's head, the same
    however the replica got there (a follower reports the primary's commit time, not its sync time)."""
    import time

    a, b = fleet / "a", fleet / "b"
    run_cli("sync", a, b, check=True)  # b at 1, a record of kind sync standing for a's commit 1
    time.sleep(1.1)
    run_cli("commit", a, "--from", fleet / "base.npz", check=True)  # a at 2
    log = json.loads(run_cli("log", a, "--json", check=True).stdout)["records"]
    made = {e["offset"]: e["time"] for e in log}
    rows = json.loads(run_cli("status", a, b, "--json", check=True).stdout)
    assert [r["head_time"] for r in rows] == [made[2], made[1]]  # b's own sync record is newer than made[1]
    assert rows[1]["lag_seconds"] == round(made[2] - made[1], 3) >= 1.0
    assert rows[0]["lag_seconds"] == 0.0


def test_ssh_replica_row(fleet, sshd):  # noqa: F811
    """host:path rows, reached with the same -e/--remote-deltalog options as sync."""
    loc = sshd.location(fleet / "b")
    proc = run_cli("status", fleet / "a", loc, "--json", *sshd.cli_options())
    assert proc.returncode == 0, proc.stderr
    ra, rb = json.loads(proc.stdout)
    assert rb["location"] == loc and rb["head"] == 0 and rb["lag_offsets"] == 1 and rb["error"] is None
    assert rb["state_digest"] != ra["state_digest"] and rb["model_id"] == "demo"
    human = run_cli("status", fleet / "a", loc, env={"DELTALOG_SSH": sshd.ssh_command,
                                                     "DELTALOG_REMOTE": sshd.remote_deltalog})
    assert human.returncode == 0 and loc in human.stdout, human.stderr


def test_a_sync_in_several_chunks_reports_the_writers_time_of_its_head(fleet):
    """The source's history rides on the first chunk only: the record that a sync of several chunks
    ends with must still stand for the writer's records, their times and kinds."""
    a, c = fleet / "a8", fleet / "c"
    with Replica.init(a, {"emb": np.zeros((300, 8), np.float32)}, bucket_rows=8) as r:
        r.commit({"emb": ([1, 2], np.ones((2, 8), np.float32))})
        r.commit({"emb": (np.arange(300), np.full((300, 8), 2, np.float32))})  # a at 2: every bucket
    sync = json.loads(run_cli("sync", a, c, "--max-bytes", "1G", "--chunk-bytes", "1K", "--json", check=True).stdout)
    assert sync["complete"] and sync["chunks"] > 1
    made = {e["offset"]: e["time"] for e in json.loads(run_cli("log", a, "--json", check=True).stdout)["records"]}
    ra, rc = json.loads(run_cli("status", a, c, "--json", check=True).stdout)
    assert rc["head"] == ra["head"] == 2 and rc["head_time"] == ra["head_time"] == made[2]
    synced = json.loads(run_cli("log", c, "--json", check=True).stdout)["records"]
    assert [(e["offset"], e["kind"], e["time"]) for e in synced] == [(1, "commit", made[1]), (2, "commit", made[2])]


def test_a_snapshot_head_reports_the_time_of_the_record_it_was_taken_at(fleet):
    """A compaction that folds every record, and a first sync from that snapshot, keep the head's time:
    the snapshot manifest carries it, through every transport that copies the snapshot."""
    a, c, d = fleet / "a", fleet / "c", fleet / "d"
    made = json.loads(run_cli("log", a, "--json", check=True).stdout)["records"][-1]["time"]
    shutil.copytree(a, c)
    run_cli("compact", c, check=True)  # every record folded: head 1 is a snapshot
    assert json.loads(run_cli("log", c, "--json", check=True).stdout)["records"] == []
    run_cli("sync", c, d, check=True)  # d: that snapshot, no record
    rows = json.loads(run_cli("status", a, c, d, "--json", check=True).stdout)
    seen = [(r["head"], r["head_time"], r["head_time_unknown"], r["lag_seconds"]) for r in rows]
    assert seen == [(1, made, None, 0.0)] * 3
    with Replica.open(a) as r:  # the next compaction's snapshot keeps it too
        r.commit({"item_emb": ([0], np.zeros((1, 8), np.float32))})
    run_cli("sync", a, c, check=True)
    run_cli("compact", c, check=True)
    rows = json.loads(run_cli("status", a, c, d, "--json", check=True).stdout)
    newest = rows[0]["head_time"]
    assert rows[1]["head_time"] == newest > made and rows[2]["lag_seconds"] == round(newest - made, 3)


def test_a_head_whose_time_is_not_kept_says_so(fleet):
    """A snapshot written before manifests kept a time: status says why there is no lag in seconds."""
    a, c = fleet / "a", fleet / "c"
    shutil.copytree(a, c)
    run_cli("compact", c, check=True)
    with Replica.open(c) as r, r.writing():  # as an older deltalog registered it: no "time"
        (manifest,) = r.snapshots()
        r.store.write(lambda txn: r.store.put_snapshot(txn, {k: v for k, v in manifest.items() if k != "time"}))
    rows = json.loads(run_cli("status", a, c, "--json", check=True).stdout)
    assert rows[1]["head_time"] is None and "head 1 is a snapshot" in rows[1]["head_time_unknown"]
    assert rows[1]["lag_seconds"] == 0.0  # at the newest head: no older, whatever the time
    with Replica.open(a) as r:
        r.commit({"item_emb": ([0], np.zeros((1, 8), np.float32))})
    rows = json.loads(run_cli("status", a, c, "--json", check=True).stdout)
    assert rows[1]["lag_offsets"] == 1 and rows[1]["lag_seconds"] is None
    human = run_cli("status", a, c, check=True).stdout
    assert f"{c}: lag in seconds unknown: head 1 is a snapshot" in human


def test_columns_line_up_under_their_header_with_short_names(tmp_path, rng):
    model = random_model(rng, rows=20)
    for name in ("a", "b"):
        Replica.init(tmp_path / name, model, bucket_rows=8, model_id="m").close()
    proc = run_cli("status", "a", "b", cwd=str(tmp_path))
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    header, first = lines[0], lines[1]
    assert header.index("model") == first.index("m "), (header, first)
