"""Peak memory and wall time of one ``deltalog sync`` of N minutes of changes, A/B between two checkouts.

    .venv/bin/python bench/syncmem.py --size 0.25 --minutes 1 --repeat 3 [--base ../other-checkout]
    .venv/bin/python bench/syncmem.py --size 1 --minutes 3 --chunk-bytes 4M   # the partial-sync path

A (the workload of bench/run.py: ``--minutes`` simulated minutes of training
commits) is synced into a fresh copy of B (A before those commits) once per
run, by each deltalog in turn (this checkout's, then ``--base``'s, so both
see the same machine load), over two transports:

- ``local``: ``deltalog sync A B`` in one process (sender and receiver together);
- ``pipe``: ``deltalog sync A pipe:B`` through a stand-in for ssh that runs the
  far side's ``deltalog serve --stdio`` as a local child (no sshd, no
  encryption), so the receiver's peak is measured on its own.

Peak anon is bench/peakrss.py's (the sum of RssAnon over a process tree,
polled): for ``pipe`` the whole tree (both ends) and the receiver's own;
"+" subtracts an idle interpreter with deltalog's modules.
Medians of ``--repeat`` runs are printed, and the raw runs to ``--json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import workload  # noqa: E402

PEAKRSS = [sys.executable, "-I", "-S", os.path.join(HERE, "peakrss.py")]
MiB = 1 << 20

# ssh as deltalog calls it: ssh [-T] [-o OPT]... HOST REMOTE-COMMAND; run REMOTE-COMMAND here.
FAKE_SSH = r"""
import os, sys
args = sys.argv[1:]
while args and args[0].startswith("-"):
    flag = args.pop(0)
    if flag in ("-o", "-p", "-E", "-i", "-l"):
        args.pop(0)
