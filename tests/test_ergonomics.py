"""Operator ergonomics, each as a user meets it on the command line (issue 16).

Offsets written relative to the head, dry runs of rollback and compact, a
commit's message and author, refusals that say what to do (NaN rows, an
existing --out, a subfolder of .npy files, a port in use), and output that
never claims success before a rejection.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import time

import click
import numpy as np
import pytest
from conftest import DELTALOG, random_model, random_update, run_cli

from deltalog import Replica


@pytest.fixture
def replica(tmp_path, rng):
    """A replica with 6 commits (offsets 1..6) and its model kept aside per offset."""
    model = random_model(rng, rows=80)
    path = tmp_path / "r"
    states = {}
    with Replica.init(path, model, bucket_rows=8) as r:
        states[0] = {n: r.read_tensor(n) for n in r.tensor_names}
        for _ in range(6):
            offset = r.commit(random_update(rng, model))
            states[offset] = {n: r.read_tensor(n) for n in r.tensor_names}
    return path, states


def _json(*args) -> dict:
    proc = run_cli(*args, "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def _diff(a, b) -> dict:
    proc = run_cli("diff", a, b, "--json")
    assert proc.returncode in (0, 1), proc.stderr
    return json.loads(proc.stdout)


def _log(path) -> list:
    return _json("log", path)["records"]


# -- offsets relative to the head ----------------------------------------------------------------


def test_offsets_can_be_counted_back_from_the_head(replica):
    path, states = replica
    assert _diff(f"{path}@-1", path)["a_offset"] == 5
    assert _diff(f"{path}@head~3", f"{path}@head")["a_offset"] == 3
    assert _json("replay", path, "--to", "head~2", "--out", path.parent / "four.npz")["offset"] == 4
    assert [e["offset"] for e in _json("log", path, "--since", "-2")["records"]] == [5, 6]
    assert _json("rollback", path, "--to", "-6")["target"] == 0  # 6 records back: the oldest offset
    proc = run_cli("rollback", path, "--to", "head~9")
    assert proc.returncode == 7 and "fewer than 9 offsets" in proc.stderr
    for bad in ("--to=+1", "--to=head-1", "--to=x"):
        proc = run_cli("rollback", path, bad)
        assert proc.returncode == 2 and "is not an offset" in proc.stderr, proc.stderr
    assert _json("compact", path, "--keep-after", "head~2")["oldest_offset"] == 5  # head 7 now (the rollback)


def test_a_followers_offsets_are_counted_over_what_it_holds(replica, tmp_path):
    path, _states = replica
    follower = tmp_path / "f"
    assert run_cli("sync", path, follower).returncode == 0  # snapshot 0 and one record at 6
    assert _diff(f"{follower}@-1", follower)["a_offset"] == 0  # not 5: it never held 5


def test_log_since_a_duration(replica):
    path, _states = replica
    assert len(_json("log", path, "--since", "1h")["records"]) == 6
    time.sleep(1.1)
    assert _json("log", path, "--since", "1s")["records"] == []
    assert run_cli("log", path, "--since", "5x").returncode == 2


# -- dry runs ---------------------------------------------------------------------------------------


def test_rollback_dry_run_says_what_a_rollback_restores_and_writes_nothing(replica):
    path, _states = replica
    before = _log(path)
    planned = _json("rollback", path, "--to", "2", "--dry-run")
    # offset: where the record would go (the new record's offset, as without --dry-run; the head stays 6)
    assert planned["dry_run"] and planned["changed"] and planned["offset"] == 7 and _log(path) == before
    assert planned["previous_head"] == 6
    human = run_cli("rollback", path, "--to", "2", "-n").stdout
    assert "would restore" in human and "offset 7" in human
    done = _json("rollback", path, "--to", "2")
    assert (done["rows"], done["tensors"]) == (planned["rows"], planned["tensors"]) and done["offset"] == 7
    assert _json("rollback", path, "--to", "2", "--dry-run")["changed"] is False  # already there


def test_compact_dry_run_predicts_the_compaction_and_changes_nothing(replica):
    path, _states = replica
    before = (_log(path), _json("status", path)["snapshots"])
    planned = _json("compact", path, "--keep-records", "2", "--dry-run")
    assert planned["dry_run"] and (_log(path), _json("status", path)["snapshots"]) == before
    done = _json("compact", path, "--keep-records", "2")
    keys = ("oldest_offset", "records_removed", "log_bytes_freed", "snapshots_removed", "snapshot_bytes_removed",
            "snapshot_bytes_written")
    assert {k: planned[k] for k in keys} == {k: done[k] for k in keys}
    assert "would make offset 6 the oldest" in run_cli("compact", path, "--from-tensors", "-n").stdout
    planned = _json("compact", path, "--from-tensors", "--dry-run")
    assert planned["oldest_offset"] == 6 and planned["records_removed"] == 2 and planned["built_from"] == "tensors"


# -- commit ----------------------------------------------------------------------------------------


def test_commit_message_user_and_host_are_kept_and_travel(tmp_path, rng):
    model = random_model(rng, rows=40)
    path, follower = tmp_path / "r", tmp_path / "f"
    Replica.init(path, model).close()
    model["bias"][:5] += 1
    np.savez(tmp_path / "next.npz", **model)
    assert run_cli("commit", path, "--from", tmp_path / "next.npz", "-m", "nightly retrain").returncode == 0
    entry = _log(path)[-1]
    assert (entry["reason"], entry["host"]) == ("nightly retrain", socket.gethostname()) and entry["user"]
    assert run_cli("sync", path, follower).returncode == 0
    upstream = _log(follower)[-1]
    assert (upstream["reason"], upstream["user"], upstream["host"]) == (entry["reason"], entry["user"], entry["host"])
    assert "nightly retrain" in run_cli("log", follower).stdout


def test_commit_refuses_nan_and_infinity_unless_allowed(tmp_path, rng):
    model = random_model(rng, rows=40)
    path = tmp_path / "r"
    Replica.init(path, model).close()
    model["item_emb"][3, 1] = np.nan
    model["bias"][7] = np.inf
    np.savez(tmp_path / "bad.npz", **model)
    proc = run_cli("commit", path, "--from", tmp_path / "bad.npz")
    assert proc.returncode == 11 and "NaN or infinity" in proc.stderr and "--allow-nonfinite" in proc.stderr
    assert "first: row" in proc.stderr and proc.stderr.count("\n") == 1
    assert _log(path) == []
    assert run_cli("commit", path, "--from", tmp_path / "bad.npz", "--allow-nonfinite").returncode == 0
    assert len(_log(path)) == 1


# -- files and ports --------------------------------------------------------------------------------


def test_replay_out_honours_the_umask_and_refuses_to_overwrite_without_force(replica):
    path, _states = replica
    out = path.parent / "m.safetensors"
    old = os.umask(0o022)
    try:
        assert run_cli("replay", path, "--out", out).returncode == 0
        assert stat.S_IMODE(os.stat(out).st_mode) == 0o644
        os.umask(0o027)
        npy_dir = path.parent / "npy"
        assert run_cli("replay", path, "--out", f"{npy_dir}/").returncode == 0
        assert stat.S_IMODE(os.stat(npy_dir).st_mode) == 0o750
    finally:
        os.umask(old)
    first = out.stat().st_mtime_ns
    proc = run_cli("replay", path, "--to", "1", "--out", out)
    assert proc.returncode == 11 and "exists" in proc.stderr and "--force" in proc.stderr
    assert out.stat().st_mtime_ns == first
    assert run_cli("replay", path, "--to", "1", "--out", out, "--force").returncode == 0
    for force in ((), ("--force",)):  # a directory of .npy files is never emptied for us: no hint to --force
        proc = run_cli("replay", path, "--out", f"{npy_dir}/", *force)
        assert proc.returncode == 11 and "not empty" in proc.stderr and "--force" not in proc.stderr, proc.stderr


def test_a_directory_checkpoint_is_read_flat_unless_recursive(tmp_path):
    ckpt = tmp_path / "ckpt"
    (ckpt / "backup").mkdir(parents=True)
    np.save(ckpt / "emb.npy", np.zeros((4, 2), np.float32))
    np.save(ckpt / "backup" / "emb.npy", np.ones((4, 2), np.float32))
    proc = run_cli("init", tmp_path / "r", "--from", ckpt)
    assert proc.returncode == 11 and "backup" in proc.stderr and "--recursive" in proc.stderr
    assert not (tmp_path / "r").exists()
    out = json.loads(run_cli("init", tmp_path / "r", "--from", ckpt, "--recursive", "--json").stdout)
    assert out["tensors"] == 2


def test_a_port_in_use_is_a_transport_error_with_a_way_out(replica):
    path, _states = replica
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    try:
        port = busy.getsockname()[1]
        proc = subprocess.run([*DELTALOG, "serve-snapshot", str(path), "--port", str(port)],
                              capture_output=True, text=True, timeout=60)
    finally:
        busy.close()
    assert proc.returncode == 8 and "--port 0" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


# -- output that tells the truth --------------------------------------------------------------------


def test_a_rejected_check_prints_no_success_line(replica, tmp_path, rng):
    path, _states = replica
    dst = tmp_path / "d"
    assert run_cli("sync", path, dst).returncode == 0
    with Replica.open(path) as r:
        r.commit({"bias": ([0], np.array([9.0], np.float32))})
    proc = run_cli("sync", path, dst, "--check", "false")
    assert proc.returncode == 10 and proc.stdout == "" and "rejected offset 7" in proc.stderr


def test_an_interrupted_first_sync_says_to_run_it_again(replica, tmp_path):
    path, _states = replica
    dst = tmp_path / "d"
    proc = run_cli("sync", path, dst, "--max-bytes", "1K")
    assert proc.returncode == 1 and "None" not in proc.stdout and "run the same sync again" in proc.stdout
    proc = run_cli("status", dst)
    assert proc.returncode == 3 and "first sync into it has not completed" in proc.stderr
    assert "again" in proc.stderr
    assert run_cli("sync", path, dst).returncode == 0
    assert run_cli("status", dst).returncode == 0


# -- progress and reports ----------------------------------------------------------------------------


def test_progress_is_forced_or_silenced_on_request(replica, tmp_path, rng):
    path, _states = replica
    model = {n: a for n, a in _states[6].items()}
    model["bias"] = model["bias"] + 1
    np.savez(tmp_path / "next.npz", **model)
    quiet = run_cli("commit", path, "--from", tmp_path / "next.npz")  # not a terminal: no bar
    assert quiet.returncode == 0 and quiet.stderr == ""
    model["bias"] = model["bias"] + 1
    np.savez(tmp_path / "next.npz", **model)
    proc = run_cli("--progress", "commit", path, "--from", tmp_path / "next.npz")
    assert proc.returncode == 0 and "commit" in proc.stderr and "\x1b[" in proc.stderr  # a live bar on stderr
    assert "committed offset 8" in proc.stdout  # the result stays on stdout
    proc = run_cli("--progress", "verify", path, "--json")
    assert proc.returncode == 0 and proc.stderr == ""  # never with --json
    proc = run_cli("--no-progress", "sync", path, tmp_path / "f")
    assert proc.returncode == 0 and proc.stderr == ""


def test_sync_stats_reports_each_tensor(replica, tmp_path):
    path, _states = replica
    proc = run_cli("sync", path, tmp_path / "f", "--json")
    out = json.loads(proc.stdout)
    sent = {t["name"]: t for t in out["tensors"]}
    assert sum(t["rows"] for t in sent.values()) == out["rows_sent"] > 0
    assert sum(t["bytes"] for t in sent.values()) <= out["bytes_sent"]
    assert sum(t["snapshot_bytes"] for t in sent.values()) == out["snapshot_bytes"]
    with Replica.open(path) as r:
        r.commit({"bias": ([0, 1], np.array([5.0, 6.0], np.float32))})
    proc = run_cli("sync", path, tmp_path / "f", "--stats")
    lines = proc.stdout.splitlines()
    assert proc.returncode == 0 and lines[1].split()[:3] == ["tensor", "rows", "bytes"]
    assert lines[2].split()[:2] == ["bias", "2"] and len(lines) == 3  # only what moved


# -- completion and the manual -----------------------------------------------------------------------


def test_shell_completion_scripts_and_answers():
    for shell in ("bash", "zsh", "fish"):
        proc = run_cli("completion", shell)
        assert proc.returncode == 0 and "_DELTALOG_COMPLETE" in proc.stdout, shell
    env = {"COMP_WORDS": "deltalog sync --res", "COMP_CWORD": "2", "_DELTALOG_COMPLETE": "bash_complete"}
    proc = subprocess.run(DELTALOG, capture_output=True, text=True, env={**os.environ, **env}, timeout=60)
    assert proc.stdout.split() == ["plain,--reseed"], proc


def test_the_manual_page_covers_every_command_option_and_exit_code():
    from deltalog.cli import cli
    from deltalog.errors import EXIT_CODES

    page = run_cli("man").stdout
    assert page.startswith(".TH DELTALOG 1 ")
    ctx = click.Context(cli)
    for name in cli.list_commands(ctx):
        command = cli.get_command(ctx, name)
        assert f".SS {name.replace('-', chr(92) + '-')}" in page, name
        for param in command.params:
            if isinstance(param, click.Option) and not param.hidden:
                assert param.opts[0].replace("-", "\\-") in page, (name, param.opts)
    for code in EXIT_CODES:
        assert f"\\fB{code}\\fR" in page
    assert "DELTALOG_SSH" in page and "DELTALOG_TOKEN" in page
    if shutil.which("groff"):
        rendered = subprocess.run(["groff", "-man", "-Tutf8", "-ww"], input=page, capture_output=True, text=True)
        assert rendered.returncode == 0 and "warning" not in rendered.stderr, rendered.stderr
        assert "deltalog sync [OPTIONS] SRC DST" in rendered.stdout


# -- a peer that hangs -------------------------------------------------------------------------------


def _hanging_ssh(tmp_path) -> str:
    """An 'ssh' that connects and then says nothing, as a hung remote does."""
    script = tmp_path / "hung-ssh"
    script.write_text("#!/bin/sh\nexec sleep 3600\n")
    script.chmod(0o755)
    return str(script)


def test_ssh_timeout_is_honoured(replica, tmp_path):
    path, _states = replica
    started = time.monotonic()
    proc = run_cli("sync", "host:/srv/model", tmp_path / "d", "--ssh-command", _hanging_ssh(tmp_path),
                   "--timeout", "1")
    took = time.monotonic() - started
    assert proc.returncode == 8 and "no answer for 1 s" in proc.stderr, proc.stderr
    assert took < 4.0, f"--timeout 1 took {took:.1f} s"


def test_ssh_has_a_default_timeout(tmp_path, monkeypatch):
    """Without --timeout a hung peer is given up on (after DEFAULT_SILENCE_SECONDS), never waited for forever."""
    from deltalog.errors import TransportError
    from deltalog.transport import TransportOptions, open_source
    from deltalog.transport import ssh

    monkeypatch.setattr(ssh, "DEFAULT_SILENCE_SECONDS", 0.5)
    started = time.monotonic()
    source = open_source("host:/srv/model", TransportOptions(ssh_command=_hanging_ssh(tmp_path)))
    try:  # the handshake's answer is read when the connection is first used
        with pytest.raises(TransportError, match="no answer for 0.5 s"):
            source.hello()
    finally:
        source.close()
    assert time.monotonic() - started < 3.0


def test_the_diff_table_keeps_long_names_whole_at_80_columns_and_shows_the_share_changed(tmp_path):
    import io

    from rich.console import Console

    from deltalog.cli.diff_cmd import _render
    from deltalog.diff import ReplicaSide, diff

    name = "model.encoder.layers.11.attention.self.query_key_value.weight"
    with Replica.init(tmp_path / "r", {name: np.zeros((1000, 8), np.float32), "b": np.zeros(3, np.float32)}) as r:
        r.commit({name: ([1, 2, 3], np.ones((3, 8), np.float32))})
        result = diff(ReplicaSide.at(r, 0), ReplicaSide.at(r))
    screen = io.StringIO()
    _render(Console(file=screen, width=80, no_color=True, highlight=False), result)
    text = screen.getvalue()
    assert "…" not in text and max(len(line) for line in text.splitlines()) <= 80
    assert name in "".join(line.split()[0] for line in text.splitlines() if line.strip())  # wrapped, not cut
    assert " 0.3%" in text and "of all" in text


# -- sync budgets and a follower's lag, as the user sees them -----------------------------------


def _emb_follower(tmp_path, rng, rows=8192):
    a, b = tmp_path / "a", tmp_path / "b"
    Replica.init(a, {"emb": rng.standard_normal((rows, 32)).astype(np.float32)}, bucket_rows=64).close()
    run_cli("sync", a, b, check=True)
    return a, b


def _same_tensors(a, b) -> None:
    with Replica.open(a) as x, Replica.open(b) as y:
        assert x.head == y.head and y.pending_sync() is None
        for n in x.tensor_names:
            assert np.array_equal(x.read_tensor(n).view(np.uint8), y.read_tensor(n).view(np.uint8)), n


def test_sync_deadline_too_short_for_anything_exits_1_and_a_rerun_finishes_exact(tmp_path, rng):
    a, b = _emb_follower(tmp_path, rng)
    for rows in (np.arange(0, 8192, 97), np.arange(8192)):  # one chunk, then many (64 KiB each)
        with Replica.open(a) as r:
            r.commit({"emb": (rows, rng.standard_normal((len(rows), 32)).astype(np.float32))})
        with Replica.open(b) as r:
            before = r.head
        proc = run_cli("sync", a, b, "--deadline", "0.001", "--chunk-bytes", "64K", "--json")
        assert proc.returncode == 1, proc.stderr
        data = json.loads(proc.stdout)
        assert data["complete"] is False and data["stopped_by"] == "deadline" and data["head"] == before
        proc = run_cli("sync", a, b, "--deadline", "0.001")
        assert proc.returncode == 1 and "stopped by --deadline" in proc.stdout and f"head stays {before}" in proc.stdout
        assert _json("status", b)["head"] == before
        proc = run_cli("sync", a, b, "--deadline", "600", "--chunk-bytes", "64K", "--json")
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout)["complete"] is True
        _same_tensors(a, b)


def test_sync_and_status_say_the_same_of_a_partial_sync(tmp_path, rng):
    a, b = _emb_follower(tmp_path, rng)
    with Replica.open(a) as r:
        r.commit({"emb": (np.arange(8192), rng.standard_normal((8192, 32)).astype(np.float32))})
        target = r.head
    proc = run_cli("sync", a, b, "--max-bytes", "256K", "--chunk-bytes", "32K", "--json")
    assert proc.returncode == 1, proc.stderr
    data = json.loads(proc.stdout)
    status = _json("status", b)
    assert data["pending_buckets"] > 0
    assert (data["pending_buckets"], data["pending_target"]) == (status["pending_buckets"], status["pending_target"])
    assert data["pending_target"] == target and status["head"] == data["head"]
    proc = run_cli("sync", a, b, "--max-bytes", "256K", "--chunk-bytes", "32K")
    assert proc.returncode == 1, proc.stderr
    buckets = _json("status", b)["pending_buckets"]
    words = f"partial sync to offset {target}: {buckets:,} buckets already applied"
    assert words in proc.stdout
    assert words in run_cli("status", b, check=True).stdout.replace("partial    sync", "partial sync")
    run_cli("sync", a, b, check=True)
    _same_tensors(a, b)


def test_status_reads_a_local_sources_head_now(tmp_path, rng):
    a, b = _emb_follower(tmp_path, rng, rows=512)
    assert _json("status", b)["lag_offsets"] == 0
    with Replica.open(a) as r:
        for _ in range(3):
            r.commit({"emb": (np.arange(5), rng.standard_normal((5, 32)).astype(np.float32))})
        head = r.head
        first_past = next(r.iter_summaries(0, head)).time
    time.sleep(0.05)
    status = _json("status", b)
    assert status["lag_live"] is True and status["source_head"] == head and status["lag_offsets"] == 3
    assert status["lag_as_of"] > status["last_sync"]
    assert status["lag_seconds"] >= 0.05 and status["lag_seconds"] <= time.time() - first_past + 0.01
    assert "3 offsets behind (source head 3, read now)" in run_cli("status", b, check=True).stdout
    run_cli("sync", a, b, check=True)
    status = _json("status", b)
    assert status["lag_live"] is True and status["lag_offsets"] == 0 and status["lag_seconds"] == 0.0
    # a source that cannot be read now: the figures are the last sync's, and say so
    with Replica.open(a) as r:
        r.commit({"emb": (np.arange(5), rng.standard_normal((5, 32)).astype(np.float32))})
    shutil.move(a, tmp_path / "moved")
    status = _json("status", b)
    assert status["lag_live"] is False and status["lag_as_of"] == status["last_sync"] and status["lag_note"]
    assert status["lag_offsets"] == 0 and status["source_head"] == head  # what the last sync saw, marked as such
    assert "as of the last sync" in run_cli("status", b, check=True).stdout


def test_a_remote_sources_lag_is_never_presented_as_current():
    from deltalog.lag import refresh

    recorded = {"head": 4, "model_id": "m", "source": "host:/srv/model", "source_head": 6, "lag_offsets": 2,
                "lag_seconds": 9.0, "last_sync": 100.0, "lag_as_of": 100.0, "lag_live": False}
    assert refresh(dict(recorded), now=200.0) == recorded  # not asked over the network, still marked stale


def test_a_message_cannot_break_or_restyle_the_log_table(replica):
    """Commit messages travel to every replica: log shows control characters as escapes and rich
    markup as text; --json keeps the message as written."""
    path, _states = replica
    message = "line1\nline2\x1b[31m [bold]not bold[/bold]"
    with Replica.open(path) as r:
        update = {"item_emb": (np.arange(2), np.full((2, r.info("item_emb").row_elems), 5.0, np.float32))}
        r.commit(update, message=message)
    proc = run_cli("log", path, "--limit", "1")
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout + proc.stderr
    assert "\x1b" not in text and "line1\\nline2\\x1b[31m [bold]not bold[/bold]" in text, text
    assert len([line for line in text.splitlines() if line.strip()]) == 2  # the header and one record
    assert json.loads(run_cli("log", path, "--limit", "1", "--json").stdout)["records"][0]["reason"] == message


def test_small_refusals_say_what_to_do(replica, tmp_path):
    path, _states = replica
    proc = run_cli("init", tmp_path / "new", "--from", tmp_path / "nothing.npz", "--model-id", "")
    assert proc.returncode == 2  # the checkpoint is missing too: click names the first problem
    np.savez(tmp_path / "m.npz", t=np.zeros((4, 2), np.float32))
    proc = run_cli("init", tmp_path / "new", "--from", tmp_path / "m.npz", "--model-id", "")
    assert proc.returncode == 2 and "--model-id" in proc.stderr and not (tmp_path / "new").exists()
    proc = run_cli("sync", path, tmp_path / "no" / "such" / "dir")
    assert proc.returncode == 3 and "mkdir -p" in proc.stderr, proc.stderr
    from deltalog.compact import compact

    with Replica.open(path) as r:
        compact(r, keep_records=2)
        oldest = r.oldest_offset
    proc = run_cli("log", path, "--since", "1")
    assert proc.returncode == 0 and f"records up to offset {oldest} are not kept here" in proc.stdout + proc.stderr
    assert "1 snapshot," in run_cli("verify", path).stdout + run_cli("verify", path).stderr


def test_init_refuses_a_model_holding_nan_unless_allowed(tmp_path):
    """As commit refuses such rows: a diverged run's checkpoint is no base to start from by accident."""
    bad = np.zeros((10, 4), np.float32)
    bad[3, 1], bad[7, 0] = np.nan, np.inf
    np.savez(tmp_path / "nan.npz", t=bad, ok=np.ones(3, np.float32))
    proc = run_cli("init", tmp_path / "r", "--from", tmp_path / "nan.npz", "--json")
    assert proc.returncode == 11 and not (tmp_path / "r").exists()
    err = json.loads(proc.stdout)["error"]
    assert "2 of its 10 rows" in err["message"] and "row 3" in err["message"] and "--allow-nonfinite" in err["hint"]
    assert run_cli("init", tmp_path / "r", "--from", tmp_path / "nan.npz", "--allow-nonfinite").returncode == 0


def test_tables_piped_to_a_file_carry_no_trailing_spaces(replica):
    """rich pads every cell of a table, the last column's too: piped output (a file, a diff, a
    grep) gets its lines trimmed."""
    path, _states = replica
    for args in (("log", path), ("status", path), ("diff", f"{path}@head~2", path)):
        proc = run_cli(*map(str, args))
        assert proc.returncode in (0, 1), proc.stderr
        lines = proc.stdout.splitlines()
        assert len(lines) > 2 and not [line for line in lines if line != line.rstrip()], (args, proc.stdout)
