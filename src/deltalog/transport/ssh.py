"""The SSH transport: ``[user@]host:path`` as a Source (pull) or a Sink (push).

We run ``ssh -T -o BatchMode=yes HOST deltalog serve --stdio PATH`` (the ssh
command and the remote deltalog are configurable, like rsync's -e and
--rsync-path) and speak the framed protocol of deltalog.wire over its
stdin/stdout. Calling plain ``ssh`` honours the user's ~/.ssh/config (ports,
keys, jump hosts, ControlMaster). The remote's stderr is kept (the last
lines explain a failed login) and echoed when DELTALOG_DEBUG is set.

A request that gets no byte back within ``timeout`` seconds, a peer that
closes the pipe, or one that answers nonsense is a TransportError (exit 8).
"""

from __future__ import annotations

import collections
import io
import os
import select
import shlex
import subprocess
import sys
import threading
from collections.abc import Iterator

from .. import wire
from ..errors import InvalidInput, TransportError


def open_source(spec, options) -> "SshSource":
    return SshSource(spec, options)


def open_sink(spec, options) -> "SshSink":
    return SshSink(spec, options)


def _wait_for_exit(proc: subprocess.Popen, timeout: float) -> None:
    """``proc.wait(timeout)``, returning the moment the process exits.

    Popen.wait with a timeout polls, sleeping up to 50 ms between looks: a
    sync's end waited ~25 ms on average after ssh had gone. A pidfd (Linux
    5.3+) is readable when the process exits; elsewhere, the poll.
    Raises subprocess.TimeoutExpired as wait does.
    """
    if proc.poll() is not None:  # reaped: its pid may be another process's by now
        return
    try:
        fd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):  # no pidfds here (an old kernel, another system)
        proc.wait(timeout=timeout)
        return
    try:
        select.select([fd], [], [], timeout)
    finally:
        os.close(fd)
    proc.wait(timeout=0)


class _TimeoutReader(io.RawIOBase):
    """A pipe's read end whose reads give up after ``timeout`` seconds of silence."""

    def __init__(self, fd: int, timeout: float | None, on_timeout):
        self.fd = fd
        self.timeout = timeout
        self.on_timeout = on_timeout

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        if self.timeout is not None:
            ready, _, _ = select.select([self.fd], [], [], self.timeout)
            if not ready:
                self.on_timeout()
        try:
            return os.readv(self.fd, [buf])
        except OSError as exc:
            raise TransportError(f"reading from ssh failed ({exc.strerror})") from None


# Without --timeout, a peer that says nothing for this long counts as gone (exit 8): a cron
# job must not hang forever on a hung remote. Long enough for the slowest silent step (the
# remote applying a large chunk, or building a replica from a received snapshot).
DEFAULT_SILENCE_SECONDS = 600.0
# ssh's own keepalives find a dead network or host within about a minute, whatever --timeout
# says; options given in --ssh-command come first, and ssh keeps the first value it sees.
KEEPALIVE = ["-o", "ServerAliveInterval=15", "-o", "ServerAliveCountMax=4"]


