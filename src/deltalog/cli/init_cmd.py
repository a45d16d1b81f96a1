"""deltalog init: create a replica from a checkpoint."""

from __future__ import annotations

import click

from .console import Output, human_bytes, json_option, quiet_option, recursive_option


@click.command("init")
@click.argument("replica", type=click.Path(file_okay=False, readable=False))  # unreadable: exit 12, not 2
@click.option("--from", "checkpoint", required=True, type=click.Path(exists=True),
              help="Checkpoint: a .npz, a .safetensors file, or a directory of .npy files.")
@click.option("--bucket-rows", type=click.IntRange(min=1), default=1024, show_default=True,
              help="Rows per bucket: the unit whose version replicas compare.")
@click.option("--model-id", help="Identity of the model (default: the checkpoint's deltalog.model_id metadata, "
                                 "else a new random id). Replicas refuse deltas of another model.")
@click.option("--allow-nonfinite", is_flag=True,
              help="Start from a model holding NaN or infinity (refused by default, as commit refuses such rows).")
@recursive_option
@json_option
@quiet_option
def command(replica, checkpoint, bucket_rows, model_id, allow_nonfinite, recursive, as_json, quiet):
    """Create REPLICA (a new directory) holding the tensors of CHECKPOINT at offset 0.

    Writes the tensor files, an immutable snapshot at offset 0 and an empty
    log. The directory appears only when complete. A model holding NaN or
    infinity is refused (exit 11, nothing created) unless --allow-nonfinite.
    """
    from ..checkpoint import read_checkpoint, read_checkpoint_metadata
    from ..replica import Replica

    if model_id is not None and not model_id.strip():
        raise click.BadParameter("must not be empty (leave it out for a new random id)", param_hint="'--model-id'")
    out = Output(as_json, quiet)
    with out.working(f"reading {checkpoint}"):
        tensors = read_checkpoint(checkpoint, recursive=recursive)
        model_id = model_id or read_checkpoint_metadata(checkpoint).get("deltalog.model_id")
    with out.working(f"writing {replica}"), Replica.init(
            replica, tensors, bucket_rows=bucket_rows, model_id=model_id, allow_nonfinite=allow_nonfinite) as r:
        status = r.status()
    total = sum(t["bytes"] for t in status["tensors"])
    data = {
        "path": status["path"],
        "model_id": status["model_id"],
        "head": status["head"],
        "tensors": len(status["tensors"]),
        "bytes": total,
        "bucket_rows": status["bucket_rows"],
    }
    out.result(data, lambda c: c.print(
        f"initialised {replica}: {len(status['tensors'])} tensors, {human_bytes(total)}, "
        f"model id {status['model_id']}, head 0"))
