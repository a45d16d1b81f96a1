"""sync --follow: long-poll per transport, backoff, bwlimit, signals, and a tree of real followers.

The tree test runs real processes on 127.0.0.1: a root replica A written by
this test process, followers ``sync A B --follow`` and ``sync A C --follow``,
B served by ``serve-snapshot`` and followed over HTTP by D, C followed by E
through a local path. Every leaf must reach A's head with bitwise-equal
tensors and the same bucket versions (per-row versions carried through two
hops); a SIGKILLed and restarted middle node loses nothing; SIGTERM stops
every follower with exit 0 and a replica that verifies.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import zlib

import numpy as np
import pytest

from conftest import DELTALOG, assert_same, compact_as_before_past_digests, random_model, random_update, run_cli
from deltalog import Replica
from deltalog.errors import TransportError
from deltalog.follow import Backoff, Stopper, StopRequested, TokenBucket, follow
from deltalog.history import values_at
from deltalog.layout import MARKER
from deltalog.transport import TransportOptions, open_sink, open_source, parse_spec
from deltalog.verify import verify as verify_replica
from http_fixture import running_server
from sshd_fixture import sshd  # noqa: F401  (fixture)

INTERVAL = "0.5"


# -- helpers ------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def head_of(path) -> int | None:
    if not os.path.isfile(os.path.join(path, MARKER)):
        return None
    try:
        with Replica.open(path) as r:
            return r.head
    except Exception:  # noqa: BLE001 - not there yet, or being created
        return None


def wait_until(predicate, timeout: float, what: str, poll: float = 0.02, on_fail=None):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            detail = on_fail() if on_fail else ""
            raise AssertionError(f"timed out after {timeout} s waiting for {what}\n{detail}")
        time.sleep(poll)


class Follower:
    """A ``deltalog sync SRC DST --follow --json`` process; stdout/stderr go to files."""

    def __init__(self, tmp_path, name: str, src: str, dst: str, *extra: str):
        self.name = name
        self.out = tmp_path / f"{name}.out"
        self.err = tmp_path / f"{name}.err"
        self.args = [*DELTALOG, "sync", src, dst, "--follow", "--interval", INTERVAL, "--json", *extra]
        self.start()

    def start(self) -> None:
        with open(self.out, "ab") as out, open(self.err, "ab") as err:
            self.proc = subprocess.Popen(self.args, stdout=out, stderr=err, stdin=subprocess.DEVNULL)

    def events(self) -> list[dict]:
        return [json.loads(line) for line in self.out.read_text().splitlines() if line.strip()]

    def log(self) -> str:
        return f"--- {self.name} stderr:\n{self.err.read_text()[-3000:]}\n--- stdout tail:\n{self.out.read_text()[-1500:]}"

    def stop(self, sig=signal.SIGTERM, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(f"{self.name} did not stop within {timeout} s after {sig!r}\n{self.log()}")
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def bucket_versions(path) -> dict:
    with Replica.open(path) as r:
        return {t: {b: v for b, (v, _s) in r.bucket_index(t).items()} for t in r.tensor_names}


def assert_exact(root, leaf) -> None:
    """Same head, bitwise-equal tensors, same bucket versions, and the leaf verifies."""
    with Replica.open(root) as a, Replica.open(leaf) as b:
        assert b.head == a.head
        model = {name: a.read_tensor(name) for name in a.tensor_names}
        assert_same(b, model)
    assert bucket_versions(leaf) == bucket_versions(root)
    verified(leaf)


def verified(path) -> None:
    with Replica.open(path) as r:
        report = verify_replica(r, wait=10.0)
    assert report.ok, report.problems


def commit_stream(path, rng, model, n: int, pause: float = 0.0) -> int:
    with Replica.open(path) as r:
        for _ in range(n):
            update = random_update(rng, model, max_rows=6)
            if update:
                r.commit(update)
            if pause:
                time.sleep(pause)
        return r.head


# -- units: backoff, token bucket ------------------------------------------------------------


def test_backoff_grows_is_capped_and_jittered():
    b = Backoff(base=0.1, cap=2.0, factor=2.0, jitter=0.5, rng=random.Random(7))
    delays = [b.next_delay() for _ in range(10)]
    ceilings = [min(2.0, 0.1 * 2**i) for i in range(10)]
    for d, c in zip(delays, ceilings):
        assert c * 0.5 <= d <= c
    assert max(delays) <= 2.0 and delays[-1] >= 1.0  # capped, and still jittered near the cap
    assert len({round(d, 9) for d in delays[6:]}) > 1  # jitter: followers cut off together spread out
    b.reset()
    assert b.next_delay() <= 0.1
    none = Backoff(base=1.0, cap=8.0, jitter=0.0)
    assert [none.next_delay() for _ in range(5)] == [1.0, 2.0, 4.0, 8.0, 8.0]


def test_token_bucket_paces_across_rounds():
    now = [0.0]
    slept = []

    def sleep(s):
        slept.append(s)
        now[0] += s

    tb = TokenBucket(1000.0, burst=500.0, clock=lambda: now[0], sleep=sleep)
    assert tb.take(400) == pytest.approx(0.4)  # it starts empty: the first bytes wait their turn too
    now[0] += 0.3  # work between two takes (applying a chunk) earns credit...
    assert tb.take(300) == 0.0  # ...that the next one spends
    assert tb.take(400) == pytest.approx(0.4)
    assert tb.delay(100) == pytest.approx(0.1)
    now[0] += 10.0  # an idle spell between rounds buys one burst, not ten seconds' worth
    assert tb.take(500) == 0.0
    assert tb.take(1000) == pytest.approx(1.0)  # a chunk bigger than the burst: debt, paid by sleeping
    now[0] += 10.0
    tb.drain()  # a round starts: the idle spell buys nothing at all
    assert tb.take(500) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        TokenBucket(0)


def test_token_bucket_never_runs_ahead_of_its_rate():
    """Whatever the pieces and the pauses, bytes taken by the end of each take <= rate * time since the start."""
    now = [0.0]

    def sleep(s):
        now[0] += s

    rng = np.random.default_rng(5)
    tb = TokenBucket(2000.0, clock=lambda: now[0], sleep=sleep)
    assert tb.burst == 500.0  # a quarter second's worth: about one --bwlimit chunk
    taken = 0
    for _ in range(300):
        n = int(rng.integers(1, 3000))
        now[0] += float(rng.choice([0.0, 0.01, 0.5]))  # work between pieces, sometimes long
        tb.take(n)
        taken += n
        assert taken <= 2000.0 * now[0] + 1e-6
    start, total = now[0], 0
    tb.drain()
    for _ in range(200):  # back to back: exactly the rate
        tb.take(100)
        total += 100
    assert now[0] - start == pytest.approx(total / 2000.0)


def test_bwlimit_throttles_a_sync(tmp_path, rng):
    from deltalog.sync import sync

    a = tmp_path / "a"
    base = {"emb": rng.standard_normal((4096, 16)).astype(np.float32)}
    Replica.init(a, base, bucket_rows=64).close()
    run_cli("sync", a, tmp_path / "b", check=True)
    with Replica.open(a) as r:
        r.commit({"emb": (np.arange(4096), rng.standard_normal((4096, 16)).astype(np.float32))})  # ~256 KiB
    rate = 400_000
    bucket = TokenBucket(rate, burst=32_000)
    source, sink = open_source(str(a)), open_sink(str(tmp_path / "b"))
    started = time.monotonic()
    try:
        result = sync(source, sink, source_name=str(a), destination_name="b", throttle=bucket.take,
                      chunk_bytes=32 << 10)
    finally:
        sink.close()
        source.close()
    took = time.monotonic() - started
    assert result.complete and result.chunks > 4
    assert took >= (result.bytes_sent - 32_000) / rate * 0.95
    assert took < (result.bytes_sent / rate) + 3.0


# -- long-poll per transport -------------------------------------------------------------------


@pytest.fixture
def small_replica(tmp_path, rng):
    path = tmp_path / "a"
    model = random_model(rng, rows=120)
    Replica.init(path, model, bucket_rows=16).close()
    return path, model


def _commit_later(path, delay: float) -> threading.Thread:
    def run():
        time.sleep(delay)
        with Replica.open(path) as r:
            r.commit({"item_emb": (np.array([3]), np.full((1, 8), 42.0, np.float32))})

    t = threading.Thread(target=run)
    t.start()
    return t


def test_local_wait_for_head(small_replica):
    path, _ = small_replica
    source = open_source(str(path))
    try:
        head = source.hello()["head"]
        t0 = time.monotonic()
        assert source.wait_for_head(head, 0.3) == head
        assert 0.28 <= time.monotonic() - t0 < 1.0
        t = _commit_later(path, 0.2)
        t0 = time.monotonic()
        assert source.wait_for_head(head, 10.0) == head + 1
        assert time.monotonic() - t0 < 1.0
        t.join()
        assert source.wait_for_head(head, 10.0) == head + 1  # already past: at once
        assert source.hello()["head"] == head + 1  # a later hello looks afresh
    finally:
        source.close()


def test_http_wait_endpoint(small_replica):
    from deltalog.server import SnapshotServer
    from deltalog.transport.http import HttpSource

    path, _ = small_replica
    served = Replica.open(path)
    server = SnapshotServer(served, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        src = HttpSource(server.url, timeout=2.0)  # the long-poll outlives the user's --timeout on its own
        head = src.hello()["head"]
        t0 = time.monotonic()
        assert src.wait_for_head(head, 0.3) == head
        assert 0.28 <= time.monotonic() - t0 < 1.5
        t = _commit_later(path, 0.2)
        t0 = time.monotonic()
        assert src.wait_for_head(head, 3.5) == head + 1  # longer than timeout=2: no false "peer gone"
        assert time.monotonic() - t0 < 1.0
        t.join()
        with urllib.request.urlopen(f"{server.url}/v1/wait?since={head}&timeout=5", timeout=5) as resp:
            assert json.loads(resp.read()) == {"head": head + 1, "changed": True}  # plain curl works too
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(f"{server.url}/v1/wait?timeout=1", timeout=5)
        assert info.value.code == 400
        src.close()
    finally:
        server.shutdown()
        server.server_close()
        served.close()


def test_stdio_wait_over_a_pipe(small_replica, tmp_path):
    """The ssh transport's ``wait`` request, through a stand-in ssh that runs the remote command locally."""
    path, _ = small_replica
    fake = tmp_path / "fake-ssh"
    fake.write_text('#!/bin/sh\nwhile [ $# -gt 1 ]; do shift; done\nexec sh -c "$1"\n')
    fake.chmod(0o755)
    options = TransportOptions(ssh_command=str(fake), remote_deltalog=f"{sys.executable} -m deltalog", timeout=1.0)
    source = open_source(f"localhost:{path}", options)
    try:
        head = source.hello()["head"]
        t0 = time.monotonic()
        assert source.wait_for_head(head, 1.5) == head  # longer than --timeout 1: not a timeout
        assert time.monotonic() - t0 >= 1.4
        t = _commit_later(path, 0.2)
        assert source.wait_for_head(head, 10.0) == head + 1
        t.join()
        assert source.hello()["head"] == head + 1
        # A wait cut short on our side (a signal) leaves the pipe out of step: the source says so,
        # and closing it does not hang on the far side, which notices the hang-up.
        stopper = Stopper()
        timer = threading.Timer(0.2, lambda: os.kill(os.getpid(), signal.SIGUSR1))
        with stopper.installed((signal.SIGUSR1,)):
            timer.start()
            with pytest.raises(StopRequested), stopper.interruptible():
                source.wait_for_head(head + 1, 30.0)
        assert not source.reusable
        t0 = time.monotonic()
        source.close()
        assert time.monotonic() - t0 < 3.0
    finally:
        source.close()