class SshConnection:
    """One ``deltalog serve --stdio`` process at the end of an ssh pipe.

    The hello is sent at once but its answer is read when the connection is
    first used: ssh's handshake and the far deltalog's start (~0.4 s) then go
    on while this side does its own work (imports, opening a local replica).
    """

    def __init__(self, spec, options, role: str):
        self.spec = spec
        self.options = options
        ssh = shlex.split(options.ssh_command or "ssh")
        if not ssh:
            raise InvalidInput("--ssh-command is empty")
        remote = f"{options.remote_deltalog or 'deltalog'} serve --stdio {shlex.quote(spec.path)}"
        self.argv = [*ssh, "-T", "-o", "BatchMode=yes", *KEEPALIVE, spec.host, remote]
        try:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE, bufsize=0)
        except OSError as exc:
            raise TransportError(f"cannot run {ssh[0]!r}: {exc.strerror}",
                                 hint="install an ssh client or pass --ssh-command") from None
        for pipe in (self.proc.stdin, self.proc.stdout):
            wire.widen_pipe(pipe.fileno())
        self._stderr_tail: collections.deque[str] = collections.deque(maxlen=20)
        self._stderr_thread = threading.Thread(target=self._drain_stderr, daemon=True)
        self._stderr_thread.start()
        timeout = DEFAULT_SILENCE_SECONDS if options.timeout is None else options.timeout
        self._reader = _TimeoutReader(self.proc.stdout.fileno(), timeout, self._timed_out)
        self._hung = False  # a read timed out: the far end is not to be waited for
        self.rfile = io.BufferedReader(self._reader, 1 << 16)
        self.wfile = io.BufferedWriter(self.proc.stdin, 1 << 16)
        self.busy = False  # a chunk stream is half read: the pipe cannot carry another request
        self.closed = False
        self.role = role
        self._hello: dict | None = None  # the far end's answer to our hello, once read
        self._greet(send_only=True)

    @property
    def hello(self) -> dict:
        """What the far end said in answer to our hello (read now if not yet)."""
        self._greet()
        return self._hello

    def _greet(self, send_only: bool = False) -> None:
        if self._hello is not None:
            return
        try:
            if send_only:
                self._send(wire.hello_request(self.role))
                return
            answer, payload = self._read()
            wire.check_hello(answer)
            if answer.get("role") != self.role:
                raise TransportError(f"{self.spec.text}: the remote answered as a {answer.get('role')}, "
                                     f"not a {self.role}")
            self._hello = wire.unpack(payload, "hello") if payload else {}
        except BaseException:
            self._hello = None
            self.busy = True  # no goodbye: just hang up
            self.close()
            raise

    def _drain_stderr(self) -> None:
        debug = bool(os.environ.get("DELTALOG_DEBUG"))
        for raw in iter(self.proc.stderr.readline, b""):
            line = raw.decode("utf-8", "replace").rstrip()
            if line:
                self._stderr_tail.append(line)
                if debug:
                    print(f"remote {self.spec.host}: {line}", file=sys.stderr, flush=True)

    def _timed_out(self):
        # Hung: no goodbye, no waiting for it to exit. The ssh process goes now, so the
        # command returns within --timeout, not seconds after it.
        self._hung = self.busy = True
        self.proc.kill()
        raise TransportError(f"no answer for {self._reader.timeout:g} s",
                             hint="the peer or the network hangs; raise --timeout if it is just slow")

    def _explain(self, exc: TransportError) -> TransportError:
        """Add what ssh said on stderr to a TransportError."""
        wait = 0.1 if self._hung else 1.0
        try:
            _wait_for_exit(self.proc, wait)
        except subprocess.TimeoutExpired:
            pass
        self._stderr_thread.join(timeout=wait)
        said = [line for line in self._stderr_tail if line.strip()]
        detail = said[-1] if said else None
        code = self.proc.returncode
        message = f"{self.spec.text}: {exc}"
        if detail:
            message += f" (ssh said: {detail})"
        elif code is not None and code != 0:
            message += f" (ssh exited with status {code})"
        hint = exc.hint
        if code == 127 or (detail and "not found" in detail):
            hint = "is deltalog installed on the remote? pass --remote-deltalog PATH"
        elif detail and "Permission denied" in detail:
            hint = "ssh runs with BatchMode=yes: set up key authentication (ssh-agent or ~/.ssh/config)"
        return TransportError(message, hint=hint)

    def send(self, header: dict, payload=b"") -> None:
        self._greet()  # its errors (no deltalog there, another protocol) come before any request's
        self._send(header, payload)

    def _send(self, header: dict, payload=b"") -> None:
        if self.closed:
            raise TransportError(f"{self.spec.text}: connection already closed")
        try:
            wire.write_frame(self.wfile, header, payload)
        except TransportError as exc:
            raise self._explain(exc) from None

    def read(self) -> tuple[dict, bytearray]:
        self._greet()
        return self._read()

    def _read(self) -> tuple[dict, bytearray]:
        try:
            return wire.read_frame(self.rfile)
        except TransportError as exc:
            raise self._explain(exc) from None

    def request(self, kind: str, args: dict | None = None, expect: str = "ok", payload=None, **fields):
        """Send one request and return (answer header, payload) of the expected kind."""
        if self.busy:
            raise TransportError(f"{self.spec.text}: a chunk stream was abandoned; reconnect")
        header, data = self.request_unchecked(kind, args, payload, **fields)
        wire.expect(header, expect)
        return header, data

    def request_unchecked(self, kind: str, args: dict | None = None, payload=None, **fields):
        """Send one request and return its answer, an error frame included (not raised)."""
        body = payload if payload is not None else (wire.pack(args) if args is not None else b"")
        self.send({"type": kind, **fields}, body)
        return self.read()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._hung:
            self.proc.kill()
        if self._hello is None:  # never used: no goodbye, the far end exits on EOF (and ssh with it)
            self.busy = True
        if not self.busy and self.proc.poll() is None:
            try:
                wire.write_frame(self.wfile, {"type": "bye"})
                wire.read_frame(self.rfile)
            except Exception:  # noqa: BLE001 - best effort goodbye
                pass
        for stream in (self.wfile, self.proc.stdout):
            try:
                stream.close()
            except Exception:  # noqa: BLE001
                pass
        try:
            _wait_for_exit(self.proc, 5.0)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


