"""The HTTP server behind ``deltalog serve-snapshot``: a replica, read-only, over HTTP.

Endpoints (API version 1; every one needs ``Authorization: Bearer TOKEN``
when the server has a token):

    GET  /v1/status                         the source hello (JSON; msgpack if Accept asks)
    GET  /v1/snapshots/OFFSET               a snapshot's manifest plus the bucket versions a
                                            replica made from it starts with (sync's view)
    GET  /v1/snapshots/OFFSET/manifest.json a snapshot's manifest, as written on disk
    GET  /v1/snapshots/OFFSET/FILE          one immutable snapshot file (FILE named by the manifest)
    GET  /v1/snapshot/latest                the newest snapshot as ONE .safetensors file
    GET  /v1/snapshot/OFFSET                the snapshot at OFFSET as one .safetensors file
    POST /v1/chunks                         encoded records as wire frames (body: msgpack or JSON
                                            {since, advanced, target, max_chunk_bytes});
                                            GET /v1/chunks?since=&target=&max_chunk_bytes= too
    POST /v1/plan                           what /v1/chunks would send, without the values
                                            (body {since, advanced, target}; GET with a query too)
    GET  /v1/wait?since=H&timeout=T         long-poll: answers {head, changed} as soon as the head
                                            differs from H, or after T seconds (default 30, at
                                            most 600) with the head unchanged (sync --follow)
    GET  /v1/digest?offset=H                {offset, state_digest}: the state digest at H (null when
                                            unknown), also at an offset compaction dropped (sync
                                            proves a far-behind replica holds this history with it)
    GET  /metrics                           Prometheus text

Files are streamed with ``socket.sendfile`` from descriptors opened before
the response starts, never from a held LMDB read transaction; a snapshot
directory that compaction deletes mid-download keeps serving from those
descriptors. File and snapshot downloads honour a single byte Range (206,
416), a strong ETag, If-Range, If-None-Match and HEAD; anything else in a
Range header is ignored, as RFC 9110 allows, and the whole body is sent.

Nothing outside the replica is reachable: a URL path must match one of the
patterns above character for character (no percent-decoding, so encoded
traversal matches nothing), an offset must be a registered snapshot and a
file name must be one the snapshot's manifest lists; paths on disk are
built from the manifest, never from the request.

Errors are JSON ``{"error": {"type", "message", "hint", "exit_code"}}``,
the shape ``deltalog --json`` prints, so the HTTP client re-raises the same
error class a local source would have raised.
"""

from __future__ import annotations

import hmac
import json
import errno
import os
import re
import signal
import socket
import socketserver
import struct
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import xxhash

from . import __version__, tensorfiles
from .errors import (
    DeltalogError,
    IntegrityError,
    InvalidInput,
    ModelMismatch,
    NotAReplica,
    OffsetNotRetained,
    TransportError,
    UnsupportedVersion,
)

API_PREFIX = "/v1"
DEFAULT_PORT = 8765
DEFAULT_MAX_CONNECTIONS = 32
DEFAULT_TIMEOUT = 60.0
HEADER_TIMEOUT = 10.0  # seconds to send a request's head (and to stay idle between keep-alive requests)
JSON_TYPE = "application/json"
MSGPACK_TYPE = "application/msgpack"
FRAMES_TYPE = "application/x-deltalog-frames"
SAFETENSORS_TYPE = "application/octet-stream"
MAX_BODY_BYTES = 64 << 20  # a /v1/chunks request: the advanced-bucket list of a huge model fits
_STREAM_CHUNK = 1 << 20  # chunked-encoding writes are batched up to this size
_MAX_U64 = (1 << 64) - 1
DEFAULT_WAIT_SECONDS = 30.0
MAX_WAIT_SECONDS = 600.0
_WAIT_CHECK_CLIENT = 0.25  # a long-poll checks this often that its client is still there

# Paths are matched on the raw request target: no percent-decoding, no
# normalisation. Anything else is 404, so "%2e%2e", "..", "//" and absolute
# paths cannot name a file.
_SNAPSHOT = re.compile(r"/v1/snapshots/([0-9]{1,20})")
_SNAPSHOT_FILE = re.compile(r"/v1/snapshots/([0-9]{1,20})/([A-Za-z0-9_][A-Za-z0-9_.-]{0,99})")
_SNAPSHOT_ST = re.compile(r"/v1/snapshot/(latest|[0-9]{1,20})(?:\.safetensors)?")
_SAFE_FILE = re.compile(r"[0-9]{5}\.bin")  # what tensorfiles names tensor files
_RANGE = re.compile(r"\s*bytes\s*=\s*([0-9]{0,20})\s*-\s*([0-9]{0,20})\s*", re.IGNORECASE)

# error class -> HTTP status for errors raised while serving
_ERROR_STATUS = {
    NotAReplica: 404,
    OffsetNotRetained: 410,
    InvalidInput: 400,
    ModelMismatch: 409,
    UnsupportedVersion: 400,
    IntegrityError: 500,
}


def error_body(exc: DeltalogError) -> dict:
    return {"error": {"type": type(exc).__name__, "message": str(exc), "hint": exc.hint, "exit_code": exc.exit_code}}


# ---------------------------------------------------------------------------
# Range