# -- the follow loop, in-process ---------------------------------------------------------------


def test_opening_a_replica_while_another_thread_commits_does_not_deadlock(tmp_path):
    """A follower thread opens its source while the process commits to it (the hang of issue 8).

    LMDB's open_db runs a write transaction holding the GIL; opened per
    handle, it deadlocked against a commit in another thread. Run in a child
    with a timeout so a regression fails instead of hanging the suite.
    """
    code = f"""
import threading, numpy as np
from deltalog import Replica
rng = np.random.default_rng(0)
Replica.init({str(tmp_path / 'a')!r}, {{"e": rng.standard_normal((2000, 8)).astype(np.float32)}}, bucket_rows=4).close()
stop = False
def opener():
    while not stop:
        Replica.open({str(tmp_path / 'a')!r}).close()
t = threading.Thread(target=opener, daemon=True)
t.start()
with Replica.open({str(tmp_path / 'a')!r}) as r:
    for i in range(150):
        r.commit({{"e": (rng.integers(0, 2000, 200), rng.standard_normal((200, 8)).astype(np.float32))}}, wait=10)
stop = True
t.join(5)
print("ok")
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]




def _run_follow(src, dst, stopper, events, **kw):
    def run():
        kw.setdefault("open_source", lambda text: open_source(text))
        kw.setdefault("open_sink", lambda text: open_sink(text))
        follow(str(src), str(dst), source_name=str(src), destination_name=str(dst), on_event=events.append,
               stopper=stopper, **kw)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_idle_rounds_refresh_the_lag(small_replica, tmp_path):
    path, _ = small_replica
    dst = tmp_path / "f"
    stopper, events = Stopper(), []
    t = _run_follow(path, dst, stopper, events, interval=0.2)
    try:
        wait_until(lambda: len(events) >= 5, 10, "five rounds")
        with Replica.open(dst) as r:
            first, first_at = r.status(), time.time()
        time.sleep(0.6)
        with Replica.open(dst) as r:
            later, later_at = r.status(), time.time()
        assert later["source"] == str(path) and later["lag_offsets"] == 0
        # Nothing changed at the source, yet in_sync_at (now - lag_seconds) moves with every idle round;
        # compared as instants, not as a lag under a fixed bound, which a loaded machine could exceed.
        assert later_at - later["lag_seconds"] > first_at - first["lag_seconds"] + 0.1
        assert later["last_sync"] > first["last_sync"]
        idle = [e for e in events if e["event"] == "sync" and e["round"] > 1]
        assert all(e["rows_sent"] == 0 and e["complete"] and e["lag_offsets"] == 0 for e in idle)
        assert all(0.15 <= e["waited"] < 1.0 for e in idle)  # the long-poll timed out: `interval`
    finally:
        stopper.request()
        t.join(5)
    assert not t.is_alive()
    assert events[-1]["event"] == "stopped"


def test_transient_failures_back_off_then_resume(small_replica, tmp_path, rng):
    path, model = small_replica
    dst = tmp_path / "f"
    calls = {"n": 0}

    def flaky_source(text):
        calls["n"] += 1
        if calls["n"] <= 3:
            raise TransportError("connection refused (test)")
        return open_source(text)

    stopper, events = Stopper(), []
    backoff = Backoff(base=0.02, cap=0.08, rng=random.Random(1))
    t = _run_follow(path, dst, stopper, events, interval=0.3, open_source=flaky_source, backoff=backoff)
    try:
        wait_until(lambda: any(e["event"] == "sync" for e in events), 10, "a round after the retries")
        retries = [e for e in events if e["event"] == "retry"]
        assert [e["attempt"] for e in retries] == [1, 2, 3]
        assert all(e["error"]["type"] == "TransportError" and e["error"]["exit_code"] == 8 for e in retries)
        assert all(r["retry_in"] <= c for r, c in zip(retries, (0.02, 0.04, 0.08)))
        head = commit_stream(path, rng, model, 5)
        wait_until(lambda: head_of(dst) == head, 10, "the follower to catch up")
    finally:
        stopper.request()
        t.join(5)
    assert_exact(path, dst)


def test_source_without_long_poll_falls_back_to_polling(small_replica, tmp_path, rng):
    path, model = small_replica

    class NoWait:
        def __init__(self, text):
            self._inner = open_source(text)

        def __getattr__(self, name):
            if name == "wait_for_head":
                raise AttributeError(name)
            return getattr(self._inner, name)

    stopper, events = Stopper(), []
    t = _run_follow(path, tmp_path / "f", stopper, events, interval=0.1, open_source=NoWait)
    try:
        wait_until(lambda: len(events) >= 3, 10, "polling rounds")
        head = commit_stream(path, rng, model, 3)
        wait_until(lambda: head_of(tmp_path / "f") == head, 10, "a polled round to catch up")
    finally:
        stopper.request()
        t.join(5)


def _damage_and_repair(path, name: str, which: str = "file") -> None:
    """Scribble over tensor ``name``'s file (or its row digest file), then replay --in-place:
    a rebuilt file is renamed over it."""
    from deltalog.replay import repair_in_place

    with Replica.open(path) as r:
        file = os.path.join(path, "tensors", getattr(r.info(name), which))
    with open(file, "r+b") as f:
        f.write(b"\xff" * 64)
    with Replica.open(path) as r:
        assert repair_in_place(r, wait=10.0).repaired == [name]


def _commit_rows(path, name: str, rows, value: float) -> int:
    with Replica.open(path) as r:
        width = r.info(name).row_elems
        dtype = r.read_rows(name, np.array(rows[:1]))[1].dtype
        return r.commit({name: (np.array(rows), np.full((len(rows), width), value, dtype))})


def test_a_deadline_too_short_for_a_round_waits_for_the_source_instead_of_spinning(small_replica, tmp_path):
    """Each round the deadline stops before anything moves; the next waits on the source's long-poll."""
    path, _ = small_replica
    dst = tmp_path / "f"
    run_cli("sync", path, dst, check=True)
    _commit_rows(path, "item_emb", [0, 3], 5.0)
    with Replica.open(dst) as r:
        before = r.head
    events = []
    follow(str(path), str(dst), source_name=str(path), destination_name=str(dst), open_source=open_source,
           open_sink=open_sink, interval=0.05, deadline=0.0, on_event=events.append, max_rounds=4)
    rounds = [e for e in events if e["event"] == "sync"]
    assert len(rounds) == 4
    assert all(e["stopped_by"] == "deadline" and e["bytes_sent"] == 0 and not e["complete"] for e in rounds)
    assert all(e["waited"] > 0 for e in rounds[1:])  # a long-poll each time, not back-to-back rounds
    assert head_of(dst) == before


