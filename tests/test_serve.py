"""deltalog serve-snapshot against a real server process, and the HTTP Source client."""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import socket
import subprocess
import threading
import time

import numpy as np
import pytest
import xxhash

from deltalog import Replica
from deltalog.checkpoint import read_checkpoint, read_checkpoint_metadata
from deltalog.errors import InvalidInput, OffsetNotRetained, TransportError
from deltalog.server import parse_range, Unsatisfiable
from deltalog.transport.http import HttpSource
from conftest import run_cli
from http_fixture import running_server, serve_snapshot_process, serve_snapshot_url  # noqa: F401

BF16 = np.array([0x3F80, 0x4000, 0xBF80, 0x0000, 0x7F80, 0x1234], dtype=np.uint16)  # raw bfloat16 bits


def make_replica(path, seed=0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    tensors = {
        "emb": rng.standard_normal((2000, 8)).astype(np.float32),
        "bias": np.arange(37, dtype=np.int64) * 3 - 5,
        "half": np.float16(3.5),
        "bf": (BF16.reshape(2, 3), "bfloat16"),
        "empty": np.zeros((0, 4), np.float32),
    }
    with Replica.init(path, tensors, bucket_rows=64, model_id=f"model-{seed}") as r:
        r.commit({"emb": ([3, 700, 1999], rng.standard_normal((3, 8)).astype(np.float32)),
                  "bias": ([1], np.array([42], np.int64))})
        with r.writing():
            r.make_snapshot()  # snapshots at 0 and 1
    return tensors


@pytest.fixture(scope="module")
def replica(tmp_path_factory):
    path = tmp_path_factory.mktemp("served") / "rep"
    make_replica(path)
    return path


@pytest.fixture(scope="module")
def server(replica):
    with running_server(replica) as srv:
        yield srv


def request(url, path, method="GET", headers=None, body=None, timeout=10.0):
    """(status, headers, body) for a raw request target (sent as is, never normalised)."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        conn.putrequest(method, path, skip_host=False, skip_accept_encoding=True)
        for name, value in (headers or {}).items():
            conn.putheader(name, value)
        if body is not None:
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def raw_exchange(port, data: bytes, timeout=5.0) -> bytes:
    """Send raw bytes, return whatever the server answered before closing.

    A server may answer a hostile request and close (or reset) before it has
    read all of it; that is a correct refusal, so the client tolerates it.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        out = b""
        try:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError, OSError):
            pass
        try:
            while chunk := s.recv(65536):
                out += chunk
        except ConnectionResetError:
            pass
        return out


def snapshot_tensors(replica_path, offset) -> dict[str, np.ndarray]:
    """Storage arrays of a snapshot, read straight from its files."""
    from deltalog.dtypes import storage_dtype

    base = os.path.join(replica_path, "snapshots", f"{offset:020d}")
    with open(os.path.join(base, "manifest.json")) as f:
        manifest = json.load(f)
    return {
        t["name"]: np.fromfile(os.path.join(base, t["file"]), dtype=storage_dtype(t["dtype"])).reshape(t["shape"])
        for t in manifest["tensors"]
    }


def assert_same_tensors(checkpoint: dict, expected: dict) -> None:
    assert sorted(checkpoint) == sorted(expected)
    for name, arr in expected.items():
        got = checkpoint[name].array
        assert got.shape == arr.shape, name
        assert got.dtype == arr.dtype, name
        assert got.tobytes() == arr.tobytes(), name


# --------------------------------------------------------------------------- status, downloads


def test_status_is_the_source_hello(server, replica):
    pytest.importorskip("deltalog.sync")
    status, headers, body = request(server.url, "/v1/status")
    assert status == 200 and headers["content-type"] == "application/json"
    hello = json.loads(body)
    with Replica.open(replica) as r:
        assert hello["model_id"] == r.model_id == "model-0"
        assert hello["head"] == r.head == 1
        assert hello["snapshots"] == [0, 1]
        assert hello["bucket_rows"] == 64
        assert [t["name"] for t in hello["tensors"]] == r.tensor_names
    assert isinstance(hello["protocol"], int)


