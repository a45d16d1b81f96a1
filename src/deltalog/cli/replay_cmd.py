"""deltalog replay: rebuild the model at an offset from a snapshot plus the log."""

from __future__ import annotations

import click

from .console import Output, human_bytes, json_option, quiet_option, wait_option
from .params import OffsetParam


@click.command("replay")
@click.argument("replica", type=click.Path(file_okay=False, readable=False))  # unreadable: exit 12, not 2
@click.option("--to", "to", type=OffsetParam(), default=None, metavar="OFFSET",
              help="The offset to rebuild: N, or head~N / -N for the N-th retained offset before the head "
                   "(default: the head).")
@click.option("--out", "out", type=click.Path(), default=None, metavar="CHECKPOINT",
              help="Write the model to a new .npz, .safetensors or npy directory (a path ending in '/').")
@click.option("--in-place", is_flag=True,
              help="Rebuild REPLICA's own tensor files at the head (repairs damaged files).")
@click.option("--force", "-f", is_flag=True,
              help="With --out: replace an existing .npz or .safetensors file (a directory of .npy files "
                   "is written only into an empty one).")
@wait_option
@json_option
@quiet_option
def command(replica, to, out, in_place, force, wait, as_json, quiet):
    """Rebuild the model at OFFSET from the nearest snapshot and the log.

    The live tensor files are never read. With --out, the model is written
    as a checkpoint (atomically: never a partial file under its name; needs
    free space about the model's size beside it). With --in-place, the
    replica's tensor files are rebuilt at the head under the writer lock and
    each damaged one is replaced (temporary file, fsync, rename); afterwards
    'deltalog verify' passes. Processes holding the replica open must
    reopen it to see replaced files.
    """
    if (out is None) == (not in_place):
        raise click.UsageError("give exactly one of --out CHECKPOINT or --in-place")
    from ..history import resolve_offset
    from ..replay import repair_in_place, replay_to_checkpoint
    from ..replica import Replica

    output = Output(as_json, quiet)
    with Replica.open(replica) as r, output.progress("replaying") as update:
        to = None if to is None else resolve_offset(r, to)
        if in_place:
            result = repair_in_place(r, offset=to, wait=wait, progress=update)
        else:
            result = replay_to_checkpoint(r, out, offset=to, progress=update, force=force)

    def render(c):
        base = ", ".join(map(str, result.snapshots_used)) or "-"
        if in_place:
            if result.repaired:
                c.print(f"repaired {len(result.repaired)} of {result.tensors_checked} tensor files at offset {result.offset} "
                        f"(snapshot {base} + {result.records_applied} records): {', '.join(result.repaired)}")
            else:
                c.print(f"all {result.tensors_checked} tensor files already match offset {result.offset}: nothing replaced")
            if result.manifests_rewritten:
                c.print(f"wrote manifest.json again from the log for snapshot(s) "
                        f"{', '.join(map(str, result.manifests_rewritten))}")
        else:
            c.print(f"wrote {out} ({result.format}, {result.tensors} tensors, {human_bytes(result.bytes)}): "
                    f"offset {result.offset} from snapshot {base} + {result.records_applied} records")

    output.result(result.to_json(), render)
