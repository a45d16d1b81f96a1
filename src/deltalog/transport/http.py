"""The HTTP transport: pull from a ``deltalog serve-snapshot`` server (pull only, no Sink).

``deltalog sync http://host:port DST`` reads the source through the
server's endpoints (deltalog.server documents them):

- hello: ``GET /v1/status`` (msgpack);
- chunks: ``POST /v1/chunks`` with a msgpack body ``{since, advanced,
  target, max_chunk_bytes}``, answered by a chunked stream of wire frames
  (deltalog.wire): one ``chunk`` frame per record blob, then ``end``; an
  ``error`` frame carries a failure that happened mid-stream;
- plan (dry runs, progress): ``POST /v1/plan``, msgpack ``{since, advanced, target}``;
- snapshots: ``GET /v1/snapshots/OFFSET`` (the manifest with bucket versions,
  msgpack) and byte ranges of ``GET /v1/snapshots/OFFSET/FILE``.

Memory is bounded: a record stream is read one frame at a time on a
connection of its own, and a snapshot piece is at most the length asked.
Every failure is one line: TransportError (exit 8) when the server cannot be
reached, vanishes mid-stream, rejects the token or answers nonsense; the
server's own deltalog errors (OffsetNotRetained, ...) are raised again as
the same class; a frame whose checksum fails is an IntegrityError.

The bearer token comes from ``TransportOptions.token`` (``sync --token-file``)
or else the ``DELTALOG_TOKEN`` environment variable.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import socket
import ssl
from collections.abc import Iterator
from urllib.parse import quote, urlsplit

from .. import __version__, errors
from ..errors import DeltalogError, InvalidInput, TransportError, UnsupportedVersion

TOKEN_ENV = "DELTALOG_TOKEN"
DEFAULT_TIMEOUT = 60.0
_ERROR_BODY_BYTES = 64 << 10
_FILE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}")
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")
_MSGPACK = "application/msgpack"
_WAIT_MARGIN = 10.0  # seconds a /v1/wait answer may come after its timeout before the server counts as gone


def open_source(spec, options) -> "HttpSource":
    """The registry's entry point (deltalog.transport.SCHEMES)."""
    return HttpSource(spec.text, token=options.token, timeout=options.timeout or DEFAULT_TIMEOUT)


