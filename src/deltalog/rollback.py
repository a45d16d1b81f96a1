"""rollback: make the tensors of an earlier offset the new head, as a record.

A rollback is an ordinary record of kind "rollback" (with ``target`` = the
offset restored and the user's ``reason``): the rows written after the
target get back the values they had at the target, found by undoing the
log (deltalog.history). So sync carries it like any update, the history
before it stays readable, and rolling *forward* is the same operation with
a later target (e.g. the offset just before the rollback). Its cost follows
the rows changed since the target, never the model's size.

A rollback to a state the tensors already hold (the target is the head, or
everything changed since has been restored already) appends nothing.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field


from . import record as rec
from .dtypes import rows_differ
from .errors import InvalidInput
from .history import changed_rows, check_retained, values_at
from .replica import Replica



@dataclass
class RollbackResult:
    offset: int  # the new record (a dry run: the offset it would take), or the unchanged head when there is none
    target: int
    previous_head: int
    rows: int = 0
    changed: bool = False
    reason: str | None = None
    tensors: list[dict] = field(default_factory=list)  # [{name, rows}]
    dry_run: bool = False  # nothing appended: changed, rows and tensors say what would be

    def to_json(self) -> dict:
        return {
            "offset": self.offset,
            "target": self.target,
            "previous_head": self.previous_head,
            "rows": self.rows,
            "changed": self.changed,
            "reason": self.reason,
            "tensors": self.tensors,
            "dry_run": self.dry_run,
        }


def rollback(replica: Replica, to: int, reason: str | None = None, wait: float = 0.0,
             dry_run: bool = False) -> RollbackResult:
    """Append a record restoring the tensors of offset ``to``; under the writer lock.

    OffsetNotRetained when ``to`` cannot be rebuilt (compacted away, never
    held by this follower, or beyond the head); LockHeld when another writer
    holds the replica past ``wait`` seconds. ``dry_run`` finds the rows the
    record would restore and appends nothing (no lock: a reader).
    """
    to = int(to)
    if reason is not None and len(reason) > rec.MAX_REASON:
        raise InvalidInput(f"--reason is {len(reason)} characters long; at most {rec.MAX_REASON} are kept")
    with contextlib.nullcontext() if dry_run else replica.writing(wait):
        head = replica.head
        pending = replica.pending_sync()
        if pending is not None:  # its rows are ahead of the head in the tensor files
            raise InvalidInput(
                f"{replica.path}: a partial sync to offset {pending['target']} is pending",
                hint="complete it with 'deltalog sync' from its source before rolling back",
            )
        check_retained(replica, to)
        result = RollbackResult(offset=head, target=to, previous_head=head, reason=reason, dry_run=dry_run)
        if to == head:
            return result
        rows = changed_rows(replica, to)
        _head, wanted = values_at(replica, to, rows)
        if dry_run:
            restored = _differing(replica, rows, wanted)
        else:
            # The record's own read of the current rows (its undo values) drops the rows that
            # already hold the target's values: no second read of every changed row here.
            updates = {name: (idx, wanted[name]) for name, idx in rows.items() if len(idx)}
            offset = replica.append_record("rollback", updates, reason=reason, target=to, drop_unchanged=True)
            if offset == head:  # the tensors already hold the target's values: nothing appended
                return result
            result.offset = offset
            summary = next(replica.iter_summaries(since=offset - 1, upto=offset))
            restored = {t["name"]: t["rows"] for t in summary.tensors}
        if not restored:  # the tensors already hold the target's values
            return result
        if dry_run:
            result.offset = head + 1  # where the record would go, as the human output says
        result.changed = True
        result.tensors = [{"name": name, "rows": int(n)} for name, n in restored.items()]
        result.rows = sum(t["rows"] for t in result.tensors)
        return result


def _differing(replica: Replica, rows: dict, wanted: dict) -> dict[str, int]:
    """{name: how many of its ``rows`` do not hold the ``wanted`` values now}, tensors without any left out."""
    counts = {}
    for name, idx in rows.items():
        _h, current = replica.read_rows(name, idx)
        if n := int(rows_differ(current, wanted[name]).sum()):
            counts[name] = n
    return counts


__all__ = ["RollbackResult", "rollback"]
