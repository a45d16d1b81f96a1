"""All terminal output of the CLI: JSON on stdout, rich tables, progress on stderr.

Library code never prints; commands hand their result (a dict with the
stable JSON field names) and a renderer to :class:`Output`. rich is
imported only when something is rendered for a human.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import click

from .params import Seconds

PROGRESS: bool | None = None  # deltalog --progress / --no-progress; None: on a terminal only

# What a progress stage counts, by its name (the library's stages): bytes are shown with
# units and a rate in bytes/s; a stage not listed shows plain counts.
_BYTE_STAGES = {"snapshot", "bytes"}
_UNITS = {"rows": "rows", "comparing rows": "rows", "comparing changed rows": "rows", "comparing values": "rows",
          "records": "records", "snapshots": "snapshots", "tensors": "tensors", "row digests": "tensors",
          "rebuilding": "tensors"}

json_option = click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
quiet_option = click.option("--quiet", "-q", is_flag=True, help="Print nothing but errors (for cron).")
recursive_option = click.option(
    "--recursive", "-r", is_flag=True,
    help="A directory checkpoint: read the .npy files of its subdirectories too, as tensors named SUBDIR/NAME.",
)
wait_option = click.option(
    "--wait", type=Seconds(min=0), default=0.0, show_default=True, metavar="SECONDS",
    help="Wait this long for another writer's lock instead of failing at once.",
)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def partial_sync_words(buckets: int, target) -> str:
    """A partial sync as both 'sync' and 'status' say it (pending_buckets, pending_target)."""
    return f"sync to offset {target}: {counted(buckets, 'bucket')} already applied"


class Output:
    def __init__(self, as_json: bool = False, quiet: bool = False):
        self.as_json = as_json
        self.quiet = quiet
        self._stdout = None
        self._stderr = None

    @property
    def stdout(self):
        if self._stdout is None:
            from rich.console import Console

            # Off a terminal rich assumes 80 columns and truncates tables; pipes and logs get room,
            # and lines without the spaces that pad a table's last column.
            tty = sys.stdout.isatty()
            self._stdout = Console(highlight=False, soft_wrap=True, width=None if tty else 200,
                                   file=None if tty else _TrimmedLines(sys.stdout))
        return self._stdout

    @property
    def stderr(self):
        if self._stderr is None:
            from rich.console import Console

            self._stderr = Console(stderr=True, highlight=False)
        return self._stderr

    def result(self, data: dict, render: Callable[[object], None] | None = None) -> None:
        """Emit a command's result: JSON, or ``render(console)`` unless quiet."""
        if self.as_json:
            sys.stdout.write(json.dumps(data, default=_json_default) + "\n")
            sys.stdout.flush()
        elif not self.quiet and render is not None:
            render(self.stdout)

    def note(self, message: str) -> None:
        """A human message on stderr (never in JSON mode or quiet)."""
        if not (self.as_json or self.quiet):
            self.stderr.print(message)

    @property
    def interactive(self) -> bool:
        """Whether progress is shown: a terminal (or --progress), and neither JSON nor quiet."""
        if self.as_json or self.quiet or PROGRESS is False:
            return False
        return PROGRESS is True or sys.stderr.isatty()

    @contextmanager
    def progress(self, description: str) -> Iterator[Callable[[str, int, int], None]]:
        """A progress bar on stderr; yields update(stage, done, total).

        Like rsync's --info=progress2: how much is done of how much (bytes
        with units for byte stages, else counts), the rate, the time left.
        """
        if not self.interactive:
            yield lambda stage, done, total: None
            return
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        console = self.stderr if PROGRESS is not True else Console(stderr=True, highlight=False, force_terminal=True)
        with Progress(
            TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[amount]}"),
            TextColumn("{task.fields[rate]}"), TimeRemainingColumn(), TimeElapsedColumn(),
            console=console, transient=True,
        ) as bar:
            task = bar.add_task(description, total=None, amount="", rate="")

            def update(stage: str, done: int, total: int) -> None:
                bar.update(task, description=f"{description}: {stage}", completed=done, total=total or None)
                speed = bar.tasks[0].speed  # rich's own moving average of the completion rate
                amount, rate, unit = _amount(stage, done, total), "", _UNITS.get(stage, "")
                if speed:
                    rate = f"{human_bytes(speed)}/s" if stage in _BYTE_STAGES else f"{speed:,.0f} {unit}/s".replace(" /", "/")
                bar.update(task, amount=amount, rate=rate)

            yield update

    @contextmanager
    def working(self, message: str) -> Iterator[None]:
        """A spinner on a tty while a step of unknown length runs."""
        if not self.interactive:
            yield
            return
        with self.stderr.status(message):
            yield


def _amount(stage: str, done: int, total: int) -> str:
    if stage in _BYTE_STAGES:
        return human_bytes(done) + (f" / {human_bytes(total)}" if total else "")
    unit = _UNITS.get(stage, "")
    return (f"{done:,}" + (f" / {total:,}" if total else "") + (f" {unit}" if unit else "")).strip()


def _json_default(value):
    import numpy as np

    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def counted(n: int, noun: str) -> str:
    """'1 row', '2 rows', '1,024 rows' (nouns with a plain plural s)."""
    return f"{n:,} {noun}" + ("" if n == 1 else "s")


def shown(text: str) -> str:
    """Text someone else wrote (a commit message, a user name), as a cell shows it: control
    characters as escapes (\\n, \\x1b) and rich markup escaped, so it can neither break the
    table's lines nor restyle the terminal. JSON output carries it unchanged."""
    from rich.markup import escape

    return escape("".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text))


class _TrimmedLines:
    """A text stream that writes each line without trailing spaces (rich pads every cell of a
    table, the last column's too): output piped to a file or a diff carries none."""

    def __init__(self, stream):
        self._stream = stream
        self._partial = ""

    def write(self, text: str) -> int:
        *lines, self._partial = (self._partial + text).split("\n")
        if lines:
            self._stream.write("".join(line.rstrip(" ") + "\n" for line in lines))
        return len(text)

    def flush(self) -> None:
        if self._partial:
            self._stream.write(self._partial)
            self._partial = ""
        self._stream.flush()

    def isatty(self) -> bool:
        return False

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def table(*columns: str, title: str | None = None):
    from rich.table import Table

    t = Table(title=title, title_justify="left", box=None, pad_edge=False, header_style="bold")
    for col in columns:
        numeric = col.lower() in {"offset", "rows", "bytes", "buckets", "significance", "target"}
        t.add_column(col, justify="right" if numeric else "left", no_wrap=True)
    return t
