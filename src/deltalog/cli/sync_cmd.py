"""deltalog sync: bring DST up to SRC's head, moving only the rows that changed."""

from __future__ import annotations

import os
import re

import click

from .console import Output, human_bytes, json_option, quiet_option, table, wait_option

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)


class ByteSize(click.ParamType):
    """A byte count: 1000, 64K, 16M, 1.5G (powers of 1024)."""

    name = "BYTES"

    def convert(self, value, param, ctx):
        if isinstance(value, int):
            return value
        m = _SIZE.match(str(value))
        if not m:
            self.fail(f"{value!r} is not a size such as 1000, 64K, 16M or 2G", param, ctx)
        scale = 1024 ** " kmgt".index(m.group(2).lower() or " ")
        n = int(float(m.group(1)) * scale)
        if n < 1:
            self.fail("must be at least 1 byte", param, ctx)
        return n


def _name(text: str) -> str:
    """How a location is recorded as a follower's source: local paths made absolute."""
    from ..transport import parse_spec

    spec = parse_spec(text)
    return os.path.abspath(text) if spec.scheme == "local" else text


@click.command("sync")
@click.argument("src")
@click.argument("dst")
@click.option("--max-bytes", type=ByteSize(), metavar="BYTES",
              help="Send about this much now (e.g. 64M), most significant buckets first; the rest on the next "
                   "run. Exit 1 while incomplete.")
@click.option("--deadline", type=click.FloatRange(min=0), metavar="SECONDS",
              help="Stop sending new chunks after this long; the rest on the next run. Exit 1 while incomplete.")
@click.option("--dry-run", "-n", is_flag=True, help="Show what would move (rows, bytes, per tensor); write nothing.")
@click.option("--ssh-command", "-e", default="ssh", show_default=True, envvar="DELTALOG_SSH", metavar="CMD",
              help="How to run ssh for host:path locations, e.g. 'ssh -p 2222 -i key' (like rsync -e).")
@click.option("--remote-deltalog", default="deltalog", show_default=True, envvar="DELTALOG_REMOTE", metavar="PATH",
              help="The deltalog command on the remote host (like rsync --rsync-path).")
@click.option("--timeout", type=click.FloatRange(min=0.1), metavar="SECONDS",
              help="Give up when the peer sends nothing for this long (exit 8).")
@click.option("--token-file", type=click.Path(dir_okay=False, exists=True),
              help="File with the bearer token of an http(s) source (else $DELTALOG_TOKEN).")
@click.option("--chunk-bytes", type=ByteSize(), default=None, hidden=True,
              help="Uncompressed row bytes per chunk (tuning and tests).")
@wait_option
@json_option
@quiet_option
def command(src, dst, max_bytes, deadline, dry_run, ssh_command, remote_deltalog, timeout, token_file, chunk_bytes,
            wait, as_json, quiet):
    """Bring DST up to SRC's head by moving only the rows that changed.

    \b
    SRC and DST are each a local path, [user@]host:path (over ssh, which
    runs 'deltalog serve --stdio PATH' there) or, for SRC only,
    http(s)://host:port (a 'deltalog serve-snapshot' server). DST may be
    a follower of SRC, SRC a follower of another replica (any replica
    ahead can feed another). A missing or empty DST, or one older than
    what SRC keeps, first gets SRC's newest snapshot.

    Each chunk is applied atomically and durably: a sync killed at any
    moment leaves DST valid, and the next run resumes without resending
    what arrived. Under --max-bytes/--deadline the most significant
    buckets go first; 'status' then shows pending_buckets and the head
    stays the last complete offset. Exit 0 when DST reached SRC's head,
    1 when a budget stopped it first.
    """
    from ..errors import InvalidInput
    from ..sync import sync
    from ..transport import TransportOptions, open_sink, open_source, parse_spec

    out = Output(as_json, quiet)
    s_spec, d_spec = parse_spec(src), parse_spec(dst)
    if s_spec.scheme == d_spec.scheme == "local" and os.path.realpath(src) == os.path.realpath(dst):
        raise InvalidInput(f"{src}: SRC and DST are the same replica")
    token = None
    if token_file:
        with open(token_file) as f:
            token = f.read().strip()
    options = TransportOptions(ssh_command=ssh_command, remote_deltalog=remote_deltalog, timeout=timeout, token=token)
    source = open_source(src, options)
    try:
        sink = open_sink(dst, options)
        try:
            extra = {"chunk_bytes": chunk_bytes} if chunk_bytes else {}
            with out.progress(f"sync {src} -> {dst}") as update:
                result = sync(source, sink, source_name=_name(src), destination_name=_name(dst),
                              max_bytes=max_bytes, deadline=deadline, dry_run=dry_run, wait=wait,
                              progress=update if out.interactive else None, **extra)
        finally:
            sink.close()
    finally:
        source.close()
    data = result.to_json()
    out.result(data, lambda c: _render(c, result, src, dst))
    return 0 if result.complete or dry_run else 1


def _render(c, r, src: str, dst: str) -> None:
    if r.dry_run:
        plan = r.plan or {}
        if r.snapshot_offset is not None:
            c.print(f"would copy snapshot {r.snapshot_offset} of {src} ({human_bytes(r.snapshot_bytes)}) to {dst}")
        elif r.complete:
            c.print(f"nothing to do: {dst} is at offset {r.head}, {src} at {r.to_offset}")
            return
        c.print(f"would sync offset {plan.get('since')} -> {r.to_offset}: {plan.get('rows', 0):,} rows, "
                f"about {human_bytes(plan.get('bytes', 0))} before compression")
        t = table("tensor", "rows", "buckets", "bytes")
        for info in plan.get("tensors", []):
            t.add_row(info["name"], f"{info['rows']:,}", f"{info.get('buckets', '')}", human_bytes(info["bytes"]))
        if plan.get("tensors"):
            c.print(t)
        if r.note:
            c.print(r.note)
        return
    if r.note:
        c.print(r.note)
    start = "new replica" if r.from_offset is None else f"offset {r.from_offset}"
    moved = (f"{r.rows_sent:,} row{'s' * (r.rows_sent != 1)} in {r.chunks} chunk{'s' * (r.chunks != 1)}, "
             f"{human_bytes(r.bytes_sent)}")
    if r.snapshot_offset is not None:
        moved += f" (snapshot {r.snapshot_offset}: {human_bytes(r.snapshot_bytes)})"
    if r.complete and r.bytes_sent == 0 and r.from_offset == r.to_offset:
        c.print(f"{dst} is up to date at offset {r.head}")
    elif r.complete:
        c.print(f"synced {src} -> {dst}: {start} -> {r.head}, {moved}, {r.seconds:.2f} s")
    else:
        c.print(f"incomplete: {src} -> {dst} stopped by --{r.stopped_by} after {moved}; head stays {r.head}, "
                f"{r.pending_buckets:,} buckets pending of offset {r.to_offset}; run sync again to continue")
