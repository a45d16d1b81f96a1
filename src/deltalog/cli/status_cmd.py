"""deltalog status: where a replica is and what it holds."""

from __future__ import annotations

import click

from .console import Output, human_bytes, json_option, table


@click.command("status")
@click.argument("replica", type=click.Path(file_okay=False))
@json_option
def command(replica, as_json):
    """Show REPLICA's head, model, retained offsets, snapshots and tensors."""
    from ..replica import Replica

    out = Output(as_json)
    with Replica.open(replica) as r:
        status = r.status()

    def render(c):
        c.print(f"replica    {status['path']}")
        c.print(f"model id   {status['model_id']}")
        c.print(f"head       {status['head']}" + (f"  ({status['pending_apply']} records not yet applied)" if status["pending_apply"] else ""))
        c.print(f"retained   offsets {status['oldest_offset']}..{status['head']}; snapshots at {status['snapshots']}")
        c.print(f"log        {human_bytes(status['log_bytes'])}, format v{status['format_version']}, {status['bucket_rows']} rows per bucket")
        if status.get("source"):
            lag = status.get("lag_seconds")
            c.print(f"follows    {status['source']} (source head {status.get('source_head')}): "
                    f"{status.get('lag_offsets', 0)} offsets behind"
                    + ("" if lag is None else f", last level {lag:.1f} s ago"))
        if status.get("pending_buckets"):
            c.print(f"partial    sync to offset {status.get('pending_target')} in progress: "
                    f"{status['pending_buckets']} buckets already applied; run 'deltalog sync' again to finish")
        t = table("tensor", "dtype", "shape", "rows", "buckets", "bytes")
        for info in status["tensors"]:
            t.add_row(info["name"], info["dtype"], "x".join(map(str, info["shape"])) or "scalar",
                      f"{info['rows']:,}", f"{info['buckets']:,}", human_bytes(info["bytes"]))
        c.print(t)

    out.result(status, render)
