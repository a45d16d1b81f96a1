"""deltalog rollback: append a record restoring the tensors of an earlier offset."""

from __future__ import annotations

import click

from .console import Output, json_option, quiet_option, wait_option


@click.command("rollback")
@click.argument("replica", type=click.Path(file_okay=False))
@click.option("--to", "to", required=True, type=click.IntRange(min=0), metavar="OFFSET",
              help="The offset whose tensors become the new head (see 'deltalog log').")
@click.option("--reason", metavar="TEXT", help="Why: kept in the record and shown by 'deltalog log'.")
@wait_option
@json_option
@quiet_option
def command(replica, to, reason, wait, as_json, quiet):
    """Make REPLICA hold exactly the tensors it had at OFFSET, by appending a record.

    The rollback is a record of kind 'rollback' (target OFFSET, your
    reason): history stays readable, sync carries it to other replicas, and
    rolling forward again is another rollback to a later offset, e.g. the
    one just before the rollback. Only rows changed since OFFSET are read
    and written. If the tensors already equal those of OFFSET, nothing is
    appended (exit 0). Exits 7 if OFFSET is no longer retained.
    """
    from ..replica import Replica
    from ..rollback import rollback

    out = Output(as_json, quiet)
    with Replica.open(replica) as r, out.working(f"rolling {replica} back to offset {to}"):
        result = rollback(r, to, reason=reason, wait=wait)

    def render(c):
        if not result.changed:
            c.print(f"nothing to do: {replica} at offset {result.previous_head} already holds the tensors of offset {to}")
        else:
            c.print(f"rolled back to offset {to}: {result.rows:,} rows in {len(result.tensors)} tensors restored, "
                    f"new head {result.offset} (was {result.previous_head})")

    out.result(result.to_json(), render)
