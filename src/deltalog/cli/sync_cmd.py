"""deltalog sync: bring DST up to SRC's head, moving only the rows that changed."""

from __future__ import annotations

import os
import re
import time

import click

from .console import Output, counted, human_bytes, json_option, partial_sync_words, quiet_option, table, wait_option
from .params import Seconds, peer_options, transport_options

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
@click.option("--deadline", type=Seconds(min=0), metavar="SECONDS",
              help="Start no new chunk once this many seconds have passed since the command started "
                   "(connecting to SRC included; a chunk in flight finishes). Even the first chunk waits for "
                   "none: a deadline too short for it moves nothing. The rest on the next run. Exit 1 while "
                   "incomplete. With --follow, per round.")
@click.option("--dry-run", "-n", is_flag=True, help="Show what would move (rows, bytes, per tensor); write nothing.")
@peer_options
@click.option("--timeout", type=Seconds(min=0.1), metavar="SECONDS",
              help="Give up when the peer sends nothing for this long (exit 8). Default: 600 for ssh "
                   "(which also sends keepalives: a dead network or host shows within about a minute), "
                   "60 for http.")
@click.option("--check", "check", metavar="CMD",
              help="After a complete sync, run CMD (a shell command; env DELTALOG_REPLICA, DELTALOG_HEAD, "
                   "DELTALOG_PREVIOUS_HEAD, DELTALOG_SOURCE). If it fails, DST goes back to where it was "
                   "(the sync is undone, not rolled back by a new record) and the exit code is 10. "
                   "Local DST only.")
@click.option("--follow", "-f", is_flag=True,
              help="Keep DST following SRC: sync, wait for SRC's head to move (a long-poll on SRC's side, "
                   "not a sleep), sync again, until SIGTERM or Ctrl-C (then exit 0 with DST exactly at a "
                   "head). A vanished SRC, a dropped connection or a held lock is retried with exponential "
                   "backoff (jittered, capped at 30 s or --interval) and the sync resumes where it stopped. "
                   "--max-bytes and --deadline then apply to each round.")
@click.option("--interval", type=Seconds(min=0.01), default=None, metavar="SECONDS",
              help="With --follow: the longest wait for SRC to move before an idle round that refreshes "
                   "DST's lag (status lag_seconds); also the polling period for a source that cannot "
                   "long-poll.  [default: 5]")
@click.option("--bwlimit", type=ByteSize(), metavar="BYTES_PER_S",
              help="Receive at most this many bytes per second on average (e.g. 10M), short transfers "
                   "included: the first bytes wait their turn too (a token bucket that starts empty, "
                   "shared by all rounds of --follow); most significant buckets still go first.")
@click.option("--stats", "-v", "stats", is_flag=True,
              help="After the summary, a line per tensor: rows and bytes sent, snapshot bytes, significance.")
@click.option("--reseed", is_flag=True,
              help="Replace DST by SRC's newest snapshot and the log after it, whatever DST held: the way "
                   "past a refusal for diverged histories (exit 13). DST's own records are dropped; copy "
                   "DST aside first if its history matters.")
@click.option("--chunk-bytes", type=ByteSize(), default=None, hidden=True,
              help="Uncompressed row bytes per chunk (tuning and tests).")
