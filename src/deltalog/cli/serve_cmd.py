"""deltalog serve --stdio: the remote end of 'deltalog sync' over ssh."""

from __future__ import annotations

import click


@click.command("serve")
@click.argument("replica", type=click.Path(file_okay=False, readable=False))  # unreadable: exit 12, not 2
@click.option("--stdio", is_flag=True, help="Speak the sync protocol on stdin/stdout (the only mode).")
def command(replica, stdio):
    """Serve REPLICA to one 'deltalog sync' client over stdin/stdout.

    This is what 'deltalog sync host:REPLICA ...' runs on the far side of
    ssh (like rsync --server or git upload-pack): framed, versioned binary
    messages on stdout, logs on stderr only. The client pulls from REPLICA
    or pushes into it (creating it if missing). To restrict a key to one
    replica, put in authorized_keys:

    \b
        command="deltalog serve --stdio /srv/models/ranker",restrict ssh-ed25519 AAAA...
    """
    if not stdio:
        raise click.UsageError("give --stdio: 'deltalog serve' only speaks over stdin/stdout (see --help)")
    from ..stdio_server import main_stdio

    return main_stdio(replica)


command.ends_without_teardown = True  # closes all it opens before it returns (cli.ends_without_teardown)
