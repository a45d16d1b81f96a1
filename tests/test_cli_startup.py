"""What the `deltalog` command imports before it does its work, and how it ends (issue 15).

Each test runs the real entry point in a fresh interpreter and records
``sys.modules`` at exit, or whether the collector ran while loading and the
interpreter's teardown at exit: which modules a command loads and how it
exits are deterministic, where its start-up time is not.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from deltalog import Replica

from conftest import DELTALOG

HEAVY = ("numpy", "lmdb", "zstandard", "msgpack", "xxhash", "rich")

PROBE = """
import atexit, json, sys
from deltalog.cli import main
out, sys.argv = sys.argv[1], ["deltalog", *sys.argv[2:]]
atexit.register(lambda: open(out, "w").write(json.dumps(sorted(sys.modules))))
main()
"""


def modules_loaded(tmp_path, *args: str) -> set[str]:
    out = tmp_path / "modules.json"
    proc = subprocess.run([sys.executable, "-c", PROBE, str(out), *map(str, args)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode in (0, 1), proc.stderr
    return set(json.loads(out.read_text()))


def commands_loaded(modules: set[str]) -> set[str]:
    return {m.rsplit(".", 1)[1] for m in modules if m.startswith("deltalog.cli.") and m.endswith("_cmd")}


def replica(tmp_path) -> str:
    path = tmp_path / "r"
    rng = np.random.default_rng(0)
    with Replica.init(path, {"emb": rng.standard_normal((64, 4)).astype(np.float32)}, bucket_rows=16) as r:
        r.commit({"emb": ([1, 5], np.ones((2, 4), np.float32))})
    return str(path)


def test_help_loads_no_heavy_module(tmp_path):
    modules = modules_loaded(tmp_path, "--help")
    assert not {m.split(".")[0] for m in modules} & set(HEAVY)
    assert "ctypes" not in modules  # a command bounds its heap (deltalog.heap) when it is resolved, help does not
    assert "status_cmd" in commands_loaded(modules)  # the listing needs every command's help


def test_a_command_loads_only_its_own_module(tmp_path):
    modules = modules_loaded(tmp_path, "status", replica(tmp_path), "--json")
    assert commands_loaded(modules) == {"status_cmd"}
    assert "rich" not in {m.split(".")[0] for m in modules}  # JSON output renders nothing


def test_a_diff_of_replicas_does_not_load_the_checkpoint_readers(tmp_path):
    path = replica(tmp_path)
    modules = modules_loaded(tmp_path, "diff", f"{path}@0", path, "--json")
    assert commands_loaded(modules) == {"diff_cmd"}
    assert "deltalog.checkpoint" not in modules and "zipfile" not in modules


def test_reading_commands_do_not_load_what_only_writers_need(tmp_path):
    # shutil (with bz2 and lzma) removes and copies directories; getpass and socket name a record's
    # user and host: ~5 ms of imports that diff, status and log never use.
    path = replica(tmp_path)
    for args in (["diff", f"{path}@0", path, "--json"], ["status", path, "--json"], ["log", path, "--json"]):
        modules = modules_loaded(tmp_path, *args)
        assert not {"shutil", "bz2", "lzma", "getpass", "socket"} & modules, args


BLAS_PROBE = """
import atexit, json, os, sys
seen = {}

def watch(event, args):  # the environment at the moment numpy's core (and its OpenBLAS) loads
    if event == "import" and args[0].endswith("._multiarray_umath") and "load" not in seen:
        seen["load"] = os.environ.get("OPENBLAS_NUM_THREADS")

sys.addaudithook(watch)
from deltalog.cli import main
out, sys.argv = sys.argv[1], ["deltalog", *sys.argv[2:]]
atexit.register(lambda: open(out, "w").write(json.dumps({**seen, "exit": os.environ.get("OPENBLAS_NUM_THREADS")})))
main()
"""


def blas_threads_seen(tmp_path, env: dict, *args: str) -> dict:
    out = tmp_path / "blas.json"
    environ = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
    proc = subprocess.run([sys.executable, "-c", BLAS_PROBE, str(out), *args], capture_output=True, text=True,
                          env={**environ, **env}, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(out.read_text())


def test_numpy_loads_single_threaded_blas_and_children_get_the_users_environment(tmp_path):
    path = replica(tmp_path)
    assert blas_threads_seen(tmp_path, {}, "status", path, "--json") == {"load": "1", "exit": None}
    mine = blas_threads_seen(tmp_path, {"OPENBLAS_NUM_THREADS": "3"}, "status", path, "--json")
    assert mine == {"load": "3", "exit": "3"}  # the user's setting wins


# The process entry point (the `deltalog` script, `python -m deltalog`): a short command (diff, status,
# log, commit, rollback) runs with the cyclic collector off and ends without the interpreter's
# teardown; any other command keeps both.
ENTRY_PROBE = """
import atexit, gc, json, runpy, sys
out, how, sys.argv = sys.argv[1], sys.argv[2], ["deltalog", *sys.argv[3:]]
seen = {}

