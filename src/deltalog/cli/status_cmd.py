"""deltalog status: where a replica is and what it holds; or one line per replica of a fleet."""

from __future__ import annotations

import click

from .console import Output, counted, human_bytes, json_option, partial_sync_words, table
from .params import Seconds, peer_options, transport_options


@click.command("status")
@click.argument("replicas", metavar="REPLICA...", nargs=-1, required=True)
@click.option("--timeout", type=Seconds(min=0), default=None, metavar="SECONDS",
              help="Seconds of silence before an ssh or http replica counts as unreachable.")
@peer_options
@json_option
@click.pass_context
def command(ctx, replicas, timeout, ssh_command, remote_deltalog, token_file, as_json):
    """Show REPLICA's head, model, retained offsets, snapshots and tensors.

    With two or more REPLICAs (local paths, host:path, http(s):// URLs of
    'deltalog serve-snapshot', relay URLs such as s3://bucket/prefix), print
    one line per replica: model, head, state digest and lag behind the newest
    head of the same model, in offsets and in seconds (how much older the
    model's writer made this replica's head than the newest one). A replica
    that cannot be reached shows its error in its row and makes the exit
    code non-zero (the first failure's), while the others still print.
    """
    from ..transport import parse_spec

    if len(replicas) == 1 and parse_spec(replicas[0]).scheme == "local":
        _detailed(replicas[0], as_json)
        return None
    return _fleet(ctx, replicas, transport_options(timeout, ssh_command, remote_deltalog, token_file), as_json)


command.quick_exit = True  # no cyclic GC, no teardown at exit (cli.quick_exit)


def _detailed(replica, as_json):
    from ..lag import refresh
    from ..replica import Replica

    out = Output(as_json)
    with Replica.open(replica) as r:
        status = r.status()
    refresh(status)

    def render(c):
        c.print(f"replica    {status['path']}")
        c.print(f"model id   {status['model_id']}")
        c.print(f"head       {status['head']}" + (f"  ({status['pending_apply']} records not yet applied)" if status["pending_apply"] else ""))
        c.print(f"retained   offsets {status['oldest_offset']}..{status['head']}; snapshots at {status['snapshots']}")
        c.print(f"log        {human_bytes(status['log_bytes'])}, format v{status['format_version']}, {status['bucket_rows']} rows per bucket")
        if status.get("source"):
            c.print(f"follows    {status['source']}: {_lag_line(status)}")
        if status.get("pending_buckets"):
            c.print(f"partial    {partial_sync_words(status['pending_buckets'], status.get('pending_target'))}; "
                    f"run 'deltalog sync' again to finish")
        t = table("tensor", "dtype", "shape", "rows", "buckets", "bytes")
        for info in status["tensors"]:
            t.add_row(info["name"], info["dtype"], "x".join(map(str, info["shape"])) or "scalar",
                      f"{info['rows']:,}", f"{info['buckets']:,}", human_bytes(info["bytes"]))
        c.print(t)

    out.result(status, render)


def _lag_line(status: dict) -> str:
    """A follower's lag, saying whether it was read from the source now or is what the last sync saw."""
    import time

    n, lag, head = status.get("lag_offsets", 0), status.get("lag_seconds"), status.get("source_head")
    behind = f"{counted(n, 'offset')} behind"
    if status.get("lag_live"):
        if n == 0:
            return f"up to date (source head {head}, read now)"
        return f"{behind} (source head {head}, read now)" + ("" if lag is None else f", for {lag:.1f} s")
    as_of = status.get("lag_as_of")
    ago = "" if as_of is None else f" {max(0.0, time.time() - as_of):.1f} s ago"
    why = status.get("lag_note") or "the source is not asked from here"
    return (f"{behind} as of the last sync{ago} (source head then {head}; {why})"
            + ("" if lag is None else f"; last at the source's head {lag:.1f} s ago"))


_ROW = ("location", "model_id", "head", "state_digest", "head_time", "head_time_unknown", "lag_offsets", "lag_seconds",
        "error")


def _probe(text: str, options) -> dict:
    """One row of the fleet table (without the lags), or raise the replica's DeltalogError."""
    from ..transport import open_source, parse_spec

    row = dict.fromkeys(_ROW)
    row["location"] = text
    if parse_spec(text).scheme == "local":
        from .. import lineage
        from ..history import head_time, head_time_unknown
        from ..replica import Replica

        with Replica.open(text) as r:
            state = r.state  # one read: the head and its digest belong together
            row.update(model_id=r.model_id, head=state.head, state_digest=lineage.to_hex(state.digest),
                       head_time=head_time(r, state.head))
        if row["head_time"] is None:
            row["head_time_unknown"] = head_time_unknown(state.head)
        return row
    source = open_source(text, options)
    try:
        hello = source.hello()
    finally:
        source.close()
    row.update(model_id=hello.get("model_id"), head=hello.get("head"), state_digest=hello.get("state_digest"),
               head_time=hello.get("head_time"))
    if row["head_time"] is None:
        row["head_time_unknown"] = ("it does not say when its head was made (an older deltalog, or a snapshot "
                                    "written before snapshot manifests kept that time)")
    return row


def fleet_lags(rows: list[dict]) -> None:
    """Fill each reachable row's lag behind the newest head of its model: in offsets, and in seconds
    between the times the model's writer made the two heads (None when either time is unknown)."""
    newest: dict = {}
    for row in rows:
        if row["error"] is None and row["head"] is not None:
            best = newest.get(row["model_id"])
            if best is None or row["head"] > best["head"]:
                newest[row["model_id"]] = row
    for row in rows:
        if row["error"] is None and row["head"] is not None:
            top = newest[row["model_id"]]
            row["lag_offsets"] = top["head"] - row["head"]
            if row["lag_offsets"] == 0:
                row["lag_seconds"] = 0.0
            elif top["head_time"] is not None and row["head_time"] is not None:
                row["lag_seconds"] = round(max(0.0, top["head_time"] - row["head_time"]), 3)


def _fleet(ctx, replicas, options, as_json):
    from ..errors import DeltalogError

    out = Output(as_json)
    rows, code = [], 0
    for text in replicas:
        try:
            row = _probe(text, options)
        except DeltalogError as exc:
            row = dict.fromkeys(_ROW)
            row.update(location=text, error=exc.one_line())
            code = code or exc.exit_code
        rows.append(row)
    fleet_lags(rows)

    def render(c):
        width = max(len("replica"), *(len(row["location"]) for row in rows))
        c.print(f"{'replica':<{width}}  {'model':<12}  {'head':>8}  {'digest':<16}  {'lag':>6}  lag s", markup=False)
        for row in rows:
            if row["error"]:
                c.print(f"{row['location']:<{width}}  error: {row['error']}", markup=False)
                continue
            model = str(row["model_id"])
            model = model if len(model) <= 12 else model[:11] + "~"
            lag = row["lag_seconds"]
            c.print(f"{row['location']:<{width}}  {model:<12}  {row['head']:>8}  {str(row['state_digest']):<16}  "
                    f"{row['lag_offsets']:>6}  {'?' if lag is None else f'{lag:.1f}'}", markup=False)
        for row in rows:  # why a lag in seconds is missing, rather than a bare "?"
            if row["error"] is None and row["lag_seconds"] is None and row["head_time_unknown"]:
                c.print(f"{row['location']}: lag in seconds unknown: {row['head_time_unknown']}", markup=False)

    out.result(rows, render)
    return code
