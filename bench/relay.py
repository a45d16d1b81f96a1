"""The object-store relay under a fleet: one publisher, N pullers at once (issue 14).

    .venv/bin/python bench/relay.py                      # 0.1 GiB model, 16 pullers, a real S3 API (moto) on 127.0.0.1
    .venv/bin/python bench/relay.py --size 1 --store file

What it measures, and the baseline each figure is set against:
- the time until all N pullers, each one simulated minute behind, are at the
  head (N real ``deltalog sync URL DST`` processes at once), against N full
  copies of the model's files (cp) one after another and at once;
- bytes fetched per replica, against the model's size (what a full copy moves);
- segment objects fetched by one sync for a replica 1 minute and 1 hour
  behind, against the per-publish segments that span the same range.

Time is simulated for the publisher (one publish per training step,
``--steps-per-minute`` steps a minute, the relay's default levels of 60 s and
3600 s): an hour of publishing runs in a few minutes without changing what
the relay writes. Scratch data goes to bench/work/relay/ and is deleted.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import workload  # noqa: E402

from deltalog import Replica  # noqa: E402
from deltalog import relay as relay_mod  # noqa: E402
from deltalog.objstore import ObjectStore  # noqa: E402


_real_monotonic = time.monotonic


class FakeClock:
    """The relay's clock: simulated seconds for the publisher, real monotonic time."""

    def __init__(self) -> None:
        self.now = 1.7e9

    def time(self) -> float:
        return self.now

    @staticmethod
    def monotonic() -> float:
        return _real_monotonic()


def start_moto() -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            urllib.request.urlopen(endpoint + "/moto-api/", timeout=1)
            break
        except OSError:
            time.sleep(0.1)
    os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ALLOW_HTTP="true", AWS_ACCESS_KEY_ID="bench",
                      AWS_SECRET_ACCESS_KEY="bench", AWS_REGION="us-east-1")
    urllib.request.urlopen(urllib.request.Request(f"{endpoint}/bench", method="PUT"))
    return proc, "s3://bench/model"


def segments_fetched(url: str, dst: str) -> tuple[int, dict]:
    """Pull ``url`` into ``dst`` in-process, counting the segment objects read."""
    from deltalog.sync import sync
    from deltalog.transport import open_sink, open_source

    seen = []
    real = ObjectStore.get

    def counting(self, key):
        seen.append(key)
        return real(self, key)

    ObjectStore.get = counting
    try:
        src, sink = open_source(url), open_sink(dst)
        try:
            result = sync(src, sink, source_name=url, destination_name=dst)
        finally:
            sink.close()
    finally:
        ObjectStore.get = real
    return len([k for k in seen if k.startswith("segments/")]), result.to_json()


