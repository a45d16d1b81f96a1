"""Array codecs used inside records: row indices, row values, undo values.

Every codec turns a numpy array into bytes and back, losslessly:

- ``delta-zstd`` for sorted row indices: first index, then gaps, in the
  narrowest unsigned width that holds them, byte-shuffled, zstd. A run of
  contiguous rows (a dense layer) becomes a run of 1s: almost free.
- ``shuffle-zstd`` for values: the bytes of each element split into planes
  (all first bytes, then all second bytes, ...), then zstd level 1 (tuned: see
  ``_compressor``).
  Exponent bytes of nearby floats repeat, so planes compress better
  (~1.19x vs ~1.08x for fp32); level 1 is as good as higher levels here.
- ``xor-shuffle-zstd`` for the values a row had before: XORed with the new
  values first, so for small SGD steps the high bits cancel (~1.4-1.65x).
- ``base-xor-shuffle-zstd``, on the wire only (a sync chunk for a destination
  that said it decodes it): the new values XORed with the destination's own
  values of those rows, byte-shuffled (1.31x where plain values give 1.17x on
  bench/workload.py's stream). Those bytes are exactly the destination's undo
  section (``xor-shuffle-zstd`` of the values it replaces), so it stores them
  as they came and compresses only the new values, as it did before.

Decoding is bounded: the caller states the exact decoded size, and a frame
that decompresses to anything else is an IntegrityError, so a hostile or
corrupt record cannot make us allocate without limit.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import TypeVar

import numpy as np
import zstandard

from . import kernels
from .errors import IntegrityError

INDEX = "delta-zstd"
VALUES = "shuffle-zstd"
XOR_VALUES = "xor-shuffle-zstd"
BASE_XOR_VALUES = "base-xor-shuffle-zstd"  # a chunk's new values, relative to the destination's

T = TypeVar("T")

_local = threading.local()  # zstd contexts are not thread-safe; one per thread


_MULTITHREAD_BYTES = 4 << 20  # below this, zstd's worker hand-off costs more than it saves
_THREADS = max(1, min(4, os.cpu_count() or 1))


# Level 1, but matches of at least 7 bytes and a 256-entry hash table: what compresses
# in a record is the sign-and-exponent plane of its values, whose short "matches" are
# chance repeats that cost more than the literals they replace, and a small table stays
# in cache. On bench/run.py's records: 1.9x faster on values, and 0.6 % smaller.
_MIN_MATCH, _HASH_LOG = 7, 8


def _compressor(nbytes: int) -> zstandard.ZstdCompressor:
    if nbytes >= _MULTITHREAD_BYTES and _THREADS > 1 and not getattr(_local, "side_by_side", False):
        # Made for this call, not kept: a multithreaded context holds on to its workers' buffers
        # (16 MiB after a 64 MB input) for as long as it lives, and every thread that compressed a
        # large section kept one. Making one costs nothing measurable next to compressing 4 MiB.
        return zstandard.ZstdCompressor(compression_params=_parameters(_THREADS))
    c = getattr(_local, "cctx", None)
    if c is None:
        c = _local.cctx = zstandard.ZstdCompressor(compression_params=_parameters(0))
    return c


def _parameters(threads: int) -> zstandard.ZstdCompressionParameters:
    return zstandard.ZstdCompressionParameters(compression_level=1, min_match=_MIN_MATCH, hash_log=_HASH_LOG,
                                               write_content_size=1, threads=threads)


def _decompressor() -> zstandard.ZstdDecompressor:
    d = getattr(_local, "dctx", None)
    if d is None:
        d = _local.dctx = zstandard.ZstdDecompressor()
    return d


_PARALLEL_BYTES = 1 << 20  # below this, handing sections to threads costs more than it saves
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def run_jobs(jobs: list[Callable[[], T]], nbytes: int) -> list[T]:
    """Results of ``jobs`` in order: on a small thread pool when they encode ``nbytes`` or more.

    zstd and numpy's copies release the GIL, so the sections of one large
    record compress on all cores (commit, rollback and sync all write large records).
    """
    if nbytes < _PARALLEL_BYTES or len(jobs) < 2 or _THREADS < 2:
        return [job() for job in jobs]
    return [future.result() for future in [submit(job) for job in jobs]]


def submit(job: Callable[[], T]) -> "Future[T]":
    """Start ``job`` on the section pool now (``run_jobs``'s threads): for a writer that hands over
    each section as soon as its values are known, so compression overlaps the rest of its work."""
    global _pool
    if _THREADS < 2:
        done: Future = Future()
        try:
            done.set_result(job())
        except BaseException as exc:
            done.set_exception(exc)
        return done
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=_THREADS, thread_name_prefix="deltalog-codec",
                                       initializer=_compress_side_by_side)
    return _pool.submit(job)


def _compress_side_by_side() -> None:
    """Mark a section pool thread: its sections compress next to each other, one per core, so
    each with zstd's single-threaded context. Two multithreaded ones would put twice the
    workers on the cores, and their buffers on top (two 48 MiB sections side by side: 1.2x
    slower, +30 MiB at the peak)."""
    _local.side_by_side = True


_background: dict[str, ThreadPoolExecutor] = {}  # lane -> its one thread


def in_background(job: Callable[[], T], lane: str = "encode") -> "Future[T]":
    """Start ``job`` on the thread of ``lane`` and return its future, so the caller overlaps other
    work with it (a commit fills the bucket index while its record compresses).

    Not on the section pool: ``job`` may itself wait on that pool (encode does),
    and holding one of its few workers while waiting would serialise the sections.
    Jobs of one lane run one after another; a job that must not queue behind
    another lane's (a page touch behind an encode waiting for its sections) has
    a lane of its own.
    """
    with _pool_lock:
        executor = _background.get(lane)
        if executor is None:
            executor = _background[lane] = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"deltalog-{lane}")
    return executor.submit(job)


_pair_pool: ThreadPoolExecutor | None = None


def map_in_pairs(job: Callable[[T], object], items: list[T], costs: list[int]) -> list:
    """``[job(item) for item in items]``, two at a time while no two together cost more than the
    costliest one alone (its bytes of values, say), so the peak stays what one-at-a-time had.

    For a loop over tensors whose work is mostly serial (a sync source walks
    the log record by record for each tensor's old values): the small ones
    then share both cores, while the largest runs alone. The costliest go
    first. Below _PARALLEL_BYTES in all, one at a time. On a pool of its
    own: ``job`` may wait on the section pool.
    """
    global _pair_pool
    if sum(costs) < _PARALLEL_BYTES or len(items) < 2 or _THREADS < 2:
        return [job(item) for item in items]
    with _pool_lock:
        if _pair_pool is None:
            _pair_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="deltalog-pair")
    budget = max(costs)
    futures: list = [None] * len(items)
    running: dict = {}  # future -> its cost
    try:
        for i in sorted(range(len(items)), key=lambda i: -costs[i]):
            while running and sum(running.values()) + costs[i] > budget:
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for f in done:
                    del running[f]
                    f.result()  # a failure stops the loop here
            futures[i] = _pair_pool.submit(job, items[i])
            running[futures[i]] = costs[i]
    finally:
        wait(running)  # nothing left running when this returns or raises
    return [f.result() for f in futures]


_inherited: list = []  # what a forked child must never free (see below)


def _forget_pool_in_child() -> None:
    """A forked child has none of the parent's threads: it starts its own pool and zstd contexts.

    The parent's are kept, never freed: freeing a multithreaded zstd context
    joins its worker threads, which do not exist in the child (it would hang).
    """
    global _pool, _pool_lock, _local, _background, _pair_pool
    _inherited.append((_pool, _local, _background, _pair_pool))
    _pool, _pool_lock, _local, _background, _pair_pool = None, threading.Lock(), threading.local(), {}, None


os.register_at_fork(after_in_child=_forget_pool_in_child)


_SHRINK_BYTES = 64 << 10  # what a compressed result must leave unused (and a quarter of it) to be copied to its size


def compress(data) -> bytes:
    nbytes = memoryview(data).nbytes
    out = _compressor(nbytes).compress(data)
    # python-zstandard's result keeps its worst-case allocation (about the input's
    # size), however small it compressed: a copy of what it holds frees the rest
    # (a record's sections otherwise weigh what their values weigh until it is joined).
    if nbytes - len(out) >= max(_SHRINK_BYTES, nbytes >> 2):  # not plain values (~1.19x): their copy saves little
        out = bytes(memoryview(out))
    return out


def decompress(data, size: int, what: str) -> bytes:
    """Decompress a frame that must decode to exactly ``size`` bytes."""
    if size == 0:
        return b""
    try:
        out = _decompressor().decompress(data, max_output_size=size)
    except zstandard.ZstdError as exc:
        raise IntegrityError(f"{what}: corrupt compressed data ({exc})") from None
    if len(out) != size:
        raise IntegrityError(f"{what}: decoded {len(out)} bytes, expected {size}")
    return out


def shuffle(array: np.ndarray, xor_with: np.ndarray | None = None) -> np.ndarray:
    """Byte planes of an array: plane j holds byte j of every element (of ``array`` XOR
    ``xor_with``, bitwise, when that is given)."""
    other = None if xor_with is None else np.ascontiguousarray(xor_with)
    return kernels.shuffle_planes(np.ascontiguousarray(array), other)


def unshuffle(planes: bytes, dtype: np.dtype, xor_with: np.ndarray | None = None) -> np.ndarray:
    """The array whose byte planes are ``planes`` (XORed with ``xor_with``, bitwise, when given):
    a new, writable 1-d array."""
    return kernels.join_planes(np.frombuffer(planes, dtype=np.uint8), dtype, xor_with)


def _join_planes(raw: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """The elements whose byte planes are the uint8 array ``raw`` (``raw`` itself, viewed, for 1-byte elements)."""
    return raw.view(dtype) if dtype.itemsize == 1 else kernels.join_planes(raw, dtype)


# -- row indices -------------------------------------------------------------

_WIDTHS = (np.dtype("<u1"), np.dtype("<u2"), np.dtype("<u4"), np.dtype("<u8"))


def encode_indices(rows: np.ndarray) -> tuple[bytes, int]:
    """Encode sorted, unique row indices. Returns (payload, decoded size)."""
    rows = np.asarray(rows, dtype=np.uint64)
    if rows.size == 0:
        return b"", 0
    gaps = np.empty_like(rows)
    gaps[0] = rows[0]
    np.subtract(rows[1:], rows[:-1], out=gaps[1:])
    top = int(gaps.max())
    width = next(w for w in _WIDTHS if top < (1 << (8 * w.itemsize)))
    planes = shuffle(gaps.astype(width))
    raw = bytes([width.itemsize]) + planes.tobytes()
    return compress(raw), len(raw)


def decode_indices(payload, size: int, count: int, what: str) -> np.ndarray:
    """Sorted unique rows (uint64) from a ``delta-zstd`` payload.

    The gaps stay in their stored width until the cumulative sum widens
    them (no uint64 copy of the gaps, no copy of a 1-byte plane): this runs
    once per tensor per record on every diff and sync.
    """
    if count == 0:
        return np.empty(0, dtype=np.uint64)
    raw = decompress(payload, size, what)
    width = raw[0]
    if width not in (1, 2, 4, 8) or len(raw) != 1 + count * width:
        raise IntegrityError(f"{what}: bad row index section")
    gaps = _join_planes(np.frombuffer(raw, dtype=np.uint8, offset=1), _WIDTHS[width.bit_length() - 1])
    if count > 1 and np.count_nonzero(gaps[1:]) != count - 1:  # a gap of 0 repeats a row
        raise IntegrityError(f"{what}: row indices not strictly increasing")
    return np.add.accumulate(gaps, dtype=np.uint64)  # np.cumsum's wrapper costs ~1 us a call here


# -- values ------------------------------------------------------------------

# With ``by_plane``, a section from this size on has its byte planes made and compressed one
# at a time (one zstd frame all the same, decoded as before): it then needs a plane's worth
# of memory besides its values and its output, not the values' worth again. It costs time
# (numpy's strided copy per plane: ~2x for plain values), so only a sync destination, whose
# memory is bounded by the change, asks for it; below this size the one-pass kernel is used.
PLANE_BY_PLANE_BYTES = 4 << 20


class _Output:
    """Where a streamed frame is written: one buffer of zstd's worst-case size, of which only
    the pages written are ever memory (numpy leaves a large allocation untouched)."""

    def __init__(self, nbytes: int):
        self.buf = np.empty(nbytes + (nbytes >> 8) + (1 << 17), dtype=np.uint8)
        self.size = 0

    def write(self, data) -> int:
        n = len(data)
        if self.size + n > len(self.buf):  # past zstd's bound: cannot happen, but never overflow
            grown = np.empty(2 * (self.size + n), dtype=np.uint8)
            grown[: self.size] = self.buf[: self.size]
            self.buf = grown
        self.buf[self.size : self.size + n] = np.frombuffer(data, dtype=np.uint8)
        self.size += n
        return n

    def payload(self) -> memoryview:
        return memoryview(self.buf[: self.size])


def _compress_by_plane(values: np.ndarray, xor_with: np.ndarray | None = None) -> tuple[memoryview, int]:
    """What ``compress(shuffle(values, xor_with))`` encodes, holding one byte plane at a time."""
    itemsize = values.dtype.itemsize
    nbytes = values.nbytes
    elements = np.ascontiguousarray(values).reshape(-1).view(np.uint8).reshape(-1, itemsize)
    other = None if xor_with is None else np.ascontiguousarray(xor_with).reshape(-1).view(np.uint8).reshape(-1, itemsize)
    stream = _compressor(0).compressobj(size=nbytes)  # zstd's own workers would copy what they read
    out = _Output(nbytes)
    plane = np.empty(len(elements), dtype=np.uint8)
    for j in range(itemsize):
        if other is None:
            np.copyto(plane, elements[:, j])
        else:
            np.bitwise_xor(elements[:, j], other[:, j], out=plane)
        out.write(stream.compress(plane))
    out.write(stream.flush())
    return out.payload(), nbytes


def _plane_by_plane(values: np.ndarray, by_plane: bool) -> bool:
    return by_plane and values.nbytes >= PLANE_BY_PLANE_BYTES and values.dtype.itemsize > 1


def encode_values(values: np.ndarray, by_plane: bool = False) -> tuple[bytes | memoryview, int]:
    """Values as ``shuffle-zstd``: (payload, decoded size). ``by_plane``: see PLANE_BY_PLANE_BYTES."""
    if _plane_by_plane(values, by_plane):
        return _compress_by_plane(values)
    planes = shuffle(values)
    return compress(planes), planes.nbytes


def decode_values(payload, size: int, dtype: np.dtype, shape: tuple[int, ...], what: str,
                  xor_with: np.ndarray | None = None) -> np.ndarray:
    if size != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
        raise IntegrityError(f"{what}: section size does not match its shape")
    raw = decompress(payload, size, what)
    return unshuffle(raw, dtype, xor_with).reshape(shape)


def _bits(array: np.ndarray) -> np.ndarray:
    return array.view(np.dtype(f"<u{array.dtype.itemsize}"))


def encode_xor_values(old: np.ndarray, new: np.ndarray, in_place: bool = False,
                      by_plane: bool = False) -> tuple[bytes | memoryview, int]:
    """Encode ``old`` relative to ``new`` (the decoder always has ``new``).

    ``in_place``: ``old`` is the caller's to spoil. The compiled pass XORs
    while it makes the byte planes and needs no temporary either way; the
    numpy fallback then XORs into ``old`` (one array less). ``by_plane``:
    see PLANE_BY_PLANE_BYTES."""
    if old.shape != new.shape or old.dtype.itemsize != new.dtype.itemsize:
        raise ValueError("old and new values must have the same shape and element size")
    if _plane_by_plane(old, by_plane):
        return _compress_by_plane(old, new)
    if in_place and not kernels.enabled() and old.flags.writeable and old.flags.c_contiguous:
        bits = _bits(old)
        planes = shuffle(np.bitwise_xor(bits, _bits(np.ascontiguousarray(new)), out=bits))
    else:
        planes = shuffle(old, xor_with=new)  # XOR and byte planes in one pass
    return compress(planes), planes.nbytes


def decode_xor_values(payload, size: int, new: np.ndarray, what: str) -> np.ndarray:
    """The values encoded relative to ``new`` (an undo section; a chunk's values relative to the base)."""
    return decode_values(payload, size, new.dtype, new.shape, what, xor_with=new)  # a new array
