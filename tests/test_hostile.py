"""Hostile input the other suites leave out: fuzzed frames, a hostile peer of `serve --stdio`, HTTP auth.

tests/test_wire.py checks hand-picked bad frames and tests/test_serve.py
hostile HTTP requests (traversal, ranges, tokens on GET). Here:

- property-based frames (hypothesis): random bytes, every truncation,
  any declared size: refused with a deltalog error, never another
  exception, and memory bounded by the frame limit whatever is declared;
- the far side of an ssh pipe (``serve --stdio``) fed by a hostile client,
  in both roles: requests with random arguments, and chunks that are
  garbage, of another model, or well-formed records that lie (rows out of
  range, versions outside the sync, another target); the replica behind
  it must stay exactly as it was;
- HTTP: token variants on every endpoint (POST included), traversal with a
  valid token, and the sync CLI's exit code for a rejected token.
"""

from __future__ import annotations

import http.client
import io
import json
import os
import struct
import tracemalloc

import msgpack
import numpy as np
import pytest
import xxhash
from conftest import bits, random_model, random_update, run_cli
from http_fixture import serve_snapshot_process  # noqa: F401  (fixture)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deltalog import Replica, wire
from deltalog import record as rec
from deltalog import sync as sync_mod
from deltalog.errors import IntegrityError, TransportError
from deltalog.stdio_server import serve
from deltalog.verify import verify

LIMIT = 64 << 10


# -- frames ------------------------------------------------------------------------------------------


def frame(header: dict, payload: bytes = b"") -> bytes:
    buf = io.BytesIO()
    wire.write_frame(buf, header, payload)
    return buf.getvalue()


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=4096))
def test_random_bytes_are_refused_with_a_deltalog_error(data):
    try:
        header, payload = wire.read_frame(io.BytesIO(data), max_frame_bytes=LIMIT)
    except (TransportError, IntegrityError):
        return
    assert isinstance(header, dict) and isinstance(header["type"], str) and len(payload) <= LIMIT


@settings(max_examples=200, deadline=None)
@given(nbytes=st.integers(0, 2**64 - 1), extra=st.dictionaries(st.text(max_size=5), st.integers(-(2**63), 2**64 - 1), max_size=3))
def test_declared_payload_sizes_never_allocate_beyond_the_limit(nbytes, extra):
    header = msgpack.packb({**extra, "type": "chunk", "nbytes": nbytes, "xxh3": 0})
    stream = io.BytesIO(struct.pack(">I", len(header)) + header + b"x" * 100)
    tracemalloc.start()
    try:
        wire.read_frame(stream, max_frame_bytes=LIMIT)
    except (TransportError, IntegrityError) as exc:
        if nbytes > LIMIT:
            assert isinstance(exc, TransportError) and "limit" in str(exc)
            assert stream.tell() == 4 + len(header)  # the payload was never waited for
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert peak < LIMIT + (256 << 10)


@settings(max_examples=100, deadline=None)
@given(length=st.integers(0, 2**32 - 1), rest=st.binary(max_size=64))
def test_declared_header_lengths_are_bounded(length, rest):
    tracemalloc.start()
    try:
        with pytest.raises((TransportError, IntegrityError)):
            wire.read_frame(io.BytesIO(struct.pack(">I", length) + rest), max_frame_bytes=LIMIT)
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert peak < wire.MAX_HEADER_BYTES + (256 << 10)


@settings(max_examples=60, deadline=None)
@given(payload=st.binary(max_size=300), fields=st.dictionaries(st.sampled_from(["n", "target", "file"]), st.integers(-(2**63), 2**64 - 1)))
def test_every_truncation_of_a_valid_frame_is_a_transport_error(payload, fields):
    raw = frame({"type": "chunk", **fields}, payload)
    for cut in range(len(raw)):
        with pytest.raises(TransportError):
            wire.read_frame(io.BytesIO(raw[:cut]), max_frame_bytes=LIMIT)
    _header, got = wire.read_frame(io.BytesIO(raw), max_frame_bytes=LIMIT)
    assert bytes(got) == payload


# -- a hostile client of `serve --stdio` ------------------------------------------------------------------


def read_answers(raw: bytes) -> list[dict]:
    """Every frame the server wrote: it must only ever write well-formed frames."""
    stream, answers = io.BytesIO(raw), []
    while stream.tell() < len(raw):
        header, _payload = wire.read_frame(stream)
        answers.append(header)
    return answers


