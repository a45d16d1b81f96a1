"""deltalog rollback: append a record restoring the tensors of an earlier offset."""

from __future__ import annotations

import click

from .console import Output, json_option, quiet_option, wait_option
from .params import OffsetParam


@click.command("rollback")
@click.argument("replica", type=click.Path(file_okay=False, readable=False))  # unreadable: exit 12, not 2
@click.option("--to", "to", required=True, type=OffsetParam(), metavar="OFFSET",
              help="The offset whose tensors become the new head: N, or head~N / -N for the N-th retained "
                   "offset before the head (see 'deltalog log').")
@click.option("--reason", metavar="TEXT", help="Why: kept in the record and shown by 'deltalog log'.")
@click.option("--dry-run", "-n", is_flag=True, help="Show the rows it would restore, per tensor; append nothing.")
@wait_option
@json_option
@quiet_option
def command(replica, to, reason, dry_run, wait, as_json, quiet):
    """Make REPLICA hold exactly the tensors it had at OFFSET, by appending a record.

    The rollback is a record of kind 'rollback' (target OFFSET, your
    reason): history stays readable, sync carries it to other replicas, and
    rolling forward again is another rollback to a later offset, e.g. the
    one just before the rollback. Only rows changed since OFFSET are read
    and written. If the tensors already equal those of OFFSET, nothing is
    appended (exit 0). Exits 7 if OFFSET is no longer retained.
    """
    from ..history import resolve_offset
    from ..replica import Replica
    from ..rollback import rollback
    from .interrupts import say_where_an_interrupt_left

    out = Output(as_json, quiet)
    r = Replica.open(replica)
    try:
        to = resolve_offset(r, to)
        with say_where_an_interrupt_left(r, r.head, "rollback record"), \
                out.working(f"rolling {replica} back to offset {to}"):
            result = rollback(r, to, reason=reason, wait=wait, dry_run=dry_run)
    finally:
        r.close(flush=False)  # return once the record is durable; the rows' fsync follows the WAL schedule

    def render(c):
        if dry_run:
            if not result.changed:
                c.print(f"nothing would change: {replica} at offset {result.previous_head} holds the tensors of offset {to}")
                return
            c.print(f"would restore {result.rows:,} rows in {len(result.tensors)} tensors to their values at offset "
                    f"{to}, as a record at offset {result.offset}:")
            for t in result.tensors:
                c.print(f"  {t['name']}: {t['rows']:,} rows")
        elif not result.changed:
            c.print(f"nothing to do: {replica} at offset {result.previous_head} already holds the tensors of offset {to}")
        else:
            c.print(f"rolled back to offset {to}: {result.rows:,} rows in {len(result.tensors)} tensors restored, "
                    f"new head {result.offset} (was {result.previous_head})")

    out.result(result.to_json(), render)


command.quick_exit = True  # no cyclic GC, no teardown at exit (cli.quick_exit)
