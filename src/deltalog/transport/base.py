"""The two narrow interfaces every transport implements: Source and Sink.

A *Source* is a replica we pull from (a local directory, the far end of an
ssh pipe, an HTTP ``serve-snapshot`` server). It only ever hands out bytes
that are already encoded and self-checking: record blobs (deltalog.record)
and immutable snapshot files, checked against their manifest. The sync
engine (deltalog.sync) decides what to ask for; a Source knows nothing of
budgets, locks or the destination.

A *Sink* is the replica we write into: a local directory, or the far end of
an ssh pipe when pushing (the remote ``deltalog serve --stdio`` process is
the applying side). HTTP has no Sink: it is pull only.

Every implementation passes the one contract suite in tests/test_sync.py.

Data shapes (all plain msgpack/JSON-able values):

hello (Source.hello)::

    {"protocol": 1, "model_id": str, "head": int, "state_digest": str,     # 16 hex digits (deltalog.lineage)
     "oldest_offset": int,
     "bucket_rows": int, "format_version": int,
     "tensors": [{"name": str, "dtype": str, "shape": [int, ...]}, ...],   # model order
     "snapshots": [offset, ...],                                          # ascending
     "time": float,         # source clock when hello was answered (lag_seconds)
     "head_time": float|None,  # when the model's writer made the head state (deltalog.history.head_time);
                               # optional: older peers do not send it
     "chunk_codecs": [str]}    # optional: codecs beyond plain values the source sends when asked
                               # (["base-xor-shuffle-zstd"], formats/FORMAT.md section 4)

advanced (the destination's partial-sync state, Source.chunks)::

    {tensor_name: {bucket: version}}   # buckets already held at a version newer than ``since``

manifest (Source.snapshot_manifest): the snapshot's manifest.json content::

    {"offset": int, "model_id": str,
     "tensors": [{"name", "dtype", "shape", "file", "nbytes", "xxh3"}, ...],
     "bucket_versions": {name: {"buckets": [int], "versions": [int]}}}    # optional

sink state (Sink.begin)::

    {"exists": bool, "model_id": str|None, "head": int, "state_digest": str|None, "oldest_offset": int,
     "bucket_rows": int, "tensors": [...], "advanced": {...}, "pending_target": int|None,
     "pending_buckets": int, "chunk_codecs": [str]}   # the last optional: what the destination decodes
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol, runtime_checkable

PROTOCOL_VERSION = 1  # the sync protocol (hello, chunks, snapshot files); wire.py frames it
# Chunks cross the wire as record encoding v1, which every deltalog decodes (a
# replica stores v2 from format 3 on: stored records are never sent as they are).
RECORD_VERSION = 1
DEFAULT_CHUNK_BYTES = 4 << 20  # uncompressed row bytes per chunk, before the budget shrinks it
SNAPSHOT_PIECE_BYTES = 4 << 20  # one read_snapshot_file request; bounds memory on both sides


@runtime_checkable
class Source(Protocol):
    """A replica we pull from: local, ssh or http."""

    def hello(self) -> dict:
        """Who the source is and where its log stands (see the module docstring), as of now.

        Each call looks afresh (a long-lived source is asked once per round
        of ``sync --follow``).

        ModelMismatch is raised by the engine, not here; TransportError when
        the peer cannot be reached or speaks another protocol version.
        """
        ...

    def chunks(
        self, since: int, advanced: dict[str, dict[int, int]], target: int, max_chunk_bytes: int,
        base_values: bool = False,
    ) -> Iterator[bytes]:
        """Encoded record blobs bringing a replica at ``since`` to ``target``.

        Each blob is ``record.encode(..., RECORD_VERSION)`` of a Record with kind="sync",
        offset=target, base=since, target=target, per-row ``versions`` (the
        offset that last wrote each row), no ``old`` values, and the
        source's state digests at ``since`` (when it holds that offset) and
        at ``target``; the first blob also carries the ``history`` of the
        source records it stands for. Values are
        the source's values at exactly ``target`` (coalesced: a row updated
        many times is sent once). A blob holds whole buckets only, at most
        about ``max_chunk_bytes`` of uncompressed rows unless one bucket is
        bigger; blobs come most significant bucket first (sum |delta| of the
        records in (since, target] touching the bucket).

        ``advanced`` names buckets the destination already holds at a version
        newer than ``since`` (a partial sync): a bucket whose source version
        is not newer is skipped, and within a newer one only rows written
        after the held version are sent.

        ``base_values``: the new values are sent XORed with the source's
        values at ``since``, which the destination holds
        (``base-xor-shuffle-zstd``, fewer bytes); asked by the engine only of
        a source whose hello names the codec, and never with ``advanced``.

        OffsetNotRetained if ``since`` is older than the source's oldest
        offset or ``target`` is not retained (the engine then falls back to a
        snapshot transfer). The caller may stop iterating at any time and
        must then call :meth:`close` (a stream cannot be abandoned half-read
        and reused).
        """
        ...

    def snapshot_manifest(self, offset: int) -> dict:
        """The manifest.json content of the snapshot at ``offset``."""
        ...

    def read_snapshot_file(self, offset: int, file: str, start: int, length: int) -> bytes:
        """Up to ``length`` bytes of snapshot file ``file`` (a manifest "file" entry) from ``start``.

        Returns fewer bytes only at the end of the file. The engine checks the
        whole file's xxh3 against the manifest, so a Source need not.
        """
        ...

    def wait_for_head(self, since: int, timeout: float) -> int:
        """Block until the source's head differs from ``since``, at most ``timeout`` seconds; return the head.

        The long-poll of ``sync --follow``: the source side waits (local: the
        log's state re-read every few ms; ssh: a ``wait`` request the remote
        ``serve --stdio`` answers when the head moves; http: ``GET
        /v1/wait?since=H&timeout=T``), so a follower sees a commit within
        milliseconds without polling the network. Returning the unchanged
        head at the timeout is normal. A source that cannot long-poll (an
        older server) raises NotImplementedError; the caller then sleeps.
        A following :meth:`hello` describes the source afresh.
        """
        ...

    @property
    def reusable(self) -> bool:
        """False when this source cannot serve another request and must be reopened
        (an ssh pipe still holding a chunk stream that was stopped half-read)."""
        ...

    def close(self) -> None:
        ...


@runtime_checkable
class Sink(Protocol):
    """The replica a sync writes into: local, or ssh (push)."""

    def begin(self, wait: float, dry_run: bool = False) -> dict:
        """Take the destination's writer lock (waiting up to ``wait`` s) and describe it.

        Returns the sink state (module docstring); ``exists`` is False for a
        missing or empty directory, which a snapshot transfer will create.
        LockHeld if another writer holds it. ``dry_run`` only describes: no
        lock, nothing created.
        """
        ...

    def apply_chunk(self, blob: bytes, target: int, source: str) -> dict:
        """Apply one chunk atomically and durably as pending partial-sync state.

        Returns {"rows": int, "pending_buckets": int}. ModelMismatch or
        IntegrityError for a chunk that is not for this replica / corrupt.
        """
        ...

    def apply_final(self, blob: bytes, target: int, follow: dict) -> dict:
        """Optional (defined on the class): apply the ONLY chunk of a sync as its "sync" record at ``target``.

        The fast path of small syncs, each round of ``sync --follow``: logged
        then applied like a commit, no partial-sync state and no extra fsync.
        Called only when the destination holds no partial sync. Returns the
        sink state plus "rows" (rows applied). A wrapper that must see every
        finish (``sync --check``) simply does not define it.
        """
        ...

    def finish(self, target: int, follow: dict, digest: str | None = None) -> dict:
        """Replace the pending chunks by one "sync" record at ``target`` (one transaction).

        ``follow`` is the follower metadata to record (source, source_head,
        source_time); ``digest`` the source's state digest at ``target``,
        which the destination's must equal after it (else Diverged, and the
        pending chunks are undone). Returns the sink state after it.
        """
        ...

    def state_digest_at(self, offset: int) -> str | None:
        """The destination's state digest at ``offset`` (hex), or None when it does not hold that offset."""
        ...

    def abort_pending(self) -> dict:
        """Undo a pending partial sync (its target is newer than the source's head); returns the state."""
        ...

    def note_follow(self, follow: dict) -> None:
        """Record follower metadata without advancing (an incomplete or no-op sync)."""
        ...

    def snapshot_begin(self, hello: dict, manifest: dict) -> dict[str, int]:
        """Start (or resume) receiving snapshot ``manifest`` of the source described by ``hello``.

        ``hello`` may carry ``history_proven: True``: the engine proved that
        the destination held the source's model at its head (not a reseed),
        so the rebase keeps the state digests of what it drops
        (meta/past_digests). Returns {file: bytes already held} so an
        interrupted transfer resumes.
        """
        ...

    def snapshot_write(self, file: str, start: int, data: bytes) -> None:
        """Write ``data`` at ``start`` of snapshot file ``file`` (pieces arrive in order)."""
        ...

    def snapshot_commit(self) -> dict:
        """Check every file against the manifest and install the snapshot as the replica's base.

        A new destination is created under its final name only now (staged
        beside it, then renamed). Returns the sink state.
        """
        ...

    def end_round(self) -> None:
        """Optional: release the lock but keep the connection for another :meth:`begin`.

        ``sync --follow`` calls it between rounds on a sink that has it and
        says it is ``reusable`` (ssh push: one session for all rounds; a
        local directory: the replica stays open, its memory maps warm, and
        is reopened only if files were replaced meanwhile); other sinks are
        closed and reopened.
        """
        ...

    def close(self) -> None:
        """Release the lock and the connection. Safe to call twice."""
        ...
