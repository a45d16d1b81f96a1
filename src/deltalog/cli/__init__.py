"""The `deltalog` command: a thin layer over the library.

Each command lives in its own ``<name>_cmd.py`` that parses options, calls
the library and renders through :mod:`deltalog.cli.console`. This module
wires them together and is the one place that turns errors into a one-line
message and an exit code (table in deltalog.errors). Library modules are
imported inside command bodies so that ``deltalog --help`` starts fast.

:func:`entry` is the process entry point (the ``deltalog`` script and
``python -m deltalog``); :func:`main` is the same command for a caller that
keeps its interpreter (tests), and ends by raising SystemExit.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import os
import signal
import sys
import threading

import click

from .. import __version__

EPILOG = """\b
Exit codes: 0 ok; 1 differences found / sync incomplete; 2 usage error;
3 not a replica; 4 unsupported version; 5 integrity failure;
6 model mismatch; 7 offset not retained; 8 transport; 9 lock held;
10 check failed; 11 invalid input; 12 storage (disk full, permissions);
13 diverged (another history); 20 internal; 130 interrupted (Ctrl-C);
143 terminated (SIGTERM).
A reader that stops early (| head) is no error: the exit code stays
the command's own.
Pass --debug (or DELTALOG_DEBUG=1) for a traceback on errors."""


def _show_version(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if not value or ctx.resilient_parsing:
        return
    from .. import kernels

    if kernels.enabled():
        loops = "compiled"
    elif kernels.available():
        loops = "numpy (DELTALOG_NO_KERNELS is set)"
    else:
        loops = "numpy (built without a C compiler: diff and digest checks are slower)"
    click.echo(f"deltalog, version {__version__}; row loops: {loops}")
    ctx.exit()


class _Commands(click.Group):
    """The commands, each imported from its ``<name>_cmd.py`` only when it is run or listed.

    A command runs with its own module loaded, not the other fifteen; help and
    the manual page list them all and so load them all.
    """

    def list_commands(self, ctx: click.Context) -> list[str]:
        here = os.path.dirname(__file__)
        return sorted(f[: -len("_cmd.py")].replace("_", "-") for f in os.listdir(here) if f.endswith("_cmd.py"))

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in self.commands and name in self.list_commands(ctx):
            self.add_command(importlib.import_module(f"{__name__}.{name.replace('-', '_')}_cmd").command, name)
        return self.commands.get(name)

    def resolve_command(self, ctx: click.Context, args: list[str]):
        name, command, rest = super().resolve_command(ctx, args)
        global _ran
        _ran = command
        if _owns_process:
            from .. import heap  # here, not at the top: --help loads no ctypes

            heap.bound_retention()  # before the command's first large array
            if not quick_exit(command):
                gc.enable()  # a command that runs long, or leaves work behind, collects cycles as usual
        return name, command, rest


_ran: click.Command | None = None  # the command this process ran (entry: may it skip the teardown?)
_owns_process = False  # set by entry(): this interpreter runs one command, then ends


def quick_exit(command: click.Command | None) -> bool:
    """Whether a command is marked ``command.quick_exit = True`` (in its ``_cmd`` module).

    Such a command (diff, status, log, commit, rollback) is short, closes
    what it opens before it returns (replicas in ``with`` or ``finally``
    blocks; a record is durable before commit or rollback returns), and
    leaves no work running and no file but stdout/stderr with buffered
    data. Run by :func:`entry`, it runs with the cyclic garbage collector off
    and its process ends without the interpreter's teardown. (verify is not
    one: it can run long on a damaged replica, where cycles should be
    collected; nor are sync and the servers.)
    """
    return bool(getattr(command, "quick_exit", False))


def ends_without_teardown(command: click.Command | None) -> bool:
    """Whether the process may end with ``os._exit`` once the command returned: a quick-exit
    command, or one marked ``command.ends_without_teardown = True`` (sync and serve --stdio).

    Those may run long, so they keep the collector, but like the quick ones
    they have closed everything when they return (replicas, the ssh process
    waited for, the far end's lock released) and leave no thread with work
    to do. The far end of a sync over ssh spent ~17 ms in the teardown
    after its client's goodbye, which the client waited for.
    """
    return quick_exit(command) or bool(getattr(command, "ends_without_teardown", False))


@click.group(cls=_Commands, epilog=EPILOG, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--version", is_flag=True, expose_value=False, is_eager=True, callback=_show_version,
              help="Show the version, and whether the compiled row loops are in use, and exit.")
@click.option("--debug", is_flag=True, help="Show a traceback when a command fails.")
@click.option("--progress/--no-progress", "progress", default=None,
              help="Show progress bars on stderr (bytes or rows done, rate, time left) even when it is not a "
                   "terminal, or never. Default: on a terminal only, and never with --json or --quiet.")
def cli(debug: bool, progress: bool | None) -> None:
    """Keep model replicas fresh by moving only the rows that changed.

    A replica is a directory holding a model's tensors, an append-only delta
    log and immutable snapshots. Start with 'deltalog init', record updates
    with 'deltalog commit', inspect with 'status', 'log' and 'verify'.
    """
    from . import console

    console.PROGRESS = progress


_NUMPY_CORE = ("numpy._core._multiarray_umath", "numpy.core._multiarray_umath")  # numpy 2, numpy 1


def _blas_single_threaded_while_numpy_loads() -> None:
    """Load numpy's OpenBLAS with one thread, then hand the user's environment back.

    deltalog never calls BLAS, but OpenBLAS starts a thread per core (and
    their buffers) when numpy loads: 20-40 ms of every command on 2 cores,
    more on big machines. OpenBLAS reads OPENBLAS_NUM_THREADS once, when
    loaded, so the variable is removed again at the first import after numpy's
    core is in (an audit hook): a --check command or other child still gets
    the user's environment. A value the user set is left alone.
    """
    if "OPENBLAS_NUM_THREADS" in os.environ or any(m in sys.modules for m in _NUMPY_CORE):
        return
    os.environ["OPENBLAS_NUM_THREADS"] = "1"
    loading = True

    def restore(event: str, _args) -> None:
        nonlocal loading
        if loading and event == "import" and any(m in sys.modules for m in _NUMPY_CORE):
            loading = False
            os.environ.pop("OPENBLAS_NUM_THREADS", None)

    sys.addaudithook(restore)


def main(argv: list[str] | None = None) -> None:
    """Run one command; ends by raising SystemExit with its exit code (the table in the epilog)."""
    sys.exit(_run(list(sys.argv[1:] if argv is None else argv)))


def entry() -> None:
    """The ``deltalog`` process: :func:`main`, then, after a quick-exit command (or sync, or serve:
    :func:`ends_without_teardown`), an exit without teardown.

    The interpreter's teardown (cyclic collections over every object numpy,
    click and deltalog created, module clearing, atexit) costs ~20 ms, and
    the collector's passes over the same objects while they load ~15 ms more,
    neither of which a short command needs: one marked ``quick_exit`` runs
    with the collector off and ends with ``os._exit`` once stdout and stderr
    are flushed, with the same exit code. That skips nothing such a command
    needs: by then it has closed what it opened (a record, and any repair
    Replica.open made, is durable before close returns; tensor pages not yet
    fsynced belong to the page cache, which an exit leaves as it is), the
    only exit handler is concurrent.futures' join of idle pool threads, and
    no other file has buffered data. It is a gentler end than the kill -9 a
    replica must survive at any moment. Any other command keeps the
    collector and the ordinary exit.
    """
    global _owns_process
    _owns_process = True
    gc.disable()  # loading is all allocation and no garbage; resolve_command turns it back on for long commands
    code = _run(sys.argv[1:])
    _flush_or_drop(sys.stdout)  # what is still buffered; a gone reader changes neither the code nor stderr
    _flush_or_drop(sys.stderr)
    if not ends_without_teardown(_ran):
        gc.enable()
        sys.exit(code)
    os._exit(code)


class _ReaderMayLeave:
    """sys.stdout or sys.stderr while a command runs: a reader that has gone (``| head``) is no error.

    At the first EPIPE the stream's file descriptor is pointed at /dev/null,
    and the command runs on to its end and exits with its own code (diff
    still 1 on differences, verify 5 on damage), with nothing on stderr.
    Left to them, click turns an EPIPE into a silent exit 1 and rich raises
    SystemExit(1); the same exit 1 as "differences found", which a
    ``set -o pipefail`` script cannot tell from a real one.
    """

    def __init__(self, stream):
        self._stream = stream

    def write(self, text):
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            _drop(self._stream)
            return len(text)

    def flush(self) -> None:
        _flush_or_drop(self._stream)

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def _flush_or_drop(stream) -> None:
    try:
        stream.flush()
    except BrokenPipeError:
        _drop(stream)


def _drop(stream) -> None:
    """Send the rest of ``stream``, and what it still buffers, to /dev/null: its reader has gone."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, stream.fileno())
    os.close(devnull)


