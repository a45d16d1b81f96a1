"""The far side of an ssh pipe: ``deltalog serve --stdio PATH``.

Speaks the framed protocol (deltalog.wire) on stdin/stdout, one request and
its answer at a time, after a version handshake in which the client picks a
role:

- ``source`` (the client pulls from PATH): requests ``hello`` (the source
  hello again, looked at afresh: one per round of ``sync --follow``),
  ``wait`` ({since, timeout}: answered ``head`` {head} as soon as PATH's
  head differs from ``since``, or at the timeout; the long-poll of ``sync
  --follow``), ``plan``, ``chunks`` (answered by a stream of ``chunk``
  frames and an ``end`` frame), ``snapshot_manifest``, ``read_snapshot_file``,
  ``digest_at`` ({offset}: answered ``digest`` {digest}, PATH's state digest
  there, including an offset compaction dropped; nil when it has none);
- ``sink`` (the client pushes into PATH, this process applies): requests
  ``begin``, ``apply_chunk``, ``apply_final`` (the only chunk of a sync,
  applied as its record; header {target, follow}), ``finish`` ({target,
  follow, digest}: the source's state digest at the target), ``digest_at``
  ({offset}: answered ``digest`` {digest}, this replica's state digest there),
  ``abort_pending``, ``note_follow``, ``end`` (a round of ``sync --follow``
  is over: the lock is released, the session stays for the next ``begin``),
  ``snapshot_begin``, ``snapshot_write``, ``snapshot_commit``.

Either ends with ``bye`` or end of input. Structured arguments and answers
travel as msgpack payloads (they may be large: bucket maps, manifests);
record blobs and snapshot pieces as raw payloads. A deltalog error becomes
an ``error`` frame (the client raises it again as the same class) and the
session goes on; nothing but frames is ever written to stdout (logs go to
stderr). If the client vanishes, this process exits and the sink's lock is
released with it, so a killed sync leaves PATH exactly as a killed local
sync would.
"""

from __future__ import annotations

import os
import select
import sys
import time

from . import wire
from .errors import DeltalogError, TransportError


def _args(header: dict, payload) -> dict:
    return wire.unpack(payload, f"{header['type']} request") if payload else {}


def _answer(out, kind: str, value=None, **fields) -> None:
    wire.write_frame(out, {"type": kind, **fields}, b"" if value is None else wire.pack(value))


def serve(path: str, instream, outstream, max_frame_bytes: int = wire.DEFAULT_MAX_FRAME_BYTES) -> int:
    """Serve one client on (instream, outstream) until it says bye or goes away. Returns an exit code."""
    try:
        header, _payload = wire.read_frame(instream, max_frame_bytes)
    except TransportError:
        return 0  # nobody talked to us
    try:
        version = wire.negotiate(header)
        role = header.get("role")
        if role not in ("source", "sink"):
            raise TransportError(f"unknown role {role!r} in the client's hello")
        handler = _SourceHandler(path, instream) if role == "source" else _SinkHandler(path)
    except Exception as exc:  # noqa: BLE001 - every failure goes back as one error frame
        _log_unexpected(exc)
        wire.write_frame(outstream, wire.error_header(exc))
        return 1
    try:
        wire.write_frame(outstream, {"type": "hello", "magic": wire.MAGIC, "protocol": version,
                                     "role": role}, wire.pack(handler.hello()))
        while True:
            try:
                header, payload = wire.read_frame(instream, max_frame_bytes)
            except TransportError:
                return 0  # the client went away: nothing half-done survives (each step is atomic)
            kind = header["type"]
            if kind == "bye":
                _answer(outstream, "bye")
                return 0
            method = getattr(handler, "do_" + kind, None)
            if kind in _CHUNK_REQUESTS:
                from .receive import HandedOver

                payload = HandedOver(payload)  # no reference kept here: it can go before LMDB copies the record
            try:
                if method is None:
                    raise TransportError(f"unknown request {kind!r}")
                method(header, payload, outstream)
            except TransportError as exc:
                if "went away" in str(exc):
                    return 0
                wire.write_frame(outstream, wire.error_header(exc))
            except Exception as exc:  # noqa: BLE001
                _log_unexpected(exc)
                wire.write_frame(outstream, wire.error_header(exc))
    except TransportError:
        return 0
    finally:
        handler.close()


_CHUNK_REQUESTS = ("apply_chunk", "apply_final")  # their payload is a chunk, handed over to the sink


def _log_unexpected(exc: BaseException) -> None:
    if not isinstance(exc, DeltalogError) or os.environ.get("DELTALOG_DEBUG"):
        import traceback

        traceback.print_exception(exc, file=sys.stderr)


MAX_WAIT_SECONDS = 3600.0  # one ``wait`` request; the client asks again


