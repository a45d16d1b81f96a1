"""The record: one atomic update batch, and its byte encoding.

A record is what the log stores under its offset and what replicas ship to
each other, so its encoding is portable (fixed byte order, no LMDB pages)
and self-checking. Two encodings (formats/FORMAT.md section 4 is normative),
both starting with the same fixed part (big-endian):

    magic "DLRC" | u16 version | u16 flags | u32 header length H
    v1: header (msgpack, H bytes) | sections | u64 xxh3_64 of everything before it
    v2: header (msgpack, H bytes; every section entry carries the xxh3_64 of its
        payload) | u64 xxh3_64 of bytes [0, 12+H) | sections, nothing after them

A replica stores v2 (format 3 on): the header checksum covers every section
checksum, so a reader checks the header and then only the sections it
decodes (reading a record's row indices costs no hash of its values), while
a full check still covers every byte. v1 is what records written before
format 3 hold and what goes to peers (sync's wire protocol is unchanged);
a v1 record has one checksum, so any read of it hashes all of it.

Values are absolute (re-applying a record is idempotent) and each tensor
section may carry the values the rows had before (``old``), which makes the
record undoable.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from typing import NamedTuple

import msgpack
import numpy as np
import xxhash

from . import codec
from .dtypes import storage_dtype
from .errors import IntegrityError, UnsupportedVersion

MAGIC = b"DLRC"
VERSION = 2  # the newest record encoding this code reads, and what encode() writes unless told otherwise
KINDS = ("commit", "sync", "rollback")
MAX_REASON = 4096  # characters of a record's reason (a rollback's --reason, a commit's --message)
SECTION_KEYS = ("index", "new", "old", "versions")  # the order of one tensor's sections

_FIXED = struct.Struct(">4sHHI")
_U64 = struct.Struct(">Q")  # the v1 trailer and the v2 header checksum
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
    # Sections already encoded for exactly these rows and values
    # ({"index"|"new"|"old"|"versions": (payload, decoded size)}): encode() copies
    # them instead of compressing again (a sync destination stores what it received).
    # The codecs are the same in both record encodings, so a section moves between them.
    # A delta whose "new" section is given need not hold its values: ``new`` may be an
    # empty (0, row_elems) array and ``old`` None (a sync destination streams tensor by
    # tensor; "old" is then its xor-shuffle-zstd section against the new values).
    encoded: dict[str, tuple[bytes | memoryview, int]] | None = None
    # A chunk for a peer that decodes it: the destination's values of these rows at the
    # record's base, so that ``new`` is sent relative to them (codec.BASE_XOR_VALUES;
    # never stored). ``new_codec`` says how the "new" section is encoded, and stays when
    # the values are let go (:func:`compressed`).
    base: np.ndarray | None = None
    new_codec: str = codec.VALUES

    def __post_init__(self):
        if self.base is not None:
            self.new_codec = codec.BASE_XOR_VALUES


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
    pre_digest: int | None = None  # the state digest at ``base`` (deltalog.lineage); None before format 4
    post_digest: int | None = None  # the state digest at ``offset``
    history: list | None = None  # sync: the source's records it stands for (see HISTORY_FIELDS)
    user: str | None = None  # who wrote it, and on which host (format 4)
    host: str | None = None

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
    pre_digest: int | None = None
    post_digest: int | None = None
    history: list | None = None
    user: str | None = None
    host: str | None = None


# -- encoding ------------------------------------------------------------------


def _given(section: tuple[bytes, int]):
    return lambda: section


def _tensor_jobs(t: TensorDelta, spoil_old: bool = False, low_memory: bool = False) -> tuple[dict[str, Callable], int]:
    """The jobs that compress ``t``'s sections, by key in record order (a section given encoded is
    handed back as it is), and the value bytes they read. ``spoil_old``, ``low_memory``: see
    :func:`compressed`."""
    done = t.encoded or {}
    encode_new = (partial(codec.encode_values, t.new, by_plane=low_memory) if t.base is None
                  else partial(codec.encode_xor_values, t.base, t.new))  # XOR is symmetric: base relative to new
    jobs: dict[str, Callable] = {"index": partial(codec.encode_indices, t.rows), "new": encode_new}
    if t.old is not None or "old" in done:
        jobs["old"] = partial(codec.encode_xor_values, t.old, t.new, in_place=spoil_old, by_plane=low_memory)
    if t.versions is not None:
        jobs["versions"] = partial(codec.encode_values, np.asarray(t.versions, dtype="<u8"))
    value_bytes = sum(a.nbytes for key, a in (("new", t.new), ("old", t.old)) if a is not None and key not in done)
    return {key: _given(done[key]) if key in done else job for key, job in jobs.items()}, value_bytes


def _section_jobs(tensors: list[TensorDelta]) -> tuple[list, int]:
    """The jobs that compress the sections of ``tensors``, in record order, and the value bytes they read."""
    jobs, value_bytes = [], 0
    for t in tensors:
        mine, nbytes = _tensor_jobs(t)
        jobs.extend(mine.values())
        value_bytes += nbytes
    return jobs, value_bytes


# From this many bytes of values a tensor's sections are handed to the section pool one by one as
# soon as its delta is known; smaller ones are compressed together at the end (one hand-off).
EARLY_SECTION_BYTES = 256 << 10


class Sections:
    """The sections of some tensors' deltas, compressing on other threads while a writer works out
    the rest of the record (old values, significance, state digests, the bucket index).

    A writer adds each tensor's delta as soon as it has it (:meth:`add`), and
    may start its index and new values even before it knows the old ones
    (:meth:`early`). Only the rows and values are read; the significance and
    the header are filled in later, by :func:`encode`.
    """

    def __init__(self):
        self.tensors: list[TensorDelta] = []
        self._slots: list = []  # per section in record order: a Future, or an index into the small ones
        self._small: list[Callable] = []
        self._small_bytes = 0
        self._small_future = None

    @staticmethod
    def early(rows: np.ndarray, new: np.ndarray) -> dict | None:
        """Start the index and new-values sections of a delta before its old values are gathered;
        pass the result to :meth:`add` if the delta keeps exactly these rows and values."""
        if new.nbytes < EARLY_SECTION_BYTES:
            return None
        return {"index": codec.submit(partial(codec.encode_indices, rows)),
                "new": codec.submit(partial(codec.encode_values, new))}

    def add(self, t: TensorDelta, early: dict | None = None) -> None:
        jobs, value_bytes = _tensor_jobs(t)
        large = value_bytes >= EARLY_SECTION_BYTES
        for key, job in jobs.items():
            if early is not None and key in early:
                self._slots.append(early[key])
            elif large:
                self._slots.append(codec.submit(job))
            else:
                self._slots.append(len(self._small))
                self._small.append(job)
        if not large:
            self._small_bytes += value_bytes
        self.tensors.append(t)

    def start(self) -> "Sections":
        """Start the small sections, together on another thread, once every delta is added; returns self."""
        if self._small and self._small_future is None:
            self._small_future = codec.in_background(partial(codec.run_jobs, self._small, self._small_bytes))
        return self

    def results(self) -> list:
        """[(payload, decoded size)] in record order (waits for them; the small ones are compressed
        here if :meth:`start` was not called)."""
        if self._small_future is not None:
            small = self._small_future.result()
        else:
            small = codec.run_jobs(self._small, self._small_bytes)
        return [small[slot] if isinstance(slot, int) else slot.result() for slot in self._slots]


def encode(record: Record, version: int = VERSION, started: Sections | None = None) -> bytes:
    """The record's bytes in encoding ``version``: 2 (what replicas store) or 1 (what goes to peers).

    ``started``: its tensors' sections, started (:class:`Sections`) for
    exactly ``record.tensors`` (the same objects, in order).
    """
    return b"".join(encode_parts(record, version, started))


def encode_parts(record: Record, version: int = VERSION, started: Sections | None = None) -> list:
    """:func:`encode`'s bytes as the pieces they are joined from, for a caller that joins them
    into something larger without a second copy (a pending sync chunk, stored as a meta value)."""
    if record.kind not in KINDS:
        raise ValueError(f"unknown record kind {record.kind!r}")
    if version not in (1, 2):
        raise ValueError(f"record encoding v{version} is not defined")
    if started is not None:
        if len(started.tensors) != len(record.tensors) or any(
            a is not b for a, b in zip(started.tensors, record.tensors)
        ):
            raise ValueError("the sections were started for other tensors than the record's")
        encoded = iter(started.results())
    else:
        # Every section is encoded on its own (zstd and numpy release the GIL), so a
        # large record compresses its sections on all cores; results keep their order.
        jobs, value_bytes = _section_jobs(record.tensors)
        encoded = iter(codec.run_jobs(jobs, value_bytes))
    sections: list[bytes | memoryview] = []
    tensor_headers = []
    for t in record.tensors:
        layout = {}
        for key, codec_name, present in (
            ("index", codec.INDEX, True),
            ("new", t.new_codec, True),
            ("old", codec.XOR_VALUES, t.old is not None or "old" in (t.encoded or {})),
            ("versions", codec.VALUES, t.versions is not None),
        ):
            if not present:
                continue
            payload, size = next(encoded)
            entry = [codec_name, len(payload), size]
            if version >= 2:  # each section hashed once; the header checksum then covers these
                entry.append(xxhash.xxh3_64_intdigest(payload))
            layout[key] = entry
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
    fields = {
        "offset": int(record.offset),
        "base": int(record.base),
        "kind": record.kind,
        "time": float(record.time),
        "model_id": record.model_id,
        "reason": record.reason,
        "target": None if record.target is None else int(record.target),
        "tensors": tensor_headers,
    }
    # Format 4 additions: keys a reader that does not know them ignores.
    for key in ("pre_digest", "post_digest"):
        if getattr(record, key) is not None:
            fields[key] = int(getattr(record, key))
    if record.history is not None:
        fields["history"] = record.history
    for key in ("user", "host"):
        if getattr(record, key) is not None:
            fields[key] = getattr(record, key)
    header = pack(fields)
    fixed = _FIXED.pack(MAGIC, version, 0, len(header))
    if version == 1:
        parts = [fixed, header, *sections]
        digest = xxhash.xxh3_64()
        for part in parts:  # hashed piece by piece: the record is assembled once, not twice
            digest.update(part)
        parts.append(_U64.pack(digest.intdigest()))
    else:
        digest = xxhash.xxh3_64(fixed)
        digest.update(header)
        parts = [fixed, header, _U64.pack(digest.intdigest()), *sections]
    return parts


def compressed(t: TensorDelta, spoil_old: bool = False, low_memory: bool = False) -> TensorDelta:
    """``t`` with every section compressed now, as :func:`encode` would, and its values let go.

    For a writer that builds a large record tensor by tensor (a sync source
    or destination): it then holds one tensor's values at a time, and
    encode() only assembles. ``spoil_old``: ``t.old`` is a copy nobody reads
    again, so the undo section is computed in it (one array less).
    ``low_memory``: a large section is compressed a byte plane at a time
    (codec.PLANE_BY_PLANE_BYTES), slower but without a copy of its values.
    """
    jobs, nbytes = _tensor_jobs(t, spoil_old, low_memory)
    done = {**(t.encoded or {}), **dict(zip(jobs, codec.run_jobs(list(jobs.values()), nbytes)))}
    row_elems = int(t.new.shape[1]) if t.new.ndim == 2 else 0
    return replace(t, new=np.empty((0, row_elems), t.new.dtype), old=None, base=None, encoded=done)


# -- reading -------------------------------------------------------------------


class _Section(NamedTuple):  # a tuple: made for every section of every record read, so cheap to make
    codec: str
    payload: memoryview
    size: int  # decoded bytes
    digest: int | None  # v2: the xxh3_64 of ``payload`` the header declares; v1: None (the trailer covers it)


def _parse(blob, what: str, header_checksum: bool, trailer: bool) -> tuple[memoryview, int, dict, int, int]:
    """(view, version, header, start of the sections, end of the sections).

    ``header_checksum``: check a v2 header's checksum. ``trailer``: check a v1
    record's trailer, its only checksum, which covers every byte.
    """
    view = memoryview(blob)
    if len(view) < _FIXED.size + _U64.size:
        raise IntegrityError(f"{what}: truncated record ({len(view)} bytes)")
    magic, version, _flags, hlen = _FIXED.unpack_from(view)
    if magic != MAGIC:
        raise IntegrityError(f"{what}: not a deltalog record (bad magic)")
    if version > VERSION:
        raise UnsupportedVersion(f"{what}: record format v{version}, this deltalog reads up to v{VERSION}")
    header_end = _FIXED.size + hlen
    if hlen > MAX_HEADER or header_end + _U64.size > len(view):
        raise IntegrityError(f"{what}: truncated record header")
    if version == 2:
        start, end = header_end + _U64.size, len(view)
        if header_checksum:
            (want,) = _U64.unpack_from(view, header_end)
            if xxhash.xxh3_64_intdigest(view[:header_end]) != want:
                raise IntegrityError(f"{what}: header checksum mismatch")
    elif version == 1:
        start, end = header_end, len(view) - _U64.size
        if trailer:
            (want,) = _U64.unpack_from(view, end)
            if xxhash.xxh3_64_intdigest(view[:end]) != want:
                raise IntegrityError(f"{what}: checksum mismatch")
    else:  # 0 was never written; only damage under a v1 trailer left unchecked gets here
        raise IntegrityError(f"{what}: record format v{version} does not exist")
    header = unpack(view[_FIXED.size : header_end], what)
    if not isinstance(header, dict) or not isinstance(header.get("tensors"), list):
        raise IntegrityError(f"{what}: malformed record header")
    return view, version, header, start, end


class RecordView:
    """An encoded record whose header is parsed and checked: decode any part of it.

    Opening it checks what every read needs: a v1 record's trailer (the whole
    record: its only checksum), a v2 record's header checksum, and that the
    sections the header lists exactly fill the record. Each v2 section is then
    checked once, by the first decode that reads it. ``checked`` says the caller
    has already checked every byte (:func:`check`). ``blob`` must stay alive
    and unchanged while the view is used.
    """

    def __init__(self, blob, what: str = "record", checked: bool = False):
        self.what = what
        view, self.version, self._header, pos, end = _parse(blob, what, header_checksum=not checked, trailer=not checked)
        self._verified: set[tuple[int, str]] | None = None if checked or self.version == 1 else set()
        self._tensors: list[tuple[dict, dict[str, _Section]]] = []
        try:
            for th in self._header["tensors"]:
                spans = {}
                for key in SECTION_KEYS:
                    if key not in th["sections"]:
                        continue
                    if self.version == 1:
                        (codec_name, stored, size), digest = th["sections"][key], None
                    else:
                        codec_name, stored, size, digest = th["sections"][key]
                    if stored < 0 or size < 0 or pos + stored > end:
                        raise IntegrityError(f"{what}, tensor {th['name']!r}: section {key} runs past the record")
                    spans[key] = _Section(codec_name, view[pos : pos + stored], int(size), digest)
                    pos += stored
                self._tensors.append((th, spans))
        except (KeyError, TypeError, ValueError):
            raise IntegrityError(f"{what}: malformed record header") from None
        if pos != end:
            raise IntegrityError(f"{what}: {end - pos} unexplained bytes after the sections")

    def tensor_rows(self) -> dict[str, int]:
        """{name: how many rows the record holds of it}, from the header (nothing decoded)."""
        try:
            return {str(th["name"]): int(th["count"]) for th, _spans in self._tensors}
        except (KeyError, TypeError, ValueError):
            raise IntegrityError(f"{self.what}: malformed record header") from None

    def tensor_names(self) -> list[str]:
        """The names of the record's tensors, in header order (nothing decoded)."""
        try:
            return [str(th["name"]) for th, _spans in self._tensors]
        except (KeyError, TypeError):
            raise IntegrityError(f"{self.what}: malformed record header") from None

    def _payload(self, n: int, name: str, key: str, section: _Section) -> memoryview:
        """A section's payload, its checksum checked first (v2, once per section)."""
        if self._verified is not None and (n, key) not in self._verified:
            if xxhash.xxh3_64_intdigest(section.payload) != section.digest:
                raise IntegrityError(f"{self.what}: checksum mismatch (tensor {name!r}, section {key})")
            self._verified.add((n, key))
        return section.payload

    def check(self) -> None:
        """Check every section not checked yet: with the opening checks, every byte of the record."""
        for n, (th, spans) in enumerate(self._tensors):
            for key, section in spans.items():
                self._payload(n, th["name"], key, section)

    def decode(
        self, only: set[str] | None = None, with_old: bool = True, rows_only: bool = False, keep_encoded: bool = False,
    ) -> Record:
        """Decode the record (see :func:`decode`); only the sections decoded are checked."""
        what, header = self.what, self._header
        tensors = []
        try:
            for n, (th, spans) in enumerate(self._tensors):
                name, dtype_name = th["name"], th["dtype"]
                if only is not None and name not in only:
                    continue
                count, row_elems = int(th["count"]), int(th["row_elems"])
                where = f"{what}, tensor {name!r}"
                dtype = storage_dtype(dtype_name)
                section = spans["index"]
                rows = codec.decode_indices(self._payload(n, name, "index", section), section.size, count, where)
                versions = None
                if "versions" in spans:  # 8 bytes a row: cheap, and a sync source needs them even rows_only
                    section = spans["versions"]
                    versions = codec.decode_values(self._payload(n, name, "versions", section), section.size,
                                                   np.dtype("<u8"), (count,), where)
                encoded = None
                if keep_encoded:  # the sections encode() would write the same way
                    if rows_only:  # checked here, as decoding them would (the values are decoded later, if at all)
                        self._payload(n, name, "new", spans["new"])
                    ours = {"index": codec.INDEX, "new": codec.VALUES, "versions": codec.VALUES}
                    encoded = {key: (spans[key].payload, spans[key].size)  # views into the blob: no copy
                               for key, name_of_codec in ours.items() if key in spans and spans[key].codec == name_of_codec}
                    if spans["new"].codec == codec.BASE_XOR_VALUES:  # new XOR base: the reader's undo section
                        encoded["old"] = (spans["new"].payload, spans["new"].size)
                if rows_only:
                    tensors.append(TensorDelta(name, dtype_name, rows, np.empty((0, row_elems), dtype),
                                               None, versions, float(th["significance"]), encoded))
                    continue
                new = self._new_values(n, th, spans)
                old = None
                if with_old and "old" in spans:
                    section = spans["old"]
                    old = codec.decode_xor_values(self._payload(n, name, "old", section), section.size, new, where)
                tensors.append(
                    TensorDelta(name, dtype_name, rows, new, old, versions, float(th["significance"]), encoded)
                )
            return Record(tensors=tensors, **_identity(header))
        except (KeyError, TypeError, ValueError):
            raise IntegrityError(f"{what}: malformed record header") from None

    def new_values(self, n: int, base: np.ndarray | None = None) -> np.ndarray:
        """The new values of tensor number ``n`` (in header order) alone: a reader that holds
        one tensor's values at a time (a sync destination) decodes them when it needs them.
        ``base``: its own values of those rows, for a chunk sent relative to them
        (:meth:`needs_base`)."""
        try:
            th, spans = self._tensors[n]
            return self._new_values(n, th, spans, base)
        except (KeyError, TypeError, ValueError):
            raise IntegrityError(f"{self.what}: malformed record header") from None

    def needs_base(self, n: int) -> bool:
        """Whether tensor number ``n``'s new values are relative to the reader's (a chunk's)."""
        try:
            return self._tensors[n][1]["new"].codec == codec.BASE_XOR_VALUES
        except (KeyError, TypeError, IndexError):
            raise IntegrityError(f"{self.what}: malformed record header") from None

    def _new_values(self, n: int, th: dict, spans: dict[str, _Section], base: np.ndarray | None = None) -> np.ndarray:
        section = spans["new"]
        where = f"{self.what}, tensor {th['name']!r}"
        shape = (int(th["count"]), int(th["row_elems"]))
        if section.codec == codec.VALUES:
            return codec.decode_values(self._payload(n, th["name"], "new", section), section.size,
                                       storage_dtype(th["dtype"]), shape, where)
        if section.codec == codec.BASE_XOR_VALUES and base is not None:
            if base.shape != shape or base.dtype != storage_dtype(th["dtype"]):
                raise ValueError(f"{where}: the base values given do not fit the section")
            return codec.decode_xor_values(self._payload(n, th["name"], "new", section), section.size, base, where)
        if section.codec == codec.BASE_XOR_VALUES:  # only a destination holding the base decodes it
            raise IntegrityError(f"{where}: its new values are relative to a destination's, which this reader lacks")
        raise IntegrityError(f"{where}: unknown codec {section.codec!r} for new values")