WAIT_MARGIN_SECONDS = 10.0  # a wait answer may come this much after its timeout before the peer counts as gone


class SshSource:
    """Pull from ``host:path`` over ssh."""

    def __init__(self, spec, options):
        self.spec = spec
        self.conn = _open(spec, options, "source")
        self._fresh = True  # the handshake's hello serves the first hello() only

    def hello(self) -> dict:
        if self._fresh:
            self._fresh = False
            return self.conn.hello
        _h, data = self.conn.request("hello", expect="hello")
        return wire.unpack(data, "hello")

    def wait_for_head(self, since: int, timeout: float) -> int:
        """The remote ``serve --stdio`` answers when its head moves (or at ``timeout``)."""
        conn = self.conn
        if conn.busy:
            raise TransportError(f"{self.spec.text}: a chunk stream was abandoned; reconnect")
        reader = conn._reader
        saved = reader.timeout
        if saved is not None:  # silence is expected for up to ``timeout`` s now
            reader.timeout = max(saved, timeout + WAIT_MARGIN_SECONDS)
        conn.busy = True  # interrupted (a signal) before the answer: the pipe is out of step
        try:
            header, _data = conn.request_unchecked("wait", {"since": int(since), "timeout": float(timeout)})
        finally:
            reader.timeout = saved
        if header.get("type") == "error" and "unknown request" in str(header.get("message")):
            conn.busy = False
            raise NotImplementedError("the remote deltalog cannot long-poll (upgrade it)")
        wire.expect(header, "head")
        conn.busy = False
        head = header.get("head")
        if not isinstance(head, int):
            raise TransportError(f"{self.spec.text}: garbled wait answer")
        return head

    @property
    def reusable(self) -> bool:
        return not (self.conn.busy or self.conn.closed)

    def plan(self, since: int, advanced, target: int) -> dict:
        _h, data = self.conn.request("plan", {"since": since, "advanced": advanced, "target": target}, expect="plan")
        return wire.unpack(data, "plan")

    def chunks(self, since: int, advanced, target: int, max_chunk_bytes: int,
               base_values: bool = False) -> Iterator[bytes]:
        conn = self.conn
        request = {"since": since, "advanced": advanced, "target": target, "max_chunk_bytes": max_chunk_bytes}
        if base_values:  # only asked of a source whose hello names the codec; older ones never see the key
            request["base_values"] = True
        conn.send({"type": "chunks"}, wire.pack(request))
        conn.busy = True
        while True:
            header, data = conn.read()
            wire.raise_if_error(header)
            if header["type"] == "end":
                conn.busy = False
                return
            wire.expect(header, "chunk")
            yield data

    def snapshot_manifest(self, offset: int) -> dict:
        _h, data = self.conn.request("snapshot_manifest", {"offset": offset}, expect="manifest")
        return wire.unpack(data, "manifest")

    def state_digest_at(self, offset: int) -> str | None:
        """The remote source's state digest at ``offset`` (hex), or None when it has none; an
        older ``serve --stdio`` that does not know the request has none either."""
        conn = self.conn
        if conn.busy:
            raise TransportError(f"{self.spec.text}: a chunk stream was abandoned; reconnect")
        header, data = conn.request_unchecked("digest_at", {"offset": int(offset)})
        if header.get("type") == "error" and "unknown request" in str(header.get("message")):
            return None
        wire.expect(header, "digest")
        answer = wire.unpack(data, "digest")
        digest = answer.get("digest") if isinstance(answer, dict) else None
        return digest if isinstance(digest, str) else None

    def read_snapshot_file(self, offset: int, file: str, start: int, length: int) -> bytes:
        _h, data = self.conn.request("read_snapshot_file",
                                     {"offset": offset, "file": file, "start": start, "length": length},
                                     expect="data")
        return data

    def close(self) -> None:
        self.conn.close()


