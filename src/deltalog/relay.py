"""The object-store relay: a model's log published to a bucket, pulled by any number of replicas.

One publisher (the primary's host) writes; pullers only read, so a fleet
of hundreds fans out through the object store instead of through a tree
of followers. The layout (formats/RELAY.md) under the URL prefix:

``head``
    A small JSON object: the relay's head offset and state digest, the
    model's identity and layout, and the list of segments and snapshots
    that make it up. It is the only object ever rewritten, and only by a
    conditional put (If-Match the ETag it was read with; If-None-Match: *
    for the first), so of two publishers only one can advance it.
``snapshots/<offset>/manifest.json`` and its tensor files
    Immutable copies of a primary's snapshot: where a new puller starts.
``segments/<start>-<end>-<pre digest>-<post digest>.seg``
    Immutable; the sync chunks that bring a replica at ``start`` to
    ``end`` (deltalog.sync.source_chunks), framed and checksummed.

Everything is written before the head names it, so a publisher killed at
any point leaves the relay exactly at its previous head (at worst an
unnamed object stays behind). Pullers read the head, then the snapshot and
segments it names; :class:`RelayReader` turns them into a sync Source
(deltalog.transport.relay), so the sync engine's lineage checks, budgets,
partial syncs and --follow apply unchanged.
"""

from __future__ import annotations

import json
import os
import struct
import time
from dataclasses import asdict, dataclass

import msgpack
import numpy as np
import xxhash

from . import lineage
from . import record as rec
from .errors import (
    IntegrityError,
    InvalidInput,
    ModelMismatch,
    OffsetNotRetained,
    UnsupportedVersion,
)
from .objstore import Missing, ObjectStore

RELAY_VERSION = 1  # of the head object and the segment encoding (formats/RELAY.md)
HEAD_KEY = "head"
SEGMENT_MAGIC = b"DLRELSEG"
LEVEL_SECONDS = (60, 3600)  # a level-2 segment a minute, a level-3 one an hour (level 1: one per publish)
SEGMENT_CHUNK_BYTES = 16 << 20  # uncompressed row bytes per chunk of a segment: a puller's budget stops between
_FRAME = struct.Struct("<Q")
_SEG_HEAD = struct.Struct("<8sHHI")  # magic, version, reserved, header length


# =============================================================================
# encoding (formats/RELAY.md)
# =============================================================================


def segment_key(start: int, end: int, pre: int, post: int, level: int = 1) -> str:
    return f"segments/L{level}/{start:020d}-{end:020d}-{lineage.to_hex(pre)}-{lineage.to_hex(post)}.seg"


def snapshot_prefix(offset: int) -> str:
    return f"snapshots/{offset:020d}/"


def encode_segment(header: dict, blobs: list[bytes]) -> bytes:
    meta = msgpack.packb(header, use_bin_type=True)
    parts = [_SEG_HEAD.pack(SEGMENT_MAGIC, RELAY_VERSION, 0, len(meta)), meta]
    for blob in blobs:
        parts += [_FRAME.pack(len(blob)), bytes(blob)]
    body = b"".join(parts)
    return body + _FRAME.pack(xxhash.xxh3_64_intdigest(body))


def decode_segment(data: bytes, what: str) -> tuple[dict, list[memoryview]]:
    """(header, chunk blobs) of a segment object; IntegrityError if it is not whole."""
    view = memoryview(data)
    if len(view) < _SEG_HEAD.size + 8:
        raise IntegrityError(f"{what}: truncated segment")
    magic, version, _reserved, hlen = _SEG_HEAD.unpack_from(view, 0)
    if magic != SEGMENT_MAGIC:
        raise IntegrityError(f"{what}: not a deltalog relay segment")
    if version > RELAY_VERSION:
        raise UnsupportedVersion(f"{what}: relay segment version {version}, this deltalog reads {RELAY_VERSION}")
    (stored,) = _FRAME.unpack_from(view, len(view) - 8)
    if xxhash.xxh3_64_intdigest(view[:-8]) != stored:
        raise IntegrityError(f"{what}: segment checksum mismatch")
    pos = _SEG_HEAD.size
    try:
        header = msgpack.unpackb(view[pos:pos + hlen], raw=False)
    except Exception:
        raise IntegrityError(f"{what}: undecodable segment header") from None
    pos += hlen
    blobs = []
    end = len(view) - 8
    while pos < end:
        (n,) = _FRAME.unpack_from(view, pos)
        pos += 8
        if pos + n > end:
            raise IntegrityError(f"{what}: segment frame runs past its end")
        blobs.append(view[pos:pos + n])
        pos += n
    if len(blobs) != header.get("chunks"):
        raise IntegrityError(f"{what}: segment holds {len(blobs)} chunks, its header says {header.get('chunks')}")
    return header, blobs


