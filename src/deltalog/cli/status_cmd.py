"""deltalog status: where a replica is and what it holds; or one line per replica of a fleet."""

from __future__ import annotations

import click

from .console import Output, human_bytes, json_option, table


@click.command("status")
@click.argument("replicas", metavar="REPLICA...", nargs=-1, required=True)
@click.option("--timeout", type=click.FloatRange(min=0), default=None, metavar="SECONDS",
              help="Seconds of silence before an ssh or http replica counts as unreachable.")
@json_option
@click.pass_context
def command(ctx, replicas, timeout, as_json):
    """Show REPLICA's head, model, retained offsets, snapshots and tensors.

    With two or more REPLICAs (local paths, host:path, http(s):// URLs of
    'deltalog serve-snapshot'), print one line per replica: model, head,
    state digest and lag behind the newest head of the same model. A replica
    that cannot be reached shows its error in its row and makes the exit
    code non-zero (the first failure's), while the others still print.
    """
    from ..transport import parse_spec

    if len(replicas) == 1 and parse_spec(replicas[0]).scheme == "local":
        _detailed(replicas[0], as_json)
        return None
    return _fleet(ctx, replicas, timeout, as_json)


def _detailed(replica, as_json):
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


def _probe(text: str, timeout: float | None) -> dict:
    """One row of the fleet table (without lag_offsets), or raise the replica's DeltalogError."""
    from ..transport import TransportOptions, open_source, parse_spec

    row = {"location": text, "model_id": None, "head": None, "state_digest": None,
           "lag_offsets": None, "lag_seconds": None, "error": None}
    if parse_spec(text).scheme == "local":
        from ..replica import Replica

        with Replica.open(text) as r:
            status = r.status()
        row.update(model_id=status["model_id"], head=status["head"], state_digest=status["state_digest"],
                   lag_seconds=status.get("lag_seconds"))
        return row
    source = open_source(text, TransportOptions(timeout=timeout))
    try:
        hello = source.hello()
    finally:
        source.close()
    row.update(model_id=hello.get("model_id"), head=hello.get("head"), state_digest=hello.get("state_digest"))
    return row


def _fleet(ctx, replicas, timeout, as_json):
    from ..errors import DeltalogError

    out = Output(as_json)
    rows, code = [], 0
    for text in replicas:
        try:
            row = _probe(text, timeout)
        except DeltalogError as exc:
            row = {"location": text, "model_id": None, "head": None, "state_digest": None,
                   "lag_offsets": None, "lag_seconds": None, "error": exc.one_line()}
            code = code or exc.exit_code
        rows.append(row)
    newest: dict = {}
    for row in rows:
        if row["error"] is None and row["head"] is not None:
            newest[row["model_id"]] = max(newest.get(row["model_id"], row["head"]), row["head"])
    for row in rows:
        if row["error"] is None and row["head"] is not None:
            row["lag_offsets"] = newest[row["model_id"]] - row["head"]

    def render(c):
        width = max(len(row["location"]) for row in rows)
        c.print(f"{'replica':<{width}}  {'model':<12}  {'head':>8}  {'digest':<16}  {'lag':>6}  lag s", markup=False)
        for row in rows:
            if row["error"]:
                c.print(f"{row['location']:<{width}}  error: {row['error']}", markup=False)
                continue
            model = str(row["model_id"])
            model = model if len(model) <= 12 else model[:11] + "~"
            lag = row["lag_seconds"]
            c.print(f"{row['location']:<{width}}  {model:<12}  {row['head']:>8}  {str(row['state_digest']):<16}  "
                    f"{row['lag_offsets']:>6}  {'-' if lag is None else f'{lag:.1f}'}", markup=False)

    out.result(rows, render)
    return code