@pytest.mark.parametrize("which", ["file", "digest_file"])
def test_a_follower_keeps_its_destination_open_across_rounds(small_replica, tmp_path, rng, which):
    """One sink for all rounds (its maps stay warm), the lock free between rounds, and a
    tensor or digest file renamed over in between (replay --in-place) is the one written next."""
    path, model = small_replica
    dst = tmp_path / "f"
    opened = []

    def counting_sink(text):
        opened.append(text)
        return open_sink(text)

    stopper, events = Stopper(), []
    t = _run_follow(path, dst, stopper, events, interval=0.2, open_sink=counting_sink)
    try:
        commit_stream(path, rng, model, 3)
        head = _commit_rows(path, "item_emb", [0, 3, 4], 6.0)  # the follower maps item_emb's files
        wait_until(lambda: head_of(dst) == head, 10, "the follower to catch up")
        _damage_and_repair(dst, "item_emb", which)  # takes the follower's lock between two rounds
        head = _commit_rows(path, "item_emb", [0, 1, 2, 50], 7.0)
        wait_until(lambda: head_of(dst) == head, 10, "the follower to catch up again")
    finally:
        stopper.request()
        t.join(5)
    assert not t.is_alive()
    assert len(opened) == 1, "the destination was reopened between rounds"
    assert_exact(path, dst)