class Unsatisfiable(Exception):
    """The Range header asks for bytes the representation does not have."""


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """(start, stop) of a single satisfiable byte range, or None to send everything.

    A missing, malformed, multi-range or non-bytes header is ignored (the
    whole representation is sent: RFC 9110 section 14.2 allows it).
    Raises :class:`Unsatisfiable` for a well-formed range past the end.
    """
    if header is None or "," in header:
        return None
    m = _RANGE.fullmatch(header)
    if not m:
        return None
    first, last = m.group(1), m.group(2)
    if first == "":
        if last == "":
            return None
        suffix = int(last)
        if suffix == 0 or size == 0:
            raise Unsatisfiable
        return max(0, size - suffix), size
    start = int(first)
    stop = size if last == "" else int(last) + 1
    if last != "" and stop <= start:
        return None  # "5-3" is invalid syntax, not unsatisfiable
    if start >= size:
        raise Unsatisfiable
    return start, min(stop, size)


# ---------------------------------------------------------------------------
# bodies


@dataclass
class _Segment:
    """A piece of a response body: bytes, or a span of an open file."""

    length: int
    data: bytes | None = None
    file: object | None = None  # a binary file object, read from offset 0


@dataclass
class _Resource:
    """A downloadable representation: its segments, ETag and headers."""

    segments: list[_Segment]
    etag: str
    content_type: str
    cache_control: str
    disposition: str | None = None

    @property
    def size(self) -> int:
        return sum(s.length for s in self.segments)

    def close(self) -> None:
        for seg in self.segments:
            if seg.file is not None:
                seg.file.close()


def _etag(model_id: str, offset: int, name: str, digest: str) -> str:
    h = xxhash.xxh3_64(f"{model_id}\0{offset}\0{name}\0{digest}".encode()).hexdigest()
    return f'"{offset}-{h}"'


def safetensors_header(manifest: dict) -> bytes:
    """The 8-byte length and JSON header of a snapshot exported as safetensors.

    The data buffer that follows is the snapshot's tensor files in manifest
    order, so the whole file is generated without copying a tensor byte.
    """
    from .checkpoint import SAFETENSORS_DTYPE_CODES  # one dtype table for the reader and this writer

    header: dict[str, object] = {
        "__metadata__": {"deltalog.model_id": manifest["model_id"], "deltalog.offset": str(manifest["offset"])}
    }
    pos = 0
    for entry in manifest["tensors"]:
        if entry["name"] in header:
            raise InvalidInput(f"tensor {entry['name']!r} cannot be exported as safetensors (reserved name)")
        header[entry["name"]] = {
            "dtype": SAFETENSORS_DTYPE_CODES[entry["dtype"]],
            "shape": list(entry["shape"]),
            "data_offsets": [pos, pos + entry["nbytes"]],
        }
        pos += entry["nbytes"]
    raw = json.dumps(header, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-(8 + len(raw)) % 8)  # the data buffer starts 8-byte aligned
    return struct.pack("<Q", len(raw)) + raw


# ---------------------------------------------------------------------------
# metrics


