"""Tensor files: the materialised rows of a replica, and immutable snapshots.

Each tensor is one raw little-endian, row-major file (``tensors/00000.bin``:
files are numbered by tensor id because tensor names may hold any
character). Row r of a tensor with E elements per row lives at byte
``r * E * itemsize``, so a reader memory-maps it and a writer updates rows
in place. Beside it (format v2), ``tensors/00000.digest`` holds one u64
little-endian digest per row (deltalog.rowdigest), memory-mapped and
written together with the rows, so every read of rows can be checked.

A snapshot is a directory ``snapshots/<offset, 20 digits>/`` holding the
same files plus ``manifest.json`` (offset, model id, per-file size and
xxh3-64). It is built under a temporary name, fsynced, then renamed, so a
snapshot directory either is complete or does not exist.
"""

from __future__ import annotations

import json
import mmap
import math
import os
# shutil is imported where it is used: it loads bz2 and lzma, ~2 ms of every command (issue 15).
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import xxhash

from . import kernels
from .dtypes import storage_dtype
from .errors import IntegrityError, StorageError

TENSOR_DIR = "tensors"
SNAPSHOT_DIR = "snapshots"
MANIFEST = "manifest.json"
DIGEST_SUFFIX = ".digest"  # tensors/NNNNN.digest: rows x u64 little-endian, one row digest each
DIGEST_DTYPE = np.dtype("<u8")
# The fixes users are told about, by what is damaged (verify picks one).
REPAIR_HINT = "repair the tensor files with 'deltalog replay {path} --in-place'"
FROM_TENSORS_HINT = ("'deltalog compact {path} --from-tensors' makes them the new base and drops the log and the "
                     "other snapshots, and with them every offset before the head")
RESEED_HINT = "'deltalog sync HEALTHY_REPLICA {path} --reseed' replaces it with a healthy replica's snapshot and log"
_COPY_CHUNK = 16 << 20


@dataclass(frozen=True)
class TensorInfo:
    """A tensor's place in the model: fixed at init."""

    id: int
    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def rows(self) -> int:
        return self.shape[0] if self.shape else 1

    @property
    def row_elems(self) -> int:
        return int(np.prod(self.shape[1:], dtype=np.int64)) if len(self.shape) > 1 else 1

    @property
    def storage(self) -> np.dtype:
        return storage_dtype(self.dtype)

    @property
    def row_bytes(self) -> int:
        return self.row_elems * self.storage.itemsize

    @property
    def nbytes(self) -> int:
        return self.rows * self.row_bytes

    @property
    def file(self) -> str:
        return f"{self.id:05d}.bin"

    @property
    def digest_file(self) -> str:
        return f"{self.id:05d}{DIGEST_SUFFIX}"

    def buckets(self, bucket_rows: int) -> int:
        return -(-self.rows // bucket_rows)

    def to_meta(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape), "file": self.file}


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def prefers_small_pages(model_bytes: int) -> bool:
    """Whether a model's live files (``model_bytes`` together) should be cached in small pages.

    Large writes leave a file cached in large folios (up to 2 MiB on ext4
    since Linux 6.16), and a row stored through the shared map dirties the
    whole folio it lands in. While every folio of the model fits under the
    kernel's dirty_background threshold that is cheapest: after the first
    commits every folio is dirty and writable, and a row store costs nothing
    until the next flush. A model past half that threshold is different:
    random rows dirty nearly all of it at once, writeback starts, cleans and
    write-protects folios, every row store faults again and the log's fsyncs
    queue behind gigabytes of writeback, so commits slow down as the table
    grows (issue 15; bench/commit_profile.py --steps shows it). In small
    pages a row dirties 4 KiB. False where the threshold is unknown.
    """
    threshold = _dirty_background_bytes()
    return threshold is not None and model_bytes > threshold // 2


_WILLNEED_WINDOW = 128 << 10  # the smallest readahead window in common use (the kernel's default)


