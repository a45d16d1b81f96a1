"""What each kind of damage is told to run, and that running it repairs the replica.

The fix verify names must be one that works on that damage (a damaged log
is not repaired by rebuilding the tensor files from it, and the command
that fails must not send the user back to verify in a loop).
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from conftest import REPO, assert_same, random_model, random_update, run_cli

from deltalog import Replica


def _primary(tmp_path, rng, commits: int = 6):
    """A replica with a history, the model at its head, and a follower synced to the head."""
    model = random_model(rng, rows=200)
    path = tmp_path / "p"
    with Replica.init(path, model, bucket_rows=8) as r:
        for _ in range(commits):
            update = random_update(rng, model)
            r.commit(update)
            for name, (rows, values) in update.items():
                flat = model[name].reshape(model[name].shape[0] if model[name].ndim else 1, -1)
                for row, value in zip(rows, values):
                    flat[row] = np.asarray(value).reshape(-1)
    assert run_cli("sync", path, tmp_path / "follower").returncode == 0
    return path, model


def _flip_record_byte(path, offset: int) -> None:
    with Replica.open(path) as r:
        blob = bytearray(r.record_blob(offset))
        blob[len(blob) // 2] ^= 0x10
        r.store.write(lambda txn: txn.put(offset.to_bytes(8, "big"), bytes(blob), db=r.store.dbs["records"]))


def _flip_tensor_byte(path, name: str = "item_emb") -> None:
    with Replica.open(path) as r:
        file = os.path.join(path, "tensors", r.info(name).file)
    with open(file, "r+b") as f:
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0x40]))


def _verify(path) -> dict:
    proc = run_cli("verify", path, "--json")
    return {"code": proc.returncode, **json.loads(proc.stdout)}


def test_a_damaged_log_is_blamed_alone_and_compact_from_tensors_repairs_it(tmp_path, rng):
    path, model = _primary(tmp_path, rng)
    _flip_record_byte(path, 4)
    report = _verify(path)
    assert report["code"] == 5 and report["damaged"] == ["log"], report
    assert all("record 4" in p for p in report["problems"]), report["problems"]  # the tensors are not blamed
    assert "--from-tensors" in report["repair"] and "--reseed" in report["repair"]
    human = run_cli("verify", path).stderr
    assert "found in the log" in human and "--from-tensors" in human and "replay" not in human
    proc = run_cli("replay", path, "--in-place")  # not a fix for this, and it says what is
    assert proc.returncode == 5 and "the log is damaged, not the tensor files" in proc.stderr
    assert "--from-tensors" in proc.stderr
    proc = run_cli("compact", path, "--from-tensors", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["built_from"] == "tensors" and out["oldest_offset"] == out["head"] == 6
    assert _verify(path)["code"] == 0
    with Replica.open(path) as r:
        assert_same(r, model)
        r.commit(random_update(rng, model))  # and it goes on
    assert run_cli("sync", path, tmp_path / "follower").returncode == 0  # its followers still follow
    with Replica.open(path) as a, Replica.open(tmp_path / "follower") as b:
        assert a.state_digest == b.state_digest


def test_damaged_tensor_files_are_told_replay_in_place(tmp_path, rng):
    path, model = _primary(tmp_path, rng)
    _flip_tensor_byte(path)
    report = _verify(path)
    assert report["code"] == 5 and report["damaged"] == ["tensors"] and "replay" in report["repair"]
    assert run_cli("replay", path, "--in-place").returncode == 0
    assert _verify(path)["code"] == 0


def test_a_damaged_log_and_tensors_are_told_to_reseed_from_a_healthy_replica(tmp_path, rng):
    path, model = _primary(tmp_path, rng)
    _flip_record_byte(path, 4)
    _flip_tensor_byte(path)
    report = _verify(path)
    assert report["code"] == 5 and report["damaged"] == ["log", "tensors"], report
    assert "--reseed" in report["repair"] and "--from-tensors" not in report["repair"]
    proc = run_cli("compact", path, "--from-tensors")  # it cannot prove the files: refused, nothing changed
    assert proc.returncode == 5 and "do not hold its model" in proc.stderr and "--reseed" in proc.stderr
    assert _verify(path)["damaged"] == ["log", "tensors"]
    assert run_cli("sync", tmp_path / "follower", path, "--reseed").returncode == 0
    assert _verify(path)["code"] == 0
    with Replica.open(path) as r:
        assert_same(r, model)


def test_compact_from_tensors_needs_a_state_digest_to_trust_them(tmp_path):
    v3 = tmp_path / "v3"
    shutil.copytree(os.path.join(REPO, "formats", "golden", "v3", "replica"), v3)
    proc = run_cli("compact", v3, "--from-tensors")
    assert proc.returncode == 4 and "cannot be proven" in proc.stderr
    proc = run_cli("compact", v3, "--from-tensors", "--keep-records", "1")
    assert proc.returncode == 2


@pytest.mark.parametrize("damage", ["snapshot", "bucket index"])
def test_damaged_derived_state_is_rebuilt_from_the_tensors(tmp_path, rng, damage):
    path, model = _primary(tmp_path, rng)
    with Replica.open(path) as r:
        if damage == "snapshot":
            file = os.path.join(path, "snapshots", f"{0:020d}", r.info("bias").file)
            with open(file, "r+b") as f:
                f.write(b"\xff\xff\xff\xff")
        else:
            bucket, (version, sig) = next(iter(r.bucket_index("item_emb").items()))
            r.store.write(lambda txn: r.store.put_bucket(txn, r.info("item_emb").id, bucket, version + 1, sig))
    report = _verify(path)
    kind = "snapshots" if damage == "snapshot" else "buckets"
    assert report["code"] == 5 and report["damaged"] == [kind] and "--from-tensors" in report["repair"]
    assert run_cli("compact", path, "--from-tensors").returncode == 0
    assert _verify(path)["code"] == 0
    with Replica.open(path) as r:
        assert_same(r, model)
        assert r.bucket_index("item_emb") == {}  # it described records that are gone


def _damage_manifest_entry(path, offset: int) -> None:
    """The log's copy of a snapshot's manifest, made undecodable (the files are untouched)."""
    with Replica.open(path) as r:
        r.store.write(lambda txn: txn.put(offset.to_bytes(8, "big"), b"\xa4x\xffz\xc1", db=r.store.dbs["snapshots"]))


def test_a_damaged_snapshot_manifest_in_the_log_is_reported_and_repaired(tmp_path, rng):
    """verify names it (it used to fail on it itself, like every repair it could name), and both the
    repairs it names work: compact --from-tensors, and sync --reseed from a healthy replica."""
    path, model = _primary(tmp_path, rng)
    copy = tmp_path / "copy"
    shutil.copytree(path, copy)
    for p in (path, copy):
        _damage_manifest_entry(p, 0)
    report = _verify(path)
    assert report["code"] == 5 and report["damaged"] == ["snapshots"], report
    assert any("snapshot manifest 0" in p for p in report["problems"]), report["problems"]
    assert "--from-tensors" in report["repair"] and "--reseed" in report["repair"]
    assert "verify" not in run_cli("verify", path).stderr.split("error:")[-1]  # no loop back to itself
    proc = run_cli("compact", path, "--from-tensors")
    assert proc.returncode == 0, proc.stderr
    assert _verify(path)["code"] == 0
    proc = run_cli("sync", tmp_path / "follower", copy, "--reseed")
    assert proc.returncode == 0, proc.stderr
    assert _verify(copy)["code"] == 0
    for p in (path, copy):
        with Replica.open(p) as r:
            assert_same(r, model)


def test_metadata_no_command_can_open_past_names_a_way_out_that_needs_no_opening(tmp_path, rng):
    path, _model = _primary(tmp_path, rng)
    with Replica.open(path) as r:
        model_meta = r.meta("model")
        model_meta["tensors"][0]["name"] = "zzz"  # names no longer sorted: the tensor ids would be wrong
        r.store.write(lambda txn: r.store.put_meta(txn, "model", model_meta))
    for command in (("status", path), ("verify", path)):
        proc = run_cli(*command)
        assert proc.returncode == 5 and "meta/model" in proc.stderr, proc.stderr
        assert "run 'deltalog verify'" not in proc.stderr and "HEALTHY_REPLICA NEW_DIR" in proc.stderr
    with open(path / "DELTALOG", "w"):
        pass  # an empty marker
    proc = run_cli("status", path)
    assert proc.returncode == 5 and "marker" in proc.stderr and "'format N'" in proc.stderr, proc.stderr


def test_a_damaged_manifest_json_is_found_never_served_and_rewritten_by_replay_in_place(tmp_path, rng):
    path, model = _primary(tmp_path, rng)
    manifest_json = path / "snapshots" / "00000000000000000000" / "manifest.json"
    intact = manifest_json.read_bytes()
    manifest_json.write_text("garbage\n")
    report = _verify(path)
    assert report["code"] == 5 and report["damaged"] == ["snapshots"], report
    assert any("manifest.json is not JSON" in p for p in report["problems"]), report["problems"]
    assert "replay" in report["repair"] and "--from-tensors" not in report["repair"]
    assert run_cli("diff", path, tmp_path / "follower").returncode == 0  # the data files are intact: still read
    from urllib.error import HTTPError
    from urllib.request import urlopen

    from http_fixture import running_server

    with running_server(path) as server:
        with pytest.raises(HTTPError) as err:
            urlopen(f"{server.url}/v1/snapshots/0/manifest.json", timeout=30)
        assert err.value.code >= 400 and b"manifest.json" in err.value.read()
    proc = run_cli("replay", path, "--in-place", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["manifests_rewritten"] == [0]
    assert json.loads(manifest_json.read_text()) == json.loads(intact)
    assert _verify(path)["code"] == 0
