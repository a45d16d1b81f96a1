"""Time travel over one replica's log: which rows changed, and their values then.

The log keeps, for every record, the rows it wrote and the values they
replaced. So the values of a set of rows at an earlier offset h come from
the head's values with the records after h undone, newest first. The cost
is O(rows changed since h), never O(model size): this is what diff,
rollback and replay stand on.

An offset is *retained* when it is the oldest offset (the base snapshot) or
the offset of a record in the log; a follower that received a coalesced
sync from 3 to 9 never held 4..8, so those are not retained.
"""

from __future__ import annotations

import re

import numpy as np

from . import lineage, tensorfiles
from . import record as rec
from .errors import InvalidInput, OffsetNotRetained
from .pending import head_values
from .replica import Replica


OFFSET_HINT = "write an offset N or 'head', or 'head~N' or '-N' for the N-th retained offset before the head"
_BACK = re.compile(r"(?:head~|-)(\d+)")


def parse_offset(text: str) -> int | str:
    """An offset as written on the command line: N (an int), or 'head', 'head~N', '-N' (returned
    as given, for :func:`resolve_offset`). InvalidInput for anything else."""
    if text.isdigit():  # digits only: no sign, no spaces
        return int(text)
    if text == "head" or _BACK.fullmatch(text):
        return text
    raise InvalidInput(f"{text!r} is not an offset", hint=OFFSET_HINT)


def resolve_offset(replica: Replica, text: int | str) -> int:
    """The offset ``text`` names on ``replica``: N itself, or counted back over its retained offsets.

    'head~N' and '-N' are the N-th retained offset before the head, as git
    counts commits: on a follower whose log has gaps, the N-th of its own
    records back (then its oldest offset), not head - N.
    """
    value = parse_offset(text) if isinstance(text, str) else int(text)
    if isinstance(value, int):
        return value
    match = _BACK.fullmatch(value)
    back = int(match.group(1)) if match else 0
    if back == 0:
        return replica.head
    found = replica.record_offset_from_end(back)
    if found is not None:
        return found
    if replica.record_offset_from_end(back - 1) is not None:  # exactly `back` records: then the oldest offset
        return replica.oldest_offset
    raise OffsetNotRetained(f"{replica.path}: {text}: it holds fewer than {back} offsets before its head",
                            hint=f"'deltalog log {replica.path}' lists them")


def check_retained(replica: Replica, offset: int) -> None:
    """OffsetNotRetained unless ``replica`` can reconstruct the model at ``offset``."""
    oldest, head = replica.oldest_offset, replica.head
    if offset == oldest or offset == head:
        return
    if offset < oldest or offset > head:
        raise OffsetNotRetained(
            f"{replica.path}: offset {offset} is not retained",
            hint=f"the oldest offset still available is {oldest}, the head is {head}",
        )
    if not replica.has_record(offset):
        raise OffsetNotRetained(
            f"{replica.path}: offset {offset} was never held here (a sync jumped over it)",
            hint=f"the offsets retained here are {oldest} and those 'deltalog log {replica.path} --stored' lists",
        )


def changed_rows(replica: Replica, since: int, upto: int | None = None) -> dict[str, np.ndarray]:
    """Per tensor: sorted unique rows written by records in (since, upto].

    Reads each record in place (no copy) and decodes only its row-index (and
    row-version) sections: the values stay compressed and, in a record of
    encoding v2, unhashed (the header and the sections decoded are checked).
    """
    parts: dict[str, list[np.ndarray]] = {}
    for offset, view in replica.iter_record_views(since, upto):
        record = rec.decode(view, f"{replica.path}: record {offset}", rows_only=True)
        for t in record.tensors:
            parts.setdefault(t.name, []).append(t.rows)
    _check_not_compacted_meanwhile(replica, since)
    bounds = {info.name: info.rows for info in replica.tensors}
    return {name: sorted_union(chunks, bounds.get(name)) for name, chunks in parts.items()}


