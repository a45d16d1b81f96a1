"""deltalog log: the records of a replica's log, oldest first."""

from __future__ import annotations

import click

from .console import Output, human_bytes, json_option, shown, table
from .params import SinceParam


@click.command("log")
@click.argument("replica", type=click.Path(file_okay=False, readable=False))  # unreadable: exit 12, not 2
@click.option("--since", type=SinceParam(), default=None, metavar="OFFSET|DURATION",
              help="Only records after OFFSET (N, head~N or -N), or written in the last DURATION (90m, 2h, 7d).")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="At most this many records (the newest).")
@click.option("--stored", is_flag=True,
              help="List the records as this replica stores them: a sync record as one line, not as the "
                   "source records it brought.")
@json_option
def command(replica, since, limit, stored, as_json):
    """List REPLICA's records: offset, time, kind, rows, bytes, significance, reason.

    \b
    On a follower, a sync record is listed as the records of the model's
    writer it brought (kind commit or rollback, with the rollback's target
    and reason), however many hops away; "via" names the local sync record,
    and only its own offset is retained here. --stored shows the sync
    records themselves. JSON: {"records": [{offset, base, time, kind, rows,
    bytes, significance, reason, target, tensors, post_digest, synced_in,
    retained}]} (base, bytes and tensors are null for records known only
    from a sync record's history).
    """
    import datetime
    import time

    from ..history import log_entries, resolve_offset
    from ..replica import Replica

    out = Output(as_json)
    with Replica.open(replica) as r:
        after = resolve_offset(r, since[1]) if since is not None and since[0] == "offset" else -1
        records = log_entries(r, since=after, stored=stored)
        oldest = r.oldest_offset
    # Asked from before what compaction kept: say that the list starts later than asked.
    missing = (f"records up to offset {oldest} are not kept here (compacted, or before the snapshot it "
               f"started from)") if 0 <= after < oldest else None
    if since is not None and since[0] == "age":
        cutoff = time.time() - since[1]
        records = [e for e in records if e["time"] >= cutoff]
    if limit:
        records = records[-limit:]

    def render(c):
        if missing:
            c.print(f"[yellow]{missing}[/yellow]")
        if not records:
            c.print("no records" + (f" since {since[1]}" if since is not None and since[0] == "offset" else ""))
            return
        t = table("offset", "time (UTC)", "kind", "rows", "bytes", "significance", "target", "by", "reason", "via")
        for rec in records:
            when = datetime.datetime.fromtimestamp(rec["time"], datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
            by = shown(f"{rec['user']}@{rec['host']}") if rec["user"] else ""
            t.add_row(str(rec["offset"]), when, rec["kind"], f"{rec['rows']:,}",
                      "" if rec["bytes"] is None else human_bytes(rec["bytes"]), f"{rec['significance']:.4g}",
                      "" if rec["target"] is None else str(rec["target"]), by, shown(rec["reason"] or ""),
                      "" if rec["synced_in"] is None else f"sync {rec['synced_in']}")
        c.print(t)

    out.result({"records": records}, render)


command.quick_exit = True  # no cyclic GC, no teardown at exit (cli.quick_exit)
