"""Error classes of deltalog, each with its exit code and a hint for the user.

Exit codes are written down here and nowhere else (README and cli/ quote
this table). 0 = ok, 1 = differences found / sync incomplete under a budget,
2 = usage error (click), 3 and up = one class of failure each.

Library code raises these; exactly one place (deltalog.cli.main) catches
them, prints one line and exits with ``exit_code``.
"""

from __future__ import annotations


class DeltalogError(Exception):
    """Base of every error a user may see. ``str(err)`` is one line."""

    exit_code = 20
    hint: str | None = None

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        if hint is not None:
            self.hint = hint

    def one_line(self) -> str:
        msg = str(self)
        return f"{msg} ({self.hint})" if self.hint else msg


class NotAReplica(DeltalogError):
    """The path is missing, is not a replica, or (for init) already is one."""

    exit_code = 3


class UnsupportedVersion(DeltalogError):
    """The replica or record was written by a newer format version."""

    exit_code = 4
    hint = "upgrade deltalog to open it"


class IntegrityError(DeltalogError):
    """A checksum failed, or a file is truncated or inconsistent."""

    exit_code = 5
    hint = "run 'deltalog verify' to see what is damaged"


class ModelMismatch(DeltalogError):
    """Deltas, a checkpoint or a peer belong to another model."""

    exit_code = 6


class OffsetNotRetained(DeltalogError):
    """The offset asked for is outside the log's retention."""

    exit_code = 7


class HistoryUnproven(OffsetNotRetained):
    """A destination older than everything the source keeps, which the source cannot vouch for.

    Exit 7, like any offset out of retention, but no retry will change it
    (sync --follow stops): only --reseed, which replaces the destination.
    """


class TransportError(DeltalogError):
    """A peer vanished, refused, or spoke a protocol we do not."""

    exit_code = 8


class LockHeld(DeltalogError):
    """Another writer holds the replica's lock."""

    exit_code = 9
    hint = "another deltalog command is writing this replica; retry later or pass --wait SECONDS"


class CheckFailed(DeltalogError):
    """A user-supplied check command failed (sync --check)."""

    exit_code = 10


class InvalidInput(DeltalogError):
    """Bad user input: unknown tensor, wrong shape or dtype, bad checkpoint file."""

    exit_code = 11


class StorageError(DeltalogError):
    """The operating system refused a write (disk full, permissions)."""

    exit_code = 12


class Diverged(DeltalogError):
    """Two replicas of one model hold different models at one offset: their histories split."""

    exit_code = 13
    hint = ("its history is not the source's: 'deltalog sync SRC DST --reseed' replaces it with the "
            "source's snapshot and log, dropping its own records")


class Interrupted(DeltalogError):
    """Ctrl-C (SIGINT), or SIGTERM (exit 143): every change is whole or not made at all."""

    exit_code = 130
    hint = "every change is whole or not made at all: 'deltalog status' shows where the replica stands"


class Terminated(KeyboardInterrupt):
    """SIGTERM (timeout(1), a service manager) made into an exception, so that a command stops as
    Ctrl-C stops it, cleanups and all, and says so (exit 143) instead of vanishing silently."""

    exit_code = 143

    @staticmethod
    def caused(exc: BaseException) -> bool:
        """Whether ``exc`` is SIGTERM's, or click's Abort raised from it."""
        return isinstance(exc, Terminated) or isinstance(exc.__cause__, Terminated)


_OS_PROBLEMS = {  # errno name -> (what it means, what to do)
    "EACCES": ("permission denied", "run as a user that may read and write it, or fix its permissions"),
    "EPERM": ("permission denied", "run as a user that may read and write it, or fix its permissions"),
    "EROFS": ("read-only file system", "writes need a writable mount"),
    "ENOSPC": ("disk full", "free disk space and retry"),
    "EDQUOT": ("disk quota exceeded", "free disk space and retry"),
    "EIO": ("I/O error", "check the disk (dmesg)"),
}


def os_hint(exc: OSError) -> str:
    """What to do about an OSError from the environment (a write that failed: disk full, or not)."""
    import errno

    return _OS_PROBLEMS.get(errno.errorcode.get(exc.errno or 0, ""), (None, "check free space and permissions"))[1]


def environment_error(exc: OSError) -> StorageError | None:
    """The StorageError an OSError from the environment means (permissions, a read-only mount, a
    full disk, a failing device), or None for any other (a bug: exit 20)."""
    import errno

    problem = _OS_PROBLEMS.get(errno.errorcode.get(exc.errno or 0, ""))
    if problem is None:
        return None
    return StorageError(f"{exc.filename or 'a file'}: {problem[0]}", hint=problem[1])


EXIT_CODES: dict[int, str] = {
    0: "success (diff: no differences; sync: complete)",
    1: "diff found differences, or sync stopped incomplete under --max-bytes/--deadline",
    2: "usage error: bad option or argument",
    NotAReplica.exit_code: "not a replica (missing, not initialised, or init target exists)",
    UnsupportedVersion.exit_code: "unsupported format or protocol version",
    IntegrityError.exit_code: "integrity failure: checksum mismatch, truncated or corrupt file",
    ModelMismatch.exit_code: "model mismatch: deltas, checkpoint or peer of another model",
    OffsetNotRetained.exit_code: "offset not retained in the log (compacted away or never seen)",
    TransportError.exit_code: "transport failure: peer unreachable, vanished or misbehaved",
    LockHeld.exit_code: "lock held: another writer is working on the replica",
    CheckFailed.exit_code: "check failed: the --check command rejected the update",
    InvalidInput.exit_code: "invalid input: unknown tensor, wrong shape or dtype, bad checkpoint",
    StorageError.exit_code: "storage failure: disk full or permission denied",
    Diverged.exit_code: "diverged: the replicas hold different models at one offset (another history)",
    Interrupted.exit_code: "interrupted (Ctrl-C): every change is whole or not made at all",
    Terminated.exit_code: "terminated (SIGTERM, e.g. by timeout): every change is whole or not made at all",
    DeltalogError.exit_code: "internal error (a bug: please report it with --debug output)",
}