@wait_option
@json_option
@quiet_option
def command(src, dst, max_bytes, deadline, dry_run, ssh_command, remote_deltalog, timeout, token_file, check,
            follow, interval, bwlimit, stats, reseed, chunk_bytes, wait, as_json, quiet):
    """Bring DST up to SRC's head by moving only the rows that changed.

    \b
    SRC and DST are each a local path, [user@]host:path (over ssh, which
    runs 'deltalog serve --stdio PATH' there) or, for SRC only,
    http(s)://host:port (a 'deltalog serve-snapshot' server). DST may be
    a follower of SRC, SRC a follower of another replica (any replica
    ahead can feed another). A missing or empty DST, or one older than
    what SRC keeps, first gets SRC's newest snapshot.

    \b
    Object-store relays (s3://bucket/prefix, gs://, az://, file:///dir):
    'sync PRIMARY s3://...' publishes (a conditional write advances the
    relay's head: a second publisher exits 9), 'sync s3://... DST' pulls,
    read-only. Credentials: AWS_*, GOOGLE_*, AZURE_* environment variables.

    Each chunk is applied atomically and durably: a sync killed at any
    moment leaves DST valid, and the next run resumes without resending
    what arrived. Under --max-bytes/--deadline the most significant
    buckets go first; 'status' then shows pending_buckets and the head
    stays the last complete offset. Exit 0 when DST reached SRC's head,
    1 when a budget stopped it first.

    \b
    Exactness: replicas keep a state digest of their model at every offset.
    A DST that holds another model than SRC at an offset they share (a
    stray commit on a follower, a primary restored from an old state after
    a failover) is refused with exit 13, naming the offset and both
    digests; nothing is written. --reseed replaces DST with SRC's history.

    \b
    With --follow, one line per round on stderr (none with --quiet), or
    with --json one JSON object per line on stdout: "event": "sync" with
    the sync fields plus round, lag_offsets, lag_seconds and waited;
    "event": "retry" with error and retry_in; a last "event": "stopped".
    DST can itself be served (serve-snapshot) and followed: a tree of
    followers, each a hop that adds milliseconds.
    """
    started = time.monotonic()  # --deadline counts from here: connecting to SRC is part of the run
    from ..errors import InvalidInput
    from ..transport import open_sink, open_source, parse_spec

    out = Output(as_json, quiet)
    s_spec, d_spec = parse_spec(src), parse_spec(dst)
    if s_spec.scheme == d_spec.scheme == "local" and os.path.realpath(src) == os.path.realpath(dst):
        raise InvalidInput(f"{src}: SRC and DST are the same replica")
    if check and d_spec.scheme != "local":
        raise InvalidInput("--check needs a local DST", hint="run the guarded sync on the destination host")
    if follow and (dry_run or check or reseed):
        other = "--dry-run" if dry_run else "--check" if check else "--reseed"
        raise click.UsageError(f"--follow cannot be combined with {other}")
    if interval is not None and not follow:
        raise click.UsageError("--interval needs --follow")
    options = transport_options(timeout, ssh_command, remote_deltalog, token_file)
    from ..transport import RELAY_SCHEMES

    if d_spec.scheme in RELAY_SCHEMES:
        if s_spec.scheme != "local":
            raise InvalidInput(f"{dst}: a relay is published from a local replica",
                               hint="run the publishing sync on the primary's host")
        if max_bytes or deadline or check or reseed or dry_run or bwlimit:
            raise click.UsageError("publishing to a relay takes only --follow/--interval")
        return _publish(src, dst, out, follow=follow, interval=interval)
    if follow:
        return _follow(src, dst, options, out, interval=interval, max_bytes=max_bytes, deadline=deadline,
                       bwlimit=bwlimit, wait=wait, chunk_bytes=chunk_bytes)
    # A push opens its ssh end first: the handshake and the far deltalog's start (~0.4 s) go on while
    # this side loads the engine and opens SRC (a pull's ssh end is SRC: first anyway).
    sink = open_sink(dst, options) if d_spec.scheme == "ssh" else None
    try:
        source = open_source(src, options)
    except BaseException:
        if sink is not None:
            sink.close()
        raise
    from ..sync import sync

    try:
        if sink is None:
            sink = open_sink(dst, options)
        if check:
            from ..guard import GuardedSink

            sink = GuardedSink(sink, check, _name(src))
        try:
            extra = {"chunk_bytes": chunk_bytes} if chunk_bytes else {}
            if bwlimit:
                from ..follow import TokenBucket, chunk_bytes_for, piece_bytes_for
                from ..transport.base import DEFAULT_CHUNK_BYTES

                extra["chunk_bytes"] = chunk_bytes_for(bwlimit, chunk_bytes or DEFAULT_CHUNK_BYTES)
                bucket = TokenBucket(bwlimit, until=None if deadline is None else started + deadline)
                extra.update(throttle=bucket.take, piece_bytes=piece_bytes_for(bwlimit))
            with out.progress(f"sync {src} -> {dst}") as update:
                result = sync(source, sink, source_name=_name(src), destination_name=_name(dst),
                              max_bytes=max_bytes, deadline=deadline, dry_run=dry_run, wait=wait, reseed=reseed,
                              progress=update if out.interactive else None, started=started, **extra)
            verdict = _run_check(sink, result, check, _name(src)) if check and not dry_run else None
        finally:
            sink.close()
    finally:
        source.close()
    if verdict is not None and verdict.get("removed"):
        import shutil

        shutil.rmtree(dst)  # a replica this run created, rejected by the check: as it was, i.e. absent
    data = result.to_json()
    if verdict is not None:
        data["check"] = verdict
    rejected = verdict is not None and not verdict["accepted"]
    out.result(data, None if rejected else (lambda c: _render(c, result, src, dst, stats)))  # a rejection: the error says all
    if verdict is not None and not verdict["accepted"]:
        back = "removed the new replica" if verdict.get("removed") else f"went back to offset {verdict['reverted_to']}"
        click.echo(f"deltalog: error: --check rejected offset {verdict['offset']} (exit {verdict['exit_code']}): "
                   f"{dst} {back}", err=True)
        return 10
    return 0 if result.complete or dry_run else 1