@pytest.mark.parametrize("which", ["file", "digest_file"])
def test_a_long_lived_local_source_reads_a_tensor_file_renamed_over_it(small_replica, tmp_path, which):
    """A source kept across rounds serves the rows of the file now at the path, not of the one it mapped."""
    from deltalog.sync import sync

    path, _model = small_replica
    dst = tmp_path / "f"
    source = open_source(str(path))
    try:
        for round_ in range(3):  # a new replica; rows read through the source's maps; the same after a repair
            if round_ == 1:
                _commit_rows(path, "item_emb", [3, 4], 8.0)
            if round_ == 2:
                _damage_and_repair(path, "item_emb", which)
                _commit_rows(path, "item_emb", [0, 1, 2, 50], 9.0)
            sink = open_sink(str(dst))
            try:
                result = sync(source, sink, source_name=str(path), destination_name=str(dst))
            finally:
                sink.close()
            assert result.complete
    finally:
        source.close()
    assert_exact(path, dst)


# -- real processes ------------------------------------------------------------------------------


def test_tree_of_followers_converges_survives_kill_and_stops_cleanly(tmp_path):
    rng = np.random.default_rng(zlib.crc32(b"tree"))
    a, b, c, d, e = (tmp_path / n for n in "abcde")
    model = random_model(rng, rows=600)
    Replica.init(a, model, bucket_rows=16).close()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    followers: dict[str, Follower] = {}
    servers = []

    def logs() -> str:
        return "\n".join(f.log() for f in followers.values()) + "\n".join(s.log() for s in servers if s)

    def start_b_server():
        cm = running_server(b, "--port", str(port), "--quiet")
        server = cm.__enter__()
        servers.append(server)
        return cm, server

    try:
        followers["b"] = Follower(tmp_path, "b", str(a), str(b))
        followers["c"] = Follower(tmp_path, "c", str(a), str(c))
        followers["e"] = Follower(tmp_path, "e", str(c), str(e))  # C may not exist yet: retried
        wait_until(lambda: head_of(b) is not None, 20, "B to be created", on_fail=logs)
        b_server_cm, b_server = start_b_server()
        followers["d"] = Follower(tmp_path, "d", url, str(d))

        # 300 small commits at the root while the tree follows
        head = commit_stream(a, rng, model, 300)
        leaves = {"b": b, "c": c, "d": d, "e": e}
        wait_until(lambda: all(head_of(p) == head for p in leaves.values()), 30,
                   f"every node at the root's head {head}", on_fail=logs)
        for p in leaves.values():
            assert_exact(a, p)

        # SIGKILL the middle node B (follower and server) while commits go on, then restart it
        writer = threading.Thread(target=commit_stream, args=(a, np.random.default_rng(5), model, 150, 0.004))
        writer.start()
        time.sleep(0.3)
        followers["b"].kill()
        b_server.proc.kill()
        b_server.proc.wait()
        time.sleep(0.5)
        followers["b"].start()
        b_server_cm.__exit__(None, None, None)
        b_server_cm, b_server = start_b_server()
        writer.join()
        with Replica.open(a) as r:
            head = r.head
        wait_until(lambda: all(head_of(p) == head for p in leaves.values()), 30,
                   f"every node at the root's head {head} after B's restart", on_fail=logs)
        for p in leaves.values():
            assert_exact(a, p)
        d_events = followers["d"].events()
        assert any(ev["event"] == "retry" and ev["error"]["type"] == "TransportError" for ev in d_events), \
            "D should have seen B's server go away"

        # status of a two-hop follower
        status = json.loads(run_cli("status", d, "--json", check=True).stdout)
        assert status["source"] == url and status["lag_offsets"] == 0
        assert status["lag_seconds"] is not None and status["lag_seconds"] < 5

        # SIGTERM: every follower exits 0, its replica exact and verified
        for name in ("d", "e", "b", "c"):
            assert followers[name].stop(signal.SIGTERM) == 0, followers[name].log()
            events = followers[name].events()
            assert events[-1]["event"] == "stopped" and events[-1]["signal"] == "SIGTERM"
            syncs = [ev for ev in events if ev["event"] == "sync"]
            assert syncs and all({"round", "lag_offsets", "lag_seconds", "from_offset", "to_offset",
                                  "rows_sent", "bytes_sent", "chunks", "complete", "seconds"} <= ev.keys()
                                 for ev in syncs)
        for p in leaves.values():
            assert_exact(a, p)
        b_server_cm.__exit__(None, None, None)
    finally:
        for f in followers.values():
            f.kill()
        for s in servers:
            if s.proc.poll() is None:
                s.proc.kill()
                s.proc.wait()


