"""Option types shared by commands: offsets as users write them, durations.

An offset option keeps its text (``N``, ``head``, ``head~N``, ``-N``): what
it names depends on the replica, so the command resolves it once the replica
is open (deltalog.history.resolve_offset). The syntax is checked here, so a
typo is a usage error (exit 2) before anything is opened.
"""

from __future__ import annotations

import math

import click


class Seconds(click.FloatRange):
    """A number of seconds at or above ``min``: click's FloatRange lets NaN through (every comparison
    with it is false), which made --interval nan a busy loop and --timeout nan an internal error."""

    name = "seconds"

    def convert(self, value, param, ctx):
        result = super().convert(value, param, ctx)
        if not math.isfinite(result):
            self.fail(f"{value!r} is not a number of seconds", param, ctx)
        return result


class OffsetParam(click.ParamType):
    name = "OFFSET"

    def convert(self, value, param, ctx):
        from ..errors import InvalidInput
        from ..history import parse_offset

        if isinstance(value, int):
            return value
        try:
            return parse_offset(str(value))
        except InvalidInput as exc:
            self.fail(exc.one_line(), param, ctx)


class DurationParam(click.ParamType):
    """Seconds from '90', '90s', '15m', '12h', '7d' or '2w'."""

    name = "DURATION"

    def convert(self, value, param, ctx):
        from ..compact import parse_duration
        from ..errors import InvalidInput

        if isinstance(value, (int, float)):
            return float(value)
        try:
            return parse_duration(value)
        except InvalidInput as exc:
            self.fail(exc.one_line(), param, ctx)


class SinceParam(click.ParamType):
    """An offset, or a duration with its unit (``2h``: the records of the last two hours)."""

    name = "OFFSET|DURATION"

    def convert(self, value, param, ctx):
        text = str(value)
        if text[-1:] in ("s", "m", "h", "d", "w") and text != "head" and not text.startswith(("-", "head~")):
            return ("age", DurationParam().convert(text, param, ctx))
        return ("offset", OffsetParam().convert(text, param, ctx))


def peer_options(command):
    """--ssh-command/-e, --remote-deltalog and --token-file: how to reach a host:path or http(s) peer."""
    command = click.option("--token-file", type=click.Path(dir_okay=False, exists=True),
                           help="File with the bearer token of an http(s) source (else $DELTALOG_TOKEN).")(command)
    command = click.option("--remote-deltalog", default="deltalog", show_default=True, envvar="DELTALOG_REMOTE",
                           metavar="PATH", help="The deltalog command on the remote host (like rsync --rsync-path).")(command)
    return click.option("--ssh-command", "-e", default="ssh", show_default=True, envvar="DELTALOG_SSH", metavar="CMD",
                        help="How to run ssh for host:path locations, e.g. 'ssh -p 2222 -i key' (like rsync -e).")(command)


def transport_options(timeout, ssh_command, remote_deltalog, token_file):
    """The TransportOptions that peer_options and a --timeout describe."""
    from ..transport import TransportOptions

    token = None
    if token_file:
        from ..tokens import read_token_file  # the server's rules: an empty file is refused, not sent as none

        token = read_token_file(token_file)
    return TransportOptions(ssh_command=ssh_command, remote_deltalog=remote_deltalog, timeout=timeout, token=token)