os.execvp("sh", ["sh", "-c", " ".join(args[1:])])
"""


def cli_of(checkout: str) -> list[str]:
    py = os.path.join(checkout, ".venv", "bin", "python")
    return [py, "-m", "deltalog"]


def peak(out: str, argv: list[str]) -> tuple[dict, str]:
    proc = subprocess.run([*PEAKRSS, out, "--", *argv], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{shlex.join(argv)} exited {proc.returncode}: {proc.stderr[-2000:]}")
    with open(out) as f:
        return json.load(f), proc.stdout


def idle_anon(checkout: str, work: str) -> int:
    code = ("import deltalog.cli, deltalog.sync, deltalog.stdio_server, deltalog.transport.ssh, "
            "deltalog.transport.local, deltalog.replica, numpy, lmdb, zstandard, msgpack, xxhash")
    out = os.path.join(work, "idle.json")
    samples = [peak(out, [cli_of(checkout)[0], "-c", code])[0]["peak_anon_kib"] for _ in range(3)]
    return int(statistics.median(samples))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--size", type=float, default=0.25)
    p.add_argument("--minutes", type=int, default=1, help="simulated minutes of commits to sync")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--chunk-bytes", default=None,
                   help="sync's --chunk-bytes (e.g. 4M): several chunks, the partial-sync path (default: one chunk)")
    p.add_argument("--base", default=None, help="another checkout (with its .venv) to compare against")
    p.add_argument("--transports", default="local,pipe")
    p.add_argument("--work", default=os.path.join(HERE, "work", "syncmem"))
    p.add_argument("--json", default=None, help="write the raw runs here")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep", action="store_true",
                   help="leave the work dir (A, B's copy, the fake ssh) for another run with --reuse")
    p.add_argument("--reuse", action="store_true",
                   help="run on the work dir a --keep run left (same --size, --minutes, --seed), not a new one; "
                        "it is left in place again")
    args = p.parse_args()

    work = os.path.abspath(args.work)
    a, b0, b = (os.path.join(work, n) for n in ("a", "b0", "b"))
    specs = workload.model_spec(args.size)
    made = {"size": args.size, "minutes": args.minutes, "seed": args.seed}
    made_path = os.path.join(work, "made.json")
    if args.reuse:
        try:
            with open(made_path) as f:
                kept = json.load(f)
        except OSError:
            sys.exit(f"syncmem: nothing to reuse in {work}: run once with --keep first")
        if {k: kept.get(k) for k in made} != made:
            sys.exit(f"syncmem: {work} holds a run of {kept}, not {made}: run with --keep again")
        changed_bytes = kept["changed_bytes"]
    else:
        shutil.rmtree(work, ignore_errors=True)
        os.makedirs(work)
        changed_bytes = make_pair(a, b0, specs, args.minutes, args.seed)
        with open(made_path, "w") as f:
            json.dump({**made, "changed_bytes": changed_bytes}, f)
    model_bytes = sum(s.nbytes for s in specs)
    print(f"model {model_bytes / MiB:.1f} MiB, {args.minutes} minute(s) of commits: "
          f"{changed_bytes / MiB:.2f} MiB of rows changed", flush=True)
    fake_ssh = os.path.join(work, "fakessh.py")
    with open(fake_ssh, "w") as f:
        f.write(FAKE_SSH)

    variants = {"new": os.path.dirname(HERE)}
    if args.base:
        variants["base"] = os.path.abspath(args.base)
    idle = {name: idle_anon(path, work) for name, path in variants.items()}
    runs: list[dict] = []
    for i in range(args.repeat):
        for transport in args.transports.split(","):
            for name, path in (list(variants.items()) if i % 2 == 0 else list(variants.items())[::-1]):
                shutil.rmtree(b, ignore_errors=True)
                shutil.copytree(b0, b)
                cli = cli_of(path)
                local_out, remote_out = os.path.join(work, "local.json"), os.path.join(work, "remote.json")
                chunking = ["--chunk-bytes", args.chunk_bytes] if args.chunk_bytes else []
                if transport == "local":
                    argv = [*cli, "sync", a, b, "--json", *chunking]
                else:
                    remote = shlex.join([*PEAKRSS, remote_out, "--", *cli])
                    argv = [*cli, "sync", a, f"localhost:{b}", "--json", *chunking, "--ssh-command",
                            shlex.join([sys.executable, fake_ssh]), "--remote-deltalog", remote]
                subprocess.run(["sync"])  # the copy's dirty pages out of the way
                time.sleep(0.2)
                res, stdout = peak(local_out, argv)
                out = json.loads(stdout.strip().splitlines()[-1])
                assert out["complete"] and (out["chunks"] == 1 or args.chunk_bytes), out
                run = {"variant": name, "transport": transport, "seconds": res["seconds"], "chunks": out["chunks"],
                       "cpu_seconds": res["user_seconds"] + res["system_seconds"],  # the tree's, far end included
                       "sync_seconds": out["seconds"], "sender_anon_kib": res["peak_anon_kib"]}  # the whole tree
                if transport != "local":
                    with open(remote_out) as f:
                        run["receiver_anon_kib"] = json.load(f)["peak_anon_kib"]
                runs.append(run)
                print(json.dumps(run), flush=True)
    print(f"\nchanged {changed_bytes / MiB:.2f} MiB; idle interpreter anon: "
          + ", ".join(f"{k} {v / 1024:.1f} MiB" for k, v in idle.items()))
    for transport in args.transports.split(","):
        for name in variants:
            rs = [r for r in runs if r["variant"] == name and r["transport"] == transport]
            med = lambda k: statistics.median(r[k] for r in rs)  # noqa: E731
            line = (f"{transport:5s} {name:4s}: wall {med('seconds'):.3f} s (sync {med('sync_seconds'):.3f} s, "
                    f"CPU {med('cpu_seconds'):.3f} s), "
                    f"peak anon {'process' if transport == 'local' else 'whole tree'} {med('sender_anon_kib') / 1024:.1f} MiB "
                    f"(+{(med('sender_anon_kib') - idle[name]) / 1024:.1f})")
            if transport != "local":
                line += (f", receiver {med('receiver_anon_kib') / 1024:.1f} MiB "
                         f"(+{(med('receiver_anon_kib') - idle[name]) / 1024:.1f})")
            print(line)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "changed_bytes": changed_bytes, "idle_anon_kib": idle, "runs": runs}, f)
    if args.keep or args.reuse:
        print(f"kept {work} (--reuse runs on it; delete it well before timing anything: bench/README.md)")
    else:
        shutil.rmtree(work, ignore_errors=True)


def make_pair(a: str, b0: str, specs, minutes: int, seed: int) -> int:
    """A at the end of ``minutes`` of the bench workload's commits, B0 a copy of A before them;
    returns the bytes of the rows they changed."""
    from deltalog import Replica

    row_bytes = {s.name: s.row_bytes for s in specs}
    ra = Replica.init(a, workload.make_model(specs, seed=seed), bucket_rows=1024, model_id="deltalog-bench")
    shutil.copytree(a, b0)  # a follower at A's first offset
    stream = workload.Stream(specs, seed=seed + 1)
    changed: dict[str, list[np.ndarray]] = {}
    for _ in range(minutes * 12):
        updates = stream.step(lambda name, rows: np.array(ra.rows_view(name)[rows]))
        ra.commit(updates)
        for name, (rows, _v) in updates.items():
            changed.setdefault(name, []).append(rows)
    ra.close()
    return sum(len(np.unique(np.concatenate(v))) * row_bytes[k] for k, v in changed.items())


if __name__ == "__main__":
    main()