def _publish(src: str, dst: str, out: Output, *, follow: bool, interval: float | None) -> int:
    """sync PRIMARY s3://...: advance the relay to the primary's head (and again at each commit with --follow)."""
    import json
    import sys

    from ..objstore import ObjectStore
    from ..relay import publish
    from ..replica import Replica

    store = ObjectStore(dst)
    with Replica.open(src) as replica:
        if not follow:
            result = publish(replica, store, _name(src))
            out.result(result.to_json(), lambda c: c.print(_publish_line(result)))
            return 0
        from ..follow import DEFAULT_INTERVAL, Stopper, StopRequested
        from ..sync import source_wait

        stopper = Stopper()
        wait = DEFAULT_INTERVAL if interval is None else interval
        with stopper.installed():
            head, publishes = None, 0
            while not stopper.requested:
                result = publish(replica, store, _name(src))
                publishes += 1
                if result.segments or head is None:
                    event = {"event": "publish", **result.to_json()}
                    if out.as_json:
                        sys.stdout.write(json.dumps(event) + "\n")
                        sys.stdout.flush()
                    elif not out.quiet:
                        click.echo(_publish_line(result), err=True)
                head = result.to_offset
                try:
                    with stopper.interruptible():
                        source_wait(replica, head, wait)  # the local head, re-read every few ms
                except StopRequested:
                    break
        if out.as_json:  # the last line, as a pulling --follow ends
            import signal

            sys.stdout.write(json.dumps({"event": "stopped", "rounds": publishes, "head": head,
                                         "signal": signal.Signals(stopper.signal).name if stopper.signal else None})
                             + "\n")
            sys.stdout.flush()
    return 0


def _publish_line(r) -> str:
    if r.note:
        return r.note
    if not r.segments and r.snapshot_offset is None:
        return f"{r.relay} is up to date at offset {r.to_offset}"
    start = "new relay" if r.from_offset is None else f"offset {r.from_offset}"
    snap = f", snapshot {r.snapshot_offset}" if r.snapshot_offset is not None else ""
    return (f"published {r.source} -> {r.relay}: {start} -> {r.to_offset}, {r.rows:,} rows in "
            f"{counted(r.segments, 'segment')}{snap}, {human_bytes(r.bytes_uploaded)} uploaded, {r.seconds:.2f} s")


def _follow(src: str, dst: str, options, out: Output, *, interval, max_bytes, deadline, bwlimit, wait,
            chunk_bytes) -> int:
    """sync --follow: rounds until SIGTERM/SIGINT; one JSON line or one stderr line per round."""
    import json
    import sys

    from ..follow import DEFAULT_INTERVAL, Stopper, follow
    from ..transport import open_sink, open_source

    def emit(event: dict) -> None:
        if out.as_json:
            sys.stdout.write(json.dumps(event) + "\n")
            sys.stdout.flush()
        elif not out.quiet:
            click.echo(_round_line(event, src, dst), err=True)

    stopper = Stopper()
    with stopper.installed():
        follow(src, dst, source_name=_name(src), destination_name=_name(dst),
               open_source=lambda text: open_source(text, options), open_sink=lambda text: open_sink(text, options),
               interval=DEFAULT_INTERVAL if interval is None else interval, max_bytes=max_bytes,
               deadline=deadline, bwlimit=bwlimit, wait=wait, chunk_bytes=chunk_bytes, on_event=emit,
               stopper=stopper)
    return 0