def test_curl_downloads_latest_as_safetensors(server, replica, tmp_path):
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl is not installed")
    out = tmp_path / "model.safetensors"
    subprocess.run([curl, "-sSf", "-o", str(out), f"{server.url}/v1/snapshot/latest"], check=True, timeout=30)
    ckpt = read_checkpoint(out)
    expected = snapshot_tensors(replica, 1)
    assert_same_tensors(ckpt, expected)
    with Replica.open(replica) as r:  # the snapshot at 1 is the model at head 1
        for name in r.tensor_names:
            assert ckpt[name].array.tobytes() == r.read_tensor(name).tobytes()
        assert ckpt["bf"].dtype == "bfloat16"
    assert read_checkpoint_metadata(out) == {"deltalog.model_id": "model-0", "deltalog.offset": "1"}
    with open(out, "rb") as f:  # the data buffer starts 8-byte aligned
        assert (8 + int.from_bytes(f.read(8), "little")) % 8 == 0


def test_snapshot_by_offset_and_headers(server, replica):
    status, headers, body = request(server.url, "/v1/snapshot/0")
    assert status == 200
    assert headers["content-length"] == str(len(body))
    assert 'filename="model-0-0.safetensors"' in headers["content-disposition"]
    assert headers["accept-ranges"] == "bytes"
    assert headers["etag"].startswith('"0-')
    head_status, head_headers, head_body = request(server.url, "/v1/snapshot/0", method="HEAD")
    assert head_status == 200 and head_body == b""
    assert head_headers["content-length"] == headers["content-length"]
    assert head_headers["etag"] == headers["etag"]
    assert request(server.url, "/v1/snapshot/1")[1]["etag"] != headers["etag"]


