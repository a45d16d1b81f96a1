"""Replicas this user may not write, and errors that are the environment's, not deltalog's.

A replica another user owns (or one on a read-only mount) is still
readable: LMDB's readers need write access only to ``log/lock.mdb``. A
write there, an unreadable replica and a file that refuses writing exit 12
with one line naming the path, never 20 ("a bug") or 2 ("usage"), and
nothing is written. Usage errors and Ctrl-C answer --json with JSON too.

Root ignores file permissions, so as root the commands run under
``setpriv`` without the capabilities that let it (skipped without setpriv).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import time

import numpy as np
import pytest
from conftest import DELTALOG, apply_update, random_model, random_update, run_cli

from deltalog import Replica

_DROP = ["setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner"]


def as_user(*args, check: bool = False) -> subprocess.CompletedProcess:
    """``deltalog ARGS`` as a process that file permissions apply to."""
    prefix = []
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv: permissions cannot be tested")
        prefix = _DROP
    return subprocess.run([*prefix, *DELTALOG, *map(str, args)], capture_output=True, text=True, timeout=120)


@pytest.fixture
def replica(tmp_path, rng):
    model = random_model(rng, rows=80)
    path = tmp_path / "r"
    with Replica.init(path, model, bucket_rows=8) as r:
        for _ in range(4):
            r.commit(random_update(rng, model))
    update = {n: a.copy() for n, a in model.items()}
    apply_update(update, random_update(rng, model))
    checkpoint = tmp_path / "next.npz"
    np.savez(checkpoint, **update)
    return path, checkpoint


def _state(path) -> tuple:
    with Replica.open(path) as r:
        return r.head, r.state_digest, dict(r.iter_record_blobs())


def _chmod_tree(path, writable: bool) -> None:
    for root, dirs, files in os.walk(path):
        for name in [root, *(os.path.join(root, f) for f in files)]:
            mode = os.stat(name).st_mode
            os.chmod(name, mode | stat.S_IWUSR if writable else mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


def _one_error_line(proc, code: int, *words: str) -> None:
    assert proc.returncode == code, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("deltalog: error: "), proc.stderr
    assert "Traceback" not in proc.stderr and all(w in lines[0] for w in words), lines[0]


def test_a_replica_this_user_cannot_write_is_still_read(replica, tmp_path):
    path, checkpoint = replica
    before = _state(path)
    _chmod_tree(path, writable=False)
    os.chmod(path / "log" / "lock.mdb", 0o644)  # what LMDB's readers need
    try:
        status = as_user("status", path, "--json")
        assert status.returncode == 0, status.stderr
        assert json.loads(status.stdout)["head"] == before[0]
        assert as_user("log", path, "--json").returncode == 0
        assert as_user("diff", f"{path}@head~2", path).returncode == 1  # differences: read fine
        out = tmp_path / "out.npz"
        assert as_user("replay", path, "--out", out).returncode == 0 and out.exists()
        copy = tmp_path / "copy"
        assert as_user("sync", path, copy).returncode == 0  # a source needs no write access
        assert _state(copy)[:2] == before[:2]
        for args in (("commit", path, "--from", checkpoint), ("rollback", path, "--to", 2), ("compact", path)):
            _one_error_line(as_user(*args), 12, str(path))
        _chmod_tree(path / "log", writable=False)  # now not even the readers' table
        _one_error_line(as_user("status", path), 12, "lock.mdb")
    finally:
        _chmod_tree(path, writable=True)
    assert _state(path) == before


def test_an_unreadable_replica_or_unwritable_file_is_exit_12_not_a_bug(replica):
    path, checkpoint = replica
    before = _state(path)
    tensor = next(p for p in sorted((path / "tensors").iterdir()) if p.suffix == ".bin")
    os.chmod(tensor, 0o444)
    try:
        _one_error_line(as_user("commit", path, "--from", checkpoint), 12, "permission denied")
    finally:
        os.chmod(tensor, 0o644)
    os.chmod(path, 0)
    try:
        for args in (("status", path), ("verify", path), ("commit", path, "--from", checkpoint)):
            _one_error_line(as_user(*args), 12, "permission denied")
    finally:
        os.chmod(path, 0o755)
    assert _state(path) == before


def test_usage_errors_are_one_line_and_json_when_asked(replica):
    path, _checkpoint = replica
    proc = run_cli("status", path, "--json", "--bogus")
    _one_error_line(proc, 2, "--bogus", "deltalog status --help")
    err = json.loads(proc.stdout)["error"]
    assert err["type"] == "UsageError" and err["exit_code"] == 2
    proc = run_cli("commit", path, "--json")  # --from missing
    _one_error_line(proc, 2, "--from")
    assert json.loads(proc.stdout)["error"]["exit_code"] == 2


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_and_sigterm_exit_130_and_143_and_say_so_in_json(tmp_path, rng, sig):
    """A sync paced by --bwlimit, interrupted (Ctrl-C: 130) or terminated (SIGTERM: 143) once it has
    begun writing: one line, and with --json an error object; the destination is left to the next sync."""
    model = {"t": np.asarray(rng.standard_normal((4096, 64)), dtype=np.float32)}  # 1 MiB: ~50 s at 20 KiB/s
    src, dst = tmp_path / "src", tmp_path / "dst"
    Replica.init(src, model, bucket_rows=64).close()
    # SIGINT as a terminal delivers it: a test runner started in the background inherits it ignored.
    proc = subprocess.Popen([*DELTALOG, "sync", str(src), str(dst), "--bwlimit", "20K", "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 60
    while not any(p.name.endswith(".deltalog-sync") for p in tmp_path.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.05)  # the staging directory: past start-up, inside the transfer
    time.sleep(0.3)
    proc.send_signal(sig)  # SIGTERM: what timeout(1) in a cron line sends
    out, err = proc.communicate(timeout=60)
    word, code, kind = (("interrupted", 130, "Interrupted") if sig == signal.SIGINT
                        else ("terminated", 143, "Terminated"))
    assert proc.returncode == code, err
    # One line (after the blank one click writes to close a terminal's ^C echo).
    assert err.strip().count("\n") == 0 and word in err and "Traceback" not in err
    assert json.loads(out)["error"]["type"] == kind
    assert run_cli("sync", src, dst).returncode == 0  # and the next run finishes it


@pytest.mark.parametrize("where", ["before the record", "after the record"])
def test_ctrl_c_during_commit_says_whether_the_record_landed(replica, monkeypatch, capsys, where):
    """An incident responder must not be told 'aborted' when the record is durable: the command looks."""
    from deltalog.cli import main
    from deltalog.writer import Writer

    path, checkpoint = replica
    before = _state(path)[0]
    if where == "before the record":
        def interrupted(self, *a, **k):
            raise KeyboardInterrupt
        monkeypatch.setattr(Replica, "commit_checkpoint", interrupted)
    else:  # between the durable log transaction and the settle: the record is there
        def interrupted(self, change):
            raise KeyboardInterrupt
        monkeypatch.setattr(Writer, "settle", interrupted)
    with pytest.raises(SystemExit) as exit_:
        main(["commit", str(path), "--from", str(checkpoint), "--json"])
    out, err = capsys.readouterr()
    assert exit_.value.code == 130
    error = json.loads(out)["error"]
    assert error["type"] == "Interrupted" and "Traceback" not in err
    monkeypatch.undo()
    head = _state(path)[0]
    if where == "before the record":
        assert head == before and "before anything was written" in error["message"]
    else:
        assert head == before + 1 and f"is at offset {head}" in error["message"]
        assert as_user("verify", path).returncode == 0  # recovery settles it
        assert json.loads(run_cli("commit", path, "--from", checkpoint, "--json").stdout)["changed"] is False


def test_a_replica_on_a_read_only_mount_is_refused_not_read_unregistered(replica, monkeypatch):
    """There LMDB would skip its table of readers, so a writer elsewhere could reuse the pages being
    read: refused (exit 12) instead of read without that protection. (A read-only bind mount needs
    root to make, so the file system's answer is simulated.)"""
    import lmdb

    from deltalog import store
    from deltalog.errors import StorageError

    path, _checkpoint = replica
    calls = []

    def read_only_fs(where, **options):
        calls.append(options.get("readonly", False))
        raise lmdb.Error(f"{where}: Read-only file system")

    monkeypatch.setattr(store.lmdb, "open", read_only_fs)
    with pytest.raises(StorageError, match="read-only file system"):
        Replica.open(path)
    assert calls == [False]  # never retried read-only, where readers would go unregistered


def test_an_empty_token_file_is_refused_as_the_server_refuses_it(tmp_path):
    """It used to be sent as no token at all, and the server's 401 then said to pass --token-file."""
    (tmp_path / "empty.tok").write_text("")
    proc = run_cli("sync", "http://127.0.0.1:9", tmp_path / "dst", "--token-file", tmp_path / "empty.tok")
    _one_error_line(proc, 11, "token file must hold one token")