class _SourceHandler:
    def __init__(self, path: str, instream=None):
        from .transport.local import LocalSource

        self.source = LocalSource(path)
        try:
            self._in_fd = instream.fileno() if instream is not None else None
        except (AttributeError, OSError, ValueError):
            self._in_fd = None  # not a real pipe (a test's buffer): wait without watching the client

    def hello(self) -> dict:
        return self.source.hello()

    def do_hello(self, header, payload, out) -> None:
        _answer(out, "hello", self.source.hello())

    def do_wait(self, header, payload, out) -> None:
        """Answer when the head moves past ``since`` or at the timeout; stop early if the client hangs up."""
        from .sync import source_wait

        a = _args(header, payload)
        try:
            since, timeout = int(a["since"]), min(max(0.0, float(a.get("timeout", 0.0))), MAX_WAIT_SECONDS)
        except (KeyError, TypeError, ValueError):
            raise TransportError("wait needs an integer since and a number of seconds") from None
        fd = self._in_fd

        def idle(seconds: float) -> bool:
            if fd is None:
                time.sleep(seconds)
                return False
            # Readable while we wait means end of input (the client went away) or a
            # new request; either way the wait is over. The sleep is the select.
            ready, _, _ = select.select([fd], [], [], seconds)
            return bool(ready)

        head = source_wait(self.source.replica, since, timeout, idle=idle)
        _answer(out, "head", head=head)

    def do_plan(self, header, payload, out) -> None:
        a = _args(header, payload)
        _answer(out, "plan", self.source.plan(a["since"], a.get("advanced") or {}, a["target"]))

    def do_chunks(self, header, payload, out) -> None:
        a = _args(header, payload)
        n = 0
        for blob in self.source.chunks(a["since"], a.get("advanced") or {}, a["target"], a["max_chunk_bytes"],
                                       base_values=a.get("base_values") is True):
            wire.write_frame(out, {"type": "chunk", "n": n}, blob)
            n += 1
        _answer(out, "end", chunks=n)

    def do_snapshot_manifest(self, header, payload, out) -> None:
        a = _args(header, payload)
        _answer(out, "manifest", self.source.snapshot_manifest(a["offset"]))

    def do_digest_at(self, header, payload, out) -> None:
        a = _args(header, payload)
        _answer(out, "digest", {"digest": self.source.state_digest_at(int(a["offset"]))})

    def do_read_snapshot_file(self, header, payload, out) -> None:
        a = _args(header, payload)
        data = self.source.read_snapshot_file(a["offset"], a["file"], a["start"], a["length"])
        wire.write_frame(out, {"type": "data"}, data)

    def close(self) -> None:
        self.source.close()


class _SinkHandler:
    def __init__(self, path: str):
        from .transport.local import LocalSink

        self.path = path
        self.sink = LocalSink(path)

    def hello(self) -> dict:
        return {}

    def do_end(self, header, payload, out) -> None:
        """End a round of ``sync --follow``: release the lock, keep the session for the next ``begin``.

        The replica stays open too when it can (LocalSink.end_round: its
        memory maps stay warm); otherwise a fresh sink serves the next round.
        """
        from .transport.local import LocalSink

        if self.sink.reusable:
            self.sink.end_round()
        else:
            self.sink.close()
            self.sink = LocalSink(self.path)
        _answer(out, "ok")

    def do_begin(self, header, payload, out) -> None:
        a = _args(header, payload)
        _answer(out, "state", self.sink.begin(float(a.get("wait", 0.0)), bool(a.get("dry_run", False))))

    def do_apply_chunk(self, header, payload, out) -> None:
        result = self.sink.apply_chunk(payload, int(header["target"]), str(header.get("source", "")))
        _answer(out, "applied", result)

    def do_finish(self, header, payload, out) -> None:
        a = _args(header, payload)
        _answer(out, "state", self.sink.finish(a["target"], a["follow"], a.get("digest")))

    def do_digest_at(self, header, payload, out) -> None:
        a = _args(header, payload)
        _answer(out, "digest", {"digest": self.sink.state_digest_at(int(a["offset"]))})

    def do_abort_pending(self, header, payload, out) -> None:
        _answer(out, "state", self.sink.abort_pending())

    def do_apply_final(self, header, payload, out) -> None:
        _answer(out, "state", self.sink.apply_final(payload, int(header["target"]), header.get("follow") or {}))

    def do_note_follow(self, header, payload, out) -> None:
        self.sink.note_follow(_args(header, payload)["follow"])
        _answer(out, "ok")

    def do_snapshot_begin(self, header, payload, out) -> None:
        a = _args(header, payload)
        _answer(out, "held", self.sink.snapshot_begin(a["hello"], a["manifest"]))

    def do_snapshot_write(self, header, payload, out) -> None:
        self.sink.snapshot_write(str(header["file"]), int(header["start"]), payload)
        _answer(out, "ok")

    def do_snapshot_commit(self, header, payload, out) -> None:
        _answer(out, "state", self.sink.snapshot_commit())

    def close(self) -> None:
        self.sink.close()


def main_stdio(path: str) -> int:
    """Run :func:`serve` on this process's stdin/stdout, keeping stdout for frames only."""
    for fd in (sys.stdin.fileno(), sys.stdout.fileno()):  # pipes from and to sshd
        wire.widen_pipe(fd)
    proto_out = os.fdopen(os.dup(sys.stdout.fileno()), "wb", buffering=1 << 16)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # stray prints (ours or a library's) go to stderr
    sys.stdout = sys.stderr
    instream = os.fdopen(os.dup(sys.stdin.fileno()), "rb", buffering=1 << 16)
    try:
        return serve(os.path.expanduser(path), instream, proto_out)
    finally:
        try:
            proto_out.close()
        except OSError:
            pass
