"""`python -m deltalog`: the same as the `deltalog` command."""

from .cli import entry

entry()
