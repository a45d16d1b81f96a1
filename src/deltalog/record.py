"""The record: one atomic update batch, and its byte encoding (format v1).

A record is what the log stores under its offset and what replicas ship to
each other, so its encoding is portable (fixed byte order, no LMDB pages)
and self-checking. Layout (formats/FORMAT.md is normative):

    magic "DLRC" | u16 version | u16 flags | u32 header length H  (big-endian)
    header: msgpack map, H bytes
    sections: compressed payloads, in the order the header lists them
    u64 xxh3_64 of everything before it                          (big-endian)

Values are absolute (re-applying a record is idempotent) and each tensor
section may carry the values the rows had before (``old``), which makes the
record undoable.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from functools import partial

import msgpack
import numpy as np
import xxhash

from . import codec
from .dtypes import storage_dtype
from .errors import IntegrityError, UnsupportedVersion

MAGIC = b"DLRC"
VERSION = 1
KINDS = ("commit", "sync", "rollback")

_FIXED = struct.Struct(">4sHHI")
_TRAILER = struct.Struct(">Q")
MAX_HEADER = 64 << 20  # a header is metadata only; anything bigger is corrupt


def pack(obj) -> bytes:
    """msgpack with pinned options: binary stays bytes, strings stay str."""
    return msgpack.packb(obj, use_bin_type=True)


def unpack(data, what: str):
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=True, use_list=True)
    except Exception as exc:  # msgpack raises several unrelated types
        raise IntegrityError(f"{what}: undecodable metadata ({exc.__class__.__name__})") from None


@dataclass
class TensorDelta:
    """New (and optionally old) values of some rows of one tensor."""

    name: str
    dtype: str  # logical dtype name (dtypes.STORAGE)
    rows: np.ndarray  # uint64, sorted, unique
    new: np.ndarray  # (len(rows), row_elems), storage dtype
    old: np.ndarray | None = None  # same shape: the values replaced, for undo
    versions: np.ndarray | None = None  # uint64 per row, offset that last wrote it; None = the record's offset
    significance: float = 0.0  # sum |new - old| over the rows
    # Sections that arrived already encoded for exactly these rows, new values and
    # versions ({"index"|"new"|"versions": (payload, decoded size)}): encode() copies
    # them instead of compressing again (a sync destination stores what it received).
    encoded: dict[str, tuple[bytes | memoryview, int]] | None = None


@dataclass
class Record:
    offset: int
    base: int  # head this record applies on top of
    kind: str
    time: float
    model_id: str
    tensors: list[TensorDelta] = field(default_factory=list)
    reason: str | None = None
    target: int | None = None  # rollback: the offset restored; sync: the source's head

    @property
    def rows(self) -> int:
        return sum(len(t.rows) for t in self.tensors)

    @property
    def significance(self) -> float:
        return sum(t.significance for t in self.tensors)


@dataclass
class RecordSummary:
    """What the header alone tells: enough for `log` without decoding values."""

    offset: int
    base: int
    kind: str
    time: float
    model_id: str
    reason: str | None
    target: int | None
    rows: int
    significance: float
    nbytes: int
    tensors: list[dict]


def _given(section: tuple[bytes, int]):
    return lambda: section


def encode(record: Record) -> bytes:
    if record.kind not in KINDS:
        raise ValueError(f"unknown record kind {record.kind!r}")
    # Every section is encoded on its own (zstd and numpy release the GIL), so a
    # large record compresses its sections on all cores; results keep their order.
    jobs = []
    value_bytes = 0
    for t in record.tensors:
        done = t.encoded or {}
        jobs.append(_given(done["index"]) if "index" in done else partial(codec.encode_indices, t.rows))
        jobs.append(_given(done["new"]) if "new" in done else partial(codec.encode_values, t.new))
        value_bytes += 0 if "new" in done else t.new.nbytes
        if t.old is not None:
            jobs.append(partial(codec.encode_xor_values, t.old, t.new))
            value_bytes += t.old.nbytes
        if t.versions is not None:
            jobs.append(_given(done["versions"]) if "versions" in done
                        else partial(codec.encode_values, np.asarray(t.versions, dtype="<u8")))
    encoded = iter(codec.run_jobs(jobs, value_bytes))
    sections: list[bytes] = []
    tensor_headers = []
    for t in record.tensors:
        layout = {}
        payload, size = next(encoded)
        layout["index"] = [codec.INDEX, len(payload), size]
        sections.append(payload)
        payload, size = next(encoded)
        layout["new"] = [codec.VALUES, len(payload), size]
        sections.append(payload)
        if t.old is not None:
            payload, size = next(encoded)
            layout["old"] = [codec.XOR_VALUES, len(payload), size]
            sections.append(payload)
        if t.versions is not None:
            payload, size = next(encoded)
            layout["versions"] = [codec.VALUES, len(payload), size]
            sections.append(payload)
        tensor_headers.append(
            {
                "name": t.name,
                "dtype": t.dtype,
                "count": int(len(t.rows)),
                "row_elems": int(t.new.shape[1]) if t.new.ndim == 2 else 0,
                "significance": float(t.significance),
                "sections": layout,
            }
        )
    header = pack(
        {
            "offset": int(record.offset),
            "base": int(record.base),
            "kind": record.kind,
            "time": float(record.time),
            "model_id": record.model_id,
            "reason": record.reason,
            "target": None if record.target is None else int(record.target),
            "tensors": tensor_headers,
        }
    )
    parts = [_FIXED.pack(MAGIC, VERSION, 0, len(header)), header, *sections]
    digest = xxhash.xxh3_64()
    for part in parts:  # hashed piece by piece: the record is assembled once, not twice
        digest.update(part)
    parts.append(_TRAILER.pack(digest.intdigest()))
    return b"".join(parts)


def _read_header(blob, what: str) -> tuple[dict, int]:
    view = memoryview(blob)
    if len(view) < _FIXED.size + _TRAILER.size:
        raise IntegrityError(f"{what}: truncated record ({len(view)} bytes)")
    magic, version, _flags, hlen = _FIXED.unpack_from(view)
    if magic != MAGIC:
        raise IntegrityError(f"{what}: not a deltalog record (bad magic)")
    if version > VERSION:
        raise UnsupportedVersion(f"{what}: record format v{version}, this deltalog reads up to v{VERSION}")
    if hlen > MAX_HEADER or _FIXED.size + hlen + _TRAILER.size > len(view):
        raise IntegrityError(f"{what}: truncated record header")
    header = unpack(view[_FIXED.size : _FIXED.size + hlen], what)
    if not isinstance(header, dict) or not isinstance(header.get("tensors"), list):
        raise IntegrityError(f"{what}: malformed record header")
    return header, _FIXED.size + hlen


def check(blob, what: str = "record") -> None:
    """Raise IntegrityError unless the record's checksum matches."""
    view = memoryview(blob)
    if len(view) < _FIXED.size + _TRAILER.size:
        raise IntegrityError(f"{what}: truncated record ({len(view)} bytes)")
    (want,) = _TRAILER.unpack_from(view, len(view) - _TRAILER.size)
    if xxhash.xxh3_64_intdigest(view[: len(view) - _TRAILER.size]) != want:
        raise IntegrityError(f"{what}: checksum mismatch")


