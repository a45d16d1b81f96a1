"""The framed protocol (deltalog.wire): round trips, and refusal of bad frames without unbounded allocation."""

from __future__ import annotations

import io
import socket
import struct
import threading

import msgpack
import pytest

from deltalog import wire
from deltalog.errors import IntegrityError, ModelMismatch, TransportError, UnsupportedVersion


def frame_bytes(header: dict, payload: bytes = b"") -> bytes:
    buf = io.BytesIO()
    wire.write_frame(buf, header, payload)
    return buf.getvalue()


def test_round_trip_file_object():
    raw = frame_bytes({"type": "chunk", "n": 3}, b"payload bytes")
    header, payload = wire.read_frame(io.BytesIO(raw))
    assert header["type"] == "chunk" and header["n"] == 3
    assert header["nbytes"] == 13
    assert bytes(payload) == b"payload bytes"


def test_empty_payload_and_several_frames_in_a_row():
    stream = io.BytesIO(frame_bytes({"type": "a"}) + frame_bytes({"type": "b"}, b"x" * 1000))
    h1, p1 = wire.read_frame(stream)
    h2, p2 = wire.read_frame(stream)
    assert (h1["type"], len(p1), h2["type"], len(p2)) == ("a", 0, "b", 1000)
    with pytest.raises(TransportError, match="closed the connection"):
        wire.read_frame(stream)


def test_payload_can_be_a_memoryview_or_numpy_buffer():
    import numpy as np

    array = np.arange(1000, dtype=np.float32)
    raw = frame_bytes({"type": "data"}, memoryview(array))
    _h, payload = wire.read_frame(io.BytesIO(raw))
    assert np.array_equal(np.frombuffer(payload, dtype=np.float32), array)


def test_round_trip_over_a_socket_pair_with_a_large_payload():
    a, b = socket.socketpair()
    payload = bytes(range(256)) * (8 << 10)  # 2 MiB: more than a socket buffer
    sender = threading.Thread(target=wire.write_frame, args=(a, {"type": "big"}, payload))
    sender.start()
    header, got = wire.read_frame(b.makefile("rb"))
    sender.join()
    a.close()
    b.close()
    assert header["type"] == "big" and bytes(got) == payload


def test_truncated_payload_is_a_transport_error():
    raw = frame_bytes({"type": "chunk"}, b"0123456789")
    with pytest.raises(TransportError, match="mid-frame"):
        wire.read_frame(io.BytesIO(raw[:-3]))


def test_truncated_header_is_a_transport_error():
    raw = frame_bytes({"type": "chunk"}, b"0123456789")
    with pytest.raises(TransportError):
        wire.read_frame(io.BytesIO(raw[:6]))


def test_checksum_mismatch_is_an_integrity_error():
    raw = bytearray(frame_bytes({"type": "chunk"}, b"0123456789"))
    raw[-1] ^= 0xFF
    with pytest.raises(IntegrityError, match="checksum"):
        wire.read_frame(io.BytesIO(bytes(raw)))


def test_oversized_payload_is_refused_before_allocating():
    header = msgpack.packb({"type": "chunk", "nbytes": 1 << 40, "xxh3": 0})
    raw = struct.pack(">I", len(header)) + header  # no payload follows: it must not be awaited
    with pytest.raises(TransportError, match="limit"):
        wire.read_frame(io.BytesIO(raw), max_frame_bytes=1 << 20)


def test_oversized_header_length_is_refused_with_a_banner_hint():
    stream = io.BytesIO(b"Welcome to host!\n" + b"\0" * 100)  # a login banner on stdout
    with pytest.raises(TransportError, match="garbled") as info:
        wire.read_frame(stream)
    assert "banner" in (info.value.hint or "")


@pytest.mark.parametrize(
    "header",
    [b"\x93\x01\x02\x03", msgpack.packb({"no": "type"}), msgpack.packb({"type": "x", "nbytes": -1, "xxh3": 0}),
     msgpack.packb({"type": "x", "nbytes": "big", "xxh3": 0}), b"\xc1"],
)
def test_garbled_headers_are_transport_errors(header):
    with pytest.raises(TransportError):
        wire.read_frame(io.BytesIO(struct.pack(">I", len(header)) + header))


def test_zero_length_header_is_refused():
    with pytest.raises(TransportError):
        wire.read_frame(io.BytesIO(b"\0\0\0\0"))


def test_handshake_negotiates_and_refuses_other_versions():
    request = wire.hello_request("source")
    assert wire.negotiate(request) == wire.PROTOCOL_VERSION
    future = {**request, "protocol": 99, "min_protocol": 50}
    with pytest.raises(UnsupportedVersion):
        wire.negotiate(future)
    with pytest.raises(TransportError):
        wire.negotiate({"type": "hello", "magic": "rsync"})
    answer = {"type": "hello", "magic": wire.MAGIC, "protocol": wire.PROTOCOL_VERSION}
    assert wire.check_hello(answer) == wire.PROTOCOL_VERSION
    with pytest.raises(UnsupportedVersion):
        wire.check_hello({**answer, "protocol": 99})


def test_errors_cross_the_wire_as_their_own_class():
    raw = frame_bytes(wire.error_header(ModelMismatch("other model", hint="pick another")))
    header, _ = wire.read_frame(io.BytesIO(raw))
    with pytest.raises(ModelMismatch, match="other model") as info:
        wire.raise_if_error(header)
    assert info.value.exit_code == 6 and info.value.hint == "pick another"
    with pytest.raises(TransportError):  # an unknown class name is never instantiated
        wire.raise_if_error({"type": "error", "error": "os.system", "message": "x"})
    with pytest.raises(TransportError, match="expected"):
        wire.expect({"type": "chunk"}, "end")


def test_writing_to_a_closed_peer_is_a_transport_error():
    a, b = socket.socketpair()
    b.close()
    with pytest.raises(TransportError, match="went away"):
        for _ in range(100):  # the first send may still land in the buffer
            wire.write_frame(a, {"type": "x"}, b"y" * 65536)
    a.close()