def sorted_union(chunks: list[np.ndarray], bound: int | None = None) -> np.ndarray:
    """The sorted distinct values of some sorted, strictly increasing arrays (the row indices of records).

    Runs of consecutive rows (a dense layer, rewritten by every record) that
    overlap or touch are one run: no sort. When the rows are all below
    ``bound`` (the tensor's row count) and the chunks hold more than an
    eighth of that many, a mask of ``bound`` bytes: 100 records of a 4 GiB
    model's log held 17 M row indices of ``item_emb`` (an 8.4 M-row table),
    which took 290 ms to sort and take 90 ms to mark. Otherwise a sort and
    a mask of the sorted rows (numpy's unique and its quicksort are slower
    here), which costs what the change costs whatever the table's size.
    """
    chunks = [c for c in chunks if len(c)]
    if len(chunks) == 1:
        return chunks[0]
    if not chunks:
        return np.empty(0, dtype=np.uint64)
    run = _one_run(chunks)
    if run is not None:
        return np.arange(run[0], run[1] + 1, dtype=np.uint64)
    if bound is not None and 8 * sum(len(c) for c in chunks) >= bound and all(int(c[-1]) < bound for c in chunks):
        seen = np.zeros(bound, dtype=bool)
        for c in chunks:
            seen[c.astype(np.intp, copy=False)] = True
        return np.flatnonzero(seen).astype(np.uint64)
    merged = np.sort(np.concatenate(chunks), kind="stable")  # timsort merges the sorted runs
    if len(merged) < 2:
        return merged
    keep = np.empty(len(merged), dtype=bool)
    keep[0] = True
    np.not_equal(merged[1:], merged[:-1], out=keep[1:])
    return merged[keep]


def _one_run(chunks: list[np.ndarray]) -> tuple[int, int] | None:
    """(first, last) when every chunk is a run of consecutive rows and together they make one run, else None."""
    spans = []
    for c in chunks:
        first, last = int(c[0]), int(c[-1])
        if last - first + 1 != len(c):  # strictly increasing: only a run has no gap
            return None
        spans.append((first, last))
    spans.sort()
    first, last = spans[0]
    for lo, hi in spans[1:]:
        if lo > last + 1:
            return None
        last = max(last, hi)
    return first, last


def values_at(replica: Replica, offset: int, rows: dict[str, np.ndarray]) -> tuple[int, dict[str, np.ndarray]]:
    """(head used, {name: values of ``rows[name]`` at ``offset``}), rows sorted unique.

    Reads the rows at the head (consistently), then walks the records after
    ``offset`` oldest first: a row's value at ``offset`` is the value the
    first record after it that wrote the row replaced. Each row is resolved
    once, a record's values are decompressed (and, in encoding v2, their
    checksums checked) only for tensors where it resolves a row, and the walk
    stops when every row is resolved, so a dense layer written by every
    record costs one record, not all of them.
    """
    check_retained(replica, offset)
    head, values = head_values(replica, rows)
    if offset == head:
        return head, values
    unresolved = {name: np.ones(len(r), dtype=bool) for name, r in rows.items() if len(r)}
    left = {name: len(r) for name, r in rows.items() if len(r)}
    for rec_offset, view in replica.iter_record_views(offset, head):
        if not left:
            break
        record = rec.RecordView(view, f"{replica.path}: record {rec_offset}")  # read twice below, checked once
        firsts = {}
        for t in record.decode(only=set(left), rows_only=True).tensors:
            wanted = rows[t.name]
            pos = np.searchsorted(wanted, t.rows)
            hit = pos < len(wanted)
            hit[hit] = wanted[pos[hit]] == t.rows[hit]
            hit[hit] = unresolved[t.name][pos[hit]]
            if hit.any():
                firsts[t.name] = (hit, pos[hit])
        if not firsts:
            continue
        for t in record.decode(only=set(firsts)).tensors:
            if t.old is None:
                raise OffsetNotRetained(f"{record.what} carries no undo values; offset {offset} cannot be rebuilt")
            hit, pos = firsts[t.name]
            values[t.name][pos] = t.old[hit]
            unresolved[t.name][pos] = False
            left[t.name] -= len(pos)
            if not left[t.name]:
                del left[t.name]
    _check_not_compacted_meanwhile(replica, offset)
    return head, values


