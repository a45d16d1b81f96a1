"""Join a large record's pieces in a file's page cache instead of the heap.

LMDB copies a value into pages of its own when it is put (py-lmdb has no
put that reserves the space in place), so a record that is joined in
memory exists twice in anonymous memory while it is logged: the joined
bytes and LMDB's copy. A sync destination logs a record of about 1.7
times the changed bytes (the new values and its own undo values), so that
is ~3.4 bytes of memory per changed byte, where the budget for a sync is
64 MiB + 2 per changed byte (issue 15).

:func:`join` writes the pieces, one at a time and each let go once
written, into an unnamed temporary file in the replica's directory and
maps it read-only: LMDB then copies from the page cache, which the kernel
can write back and reclaim, and the heap never holds the record whole. The
file has no name, so a crash leaves nothing behind, and its pages are
dropped unwritten when it is closed, normally before writeback would have
picked them up. Small records (most rounds of ``sync --follow``) are joined
in memory, where a few MiB cost less than the file's page faults.
"""

from __future__ import annotations

import errno
import mmap

from .errors import StorageError

# Below this a record is joined in memory: the page-cache round trip costs more than the memory it saves.
SPILL_BYTES = 16 << 20


def join(parts: list, directory: str) -> bytes | mmap.mmap:
    """The concatenation of ``parts`` (bytes-like), as bytes or, from :data:`SPILL_BYTES` on, as a
    read-only map of an unnamed file in ``directory``. ``parts`` is emptied as it is written,
    so each piece goes once it is in the file (the caller must hold no other reference to them
    for that to free them). A full disk is a StorageError, and leaves nothing behind."""
    total = sum(memoryview(p).nbytes for p in parts)
    if total < SPILL_BYTES:
        joined = b"".join(parts)
        parts.clear()
        return joined
    import tempfile  # here: it loads shutil, which commands that only read (diff, status, log) never need

    try:
        with tempfile.TemporaryFile(dir=directory) as f:
            for i in range(len(parts)):
                f.write(parts[i])
                parts[i] = None  # written: its memory can go now
            parts.clear()
            f.flush()
            return mmap.mmap(f.fileno(), total, prot=mmap.PROT_READ)
    except OSError as exc:
        parts.clear()
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise StorageError(f"{directory}: disk full while staging a record of {total} bytes ({exc.strerror})",
                               hint="free disk space and retry") from None
        raise StorageError(f"{directory}: cannot stage a record of {total} bytes ({exc})",
                           hint="check the replica directory's permissions and free space") from None