def test_sigterm_mid_round_leaves_an_exact_replica(tmp_path):
    rng = np.random.default_rng(11)
    a, x = tmp_path / "a", tmp_path / "x"
    Replica.init(a, {"emb": rng.standard_normal((16384, 32)).astype(np.float32),
                     "bias": np.zeros(64, np.float32)}, bucket_rows=128).close()
    run_cli("sync", a, x, check=True)
    with Replica.open(a) as r:
        r.commit({"bias": (np.arange(8), np.ones(8, np.float32))})
        before = r.head
    run_cli("sync", a, x, check=True)
    with Replica.open(a) as r:  # ~2 MiB of changed rows: minutes at 100 KB/s
        r.commit({"emb": (np.arange(16384), rng.standard_normal((16384, 32)).astype(np.float32))})
        after = r.head
    f = Follower(tmp_path, "x", str(a), str(x), "--bwlimit", "100K")
    try:
        def pending():
            with Replica.open(x) as r:
                return r.pending_sync() is not None
        wait_until(pending, 20, "part of the big update to arrive", on_fail=f.log)
        t0 = time.monotonic()
        assert f.stop(signal.SIGTERM) == 0, f.log()
        assert time.monotonic() - t0 < 3.0  # a paced round stops between two chunks, at once
    finally:
        f.kill()
    events = f.events()
    assert events[-1]["event"] == "stopped"
    last = [ev for ev in events if ev["event"] == "sync"][-1]
    assert last["complete"] is False and last["stopped_by"] == "signal" and last["head"] == before
    assert last["bytes_sent"] <= 100 * 1024 * (last["seconds"] + 1) + 64 * 1024  # paced: rate * t + burst + a chunk
    with Replica.open(x) as r, Replica.open(a) as src:
        assert r.head == before
        names = {n: np.arange(src.info(n).rows) for n in src.tensor_names}
        _h, at_before = values_at(src, before, names)
        for n, rows in names.items():
            assert np.array_equal(r.read_tensor(n).reshape(len(rows), -1).view(np.uint32),
                                  at_before[n].reshape(len(rows), -1).view(np.uint32))
    verified(x)
    # a second signal stops at once (the default action): as safe as kill -9
    g = Follower(tmp_path, "x2", str(a), str(x), "--bwlimit", "100K")
    try:
        time.sleep(1.5)
        g.proc.send_signal(signal.SIGTERM)
        time.sleep(0.02)
        g.proc.send_signal(signal.SIGTERM)
        g.proc.wait(5)
    finally:
        g.kill()
    assert g.proc.returncode in (0, -signal.SIGTERM), g.log()
    verified(x)
    assert head_of(x) == before
    # the next run resumes and lands exactly on the root's head
    run_cli("sync", a, x, check=True)
    assert head_of(x) == after
    assert_exact(a, x)