def recache_in_small_pages(path: str) -> None:
    """Drop a freshly written, fsynced file from the page cache and read it back in small pages
    (see :func:`prefers_small_pages`; Linux only, and only advice: errors are ignored).

    Readahead asked for with WILLNEED fills the cache with single pages; the
    kernel reads at most one readahead window per call (8 MiB here, 128 KiB
    by default: a single call for the whole file read back its first window
    only, and commits then faulted the rest in, in large folios where the
    readahead grew them), so the file is asked for a window at a time. The
    read-back is skipped for a file larger than half of the memory: it would
    only evict what it had just read.
    """
    advise = getattr(os, "posix_fadvise", None)
    if advise is None:
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        advise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # clean pages only: the caller fsynced the file
        size = os.fstat(fd).st_size
        if size <= _meminfo_bytes("MemTotal") // 2:
            for offset in range(0, size, _WILLNEED_WINDOW):
                advise(fd, offset, _WILLNEED_WINDOW, os.POSIX_FADV_WILLNEED)
    except OSError:
        pass
    finally:
        os.close(fd)


def recache_model_files(paths: Iterable[str], model_bytes: int) -> None:
    """:func:`recache_in_small_pages` of each path when the model :func:`prefers_small_pages`."""
    if prefers_small_pages(model_bytes):
        for path in paths:
            recache_in_small_pages(path)


def recache_live_files(tensor_dir: str, infos: list[TensorInfo]) -> None:
    """:func:`recache_model_files` of every live file of a model (under ``tensor_dir``), after it
    wrote them all in bulk: commits and syncs then store rows into small pages."""
    recache_model_files(live_file_paths(tensor_dir, infos), model_file_bytes(infos))


# Row stores that dirty more than small pages could (small_page_bytes, a worst case) hit
# large folios (SmallPageGuard): a 256-byte row dirties at most its 4 KiB page and its
# digest's page in small pages, up to 2 MiB in a large folio. The margin absorbs a digest
# page written back and dirtied again within one commit. Not a per-row figure: 64 k rows
# into 1 GiB dirty 16 KiB a row in 2 MiB folios (the whole file, 3.7x the worst case),
# and only 2x it when the kernel could make some of the folios large (measured).
LARGE_FOLIO_FACTOR = 1.5
RECACHE_INTERVAL = 60.0  # least seconds between two re-caches by one writer ...
RECACHE_INTERVAL_MAX = 3600.0  # ... doubled, up to this, while they do not hold
_DECISION_SECONDS = 60.0  # how long a prefers_small_pages answer is reused (it reads three /proc files)


