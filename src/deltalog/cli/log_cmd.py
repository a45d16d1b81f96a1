"""deltalog log: the records of a replica's log, oldest first."""

from __future__ import annotations

import click

from .console import Output, human_bytes, json_option, table


@click.command("log")
@click.argument("replica", type=click.Path(file_okay=False))
@click.option("--since", type=click.IntRange(min=0), default=None, metavar="OFFSET",
              help="Only records after OFFSET.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="At most this many records (the newest).")
@json_option
def command(replica, since, limit, as_json):
    """List REPLICA's records: offset, time, kind, rows, bytes, significance, reason."""
    import collections
    import datetime

    from ..replica import Replica

    out = Output(as_json)
    with Replica.open(replica) as r:
        summaries = r.iter_summaries(since=-1 if since is None else since)
        kept = list(collections.deque(summaries, maxlen=limit) if limit else summaries)
    records = [
        {"offset": s.offset, "base": s.base, "time": s.time, "kind": s.kind, "rows": s.rows, "bytes": s.nbytes,
         "significance": s.significance, "reason": s.reason, "target": s.target, "tensors": s.tensors}
        for s in kept
    ]

    def render(c):
        if not records:
            c.print("no records" + (f" after offset {since}" if since is not None else ""))
            return
        t = table("offset", "time (UTC)", "kind", "rows", "bytes", "significance", "target", "reason")
        for rec in records:
            when = datetime.datetime.fromtimestamp(rec["time"], datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
            t.add_row(str(rec["offset"]), when, rec["kind"], f"{rec['rows']:,}", human_bytes(rec["bytes"]),
                      f"{rec['significance']:.4g}", "" if rec["target"] is None else str(rec["target"]), rec["reason"] or "")
        c.print(t)

    out.result({"records": records}, render)
