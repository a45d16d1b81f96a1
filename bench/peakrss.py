"""Run a command and record the peak memory of its whole process tree.

    python bench/peakrss.py OUT.json -- COMMAND [ARGS...]

The command inherits stdin, stdout and stderr (so it can sit at the far end
of an ssh pipe, as ``--remote-deltalog`` / ``--rsync-path`` of the benchmark
put it). Two numbers are written to OUT.json, as JSON, when it exits:

- ``maxrss_kib``: ``ru_maxrss`` from ``wait4``, what GNU ``time -f %M``
  reports: the largest resident set of one process of the tree, counting
  the pages of memory-mapped files it touched;
- ``peak_anon_kib`` / ``peak_rss_kib``: the peak over time of the sum, over
  the tree, of RssAnon (private memory: buffers, arrays) and of VmRSS,
  polled from /proc every ``PEAKRSS_INTERVAL`` seconds (default 0.005).

Anonymous memory is what a model-sized allocation would show up in; mapped
file pages are page cache the kernel can drop. Only the standard library,
so ``python -I -S`` starts it in a few milliseconds.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time


def _children(pid: int) -> list[int]:
    out = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{tid}/children") as f:
                    out.extend(int(c) for c in f.read().split())
            except OSError:
                pass
    except OSError:
        pass
    return out


def _tree(pid: int) -> list[int]:
    seen, todo = [], [pid]
    while todo:
        p = todo.pop()
        seen.append(p)
        todo.extend(_children(p))
    return seen


def _rss(pid: int) -> tuple[int, int]:
    """(RssAnon, VmRSS) in KiB; (0, 0) for a process that is gone."""
    anon = total = 0
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    anon = int(line.split()[1])
                elif line.startswith("VmRSS:"):
                    total = int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return anon, total


def main() -> int:
    argv = sys.argv[1:]
    if len(argv) < 3 or argv[1] != "--":
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        return 2
    out, command = argv[0], argv[2:]
    interval = float(os.environ.get("PEAKRSS_INTERVAL", "0.005"))
    started = time.monotonic()
    proc = subprocess.Popen(command)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda s, _f: proc.send_signal(s))
    peak = {"anon": 0, "rss": 0}
    done = threading.Event()

    def poll() -> None:
        while not done.is_set():
            anon = total = 0
            for pid in _tree(proc.pid):
                a, t = _rss(pid)
                anon += a
                total += t
            peak["anon"] = max(peak["anon"], anon)
            peak["rss"] = max(peak["rss"], total)
            done.wait(interval)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    while True:
        try:
            _pid, status, usage = os.wait4(proc.pid, 0)
            break
        except InterruptedError:
            continue
    done.set()
    poller.join()
    code = os.waitstatus_to_exitcode(status)
    proc.returncode = code
    result = {
        "command": command,
        "exit_code": code,
        "seconds": round(time.monotonic() - started, 6),
        "maxrss_kib": usage.ru_maxrss,
        "peak_anon_kib": peak["anon"],
        "peak_rss_kib": peak["rss"],
        "user_seconds": usage.ru_utime,
        "system_seconds": usage.ru_stime,
    }
    with open(out, "w") as f:
        json.dump(result, f)
    return code if code >= 0 else 128 - code


if __name__ == "__main__":
    sys.exit(main())