class SmallPageGuard:
    """Notices that a writer's row stores dirty large folios, and re-caches the model in small pages.

    The files are re-cached in small pages whenever deltalog writes them in
    bulk (:func:`recache_model_files`), but another program can bring large
    folios back: a backup, rsync or cp that read()s the files after memory
    pressure evicted their pages caches them in large folios, and a
    long-lived writer's commits then stay slow (issue 15). So the writer
    asks the kernel what its row stores dirtied (this thread's
    ``write_bytes`` in /proc/thread-self/io, two reads of ~10 us a call to
    :meth:`check`, and only for a model that :func:`prefers_small_pages`):
    small pages explain a few KiB a row, large folios tens of KiB to 2 MiB.
    Past :data:`LARGE_FOLIO_FACTOR` times the most that small pages could
    dirty (:func:`small_page_bytes`) it fsyncs the files (dirty
    pages cannot be dropped; the kernel never drops them, so no write is
    lost either way), unmaps this handle's pages (a page mapped anywhere
    is not dropped either) and re-caches every live file in small pages.
    Other processes' maps are left alone: their pages stay as they are,
    and what they read does not change. At most one re-cache per
    :data:`RECACHE_INTERVAL`, doubled while the large folios keep coming
    back, so a reader that keeps re-reading the files cannot make the
    writer loop. Where /proc/thread-self/io is missing it does nothing.
    """

    def __init__(self, maps: "TensorMaps", clock: Callable[[], float] = time.monotonic):
        self.maps = maps
        self.recaches = 0  # how many times this writer re-cached its model
        self.suppressed = 0  # large folios noticed but left alone by the rate limit
        self.last = (0, 0)  # (bytes dirtied, rows stored) of the last stores checked
        self._clock = clock
        self._wanted: tuple[float, bool] | None = None  # (when decided, prefers_small_pages)
        self._recached_at: float | None = None
        self._interval = RECACHE_INTERVAL

    def watching(self, infos: Iterable[TensorInfo]) -> bool:
        """Whether stores into this model are checked (it prefers small pages; decided anew every
        minute)."""
        now = self._clock()
        if self._wanted is None or now - self._wanted[0] > _DECISION_SECONDS:
            self._wanted = (now, prefers_small_pages(model_file_bytes(infos)))
        return self._wanted[1]

    def mark(self, infos: Iterable[TensorInfo]) -> int | None:
        """What this thread dirtied so far, before row stores; None when not watching (a small model, no /proc)."""
        return thread_dirtied_bytes() if self.watching(infos) else None

    def check(self, mark: int | None, stored: Iterable[tuple[TensorInfo, int]], infos: Iterable[TensorInfo],
              flush: Callable[[], None], dirtied_elsewhere: int = 0) -> bool:
        """After row stores (``stored``: (tensor, rows) pairs) that began at ``mark``: re-cache the model
        if they dirtied large folios; True if it did. ``flush`` fsyncs every live file.
        ``dirtied_elsewhere``: what another thread dirtied in the same pages just before (the
        writer's touch of them, kernels.touch_rows: the stores then find them dirty already)."""
        if mark is None:
            return False
        after = thread_dirtied_bytes()
        if after is None:
            return False
        stored = list(stored)
        dirtied = after - mark + dirtied_elsewhere
        self.last = (dirtied, sum(n for _info, n in stored))
        if dirtied <= LARGE_FOLIO_FACTOR * small_page_bytes(stored):
            return False
        now = self._clock()
        if self._recached_at is not None:
            since = now - self._recached_at
            if since < self._interval:
                self.suppressed += 1
                return False
            # Back so soon after the last one: someone keeps re-reading the files.
            self._interval = min(2 * self._interval, RECACHE_INTERVAL_MAX) if since < 2 * self._interval \
                else RECACHE_INTERVAL
        flush()
        self.maps.unmap_pages()
        for path in live_file_paths(self.maps.dir, infos):
            recache_in_small_pages(path)
        self._recached_at = now
        self.recaches += 1
        return True


