"""Shared helpers for the test suites: random models, CLI runner, bitwise comparison."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zlib

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DELTALOG = [sys.executable, "-m", "deltalog"]


class Crash(BaseException):
    """Stands for the process dying: nothing after it runs."""


def crash_writer(replica) -> None:
    """What the kernel does when a process dies: its lock goes, its memory maps are dropped."""
    replica.writer.lock.release()
    replica.maps.forget()


CRASH_POINTS = ("before-rows", "half-rows", "rows-not-digests", "before-applied")


def crash_next_apply(monkeypatch, point: str) -> None:
    """Make the next commit die (raise Crash) after its log commit, at ``point`` of applying it:
    before any row is written, half of the first tensor's rows written, every row written but no
    row digest, or everything written but the 'applied' mark. Undo with ``monkeypatch.undo()``."""
    from deltalog.writer import Writer

    assert point in CRASH_POINTS, point
    real_write_rows, real_settle = Writer.write_rows, Writer.settle

    def write_rows(self, writes, **kwargs):
        if point == "before-rows":
            raise Crash
        if point == "half-rows":
            w = writes[0]
            half = len(w.rows) // 2
            self.rows(w.info)[w.rows[:half].astype(np.intp)] = w.values[:half]
            raise Crash
        if point == "rows-not-digests":
            for w in writes:
                self.rows(w.info)[w.rows.astype(np.intp)] = w.values
            raise Crash
        real_write_rows(self, writes, **kwargs)

    def settle(self, change):
        if point == "before-applied":
            raise Crash
        real_settle(self, change)

    monkeypatch.setattr(Writer, "write_rows", write_rows)
    monkeypatch.setattr(Writer, "settle", settle)


def random_model(rng: np.random.Generator, rows: int = 300, dim: int = 8) -> dict[str, np.ndarray]:
    """A small model with embedding tables, a dense layer, a bias and a scalar of mixed dtypes."""
    return {
        "item_emb": rng.standard_normal((rows, dim)).astype(np.float32),
        "user_emb": rng.standard_normal((rows // 2, dim)).astype(np.float16),
        "dense": rng.standard_normal((16, 4, 2)).astype(np.float64),
        "bias": rng.standard_normal(rows // 3).astype(np.float32),
        "ids": rng.integers(-1000, 1000, size=(rows // 4, 3)).astype(np.int32),
        "step": np.array(0, dtype=np.int64),
    }


def random_update(rng: np.random.Generator, model: dict[str, np.ndarray], max_rows: int = 20) -> dict[str, tuple]:
    """Sparse row updates for a random subset of tensors (indices may repeat)."""
    updates = {}
    for name, array in model.items():
        if rng.random() < 0.4:
            continue
        n_rows = array.shape[0] if array.ndim else 1
        k = int(rng.integers(1, max_rows + 1))
        rows = rng.integers(0, n_rows, size=k)
        shape = (k, *array.shape[1:]) if array.ndim else (k,)
        if array.dtype.kind == "f":
            values = rng.standard_normal(shape).astype(array.dtype)
        else:
            values = rng.integers(-1000, 1000, size=shape).astype(array.dtype)
        updates[name] = (rows, values)
    return updates


def apply_update(model: dict[str, np.ndarray], updates: dict[str, tuple]) -> None:
    """The reference semantics of a commit, in numpy: last value of a repeated row wins."""
    for name, (rows, values) in updates.items():
        array = model[name]
        flat = array.reshape(array.shape[0] if array.ndim else 1, -1)
        for row, value in zip(rows, values):
            flat[row] = np.asarray(value).reshape(-1)


def bits(array: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(array)
    return a.view(f"u{a.dtype.itemsize}") if a.dtype.itemsize in (1, 2, 4, 8) else a


def assert_same(replica, model: dict[str, np.ndarray]) -> None:
    """Every tensor of ``replica`` equals ``model`` bitwise."""
    assert sorted(replica.tensor_names) == sorted(model)
    for name, expected in model.items():
        got = replica.read_tensor(name)
        assert got.shape == expected.shape, name
        assert np.array_equal(bits(got), bits(expected)), f"tensor {name} differs"


def in_forked_child(body, timeout: float = 60.0) -> None:
    """Fork, run ``body()`` in the child, and fail unless it returns True within ``timeout`` (a hang fails too)."""
    import time

    child = os.fork()
    if child == 0:
        code = 1
        try:
            code = 0 if body() else 1
        finally:
            os._exit(code)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pid, status = os.waitpid(child, os.WNOHANG)
        if pid:
            assert os.waitstatus_to_exitcode(status) == 0, "the forked child got a different answer"
            return
        time.sleep(0.05)
    os.kill(child, 9)
    os.waitpid(child, 0)
    pytest.fail(f"the forked child hung for {timeout:.0f} s")


def compact_as_before_past_digests(r) -> int:
    """What a deltalog that kept no past digests left on open replica ``r``: a snapshot at the head,
    the log before it dropped, meta/oldest moved (past_digests untouched). Returns the new oldest."""
    with r.writing():
        manifest = r.make_snapshot()
        r.store.write(lambda txn: (r.store.delete_records(txn, manifest["offset"]),
                                   r.store.put_meta(txn, "oldest", manifest["offset"])))
    return manifest["offset"]


def run_cli(*args: str, cwd: str | None = None, check: bool = False, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the real `deltalog` command (as a user would) and capture its output."""
    proc = subprocess.run(
        [*DELTALOG, *map(str, args)], capture_output=True, text=True, cwd=cwd,
        env={**os.environ, **(env or {})}, timeout=120,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"deltalog {' '.join(map(str, args))} exited {proc.returncode}: {proc.stderr}")
    return proc


def cli_json(*args: str) -> dict:
    proc = run_cli(*args, "--json", check=True)
    return json.loads(proc.stdout)


@pytest.fixture
def rng(request) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(request.node.name.encode()))  # reproducible per test
