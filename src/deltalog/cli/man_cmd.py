"""deltalog man: the manual page, written from the commands' own help, in troff.

Generated at the time it is asked for, so it always describes the
installed commands: ``deltalog man | man -l -``, or save it as deltalog.1
in a man directory.
"""

from __future__ import annotations

import datetime

import click

# Environment variables deltalog reads (or sets for a --check command); the options name them too.
ENVIRONMENT = [
    ("DELTALOG_SSH", "how to run ssh for host:path locations (as sync --ssh-command), e.g. 'ssh -p 2222 -i key'"),
    ("DELTALOG_REMOTE", "the deltalog command on a remote host (as sync --remote-deltalog)"),
    ("DELTALOG_TOKEN", "the bearer token for an http(s) source when sync has no --token-file"),
    ("DELTALOG_DEBUG", "when set, print a traceback when a command fails (as --debug); also for serve --stdio"),
    ("DELTALOG_NO_KERNELS", "when set, use the numpy row loops instead of the compiled ones (slower; for tests)"),
    ("DELTALOG_REPLICA, DELTALOG_HEAD, DELTALOG_PREVIOUS_HEAD, DELTALOG_SOURCE",
     "set by sync --check for its command: the destination, its new head, the head before the sync, the source"),
]


@click.command("man")
def command():
    """Print the manual page (troff): 'deltalog man | man -l -'.

    It is written from the commands' own help at the time, so it always
    matches the installed version.
    """
    from .. import __version__
    from ..errors import EXIT_CODES
    from . import cli

    click.echo(render(cli, __version__, EXIT_CODES))


def _escape(text: str) -> str:
    """Text safe for troff: backslashes doubled, no line starting with a control character."""
    lines = []
    for line in text.replace("\\", "\\\\").replace("-", "\\-").splitlines():
        lines.append("\\&" + line if line[:1] in (".", "'") else line)
    return "\n".join(lines)


def _help(command: click.Command) -> str:
    text = (command.help or "").replace("\b\n", "").replace("\b", "")
    return "\n".join(line.strip() for line in text.splitlines())


def render(group: click.Group, version: str, exit_codes: dict[int, str]) -> str:
    today = datetime.date.today().isoformat()
    ctx = click.Context(group, info_name="deltalog")
    out = [f'.TH DELTALOG 1 "{today}" "deltalog {version}" "User Commands"', ".SH NAME",
           "deltalog \\- keep model replicas fresh by moving only the rows that changed", ".SH SYNOPSIS",
           ".B deltalog", "[\\fB\\-\\-debug\\fR] [\\fB\\-\\-progress\\fR|\\fB\\-\\-no\\-progress\\fR] "
           "\\fICOMMAND\\fR [\\fIARGS\\fR]...", ".SH DESCRIPTION", _escape(_help(group)), ".SH COMMANDS"]
    for name in group.list_commands(ctx):
        command = group.get_command(ctx, name)
        if command is None or command.hidden:
            continue
        sub = click.Context(command, info_name=name, parent=ctx)
        usage = " ".join(["deltalog", name, *command.collect_usage_pieces(sub)])
        out += [f".SS {_escape(name)}", ".nf", _escape(usage), ".fi", _escape(_help(command))]
        for param in command.get_params(sub):
            if isinstance(param, click.Argument):
                continue  # in the usage line
            record = param.get_help_record(sub)
            if record is None:
                continue
            spelling, text = record
            out += [".TP", f"\\fB{_escape(spelling)}\\fR", _escape(text)]
    out += [".SH EXIT STATUS"]
    for code, meaning in sorted(exit_codes.items()):
        out += [".TP", f"\\fB{code}\\fR", _escape(meaning)]
    out += [".PP", _escape("A reader that stops early (| head) is not an error: the command runs to its end, "
                           "exits with its own code and prints nothing on stderr.")]
    out += [".SH ENVIRONMENT"]
    for name, meaning in ENVIRONMENT:
        out += [".TP", f"\\fB{_escape(name)}\\fR", _escape(meaning)]
    out += [".SH FILES", ".TP", "\\fIREPLICA\\fR/DELTALOG, log/, tensors/, snapshots/",
            "a replica directory; its format is specified in formats/FORMAT.md of the source distribution",
            ".SH SEE ALSO", "rsync(1), ssh(1)"]
    return "\n".join(out) + "\n"