def test_init_from_downloaded_checkpoint(server, tmp_path):
    status, _, body = request(server.url, "/v1/snapshot/latest")
    (tmp_path / "m.safetensors").write_bytes(body)
    proc = subprocess.run(  # this model's bf16 tensor holds an infinity on purpose: init must be told so
        [*_cli(), "init", str(tmp_path / "copy"), "--from", str(tmp_path / "m.safetensors"), "--json",
         "--allow-nonfinite"],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["model_id"] == "model-0"


def _cli():
    import sys

    return [sys.executable, "-c", "from deltalog.cli import main; main()"]


def test_snapshot_files_and_manifest(server, replica):
    status, headers, body = request(server.url, "/v1/snapshots/1/manifest.json")
    assert status == 200 and headers["content-type"] == "application/json"
    manifest = json.loads(body)
    assert manifest["offset"] == 1 and manifest["model_id"] == "model-0"
    for entry in manifest["tensors"]:
        status, headers, data = request(server.url, f"/v1/snapshots/1/{entry['file']}")
        assert status == 200
        assert len(data) == entry["nbytes"]
        assert xxhash.xxh3_64(data).hexdigest() == entry["xxh3"]


# --------------------------------------------------------------------------- Range


@pytest.mark.parametrize("target", ["/v1/snapshot/latest", "/v1/snapshots/1/00002.bin"])
def test_ranges(server, target):
    _, headers, full = request(server.url, target)
    size, etag = len(full), headers["etag"]
    cases = [
        ("bytes=0-9", 0, 10),
        (f"bytes={size // 3}-{size // 2}", size // 3, size // 2 + 1),
        ("bytes=-100", size - 100, size),
        (f"bytes={size - 7}-", size - 7, size),
        (f"bytes=5-{size * 10}", 5, size),  # a last-pos past the end is clipped
        (f"bytes=-{size * 10}", 0, size),
    ]
    for spec, start, stop in cases:
        status, h, body = request(server.url, target, headers={"Range": spec})
        assert status == 206, spec
        assert body == full[start:stop], spec
        assert h["content-range"] == f"bytes {start}-{stop - 1}/{size}", spec
        assert h["content-length"] == str(stop - start)
        assert h["etag"] == etag
    for spec in (f"bytes={size}-", f"bytes={size + 5}-{size + 10}", "bytes=-0"):
        status, h, body = request(server.url, target, headers={"Range": spec})
        assert status == 416, spec
        assert h["content-range"] == f"bytes */{size}"
        assert full not in body or not full
    # If-Range: the right ETag honours the range, a wrong one sends it all
    status, _, body = request(server.url, target, headers={"Range": "bytes=0-9", "If-Range": etag})
    assert status == 206 and body == full[:10]
    status, _, body = request(server.url, target, headers={"Range": "bytes=0-9", "If-Range": '"0-stale"'})
    assert status == 200 and body == full
    # If-None-Match with the current ETag: 304, no body
    status, _, body = request(server.url, target, headers={"If-None-Match": etag})
    assert status == 304 and body == b""


def test_ranges_across_the_virtual_file(server):
    _, _, full = request(server.url, "/v1/snapshot/0")
    header_end = 8 + int.from_bytes(full[:8], "little")
    rng = np.random.default_rng(1)
    points = [0, header_end - 3, header_end, header_end + 1, len(full) - 1] + list(rng.integers(0, len(full), 6))
    for start in points:
        stop = min(len(full), int(start) + int(rng.integers(1, 20000)))
        status, _, body = request(server.url, "/v1/snapshot/0", headers={"Range": f"bytes={start}-{stop - 1}"})
        assert status == 206 and body == full[start:stop]


@pytest.mark.parametrize(
    "spec", ["bytes=abc", "bytes=5-3", "items=0-1", "bytes=0-1,3-4", "bytes=--1", "bytes", "bytes=", "bytes=-",
             "bytes=0-1-2", "bytes=\x01", "bytes=" + "9" * 30 + "-"],
)
def test_bad_range_syntax_is_ignored(server, spec):
    status, _, body = request(server.url, "/v1/snapshots/1/00001.bin", headers={"Range": spec})
    assert status == 200
    assert len(body) == 37 * 8


def test_parse_range_unit():
    assert parse_range(None, 10) is None
    assert parse_range("bytes=0-0", 10) == (0, 1)
    assert parse_range("bytes=9-", 10) == (9, 10)
    assert parse_range("bytes=-3", 10) == (7, 10)
    assert parse_range("BYTES = 2 - 4", 10) == (2, 5)
    with pytest.raises(Unsatisfiable):
        parse_range("bytes=10-", 10)
    with pytest.raises(Unsatisfiable):
        parse_range("bytes=-1", 0)


def test_etag_changes_when_a_new_snapshot_appears(serve_snapshot_url, tmp_path):
    path = tmp_path / "rep"
    make_replica(path, seed=3)
    url = serve_snapshot_url(path)
    _, before, body_before = request(url, "/v1/snapshot/latest")
    _, status_before, _ = request(url, "/v1/snapshots/1/00000.bin")
    with Replica.open(path) as r:
        r.commit({"bias": ([0], np.array([7], np.int64))})
        with r.writing():
            r.make_snapshot()
    status, after, body_after = request(url, "/v1/snapshot/latest")
    assert status == 200
    assert after["etag"] != before["etag"]
    assert after["etag"].startswith('"2-')
    assert body_after != body_before
    assert request(url, "/v1/snapshot/latest", headers={"If-None-Match": before["etag"]})[0] == 200
    # an old snapshot's files keep their ETag: they never change
    assert request(url, "/v1/snapshots/1/00000.bin")[1]["etag"] == status_before["etag"]
    # the head moved: status and metrics follow the replica while it is served
    _, _, metrics = request(url, "/metrics")
    assert re.search(rb"^deltalog_head 2$", metrics, re.M)


# --------------------------------------------------------------------------- safety


TRAVERSALS = [
    "/v1/snapshots/0/../../../etc/passwd",
    "/v1/snapshots/0/../../DELTALOG",
    "/v1/snapshots/0/%2e%2e/%2e%2e/DELTALOG",
    "/v1/snapshots/0/..%2f..%2fDELTALOG",
    "/v1/snapshots/0/%2e%2e%2f%2e%2e%2fDELTALOG",
    "/v1/snapshots/0/..",
    "/v1/snapshots/0/.",
    "/v1/snapshots/0/",
    "/v1/snapshots/0//etc/passwd",
    "/v1/snapshots/0/%2fetc%2fpasswd",
    "/v1/snapshots/0/00000.bin/../../../DELTALOG",
    "/v1/snapshots/%2e%2e/DELTALOG",
    "/v1/snapshots/../DELTALOG",
    "//etc/passwd",
    "/etc/passwd",
    "/DELTALOG",
    "/v1/snapshots/0/lock",
    "/v1/snapshots/0/DELTALOG",
    "/v1/snapshots/0/00099.bin",
    "/v1/snapshots/0/manifest.json.tmp",
    "/v1/snapshots/7/00000.bin",
    "/v1/snapshots/7/manifest.json",
    "/v1/snapshots/99999999999999999999/manifest.json",
    "/v1/snapshots/-1/manifest.json",
    "/v1/snapshot/12345",
    "/v1/snapshot/..%2f..%2fetc%2fpasswd",
    "http://evil.example/etc/passwd",
    "/v1/snapshots/0/00000.bin%00",
    "/nope",
    "/v1/status/../../etc/passwd",
]


@pytest.mark.parametrize("target", TRAVERSALS)
def test_traversal_attempts_are_404(server, target):
    status, _, body = request(server.url, target)
    assert status == 404, target
    assert b"root:" not in body and b"deltalog replica" not in body
    assert json.loads(body)["error"]["type"] in ("NotFound", "OffsetNotRetained")


def test_binds_loopback_by_default(server):
    assert server.url.startswith("http://127.0.0.1:")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:  # this machine's outward address, if any
        try:
            s.connect(("10.255.255.255", 1))
            outward = s.getsockname()[0]
        except OSError:
            outward = None
    if not outward or outward.startswith("127."):
        pytest.skip("no non-loopback address to test against")
    with pytest.raises(OSError):
        socket.create_connection((outward, server.port), timeout=2).close()


def test_hostile_requests_do_not_crash_the_server(server):
    port = server.port
    answers = [
        raw_exchange(port, b"GET /v1/snapshot/0 HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 200_000 + b"\r\n\r\n"),
        raw_exchange(port, b"GET /metrics HTTP/1.1\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(300)) + b"\r\n"),
        raw_exchange(port, b"GET /" + b"a" * 100_000 + b" HTTP/1.1\r\n\r\n"),
        raw_exchange(port, b"GARBAGE\r\n\r\n"),
        raw_exchange(port, b"\x00\xff\xfe binary junk \r\n\r\n"),
        raw_exchange(port, b"GET /v1/snapshot/0 HTTP/9.9\r\n\r\n"),
        raw_exchange(port, b"GET /v1/snapshot/0\r\n\r\n"),
        raw_exchange(port, b"DELETE /v1/snapshot/0 HTTP/1.1\r\nHost: x\r\n\r\n"),
        raw_exchange(port, b"POST /v1/chunks HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999\r\n\r\n"),
        raw_exchange(port, b"POST /v1/chunks HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n{{{{{"),
        raw_exchange(port, b"GET /v1/snapshot/0 HTTP/1.1\r\nHost: x\r\nRange: bytes=" + b"1" * 5000 + b"-\r\n\r\n"),
        raw_exchange(port, b"GET /v1/snapshot/latest HTTP/1.1\r\nHost: x\r\n"),  # never finishes its headers
        raw_exchange(port, b""),
    ]
    for answer in answers[:11]:
        assert re.match(rb"HTTP/1\.1 [2-5]\d\d ", answer), answer[:100]
    assert answers[0].startswith((b"HTTP/1.1 431", b"HTTP/1.1 400"))
    assert answers[1].startswith(b"HTTP/1.1 431")
    assert answers[2].startswith(b"HTTP/1.1 414")
    for i in (3, 4, 6, 9):
        assert answers[i].startswith(b"HTTP/1.1 400"), answers[i][:100]
    assert answers[5].startswith(b"HTTP/1.1 505")
    assert answers[7].startswith(b"HTTP/1.1 501")  # a method no endpoint has
    assert answers[8].startswith(b"HTTP/1.1 413")
    assert answers[10].startswith(b"HTTP/1.1 200")  # an absurd range is ignored
    assert request(server.url, "/v1/snapshot/0", method="HEAD")[0] == 200
    assert server.proc.poll() is None


def test_unread_request_body_is_never_taken_for_a_request(server):
    smuggled = b"GET /v1/snapshot/0 HTTP/1.1\r\nHost: x\r\n\r\n"
    for head in (b"POST /nope HTTP/1.1", b"POST /v1/snapshot/0 HTTP/1.1", b"GET /metrics HTTP/1.1"):
        answer = raw_exchange(
            server.port, head + b"\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(smuggled) + smuggled
        )
        assert answer.count(b"HTTP/1.1 ") == 1, answer[:300]


def test_client_that_vanishes_mid_download(server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
        s.sendall(b"GET /v1/snapshot/latest HTTP/1.1\r\nHost: x\r\n\r\n")
        s.recv(100)
    assert request(server.url, "/v1/snapshot/latest", method="HEAD")[0] == 200


def test_keep_alive_serves_several_requests_on_one_connection(server):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    try:
        for target in ("/v1/snapshots/1/manifest.json", "/v1/snapshot/1", "/metrics", "/nope"):
            conn.request("GET", target)
            resp = conn.getresponse()
            resp.read()
            assert resp.status in (200, 404)
    finally:
        conn.close()


# --------------------------------------------------------------------------- auth, metrics, limits


def test_token(serve_snapshot_process, replica, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("s3cret-token\n")
    os.chmod(token_file, 0o600)
    srv = serve_snapshot_process(replica, "--token-file", str(token_file))
    for target in ("/v1/snapshot/latest", "/metrics", "/v1/snapshots/1/00000.bin", "/nope", "/v1/status"):
        status, headers, body = request(srv.url, target)
        assert status == 401, target
        assert headers["www-authenticate"].startswith("Bearer")
        assert b"root:" not in body and len(body) < 500
        assert request(srv.url, target, headers={"Authorization": "Bearer wrong"})[0] == 401
        assert request(srv.url, target, headers={"Authorization": "Basic czNjcmV0LXRva2Vu"})[0] == 401
    assert request(srv.url, "/v1/snapshot/latest", headers={"Authorization": "Bearer s3cret-token"})[0] == 200
    assert request(srv.url, "/metrics", headers={"Authorization": "bearer s3cret-token"})[0] == 200
    assert "warning" not in srv.log()

    src = HttpSource(srv.url, token="wrong")
    with pytest.raises(TransportError, match="token rejected"):
        src.snapshot_manifest(1)
    src.close()
    src = HttpSource(srv.url)
    os.environ.pop("DELTALOG_TOKEN", None)
    with pytest.raises(TransportError, match="needs a token"):
        src.snapshot_manifest(1)
    src.close()
    os.environ["DELTALOG_TOKEN"] = "s3cret-token"
    try:
        with HttpSource(srv.url) as src:
            assert src.snapshot_manifest(1)["offset"] == 1
    finally:
        del os.environ["DELTALOG_TOKEN"]


def test_token_file_problems(replica, tmp_path):
    empty = tmp_path / "empty"
    empty.write_text("  \n")
    proc = subprocess.run([*_cli(), "serve-snapshot", str(replica), "--port", "0", "--token-file", str(empty)],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == InvalidInput.exit_code
    assert "token file must hold one token" in proc.stderr and "Traceback" not in proc.stderr


def test_world_readable_token_file_warns(serve_snapshot_process, replica, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("abc")
    os.chmod(token_file, 0o644)
    srv = serve_snapshot_process(replica, "--token-file", str(token_file))
    assert "readable by other users" in srv.log()


PROM_LINE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(?:[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\]|\\.)*",?)*\})? (-?[0-9.e+]+)$')


def parse_prometheus(text: str) -> dict[str, float]:
    samples = {}
    for line in text.splitlines():
        if not line or line.startswith("# HELP ") or line.startswith("# TYPE "):
            continue
        m = PROM_LINE.match(line)
        assert m, f"not Prometheus text: {line!r}"
        samples[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    return samples


def test_metrics(server):
    status, headers, body = request(server.url, "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain; version=0.0.4")
    before = parse_prometheus(body.decode())
    assert before["deltalog_head"] == 1
    assert before["deltalog_oldest_offset"] == 0
    assert before["deltalog_active_connections"] >= 1
    key = 'deltalog_requests_total{path="/v1/snapshot/{offset}",code="200"}'
    request(server.url, "/v1/snapshot/1")
    request(server.url, "/v1/snapshot/1")
    request(server.url, "/definitely/not/here")
    after = parse_prometheus(request(server.url, "/metrics")[2].decode())
    assert after[key] == before.get(key, 0) + 2
    assert after["deltalog_bytes_sent_total"] > before["deltalog_bytes_sent_total"] + 2 * 64000
    assert after['deltalog_requests_total{path="other",code="404"}'] >= 1
    types = re.findall(r"^# TYPE (\S+) (\S+)$", body.decode(), re.M)
    assert ("deltalog_requests_total", "counter") in types and ("deltalog_head", "gauge") in types


def test_connection_cap_answers_503(serve_snapshot_process, replica):
    srv = serve_snapshot_process(replica, "--max-connections", "1")
    with socket.create_connection(("127.0.0.1", srv.port), timeout=5):  # holds the only slot
        time.sleep(0.3)
        status, headers, body = request(srv.url, "/v1/snapshot/latest")
        assert status == 503
        assert headers["retry-after"] == "1"
        with pytest.raises(TransportError, match="busy"):
            HttpSource(srv.url).snapshot_manifest(0)
    deadline = time.monotonic() + 5
    while (status := request(srv.url, "/v1/snapshot/latest")[0]) == 503 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert status == 200


def test_sigterm_stops_cleanly(serve_snapshot_process, replica):
    srv = serve_snapshot_process(replica)
    assert request(srv.url, "/v1/snapshot/0", method="HEAD")[0] == 200
    started = time.monotonic()
    assert srv.stop() == 0
    assert time.monotonic() - started < 4
    assert "Traceback" not in srv.log()
    assert re.search(r'127\.0\.0\.1 "HEAD /v1/snapshot/0 HTTP/1\.1" 200 0 ', srv.log())


def test_quiet_logs_nothing_per_request(serve_snapshot_process, replica):
    srv = serve_snapshot_process(replica, "--quiet")
    request(srv.url, "/v1/snapshot/0", method="HEAD")
    srv.stop()
    assert srv.log().strip().splitlines() == [f"serving {replica} on {srv.url}"]


def test_not_a_replica(tmp_path):
    proc = subprocess.run([*_cli(), "serve-snapshot", str(tmp_path / "missing"), "--port", "0"],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 3 and "no such replica" in proc.stderr


# --------------------------------------------------------------------------- the HTTP Source


def test_http_source_snapshot_files(server, replica):
    with HttpSource(server.url) as src:
        manifest = src.snapshot_manifest(1)
        assert manifest["model_id"] == "model-0"
        for entry in manifest["tensors"]:
            data = b""
            while True:
                piece = src.read_snapshot_file(1, entry["file"], len(data), 1000)
                if not piece:
                    break
                data += piece
            assert len(data) == entry["nbytes"]
            assert xxhash.xxh3_64(data).hexdigest() == entry["xxh3"]
        assert src.read_snapshot_file(1, "00001.bin", 10**9, 10) == b""
        with pytest.raises(OffsetNotRetained):
            src.snapshot_manifest(5)
        with pytest.raises(OffsetNotRetained):
            src.read_snapshot_file(1, "00042.bin", 0, 10)
        with pytest.raises(InvalidInput):
            src.read_snapshot_file(1, "../DELTALOG", 0, 10)


def test_http_source_connection_refused():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nobody listens here once closed
    with pytest.raises(TransportError, match="connection refused") as err:
        HttpSource(f"http://127.0.0.1:{port}").snapshot_manifest(0)
    assert err.value.exit_code == 8


def test_http_source_not_a_url():
    with pytest.raises(InvalidInput):
        HttpSource("ftp://x/y")


def _fake_server(response: bytes):
    """A one-shot server that reads a request, answers ``response`` and hangs up."""
    listener = socket.create_server(("127.0.0.1", 0))

    def run():
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(5)
            data = b""
            while b"\r\n\r\n" not in data:
                data += conn.recv(65536)
            head, _, rest = data.partition(b"\r\n\r\n")
            m = re.search(rb"Content-Length: (\d+)", head, re.I)
            need = int(m.group(1)) if m else 0
            while len(rest) < need:
                rest += conn.recv(65536)
            conn.sendall(response)
        listener.close()

    threading.Thread(target=run, daemon=True).start()
    return f"http://127.0.0.1:{listener.getsockname()[1]}"


def test_http_source_stream_cut_mid_frame():
    from deltalog.wire import encode_header

    frame = encode_header({"type": "chunk"}, b"x" * 1000) + b"x" * 1000
    cut = frame[: len(frame) // 2]
    body = b"%x\r\n" % len(cut) + cut + b"\r\n"  # no end frame, no last chunk: the server died
    url = _fake_server(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + body)
    with HttpSource(url, timeout=5) as src, pytest.raises(TransportError) as err:
        list(src.chunks(0, {}, 1, 1 << 20))
    assert "\n" not in str(err.value)


def test_http_source_stream_without_end_frame():
    from deltalog.wire import encode_header

    frame = encode_header({"type": "chunk"}, b"abc") + b"abc"
    body = b"%x\r\n" % len(frame) + frame + b"\r\n0\r\n\r\n"
    url = _fake_server(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + body)
    with HttpSource(url, timeout=5) as src, pytest.raises(TransportError, match="cut after 1 chunks"):
        list(src.chunks(0, {}, 1, 1 << 20))


def test_http_source_corrupt_frame_is_integrity_error():
    from deltalog.errors import IntegrityError
    from deltalog.wire import encode_header

    frame = encode_header({"type": "chunk"}, b"abcdef") + b"abcdeX"
    body = b"%x\r\n" % len(frame) + frame + b"\r\n0\r\n\r\n"
    url = _fake_server(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + body)
    with HttpSource(url, timeout=5) as src, pytest.raises(IntegrityError):
        list(src.chunks(0, {}, 1, 1 << 20))


def test_http_source_garbage_answer():
    url = _fake_server(b"SSH-2.0-OpenSSH\r\n\r\n")
    with HttpSource(url, timeout=5) as src, pytest.raises(TransportError):
        src.snapshot_manifest(0)


def test_http_source_hello(server, replica):
    pytest.importorskip("deltalog.sync")
    from deltalog.sync import source_hello

    with HttpSource(server.url) as src:
        hello = src.hello()
    with Replica.open(replica) as r:
        local = source_hello(r)
    hello.pop("time", None), local.pop("time", None)
    assert hello == local


def _comparable(blob: bytes):
    """A decoded record without its encoding time (the only field two encodings differ in)."""
    from deltalog.record import decode

    r = decode(blob)
    return (r.offset, r.base, r.kind, r.target, r.model_id,
            [(t.name, t.dtype, t.rows.tobytes(), t.new.tobytes(), None if t.versions is None else t.versions.tobytes())
             for t in r.tensors])


def test_http_source_chunks_round_trip(serve_snapshot_url, tmp_path):
    sync = pytest.importorskip("deltalog.sync")
    path = tmp_path / "rep"
    make_replica(path, seed=5)
    rng = np.random.default_rng(9)
    with Replica.open(path) as r:
        for _ in range(4):
            rows = rng.choice(2000, 50, replace=False)
            r.commit({"emb": (rows, rng.standard_normal((50, 8)).astype(np.float32))})
        head = r.head
    url = serve_snapshot_url(path)
    with Replica.open(path) as r:
        for since, chunk_bytes in ((0, 1 << 20), (1, 4096), (head - 1, 100)):
            local = list(sync.source_chunks(r, since, {}, head, chunk_bytes))
            with HttpSource(url) as src:
                remote = list(src.chunks(since, {}, head, chunk_bytes))
            assert local and [_comparable(b) for b in remote] == [_comparable(b) for b in local]
        with HttpSource(url) as src:
            with pytest.raises(OffsetNotRetained):
                list(src.chunks(0, {}, head + 100, 1 << 20))
            # stopping early, then reusing the source, works
            stream = src.chunks(0, {}, head, 100)
            next(stream)
            stream.close()
            assert src.snapshot_manifest(0)["offset"] == 0


def test_http_source_plan_and_manifest_match_local(server, replica):
    sync = pytest.importorskip("deltalog.sync")
    with HttpSource(server.url) as src, Replica.open(replica) as r:
        assert src.plan(0, {}, 1) == sync.source_plan(r, 0, {}, 1)
        assert src.plan(0, {"emb": {0: 1}}, 1) == sync.source_plan(r, 0, {"emb": {0: 1}}, 1)
        for offset in (0, 1):
            assert src.snapshot_manifest(offset) == sync.source_snapshot_manifest(r, offset)
        with pytest.raises(OffsetNotRetained):
            src.plan(0, {}, 99)


def test_chunks_query_form_and_bad_parameters(server):
    status, headers, body = request(server.url, "/v1/chunks?since=0&max_chunk_bytes=100000")
    assert status == 200 and headers["content-type"] == "application/x-deltalog-frames"
    assert headers["transfer-encoding"] == "chunked"
    for query in ("", "?since=abc", "?since=0&max_chunk_bytes=0", "?since=0&target=-4"):
        status, _, body = request(server.url, "/v1/chunks" + query)
        assert status == 400, query
        assert json.loads(body)["error"]["type"] == "InvalidInput"
    status, _, body = request(server.url, "/v1/chunks?since=0&max_chunk_bytes=100000&base_values=1")
    assert status == 200  # values relative to the destination's, asked in a query string
    for body in (b'{"since": 0, "base_values": "yes"}', b'{"since": 0, "base_values": true, "advanced": {"e": {"0": 1}}}'):
        status, _, answer = request(server.url, "/v1/chunks", method="POST", body=body,
                                    headers={"Content-Type": "application/json"})
        assert status == 400 and "base_values" in json.loads(answer)["error"]["message"], body
    status, _, body = request(server.url, "/v1/chunks", method="POST", body=b'{"since": 0, "advanced": [1, 2]}',
                              headers={"Content-Type": "application/json"})
    assert status == 400
    status, _, body = request(server.url, "/v1/chunks", method="POST", body=b"\xc1\xc1",
                              headers={"Content-Type": "application/msgpack"})
    assert status == 400
    for body in (b'{"since": 0, "advanced": {"e": {"-1": 1}}}', b'{"since": 0, "advanced": {"e": {"0": -1}}}',
                 b'{"since": 0, "advanced": {"e": {"0": 1e400}}}', b'{"since": 0, "max_chunk_bytes": 1e400}',
                 b'{"since": 0, "target": 1e400}', b'{"since": 1.5}', b'{"since": true}'):
        status, _, answer = request(server.url, "/v1/chunks", method="POST", body=body,
                                    headers={"Content-Type": "application/json"})
        assert status == 400 and json.loads(answer)["error"]["type"] == "InvalidInput", (body, answer)  # never 500


def test_download_survives_compaction_deleting_the_snapshot(serve_snapshot_url, tmp_path):
    path = tmp_path / "rep"
    # 32 MiB: far more than loopback socket buffers hold, so the server is mid-sendfile when the files go
    big = np.random.default_rng(2).standard_normal((1 << 17, 64)).astype(np.float32)
    Replica.init(path, {"big": big}, bucket_rows=1024).close()
    url = serve_snapshot_url(path)
    port = int(url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"GET /v1/snapshots/0/00000.bin HTTP/1.1\r\nHost: x\r\n\r\n")
        received = bytearray(s.recv(65536))
        time.sleep(0.2)
        shutil.rmtree(path / "snapshots" / f"{0:020d}")  # what compaction does to an old snapshot
        while chunk := s.recv(1 << 20):
            received += chunk
            if len(received) >= big.nbytes + received.index(b"\r\n\r\n") + 4:
                break
    head, _, body = bytes(received).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert body == big.tobytes()
    # once gone, the snapshot is not found (never a server error)
    status, _, body = request(url, "/v1/snapshots/0/00000.bin")
    assert status == 404 and b"removed" in body


def test_idle_connection_gives_its_slot_back(serve_snapshot_process, replica):
    srv = serve_snapshot_process(replica, "--max-connections", "1", "--timeout", "1")
    with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as idle:
        time.sleep(0.3)
        assert request(srv.url, "/metrics")[0] == 503
        time.sleep(1.2)  # the server drops a connection that sends nothing for --timeout
        assert idle.recv(10) == b""
        assert request(srv.url, "/metrics")[0] == 200


def test_metrics_name_the_model_its_digest_and_a_followers_source_and_lag(serve_snapshot_url, tmp_path):
    from deltalog import lineage

    primary, follower = tmp_path / "primary", tmp_path / "follower"
    make_replica(primary, seed=5)
    assert run_cli("sync", primary, follower).returncode == 0
    with Replica.open(primary) as r:
        r.commit({"bias": ([0], np.array([7], np.int64))})  # the follower is now one offset behind
    with Replica.open(follower) as f:
        model_id, digest = f.model_id, lineage.to_hex(f.state_digest)
    _, _, metrics = request(serve_snapshot_url(follower), "/metrics")
    info = re.search(rb'^deltalog_replica_info\{model_id="([^"]*)",state_digest="([^"]*)",source="([^"]*)"\} 1$',
                     metrics, re.M)
    assert info and info.group(1).decode() == model_id and info.group(2).decode() == digest
    assert info.group(3).decode() == str(primary)
    assert re.search(rb"^deltalog_lag_offsets 0$", metrics, re.M)  # as of its last sync
    assert re.search(rb"^deltalog_lag_seconds [0-9.]+$", metrics, re.M)
    _, _, metrics = request(serve_snapshot_url(primary), "/metrics")
    assert re.search(rb'^deltalog_replica_info\{.*source=""\} 1$', metrics, re.M)
    assert b"deltalog_lag_offsets" not in metrics