def _round_line(e: dict, src: str, dst: str) -> str:
    """One plain line per follow event (for logs: no colour, no table)."""
    kind = e["event"]
    if kind == "retry":
        err = e["error"]
        return (f"deltalog: {src} -> {dst}: {err['type']}: {err['message']}; "
                f"retrying in {e['retry_in']:.1f} s (attempt {e['attempt']})")
    if kind == "stopped":
        why = f" by {e['signal']}" if e.get("signal") else ""
        return f"deltalog: stopped{why} after {e['rounds']} rounds; {dst} at offset {e['head']}"
    lag = f"lag {e['lag_offsets']} offsets" + (f", {e['lag_seconds']:.3f} s" if e.get("lag_seconds") else "")
    if e["rows_sent"] == 0 and e["snapshot_offset"] is None and e["complete"]:
        return f"round {e['round']}: {dst} up to date at {e['head']} (waited {e['waited']:.2f} s)"
    moved = (f"{counted(e['rows_sent'], 'row')} in {counted(e['chunks'], 'chunk')}, {human_bytes(e['bytes_sent'])}"
             + (f" (snapshot {e['snapshot_offset']})" if e["snapshot_offset"] is not None else ""))
    state = "" if e["complete"] else f", stopped by {e['stopped_by']}{_partial(e['pending_buckets'], e['pending_target'])}"
    start = "new replica" if e["from_offset"] is None else e["from_offset"]
    return f"round {e['round']}: {start} -> {e['head']} of {e['to_offset']}, {moved}, {e['seconds']:.3f} s{state}; {lag}"


def _run_check(sink, result, check: str, source: str) -> dict | None:
    """Judge what this sync (or a crashed earlier one) applied; undo it if the check fails."""
    from ..guard import confirm, run_check, unconfirmed
    from ..receive import revert_sync

    replica = sink.replica
    marker = unconfirmed(replica) if replica is not None else None
    if marker is not None:
        code = run_check(check, replica.path, marker["target"], marker["base"], source)
        if code == 0:
            confirm(replica)
            return {"command": check, "offset": marker["target"], "exit_code": 0, "accepted": True}
        revert_sync(replica, marker)
        result.head = replica.head
        return {"command": check, "offset": marker["target"], "exit_code": code, "accepted": False,
                "reverted_to": marker["base"]}
    if result.created and result.complete and replica is not None:  # a new replica: nothing to go back to
        code = run_check(check, replica.path, replica.head, None, source)
        verdict = {"command": check, "offset": replica.head, "exit_code": code, "accepted": code == 0}
        if code != 0:
            verdict["removed"] = True
        return verdict
    return sink.outcome  # only a leftover unconfirmed sync was judged (or nothing moved)


def _render(c, r, src: str, dst: str, stats: bool = False) -> None:
    _summary(c, r, src, dst)
    if stats and r.tensors and not r.dry_run:
        t = table("tensor", "rows", "bytes", "snapshot bytes", "significance")
        for col in t.columns[1:]:
            col.justify = "right"
        for e in sorted(r.tensors, key=lambda e: -e["bytes"] - e["snapshot_bytes"]):
            t.add_row(e["name"], f"{e['rows']:,}", human_bytes(e["bytes"]), human_bytes(e["snapshot_bytes"]),
                      f"{e['significance']:.4g}")
        c.print(t)


def _summary(c, r, src: str, dst: str) -> None:
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
    moved = (f"{counted(r.rows_sent, 'row')} in {counted(r.chunks, 'chunk')}, "
             f"{human_bytes(r.bytes_sent)}")
    if r.snapshot_offset is not None:
        moved += f" (snapshot {r.snapshot_offset}: {human_bytes(r.snapshot_bytes)})"
    if r.complete and r.bytes_sent == 0 and r.from_offset == r.to_offset:
        c.print(f"{dst} is up to date at offset {r.head}")
    elif r.complete:
        c.print(f"synced {src} -> {dst}: {start} -> {r.head}, {moved}, {r.seconds:.2f} s")
    elif r.head is None and not r.bytes_sent:  # a first sync that moved nothing this time
        c.print(f"incomplete: {src} -> {dst} stopped by {_stopper(r)} before anything moved; {dst} is not a "
                f"replica yet: run the sync again, with more time or bytes")
    elif r.head is None:  # a first sync that stopped during the snapshot transfer
        c.print(f"incomplete: {src} -> {dst} stopped by {_stopper(r)} after {moved}; {dst} is not a replica "
                f"until the snapshot is complete: run the same sync again, it resumes")
    else:
        c.print(f"incomplete: {src} -> {dst} stopped by {_stopper(r)} after {moved}; head stays {r.head}"
                f"{_partial(r.pending_buckets, r.pending_target)}; run sync again to continue")


def _partial(buckets: int, target) -> str:
    """What a partial sync holds, in the words of 'status' (pending_buckets, pending_target)."""
    if not buckets:
        return ""
    return f"; partial {partial_sync_words(buckets, target)}"


def _stopper(r) -> str:
    return "a signal" if r.stopped_by == "signal" else f"--{r.stopped_by}"


command.ends_without_teardown = True  # closes all it opens before it returns (cli.ends_without_teardown)