def _identity(header: dict) -> dict:
    """The fields every reading of a header gives (KeyError, TypeError or ValueError when malformed)."""
    return {
        "offset": int(header["offset"]),
        "base": int(header["base"]),
        "kind": str(header["kind"]),
        "time": float(header["time"]),
        "model_id": str(header["model_id"]),
        "reason": header.get("reason"),
        "target": header.get("target"),
        "pre_digest": _digest_field(header.get("pre_digest")),
        "post_digest": _digest_field(header.get("post_digest")),
        "history": _history_field(header.get("history")),
        "user": _text_field(header.get("user")),
        "host": _text_field(header.get("host")),
    }


def _text_field(value) -> str | None:
    if value is not None and not isinstance(value, str):
        raise ValueError("not text")
    return value


def _digest_field(value) -> int | None:
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 1 << 64:
        raise ValueError("a state digest is not a u64")
    return value


# A sync record's ``history``: one list per source record it stands for, oldest
# first, ``[offset, kind, time, rows, significance, target, reason, user, host]``.
HISTORY_FIELDS = ("offset", "kind", "time", "rows", "significance", "target", "reason", "user", "host")


def _history_field(value) -> list | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(e, list) and len(e) == len(HISTORY_FIELDS) for e in value):
        raise ValueError("malformed record history")
    return value