def parse_head(data: bytes, url: str) -> dict:
    try:
        head = json.loads(data)
        version = int(head["relay"])
    except (ValueError, KeyError, TypeError):
        raise IntegrityError(f"{url}/{HEAD_KEY}: not a deltalog relay head") from None
    if version > RELAY_VERSION:
        raise UnsupportedVersion(f"{url}: relay format v{version}, this deltalog reads v{RELAY_VERSION}")
    for k in ("model_id", "head", "state_digest", "tensors", "bucket_rows", "segments", "snapshots"):
        if k not in head:
            raise IntegrityError(f"{url}/{HEAD_KEY}: field {k!r} missing")
    return head


def _encode_head(head: dict) -> bytes:
    return json.dumps(head, sort_keys=True, separators=(",", ":")).encode()


# =============================================================================
# publisher
# =============================================================================


@dataclass
class PublishResult:
    """What one publish did (the JSON of ``deltalog sync PRIMARY s3://...``)."""

    source: str
    relay: str
    from_offset: int | None  # the relay's head before (None: a new relay)
    to_offset: int
    segments: int = 0
    bytes_uploaded: int = 0
    rows: int = 0
    snapshot_offset: int | None = None
    complete: bool = True
    seconds: float = 0.0
    note: str | None = None

    def to_json(self) -> dict:
        return asdict(self)


def read_head(store: ObjectStore) -> tuple[dict | None, str | None]:
    """(head, ETag) of the relay, or (None, None) for an empty prefix."""
    try:
        got = store.get(HEAD_KEY)
    except Missing as exc:
        if "bucket" in str(exc):
            raise
        return None, None
    return parse_head(got.data, store.url), got.etag


def publish(replica, store: ObjectStore, source_name: str) -> PublishResult:
    """Advance the relay at ``store`` to ``replica``'s head (one segment; a snapshot first if new).

    Refuses (Diverged) a relay whose head is not a state this replica held,
    ModelMismatch one of another model, and PreconditionFailed (exit 9)
    when another publisher advanced the head meanwhile: nothing is lost,
    this run's segment is simply not named.
    """
    from .receive import diverged
    from .sync import source_chunks, source_hello, source_snapshot_manifest

    started = time.monotonic()
    hello = source_hello(replica)
    target = int(hello["head"])
    head, etag = read_head(store)
    result = PublishResult(source_name, store.url, None if head is None else int(head["head"]), target)
    if head is None:
        snaps = [s for s in hello["snapshots"] if hello["oldest_offset"] <= s <= target]
        if not snaps:
            raise OffsetNotRetained(f"{replica.path}: no snapshot to start the relay from",
                                    hint="run 'deltalog compact' to make one")
        snap = max(snaps)
        result.bytes_uploaded += _upload_snapshot(replica, store, snap, source_snapshot_manifest(replica, snap))
        result.snapshot_offset = snap
        head = {"relay": RELAY_VERSION, "model_id": hello["model_id"], "bucket_rows": hello["bucket_rows"],
                "format_version": hello["format_version"], "tensors": hello["tensors"],
                "snapshots": [{"offset": snap, "state_digest": lineage.to_hex(replica.state_digest_at(snap))}],
                "segments": [], "head": snap, "state_digest": lineage.to_hex(replica.state_digest_at(snap))}
    else:
        _check_relay_model(head, hello, store.url, replica.path)
    since = int(head["head"])
    theirs = lineage.from_hex(head["state_digest"])
    if since > target:  # the relay holds offsets this replica never wrote: nothing to compare, nothing to add
        result.note = f"the relay (head {since}) is ahead of {replica.path} (head {target}); nothing published"
        result.to_offset = since
        result.seconds = round(time.monotonic() - started, 6)
        return result
    rebased = False
    if since < replica.oldest_offset:
        since, theirs = _rebase(replica, store, head, since, theirs, result)
        rebased = True
    mine = replica.state_digest_at(since)
    if mine != theirs:
        raise diverged(store.url, since, theirs, mine, replica.path)
    now = time.time()
    head.setdefault("levels", list(LEVEL_SECONDS))
    head.setdefault("created", now)
    if since < target:
        entry, data, rows = _put_segment(replica, store, head, since, target, 1, now)
        head["segments"].append(entry)
        head.setdefault("boundaries", []).append([target, entry["post_digest"]])
        head["head"], head["state_digest"] = target, entry["post_digest"]
        result.segments, result.bytes_uploaded = 1, result.bytes_uploaded + len(data)
        result.rows = rows
        for level, interval in enumerate(head["levels"], start=2):
            made = _compact_level(replica, store, head, level, interval, target, now)
            if made is not None:
                result.segments += 1
                result.bytes_uploaded += made
        _retire(store, head, now)
        # Published heads a future higher-level segment may still cover (its header lists them).
        oldest_base = min([int(v[0]) for v in head.get("level_ends", {}).values()] or [0])
        if len(head.get("level_ends", {})) < len(head["levels"]):
            oldest_base = min(int(x["offset"]) for x in head["snapshots"])
        head["boundaries"] = [b for b in head["boundaries"] if int(b[0]) > oldest_base]
    head["time"] = time.time()
    head["publisher"] = f"{os.uname().nodename}:{os.getpid()}"
    if since < target or etag is None or rebased:
        head["head_time"] = hello.get("head_time")
        store.put_if(HEAD_KEY, _encode_head(head), etag)
    result.to_offset = int(head["head"])
    result.seconds = round(time.monotonic() - started, 6)
    return result


