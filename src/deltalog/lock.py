"""The writer lock: at most one process (or thread) writes a replica at a time.

An flock(2) on ``REPLICA/lock``. The kernel drops it when the holder dies,
kill -9 included, so a crashed cron job never leaves a stale lock behind.
flock locks belong to an open file description, so two handles in one
process exclude each other just as two processes do.

The holder writes its pid and command line into the file, so a second
writer's LockHeld names who holds it (the text is informational: the flock
alone decides, and the text of a holder that died stays until the next one).
"""

from __future__ import annotations

import fcntl
import os
import time

from .errors import LockHeld

LOCK_FILE = "lock"
# A lock-free reader that finds a replica mid-apply takes the lock for a moment
# to check whether the writer died (Replica.read_rows): a writer asking with no
# wait must not fail on that, only on a writer that holds the lock for real.
GRACE_SECONDS = 0.05


class WriterLock:
    def __init__(self, replica_dir: str):
        self.path = os.path.join(replica_dir, LOCK_FILE)
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, wait: float = 0.0) -> None:
        """Take the lock, waiting up to ``wait`` seconds (at least GRACE_SECONDS); LockHeld otherwise."""
        self._acquire(max(wait, GRACE_SECONDS))

    def _acquire(self, wait: float) -> None:
        if self._fd is not None:
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + wait
        delay = 0.005
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = _holder(fd)
                    os.close(fd)
                    raise LockHeld(f"{os.path.dirname(self.path)}: locked by another writer"
                                   + (f" ({holder})" if holder else "")) from None
                time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
                delay = min(delay * 2, 0.5)
        self._fd = fd
        _note_holder(fd)

    def try_acquire(self) -> bool:
        """Take the lock if it is free now; never waits."""
        try:
            self._acquire(0.0)
            return True
        except LockHeld:
            return False

    def still_linked(self) -> bool:
        """Whether the held lock's file is still the one at its path.

        A process that waited for the lock of a staging directory may get it
        only after its holder removed the directory (a first sync that moved
        nothing leaves nothing behind): that lock guards nothing.
        """
        try:
            return self._fd is not None and os.path.samestat(os.fstat(self._fd), os.stat(self.path))
        except FileNotFoundError:
            return False

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (as any user)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, as another user
        return True
    return True


_holder_text: tuple[int, bytes] | None = None  # (pid, what _note_holder writes): a commit takes the lock each time


def _note_holder(fd: int) -> None:
    """Write who holds the lock into its file (best effort: a read-only file system just says nothing)."""
    global _holder_text
    pid = os.getpid()
    if _holder_text is None or _holder_text[0] != pid:  # a forked child is another holder
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
        except OSError:
            argv = []
        command = " ".join(" ".join(argv).split())[:300]  # one line, whatever the arguments hold
        _holder_text = (pid, (f"pid {pid}" + (f": {command}" if command else "") + "\n").encode())
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, _holder_text[1], 0)
    except OSError:
        pass


def _holder(fd: int) -> str:
    """Who the file says holds the lock, when that process still runs ('' otherwise)."""
    try:
        text = os.pread(fd, 512, 0).decode(errors="replace").strip()
        pid = int(text.split()[1].rstrip(":"))
    except (OSError, ValueError, IndexError):
        return ""
    return text if pid_alive(pid) else ""