class SshSink:
    """Push into ``host:path`` over ssh: the remote process applies and holds the lock."""

    def __init__(self, spec, options):
        self.spec = spec
        self.conn = _open(spec, options, "sink")

    def _state(self, kind: str, args: dict | None = None) -> dict:
        _h, data = self.conn.request(kind, args or {}, expect="state")
        return wire.unpack(data, "state")

    def begin(self, wait: float, dry_run: bool = False) -> dict:
        return self._state("begin", {"wait": wait, "dry_run": dry_run})

    def apply_chunk(self, blob, target: int, source: str) -> dict:
        _h, data = self.conn.request("apply_chunk", expect="applied", payload=blob, target=target, source=source)
        return wire.unpack(data, "applied")

    def apply_final(self, blob, target: int, follow: dict) -> dict:
        _h, data = self.conn.request("apply_final", expect="state", payload=blob, target=target, follow=follow)
        return wire.unpack(data, "state")

    def finish(self, target: int, follow: dict, digest: str | None = None) -> dict:
        return self._state("finish", {"target": target, "follow": follow, "digest": digest})

    def state_digest_at(self, offset: int) -> str | None:
        """The remote destination's state digest at ``offset`` (hex), or None when it cannot tell."""
        _h, data = self.conn.request("digest_at", {"offset": int(offset)}, expect="digest")
        answer = wire.unpack(data, "digest")
        return answer.get("digest") if isinstance(answer, dict) else None

    def abort_pending(self) -> dict:
        return self._state("abort_pending")

    def note_follow(self, follow: dict) -> None:
        self.conn.request("note_follow", {"follow": follow})

    def snapshot_begin(self, hello: dict, manifest: dict) -> dict[str, int]:
        _h, data = self.conn.request("snapshot_begin", {"hello": hello, "manifest": manifest}, expect="held")
        return wire.unpack(data, "held")

    def snapshot_write(self, file: str, start: int, data) -> None:
        self.conn.request("snapshot_write", payload=data, file=file, start=start)

    def snapshot_commit(self) -> dict:
        return self._state("snapshot_commit")

    def end_round(self) -> None:
        """Release the remote lock but keep the session (``sync --follow`` pushes round after round)."""
        self.conn.request("end")

    @property
    def reusable(self) -> bool:
        return not (self.conn.busy or self.conn.closed)

    def close(self) -> None:
        self.conn.close()


def _open(spec, options, role: str) -> SshConnection:
    return SshConnection(spec, options, role)
