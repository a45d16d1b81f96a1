"""Worker processes of the update-latency measurement (started by bench/run.py).

    python bench/latency.py syncloop SRC DST STOPFILE OUT.json [--interval S] [--ssh-command CMD] [--remote-deltalog CMD]
    python bench/latency.py watch REPLICA TENSOR ROW STOPFILE OUT.json [--poll S]

``syncloop`` runs ``deltalog sync SRC DST`` in a loop, in-process (the
library call of the command, no interpreter start per run), sleeping
``interval`` only when a run moved nothing. ``watch`` polls one row of
REPLICA and records, for every probe value it sees appear, the
``time.monotonic()`` (one clock for every process of the machine) at which it
first saw it. Both stop when STOPFILE exists and then write OUT.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def syncloop(args) -> None:
    from deltalog.errors import DeltalogError
    from deltalog.sync import sync
    from deltalog.transport import TransportOptions, open_sink, open_source

    options = TransportOptions(ssh_command=args.ssh_command, remote_deltalog=args.remote_deltalog)
    src_name = args.src if ":" in args.src else os.path.abspath(args.src)
    dst_name = args.dst if ":" in args.dst else os.path.abspath(args.dst)
    runs = moved = errors = 0
    seconds: list[float] = []
    last_error = None
    while not os.path.exists(args.stop):
        started = time.monotonic()
        try:
            source = open_source(args.src, options)
            try:
                sink = open_sink(args.dst, options)
                try:
                    result = sync(source, sink, source_name=src_name, destination_name=dst_name, wait=10.0)
                finally:
                    sink.close()
            finally:
                source.close()
        except DeltalogError as exc:  # e.g. a transient lock; counted and reported
            errors += 1
            last_error = f"{type(exc).__name__}: {exc}"
            time.sleep(args.interval)
            continue
        runs += 1
        if result.rows_sent or result.snapshot_offset is not None:
            moved += 1
            seconds.append(time.monotonic() - started)
        else:
            time.sleep(args.interval)
    with open(args.out, "w") as f:
        json.dump({"runs": runs, "runs_that_moved": moved, "errors": errors, "last_error": last_error,
                   "seconds_of_moving_runs": seconds}, f)


def watch(args) -> None:
    import numpy as np

    from deltalog import Replica

    seen: dict[int, float] = {}
    last = 0
    row = np.array([args.row])
    polls = 0
    with Replica.open(args.replica) as replica:
        while not os.path.exists(args.stop):
            _head, values = replica.read_rows(args.tensor, row)
            now = time.monotonic()
            polls += 1
            value = float(values.reshape(-1)[0])
            if value >= last + 1 and value == int(value):
                for seq in range(last + 1, int(value) + 1):
                    seen[seq] = now
                last = int(value)
            time.sleep(args.poll)
    with open(args.out, "w") as f:
        json.dump({"seen": seen, "polls": polls}, f)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("syncloop")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("stop")
    p.add_argument("out")
    p.add_argument("--interval", type=float, default=0.02)
    p.add_argument("--ssh-command", default="ssh")
    p.add_argument("--remote-deltalog", default="deltalog")
    p = sub.add_parser("watch")
    p.add_argument("replica")
    p.add_argument("tensor")
    p.add_argument("row", type=int)
    p.add_argument("stop")
    p.add_argument("out")
    p.add_argument("--poll", type=float, default=0.001)
    args = parser.parse_args()
    {"syncloop": syncloop, "watch": watch}[args.what](args)


if __name__ == "__main__":
    sys.exit(main())