def test_follow_over_ssh_pull_and_push(tmp_path, sshd):  # noqa: F811
    rng = np.random.default_rng(3)
    a, x, y = tmp_path / "a", tmp_path / "x", tmp_path / "y"
    model = random_model(rng, rows=200)
    Replica.init(a, model, bucket_rows=16).close()
    pull = Follower(tmp_path, "pull", sshd.location(a), str(x), *sshd.cli_options())
    push = Follower(tmp_path, "push", str(a), sshd.location(y), *sshd.cli_options())
    try:
        wait_until(lambda: head_of(x) == 0 and head_of(y) == 0, 30, "the ssh followers to start",
                   on_fail=lambda: pull.log() + push.log())
        time.sleep(0.6)  # both are now waiting: pull in the remote's long-poll, push in the local one
        seen = []
        with Replica.open(a) as r:
            for i in range(5):
                h = r.commit({"item_emb": (np.array([i]), np.full((1, 8), 100.0 + i, np.float32))})
                t0 = time.monotonic()
                wait_until(lambda h=h: head_of(x) == h and head_of(y) == h, 10, f"ssh followers at {h}",
                           poll=0.005, on_fail=lambda: pull.log() + push.log())
                seen.append(time.monotonic() - t0)
                time.sleep(0.1)
        # the long-poll, not a 0.5 s interval sleep, wakes the followers; the push one keeps its session
        assert max(seen) < 1.0, seen
        with Replica.open(a) as r:
            head = r.head
        wait_until(lambda: head_of(y) == head, 20, "push follower", on_fail=push.log)
        assert pull.stop() == 0 and push.stop() == 0
    finally:
        pull.kill()
        push.kill()
    assert_exact(a, x)
    assert_exact(a, y)
    assert parse_spec(sshd.location(a)).scheme == "ssh"