def state_rows(replica: Replica, offset: int, since: int) -> tuple[int, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Rows changed in (since, head] with their values at ``offset``: {name: (rows, values)}."""
    rows = changed_rows(replica, since)
    head, values = values_at(replica, offset, rows)
    return head, {name: (rows[name], values[name]) for name in rows}


def _check_not_compacted_meanwhile(replica: Replica, offset: int) -> None:
    """OffsetNotRetained if a compaction (another process) dropped records after ``offset``
    while we walked the log without the lock: the walk may have missed some. Compaction
    raises ``oldest`` in the same transaction that deletes records, so checking it after
    the walk is enough."""
    oldest = replica.oldest_offset
    if offset < oldest:
        raise OffsetNotRetained(
            f"{replica.path}: offset {offset} was compacted away while it was being read",
            hint=f"the oldest offset still available is {oldest}, the head is {replica.head}",
        )


def head_time(replica: Replica, head: int) -> float | None:
    """When the model's writer made the state at ``head`` (the replica's head, as the caller read it
    with the rest of what it reports), in Unix time, or None if unknown.

    The time of the record at the head; for a sync record, the time of the
    source record it stands for (its history), so every replica at offset h
    reports the primary's time of h, however many hops away. When the head
    is a snapshot with no record at it (a fresh init, a compaction that
    folded every record, a first sync from a source at its snapshot), the
    time its manifest keeps: init's, or that of the record it was taken at,
    carried along by every sync that copies it. None only for a snapshot
    written before manifests kept it (see :func:`head_time_unknown`).
    This is what fleet lag in seconds is measured with: how much older the
    model a replica holds is than the newest one.
    """
    for s in replica.iter_summaries(head - 1, head):
        for e in rec.history_entries(s.history):
            if e["offset"] == head:
                return float(e["time"])
        return float(s.time)
    for manifest in replica.snapshots():
        if manifest["offset"] == head:
            return tensorfiles.manifest_time(manifest)
    return None


def head_time_unknown(head: int) -> str:
    """Why :func:`head_time` is None: the words status shows instead of a time."""
    return (f"head {head} is a snapshot written before snapshot manifests kept the time of their state: "
            "unknown until the next record")


def log_entries(replica: Replica, since: int = -1, stored: bool = False) -> list[dict]:
    """What ``deltalog log`` lists: the log's records after ``since``, oldest first, as maps.

    A sync record stands for its source's records: unless ``stored``, it is
    listed as them (its ``history``, offsets after ``since``), each with
    ``synced_in`` = the local record that brought it and ``retained`` = whether
    this replica can rebuild that offset (only the last one, the sync
    record's own offset); their ``base``, ``bytes`` and ``tensors`` are not
    known here (null). So a rollback made upstream shows as a rollback, with its
    reason, however many hops away.
    """
    out = []
    for s in replica.iter_summaries(since):
        entry = {"offset": s.offset, "base": s.base, "time": s.time, "kind": s.kind, "rows": s.rows,
                 "bytes": s.nbytes, "significance": s.significance, "reason": s.reason, "target": s.target,
                 "tensors": s.tensors, "post_digest": lineage.to_hex(s.post_digest), "synced_in": None,
                 "retained": True, "user": s.user, "host": s.host}
        if stored or not s.history:
            out.append(entry)
            continue
        for e in rec.history_entries(s.history):
            if e["offset"] <= since:
                continue
            out.append({"offset": e["offset"], "base": None, "time": e["time"], "kind": e["kind"], "rows": e["rows"],
                        "bytes": None, "significance": e["significance"], "reason": e["reason"], "target": e["target"],
                        "tensors": None, "post_digest": lineage.to_hex(s.post_digest) if e["offset"] == s.offset else None,
                        "synced_in": s.offset, "retained": e["offset"] == s.offset,
                        "user": e["user"], "host": e["host"]})
    return out
