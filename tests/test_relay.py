"""The object-store relay (deltalog.relay): publish a log to S3 (a real moto server on 127.0.0.1) or a
directory (file://), pull it into replicas, and refuse what cannot be proven exact."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest

from conftest import bits, compact_as_before_past_digests, random_model, random_update, run_cli
from deltalog import Replica, lineage
from deltalog.errors import ModelMismatch, TransportError
from deltalog.objstore import ObjectStore, PreconditionFailed
from deltalog.relay import HEAD_KEY, publish, read_head

GOLDEN_RELAY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                            "formats", "golden", "relay-v1")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _moto(env: dict | None = None):
    pytest.importorskip("moto")
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, **(env or {})})
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(endpoint + "/moto-api/", timeout=1)
            break
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                pytest.fail("moto server did not start")
            time.sleep(0.1)
    return proc, endpoint


@pytest.fixture(scope="module")
def s3_server():
    """A real S3 API (moto's server mode) on 127.0.0.1; yields its endpoint."""
    proc, endpoint = _moto()
    yield endpoint
    proc.terminate()
    proc.wait(10)


def test_wrong_credentials_exit_8_naming_them(tmp_path, monkeypatch):
    """Against a server that checks signatures (moto with authentication on), unknown keys are refused."""
    proc, endpoint = _moto({"INITIAL_NO_AUTH_ACTION_COUNT": "0"})
    try:
        env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ALLOW_HTTP": "true", "AWS_ACCESS_KEY_ID": "AKIANOTAKEY",
               "AWS_SECRET_ACCESS_KEY": "wrong", "AWS_REGION": "us-east-1"}
        pull = run_cli("sync", "s3://bucket/m", tmp_path / "r", env=env)
        assert pull.returncode == 8 and "access denied" in pull.stderr and "credentials" in pull.stderr, pull.stderr
        assert "Traceback" not in pull.stderr and not (tmp_path / "r").exists()
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture
def s3(s3_server, monkeypatch, request):
    """A fresh bucket; the AWS_* environment pointing at the moto server, for the library and the CLI."""
    env = {"AWS_ENDPOINT_URL": s3_server, "AWS_ALLOW_HTTP": "true", "AWS_ACCESS_KEY_ID": "test",
           "AWS_SECRET_ACCESS_KEY": "test", "AWS_REGION": "us-east-1"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    bucket = "b" + str(abs(hash(request.node.name)) % 10**9)
    urllib.request.urlopen(urllib.request.Request(f"{s3_server}/{bucket}", method="PUT"))
    return f"s3://{bucket}/models/recsys"


@pytest.fixture(params=["s3", "file"])
def relay_url(request, tmp_path):
    if request.param == "s3":
        return request.getfixturevalue("s3")
    return f"file://{tmp_path}/relay"


def make_primary(path, rng, commits: int = 3):
    model = random_model(rng)
    with Replica.init(path, model, bucket_rows=16) as r:
        for _ in range(commits):
            r.commit(random_update(rng, model))
    return model


def commit_more(path, rng, n: int) -> None:
    with Replica.open(path) as r:
        model = {name: r.read_tensor(name) for name in r.tensor_names}
        for _ in range(n):
            r.commit(random_update(rng, model))


def published_and_pulled(url, tmp_path, rng, commits: int = 3, more: int = 0):
    """(primary, serving): a primary published to ``url`` and pulled into serving, then ``more``
    commits published that serving has not pulled yet."""
    primary, serving = tmp_path / "primary", tmp_path / "serving"
    make_primary(primary, rng, commits)
    run_cli("sync", primary, url, check=True)
    run_cli("sync", url, serving, check=True)
    if more:
        commit_more(primary, rng, more)
        run_cli("sync", primary, url, check=True)
    return primary, serving


def assert_replicas_equal(a, b) -> None:
    with Replica.open(a) as ra, Replica.open(b) as rb:
        assert ra.head == rb.head
        assert ra.state_digest == rb.state_digest
        for name in ra.tensor_names:
            assert np.array_equal(bits(ra.read_tensor(name)), bits(rb.read_tensor(name))), name


def test_publish_then_pull_end_to_end_from_the_cli(relay_url, tmp_path, rng):
    primary, serving = tmp_path / "primary", tmp_path / "serving"
    make_primary(primary, rng)
    first = run_cli("sync", primary, relay_url, "--json", check=True)
    assert json.loads(first.stdout)["snapshot_offset"] == 0
    commit_more(primary, rng, 2)
    run_cli("sync", primary, relay_url, check=True)
    pulled = json.loads(run_cli("sync", relay_url, serving, "--json", check=True).stdout)
    assert pulled["complete"] and pulled["snapshot_offset"] == 0
    assert_replicas_equal(primary, serving)
    # A replica behind by several segments gets them merged into one sync.
    for _ in range(3):
        commit_more(primary, rng, 1)
        run_cli("sync", primary, relay_url, check=True)
    again = json.loads(run_cli("sync", relay_url, serving, "--json", check=True).stdout)
    assert again["from_offset"] == 5 and again["head"] == 8 and again["snapshot_offset"] is None
    assert_replicas_equal(primary, serving)
    assert run_cli("verify", serving).returncode == 0
    log = run_cli("log", serving, "--json", check=True).stdout
    assert '"kind": "commit"' in log or "commit" in log  # the history names the primary's commits
    up = run_cli("sync", relay_url, serving, check=True)
    assert "up to date" in up.stdout


def test_pullers_need_only_reads(relay_url, tmp_path, rng):
    """A pull writes nothing to the relay: its objects and ETags are unchanged after it."""
    primary = tmp_path / "primary"
    make_primary(primary, rng)
    run_cli("sync", primary, relay_url, check=True)
    store = ObjectStore(relay_url)
    before = {k: store.get(k).etag for k in store.list()}
    run_cli("sync", relay_url, tmp_path / "a", check=True)
    assert {k: store.get(k).etag for k in store.list()} == before


def test_second_publisher_loses_the_conditional_write(relay_url, tmp_path, rng):
    primary = tmp_path / "primary"
    make_primary(primary, rng)
    store = ObjectStore(relay_url)
    with Replica.open(primary) as r:
        publish(r, store, str(primary))
    head, etag = read_head(store)
    commit_more(primary, rng, 1)
    with Replica.open(primary) as r:
        publish(r, store, str(primary))  # advances the head: `etag` is now stale
    with pytest.raises(PreconditionFailed):
        store.put_if(HEAD_KEY, json.dumps(head).encode(), etag)
    with pytest.raises(PreconditionFailed):
        store.put_if(HEAD_KEY, b"{}", None)  # If-None-Match: * on an existing head
    assert read_head(store)[0]["head"] == 4


def test_publishers_racing_from_one_head_advance_it_once(relay_url, tmp_path, rng, monkeypatch):
    """Two publishers read the same head; the one that writes second gets exit 9, not a fork."""
    primary = tmp_path / "primary"
    make_primary(primary, rng)
    run_cli("sync", primary, relay_url, check=True)
    twin = tmp_path / "twin"
    shutil.copytree(primary, twin)
    commit_more(primary, rng, 1)
    commit_more(twin, rng, 2)
    import deltalog.relay as relay_mod

    real = relay_mod.read_head
    store = ObjectStore(relay_url)
    stale = real(store)

    def racing_read(s):  # the twin read the head before the primary advanced it
        return stale

    with Replica.open(primary) as r:
        publish(r, store, "primary")
    with monkeypatch.context() as m:  # not monkeypatch.undo(): that would drop the fixture's AWS_* too
        m.setattr(relay_mod, "read_head", racing_read)
        with Replica.open(twin) as r, pytest.raises(PreconditionFailed):
            publish(r, store, "twin")
    assert read_head(store)[0]["head"] == 4
    # And run for real, the twin's history is refused outright.
    proc = run_cli("sync", twin, relay_url)
    assert proc.returncode == 13, proc.stderr
    assert "Traceback" not in proc.stderr


def test_pull_into_a_diverged_replica_is_refused(relay_url, tmp_path, rng):
    primary, serving = tmp_path / "primary", tmp_path / "serving"
    model = make_primary(primary, rng)
    run_cli("sync", primary, relay_url, check=True)
    run_cli("sync", relay_url, serving, check=True)
    with Replica.open(serving) as r:
        r.commit(random_update(rng, model))  # a stray local commit at offset 4
    commit_more(primary, rng, 1)
    run_cli("sync", primary, relay_url, check=True)
    proc = run_cli("sync", relay_url, serving)
    assert proc.returncode == 13, proc.stderr
    with Replica.open(serving) as r:
        assert r.head == 4
    assert run_cli("sync", relay_url, serving, "--reseed").returncode == 0
    assert_replicas_equal(primary, serving)


def test_the_relay_vouches_only_for_states_it_published(tmp_path, rng):
    """RelayReader.state_digest_at: what sync asks a source about a replica older than its oldest
    offset. A published head (or snapshot) has the primary's digest; an offset inside a segment has none."""
    from deltalog.relay import RelayReader

    url = f"file://{tmp_path}/relay"
    primary, _serving = published_and_pulled(url, tmp_path, rng, commits=3, more=2)  # published: 0, 3, 5
    reader = RelayReader(ObjectStore(url))
    with Replica.open(primary) as r:
        for offset in (0, 3, 5):
            assert reader.state_digest_at(offset) == lineage.to_hex(r.state_digest_at(offset)), offset
    assert reader.state_digest_at(4) is None and reader.state_digest_at(9) is None


def test_publishing_another_model_is_refused(relay_url, tmp_path, rng):
    a, b = tmp_path / "a", tmp_path / "b"
    make_primary(a, rng)
    model = random_model(rng)
    Replica.init(b, model, bucket_rows=16, model_id="other-model").close()
    run_cli("sync", a, relay_url, check=True)
    proc = run_cli("sync", b, relay_url)
    assert proc.returncode == 6 and "relays model" in proc.stderr
    with Replica.open(b) as rb, pytest.raises(ModelMismatch):
        publish(rb, ObjectStore(relay_url), "b")


def test_killed_publisher_leaves_the_relay_at_its_head(relay_url, tmp_path, rng, monkeypatch):
    """Dying after its segment but before the head (the last step) loses nothing: the next run goes on."""
    primary, serving = tmp_path / "primary", tmp_path / "serving"
    make_primary(primary, rng)
    run_cli("sync", primary, relay_url, check=True)
    commit_more(primary, rng, 2)
    store = ObjectStore(relay_url)

    class Killed(BaseException):
        pass

    def die(*a, **k):
        raise Killed

    with monkeypatch.context() as m:
        m.setattr(store, "put_if", die)
        with Replica.open(primary) as r, pytest.raises(Killed):
            publish(r, store, "primary")
    assert read_head(ObjectStore(relay_url))[0]["head"] == 3
    run_cli("sync", relay_url, serving, check=True)
    with Replica.open(serving) as r:
        assert r.head == 3
    run_cli("sync", primary, relay_url, check=True)
    run_cli("sync", relay_url, serving, check=True)
    assert_replicas_equal(primary, serving)


def test_killed_puller_resumes(relay_url, tmp_path, rng):
    """kill -9 of a pulling process at a random moment: the replica stays valid and the next pull ends equal."""
    primary, serving = published_and_pulled(relay_url, tmp_path, rng, commits=1)
    for _ in range(4):
        commit_more(primary, rng, 1)
        run_cli("sync", primary, relay_url, check=True)
    proc = subprocess.Popen([sys.executable, "-m", "deltalog", "sync", relay_url, str(serving), "--chunk-bytes", "64"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ.copy())
    time.sleep(float(rng.uniform(0.3, 0.9)))
    proc.kill()
    proc.wait()
    assert run_cli("verify", serving).returncode == 0
    run_cli("sync", relay_url, serving, check=True)
    assert_replicas_equal(primary, serving)


def test_bucket_that_vanishes_is_a_transport_error(s3, s3_server, tmp_path, rng):
    primary, serving = tmp_path / "primary", tmp_path / "serving"
    make_primary(primary, rng)
    run_cli("sync", primary, s3, check=True)
    run_cli("sync", s3, serving, check=True)
    commit_more(primary, rng, 1)
    run_cli("sync", primary, s3, check=True)
    store = ObjectStore(s3)
    for key in store.list():
        store.delete(key)
    bucket = s3.split("/")[2]
    urllib.request.urlopen(urllib.request.Request(f"{s3_server}/{bucket}", method="DELETE"))
    proc = run_cli("sync", s3, serving)
    assert proc.returncode == 8 and "bucket does not exist" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    with Replica.open(serving) as r:
        assert r.head == 3  # untouched


def test_empty_prefix_says_publish_first(relay_url, tmp_path):
    proc = run_cli("sync", relay_url, tmp_path / "x")
    assert proc.returncode == 8 and "no relay here" in proc.stderr and "publish first" in proc.stderr
    assert not (tmp_path / "x").exists()


def test_follow_pulls_each_new_head(relay_url, tmp_path, rng):
    primary, serving = tmp_path / "primary", tmp_path / "serving"
    make_primary(primary, rng)
    run_cli("sync", primary, relay_url, check=True)
    follower = subprocess.Popen([sys.executable, "-m", "deltalog", "sync", relay_url, str(serving), "--follow",
                                 "--interval", "0.3", "--json"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                env=os.environ.copy(), text=True)
    try:
        commit_more(primary, rng, 2)
        run_cli("sync", primary, relay_url, check=True)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if serving.exists():
                try:
                    with Replica.open(serving) as r:
                        if r.head == 5:
                            break
                except Exception:
                    pass
            time.sleep(0.2)
    finally:
        follower.terminate()
        follower.wait(20)
    assert follower.returncode == 0
    assert_replicas_equal(primary, serving)


def test_golden_relay_v1_still_pulls(tmp_path):
    """formats/golden/relay-v1 (file://, made by make_golden.py) opens and gives the digest its head names."""
    relay = tmp_path / "relay"
    shutil.copytree(GOLDEN_RELAY, relay)
    url = f"file://{relay}"
    head = json.loads((relay / "head").read_text())
    proc = run_cli("sync", url, tmp_path / "r", "--json", check=True)
    assert json.loads(proc.stdout)["head"] == head["head"]
    with Replica.open(tmp_path / "r") as r:
        from deltalog import lineage

        assert lineage.to_hex(r.state_digest) == head["state_digest"]
    assert run_cli("verify", tmp_path / "r").returncode == 0


def test_damaged_segment_is_refused(tmp_path, rng):
    primary, serving = tmp_path / "primary", tmp_path / "serving"
    url = f"file://{tmp_path}/relay"
    make_primary(primary, rng)
    run_cli("sync", primary, url, check=True)
    seg = next(p for p in (tmp_path / "relay" / "segments").rglob("*.seg"))
    data = bytearray(seg.read_bytes())
    data[len(data) // 2] ^= 0xFF
    seg.write_bytes(bytes(data))
    proc = run_cli("sync", url, serving)
    assert proc.returncode == 5 and "checksum" in proc.stderr, proc.stderr


def test_levels_let_a_replica_far_behind_fetch_few_objects(tmp_path, rng, monkeypatch):
    """Level 2/3 segments (intervals shortened to 0 s here) cover the per-publish ones; a replica that
    stood on a level-1 boundary whose segment retention has since deleted still pulls, exactly."""
    import deltalog.relay as relay_mod

    monkeypatch.setattr(relay_mod, "LEVEL_SECONDS", (0.0, 0.0))
    monkeypatch.setattr(relay_mod, "RETIRE_SECONDS", 0.0)
    url = f"file://{tmp_path}/relay"
    primary, early, fresh = tmp_path / "primary", tmp_path / "early", tmp_path / "fresh"
    make_primary(primary, rng, commits=1)
    store = ObjectStore(url)
    with Replica.open(primary) as r:
        publish(r, store, "p")
    commit_more(primary, rng, 1)
    with Replica.open(primary) as r:
        publish(r, store, "p")
    run_cli("sync", url, early, check=True)  # stands at offset 2, a level-1 boundary
    for _ in range(6):
        commit_more(primary, rng, 1)
        with Replica.open(primary) as r:
            publish(r, store, "p")
    head, _etag = read_head(store)
    levels = sorted({s["level"] for s in head["segments"]})
    assert levels[-1] >= 2, head["segments"]
    assert not any(s["level"] == 1 and s["end"] == 2 for s in head["segments"])  # retired
    on_disk = {k for k in store.list() if k.startswith("segments/")}
    assert not any(k.startswith("segments/L1/") and "-00000000000000000002-" in k for k in on_disk)  # deleted
    fetched = []
    real_get = ObjectStore.get

    def counting_get(self, key):
        fetched.append(key)
        return real_get(self, key)

    with monkeypatch.context() as m:
        m.setattr(ObjectStore, "get", counting_get)
        from deltalog.sync import sync
        from deltalog.transport import open_sink, open_source

        src, dst = open_source(url), open_sink(str(early))
        try:
            result = sync(src, dst, source_name=url, destination_name=str(early))
        finally:
            dst.close()
    assert result.complete and result.head == 8
    assert len([k for k in fetched if k.startswith("segments/")]) <= 2, fetched
    assert_replicas_equal(primary, early)
    run_cli("sync", url, fresh, check=True)
    assert_replicas_equal(primary, fresh)


def test_budgeted_pull_sends_the_most_significant_part_then_resumes(relay_url, tmp_path, rng):
    primary, serving = published_and_pulled(relay_url, tmp_path, rng, commits=1, more=4)
    part = run_cli("sync", relay_url, serving, "--max-bytes", "200", "--json")
    assert part.returncode == 1, part.stderr
    first = json.loads(part.stdout)
    assert not first["complete"] and first["pending_buckets"] > 0 and first["head"] == 1
    rest = json.loads(run_cli("sync", relay_url, serving, "--json", check=True).stdout)
    assert rest["complete"] and rest["head"] == 5
    assert_replicas_equal(primary, serving)


def test_bucket_vanishing_mid_pull_leaves_the_replica_as_it_was(s3, s3_server, tmp_path, rng, monkeypatch):
    """The head is read, then the bucket goes before the segments are: exit 8, nothing applied."""
    from deltalog.relay import RelayReader
    from deltalog.sync import sync
    from deltalog.transport import open_sink, open_source

    primary, serving = published_and_pulled(s3, tmp_path, rng, more=2)
    bucket = s3.split("/")[2]
    real_segment = RelayReader._segment

    def vanish_then_read(self, entry):
        for key in self.store.list():
            self.store.delete(key)
        urllib.request.urlopen(urllib.request.Request(f"{s3_server}/{bucket}", method="DELETE"))
        return real_segment(self, entry)

    with monkeypatch.context() as m:
        m.setattr(RelayReader, "_segment", vanish_then_read)
        src, sink = open_source(s3), open_sink(str(serving))
        try:
            with pytest.raises(TransportError, match="bucket does not exist"):
                sync(src, sink, source_name=s3, destination_name=str(serving))
        finally:
            sink.close()
    with Replica.open(serving) as r:
        assert r.head == 3
    assert run_cli("verify", serving).returncode == 0


def test_kill_9_of_a_following_publisher_loses_nothing(relay_url, tmp_path, rng):
    """A publisher following commits is killed at a random moment; the relay is at one of its heads,
    a new publisher goes on from there, and a puller ends bitwise equal."""
    primary, serving = tmp_path / "primary", tmp_path / "serving"
    make_primary(primary, rng, commits=1)
    pub = subprocess.Popen([sys.executable, "-m", "deltalog", "sync", str(primary), relay_url, "--follow",
                            "--interval", "0.05", "--quiet"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                           env=os.environ.copy())
    try:
        for _ in range(6):
            commit_more(primary, rng, 1)
            time.sleep(float(rng.uniform(0.02, 0.15)))
    finally:
        pub.kill()
        pub.wait()
    store = ObjectStore(relay_url)
    head, _ = read_head(store)
    assert head is None or 1 <= head["head"] <= 7
    run_cli("sync", primary, relay_url, check=True)
    run_cli("sync", relay_url, serving, check=True)
    assert_replicas_equal(primary, serving)


def test_relative_file_url_is_under_the_working_directory(tmp_path, rng):
    make_primary(tmp_path / "primary", rng)
    run_cli("sync", "primary", "file://relays/m", cwd=str(tmp_path), check=True)
    assert (tmp_path / "relays" / "m" / "head").exists()
    run_cli("sync", "file://relays/m", "copy", cwd=str(tmp_path), check=True)
    assert_replicas_equal(tmp_path / "primary", tmp_path / "copy")


def test_status_lists_a_fleet_with_the_relay(relay_url, tmp_path, rng):
    """One line each for the primary, the relay and a puller behind it, with lag in offsets."""
    primary, serving = published_and_pulled(relay_url, tmp_path, rng, more=2)
    rows = json.loads(run_cli("status", primary, relay_url, serving, "--json", check=True).stdout)
    assert [(r["head"], r["lag_offsets"]) for r in rows] == [(5, 0), (5, 0), (3, 2)]
    assert rows[0]["state_digest"] == rows[1]["state_digest"] != rows[2]["state_digest"]
    # The relay's head names when the primary made it; the puller's lag in seconds is measured from it.
    assert rows[0]["head_time"] == rows[1]["head_time"] > rows[2]["head_time"]
    assert rows[2]["lag_seconds"] == round(rows[1]["head_time"] - rows[2]["head_time"], 3)


def _rewrite_head(url, edit) -> None:
    """Apply ``edit`` to the relay's head object in place (what a buggy or hostile publisher might write)."""
    store = ObjectStore(url)
    head, etag = read_head(store)
    edit(head)
    store.put_if(HEAD_KEY, json.dumps(head, sort_keys=True).encode(), etag)


def test_a_gap_in_the_relay_is_refused_with_nothing_applied(tmp_path, rng):
    """A head whose segments leave an offset uncovered: the puller refuses (exit 7), never skips it."""
    url = f"file://{tmp_path}/relay"
    primary, serving = published_and_pulled(url, tmp_path, rng, commits=1)
    for _ in range(3):  # three level-1 segments: 1-2, 2-3, 3-4
        commit_more(primary, rng, 1)
        run_cli("sync", primary, url, check=True)
    _rewrite_head(url, lambda h: h.update(segments=[s for s in h["segments"] if s["start"] != 2]))
    proc = run_cli("sync", url, serving, "--json")
    assert proc.returncode == 7, proc.stderr
    assert "no segment of the relay covers offset 2" in proc.stderr and "Traceback" not in proc.stderr
    with Replica.open(serving) as r:
        assert r.head == 1
    assert run_cli("verify", serving).returncode == 0


def test_a_segment_the_head_names_but_the_store_lost_is_refused(tmp_path, rng):
    """The head names a segment whose object is gone: a transport error (exit 8), the replica untouched."""
    url = f"file://{tmp_path}/relay"
    primary, serving = published_and_pulled(url, tmp_path, rng, commits=1, more=1)
    head, _ = read_head(ObjectStore(url))
    (key,) = [s["key"] for s in head["segments"] if s["start"] == 1]
    ObjectStore(url).delete(key)
    proc = run_cli("sync", url, serving)
    assert proc.returncode == 8 and key in proc.stderr, proc.stderr
    with Replica.open(serving) as r:
        assert r.head == 1
    assert run_cli("verify", serving).returncode == 0


def test_a_segment_swapped_for_another_range_is_refused(tmp_path, rng):
    """A segment object whose header disagrees with the head entry naming it (out of order, duplicated
    under another name): exit 5, nothing applied."""
    url = f"file://{tmp_path}/relay"
    primary, serving = published_and_pulled(url, tmp_path, rng, commits=1)
    for _ in range(2):
        commit_more(primary, rng, 1)
        run_cli("sync", primary, url, check=True)
    head, _ = read_head(ObjectStore(url))
    first, second = sorted((s for s in head["segments"] if s["level"] == 1 and s["start"] >= 1),
                           key=lambda s: s["start"])[:2]
    relay = tmp_path / "relay"
    (relay / first["key"]).write_bytes((relay / second["key"]).read_bytes())
    proc = run_cli("sync", url, serving)
    assert proc.returncode == 5 and "does not match the head" in proc.stderr, proc.stderr
    with Replica.open(serving) as r:
        assert r.head == 1


def test_a_primary_compacted_past_the_relay_head_rebases_the_relay_and_its_pullers_follow(tmp_path, rng):
    """It used to strand the relay (publish exit 7 for ever, a new prefix making every puller
    --reseed; a second audit found it). The primary proves the relay's head was a state of its own
    history (the digest its compaction kept), uploads its oldest snapshot as the relay's new base and
    publishes on; a faithful puller is proven by the old segment's digest and takes the snapshot, and
    a puller that took a stray commit is still refused."""
    from deltalog.compact import compact

    url = f"file://{tmp_path}/relay"
    primary, serving = published_and_pulled(url, tmp_path, rng, commits=3)
    stray = tmp_path / "stray"
    shutil.copytree(serving, stray)
    with Replica.open(stray) as r:
        r.commit(random_update(rng, {n: r.read_tensor(n) for n in r.tensor_names}))
    commit_more(primary, rng, 3)
    with Replica.open(primary) as r:
        compact(r, keep_records=1)  # the relay's head (3) is gone from the primary's log
        oldest = r.oldest_offset
    proc = run_cli("sync", primary, url, "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["snapshot_offset"] == oldest
    proc = run_cli("sync", url, serving, "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["snapshot_offset"] == oldest
    assert_replicas_equal(primary, serving)
    assert run_cli("sync", url, stray).returncode in (7, 13)  # never replaced unproven
    commit_more(primary, rng, 2)
    run_cli("sync", primary, url, check=True)
    run_cli("sync", url, serving, check=True)
    assert_replicas_equal(primary, serving)
    run_cli("sync", url, tmp_path / "new", check=True)
    assert_replicas_equal(primary, tmp_path / "new")


def test_a_rebase_retires_the_old_snapshot_and_segments_but_keeps_their_digests(tmp_path, rng, monkeypatch):
    """Each rebase used to leave the old snapshot in the store for ever, unnamed, and the old
    segments in the head. Their objects are now retired (the snapshot an hour later, for a new
    puller still copying it) and only their state digests stay, which still prove a puller
    behind the new base and refuse a stray one."""
    from deltalog import relay
    from deltalog.compact import compact

    url = f"file://{tmp_path}/relay"
    primary, serving = published_and_pulled(url, tmp_path, rng, commits=3)
    commit_more(primary, rng, 1)
    run_cli("sync", primary, url, check=True)  # a second segment: a published head inside the old range
    behind = tmp_path / "behind"
    shutil.copytree(serving, behind)  # at offset 3, a head the relay published before the rebase
    behind_twice = tmp_path / "behind-twice"
    shutil.copytree(serving, behind_twice)  # still there after a second rebase
    stray = tmp_path / "stray"
    shutil.copytree(serving, stray)
    with Replica.open(stray) as r:
        r.commit(random_update(rng, {n: r.read_tensor(n) for n in r.tensor_names}))
    store = ObjectStore(url)
    before, _ = read_head(store)
    old_snapshot = [k for k in store.list("snapshots/") if k.startswith(relay.snapshot_prefix(0))]
    assert old_snapshot and before["segments"]
    commit_more(primary, rng, 3)
    with Replica.open(primary) as r:
        compact(r, keep_records=1)
        base = r.oldest_offset
    run_cli("sync", primary, url, check=True)
    head, _ = read_head(store)
    assert [s["offset"] for s in head["snapshots"]] == [base]
    assert all(e["start"] >= base for e in head["segments"]), head["segments"]
    retired = {r["key"]: r for r in head["retired"]}
    assert {e["key"] for e in before["segments"]} <= set(retired)
    assert set(old_snapshot) <= set(retired) and all(retired[k]["after"] == 3600 for k in old_snapshot)
    assert [3, before["segments"][0]["post_digest"]] in head["past_digests"]

    commit_more(primary, rng, 1)
    later = time.time() + 3601
    monkeypatch.setattr(relay.time, "time", lambda: later)
    with Replica.open(primary) as r:
        publish(r, store, str(primary))
    gone = set(store.list(""))
    assert not gone & (set(old_snapshot) | {e["key"] for e in before["segments"]})
    proc = run_cli("sync", url, behind, "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["snapshot_offset"] == base
    assert_replicas_equal(primary, behind)
    assert run_cli("sync", url, stray).returncode == 13

    commit_more(primary, rng, 3)  # a second rebase keeps the first one's digests
    with Replica.open(primary) as r:
        compact(r, keep_records=1)
        second_base = r.oldest_offset
    run_cli("sync", primary, url, check=True)
    head, _ = read_head(store)
    assert [s["offset"] for s in head["snapshots"]] == [second_base] and second_base > base
    assert [3, before["segments"][0]["post_digest"]] in head["past_digests"]
    assert any(k.startswith(relay.snapshot_prefix(base)) for k in (r["key"] for r in head["retired"]))
    proc = run_cli("sync", url, behind_twice, "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["snapshot_offset"] == second_base
    assert_replicas_equal(primary, behind_twice)
    assert run_cli("sync", url, stray).returncode == 13


def test_a_primary_that_cannot_vouch_for_the_relay_head_says_how_to_start_again(tmp_path, rng):
    url = f"file://{tmp_path}/relay"
    primary, _serving = published_and_pulled(url, tmp_path, rng, commits=3)
    commit_more(primary, rng, 3)
    with Replica.open(primary) as r:  # compacted by a deltalog that kept no past digests
        compact_as_before_past_digests(r)
    proc = run_cli("sync", primary, url)
    assert proc.returncode == 7 and "new prefix" in proc.stderr and "--reseed" in proc.stderr, proc.stderr


def test_a_following_publisher_ends_its_json_with_a_stopped_event(tmp_path, rng):
    """As a pulling --follow does: a script reading the stream knows it ended on purpose."""
    primary, url = tmp_path / "primary", f"file://{tmp_path}/relay"
    make_primary(primary, rng, commits=1)
    pub = subprocess.Popen([sys.executable, "-m", "deltalog", "sync", str(primary), url, "--follow",
                            "--interval", "0.1", "--json"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                           env=os.environ.copy(), text=True)
    try:
        deadline = time.monotonic() + 30
        while read_head(ObjectStore(url))[0] is None and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        pub.terminate()
        out, _ = pub.communicate(timeout=20)
    assert pub.returncode == 0
    events = [json.loads(line) for line in out.splitlines()]
    assert events[0]["event"] == "publish" and events[-1] == {**events[-1], "event": "stopped", "signal": "SIGTERM"}