def test_a_followers_checkpoint_runs_beside_its_rounds(small_replica, tmp_path, rng, monkeypatch):
    """The follower's fsync of its tensor files (every FOLLOW_FLUSH_SECONDS) runs on a thread of its
    own: rounds go on applying while it runs (it took a second and more at 1 GiB and stalled every
    update behind it), and `flushed` moves to what it covered once it is done."""
    from deltalog import writer
    from deltalog.transport import local

    path, model = small_replica
    dst = tmp_path / "f"
    monkeypatch.setattr(local, "FOLLOW_FLUSH_SECONDS", 0.0)  # every round is due for one
    gate, passed = threading.Event(), []
    real_fsync = writer.Writer._fsync_paths

    def gated_fsync(self, paths):
        if threading.current_thread().name == "deltalog-checkpoint":
            passed.append(gate.wait(timeout=30))  # held until a round applied behind it
        real_fsync(self, paths)

    monkeypatch.setattr(writer.Writer, "_fsync_paths", gated_fsync)
    with Replica.open(path) as r:
        r.commit(random_update(rng, model))
    stopper, events = Stopper(), []
    t = _run_follow(path, dst, stopper, events, interval=0.05)
    try:
        wait_until(lambda: head_of(dst) == 1, 20, "the first sync")
        with Replica.open(path) as r:
            r.commit(random_update(rng, model))
        wait_until(lambda: head_of(dst) == 2, 20, "a round while the checkpoint is held")
        assert not passed  # still held: that round did not wait for it
        gate.set()
        wait_until(lambda: passed and Replica.open(dst).state.flushed >= 1, 20, "flushed to the checkpoint")
    finally:
        gate.set()
        stopper.request()
        t.join(30)
    assert not t.is_alive() and passed and all(passed)
    with Replica.open(dst) as r:
        assert r.state.settled and r.state.flushed >= 1
        assert verify_replica(r).ok