def small_page_bytes(stored: Iterable[tuple[TensorInfo, int]]) -> int:
    """The most that storing rows (``stored``: (tensor, rows) pairs) dirties where the files are
    cached in small pages: each row's pages (one more where rows straddle page boundaries) and
    its digest's page, never more than the files hold."""
    page = mmap.PAGESIZE
    pages = 0
    for info, n in stored:
        size = info.row_bytes
        if size == 0 or n == 0:
            continue
        per_row = -(-size // page) + (0 if page % size == 0 or size % page == 0 else 1)
        pages += min(n * per_row, -(-info.nbytes // page))
        pages += min(n, -(-info.rows * DIGEST_DTYPE.itemsize // page))
    return pages * page


def thread_dirtied_bytes() -> int | None:
    """Bytes the calling thread dirtied in the page cache so far, as the kernel counts them
    (``write_bytes`` of /proc/thread-self/io: a store through a shared map counts the whole
    folio it dirtied); None where unknown."""
    try:
        with open("/proc/thread-self/io", "rb") as f:
            text = f.read()
        start = text.index(b"\nwrite_bytes:") + 13
        return int(text[start : text.index(b"\n", start)])
    except (OSError, ValueError):
        return None


def _dirty_background_bytes() -> int | None:
    """The kernel's dirty_background threshold in bytes (Linux: vm.dirty_background_bytes, else
    vm.dirty_background_ratio percent of the available memory); None where unknown."""
    try:
        with open("/proc/sys/vm/dirty_background_bytes") as f:
            explicit = int(f.read())
        if explicit:
            return explicit
        with open("/proc/sys/vm/dirty_background_ratio") as f:
            ratio = int(f.read())
    except (OSError, ValueError):
        return None
    available = _meminfo_bytes("MemAvailable")
    return available * ratio // 100 if available else None


def _meminfo_bytes(field: str) -> int:
    """A /proc/meminfo field in bytes (0 where unknown)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                name, _, rest = line.partition(":")
                if name == field:
                    return int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def live_file_paths(tensor_dir: str, infos: Iterable[TensorInfo]) -> list[str]:
    """The tensor file and the row digest file of each tensor, under ``tensor_dir``."""
    return [os.path.join(tensor_dir, name) for i in infos for name in (i.file, i.digest_file)]


def model_file_bytes(infos: Iterable[TensorInfo]) -> int:
    """The bytes of a model's live files: its tensor files and their row digest files."""
    return sum(i.nbytes + i.rows * DIGEST_DTYPE.itemsize for i in infos)


def manifest_time(manifest: dict) -> float | None:
    """A snapshot manifest's ``time`` (when the model's writer made its state), or None: older
    manifests have none, and one from a peer is only trusted to be a finite number."""
    made = manifest.get("time")
    if isinstance(made, (int, float)) and not isinstance(made, bool) and math.isfinite(made):
        return float(made)
    return None


def snapshot_dirname(offset: int) -> str:
    return f"{offset:020d}"


def map_rows(path: str, info: TensorInfo, writable: bool) -> np.ndarray:
    """A (rows, row_elems) memory map of a tensor file, checked for size."""
    if info.nbytes == 0:
        return np.zeros((info.rows, info.row_elems), dtype=info.storage)
    try:
        size = os.path.getsize(path)
    except OSError:
        raise IntegrityError(f"tensor file {path} for {info.name!r} is missing") from None
    if size != info.nbytes:
        raise IntegrityError(f"tensor file {path} for {info.name!r} has {size} bytes, expected {info.nbytes}")
    mapped = np.memmap(path, dtype=info.storage, mode="r+" if writable else "r", shape=(info.rows, info.row_elems))
    # A plain ndarray view (it keeps the map alive): np.memmap's Python-level
    # __getitem__ and __array_finalize__ cost more than a gather of a few rows.
    return mapped.view(np.ndarray)


def digest_path(tensor_path: str) -> str:
    """``tensors/NNNNN.digest`` for ``tensors/NNNNN.bin``."""
    root, _ext = os.path.splitext(tensor_path)
    return root + DIGEST_SUFFIX


def map_digests(path: str, info: TensorInfo, writable: bool) -> np.ndarray:
    """A (rows,) u64 memory map of a tensor's digest file, checked for size."""
    if info.rows == 0:
        return np.zeros(0, dtype=DIGEST_DTYPE)
    try:
        size = os.path.getsize(path)
    except OSError:
        raise IntegrityError(f"row digest file {path} for {info.name!r} is missing") from None
    if size != info.rows * DIGEST_DTYPE.itemsize:
        raise IntegrityError(
            f"row digest file {path} for {info.name!r} has {size} bytes, expected {info.rows * DIGEST_DTYPE.itemsize}"
        )
    mapped = np.memmap(path, dtype=DIGEST_DTYPE, mode="r+" if writable else "r", shape=(info.rows,))
    return mapped.view(np.ndarray)


class TensorMaps:
    """The memory maps of one replica's tensor and row digest files, made once and shared.

    The reader (deltalog.replica) and the writer (deltalog.writer) of one
    handle use the same maps. Each file's identity (device, inode) is noted
    when it is mapped: ``replay --in-place`` in another process renames
    rebuilt files over damaged ones, and a long-lived handle must then map
    the new files, not go on reading or writing the old inodes.
    """

    def __init__(self, replica_dir: str):
        self.dir = os.path.join(replica_dir, TENSOR_DIR)
        self._maps: dict[tuple[str, bool], np.ndarray] = {}
        self._identity: dict[str, tuple[int, int]] = {}
        self.reads_share_writes = False  # set once this handle writes: see _map

    def path(self, info: TensorInfo) -> str:
        return os.path.join(self.dir, info.file)

    def digest_path(self, info: TensorInfo) -> str:
        return os.path.join(self.dir, info.digest_file)

    def rows(self, info: TensorInfo, writable: bool = False) -> np.ndarray:
        """The (rows, row_elems) map of a tensor file."""
        return self._map(info, info.file, map_rows, writable)

    def digests(self, info: TensorInfo, writable: bool = False) -> np.ndarray:
        """The (rows,) u64 map of a tensor's row digests."""
        return self._map(info, info.digest_file, map_digests, writable)

    def _map(self, info: TensorInfo, name: str, mapper, writable: bool) -> np.ndarray:
        """The map of one file; a read gets a read-only view of the writable map once there is one.

        A handle that writes (``reads_share_writes``, set when it takes the
        writer lock) reads through the map it writes through. Two maps of one
        file are two sets of page-table entries for the same pages: a
        rollback at 4 GiB read every changed row through one map and wrote it
        through the other, faulting both in and tearing both down at close
        (~150 ms of unmapping each).
        """
        through_writes = writable or self.reads_share_writes
        if (name, through_writes) not in self._maps:
            path = os.path.join(self.dir, name)
            if through_writes:
                written = self._maps[name, True] = mapper(path, info, True)
                read = self._maps[name, False] = written.view()  # replaces a read-only map: it goes with its last view
                read.flags.writeable = False
            else:
                self._maps[name, False] = mapper(path, info, False)
            self._note(path)
        return self._maps[name, writable]

    def forget(self) -> None:
        """Drop every map (files were replaced, or the process is about to lose them)."""
        self._maps.clear()
        self._identity.clear()

    def unmap_pages(self) -> None:
        """Drop this handle's page-table entries of every mapped file (MADV_DONTNEED; Linux), so that
        POSIX_FADV_DONTNEED may drop their clean pages: it skips any page mapped somewhere.

        The maps stay valid: the next access faults the page back in from the cache or the
        file. On a shared map nothing written is lost (a dirty page stays dirty in the cache).
        """
        advice = getattr(mmap, "MADV_DONTNEED", None)
        if advice is None:
            return
        for view in self._maps.values():
            mapped = view
            while mapped is not None and not isinstance(mapped, mmap.mmap):
                mapped = getattr(mapped, "base", None)  # view -> np.memmap -> mmap.mmap
            if mapped is not None:
                try:
                    mapped.madvise(advice)
                except (OSError, ValueError):
                    pass

    def forget_if_replaced(self) -> None:
        """Drop every map if a mapped file was renamed over since it was mapped (a stat per file)."""
        for path, ident in self._identity.items():
            try:
                st = os.stat(path)
            except OSError:
                st = None
            if st is None or (st.st_dev, st.st_ino) != ident:
                self.forget()
                return

    def _note(self, path: str) -> None:
        try:
            st = os.stat(path)
        except OSError:
            return
        self._identity[path] = (st.st_dev, st.st_ino)


def digest_blocks(rows: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
    """(first row, digests) of ``rows`` ((n, row_elems)) in blocks of about _COPY_CHUNK bytes: bounded memory."""
    n = rows.shape[0]
    row_bytes = rows.shape[1] * rows.dtype.itemsize if rows.ndim == 2 else rows.dtype.itemsize
    step = max(1, _COPY_CHUNK // max(8, row_bytes))
    for start in range(0, n, step):
        yield start, kernels.row_digests(rows[start : start + step])


def write_digest_file(path: str, rows: np.ndarray, fsync: bool = True) -> None:
    """Write the row digests of ``rows`` ((n, row_elems), storage dtype) to ``path``, in place, fsynced.

    In place (not a rename): processes that have the file mapped see the new
    digests, as they see rows written into the tensor file.
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            with open(fd, "wb", closefd=False) as f:
                for _start, digests in digest_blocks(rows):
                    f.write(digests.astype(DIGEST_DTYPE, copy=False).tobytes())
                f.truncate()
                f.flush()
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        raise StorageError(f"cannot write {path}: {exc.strerror}", hint="check free space and permissions") from None


def rows_state_sum(info: TensorInfo, rows: np.ndarray) -> int:
    """The state digest terms (deltalog.lineage) of every row of a tensor, from its bytes, in bounded memory."""
    from . import lineage

    total = 0
    for start, digests in digest_blocks(rows):
        total += lineage.rows_sum(info.id, np.arange(start, start + len(digests), dtype=np.uint64), digests)
    return total & lineage.MASK


def file_state_sum(path: str, info: TensorInfo) -> int:
    """:func:`rows_state_sum` of a tensor file (a snapshot's: it has no digest file)."""
    return rows_state_sum(info, map_rows(path, info, writable=False))


def write_digests_of_file(tensor_path: str, info: TensorInfo) -> None:
    """Write the digest file of a tensor file already in place (its rows read through a memory map)."""
    write_digest_file(digest_path(tensor_path), map_rows(tensor_path, info, writable=False))


def write_array_file(path: str, array: np.ndarray) -> str:
    """Write an array's bytes to ``path`` (fsynced); returns its xxh3-64 hex digest."""
    digest = xxhash.xxh3_64()
    flat = np.ascontiguousarray(array).reshape(-1).view(np.uint8) if array.size else np.empty(0, np.uint8)
    try:
        with open(path, "wb") as f:
            for start in range(0, flat.size, _COPY_CHUNK):
                chunk = flat[start : start + _COPY_CHUNK]
                digest.update(chunk)
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        raise StorageError(f"cannot write {path}: {exc.strerror}", hint="check free space and permissions") from None
    return digest.hexdigest()


def file_digest(path: str) -> str:
    digest = xxhash.xxh3_64()
    with open(path, "rb") as f:
        while chunk := f.read(_COPY_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def write_snapshot(replica_dir: str, offset: int, model_id: str, tensors: Iterable[tuple[TensorInfo, np.ndarray]],
                   made_at: float | None = None) -> dict:
    """Write an immutable snapshot of ``tensors`` (arrays in storage dtype) at ``offset``.

    Returns the manifest, with the state digest of what it holds (computed
    from the arrays as they are written: deltalog.lineage) and ``time``, when
    the model's writer made that state (``made_at``; left out when unknown):
    once the records up to ``offset`` are compacted away, nothing else says
    it. Any partial directory from an earlier crash is replaced.
    """
    import shutil

    from . import lineage

    root = os.path.join(replica_dir, SNAPSHOT_DIR)
    final = os.path.join(root, snapshot_dirname(offset))
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    files = []
    state = 0
    for info, array in tensors:
        digest = write_array_file(os.path.join(tmp, info.file), array)
        files.append({**info.to_meta(), "nbytes": info.nbytes, "xxh3": digest})
        state += rows_state_sum(info, array.reshape(info.rows, info.row_elems))
    manifest = {"offset": offset, "model_id": model_id, "tensors": files, "state_digest": lineage.to_hex(state)}
    if made_at is not None:
        manifest["time"] = float(made_at)
    with open(os.path.join(tmp, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(tmp)
    if os.path.exists(final):  # a complete twin from a crashed run: same offset, same content
        shutil.rmtree(final)
    os.rename(tmp, final)
    fsync_dir(root)
    return manifest


def rewrite_manifest_file(replica_dir: str, manifest: dict) -> None:
    """Write a snapshot's manifest.json again from the log's manifest: written aside, fsynced, renamed."""
    folder = snapshot_path(replica_dir, manifest["offset"])
    path = os.path.join(folder, MANIFEST)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({k: manifest[k] for k in MANIFEST_FILE_KEYS if k in manifest}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(folder)


def snapshot_path(replica_dir: str, offset: int) -> str:
    return os.path.join(replica_dir, SNAPSHOT_DIR, snapshot_dirname(offset))


MANIFEST_FILE_KEYS = ("offset", "model_id", "tensors", "state_digest", "time")  # what manifest.json holds


def manifest_file_problem(replica_dir: str, manifest: dict) -> str | None:
    """Why a snapshot's manifest.json is not the manifest the log registered (None: it is).

    The log's copy is the one deltalog reads; the file is for people and
    for HTTP clients (GET /v1/snapshots/OFFSET/manifest.json), so it must
    not say anything else.
    """
    path = os.path.join(snapshot_path(replica_dir, manifest["offset"]), MANIFEST)
    try:
        with open(path, "rb") as f:
            held = json.loads(f.read())
    except OSError as exc:
        return f"snapshot {manifest['offset']}: cannot read {path} ({exc.strerror or exc})"
    except ValueError:
        return f"snapshot {manifest['offset']}: {path} is not JSON"
    # Older versions left out the keys that came later (a follower's state_digest, the time):
    # what the file holds must be the log's, and it must hold what every version wrote.
    if not isinstance(held, dict) or any(k not in held for k in MANIFEST_FILE_KEYS[:3]) or any(
            held.get(k) != manifest.get(k) for k in MANIFEST_FILE_KEYS if k in held) or set(held) - set(MANIFEST_FILE_KEYS):
        return f"snapshot {manifest['offset']}: {path} does not match the manifest the log registered"
    return None


def verify_snapshot(replica_dir: str, manifest: dict) -> list[str]:
    """Problems found in a snapshot's tensor files (empty when intact); manifest.json is
    :func:`manifest_file_problem`'s."""
    problems = []
    base = snapshot_path(replica_dir, manifest["offset"])
    for entry in manifest["tensors"]:
        path = os.path.join(base, entry["file"])
        where = f"snapshot {manifest['offset']}, tensor {entry['name']!r} ({path})"
        try:
            size = os.path.getsize(path)
        except OSError:
            problems.append(f"{where}: file missing")
            continue
        if size != entry["nbytes"]:
            problems.append(f"{where}: {size} bytes, expected {entry['nbytes']}")
        elif file_digest(path) != entry["xxh3"]:
            problems.append(f"{where}: checksum mismatch")
    return problems


def copy_snapshot_into_tensors(replica_dir: str, manifest: dict) -> None:
    """Overwrite the tensor files with a snapshot's files, in place, fsynced (bounded memory);
    then write each one's row digest file (snapshots carry none: their files are checksummed whole)."""
    snap = snapshot_path(replica_dir, manifest["offset"])
    infos = [TensorInfo(n, e["name"], e["dtype"], tuple(e["shape"])) for n, e in enumerate(manifest["tensors"])]
    for info, entry in zip(infos, manifest["tensors"]):
        src = os.path.join(snap, entry["file"])
        dst = os.path.join(replica_dir, TENSOR_DIR, entry["file"])
        with open(src, "rb") as fin, open(dst, "r+b" if os.path.exists(dst) else "wb") as fout:
            while piece := fin.read(_COPY_CHUNK):
                fout.write(piece)
            fout.truncate()
            fout.flush()
            os.fsync(fout.fileno())
        write_digests_of_file(dst, info)
    recache_live_files(os.path.join(replica_dir, TENSOR_DIR), infos)
