"""The replica directory's fixed names and the format's version numbers.

    DELTALOG            marker: "deltalog replica" + the read version
    lock                writer lock (deltalog.lock)
    log/                LMDB environment (deltalog.store)
    tensors/            tensor files and their row digests (deltalog.tensorfiles)
    snapshots/OFFSET/   immutable checksummed copies of all tensors

Versions follow SQLite (formats/FORMAT.md section 1): meta/format holds the
version that wrote the replica and the oldest version that can read it; the
marker holds the read version, which every reader checks first.
"""

from __future__ import annotations

import os

from . import tensorfiles
from .errors import IntegrityError, NotAReplica, StorageError, UnsupportedVersion

MARKER = "DELTALOG"
LOG_DIR = "log"
FORMAT_VERSION = 4  # what this code writes (and the newest it reads)
READ_VERSION = 3  # the oldest code that can read what it writes; also the DELTALOG marker's number
DIGEST_VERSION = 2  # the first write version with row digest files (tensors/NNNNN.digest)
RECORD_V2_VERSION = 3  # the first write version whose log may hold records of encoding v2 (deltalog.record)
LINEAGE_VERSION = 4  # the first write version with state digests (deltalog.lineage)


def marker_text() -> str:
    # The marker holds the read version, which every reader checks first: a
    # v1 or v2 reader refuses a marker above its own version. (Format 2 kept 1
    # here, so v1 readers opened it read-only; format 3 logs hold records they
    # cannot decode. Format 4 only adds keys v3 readers ignore: it stays 3.)
    return f"deltalog replica\nformat {READ_VERSION}\n"


def write_marker(path: str, fsync_parent: bool = True) -> None:
    """Write the DELTALOG marker of this version, durably: written aside, fsynced, renamed."""
    marker = os.path.join(path, MARKER)
    tmp = marker + ".upgrade-tmp"
    try:
        with open(tmp, "w") as f:
            f.write(marker_text())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, marker)
        tensorfiles.fsync_dir(path)
    except OSError as exc:
        raise StorageError(f"{path}: cannot write the {MARKER} marker: {exc.strerror or exc}") from None


def sync_staging_path(path: str) -> str:
    """Where a first sync builds the replica ``path`` before renaming it into place (resumable)."""
    path = os.path.abspath(path)
    return os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.deltalog-sync")


def is_replica(path: str) -> bool:
    return os.path.isfile(os.path.join(path, MARKER))


def check_marker(path: str) -> None:
    """NotAReplica / UnsupportedVersion unless ``path`` holds a replica we can read."""
    marker = os.path.join(path, MARKER)
    if not os.path.isdir(path) or not os.listdir(path):
        if os.path.isdir(sync_staging_path(path)):
            raise NotAReplica(f"{path}: not a replica yet: a first sync into it has not completed (running or stopped)",
                              hint="run the same 'deltalog sync SRC DST' again: it resumes")
        if not os.path.isdir(path):
            raise NotAReplica(f"{path}: no such replica directory", hint="create one with 'deltalog init'")
    try:
        with open(marker) as f:
            lines = f.read(256).splitlines()
    except FileNotFoundError:
        raise NotAReplica(f"{path}: not a deltalog replica (no {MARKER} file)", hint="create one with 'deltalog init'") from None
    damaged = IntegrityError(
        f"{path}: damaged {MARKER} marker file",
        hint=f"it holds two lines, 'deltalog replica' and 'format N' (N: the oldest format that reads the replica, "
             f"{READ_VERSION} for one this version wrote); or 'deltalog sync HEALTHY_REPLICA NEW_DIR' makes a copy",
    )
    if not lines or lines[0] != "deltalog replica" or len(lines) < 2 or not lines[1].startswith("format "):
        raise damaged
    try:
        version = int(lines[1].split()[1])
    except (IndexError, ValueError):
        raise damaged from None
    if version > FORMAT_VERSION:  # the marker holds the replica's read version
        raise UnsupportedVersion(f"{path}: replica needs format v{version} to read, this deltalog reads up to v{FORMAT_VERSION}")