def du(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=float, default=0.1, help="GiB of embeddings (bench/workload.py)")
    ap.add_argument("--pullers", type=int, default=16)
    ap.add_argument("--store", choices=("s3", "file"), default="s3")
    ap.add_argument("--steps-per-minute", type=int, default=12)
    ap.add_argument("--hours", type=float, default=1.0, help="simulated publishing time")
    args = ap.parse_args()

    work = os.path.join(HERE, "work", "relay")
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    moto = None
    try:
        if args.store == "s3":
            moto, url = start_moto()
        else:
            url = f"file://{work}/relay"
        clock = FakeClock()
        relay_mod.time = clock  # the publisher's clock only: levels and retention follow simulated time
        specs = workload.model_spec(args.size)
        model = workload.make_model(specs)
        stream = workload.Stream(specs, steps_per_minute=args.steps_per_minute)
        primary = os.path.join(work, "primary")
        store = ObjectStore(url)
        step_seconds = 60.0 / args.steps_per_minute
        steps = int(args.hours * 60 * args.steps_per_minute)
        marks = {"hour": 0, "minute": steps - args.steps_per_minute}
        holders = {}
        t0 = time.monotonic()
        with Replica.init(primary, model, bucket_rows=1024, model_id="bench-relay") as r:
            model_bytes = du(os.path.join(primary, "tensors"))
            relay_mod.publish(r, store, primary)
            for step in range(steps):
                for name, offset in marks.items():
                    if step == offset:  # a replica standing here now, to be pulled later
                        holders[name] = os.path.join(work, f"behind-{name}")
                        segments_fetched(url, holders[name])
                r.commit(stream.step(lambda n, rows: r.tensor(n)[rows]))
                clock.now += step_seconds
                relay_mod.publish(r, store, primary)
            head = r.head
        publish_s = time.monotonic() - t0
        head_obj, _ = relay_mod.read_head(store)
        levels = {lvl: sum(1 for s in head_obj["segments"] if s["level"] == lvl) for lvl in (1, 2, 3)}
        print(f"model {model_bytes / 2**20:.1f} MiB on disk, {steps} publishes ({args.hours:g} simulated hours) "
              f"in {publish_s:.1f} s; head {head}; segments in the head by level {levels}")

        results = {}
        for name in ("minute", "hour"):
            per_publish = sum(1 for s in range(marks[name], steps))
            dst = holders[name]
            n, res = segments_fetched(url, dst)
            results[name] = {"segments": n, "per_publish_segments": per_publish, "bytes": res["bytes_sent"]}
            label = "1 minute" if name == "minute" else f"{args.hours:g} hours"
            print(f"replica {label} behind: {n} segment objects fetched (vs {per_publish} per-publish segments "
                  f"over the same range), {res['bytes_sent'] / 2**20:.2f} MiB")

        # The honest fleet test: N replicas created from the relay at once (snapshot + segments), then N
        # syncs at once after one more simulated minute of publishing.
        dsts = [os.path.join(work, f"puller{i}") for i in range(args.pullers)]
        t = time.monotonic()
        procs = [subprocess.Popen([sys.executable, "-m", "deltalog", "sync", url, d, "--json", "--quiet"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for d in dsts]
        outs = [p.communicate() for p in procs]
        fill_s = time.monotonic() - t
        bad = [e for (o, e), p in zip(outs, procs) if p.returncode != 0]
        if bad:
            sys.exit(f"a puller failed: {bad[0]}")
        fill_bytes = [json.loads(o)["bytes_sent"] for o, _ in outs]
        with Replica.open(primary) as r:
            for _ in range(args.steps_per_minute):
                r.commit(stream.step(lambda n, rows: r.tensor(n)[rows]))
                clock.now += step_seconds
                relay_mod.publish(r, store, primary)
            head = r.head
        t = time.monotonic()
        procs = [subprocess.Popen([sys.executable, "-m", "deltalog", "sync", url, d, "--json", "--quiet"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for d in dsts]
        outs = [p.communicate() for p in procs]
        minute_s = time.monotonic() - t
        minute_bytes = [json.loads(o)["bytes_sent"] for o, _ in outs]
        assert all(json.loads(o)["head"] == head for o, _ in outs)

        t = time.monotonic()
        for i in range(args.pullers):
            shutil.copytree(os.path.join(primary, "tensors"), os.path.join(work, f"cp{i}"))
        cp_s = time.monotonic() - t
        print(f"{args.pullers} pullers at once, new (snapshot + log): all at the head in {fill_s:.2f} s, "
              f"{sum(fill_bytes) / len(fill_bytes) / 2**20:.1f} MiB each")
        print(f"{args.pullers} pullers at once, 1 minute behind: all at the head in {minute_s:.2f} s, "
              f"{sum(minute_bytes) / len(minute_bytes) / 2**20:.2f} MiB each = "
              f"{sum(minute_bytes) / len(minute_bytes) / model_bytes:.3f} of a full copy; "
              f"{args.pullers} full copies (cp -r, one after another): {cp_s:.2f} s "
              f"(ratio {minute_s / cp_s:.2f})")
    finally:
        if moto is not None:
            moto.terminate()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
