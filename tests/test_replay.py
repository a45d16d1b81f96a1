"""replay: the model at an offset from snapshot + log, exported (--out) or repaired in place."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
from conftest import apply_update as apply_updates
from conftest import bits
import pytest

from deltalog import tensorfiles
from deltalog.checkpoint import read_checkpoint, read_checkpoint_metadata
from deltalog.compact import compact
from deltalog.errors import IntegrityError, InvalidInput, OffsetNotRetained
from deltalog.replay import repair_in_place, replay_to_checkpoint, tensors_at
from deltalog.replica import Replica
from deltalog.store import offset_key
from deltalog.verify import verify

PY = sys.executable
FORMATS = {"npz": "model.npz", "safetensors": "model.safetensors", "npy-dir": "model/"}


# -- helpers (local: this suite does not lean on other suites' fixtures) -------------------


def make_model(rng: np.random.Generator, rows: int = 64) -> dict[str, np.ndarray]:
    return {
        "emb": rng.standard_normal((rows, 8)).astype(np.float32),
        "emb16": rng.standard_normal((rows // 2, 4)).astype(np.float16),
        "ids": rng.integers(-100, 100, (rows, 3)).astype(np.int32),
        "bias": rng.standard_normal(rows).astype(np.float32),
        "flags": rng.integers(-5, 5, rows // 4).astype(np.int8),
        "dense": rng.standard_normal((4, 3, 2)).astype(np.float64),
        "scale": np.array(1.5, np.float64),
    }


def random_updates(rng: np.random.Generator, model: dict[str, np.ndarray]) -> dict[str, tuple]:
    names = [n for n in model if rng.random() < 0.5] or [str(rng.choice(list(model)))]
    updates = {}
    for name in names:
        arr = model[name]
        n = arr.shape[0] if arr.ndim else 1
        k = int(rng.integers(1, max(2, n // 3)))
        rows = rng.choice(n, size=k, replace=False)
        shape = (k, *arr.shape[1:]) if arr.ndim else (k,)
        values = (rng.standard_normal(shape) if arr.dtype.kind == "f" else rng.integers(-100, 100, shape)).astype(arr.dtype)
        updates[name] = (rows, values)
    return updates


def same(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and np.array_equal(bits(a), bits(b))


def build(tmp_path, seed: int = 0, commits: int = 10) -> tuple[str, dict[int, dict[str, np.ndarray]]]:
    rng = np.random.default_rng(seed)
    model = make_model(rng)
    path = str(tmp_path / "replica")
    states = {0: {k: np.array(v) for k, v in model.items()}}
    with Replica.init(path, model, bucket_rows=8) as r:
        for _ in range(commits):
            updates = random_updates(rng, model)
            apply_updates(model, updates)
            states[r.commit(updates)] = {k: np.array(v) for k, v in model.items()}
    return path, states


def tensor_file(path: str, replica: Replica, name: str) -> str:
    return os.path.join(path, tensorfiles.TENSOR_DIR, replica.info(name).file)


def run_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "deltalog", *map(str, args)], capture_output=True, text=True, timeout=60)


# -- replay --out ----------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_replay_out_equals_the_state_at_each_offset(tmp_path, fmt):
    path, states = build(tmp_path, seed=1)
    with Replica.open(path) as r:
        for offset in (0, 3, 7, 10):
            out = str(tmp_path / f"o{offset}-{FORMATS[fmt]}")
            result = replay_to_checkpoint(r, out, offset=offset)
            assert result.offset == offset and result.format == fmt and result.snapshots_used == [0]
            got = read_checkpoint(out)
            assert sorted(got) == sorted(states[offset])
            for name, want in states[offset].items():
                assert same(np.asarray(got[name].array), want), (offset, name)
            if fmt == "safetensors":
                meta = read_checkpoint_metadata(out)
                assert meta == {"deltalog.model_id": r.model_id, "deltalog.offset": str(offset)}
        # no scratch files are left beside the output
        assert not [n for n in os.listdir(tmp_path) if ".replay-" in n]


def test_replay_never_reads_the_live_tensor_files(tmp_path):
    path, states = build(tmp_path, seed=2)
    with Replica.open(path) as r:
        with open(tensor_file(path, r, "emb"), "r+b") as f:
            f.write(b"\xff" * 64)
        out = str(tmp_path / "head.npz")
        replay_to_checkpoint(r, out)
        assert same(np.asarray(read_checkpoint(out)["emb"].array), states[10]["emb"])


def test_tensors_at_uses_the_nearest_snapshot_and_falls_back_when_it_is_damaged(tmp_path):
    path, states = build(tmp_path, seed=3)
    with Replica.open(path) as r:
        with r.writing():
            r.make_snapshot()  # a second snapshot, at 10
        rng = np.random.default_rng(3)
        model = {k: np.array(v) for k, v in states[10].items()}
        for _ in range(3):
            updates = random_updates(rng, model)
            apply_updates(model, updates)
            states[r.commit(updates)] = {k: np.array(v) for k, v in model.items()}
        out = str(tmp_path / "a.npz")
        assert replay_to_checkpoint(r, out, offset=12).snapshots_used == [10]
        assert replay_to_checkpoint(r, str(tmp_path / "b.npz"), offset=6).snapshots_used == [0]
        # flip a byte in the newest snapshot: that tensor is rebuilt from the one at 0
        damaged = os.path.join(tensorfiles.snapshot_path(path, 10), r.info("emb").file)
        with open(damaged, "r+b") as f:
            byte = f.read(1)
            f.seek(0)
            f.write(bytes([byte[0] ^ 1]))
        result = replay_to_checkpoint(r, str(tmp_path / "c.npz"), offset=13)
        assert result.snapshots_used == [0, 10]
        for info, array in tensors_at(r, 13):
            assert same(array.reshape(info.shape), states[13][info.name]), info.name


def test_replay_refuses_offsets_outside_retention_and_a_broken_chain(tmp_path):
    path, _states = build(tmp_path, seed=4)
    with Replica.open(path) as r:
        with pytest.raises(OffsetNotRetained):
            replay_to_checkpoint(r, str(tmp_path / "x.npz"), offset=11)
        compact(r, keep_after=5)
        with pytest.raises(OffsetNotRetained) as info:
            replay_to_checkpoint(r, str(tmp_path / "x.npz"), offset=4)
        assert "oldest offset still available is 5" in info.value.one_line()
        assert not os.path.exists(tmp_path / "x.npz")
        # a record missing from the middle of the log is detected, not skipped
        r.store.write(lambda txn: txn.delete(offset_key(7), db=r.store.dbs["records"]))
        with pytest.raises(IntegrityError, match="missing or out-of-order"):
            replay_to_checkpoint(r, str(tmp_path / "x.npz"), offset=9)
        assert not os.path.exists(tmp_path / "x.npz")


# -- replay --in-place -----------------------------------------------------------------------


def _flip(file: str) -> None:
    with open(file, "r+b") as f:
        f.seek(5)
        byte = f.read(1)
        f.seek(5)
        f.write(bytes([byte[0] ^ 0x40]))


def _truncate(file: str) -> None:
    with open(file, "r+b") as f:
        f.truncate(os.path.getsize(file) // 2)


@pytest.mark.parametrize("damage", [_flip, _truncate, os.unlink], ids=["bit-flip", "truncated", "deleted"])
def test_replay_in_place_repairs_a_damaged_tensor_file(tmp_path, damage):
    path, states = build(tmp_path, seed=5)
    with Replica.open(path) as r:
        r.read_tensor("emb")  # a cached map of the old file must not survive the repair
        damage(tensor_file(path, r, "emb"))
        with Replica.open(path) as fresh:  # r's own cached map still sees a deleted file's inode
            assert not verify(fresh).ok
        result = repair_in_place(r)
        assert result.repaired == ["emb"] and result.offset == 10 and result.tensors_checked == len(states[10])
        report = verify(r)
        assert report.ok, report.problems
        for name, want in states[10].items():
            assert same(r.read_tensor(name), want), name
        assert not [n for n in os.listdir(os.path.join(path, "tensors")) if n.endswith(".replay-tmp")]
        assert repair_in_place(r).repaired == []  # nothing left to repair
        # the replica keeps working: commit on top of the repaired file
        r.commit({"emb": ([0], np.zeros((1, 8), np.float32))})
        assert verify(r).ok


def test_replay_in_place_only_at_the_head_and_cleans_leftovers(tmp_path):
    path, _states = build(tmp_path, seed=6)
    with Replica.open(path) as r:
        with pytest.raises(InvalidInput):
            repair_in_place(r, offset=3)
        leftover = tensor_file(path, r, "bias") + ".replay-tmp"
        with open(leftover, "wb") as f:
            f.write(b"half a file")
        assert repair_in_place(r, offset=10).repaired == []
        assert not os.path.exists(leftover)


# -- CLI -------------------------------------------------------------------------------------


def test_cli_replay(tmp_path):
    path, states = build(tmp_path, seed=7)
    out = tmp_path / "m.safetensors"
    proc = run_cli("replay", path, "--to", 4, "--out", out, "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["offset"] == 4 and data["format"] == "safetensors" and data["snapshots_used"] == [0]
    assert same(np.asarray(read_checkpoint(out)["ids"].array), states[4]["ids"])

    human = run_cli("replay", path, "--out", tmp_path / "npy/")
    assert human.returncode == 0 and "wrote" in human.stdout
    assert same(np.asarray(read_checkpoint(tmp_path / "npy")["dense"].array), states[10]["dense"])

    with Replica.open(path) as r:
        os.unlink(tensor_file(path, r, "flags"))
    assert run_cli("verify", path).returncode == 5
    fixed = run_cli("replay", path, "--in-place", "--json")
    assert fixed.returncode == 0, fixed.stderr
    assert json.loads(fixed.stdout)["repaired"] == ["flags"]
    assert run_cli("verify", path).returncode == 0

    assert run_cli("replay", path).returncode == 2  # neither --out nor --in-place
    assert run_cli("replay", path, "--in-place", "--out", tmp_path / "y.npz").returncode == 2
    wrong = run_cli("replay", path, "--to", 3, "--in-place")
    assert wrong.returncode == 11 and "Traceback" not in wrong.stderr
    gone = run_cli("replay", path, "--to", 99, "--out", tmp_path / "z.npz")
    assert gone.returncode == 7 and gone.stderr.count("\n") == 1 and not (tmp_path / "z.npz").exists()
