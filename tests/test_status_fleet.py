"""deltalog status with several replicas: one row each, lag against the newest head, error rows."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import random_model, run_cli
from http_fixture import serve_snapshot_url  # noqa: F401

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
    assert set(ra) == {"location", "model_id", "head", "state_digest", "lag_offsets", "lag_seconds", "error"}

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