def watch(event, args):  # the collector's state while the library loads
    if event == "import" and args[0] == "deltalog.replica" and "gc_while_loading" not in seen:
        seen["gc_while_loading"] = gc.isenabled()
        open(out, "w").write(json.dumps(seen))

sys.addaudithook(watch)
atexit.register(lambda: sys.stderr.write("teardown ran\\n"))
if how == "script":
    from deltalog.cli import entry
    entry()
else:
    runpy.run_module("deltalog", run_name="__main__")
"""


def run_entry(tmp_path, how: str, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "entry.json"
    out.unlink(missing_ok=True)
    proc = subprocess.run([sys.executable, "-c", ENTRY_PROBE, str(out), how, *map(str, args)],
                          capture_output=True, text=True, timeout=120)
    return proc, (json.loads(out.read_text()) if out.exists() else {})


def test_the_console_script_is_the_process_entry_point():
    import tomllib

    pyproject = os.path.join(os.path.dirname(__file__), "..", "pyproject.toml")
    with open(pyproject, "rb") as f:
        assert tomllib.load(f)["project"]["scripts"]["deltalog"] == "deltalog.cli:entry"


@pytest.mark.parametrize("how", ["script", "python -m"])
def test_a_short_command_skips_the_teardown_and_keeps_its_exit_code_and_output(tmp_path, how):
    path = replica(tmp_path)
    proc, seen = run_entry(tmp_path, how, "diff", f"{path}@0", path, "--json")
    assert proc.returncode == 1, proc.stderr  # different: like diff(1)
    assert json.loads(proc.stdout)["changed_rows"] == 2  # the whole output, flushed before the exit
    assert "teardown ran" not in proc.stderr
    assert seen == {"gc_while_loading": False}


def test_a_short_command_that_fails_still_says_why_with_its_exit_code(tmp_path):
    proc, _seen = run_entry(tmp_path, "script", "log", tmp_path / "nothing-here", "--json")
    assert proc.returncode == 3, proc.stderr  # not a replica
    assert json.loads(proc.stdout)["error"]["exit_code"] == 3
    assert proc.stderr.startswith("deltalog: error: ") and "teardown ran" not in proc.stderr


def test_a_rollback_that_skips_the_teardown_is_durable_and_whole(tmp_path):
    path = replica(tmp_path)
    proc, seen = run_entry(tmp_path, "script", "rollback", path, "--to", "0", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["offset"] == 2
    assert "teardown ran" not in proc.stderr and seen == {"gc_while_loading": False}
    with Replica.open(path) as r:  # what the process wrote before its quick exit is all there
        initial = np.random.default_rng(0).standard_normal((64, 4)).astype(np.float32)  # as replica() made it
        assert r.head == 2 and np.array_equal(r.rows_view("emb"), initial)
    verified = subprocess.run([*DELTALOG, "verify", path, "--json"], capture_output=True, text=True, timeout=120)
    assert verified.returncode == 0, verified.stdout + verified.stderr


def test_a_long_command_keeps_the_collector_and_the_ordinary_exit(tmp_path):
    path = replica(tmp_path)
    proc, seen = run_entry(tmp_path, "script", "verify", path, "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["ok"] is True
    assert "teardown ran" in proc.stderr
    assert seen == {"gc_while_loading": True}


def test_sync_and_its_far_end_keep_the_collector_but_end_without_the_teardown(tmp_path):
    """Both may run long (--follow), so they collect cycles; both close everything before they
    return, and the far end's teardown was time its client waited for after the goodbye."""
    from deltalog import wire

    path = replica(tmp_path)
    proc, seen = run_entry(tmp_path, "script", "sync", path, tmp_path / "copy", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["to_offset"] == 1
    assert "teardown ran" not in proc.stderr and seen == {"gc_while_loading": True}
    with Replica.open(tmp_path / "copy") as r:  # what it wrote before it ended is all there
        assert r.head == 1 and np.array_equal(r.rows_view("emb")[[1, 5]], np.ones((2, 4), np.float32))

    out = tmp_path / "entry.json"
    out.unlink()
    server = subprocess.Popen([sys.executable, "-c", ENTRY_PROBE, str(out), "script", "serve", "--stdio", path],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wire.write_frame(server.stdin, wire.hello_request("source"))
    assert wire.read_frame(server.stdout)[0]["type"] == "hello"
    wire.write_frame(server.stdin, {"type": "bye"})
    assert wire.read_frame(server.stdout)[0]["type"] == "bye"
    _, err = server.communicate(timeout=60)
    assert server.returncode == 0 and b"teardown ran" not in err
    assert json.loads(out.read_text()) == {"gc_while_loading": True}
