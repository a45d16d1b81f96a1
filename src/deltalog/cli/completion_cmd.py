"""deltalog completion: the shell completion script, from the commands themselves."""

from __future__ import annotations

import click


@click.command("completion")
@click.argument("shell", type=click.Choice(["bash", "zsh", "fish"]))
def command(shell):
    """Print the completion script for SHELL: commands, options, choices and paths complete with Tab.

    \b
    bash:  eval "$(deltalog completion bash)"     (e.g. in ~/.bashrc)
    zsh:   eval "$(deltalog completion zsh)"      (e.g. in ~/.zshrc)
    fish:  deltalog completion fish > ~/.config/fish/completions/deltalog.fish
    """
    from click.shell_completion import get_completion_class

    from . import cli

    completion = get_completion_class(shell)(cli, {}, "deltalog", "_DELTALOG_COMPLETE")
    click.echo(completion.source())