def _rebase(replica, store: ObjectStore, head: dict, since: int, theirs: int | None, result: PublishResult):
    """The primary compacted the relay's head away: make the primary's oldest snapshot the relay's base.

    Only when the primary proves that head was a state of its own history
    (the state digest its compaction kept for that offset): else Diverged,
    or OffsetNotRetained when it kept none. Pullers behind the new base are
    then proven by the digests the old head named, which stay in the head as
    ``past_digests`` (:func:`_retire_before_base`), and take the snapshot
    (sync). Returns the new (head offset, state digest).
    """
    from .receive import diverged
    from .sync import source_snapshot_manifest

    known = replica.past_state_digest(since)
    if known is None:
        raise OffsetNotRetained(f"{replica.path} no longer holds offset {since}, the relay's head, nor its state "
                                f"digest, so it cannot prove the relay holds its history",
                                hint="publish to a new prefix (it starts from a snapshot); its pullers then --reseed")
    if known != theirs:
        raise diverged(store.url, since, theirs, known, replica.path)
    snap = replica.oldest_offset
    result.bytes_uploaded += _upload_snapshot(replica, store, snap, source_snapshot_manifest(replica, snap))
    result.snapshot_offset = snap
    digest = lineage.to_hex(replica.state_digest_at(snap))
    _retire_before_base(store, head, snap, time.time())
    head["snapshots"] = [{"offset": snap, "state_digest": digest}]  # the older one is no base any more
    head["head"], head["state_digest"] = snap, digest
    head["level_ends"] = {}  # higher levels start again from the new base
    return snap, lineage.from_hex(digest)


PAST_DIGESTS_KEPT = 1024  # in the head: [offset, digest] of states before a rebase's base (the newest kept)
SNAPSHOT_RETIRE_SECONDS = 3600  # a snapshot a rebase replaced is deleted this much later (a new puller's copy)