def test_follow_stops_on_a_destination_its_source_cannot_vouch_for(tmp_path, rng):
    """No retry makes a missing proof appear: --follow exits 7 at once (it cannot --reseed), rather than
    retrying for ever (a code review found it). The source here was compacted by a deltalog that kept
    no digests of what it dropped."""
    model = random_model(rng, rows=60)
    src, dst = tmp_path / "src", tmp_path / "dst"
    with Replica.init(src, model, bucket_rows=8) as r:
        r.commit(random_update(rng, model))
    assert run_cli("sync", src, dst).returncode == 0
    with Replica.open(src) as r:
        for _ in range(3):
            r.commit(random_update(rng, model))
        compact_as_before_past_digests(r)
    started = time.monotonic()
    proc = run_cli("sync", src, dst, "--follow", "--interval", "0.2", "--json")
    assert proc.returncode == 7, proc.stderr
    assert "HistoryUnproven" in proc.stdout and "--reseed" in proc.stderr
    assert time.monotonic() - started < 60


def test_bwlimit_never_carries_a_sync_past_its_deadline(tmp_path, rng):
    """A token bucket whose wait would end after --deadline raises instead of sleeping (nothing spent),
    and the sync stops there as the deadline stops it: `--bwlimit 1 --deadline 2` used to sleep for
    hours (a newcomer audit found 11-30x overruns and a hang)."""
    from deltalog.sync import DeadlineReached

    now = [0.0]
    tb = TokenBucket(1000.0, until=1.0, clock=lambda: now[0], sleep=lambda s: now.__setitem__(0, now[0] + s))
    assert tb.take(500) == pytest.approx(0.5)
    with pytest.raises(DeadlineReached):
        tb.take(600)  # would end at 1.1 s
    assert now[0] == pytest.approx(0.5)
    assert tb.take(400) == pytest.approx(0.4)  # the refused bytes were not spent
    model = {"t": rng.standard_normal((4096, 16)).astype(np.float32)}
    src, dst = tmp_path / "src", tmp_path / "dst"
    Replica.init(src, model, bucket_rows=64).close()
    assert run_cli("sync", src, dst).returncode == 0
    with Replica.open(src) as r:
        r.commit({"t": (np.arange(0, 4096, 2), np.ones((2048, 16), np.float32))})
    started = time.monotonic()
    proc = run_cli("sync", src, dst, "--bwlimit", "1K", "--deadline", "2", "--json")
    assert proc.returncode == 1, proc.stderr
    out = json.loads(proc.stdout)
    assert out["stopped_by"] == "deadline" and not out["complete"]
    assert time.monotonic() - started < 10  # a chunk at 1 KiB/s would take a minute
    assert run_cli("sync", src, dst).returncode == 0