class HttpSource:
    """A :class:`~deltalog.transport.base.Source` served by ``deltalog serve-snapshot``.

    Not thread-safe: one sync uses one source. Small requests share one
    keep-alive connection; each record stream gets its own, so abandoning a
    stream half-read never poisons the next request.
    """

    def __init__(self, url: str, token: str | None = None, timeout: float = DEFAULT_TIMEOUT):
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise InvalidInput(f"{url}: not an http(s)://HOST[:PORT] URL")
        try:
            port = parts.port
        except ValueError:
            raise InvalidInput(f"{url}: bad port") from None
        self.url = url.rstrip("/")
        self._https = parts.scheme == "https"
        self._host = parts.hostname
        self._port = port or (443 if self._https else 80)
        self._prefix = parts.path.rstrip("/")  # a server behind a reverse proxy at a sub-path
        self.timeout = timeout
        token = token if token is not None else os.environ.get(TOKEN_ENV) or None
        if token is not None and (not token.isascii() or any(c.isspace() or not c.isprintable() for c in token)):
            raise InvalidInput("the HTTP token must be printable ASCII without spaces")
        self._token = token
        self._conn: http.client.HTTPConnection | None = None
        self._wait_conn: http.client.HTTPConnection | None = None  # long-polls: their own keep-alive connection
        self._streams: set[http.client.HTTPConnection] = set()

    # -- Source -------------------------------------------------------------------

    def hello(self) -> dict:
        from ..wire import unpack
        from .base import PROTOCOL_VERSION

        data = self._get("/v1/status", "status", accept=_MSGPACK)
        hello = unpack(data, f"{self.url}: status")
        if not isinstance(hello, dict) or "model_id" not in hello:
            raise TransportError(f"{self.url}: not a deltalog server (its /v1/status is not a source hello)")
        if hello.get("protocol") != PROTOCOL_VERSION:
            raise UnsupportedVersion(
                f"{self.url}: the server speaks sync protocol v{hello.get('protocol')}, this deltalog v{PROTOCOL_VERSION}",
                hint="install the same deltalog version on both sides",
            )
        return hello

    def chunks(
        self, since: int, advanced: dict[str, dict[int, int]], target: int, max_chunk_bytes: int,
        base_values: bool = False,
    ) -> Iterator[bytes]:
        from ..wire import pack

        request = {"since": since, "advanced": advanced or {}, "target": target, "max_chunk_bytes": max_chunk_bytes}
        if base_values:  # only asked of a server whose hello names the codec; older ones never see the key
            request["base_values"] = True
        body = pack(request)
        conn = self._new_connection()
        self._streams.add(conn)
        try:
            response = self._send(conn, "POST", "/v1/chunks", "record stream", body=body,
                                  headers={"Content-Type": _MSGPACK})
        except _Stale:
            self._drop_stream(conn)
            raise TransportError(f"{self.url}: the server closed the connection (record stream)") from None
        except BaseException:
            self._drop_stream(conn)
            raise
        return self._frames(conn, response)

    def _frames(self, conn, response) -> Iterator[bytes]:
        from ..wire import DEFAULT_MAX_FRAME_BYTES, raise_if_error, read_frame

        try:
            count = 0
            while True:
                try:
                    header, payload = read_frame(response, DEFAULT_MAX_FRAME_BYTES)
                except TransportError as exc:
                    raise TransportError(f"{self.url}: record stream cut after {count} chunks ({exc})") from None
                except (http.client.HTTPException, OSError) as exc:
                    raise self._lost(exc, f"record stream, after {count} chunks") from None
                kind = header["type"]
                if kind == "chunk":
                    count += 1
                    yield bytes(payload)
                elif kind == "end":
                    if header.get("chunks") != count:
                        raise TransportError(f"{self.url}: record stream ended after {count} of "
                                             f"{header.get('chunks')} chunks")
                    return
                else:
                    raise_if_error(header)
                    raise TransportError(f"{self.url}: unexpected {kind!r} frame in the record stream")
        finally:
            self._drop_stream(conn)

    def snapshot_manifest(self, offset: int) -> dict:
        from ..wire import unpack

        data = self._get(f"/v1/snapshots/{int(offset)}", f"manifest of snapshot {offset}", accept=_MSGPACK)
        manifest = unpack(data, f"{self.url}: manifest of snapshot {offset}")
        if not isinstance(manifest, dict) or manifest.get("offset") != offset or not isinstance(
            manifest.get("tensors"), list
        ):
            raise TransportError(f"{self.url}: the server sent a manifest that is not snapshot {offset}'s")
        return manifest

    def state_digest_at(self, offset: int) -> str | None:
        """GET /v1/digest: the server's state digest at ``offset`` (hex), or None when it has none
        (an older server without the endpoint answers 404: none either)."""
        from ..wire import unpack

        what = f"state digest at {offset}"
        response = self._request("GET", f"/v1/digest?offset={int(offset)}", what, headers={"Accept": _MSGPACK},
                                 allow=(200, 404))
        if response.status == 404:
            error = self._error(response, what)
            if isinstance(error, TransportError) and "HTTP 404" in str(error):  # an older server: no such endpoint
                return None
            raise error  # the endpoint answered with an error of its own: e.g. the replica went away (exit 3)
        try:
            data = response.read()
        except (http.client.HTTPException, OSError) as exc:
            self._close_shared()
            raise self._lost(exc, what) from None
        answer = unpack(data, f"{self.url}: {what}")
        if not isinstance(answer, dict) or answer.get("offset") != int(offset):
            raise TransportError(f"{self.url}: the server answered another question than {what}")
        digest = answer.get("state_digest")
        return digest if isinstance(digest, str) else None

    def plan(self, since: int, advanced: dict[str, dict[int, int]], target: int) -> dict:
        """What :meth:`chunks` would send (rows, buckets, bytes per tensor), without the values."""
        from ..wire import pack, unpack

        body = pack({"since": since, "advanced": advanced or {}, "target": target})
        response = self._request("POST", "/v1/plan", "plan", body=body,
                                 headers={"Content-Type": _MSGPACK, "Accept": _MSGPACK})
        try:
            data = response.read()
        except (http.client.HTTPException, OSError) as exc:
            self._close_shared()
            raise self._lost(exc, "plan") from None
        plan = unpack(data, f"{self.url}: plan")
        if not isinstance(plan, dict):
            raise TransportError(f"{self.url}: the server's plan is not a map")
        return plan

    def read_snapshot_file(self, offset: int, file: str, start: int, length: int) -> bytes:
        if not _FILE_NAME.fullmatch(file) or ".." in file:
            raise InvalidInput(f"bad snapshot file name {file!r}")
        if length <= 0:
            return b""
        path = f"/v1/snapshots/{int(offset)}/{quote(file)}"
        what = f"snapshot {offset} file {file}"
        stop = start + length - 1
        response = self._request("GET", path, what, headers={"Range": f"bytes={start}-{stop}"}, allow=(206, 200, 416))
        try:
            if response.status == 416:
                response.read(_ERROR_BODY_BYTES)
                return b""  # start is at (or past) the end of the file
            if response.status == 200:
                if start != 0:
                    raise TransportError(f"{self.url}: the server ignored a byte range for {what}")
                data = response.read(length)  # the file from 0: keep what was asked, drop the rest
                self._close_shared()
                return data
            m = _CONTENT_RANGE.fullmatch(response.getheader("Content-Range", ""))
            if not m or int(m.group(1)) != start or int(m.group(2)) > stop:
                raise TransportError(f"{self.url}: the server answered {what} with the wrong byte range")
            data = response.read()
            if len(data) != int(m.group(2)) - start + 1:
                raise TransportError(f"{self.url}: {what} cut short")
            return data
        except (http.client.HTTPException, OSError) as exc:
            self._close_shared()
            raise self._lost(exc, what) from None

    def wait_for_head(self, since: int, timeout: float) -> int:
        """GET /v1/wait: the server answers when its head differs from ``since`` (or at ``timeout``).

        A server without /v1/wait (404) raises NotImplementedError. The
        long-poll has its own keep-alive connection, whose socket timeout
        covers the wait, so the shared one keeps the user's --timeout.
        """
        from ..wire import unpack

        path = f"/v1/wait?since={int(since)}&timeout={max(0.0, float(timeout)):g}"
        limit = max(self.timeout, float(timeout) + _WAIT_MARGIN)
        for attempt in (0, 1):
            reused = self._wait_conn is not None
            if self._wait_conn is None:
                self._wait_conn = self._new_connection()
            conn = self._wait_conn
            conn.timeout = limit
            if conn.sock is not None:
                conn.sock.settimeout(limit)
            try:
                response = self._send(conn, "GET", path, "wait", headers={"Accept": _MSGPACK}, allow=(200, 404))
                data = response.read()
            except _Stale:
                self._drop_wait()
                if not reused or attempt:
                    raise TransportError(f"{self.url}: the server closed the connection (wait)") from None
                continue
            except (http.client.HTTPException, OSError) as exc:
                self._drop_wait()
                raise self._lost(exc, "wait") from None
            except BaseException:  # a DeltalogError, or a signal's exception mid-wait
                self._drop_wait()
                raise
            if response.status == 404:
                self._drop_wait()
                raise NotImplementedError(f"{self.url}: the server has no /v1/wait (an older deltalog)")
            answer = unpack(data, f"{self.url}: wait")
            head = answer.get("head") if isinstance(answer, dict) else None
            if not isinstance(head, int):
                raise TransportError(f"{self.url}: garbled /v1/wait answer")
            return head
        raise AssertionError("unreachable")

    @property
    def reusable(self) -> bool:
        return True  # every stream has its own connection; the others reconnect by themselves

    def close(self) -> None:
        self._close_shared()
        self._drop_wait()
        for conn in list(self._streams):
            self._drop_stream(conn)

    def __enter__(self) -> "HttpSource":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- plumbing -----------------------------------------------------------------

    def _new_connection(self) -> http.client.HTTPConnection:
        if self._https:
            return http.client.HTTPSConnection(self._host, self._port, timeout=self.timeout,
                                               context=ssl.create_default_context())
        return http.client.HTTPConnection(self._host, self._port, timeout=self.timeout)

    def _close_shared(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _drop_wait(self) -> None:
        if self._wait_conn is not None:
            self._wait_conn.close()
            self._wait_conn = None

    def _drop_stream(self, conn) -> None:
        self._streams.discard(conn)
        conn.close()

    def _headers(self, extra: dict | None) -> dict:
        headers = {"User-Agent": f"deltalog/{__version__}"}
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        headers.update(extra or {})
        return headers

    def _get(self, path: str, what: str, accept: str | None = None) -> bytes:
        response = self._request("GET", path, what, headers={"Accept": accept} if accept else None)
        try:
            return response.read()
        except (http.client.HTTPException, OSError) as exc:
            self._close_shared()
            raise self._lost(exc, what) from None

    def _request(self, method: str, path: str, what: str, headers: dict | None = None, body: bytes | None = None,
                 allow: tuple[int, ...] = (200,)) -> http.client.HTTPResponse:
        """A request on the shared keep-alive connection, retried once if that connection had gone stale."""
        for attempt in (0, 1):
            reused = self._conn is not None
            if self._conn is None:
                self._conn = self._new_connection()
            try:
                return self._send(self._conn, method, path, what, body=body, headers=headers, allow=allow)
            except _Stale:
                self._close_shared()
                if not reused or attempt:
                    raise TransportError(f"{self.url}: the server closed the connection ({what})") from None
            except BaseException:
                self._close_shared()
                raise
        raise AssertionError("unreachable")

    def _send(self, conn, method: str, path: str, what: str, body: bytes | None = None,
              headers: dict | None = None, allow: tuple[int, ...] = (200,)) -> http.client.HTTPResponse:
        try:
            conn.request(method, self._prefix + path, body=body, headers=self._headers(headers))
            response = conn.getresponse()
        except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as exc:
            raise _Stale(exc) from None
        except (http.client.HTTPException, OSError) as exc:
            raise self._lost(exc, what) from None
        if response.status not in allow:
            raise self._error(response, what)
        return response

    def _lost(self, exc: BaseException, what: str) -> TransportError:
        """A one-line TransportError for a socket-level failure."""
        if isinstance(exc, ConnectionRefusedError):
            return TransportError(f"{self.url}: connection refused",
                                  hint="is 'deltalog serve-snapshot' running there?")
        if isinstance(exc, socket.gaierror):
            return TransportError(f"{self.url}: cannot resolve host {self._host!r}")
        if isinstance(exc, TimeoutError):
            return TransportError(f"{self.url}: no answer for {self.timeout:g} s ({what})")
        if isinstance(exc, ssl.SSLError):
            return TransportError(f"{self.url}: TLS failure ({exc.reason or exc})")
        if isinstance(exc, (http.client.IncompleteRead, http.client.RemoteDisconnected, ConnectionError)):
            return TransportError(f"{self.url}: the server went away mid-transfer ({what})")
        if isinstance(exc, http.client.HTTPException):
            return TransportError(f"{self.url}: bad HTTP answer ({type(exc).__name__}) to {what}")
        return TransportError(f"{self.url}: {getattr(exc, 'strerror', None) or exc} ({what})")

    def _error(self, response: http.client.HTTPResponse, what: str) -> DeltalogError:
        """The error an unexpected HTTP status stands for (the connection is then dropped)."""
        try:
            raw = response.read(_ERROR_BODY_BYTES)
        except (http.client.HTTPException, OSError):
            raw = b""
        self._close_shared()
        info = {}
        try:
            parsed = json.loads(raw)
            if isinstance(parsed, dict) and isinstance(parsed.get("error"), dict):
                info = parsed["error"]
        except ValueError:
            pass
        status = response.status
        if status == 401:
            if self._token:
                return TransportError(f"{self.url}: token rejected",
                                      hint=f"check --token-file / ${TOKEN_ENV} against the server's token")
            return TransportError(f"{self.url}: the server needs a token",
                                  hint=f"pass --token-file FILE or set ${TOKEN_ENV}")
        if status == 503:
            return TransportError(f"{self.url}: server busy (503)", hint="retry shortly, or raise its --max-connections")
        name = info.get("type")
        cls = getattr(errors, name, None) if isinstance(name, str) else None
        message = info.get("message")
        if isinstance(cls, type) and issubclass(cls, DeltalogError) and isinstance(message, str):
            hint = info.get("hint")
            return cls(f"{self.url}: {message}", hint=hint if isinstance(hint, str) else None)
        if status == 404 and what == "status":
            return TransportError(f"{self.url}: not a deltalog server (no /v1/status)")
        detail = f": {message}" if isinstance(message, str) else ""
        return TransportError(f"{self.url}: HTTP {status} {response.reason} for {what}{detail}")


class _Stale(Exception):
    """A reused keep-alive connection turned out to be closed: retry on a new one."""


__all__ = ["HttpSource", "TOKEN_ENV", "open_source"]