def _retire_before_base(store: ObjectStore, head: dict, base: int, now: float) -> None:
    """A rebase onto ``base``: the objects of the old snapshots and segments go, their digests stay.

    Nothing can bring a puller from an old segment's end to ``base`` any more
    (the primary no longer holds what lies between), so the segments serve
    only to prove that a puller behind the base holds this history: the
    state digests at their ends (and every other state the head names) are
    kept in ``past_digests`` and the objects retired. Without this, every
    rebase left a whole snapshot in the store for ever.
    """
    known = {int(head["head"]): head["state_digest"]}
    known.update((int(o), d) for o, d in head.get("past_digests") or [])
    known.update((int(s["offset"]), s["state_digest"]) for s in head["snapshots"] if s.get("state_digest"))
    known.update((int(o), d) for o, d in head.get("boundaries") or [])
    for e in head["segments"]:
        known[int(e["start"])], known[int(e["end"])] = e["pre_digest"], e["post_digest"]
    head["past_digests"] = [[o, known[o]] for o in sorted(o for o in known if o < base)][-PAST_DIGESTS_KEPT:]
    retired = head.setdefault("retired", [])
    retired.extend({"key": e["key"], "time": now} for e in head["segments"])
    head["segments"] = []
    for s in head["snapshots"]:
        if int(s["offset"]) != base:
            retired.extend({"key": key, "time": now, "after": SNAPSHOT_RETIRE_SECONDS}
                           for key in store.list(snapshot_prefix(int(s["offset"]))))


def _put_segment(replica, store: ObjectStore, head: dict, start: int, end: int, level: int, now: float):
    """Upload the segment bringing ``start`` to ``end``; (head entry, object bytes, rows)."""
    from .sync import source_chunks

    blobs = list(source_chunks(replica, start, {}, end, SEGMENT_CHUNK_BYTES))
    pre, post = replica.state_digest_at(start), replica.state_digest_at(end)
    # The state digest at every earlier segment end inside this one: a puller at any of
    # them can start here (rows written after it, kept by their versions) once the small
    # segments it stood on are gone.
    inside = sorted({(int(o), d) for o, d in head.get("boundaries", []) if start < int(o) < end})
    data = encode_segment({"model_id": head["model_id"], "start": start, "end": end, "level": level,
                           "pre_digest": lineage.to_hex(pre), "post_digest": lineage.to_hex(post),
                           "boundaries": [list(b) for b in inside], "chunks": len(blobs), "created": now}, blobs)
    key = segment_key(start, end, pre, post, level)
    store.put_new(key, data)  # an existing one came from a killed run: same range and digests, same rows
    entry = {"key": key, "level": level, "start": start, "end": end, "pre_digest": lineage.to_hex(pre),
             "post_digest": lineage.to_hex(post), "bytes": len(data), "time": now}
    return entry, data, sum(rec.summarize(b, "chunk").rows for b in blobs)


def _compact_level(replica, store, head: dict, level: int, interval: float, target: int, now: float) -> int | None:
    """A level-``level`` segment from the last one's end to ``target`` once ``interval`` s have passed; its bytes."""
    ends = head.setdefault("level_ends", {})
    if str(level) in ends:
        base, since_time = int(ends[str(level)][0]), float(ends[str(level)][1])
    else:
        base, since_time = min(int(s["offset"]) for s in head["snapshots"]), float(head["created"])
    if now - since_time < interval or base >= target or base < replica.oldest_offset:
        return None
    lower = [e for e in head["segments"] if e.get("level", 1) == level - 1 and e["start"] >= base]
    if len(lower) < 2:
        return None  # one lower segment already is this range
    entry, data, _rows = _put_segment(replica, store, head, base, target, level, now)
    head["segments"].append(entry)
    ends[str(level)] = [target, now]
    return len(data)


RETIRE_SECONDS = 300  # a segment left out of the head is deleted this much later (pullers mid-read finish)


def _retire(store: ObjectStore, head: dict, now: float) -> None:
    """Retention: drop from the head the segments a higher level covers, once that level's interval is over;
    delete the objects of those dropped RETIRE_SECONDS ago."""
    levels = head["levels"]
    keep, retired = [], head.setdefault("retired", [])
    for e in head["segments"]:
        cover = next((c for c in head["segments"] if c.get("level", 1) > e.get("level", 1) and c["start"] <= e["start"]
                      and e["end"] <= c["end"]), None)
        if cover is not None and now - float(e.get("time", 0)) >= levels[e.get("level", 1) - 1]:
            retired.append({"key": e["key"], "time": now})
        else:
            keep.append(e)
    head["segments"] = keep
    still = []
    for r in retired:
        if now - float(r["time"]) >= float(r.get("after", RETIRE_SECONDS)):
            store.delete(r["key"])
        else:
            still.append(r)
    head["retired"] = still


