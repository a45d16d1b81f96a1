"""deltalog compact: fold old records into a snapshot and drop them."""

from __future__ import annotations

import click

from .console import Output, counted, human_bytes, json_option, quiet_option, wait_option
from .params import DurationParam, OffsetParam


@click.command("compact")
@click.argument("replica", type=click.Path(file_okay=False, readable=False))  # unreadable: exit 12, not 2
@click.option("--keep-after", type=OffsetParam(), default=None, metavar="OFFSET",
              help="Keep the offsets after OFFSET (N, head, head~N or -N); OFFSET becomes the oldest.")
@click.option("--keep-records", type=click.IntRange(min=0), default=None, metavar="N",
              help="Keep the newest N records.")
@click.option("--keep-age", type=DurationParam(), default=None,
              help="Keep records written in the last DURATION (e.g. 90m, 12h, 7d).")
@click.option("--from-tensors", is_flag=True,
              help="Repair: make the live tensor files the new base (a snapshot at the head, checked against "
                   "the head's state digest) and drop every record, snapshot and the bucket index. For a "
                   "damaged log or snapshot whose tensors are intact (what 'deltalog verify' suggests).")
@click.option("--dry-run", "-n", is_flag=True,
              help="Show the new oldest offset and what would be dropped and written; change nothing.")
@wait_option
@json_option
@quiet_option
def command(replica, keep_after, keep_records, keep_age, from_tensors, dry_run, wait, as_json, quiet):
    """Fold REPLICA's records older than a horizon into a snapshot and drop them.

    Without an option, every record is folded (the oldest offset becomes the
    head, so nothing before it can be rolled back to). Offsets before the
    new oldest then fail with exit 7. The snapshot is rebuilt from the
    previous snapshot and the log, not from the live tensor files; commits
    go on while it is written and wait for the writer lock only for the
    final switch (pass --wait). Safe to interrupt: re-run it to finish.
    """
    if sum(x is not None for x in (keep_after, keep_records, keep_age)) + from_tensors > 1:
        raise click.UsageError("give at most one of --keep-after, --keep-records, --keep-age, --from-tensors")
    from ..compact import compact, compact_from_tensors, plan
    from ..history import resolve_offset
    from ..replica import Replica

    out = Output(as_json, quiet)
    with Replica.open(replica) as r, out.progress("compacting") as update:
        if keep_after is not None:
            keep_after = resolve_offset(r, keep_after)
        if dry_run:
            result = plan(r, keep_after=keep_after, keep_records=keep_records, keep_age=keep_age,
                          from_tensors=from_tensors)
        elif from_tensors:
            result = compact_from_tensors(r, wait=wait)
        else:
            result = compact(r, keep_after=keep_after, keep_records=keep_records, keep_age=keep_age,
                             wait=wait, progress=update)

    def render(c):
        if dry_run:
            if not result.changed and not from_tensors:
                c.print(f"nothing would be compacted: {replica} keeps offsets {result.oldest_offset}..{result.head}")
                return
            c.print(f"would make offset {result.oldest_offset} the oldest of {replica} (head {result.head}), built "
                    f"from the {'tensor files' if from_tensors else 'log'}: {result.records_removed} records "
                    f"({human_bytes(result.log_bytes_freed)}) and snapshots {result.snapshots_removed or 'none'} "
                    f"({human_bytes(result.snapshot_bytes_removed)}) dropped, "
                    f"{human_bytes(result.snapshot_bytes_written)} of snapshot written")
            return
        if result.built_from == "tensors":
            c.print(f"rebased {replica} on its tensor files at offset {result.head}: "
                    f"{counted(result.records_removed, 'record')} and "
                    f"{counted(len(result.snapshots_removed), 'older snapshot')} dropped")
        elif result.changed:
            c.print(f"compacted {replica}: oldest offset {result.previous_oldest} -> {result.oldest_offset} "
                    f"(head {result.head}), {counted(result.records_removed, 'record')} and "
                    f"{counted(len(result.snapshots_removed), 'snapshot')} dropped")
        else:
            c.print(f"nothing to compact: {replica} keeps offsets {result.oldest_offset}..{result.head}")
            if result.garbage_removed:
                c.print(f"removed leftovers of interrupted runs: {', '.join(result.garbage_removed)}")
            return
        c.print(f"reclaimed {human_bytes(result.bytes_reclaimed)}: {human_bytes(result.log_bytes_freed)} of log pages "
                f"(reused by new records; the log file does not shrink) + "
                f"{human_bytes(result.snapshot_bytes_removed)} of snapshot files; "
                f"new snapshot {human_bytes(result.snapshot_bytes_written)}")
        if result.garbage_removed:
            c.print(f"removed leftovers of interrupted runs: {', '.join(result.garbage_removed)}")

    out.result(result.to_json(), render)