def history_entries(history: list | None) -> list[dict]:
    """A record's ``history`` as maps with the HISTORY_FIELDS keys."""
    return [dict(zip(HISTORY_FIELDS, e)) for e in history or ()]


def check(blob, what: str = "record") -> None:
    """Raise IntegrityError unless every byte of the record checks: a v1 record's
    trailer; a v2 record's header checksum, every section's checksum, and sections
    that exactly fill the record."""
    RecordView(blob, what).check()


def check_for_partial_decodes(blob, what: str = "record") -> bool:
    """For a reader that decodes parts of one record in several calls (fetching it
    each time): check once what those decodes would each check again. Returns the
    ``checked`` to pass them: True for a v1 record (its trailer, just checked,
    covers every byte), False for v2 (its header is checked here, and each decode
    checks the header again, cheaply, and the sections it reads)."""
    return RecordView(blob, what).version == 1


def summarize(blob, what: str = "record") -> RecordSummary:
    """Parse the header only, for listings: no decompression. A v2 header is
    checked (its checksum is cheap); a v1 record is not (that hashes all of it)."""
    _view, _version, header, _start, _end = _parse(blob, what, header_checksum=True, trailer=False)
    try:
        tensors = [
            {"name": t["name"], "rows": int(t["count"]), "significance": float(t["significance"]),
             "bytes": sum(int(entry[1]) for entry in t["sections"].values())}  # stored: what it costs to ship
            for t in header["tensors"]
        ]
        return RecordSummary(
            **_identity(header),
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
    ``checked`` skips every checksum when the caller has just run :func:`check`;
    ``rows_only`` decodes row indices (and per-row versions, when present) alone:
    ``new`` is then an empty (0, row_elems) array. ``keep_encoded`` keeps the index,
    new and versions sections on each TensorDelta (views into ``blob``: keep it
    alive and unchanged while they are used), for :func:`encode` to reuse.

    What is checked: a v1 record's trailer, so all of it; a v2 record's header and
    the sections decoded here (with ``rows_only`` its index and versions sections;
    with ``only`` those tensors' sections), never the bytes it does not read."""
    return RecordView(blob, what, checked).decode(only, with_old, rows_only, keep_encoded)