def _check_relay_model(head: dict, hello: dict, url: str, path: str) -> None:
    from .sync import same_layout

    if head["model_id"] != hello["model_id"]:
        raise ModelMismatch(f"{url} relays model {head['model_id']}, {path} holds {hello['model_id']}",
                            hint="publish each model to its own prefix")
    if not same_layout(head, hello):
        raise ModelMismatch(f"{url} relays another tensor layout or bucket size than {path}")


def _upload_snapshot(replica, store: ObjectStore, offset: int, manifest: dict) -> int:
    """Copy snapshot ``offset`` into the relay (files first, manifest last); bytes uploaded."""
    from .sync import snapshot_file_path

    prefix = snapshot_prefix(offset)
    try:
        theirs = json.loads(store.get(prefix + "manifest.json").data)
    except Missing:
        theirs = None
    except ValueError:
        raise IntegrityError(f"{store.url}: snapshot {offset} manifest is not JSON") from None
    if theirs is not None:  # a killed earlier run put it: the same snapshot, or refuse
        if [e.get("xxh3") for e in theirs["tensors"]] != [e["xxh3"] for e in manifest["tensors"]]:
            raise IntegrityError(f"{store.url}: snapshot {offset} there differs from {replica.path}'s",
                                 hint="publish to a new prefix")
        return 0
    total = 0
    for entry in manifest["tensors"]:
        path, size = snapshot_file_path(replica, offset, entry["file"])
        store.put_file(prefix + entry["file"], path)
        total += size
    store.put_new(prefix + "manifest.json", json.dumps(manifest, sort_keys=True).encode())  # last: names the files
    return total


# =============================================================================
# puller side: the relay as a sync Source
# =============================================================================


