"""The deltalog command keeps glibc from holding on to the arrays it freed (deltalog.heap).

glibc adapts its thresholds to the largest array freed so far: after one of
24 MiB, a 20 MiB array comes from the heap, and freed it stays there (up to
twice that size is kept). A sync destination held 30-50 MiB of such freed
arrays at its peak. Each probe runs in a fresh interpreter: the thresholds
are process-wide, and glibc's adaptation cannot be undone.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from deltalog import Replica

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc and /proc/self/status")

RETAINED_PROBE = """
import sys
import numpy as np
from deltalog import heap

def anon_mib():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssAnon")) / 1024

if sys.argv[1] == "bound":
    heap.bound_retention()
big = np.ones(24 << 20, np.uint8); del big  # glibc, left to adapt, raises its thresholds to 24 MiB here
before = anon_mib()
array = np.ones(20 << 20, np.uint8); del array  # from the heap then, and kept there
print(anon_mib() - before)
"""


def retained_mib(mode: str) -> float:
    # glibc's own defaults: a MALLOC_* variable or a tunable in the caller's environment would
    # fix the thresholds before the probe does (or instead of it).
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    out = subprocess.run([sys.executable, "-c", RETAINED_PROBE, mode], check=True, capture_output=True, text=True,
                         timeout=120, env=env).stdout
    return float(out)


def test_a_bounded_process_gives_a_freed_array_back():
    assert retained_mib("bound") < 4


def test_left_to_adapt_glibc_keeps_it():
    """The premise of the test above: without the bound, the same freed array stays."""
    assert retained_mib("adaptive") > 16


ENTRY_PROBE = """
import json, sys
from deltalog import heap
out, sys.argv = sys.argv[1], ["deltalog", *sys.argv[2:]]
bound = heap.bound_retention

def record():
    bound()
    with open(out, "w") as f:
        json.dump({"ctypes_loaded_before": "ctypes" in sys.modules}, f)

heap.bound_retention = record
from deltalog.cli import entry
entry()
"""


def test_the_command_bounds_its_heap_before_it_runs(tmp_path):
    path = tmp_path / "r"
    with Replica.init(path, {"emb": np.zeros((8, 4), np.float32)}):
        pass
    out = tmp_path / "bound.json"
    proc = subprocess.run([sys.executable, "-c", ENTRY_PROBE, str(out), "status", str(path), "--json"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["head"] == 0
    assert out.exists(), "deltalog status ran without bounding its heap"