def summarize(blob, what: str = "record") -> RecordSummary:
    """Parse the header only (no checksum, no decompression): for listings."""
    header, _ = _read_header(blob, what)
    try:
        tensors = [
            {"name": t["name"], "rows": int(t["count"]), "significance": float(t["significance"])}
            for t in header["tensors"]
        ]
        return RecordSummary(
            offset=int(header["offset"]),
            base=int(header["base"]),
            kind=str(header["kind"]),
            time=float(header["time"]),
            model_id=str(header["model_id"]),
            reason=header.get("reason"),
            target=header.get("target"),
            rows=sum(t["rows"] for t in tensors),
            significance=sum(t["significance"] for t in tensors),
            nbytes=len(memoryview(blob)),
            tensors=tensors,
        )
    except (KeyError, TypeError, ValueError):
        raise IntegrityError(f"{what}: malformed record header") from None


def decode(
    blob, what: str = "record", only: set[str] | None = None, with_old: bool = True, checked: bool = False,
    rows_only: bool = False, keep_encoded: bool = False,
) -> Record:
    """Check and decode a record. ``only`` limits which tensors are decompressed;
    ``checked`` skips the checksum when the caller has just verified it; ``rows_only``
    decodes row indices (and per-row versions, when present) alone: ``new`` is then an
    empty (0, row_elems) array. ``keep_encoded`` keeps the index, new and versions
    sections on each TensorDelta (views into ``blob``: keep it alive and unchanged
    while they are used), for :func:`encode` to reuse."""
    if not checked:
        check(blob, what)
    header, pos = _read_header(blob, what)
    view = memoryview(blob)
    end = len(view) - _TRAILER.size
    tensors = []
    try:
        for th in header["tensors"]:
            name, dtype_name = th["name"], th["dtype"]
            count, row_elems = int(th["count"]), int(th["row_elems"])
            where = f"{what}, tensor {name!r}"
            spans = {}
            for key in ("index", "new", "old", "versions"):
                if key in th["sections"]:
                    codec_name, stored, size = th["sections"][key]
                    if pos + stored > end or stored < 0 or size < 0:
                        raise IntegrityError(f"{where}: section {key} runs past the record")
                    spans[key] = (codec_name, view[pos : pos + stored], int(size))
                    pos += stored
            if only is not None and name not in only:
                continue
            dtype = storage_dtype(dtype_name)
            _, payload, size = spans["index"]
            rows = codec.decode_indices(payload, size, count, where)
            if rows_only:
                versions = None
                if "versions" in spans:  # 8 bytes a row: cheap, and a sync source needs them
                    _, payload, size = spans["versions"]
                    versions = codec.decode_values(payload, size, np.dtype("<u8"), (count,), where)
                tensors.append(TensorDelta(name, dtype_name, rows, np.empty((0, row_elems), dtype),
                                           None, versions, float(th["significance"])))
                continue
            _, payload, size = spans["new"]
            new = codec.decode_values(payload, size, dtype, (count, row_elems), where)
            old = None
            if with_old and "old" in spans:
                _, payload, size = spans["old"]
                old = codec.decode_xor_values(payload, size, new, where)
            versions = None
            if "versions" in spans:
                _, payload, size = spans["versions"]
                versions = codec.decode_values(payload, size, np.dtype("<u8"), (count,), where)
            encoded = None
            if keep_encoded:  # the sections encode() would write the same way
                ours = {"index": codec.INDEX, "new": codec.VALUES, "versions": codec.VALUES}
                encoded = {key: (spans[key][1], spans[key][2])  # views into ``blob``: no copy
                           for key, name_of_codec in ours.items() if key in spans and spans[key][0] == name_of_codec}
            tensors.append(
                TensorDelta(name, dtype_name, rows, new, old, versions, float(th["significance"]), encoded)
            )
        if pos != end:
            raise IntegrityError(f"{what}: {end - pos} unexplained bytes after the sections")
        return Record(
            offset=int(header["offset"]),
            base=int(header["base"]),
            kind=str(header["kind"]),
            time=float(header["time"]),
            model_id=str(header["model_id"]),
            tensors=tensors,
            reason=header.get("reason"),
            target=header.get("target"),
        )
    except (KeyError, TypeError, ValueError):
        raise IntegrityError(f"{what}: malformed record header") from None