class RelayReader:
    """Reads a relay for the sync engine (deltalog.transport.relay wraps it as a Source)."""


    def __init__(self, store: ObjectStore):
        self.store = store
        self._head: dict | None = None
        self._etag: str | None = None

    def refresh(self) -> dict:
        got = self.store.get_if_changed(HEAD_KEY, self._etag) if self._head is not None else None
        if self._head is None or got is not None:
            if got is None:
                try:
                    got = self.store.get(HEAD_KEY)
                except Missing as exc:
                    if "bucket" in str(exc):
                        raise
                    raise Missing(f"{self.store.url}: no relay here (no head object)",
                                  hint="publish first: deltalog sync PRIMARY " + self.store.url) from None
            self._head, self._etag = parse_head(got.data, self.store.url), got.etag
        return self._head

    def hello(self) -> dict:
        from .transport.base import PROTOCOL_VERSION

        head = self.refresh()
        snaps = sorted(int(s["offset"]) for s in head["snapshots"])
        return {"protocol": PROTOCOL_VERSION, "model_id": head["model_id"], "head": int(head["head"]),
                "state_digest": head["state_digest"], "oldest_offset": snaps[0] if snaps else int(head["head"]),
                "bucket_rows": int(head["bucket_rows"]), "format_version": int(head.get("format_version", 4)),
                "tensors": head["tensors"], "snapshots": snaps, "time": float(head.get("time") or time.time()),
                "head_time": head.get("head_time")}

    def wait_for_head(self, since: int, timeout: float) -> int:
        """One conditional GET of the head now and one after ``timeout`` (--interval): a 304 costs no body."""
        head = int(self.refresh()["head"])
        if head == since and timeout > 0:
            time.sleep(timeout)
            head = int(self.refresh()["head"])
        return head

    def _path(self, since: int, target: int) -> list[dict]:
        """The fewest segments from ``since`` to ``target``: from each offset, the one reaching furthest.

        A segment may start before the offset it is used from (a level-2 or
        3 segment covering the small ones a puller stood on): its rows
        written at or before that offset are skipped by their versions.
        OffsetNotRetained if no segment covers an offset on the way.
        """
        segments = [s for s in self._head["segments"] if s["end"] <= target]
        path, at = [], since
        while at < target:
            cover = [s for s in segments if s["start"] <= at < s["end"]]
            if not cover:
                raise OffsetNotRetained(f"{self.store.url}: no segment of the relay covers offset {at}",
                                        hint="the replica was not fed from this relay: 'deltalog sync URL DST "
                                             "--reseed' starts it again from the relay's snapshot")
            seg = max(cover, key=lambda s: (s["end"], s["start"]))
            path.append(seg)
            at = seg["end"]
        return path

    def state_digest_at(self, offset: int) -> str | None:
        """The relay's state digest at ``offset`` (hex) where its head object names one: the head,
        a snapshot, a segment's start or end, a published head, a state before a rebase's base
        (``past_digests``); else None (sync then cannot prove that a replica older than the relay's
        oldest snapshot holds its history)."""
        head = self.refresh()
        if int(offset) == int(head["head"]):
            return head["state_digest"]
        for s in head["snapshots"]:
            if int(s["offset"]) == offset and s.get("state_digest"):
                return s["state_digest"]
        for e in head["segments"]:
            if e["start"] == offset:
                return e["pre_digest"]
            if e["end"] == offset:
                return e["post_digest"]
        for end, digest in [*(head.get("boundaries") or []), *(head.get("past_digests") or [])]:
            if int(end) == offset:
                return digest
        return None

    def _digest_at(self, offset: int, first: dict, header: dict) -> int:
        """The relay's state digest at ``offset``, where a puller starts inside segment ``first``."""
        if first["start"] == offset:
            return lineage.from_hex(first["pre_digest"])
        for e in self._head["segments"]:
            if e["end"] == offset:
                return lineage.from_hex(e["post_digest"])
        for end, digest in header.get("boundaries") or []:
            if int(end) == offset:
                return lineage.from_hex(digest)
        raise OffsetNotRetained(f"{self.store.url}: offset {offset} is not a state this relay published",
                                hint="'deltalog sync URL DST --reseed' starts the replica again from the "
                                     "relay's snapshot")

    def _segment(self, entry: dict) -> tuple[dict, list[memoryview]]:
        data = self.store.get(entry["key"])
        header, blobs = decode_segment(data.data, f"{self.store.url}/{entry['key']}")
        if (header.get("start"), header.get("end"), header.get("post_digest")) != (
                entry["start"], entry["end"], entry["post_digest"]) or header.get("model_id") != self._head["model_id"]:
            raise IntegrityError(f"{self.store.url}/{entry['key']}: segment does not match the head that names it")
        return header, blobs

    def chunks(self, since: int, advanced, target: int, max_chunk_bytes: int, base_values: bool = False):
        """``base_values`` is not honoured: a relay's segments are shared by every puller, so they
        hold plain values (its hello names no chunk codecs, so the engine never asks)."""
        from .sync import normalise_advanced

        head = self.refresh()
        if target > int(head["head"]):
            raise OffsetNotRetained(f"{self.store.url}: target {target} is past the relay's head {head['head']}")
        path = self._path(since, target)
        advanced = normalise_advanced(advanced)
        if len(path) == 1 and not advanced and path[0]["start"] == since and max_chunk_bytes >= SEGMENT_CHUNK_BYTES:
            yield from (bytes(b) for b in self._segment(path[0])[1])  # stored as the wire sends them
            return
        yield from self._merged(path, since, target, advanced, max_chunk_bytes)

    def _merged(self, path, since, target, advanced, max_chunk_bytes):
        """One sync from ``since`` to ``target`` out of several segments: the newest value of each row."""
        head = self._head
        parts: dict[str, list] = {}
        history: list = []
        pre = None
        for entry in path:
            header, blobs = self._segment(entry)
            if pre is None:
                pre = self._digest_at(since, entry, header)
            for i, blob in enumerate(blobs):
                r = rec.decode(blob, f"{entry['key']} chunk {i}")
                if r.history:
                    history.extend(e for e in r.history if e[0] > since)
                for t in r.tensors:
                    versions = t.versions if t.versions is not None else np.full(len(t.rows), r.offset, np.uint64)
                    parts.setdefault(t.name, []).append((t.rows, versions, t.new, t.dtype, t.significance))
        sent = 0
        tensors = []
        bucket_rows = int(head["bucket_rows"])
        for info in head["tensors"]:
            got = parts.get(info["name"])
            if not got:
                continue
            rows = np.concatenate([g[0] for g in got])
            versions = np.concatenate([np.asarray(g[1], np.uint64) for g in got])
            values = np.concatenate([g[2] for g in got])
            order = np.lexsort((versions, rows))
            rows, versions, values = rows[order], versions[order], values[order]
            last = np.r_[rows[1:] != rows[:-1], True]
            rows, versions, values = rows[last], versions[last], values[last]
            held = advanced.get(info["name"])
            if held:  # a partial sync holds these buckets up to their versions
                buckets = rows // np.uint64(bucket_rows)
                floor = np.array([held.get(int(b), since) for b in buckets.tolist()], dtype=np.uint64)
            else:
                floor = np.uint64(since)
            keep = versions > floor  # rows the replica at `since` already holds are not sent
            rows, versions, values = rows[keep], versions[keep], values[keep]
            if len(rows):
                sig = float(sum(g[4] for g in got))
                tensors.append(rec.TensorDelta(info["name"], got[0][3], rows, values, None, versions, sig))
        claims = {"pre_digest": pre,
                  "post_digest": lineage.from_hex(path[-1]["post_digest"]), "history": history}
        # Whole buckets per chunk, at most about max_chunk_bytes each (a budget stops between them),
        # most significant first. A segment keeps each tensor's significance, not each row's, so a
        # bucket's is its rows' share of its tensor's.
        order = []
        for t in tensors:
            b = t.rows // np.uint64(bucket_rows)
            starts = np.flatnonzero(np.r_[True, b[1:] != b[:-1]])
            stops = np.r_[starts[1:], len(b)]
            per_row = t.significance / max(1, len(t.rows))
            row_bytes = t.new.nbytes // max(1, len(t.rows)) + 8
            for start, stop in zip(starts.tolist(), stops.tolist()):
                order.append(((stop - start) * per_row, t, start, stop, (stop - start) * row_bytes))
        order.sort(key=lambda x: -x[0])
        batch, size = [], 0
        for _sig, t, start, stop, nbytes in order:
            batch.append((t, start, stop))
            size += nbytes
            if size >= max_chunk_bytes:
                yield self._encode(batch, since, target, claims)
                sent += 1
                claims["history"] = None
                batch, size = [], 0
        if batch or not sent:  # one chunk at least: it carries the digests and history
            yield self._encode(batch, since, target, claims)

    def _encode(self, batch, since, target, claims) -> bytes:
        by_tensor: dict[str, list] = {}
        for t, start, stop in batch:
            by_tensor.setdefault(t.name, [t, []])[1].append(np.arange(start, stop))
        tensors = []
        model_order = [info["name"] for info in self._head["tensors"]]
        for name, (t, idx) in sorted(by_tensor.items(), key=lambda kv: model_order.index(kv[0])):
            idx = np.sort(np.concatenate(idx))  # rows stay sorted whatever the bucket order
            tensors.append(rec.TensorDelta(name, t.dtype, t.rows[idx], t.new[idx], None, t.versions[idx],
                                           t.significance * len(idx) / max(1, len(t.rows))))
        from .transport.base import RECORD_VERSION

        r = rec.Record(offset=target, base=since, kind="sync", time=time.time(), model_id=self._head["model_id"],
                       tensors=tensors, target=target, **claims)
        return rec.encode(r, RECORD_VERSION)

    def snapshot_manifest(self, offset: int) -> dict:
        self.refresh()
        if offset not in {int(s["offset"]) for s in self._head["snapshots"]}:
            raise OffsetNotRetained(f"{self.store.url}: no snapshot at offset {offset}")
        data = self.store.get(snapshot_prefix(offset) + "manifest.json").data
        try:
            return json.loads(data)
        except ValueError:
            raise IntegrityError(f"{self.store.url}: snapshot {offset} manifest is not JSON") from None

    def read_snapshot_file(self, offset: int, file: str, start: int, length: int) -> bytes:
        if "/" in file or file.startswith("."):
            raise InvalidInput(f"snapshot file name {file!r} is not a plain name")
        return self.store.get_range(snapshot_prefix(offset) + file, start, length)
