"""The command line as a user runs it: init, commit, status, log, verify.

Runs the real `deltalog` entry point in a subprocess: exit codes, --json
fields, one-line errors without tracebacks, nothing half-written.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from conftest import cli_json, random_model, run_cli

from deltalog import Replica
from deltalog.checkpoint import write_checkpoint


@pytest.fixture
def checkpoints(tmp_path, rng):
    model = random_model(rng)
    for kind, suffix in (("npz", ".npz"), ("safetensors", ".safetensors"), ("npy", "")):
        write_checkpoint(str(tmp_path / f"base{suffix}" if suffix else tmp_path / "base_npy"),
                         {k: (v, str(v.dtype)) for k, v in model.items()})
    changed = {k: v.copy() for k, v in model.items()}
    changed["item_emb"][[3, 100, 299]] += 1
    changed["step"] = np.array(9, np.int64)
    write_checkpoint(str(tmp_path / "next.safetensors"), {k: (v, str(v.dtype)) for k, v in changed.items()})
    return tmp_path, model, changed


@pytest.mark.parametrize("source", ["base.npz", "base.safetensors", "base_npy"])
def test_init_commit_status_log_verify_end_to_end(checkpoints, source):
    tmp, model, changed = checkpoints
    replica = tmp / "r"
    init = cli_json("init", replica, "--from", tmp / source, "--bucket-rows", "32", "--model-id", "demo")
    assert init["head"] == 0 and init["model_id"] == "demo" and init["tensors"] == len(model)

    commit = cli_json("commit", replica, "--from", tmp / "next.safetensors")
    assert commit["offset"] == 1 and commit["rows"] == 4 and commit["changed"] is True
    again = cli_json("commit", replica, "--from", tmp / "next.safetensors")
    assert again["offset"] == 1 and again["changed"] is False

    status = cli_json("status", replica)
    for field in ("head", "model_id", "format_version", "oldest_offset", "tensors", "snapshots"):
        assert field in status
    assert status["head"] == 1 and status["snapshots"] == [0]
    assert {t["name"] for t in status["tensors"]} == set(model)
    assert all({"name", "shape", "dtype", "rows", "buckets"} <= set(t) for t in status["tensors"])

    log = cli_json("log", replica)
    (record,) = log["records"]
    assert {k: record[k] for k in ("offset", "kind", "rows")} == {"offset": 1, "kind": "commit", "rows": 4}
    assert {"time", "bytes", "significance", "reason", "target"} <= set(record)
    assert cli_json("log", replica, "--since", "1")["records"] == []

    verify = cli_json("verify", replica)
    assert verify["ok"] is True and verify["head"] == 1

    with Replica.open(replica) as r:
        assert np.array_equal(r.read_tensor("item_emb"), changed["item_emb"])


def test_commit_returns_once_its_record_is_durable_leaving_the_rows_fsync_to_the_schedule(checkpoints):
    """Like the library's commit: the record is synced, the tensor pages follow the WAL-checkpoint
    schedule (after a machine crash the log re-applies them: tests/test_rollback.py)."""
    tmp, _, changed = checkpoints
    cli_json("init", tmp / "r", "--from", tmp / "base.npz")
    assert cli_json("commit", tmp / "r", "--from", tmp / "next.safetensors")["offset"] == 1
    with Replica.open(tmp / "r") as r:
        assert (r.state.flushed, r.head) == (0, 1) and r.state.settled
        assert np.array_equal(r.read_tensor("item_emb"), changed["item_emb"])


def test_human_output_goes_to_stdout_and_quiet_silences_it(checkpoints):
    tmp, _, _ = checkpoints
    proc = run_cli("init", tmp / "r", "--from", tmp / "base.npz")
    assert proc.returncode == 0 and "initialised" in proc.stdout
    assert run_cli("commit", tmp / "r", "--from", tmp / "next.safetensors", "--quiet").stdout == ""
    assert "commit" in run_cli("log", tmp / "r").stdout
    assert "ok:" in run_cli("verify", tmp / "r").stdout
    assert "item_emb" in run_cli("status", tmp / "r").stdout


@pytest.mark.parametrize(
    "args, code, needle",
    [
        (("status", "{tmp}/missing"), 3, "no such replica"),
        (("status", "{tmp}"), 3, "not a deltalog replica"),
        (("init", "{tmp}/r", "--from", "{tmp}/nonexistent.npz"), 2, "does not exist"),
        (("init", "{tmp}/r", "--from", "{tmp}/garbage.npz"), 11, "garbage.npz"),
        (("init", "{tmp}/r", "--from", "{tmp}/base.npz", "--bucket-rows", "0"), 2, "bucket-rows"),
        (("commit", "{tmp}/r", "--from", "{tmp}/other.npz"), 6, "does not match"),
        (("commit", "{tmp}/r", "--from", "{tmp}/reshaped.npz"), 6, "bias"),
        (("log", "{tmp}/r", "--since", "+1"), 2, "since"),
        (("log", "{tmp}/r", "--since", "-1"), 7, "fewer than 1 offsets"),
        (("frobnicate",), 2, "No such command"),
    ],
)
def test_bad_input_gets_one_line_and_a_documented_exit_code(checkpoints, args, code, needle):
    tmp, model, _ = checkpoints
    (tmp / "garbage.npz").write_bytes(b"this is not a zip file")
    np.savez(tmp / "other.npz", something=np.zeros(3))
    reshaped = dict(model)
    reshaped["bias"] = np.zeros(5, np.float32)
    np.savez(tmp / "reshaped.npz", **reshaped)
    if args[0] != "init":
        run_cli("init", tmp / "r", "--from", tmp / "base.npz", check=True)
    before = sorted(os.listdir(tmp))
    proc = run_cli(*(a.format(tmp=tmp) for a in args))
    assert proc.returncode == code, proc.stderr
    assert needle in proc.stderr
    assert "Traceback" not in proc.stderr
    if code != 2:
        assert len([line for line in proc.stderr.splitlines() if line.strip()]) == 1
    assert sorted(os.listdir(tmp)) == before  # nothing half-written beside it
    if args[0] == "commit":
        assert cli_json("status", tmp / "r")["head"] == 0


def test_json_errors_are_machine_readable(tmp_path):
    proc = run_cli("status", tmp_path / "nope", "--json")
    assert proc.returncode == 3
    error = json.loads(proc.stdout)["error"]
    assert error["type"] == "NotAReplica" and error["exit_code"] == 3


def test_verify_names_damage_and_exits_5(checkpoints):
    tmp, _, _ = checkpoints
    run_cli("init", tmp / "r", "--from", tmp / "base.npz", check=True)
    run_cli("commit", tmp / "r", "--from", tmp / "next.safetensors", check=True)
    with Replica.open(tmp / "r") as r:
        emb_file = tmp / "r" / "tensors" / r.info("item_emb").file
    data = bytearray(emb_file.read_bytes())
    data[40] ^= 0xFF
    emb_file.write_bytes(bytes(data))
    proc = run_cli("verify", tmp / "r")
    assert proc.returncode == 5
    assert "item_emb" in proc.stderr and f"replay {tmp / 'r'} --in-place" in proc.stderr
    report = json.loads(run_cli("verify", tmp / "r", "--json").stdout)
    assert report["ok"] is False and any("item_emb" in p for p in report["problems"])


def test_second_writer_exits_9_while_the_lock_is_held(checkpoints):
    tmp, _, _ = checkpoints
    run_cli("init", tmp / "r", "--from", tmp / "base.npz", check=True)
    with Replica.open(tmp / "r") as r, r.writing():
        proc = run_cli("commit", tmp / "r", "--from", tmp / "next.safetensors")
        assert proc.returncode == 9 and "locked" in proc.stderr
        assert f"pid {os.getpid()}" in proc.stderr  # who holds it: this test's process
        assert run_cli("status", tmp / "r").returncode == 0  # readers never wait
    # the holder is gone: its name is not repeated (the file's text is only a note)
    with Replica.open(tmp / "r") as r, r.writing():
        pass
    proc = run_cli("commit", tmp / "r", "--from", tmp / "next.safetensors")
    assert proc.returncode == 0, proc.stderr


def test_help_lists_every_command_and_the_exit_codes():
    proc = run_cli("--help")
    for command in ("init", "commit", "status", "log", "verify"):
        assert command in proc.stdout
    assert "Exit codes" in proc.stdout


def _into_a_reader_that_leaves(args, lines: int) -> tuple[int, str]:
    """Run the CLI with stdout into a 4 KiB pipe whose reader takes ``lines`` lines and closes it
    (0: closed before the command starts, as `| true`); return the exit code and stderr."""
    import fcntl
    import subprocess

    from conftest import DELTALOG

    read_fd, write_fd = os.pipe()
    fcntl.fcntl(write_fd, fcntl.F_SETPIPE_SZ, 4096)  # a reader of the command's first lines, not its whole output
    if lines == 0:
        os.close(read_fd)
    proc = subprocess.Popen([*DELTALOG, *map(str, args)], stdout=write_fd, stderr=subprocess.PIPE, text=True)
    os.close(write_fd)
    if lines:
        with os.fdopen(read_fd, "rb") as reader:
            for _ in range(lines):
                assert reader.readline()
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err


@pytest.fixture
def long_history(tmp_path, rng):
    model = random_model(rng)
    with Replica.init(tmp_path / "a", model, bucket_rows=32) as r:
        for step in range(200):
            r.commit({"item_emb": (np.array([step]), np.full((1, 8), step, np.float32))})
    return tmp_path / "a"


@pytest.mark.parametrize("args", [["log", "{a}"], ["status", *["{a}"] * 40]], ids=["log", "status of 40"])
def test_output_into_head_exits_0_with_nothing_on_stderr(long_history, args):
    args = [a.format(a=long_history) for a in args]
    assert len(run_cli(*args, check=True).stdout) > 4096  # more than the pipe holds: head leaves mid-output
    assert _into_a_reader_that_leaves(args, lines=1) == (0, "")


@pytest.mark.parametrize("args", [
    ["log", "{a}"], ["log", "{a}", "--json"], ["status", "{a}"], ["status", "{a}", "{a}", "{a}", "--json"],
    ["diff", "{a}@3", "{a}"], ["verify", "{a}"], ["--help"],
], ids=lambda args: " ".join(args))
def test_a_reader_that_leaves_changes_neither_the_exit_code_nor_stderr(long_history, args):
    args = [a.format(a=long_history) for a in args]
    code = run_cli(*args).returncode  # read to the end: the command's own code (diff: 1, differences)
    assert _into_a_reader_that_leaves(args, lines=0) == (code, "")
