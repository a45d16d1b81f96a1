"""The framed protocol shared by the SSH (stdio) and HTTP transports.

A frame is::

    u32 big-endian H | msgpack header, H bytes | payload, header["nbytes"] bytes

The header is a map with at least ``type`` (str), ``nbytes`` (payload size)
and ``xxh3`` (xxh3-64 of the payload, an unsigned int). Everything else in
the header is message-specific and small; bulk data (record blobs, snapshot
file pieces, manifests) travels as the payload, written from memoryviews and
read into one preallocated buffer, so nothing is copied or packed twice.

Reading is bounded: a header longer than :data:`MAX_HEADER_BYTES` or a
payload longer than the caller's ``max_frame_bytes`` is refused before any
allocation, a short read is a TransportError (the peer vanished) and a
payload whose checksum differs is an IntegrityError.

The first exchange is a version handshake (:func:`hello_request` /
:func:`check_hello`): the client states the protocol versions it speaks and
its role, the server answers with the version it picked or an error frame.
Errors cross the wire as ``{"type": "error", "error": <class name>,
"message", "hint"}`` and are raised again on the other side as the same
deltalog error class (so a remote ModelMismatch still exits 6).
"""

from __future__ import annotations

import struct
from typing import Any

import msgpack
import xxhash

from . import errors
from .errors import DeltalogError, IntegrityError, TransportError, UnsupportedVersion

MAGIC = "deltalog"
PROTOCOL_VERSION = 1
MIN_PROTOCOL_VERSION = 1
MAX_HEADER_BYTES = 1 << 20  # headers are metadata; a bigger one is garbage (e.g. a login banner)
DEFAULT_MAX_FRAME_BYTES = 256 << 20  # one chunk or one snapshot piece; far above what peers send

_LEN = struct.Struct(">I")


def pack(obj: Any) -> bytes:
    """msgpack with pinned options (binary stays bytes, strings stay str)."""
    return msgpack.packb(obj, use_bin_type=True)


def unpack(data, what: str = "frame") -> Any:
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=False, use_list=True)
    except Exception as exc:  # msgpack raises several unrelated types
        raise TransportError(f"{what}: garbled message ({exc.__class__.__name__})") from None


# -- frames -------------------------------------------------------------------


def _read_exact_into(stream, buf: memoryview, what: str) -> None:
    """Fill ``buf`` from ``stream`` or raise TransportError on EOF."""
    got = 0
    total = len(buf)
    readinto = getattr(stream, "readinto", None)
    while got < total:
        if readinto is not None:
            n = readinto(buf[got:])
        else:  # a raw socket
            n = stream.recv_into(buf[got:])
        if not n:
            if got == 0 and what == "frame header length":
                raise TransportError("the peer closed the connection")
            raise TransportError(f"the peer closed the connection mid-frame ({what}: {got} of {total} bytes)")
        got += n


