"""deltalog serve-snapshot: serve a replica read-only over HTTP (snapshots, records, metrics)."""

from __future__ import annotations

import json
import sys
import threading

import click

from .console import Output, json_option, quiet_option
from .params import Seconds


@click.command("serve-snapshot")
@click.argument("replica", type=click.Path(file_okay=False, readable=False))  # unreadable: exit 12, not 2
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on. Give 0.0.0.0 (or ::) to accept other machines.")
@click.option("--port", type=click.IntRange(0, 65535), default=8765, show_default=True,
              help="TCP port; 0 picks a free one (printed at start).")
@click.option("--token-file", type=click.Path(dir_okay=False),
              help="File holding a bearer token every request must present (Authorization: Bearer TOKEN).")
@click.option("--max-connections", type=click.IntRange(min=1), default=32, show_default=True,
              help="Open connections served at once; more are answered 503 with Retry-After.")
@click.option("--timeout", type=Seconds(min=0.1), default=60.0, show_default=True, metavar="SECONDS",
              help="Drop a connection that stays silent (or stops reading) this long.")
@json_option
@quiet_option
def command(replica, host, port, token_file, max_connections, timeout, as_json, quiet):
    """Serve REPLICA over HTTP until SIGTERM or Ctrl-C (read-only, pull only).

    \b
    GET /v1/status                      where the replica stands (JSON)
    GET /v1/snapshot/latest             newest snapshot as one .safetensors file
    GET /v1/snapshot/OFFSET             the snapshot at OFFSET, likewise
    GET /v1/snapshots/OFFSET/FILE       snapshot files (manifest.json, NNNNN.bin)
    POST /v1/chunks                     record stream for 'deltalog sync http://HOST:PORT DST'
    GET /v1/wait?since=H&timeout=T      long-poll: answers {head, changed} when the head
                                        is no longer H, or after T s ('sync --follow')
    GET /v1/digest?offset=H             {offset, state_digest}: the model's digest at H
    GET /metrics                        Prometheus metrics

    Downloads support Range requests (curl -C -), so an interrupted one
    resumes. REPLICA may be a follower that another 'deltalog sync
    --follow' keeps up to date: waiting followers wake as its head moves
    (each following client holds up to three connections: keep-alive,
    long-poll and a record stream). Prints "serving REPLICA on URL" on stderr at start (with --json,
    a JSON object with the url on stdout instead) and one line per request
    on stderr unless --quiet.
    """
    from ..replica import Replica
    from ..server import SnapshotServer, serve
    from ..tokens import read_token_file, token_file_warning

    out = Output(as_json, quiet)
    token = None
    if token_file:
        token = read_token_file(token_file)
        warning = token_file_warning(token_file)
        if warning:
            click.echo(f"deltalog: warning: {warning}", err=True)
    lock = threading.Lock()

    def log(line: str) -> None:
        with lock:
            click.echo(line, err=True)

    r = Replica.open(replica)
    server = None
    try:
        server = SnapshotServer(
            r, host, port, token=token, max_connections=max_connections, timeout=timeout,
            log=None if quiet else log,
        )
        if as_json:
            sys.stdout.write(json.dumps({"replica": r.path, "url": server.url, "model_id": r.model_id,
                                         "auth": token is not None}) + "\n")
            sys.stdout.flush()
        else:
            # Always printed (even with --quiet): with --port 0 it is how callers learn the port.
            click.echo(f"serving {replica} on {server.url}", err=True)
            sys.stderr.flush()
        serve(server)
        out.note("stopped")
    finally:
        # A request thread still running may be inside LMDB: leave the
        # environment to process exit rather than close it under that thread.
        if server is None or not server.metrics.active_connections:
            r.close()
