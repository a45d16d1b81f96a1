"""deltalog commit: append what changed in a full checkpoint as one record."""

from __future__ import annotations

import click

from .console import Output, human_bytes, json_option, quiet_option, recursive_option, wait_option


@click.command("commit")
@click.argument("replica", type=click.Path(file_okay=False, readable=False))  # unreadable: exit 12, not 2
@click.option("--from", "checkpoint", required=True, type=click.Path(exists=True),
              help="The model's new full state: .npz, .safetensors or a directory of .npy files.")
@click.option("--message", "-m", metavar="TEXT",
              help="Why: kept in the record with your user and host, shown by 'deltalog log'.")
@click.option("--allow-nonfinite", is_flag=True,
              help="Commit rows that hold NaN or infinity (refused otherwise: usually a diverged training run).")
@recursive_option
@wait_option
@json_option
@quiet_option
def command(replica, checkpoint, message, allow_nonfinite, recursive, wait, as_json, quiet):
    """Append ONE record holding the rows where CHECKPOINT differs from REPLICA's head.

    Prints the new offset. If nothing changed, no record is written and the
    head stays where it was. The record is durable when the command returns.
    Changed rows holding NaN or infinity are refused (exit 11, nothing
    written) unless --allow-nonfinite.
    """
    from ..checkpoint import read_checkpoint, read_checkpoint_metadata
    from ..replica import Replica
    from .interrupts import say_where_an_interrupt_left

    out = Output(as_json, quiet)
    tensors = read_checkpoint(checkpoint, recursive=recursive)
    metadata = read_checkpoint_metadata(checkpoint)
    r = Replica.open(replica)
    try:
        before = r.head
        with say_where_an_interrupt_left(r, before, "record"), out.progress(f"commit {checkpoint}") as update:
            offset = r.commit_checkpoint(tensors, metadata, wait=wait, message=message,
                                         allow_nonfinite=allow_nonfinite, progress=update)
        summary = next(r.iter_summaries(since=offset - 1)) if offset != before else None
    finally:
        r.close(flush=False)  # return once the record is durable; the rows' fsync follows the WAL schedule
    data = {
        "offset": offset,
        "previous_offset": before,
        "changed": summary is not None,
        "rows": summary.rows if summary else 0,
        "bytes": summary.nbytes if summary else 0,
        "significance": summary.significance if summary else 0.0,
        "tensors": summary.tensors if summary else [],
    }

    def render(c):
        if summary is None:
            c.print(f"no changes: {replica} stays at offset {offset}")
        else:
            c.print(f"committed offset {offset}: {summary.rows:,} rows in {len(summary.tensors)} tensors, "
                    f"{human_bytes(summary.nbytes)} logged, significance {summary.significance:.4g}")

    out.result(data, render)


command.quick_exit = True  # no cyclic GC, no teardown at exit (cli.quick_exit)