def read_frame(stream, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> tuple[dict, bytearray]:
    """Read one frame: (header, payload). Refuses oversized, truncated or garbled frames.

    ``stream`` is a binary file object with ``readinto`` (a pipe, a socket's
    makefile("rb")) or a socket. Memory use is bounded by ``max_frame_bytes``.
    """
    length = bytearray(_LEN.size)
    _read_exact_into(stream, memoryview(length), "frame header length")
    (hlen,) = _LEN.unpack(length)
    if hlen == 0 or hlen > MAX_HEADER_BYTES:
        raise TransportError(
            f"garbled frame from the peer (header length {hlen})",
            hint="is something on the far side printing to stdout, e.g. a login banner in .bashrc?",
        )
    raw = bytearray(hlen)
    _read_exact_into(stream, memoryview(raw), "frame header")
    header = unpack(raw, "frame header")
    if not isinstance(header, dict) or not isinstance(header.get("type"), str):
        raise TransportError("garbled frame from the peer (header is not a message)")
    nbytes = header.get("nbytes", 0)
    digest = header.get("xxh3", 0)
    if not isinstance(nbytes, int) or nbytes < 0 or not isinstance(digest, int):
        raise TransportError("garbled frame from the peer (bad payload size or checksum field)")
    if nbytes > max_frame_bytes:
        raise TransportError(f"the peer sent a {nbytes}-byte frame, more than the {max_frame_bytes}-byte limit")
    payload = bytearray(nbytes)
    if nbytes:
        _read_exact_into(stream, memoryview(payload), f"{header['type']} payload")
    if xxhash.xxh3_64_intdigest(payload) != digest:
        raise IntegrityError(f"{header['type']} frame from the peer: payload checksum mismatch")
    return header, payload


def encode_header(header: dict, payload=b"") -> bytes:
    """The length prefix and header of a frame carrying ``payload`` (not the payload itself)."""
    view = memoryview(payload).cast("B") if len(payload) else memoryview(b"")
    full = dict(header)
    full["nbytes"] = view.nbytes
    full["xxh3"] = xxhash.xxh3_64_intdigest(view)
    raw = pack(full)
    if len(raw) > MAX_HEADER_BYTES:
        raise ValueError(f"frame header of {len(raw)} bytes is too big; send bulk data as the payload")
    return _LEN.pack(len(raw)) + raw


def write_frame(stream, header: dict, payload=b"") -> int:
    """Write one frame; returns the bytes written. The payload goes out as a memoryview (no copy).

    ``stream`` is a socket (sendall) or a binary file object (write + flush).
    """
    view = memoryview(payload).cast("B") if len(payload) else memoryview(b"")
    head = encode_header(header, view)
    try:
        sendall = getattr(stream, "sendall", None)
        if sendall is not None:
            sendall(head)
            if view.nbytes:
                sendall(view)
        else:
            stream.write(head)
            if view.nbytes:
                stream.write(view)
            stream.flush()
    except (BrokenPipeError, ConnectionError, ValueError, OSError) as exc:
        raise TransportError(f"the peer went away while we were sending ({exc.__class__.__name__})") from None
    return len(head) + view.nbytes


# -- handshake and errors ----------------------------------------------------------


PIPE_BYTES = 1 << 20  # Linux's default cap for an unprivileged process (/proc/sys/fs/pipe-max-size)


def widen_pipe(fd: int) -> None:
    """Give the pipe behind ``fd`` a 1 MiB buffer instead of 64 KiB (Linux; elsewhere nothing).

    A chunk crossing ssh goes through two pipes (into ssh, out of sshd),
    and with 64 KiB buffers every 64 KiB was a hand-off between processes:
    11 MB took ~0.14 s on loopback here, ~0.04 s with 1 MiB. Refused (the
    user's pipe quota, not a pipe): the default stays, only slower.
    """
    try:
        import fcntl  # POSIX only; the module stays importable elsewhere
    except ImportError:
        return
    set_size = getattr(fcntl, "F_SETPIPE_SZ", None)  # Linux only
    if set_size is None:
        return
    try:
        fcntl.fcntl(fd, set_size, PIPE_BYTES)
    except OSError:
        pass


def hello_request(role: str, **extra) -> dict:
    """The client's first message. ``role`` is "source" (we pull) or "sink" (we push)."""
    return {"type": "hello", "magic": MAGIC, "protocol": PROTOCOL_VERSION, "min_protocol": MIN_PROTOCOL_VERSION,
            "role": role, **extra}


def negotiate(request: dict) -> int:
    """Server side: the protocol version to speak with a client's hello, or UnsupportedVersion."""
    if request.get("type") != "hello" or request.get("magic") != MAGIC:
        raise TransportError("the peer did not start with a deltalog hello")
    theirs_max = request.get("protocol")
    theirs_min = request.get("min_protocol", theirs_max)
    if not isinstance(theirs_max, int) or not isinstance(theirs_min, int):
        raise TransportError("the peer's hello has no protocol version")
    version = min(theirs_max, PROTOCOL_VERSION)
    if version < max(theirs_min, MIN_PROTOCOL_VERSION):
        raise UnsupportedVersion(
            f"protocol mismatch: the peer speaks v{theirs_min}..v{theirs_max}, "
            f"this deltalog v{MIN_PROTOCOL_VERSION}..v{PROTOCOL_VERSION}",
            hint="install the same deltalog version on both sides",
        )
    return version


def check_hello(answer: dict) -> int:
    """Client side: the version the server picked (raises the server's error if it refused)."""
    raise_if_error(answer)
    if answer.get("type") != "hello" or answer.get("magic") != MAGIC:
        raise TransportError("the peer answered something other than a deltalog hello")
    version = answer.get("protocol")
    if not isinstance(version, int) or not MIN_PROTOCOL_VERSION <= version <= PROTOCOL_VERSION:
        raise UnsupportedVersion(f"the peer picked protocol v{version}, this deltalog speaks "
                                 f"v{MIN_PROTOCOL_VERSION}..v{PROTOCOL_VERSION}",
                                 hint="install the same deltalog version on both sides")
    return version


def error_header(exc: BaseException) -> dict:
    """An error frame for ``exc`` (a DeltalogError keeps its class across the wire)."""
    if isinstance(exc, DeltalogError):
        return {"type": "error", "error": type(exc).__name__, "message": str(exc), "hint": exc.hint}
    return {"type": "error", "error": "DeltalogError", "message": f"remote internal error: {type(exc).__name__}: {exc}",
            "hint": "run the remote side with DELTALOG_DEBUG=1 and report it"}


def raise_if_error(header: dict) -> None:
    """Raise the error an error frame carries, as its own deltalog class."""
    if header.get("type") != "error":
        return
    name = header.get("error")
    cls = getattr(errors, name, None) if isinstance(name, str) else None
    if not (isinstance(cls, type) and issubclass(cls, DeltalogError)):
        cls = TransportError
    message = str(header.get("message") or "the peer reported an error")
    hint = header.get("hint")
    raise cls(f"remote: {message}", hint=hint if isinstance(hint, str) else None)


def expect(header: dict, kind: str) -> dict:
    """``header`` if it is a ``kind`` message; raises the peer's error or TransportError."""
    raise_if_error(header)
    if header.get("type") != kind:
        raise TransportError(f"protocol error: expected a {kind!r} message, the peer sent {header.get('type')!r}")
    return header