def converse(path, role: str, requests: list[bytes]) -> list[dict]:
    out = io.BytesIO()
    code = serve(str(path), io.BytesIO(frame(wire.hello_request(role)) + b"".join(requests)), out)
    assert code in (0, 1)
    answers = read_answers(out.getvalue())
    assert answers and answers[0]["type"] == "hello", answers[:1]
    return answers[1:]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(source, follower, state of the follower): the follower is 6 commits behind the source."""
    root = tmp_path_factory.mktemp("hostile")
    rng = np.random.default_rng(11)
    model = random_model(rng, rows=200)
    src, dst = root / "src", root / "dst"
    with Replica.init(src, model, bucket_rows=16, model_id="served-model") as r:
        for _ in range(3):
            r.commit(random_update(rng, model))
        local_sync(src, dst)
        for _ in range(6):
            r.commit(random_update(rng, model))
    return src, dst, snapshot_state(dst)


def local_sync(src, dst) -> None:
    from deltalog.transport import open_sink, open_source

    source, sink = open_source(str(src)), open_sink(str(dst))
    try:
        assert sync_mod.sync(source, sink, source_name=str(src), destination_name=str(dst)).complete
    finally:
        sink.close()
        source.close()


def snapshot_state(path) -> dict:
    with Replica.open(path) as r:
        return {"head": r.head, "records": [s.offset for s in r.iter_summaries()],
                "tensors": {n: r.read_tensor(n).copy() for n in r.tensor_names}}


def assert_unchanged(path, before: dict) -> None:
    with Replica.open(path) as r:
        assert r.head == before["head"] and r.pending_sync() is None
        assert [s.offset for s in r.iter_summaries()] == before["records"]
        for name, values in before["tensors"].items():
            assert np.array_equal(bits(r.read_tensor(name)), bits(values)), name
        report = verify(r)
        assert report.ok, report.problems


_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.floats(allow_nan=True), st.text(max_size=20),
    st.binary(max_size=20), st.lists(st.integers(-(2**63), 2**64 - 1), max_size=3),
    st.dictionaries(st.text(max_size=5), st.dictionaries(st.integers(-5, 50), st.integers(-(2**63), 2**63), max_size=3), max_size=2),
)
_ARGS = st.dictionaries(
    st.sampled_from(["since", "target", "advanced", "max_chunk_bytes", "offset", "file", "start", "length", "x"]),
    _VALUES, max_size=6,
)
_SOURCE_KINDS = st.sampled_from(["plan", "chunks", "snapshot_manifest", "read_snapshot_file", "bye", "nope", "hello"])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(_SOURCE_KINDS, _ARGS, st.booleans()), max_size=6))
def test_source_side_survives_random_requests(served, requests):
    """Random request kinds and arguments: error frames or answers, never a crash; the replica untouched.

    ('wait', the long poll of sync --follow, is left out: a random timeout could hold it for an hour.)
    """
    src, _dst, _state = served
    raw = [frame({"type": kind}, msgpack.packb(args) if packed else os.urandom(7)) for kind, args, packed in requests]
    answers = converse(src, "source", raw)
    for answer in answers:
        assert answer["type"] in ("plan", "chunk", "end", "manifest", "data", "error", "bye", "hello"), answer
        if answer["type"] == "error":
            assert isinstance(answer["message"], str) and "\n" not in answer["message"]


def test_source_side_never_serves_files_outside_a_snapshot(served):
    src, _dst, _state = served
    asks = [{"offset": 0, "file": name, "start": 0, "length": 1 << 20}
            for name in ("../../DELTALOG", "../00000.bin", "/etc/passwd", "manifest.json", "lock", "", "00000.bin/..")]
    answers = converse(src, "source", [frame({"type": "read_snapshot_file"}, msgpack.packb(a)) for a in asks])
    assert [a["type"] for a in answers] == ["error"] * len(asks)
    asks = [{"offset": 0, "file": "00000.bin", "start": s, "length": n} for s, n in ((-1, 5), (0, -5), (10**12, 1))]
    answers = converse(src, "source", [frame({"type": "read_snapshot_file"}, msgpack.packb(a)) for a in asks])
    assert [a["type"] for a in answers] == ["error"] * len(asks)


def _chunk(src, since: int, target: int) -> rec.Record:
    with Replica.open(src) as r:
        blob = next(sync_mod.source_chunks(r, since, {}, target, 1 << 20))
    return rec.decode(blob)


def _lies(src, head: int, target: int) -> dict[str, bytes]:
    """Well-formed, correctly checksummed chunks that lie about something."""
    good = _chunk(src, head, target)

    def variant(**changes) -> bytes:
        r = _chunk(src, head, target)
        for key, value in changes.items():
            if key.startswith("t_"):
                setattr(r.tensors[0], key[2:], value(r.tensors[0]))
            else:
                setattr(r, key, value)
        return rec.encode(r)

    return {
        "another model": variant(model_id="someone-else"),
        "a commit, not a sync": variant(kind="commit"),
        "another base": variant(base=head - 1),
        "another target": variant(offset=target + 5, target=target + 5),
        "row out of range": variant(t_rows=lambda t: np.append(t.rows[:-1], np.uint64(10**6)) if len(t.rows) else t.rows),
        "versions in the past": variant(t_versions=lambda t: np.zeros_like(t.versions)),
        "versions missing": variant(t_versions=lambda t: None),
        "unknown tensor": variant(t_name=lambda t: "not-a-tensor"),
        "another dtype": variant(t_dtype=lambda t: "int8" if t.dtype != "int8" else "uint8"),
        "garbage": os.urandom(300),
        "empty": b"",
        "truncated": rec.encode(good)[:-9],
    }


def test_sink_side_refuses_chunks_that_lie_and_changes_nothing(served, tmp_path):
    import shutil

    src, dst0, state = served
    dst = tmp_path / "dst"
    shutil.copytree(dst0, dst)
    with Replica.open(src) as r:
        target = r.head
    lies = _lies(src, state["head"], target)
    requests = [frame({"type": "begin"}, msgpack.packb({"wait": 0}))]
    for blob in lies.values():
        requests.append(frame({"type": "apply_chunk", "target": target, "source": "hostile"}, blob))
    requests.append(frame({"type": "apply_chunk"}, b"x"))  # no target at all
    requests.append(frame({"type": "finish"}, msgpack.packb({"target": "soon", "follow": 3})))
    requests.append(frame({"type": "snapshot_write", "file": "../../DELTALOG", "start": 0}, b"owned"))
    requests.append(frame({"type": "bye"}))
    answers = converse(dst, "sink", requests)
    assert answers[0]["type"] == "state"
    kinds = [a["type"] for a in answers[1:]]
    assert kinds[: len(lies) + 3] == ["error"] * (len(lies) + 3), list(zip([*lies, "no target", "finish", "write"], kinds))
    for name, answer in zip(lies, answers[1:]):
        assert answer["error"] in ("ModelMismatch", "TransportError", "IntegrityError", "InvalidInput"), (name, answer)
    assert_unchanged(dst, state)
    with open(dst / "DELTALOG") as f:
        assert f.read().startswith("deltalog replica")


def test_sink_side_refuses_a_snapshot_that_disagrees_with_its_model(tmp_path):
    data = b"\0" * 8
    hello = {"protocol": 1, "model_id": "m", "head": 0, "oldest_offset": 0, "bucket_rows": 4, "format_version": 1,
             "tensors": [{"name": "x", "dtype": "float32", "shape": [10, 4]}], "snapshots": [0], "time": 0.0}
    manifest = {"offset": 0, "model_id": "m", "tensors": [
        {"name": "x", "dtype": "float32", "shape": [10, 4], "file": "00000.bin", "nbytes": len(data),
         "xxh3": xxhash.xxh3_64(data).hexdigest()}]}
    dst = tmp_path / "dst"
    answers = converse(dst, "sink", [
        frame({"type": "begin"}, msgpack.packb({"wait": 0})),
        frame({"type": "snapshot_begin"}, msgpack.packb({"hello": hello, "manifest": manifest})),
        frame({"type": "snapshot_write", "file": "00000.bin", "start": 0}, data),
        frame({"type": "snapshot_commit"}),
    ])
    if dst.exists():  # whatever it answered, a replica under its name must be sound
        with Replica.open(dst) as r:
            assert verify(r).ok
            assert r.read_tensor("x").shape == (10, 4)
    else:
        assert answers[-1]["type"] == "error"


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.sampled_from(["apply_chunk", "finish", "abort_pending", "note_follow", "snapshot_begin",
                                           "snapshot_write", "snapshot_commit", "nope"]), _ARGS,
                          st.binary(max_size=64)), max_size=5))
def test_sink_side_survives_random_requests(served, tmp_path_factory, requests):
    import shutil

    _src, dst0, state = served
    dst = tmp_path_factory.mktemp("sink") / "dst"
    shutil.copytree(dst0, dst)
    raw = [frame({"type": "begin"}, msgpack.packb({"wait": 0}))]
    for kind, args, blob in requests:
        if kind in ("apply_chunk", "snapshot_write"):
            raw.append(frame({"type": kind, **{k: v for k, v in args.items() if isinstance(v, int)}}, blob))
        else:
            raw.append(frame({"type": kind}, msgpack.packb(args)))
    for answer in converse(dst, "sink", raw):
        assert answer["type"] in ("state", "applied", "ok", "held", "error"), answer
    assert_unchanged(dst, state)


# -- HTTP: tokens everywhere, traversal with a valid token ----------------------------------------------------


def _request(port: int, method: str, path: str, headers: dict | None = None, body: bytes | None = None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.putrequest(method, path, skip_accept_encoding=True)
        for k, v in (headers or {}).items():
            conn.putheader(k, v)
        if body is not None:
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def test_http_token_variants_and_traversal_with_a_valid_token(serve_snapshot_process, served, tmp_path):
    src, _dst, _state = served
    token_file = tmp_path / "token"
    token_file.write_text("s3cret-Token_1\n")
    os.chmod(token_file, 0o600)
    srv = serve_snapshot_process(src, "--token-file", str(token_file), "--quiet")
    good = {"Authorization": "Bearer s3cret-Token_1"}
    bad_tokens = ["Bearer s3cret-Token_", "Bearer s3cret-Token_12", "Bearer S3CRET-TOKEN_1", "Bearer", "Bearer ",
                  "Token s3cret-Token_1", "s3cret-Token_1", "Bearer " + "x" * 4000, "Bearer s3cret-Token_1x",
                  "Bearer \u00e9s3cret"]
    chunks = msgpack.packb({"since": 0, "target": 1, "max_chunk_bytes": 1000})
    endpoints = [("GET", "/v1/status", None), ("GET", "/v1/snapshots/0/manifest.json", None),
                 ("GET", "/v1/chunks?since=0&max_chunk_bytes=1000", None), ("POST", "/v1/chunks", chunks),
                 ("HEAD", "/v1/snapshot/latest", None)]
    for method, path, body in endpoints:
        for value in bad_tokens:
            headers = {"Authorization": value.encode("utf-8").decode("latin-1")}
            if body is not None:
                headers["Content-Type"] = "application/msgpack"
            status, payload = _request(srv.port, method, path, headers, body)
            assert status == 401, (method, path, value, status)
            assert b"deltalog replica" not in payload and len(payload) < 500
        headers = {**good, **({"Content-Type": "application/msgpack"} if body is not None else {})}
        assert _request(srv.port, method, path, headers, body)[0] == 200, (method, path)
    for target in ("/v1/snapshots/0/%252e%252e/%252e%252e/DELTALOG", "/v1/snapshots/0/..%5c..%5cDELTALOG",
                   "/v1/snapshots/0/%c0%ae%c0%ae/DELTALOG", "/v1/snapshots/0/00000.bin;/../../DELTALOG",
                   "/v1/snapshots/0/00000.bin?/../../DELTALOG#x", "/v1/snapshots/0%2f..%2f..%2fDELTALOG"):
        status, payload = _request(srv.port, "GET", target, good)
        assert status in ((200, 400, 404) if "?" in target else (400, 404)), (target, status)  # ?...: a query
        assert b"deltalog replica" not in payload and b"format 1" not in payload
    assert srv.proc.poll() is None
    wrong = tmp_path / "wrong"
    wrong.write_text("nope")
    proc = run_cli("sync", srv.url, tmp_path / "pulled", "--token-file", wrong, "--json")
    assert proc.returncode == 8, proc.stderr
    assert proc.stderr.count("\n") == 1 and "token" in proc.stderr and "Traceback" not in proc.stderr
    assert json.loads(proc.stdout)["error"]["exit_code"] == 8
    assert not (tmp_path / "pulled").exists()
    proc = run_cli("sync", srv.url, tmp_path / "pulled", "--token-file", token_file)
    assert proc.returncode == 0, proc.stderr