def _run(args: list[str]) -> int:
    stdout, stderr = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = _ReaderMayLeave(stdout), _ReaderMayLeave(stderr)
    try:
        return _run_command(args)
    finally:
        if isinstance(sys.stdout, _ReaderMayLeave):  # a command may have replaced it (serve --stdio)
            sys.stdout = stdout
        if isinstance(sys.stderr, _ReaderMayLeave):
            sys.stderr = stderr


def _terminate(_signum, _frame) -> None:
    from ..errors import Terminated

    raise Terminated


@contextlib.contextmanager
def _sigterm_stops_like_ctrl_c():
    """While a command runs, SIGTERM raises errors.Terminated (unless something else handles it:
    an embedding program, or a command that installs its own, like --follow and the servers)."""
    installed = threading.current_thread() is threading.main_thread() and \
        signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    if installed:
        signal.signal(signal.SIGTERM, _terminate)
    try:
        yield
    finally:
        if installed:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _run_command(args: list[str]) -> int:
    _blas_single_threaded_while_numpy_loads()
    debug = "--debug" in args or bool(os.environ.get("DELTALOG_DEBUG"))
    want_json = "--json" in args
    try:
        with _sigterm_stops_like_ctrl_c():
            code = cli.main(args=args, prog_name="deltalog", standalone_mode=False)
    except click.ClickException as exc:  # usage errors: exit 2
        ctx = getattr(exc, "ctx", None)
        hint = f"see '{ctx.command_path} --help'" if ctx is not None else "see 'deltalog --help'"
        code = _report("UsageError", exc.exit_code, exc.format_message().rstrip("."), hint, want_json)
    except (click.exceptions.Abort, KeyboardInterrupt) as exc:  # click turns a Ctrl-C into Abort
        from ..errors import Interrupted, Terminated

        if Terminated.caused(exc):
            code = _report("Terminated", Terminated.exit_code, "terminated (SIGTERM)", Interrupted.hint, want_json)
        else:
            code = _report("Interrupted", Interrupted.exit_code, "interrupted", Interrupted.hint, want_json)
    except Exception as exc:  # noqa: BLE001 - the single place errors become exit codes
        from ..errors import DeltalogError, environment_error

        if debug:
            import traceback

            traceback.print_exc()
        if not isinstance(exc, DeltalogError) and isinstance(exc, OSError):
            exc = environment_error(exc) or exc  # permission denied, read-only, disk full: exit 12, not a bug
        if isinstance(exc, DeltalogError):
            kind, code, message, hint = type(exc).__name__, exc.exit_code, str(exc), exc.hint
        else:
            kind, code, message, hint = "InternalError", 20, f"{type(exc).__name__}: {exc}", "rerun with --debug and report it"
        code = _report(kind, code, message, hint, want_json)
    return code if isinstance(code, int) else 0


def _report(kind: str, code: int, message: str, hint: str | None, want_json: bool) -> int:
    """The error as one line on stderr and, with --json, as {"error": {...}} on stdout; returns ``code``."""
    line = message + (f" ({hint})" if hint else "")
    click.echo(f"deltalog: error: {line}", err=True)
    if want_json:
        import json

        click.echo(json.dumps({"error": {"type": kind, "message": message, "hint": hint, "exit_code": code}}))
    return code
