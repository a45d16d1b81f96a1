"""The watcher process of the update-latency measurement (started by bench/run.py).

    python bench/latency.py watch REPLICA TENSOR ROW STOPFILE OUT.json [--poll S]

``watch`` polls one row of REPLICA (the leaf of the A -> B -> C chain of
``deltalog sync --follow`` processes) and records, for every probe value it
sees appear, the ``time.monotonic()`` (one clock for every process of the
machine) at which it first saw it. Probe values are the integers 1, 2, 3 ...
committed in that order at the root; a row holds only its newest value, so
when a sync round brings several probes at once, the ones it superseded are
recorded as seen at that same moment. It writes OUT.json.ready once it
watches, stops when STOPFILE exists, and then writes OUT.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def watch(args) -> None:
    import numpy as np

    from deltalog import Replica

    seen: dict[int, float] = {}
    last = 0
    row = np.array([args.row])
    polls = 0
    with Replica.open(args.replica) as replica:
        replica.read_rows(args.tensor, row)
        with open(args.out + ".ready", "w"):
            pass
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
    p = sub.add_parser("watch")
    p.add_argument("replica")
    p.add_argument("tensor")
    p.add_argument("row", type=int)
    p.add_argument("stop")
    p.add_argument("out")
    p.add_argument("--poll", type=float, default=0.001)
    args = parser.parse_args()
    {"watch": watch}[args.what](args)


if __name__ == "__main__":
    sys.exit(main())
