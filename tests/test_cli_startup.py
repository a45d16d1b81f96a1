"""What the `deltalog` command imports before it does its work (start-up time, issue 15).

Each test runs the real entry point in a fresh interpreter and records
``sys.modules`` at exit: which modules a command loads is deterministic,
where its start-up time is not.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np

from deltalog import Replica

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
