"""What a Ctrl-C during a write tells the user: whether the write landed.

Every change of a replica is whole or not made at all, so after an
interrupt the replica is at its old head or at the new one; a command that
writes one record knows which by looking, and says so instead of a bare
"interrupted" that leaves an incident responder guessing.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import click

from ..errors import Interrupted, Terminated


@contextmanager
def say_where_an_interrupt_left(replica, before: int, what: str) -> Iterator[None]:
    """Turn a Ctrl-C inside the block into Interrupted (exit 130) naming the head it left ``replica`` at."""
    try:
        yield
    except (KeyboardInterrupt, click.exceptions.Abort) as exc:
        how = "terminated (SIGTERM)" if Terminated.caused(exc) else "interrupted"
        head = replica.head
        if head != before:
            error = Interrupted(f"{how} after the {what} was written: {replica.path} is at offset {head}",
                                hint="it is complete and durable; running the command again changes nothing")
        else:
            error = Interrupted(f"{how} before anything was written: {replica.path} stays at offset {before}")
        if how != "interrupted":
            error.exit_code = Terminated.exit_code
        raise error from None