class Metrics:
    """Counters exported at /metrics (Prometheus text format 0.0.4)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = {}
        self.bytes_sent = 0
        self.active_connections = 0
        self.active_requests = 0
        self.rejected_connections = 0

    def count_request(self, route: str, code: int, nbytes: int) -> None:
        with self._lock:
            key = (route, code)
            self.requests[key] = self.requests.get(key, 0) + 1
            self.bytes_sent += nbytes

    def render(self, gauges: dict[str, tuple[str, float]]) -> str:
        with self._lock:
            requests = sorted(self.requests.items())
            sent, conns, rejected = self.bytes_sent, self.active_connections, self.rejected_connections
        lines = []

        def metric(name: str, kind: str, help_text: str, samples: list[tuple[str, float]]) -> None:
            lines.append(f"# HELP {name} {help_text}")
            lines.append(f"# TYPE {name} {kind}")
            for labels, value in samples:
                lines.append(f"{name}{labels} {_number(value)}")

        for name, (help_text, value) in gauges.items():  # a value, or [(labels, value), ...]
            metric(name, "gauge", help_text, value if isinstance(value, list) else [("", value)])
        metric(
            "deltalog_requests_total", "counter", "HTTP requests answered, by route and status code.",
            [(f'{{path="{_label(route)}",code="{code}"}}', n) for (route, code), n in requests],
        )
        metric("deltalog_bytes_sent_total", "counter", "Response body bytes sent.", [("", sent)])
        metric("deltalog_active_connections", "gauge", "Open client connections.", [("", conns)])
        metric(
            "deltalog_rejected_connections_total", "counter",
            "Connections refused with 503 because --max-connections were open.", [("", rejected)],
        )
        return "\n".join(lines) + "\n"


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _printable(text: str, limit: int = 200) -> str:
    """Request text made safe for a log line (no control characters)."""
    safe = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text[:limit])
    return safe + ("..." if len(text) > limit else "")


# ---------------------------------------------------------------------------
# long-poll


class HeadWatcher:
    """Wakes the /v1/wait long-polls when the served replica's head moves.

    One thread, running only while someone waits, re-reads the head every
    ``poll`` seconds (one LMDB read; the writer is another process, so there
    is nothing to be notified by) and wakes every waiter when it changes: N
    waiting followers cost one reader, not N.
    """

    def __init__(self, read_head: Callable[[], int], poll: float | None = None):
        from .sync import HEAD_POLL_SECONDS

        self._read_head = read_head
        self._poll = HEAD_POLL_SECONDS if poll is None else poll
        self._cond = threading.Condition()
        self._head: int | None = None  # as last read by the thread (None: not running)
        self._waiters = 0
        self._running = False
        self.error: BaseException | None = None  # why the watching thread last stopped early

    def wait(self, since: int, timeout: float, gone: Callable[[], bool] = lambda: False) -> int:
        """The head as soon as it differs from ``since``, or at ``timeout``.

        ``gone()`` is asked every quarter second; True (the client hung up)
        raises ConnectionAbortedError.
        """
        head = self._read_head()
        if head != since or timeout <= 0:
            return head
        deadline = time.monotonic() + timeout
        with self._cond:
            self._waiters += 1
            if not self._running:
                self._running = True
                self._head = head
                threading.Thread(target=self._run, daemon=True, name="deltalog-head-watch").start()
            try:
                while True:
                    if self._head is not None and self._head != since:
                        return self._head
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return self._head if self._head is not None else head
                    self._cond.wait(min(left, _WAIT_CHECK_CLIENT))
                    if gone():
                        raise ConnectionAbortedError("the client of a long-poll went away")
            finally:
                self._waiters -= 1

    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    if not self._waiters:
                        return
                head = self._read_head()
                with self._cond:
                    if head != self._head:
                        self._head = head
                        self._cond.notify_all()
                time.sleep(self._poll)
        except Exception as exc:  # noqa: BLE001 - the replica went away (shutdown): waiters time out on their own
            self.error = exc
        finally:
            with self._cond:
                self._running = False
                self._head = None
                self._cond.notify_all()


# ---------------------------------------------------------------------------
# the server


class SnapshotServer(ThreadingHTTPServer):
    """Serves one replica read-only. One thread per connection, at most ``max_connections``."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(
        self,
        replica,
        host: str = "127.0.0.1",
        port: int = DEFAULT_PORT,
        *,
        token: str | None = None,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        timeout: float = DEFAULT_TIMEOUT,
        log: Callable[[str], None] | None = None,
    ):
        if max_connections < 1:
            raise InvalidInput("--max-connections must be at least 1")
        self.replica = replica
        self.token = token.encode() if token else None
        self.max_connections = max_connections
        self.request_timeout = timeout
        self.log = log
        self.metrics = Metrics()
        self.head_watcher = HeadWatcher(lambda: self.replica.head)
        self.started = time.time()
        self._conn_lock = threading.Lock()
        self._rejecting = 0
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            super().__init__((host, port), _Handler)
        except OSError as exc:
            raise _listen_error(host, port, exc) from None

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the host's FQDN, which can stall on DNS.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def shutdown_request(self, request) -> None:
        """Lingering close: stop sending, then drain what the client still sends.

        Closing a socket with unread input makes the kernel send RST, which
        can destroy the error answer we just wrote (431, 413, ...) before the
        client reads it. Bounded: at most 1 MiB or 2 seconds of draining.
        """
        try:
            request.shutdown(socket.SHUT_WR)
            request.settimeout(0.25)
            deadline, drained = time.monotonic() + 2.0, 0
            while drained < (1 << 20) and time.monotonic() < deadline:
                chunk = request.recv(65536)
                if not chunk:
                    break
                drained += len(chunk)
        except OSError:
            pass
        self.close_request(request)

    # -- connection cap ---------------------------------------------------------

    def process_request(self, request, client_address) -> None:
        with self._conn_lock:
            accept = self.metrics.active_connections < self.max_connections
            if accept:
                self.metrics.active_connections += 1
            else:
                self.metrics.rejected_connections += 1
        if not accept:
            self._reject(request, client_address)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._connection_done()
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._connection_done()

    def _connection_done(self) -> None:
        with self._conn_lock:
            self.metrics.active_connections -= 1

    def _reject(self, request, client_address) -> None:
        """Answer 503 on a short-lived thread that lets the client read it before we close."""
        body = json.dumps(
            {"error": {"type": "Busy", "message": f"server busy: {self.max_connections} connections open",
                       "hint": "retry shortly", "exit_code": 8}}
        ).encode()
        response = (
            "HTTP/1.1 503 Service Unavailable\r\n"
            f"Server: deltalog/{__version__}\r\nRetry-After: 1\r\nContent-Type: {JSON_TYPE}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        ).encode() + body
        self.metrics.count_request("*", 503, len(body))
        if self.log:
            self.log(f"{client_address[0]} - 503 over capacity ({self.max_connections} connections)")

        def answer() -> None:
            try:
                request.settimeout(2.0)
                request.sendall(response)
                request.shutdown(socket.SHUT_WR)
                # Drain the request so closing does not reset the connection
                # (a reset can destroy the 503 before the client reads it).
                deadline = time.monotonic() + 2.0
                while time.monotonic() < deadline and request.recv(65536):
                    pass
            except OSError:
                pass
            finally:
                request.close()
                with self._conn_lock:
                    self._rejecting -= 1

        with self._conn_lock:
            spawn = self._rejecting < 64
            if spawn:
                self._rejecting += 1
        if spawn:
            threading.Thread(target=answer, daemon=True, name="deltalog-reject").start()
        else:
            request.close()

    def handle_error(self, request, client_address) -> None:
        # one line, not the stdlib's traceback: a client's misbehaviour is not ours
        exc = sys.exc_info()[1]
        if self.log:
            self.log(f"{client_address[0]} - connection error: {type(exc).__name__}: {_printable(str(exc))}")

    # -- replica views ------------------------------------------------------------

    def open_replica(self):
        """A fresh view of the replica for one request.

        Requests never share a Replica object: a writer in another process
        (commit, sync, compact, rollback) may change what it caches, and each
        request should see the replica as it is when it starts. The
        environment underneath is shared (deltalog.store's registry), kept
        open by ``self.replica``, so this costs a few LMDB reads.
        """
        from .replica import Replica

        return Replica.open(self.replica.path)

    @staticmethod
    def snapshot_manifest(replica, which: str | int) -> dict:
        """The registered manifest of snapshot ``which`` (an offset or "latest")."""
        manifests = replica.snapshots()
        if not manifests:
            raise OffsetNotRetained(f"{replica.path}: no snapshots")
        if which == "latest":
            return max(manifests, key=lambda m: m["offset"])
        for manifest in manifests:
            if manifest["offset"] == which:
                return manifest
        raise OffsetNotRetained(
            f"no snapshot at offset {which}",
            hint="snapshots at " + ", ".join(str(m["offset"]) for m in manifests[-10:]),
        )

    def gauges(self, replica) -> dict[str, tuple[str, object]]:
        from . import lineage
        from .receive import follow_state

        state = replica.state
        snapshots = [m["offset"] for m in replica.snapshots()]
        follow = follow_state(replica) or {}
        info = {"model_id": replica.model_id, "state_digest": lineage.to_hex(state.digest) or "",
                "source": str(follow.get("source") or "")}
        labels = "{" + ",".join(f'{k}="{_label(v)}"' for k, v in info.items()) + "}"
        gauges = {
            "deltalog_replica_info": ("The served replica: its model id, state digest at the head, and the source "
                                      "it follows (empty for a primary); always 1.", [(labels, 1)]),
            "deltalog_head": ("Newest durable offset of the served replica.", state.head),
            "deltalog_oldest_offset": ("Oldest offset the log can still replay from.", replica.oldest_offset),
            "deltalog_latest_snapshot_offset": ("Offset of the newest snapshot.", max(snapshots, default=0)),
            "deltalog_snapshots": ("Snapshots registered in the replica.", len(snapshots)),
            "deltalog_uptime_seconds": ("Seconds since the server started.", round(time.time() - self.started, 3)),
        }
        if follow:  # a follower: how far behind its source it was at its last sync
            gauges["deltalog_lag_offsets"] = ("Offsets the replica was behind its source at its last sync.",
                                              max(0, int(follow.get("source_head") or 0) - state.head))
            if follow.get("in_sync_at") is not None:
                gauges["deltalog_lag_seconds"] = ("Seconds since the replica last held its source's head.",
                                                  round(max(0.0, time.time() - follow["in_sync_at"]), 3))
        return gauges


def _listen_error(host: str, port: int, exc: OSError) -> DeltalogError:
    """Why we cannot listen: a busy or forbidden port is the machine's state (exit 8), a bad address the user's."""
    where = f"cannot listen on {host}:{port}: {exc.strerror or exc}"
    if exc.errno == errno.EADDRINUSE:
        return TransportError(where, hint="another process listens there: choose another --port, or --port 0 for a free one")
    if exc.errno in (errno.EACCES, errno.EPERM):
        return TransportError(where, hint="ports below 1024 need privileges: choose a port above 1023")
    return InvalidInput(where, hint="--host must be an address of this machine, e.g. 127.0.0.1")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # else a body written after its headers waits ~40 ms for a delayed ACK
    # Not "HTTP/0.9": an answer to a garbled request line still starts with a status line.
    default_request_version = "HTTP/1.0"
    server_version = f"deltalog/{__version__}"
    sys_version = ""
    server: SnapshotServer

    def version_string(self) -> str:
        return self.server_version

    # -- bookkeeping ----------------------------------------------------------------

    def setup(self) -> None:
        self.timeout = self.server.request_timeout  # StreamRequestHandler applies it to the socket
        super().setup()

    def handle_one_request(self) -> None:
        self._status: int | None = None
        self._sent = 0
        self._route = "other"
        self._started = time.monotonic()
        # An idle keep-alive connection, or a client dribbling its headers,
        # holds a --max-connections slot: give it less time than a transfer.
        self.connection.settimeout(min(HEADER_TIMEOUT, self.server.request_timeout))
        try:
            super().handle_one_request()
        except (ConnectionError, TimeoutError) as exc:
            # the client went away or stalled mid-response: nothing left to tell it
            self.close_connection = True
            if self._status is not None:
                self._note_abort(exc)
        finally:
            if self._status is not None:
                self._finish()

    def parse_request(self) -> bool:
        self._started = time.monotonic()
        if not super().parse_request():
            return False
        if len(self.requestline.split()) == 2:
            self.send_error(400, "HTTP/0.9 requests are not supported")
            return False
        self.connection.settimeout(self.server.request_timeout)
        return True

    def send_response(self, code, message=None) -> None:
        self._status = int(code)
        super().send_response(code, message)

    def log_request(self, code="-", size="-") -> None:
        pass  # one line per request is written by _finish, with the bytes sent

    def log_error(self, format, *args) -> None:
        pass  # errors are answered with a status, which _finish logs

    def log_message(self, format, *args) -> None:
        if self.server.log:
            self.server.log(_printable(format % args))

    def _note_abort(self, exc: BaseException) -> None:
        self._aborted = f"aborted: {type(exc).__name__}"

    def _finish(self) -> None:
        self.server.metrics.count_request(self._route, self._status or 0, self._sent)
        if self.server.log:
            line = getattr(self, "requestline", "") or "-"
            extra = getattr(self, "_aborted", "")
            self.server.log(
                f'{self.client_address[0]} "{_printable(line)}" {self._status} {self._sent} '
                f"{time.monotonic() - self._started:.3f}s" + (f" {extra}" if extra else "")
            )
            self._aborted = ""

    # -- responses ----------------------------------------------------------------

    def send_error(self, code, message=None, explain=None) -> None:
        """A JSON error body (the stdlib's is HTML); used for protocol errors too."""
        code = int(code)
        try:
            short = HTTPStatus(code).phrase
        except ValueError:
            short = "Error"
        self._send_error_json(code, {"error": {"type": "HTTPError", "message": message or short, "hint": None,
                                               "exit_code": 8}}, close=True)

    def _send_error_json(self, code: int, body: dict, close: bool = False, headers: dict | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", JSON_TYPE)
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if self.command != "HEAD":
            self._write(data)

    def _deltalog_error(self, exc: DeltalogError) -> None:
        status = next((s for cls, s in _ERROR_STATUS.items() if isinstance(exc, cls)), 500)
        if isinstance(exc, OffsetNotRetained) and self._route.startswith("/v1/snapshot"):
            status = 404  # an offset that is not a snapshot is simply not there
        self._send_error_json(status, error_body(exc))

    def _not_found(self) -> None:
        self._send_error_json(404, {"error": {"type": "NotFound", "message": "not found", "hint": None, "exit_code": 8}})

    def _write(self, data) -> None:
        self.wfile.write(data)
        self._sent += len(data)

    def _send_bytes(self, data: bytes, content_type: str, cache: str = "no-cache") -> None:
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", cache)
        self.end_headers()
        if self.command != "HEAD":
            self._write(data)

    def _send_json(self, value) -> None:
        if MSGPACK_TYPE in self.headers.get("Accept", ""):
            from .wire import pack

            self._send_bytes(pack(value), MSGPACK_TYPE)
        else:
            self._send_bytes(json.dumps(value, default=_json_default).encode(), JSON_TYPE)

    # -- methods ------------------------------------------------------------------

    def do_GET(self) -> None:
        self._dispatch()

    def do_HEAD(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def _replica(self):
        if self._request_replica is None:
            self._request_replica = self.server.open_replica()
        return self._request_replica

    def _dispatch(self) -> None:
        self._body_read = False
        try:
            self._dispatch_inner()
        finally:
            # A request body left unread would be parsed as the next request.
            if not self._body_read and (
                self.headers.get("Content-Length", "0").strip() not in ("", "0") or "Transfer-Encoding" in self.headers
            ):
                self.close_connection = True

    def _dispatch_inner(self) -> None:
        path, query = self._target()
        if not self._authorised():
            return
        self._request_replica = None
        try:
            self._route_request(path, query)
        except DeltalogError as exc:
            if self._status is not None:
                raise ConnectionAbortedError(str(exc)) from None  # mid-body: only closing can tell the client
            self._deltalog_error(exc)
        except (ConnectionError, TimeoutError):
            raise
        except Exception as exc:  # noqa: BLE001 - a bug must cost one request, not the server
            if self.server.log:
                self.server.log(f"internal error on {_printable(self.requestline)}: {type(exc).__name__}: {exc}")
            if self._status is not None:
                raise ConnectionAbortedError(str(exc)) from None
            self._send_error_json(500, {"error": {"type": "InternalError", "message": f"{type(exc).__name__}: {exc}",
                                                  "hint": None, "exit_code": 20}}, close=True)
        finally:
            if self._request_replica is not None:
                self._request_replica.close()
                self._request_replica = None

    def _target(self) -> tuple[str, str]:
        """(path, query) of the request target, undecoded."""
        target = self.path
        if not target.startswith("/"):  # absolute-form: http://host/path
            parts = urlsplit(target)
            target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        path, _, query = target.partition("?")
        return path, query

    def _authorised(self) -> bool:
        expected = self.server.token
        if expected is None:
            return True
        scheme, _, given = self.headers.get("Authorization", "").strip().partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode("latin-1", "replace"), expected):
            return True
        self._route = "unauthorised"
        message = "token rejected" if given else "this server needs a bearer token"
        self._send_error_json(
            401,
            {"error": {"type": "Unauthorized", "message": message, "hint": "pass the server's token", "exit_code": 8}},
            headers={"WWW-Authenticate": 'Bearer realm="deltalog"'},
        )
        return False

    def _route_request(self, path: str, query: str) -> None:
        method = self.command
        from .sync import source_hello

        if path in ("/v1/status", "/v1/status/"):
            self._route = "/v1/status"
            if self._method_ok("GET", "HEAD"):
                self._send_json(source_hello(self._replica()))
        elif path == "/metrics":
            self._route = "/metrics"
            if self._method_ok("GET", "HEAD"):
                text = self.server.metrics.render(self.server.gauges(self._replica()))
                self._send_bytes(text.encode(), "text/plain; version=0.0.4; charset=utf-8")
        elif path == "/v1/chunks":
            self._route = "/v1/chunks"
            if self._method_ok("GET", "POST"):
                self._chunks(query if method == "GET" else None)
        elif path == "/v1/wait":
            self._route = "/v1/wait"
            if self._method_ok("GET"):
                self._wait(query)
        elif path == "/v1/digest":
            self._route = "/v1/digest"
            if self._method_ok("GET"):
                self._digest(query)
        elif path == "/v1/plan":
            self._route = "/v1/plan"
            if self._method_ok("GET", "POST"):
                params = self._chunk_params(query if method == "GET" else None)
                if params is not None:
                    from .sync import source_plan

                    params.pop("max_chunk_bytes")
                    params.pop("base_values")
                    self._send_json(source_plan(self._replica(), **params))
        elif m := _SNAPSHOT.fullmatch(path):
            self._route = "/v1/snapshots/{offset}"
            if self._method_ok("GET", "HEAD"):
                from .sync import source_snapshot_manifest

                offset = _offset(m.group(1))
                if offset is None:
                    return self._not_found()
                self._send_json(source_snapshot_manifest(self._replica(), offset))
        elif m := _SNAPSHOT_FILE.fullmatch(path):
            self._route = "/v1/snapshots/{offset}/{file}"
            if self._method_ok("GET", "HEAD"):
                offset = _offset(m.group(1))
                if offset is None:
                    return self._not_found()
                self._download(self._snapshot_file(offset, m.group(2)))
        elif m := _SNAPSHOT_ST.fullmatch(path):
            self._route = "/v1/snapshot/{offset}"
            if self._method_ok("GET", "HEAD"):
                which = m.group(1)
                offset = which if which == "latest" else _offset(which)
                if offset is None:
                    return self._not_found()
                self._download(self._snapshot_safetensors(offset))
        else:
            self._not_found()

    def _method_ok(self, *allowed: str) -> bool:
        if self.command in allowed:
            return True
        self._send_error_json(
            405, {"error": {"type": "MethodNotAllowed", "message": f"{self.command} not allowed here", "hint": None,
                            "exit_code": 8}}, headers={"Allow": ", ".join(allowed)},
        )
        return False

    # -- snapshot downloads -----------------------------------------------------------

    def _open(self, manifest: dict, file: str, nbytes: int | None):
        """An open snapshot file named by the manifest; checked for size."""
        path = os.path.join(tensorfiles.snapshot_path(self.server.replica.path, manifest["offset"]), file)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            raise OffsetNotRetained(f"snapshot {manifest['offset']} was removed (compacted)") from None
        except OSError as exc:
            raise IntegrityError(f"snapshot {manifest['offset']}: cannot open {file}: {exc.strerror}") from None
        f = os.fdopen(fd, "rb", buffering=0)
        size = os.fstat(fd).st_size
        if nbytes is not None and size != nbytes:
            f.close()
            raise IntegrityError(f"snapshot {manifest['offset']}: {file} has {size} bytes, the manifest says {nbytes}")
        return f, size

    def _snapshot_file(self, offset: int, name: str) -> _Resource:
        manifest = self.server.snapshot_manifest(self._replica(), offset)
        model_id = manifest["model_id"]
        cache = self._immutable_cache()
        if name == tensorfiles.MANIFEST:
            problem = tensorfiles.manifest_file_problem(self._replica().path, manifest)
            if problem is not None:  # never served: damage is found, not passed on
                raise IntegrityError(problem, hint="'deltalog verify' on the server names the repair")
            f, size = self._open(manifest, name, None)
            digest = xxhash.xxh3_64(json.dumps(manifest, sort_keys=True).encode()).hexdigest()
            return _Resource([_Segment(size, file=f)], _etag(model_id, offset, name, digest), JSON_TYPE, cache)
        entry = next((t for t in manifest["tensors"] if t["file"] == name), None)
        if entry is None or not _SAFE_FILE.fullmatch(entry["file"]):
            raise OffsetNotRetained(f"snapshot {offset} has no file {name!r}")
        f, size = self._open(manifest, entry["file"], entry["nbytes"])
        return _Resource(
            [_Segment(size, file=f)], _etag(model_id, offset, name, entry["xxh3"]), SAFETENSORS_TYPE, cache
        )

    def _snapshot_safetensors(self, which) -> _Resource:
        manifest = self.server.snapshot_manifest(self._replica(), which)
        offset = manifest["offset"]
        segments = [_Segment(0, data=safetensors_header(manifest))]
        segments[0].length = len(segments[0].data)
        try:
            for entry in manifest["tensors"]:
                if not _SAFE_FILE.fullmatch(entry["file"]):
                    raise IntegrityError(f"snapshot {offset}: unexpected file name {entry['file']!r} in its manifest")
                f, size = self._open(manifest, entry["file"], entry["nbytes"])
                segments.append(_Segment(size, file=f))
        except BaseException:
            _Resource(segments, "", "", "").close()
            raise
        digest = xxhash.xxh3_64("\0".join(t["xxh3"] for t in manifest["tensors"]).encode()).hexdigest()
        safe_id = re.sub(r"[^A-Za-z0-9._-]", "_", manifest["model_id"])[:64] or "model"
        return _Resource(
            segments,
            _etag(manifest["model_id"], offset, "safetensors", digest),
            SAFETENSORS_TYPE,
            "no-cache" if which == "latest" else self._immutable_cache(),
            disposition=f'attachment; filename="{safe_id}-{offset}.safetensors"',
        )

    def _immutable_cache(self) -> str:
        return ("private" if self.server.token else "public") + ", max-age=31536000, immutable"

    def _download(self, resource: _Resource) -> None:
        try:
            size = resource.size
            headers = {"ETag": resource.etag, "Accept-Ranges": "bytes", "Cache-Control": resource.cache_control}
            if resource.disposition:
                headers["Content-Disposition"] = resource.disposition
            if _etag_matches(self.headers.get("If-None-Match"), resource.etag):
                self.send_response(304)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.end_headers()
                return
            span = None
            if_range = self.headers.get("If-Range")
            if if_range is None or if_range.strip() == resource.etag:
                try:
                    span = parse_range(self.headers.get("Range"), size)
                except Unsatisfiable:
                    self._send_error_json(
                        416,
                        {"error": {"type": "RangeNotSatisfiable", "message": f"range outside the {size} bytes",
                                   "hint": None, "exit_code": 8}},
                        headers={"Content-Range": f"bytes */{size}", **headers},
                    )
                    return
            start, stop = span if span else (0, size)
            self.send_response(206 if span else 200)
            self.send_header("Content-Type", resource.content_type)
            self.send_header("Content-Length", str(stop - start))
            if span:
                self.send_header("Content-Range", f"bytes {start}-{stop - 1}/{size}")
            for name, value in headers.items():
                self.send_header(name, value)
            self.end_headers()
            if self.command != "HEAD":
                self._send_segments(resource.segments, start, stop)
        finally:
            resource.close()

    def _send_segments(self, segments: list[_Segment], start: int, stop: int) -> None:
        pos = 0
        for seg in segments:
            lo, hi = max(start, pos), min(stop, pos + seg.length)
            if lo < hi:
                if seg.data is not None:
                    self._write(seg.data[lo - pos : hi - pos])
                else:
                    sent = self.connection.sendfile(seg.file, lo - pos, hi - lo)
                    self._sent += sent
                    if sent != hi - lo:  # the file shrank under us: the body cannot be completed
                        raise ConnectionAbortedError("snapshot file shrank mid-download")
            pos += seg.length

    # -- the long-poll ----------------------------------------------------------------------

    def _wait(self, query: str) -> None:
        """GET /v1/wait?since=H&timeout=T: {head, changed} once the head is not H, or at T."""
        raw = {k: v[-1] for k, v in parse_qs(query or "", keep_blank_values=True).items()}
        try:
            since = int(raw["since"])
            timeout = float(raw.get("timeout") or DEFAULT_WAIT_SECONDS)
        except KeyError:
            raise InvalidInput("since (the head the client knows) is required") from None
        except ValueError:
            raise InvalidInput("since must be an integer and timeout a number of seconds") from None
        if not -1 <= since <= _MAX_U64 or not timeout >= 0:
            raise InvalidInput("since must be an offset and timeout a non-negative number of seconds")
        timeout = min(timeout, MAX_WAIT_SECONDS)
        sock = self.connection

        def gone() -> bool:
            import select

            try:
                ready, _, _ = select.select([sock], [], [], 0)
                return bool(ready) and sock.recv(1, socket.MSG_PEEK) == b""
            except (OSError, ValueError):
                return True

        head = self.server.head_watcher.wait(since, timeout, gone)
        self._send_json({"head": head, "changed": head != since})

    def _digest(self, query: str) -> None:
        """GET /v1/digest?offset=H: {offset, state_digest} (hex, or null when the replica has none
        there); an offset compaction dropped is answered from the digests it kept."""
        from .sync import source_state_digest_at

        raw = {k: v[-1] for k, v in parse_qs(query or "", keep_blank_values=True).items()}
        try:
            offset = int(raw["offset"])
        except (KeyError, ValueError):
            raise InvalidInput("offset (an integer) is required") from None
        if not 0 <= offset <= _MAX_U64:
            raise InvalidInput("offset must be an offset")
        self._send_json({"offset": offset, "state_digest": source_state_digest_at(self._replica(), offset)})

    # -- the record stream ----------------------------------------------------------------

    def _chunks(self, query: str | None) -> None:
        """Stream ``sync.source_chunks`` blobs as wire frames in a chunked body.

        Frames: one ``{"type": "chunk"}`` per blob (the blob is the payload),
        then ``{"type": "end", "chunks": n}``; a failure after the response
        started is sent as a wire error frame, so the client raises the same
        error class. A body without its end frame is a truncated transfer.
        """
        params = self._chunk_params(query)
        if params is None:
            return
        from .sync import source_chunks
        from .wire import error_header, write_frame

        blobs = source_chunks(self._replica(), **params)
        try:
            # Pull the first blob before answering, so that an error the source
            # raises up front (offset not retained, bad request) is a status.
            first = next(blobs, None)
            self.send_response(200)
            self.send_header("Content-Type", FRAMES_TYPE)
            self.send_header("Transfer-Encoding", "chunked")
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            out = _ChunkedWriter(self)
            count = 0
            try:
                if first is not None:
                    write_frame(out, {"type": "chunk"}, first)
                    count += 1
                    for blob in blobs:
                        write_frame(out, {"type": "chunk"}, blob)
                        count += 1
                write_frame(out, {"type": "end", "chunks": count})
            except (ConnectionError, TimeoutError):
                raise
            except Exception as exc:  # noqa: BLE001 - reported to the client in-band
                if out.broken:
                    raise ConnectionAbortedError("client went away") from None
                write_frame(out, error_header(exc))
                if not isinstance(exc, DeltalogError) and self.server.log:
                    self.server.log(f"internal error streaming chunks: {type(exc).__name__}: {exc}")
            out.close()
        finally:
            close = getattr(blobs, "close", None)
            if close:
                close()

    def _chunk_params(self, query: str | None) -> dict | None:
        if query is not None:
            raw = {k: v[-1] for k, v in parse_qs(query, keep_blank_values=True).items()}
        else:
            raw = self._read_body()
            if raw is None:
                return None
        from .sync import whole_number as whole

        try:
            if "since" not in raw:
                raise InvalidInput("since (the offset the destination is at) is required")
            since = whole(raw["since"])
            target = raw.get("target")
            target = None if target in (None, "") else whole(target)
            max_chunk_bytes = whole(raw.get("max_chunk_bytes", 4 << 20))
        except (TypeError, ValueError, OverflowError):
            raise InvalidInput("since, target and max_chunk_bytes must be integers") from None
        if not -1 <= since <= _MAX_U64 or (target is not None and not 0 <= target <= _MAX_U64):
            raise InvalidInput("since and target must be offsets")
        if max_chunk_bytes < 1:
            raise InvalidInput("max_chunk_bytes must be positive")
        advanced = raw.get("advanced")
        if advanced is not None and not isinstance(advanced, dict):
            raise InvalidInput("advanced must map tensor names to {bucket: version}")
        base_values = raw.get("base_values", False)
        if query is not None:  # a query string's words
            base_values = {"0": False, "false": False, "1": True, "true": True}.get(base_values, base_values)
        if not isinstance(base_values, bool):
            raise InvalidInput("base_values must be true or false")
        if base_values and advanced:
            raise InvalidInput("base_values needs a destination without a partial sync (no advanced buckets)")
        if target is None:
            target = self._replica().head
        return {"since": since, "advanced": advanced or {}, "target": target, "max_chunk_bytes": max_chunk_bytes,
                "base_values": base_values}

    def _read_body(self) -> dict | None:
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            self._send_error_json(411, {"error": {"type": "LengthRequired", "message": "POST needs Content-Length",
                                                  "hint": None, "exit_code": 8}}, close=True)
            return None
        n = int(length)
        if n > MAX_BODY_BYTES:
            self._send_error_json(413, {"error": {"type": "TooLarge", "message": f"body over {MAX_BODY_BYTES} bytes",
                                                  "hint": None, "exit_code": 8}}, close=True)
            return None
        data = self.rfile.read(n)
        self._body_read = True
        if len(data) != n:
            raise ConnectionAbortedError("request body truncated")
        kind = self.headers.get("Content-Type", JSON_TYPE).split(";")[0].strip()
        if kind == MSGPACK_TYPE:
            from .wire import unpack  # int map keys (bucket numbers) allowed

            try:
                body = unpack(data, "/v1/chunks request")
            except DeltalogError as exc:
                raise InvalidInput(str(exc)) from None
        else:
            try:
                body = json.loads(data) if data else {}
            except ValueError:
                raise InvalidInput("/v1/chunks: request body is not JSON") from None
        if not isinstance(body, dict):
            raise InvalidInput("/v1/chunks: request body must be a map")
        return body


class _ChunkedWriter:
    """A file-like writer emitting HTTP/1.1 chunked transfer encoding, batched."""

    def __init__(self, handler: _Handler):
        self._handler = handler
        self._buf = bytearray()
        self.broken = False  # the client went away: nothing more can be sent

    def sendall(self, data) -> None:
        view = memoryview(data).cast("B")
        if view.nbytes >= _STREAM_CHUNK:
            self.flush()
            self._chunk(view)
        else:
            self._buf += view
            if len(self._buf) >= _STREAM_CHUNK:
                self.flush()

    def flush(self) -> None:
        if self._buf:
            self._chunk(memoryview(self._buf))
            self._buf = bytearray()

    def _chunk(self, view: memoryview) -> None:
        h = self._handler
        try:
            h.wfile.write(f"{view.nbytes:x}\r\n".encode())
            h.wfile.write(view)
            h.wfile.write(b"\r\n")
        except OSError:
            self.broken = True
            raise
        h._sent += view.nbytes

    def close(self) -> None:
        self.flush()
        self._handler.wfile.write(b"0\r\n\r\n")


def _offset(text: str) -> int | None:
    value = int(text)
    return value if value <= _MAX_U64 else None


def _etag_matches(header: str | None, etag: str) -> bool:
    if not header:
        return False
    candidates = [c.strip() for c in header.split(",")]
    return "*" in candidates or etag in candidates or f"W/{etag}" in candidates


def _json_default(value):
    import numpy as np

    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).hex()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


# ---------------------------------------------------------------------------
# running


def serve(server: SnapshotServer, grace: float = 2.0) -> None:
    """Serve until SIGTERM or SIGINT, then stop accepting and let requests finish for ``grace`` s."""
    stop = threading.Event()

    def on_signal(signum, frame) -> None:
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    worker = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True,
                              name="deltalog-accept")
    worker.start()
    try:
        while not stop.wait(0.5) and worker.is_alive():
            pass
    finally:
        server.shutdown()
        server.server_close()
        for s, handler in previous.items():
            signal.signal(s, handler)
    deadline = time.monotonic() + grace
    while server.metrics.active_connections and time.monotonic() < deadline:
        time.sleep(0.05)


__all__ = [
    "API_PREFIX",
    "DEFAULT_PORT",
    "HeadWatcher",
    "Metrics",
    "SnapshotServer",
    "parse_range",
    "safetensors_header",
    "serve",
]
