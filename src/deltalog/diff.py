"""Compare two models: replicas, a replica at an earlier offset, or checkpoints.

A side is a replica pinned to one offset (its head when opened, or a
retained ``REPLICA@OFFSET``) or a checkpoint. What the comparison costs
depends on what the two sides share:

* Two replicas of one model (same model id, same layout), or one replica
  at two offsets. What proves they share a history is the state digest
  (deltalog.lineage), a fingerprint of the whole model at each offset:

  1. Equal state digests at the two sides' offsets: identical, nothing is
     read (``digest``). One replica at one offset likewise (``same-offset``).
  2. An *anchor*: an offset m where both sides are proven to hold one model
     (one replica: either offset; two replicas: an offset both retain with
     equal digests, their own offsets first, then A's records newest
     first). The candidates are the rows records wrote between m and each
     side's offset, on that side (``history.changed_rows``; only their
     row-index sections are decoded, checksums checked): exactly the rows
     that can differ (``log``).
  3. The candidates' values at each side's offset are compared bitwise: a
     row rewritten to the same bytes is no change. Each side is read at a
     head pinned when the diff starts; rows its writer wrote after the
     side's own offset are put back from a patch built once from the log.
     When neither side needs patching for a tensor (both at their heads:
     the common case), the compiled loop (deltalog.kernels) compares the
     rows straight from the two memory maps, a small block at a time,
     checking each row's digest on the way, on two threads. Otherwise rows
     are read a cache-sized step at a time, both sides at once.

  The cost follows the change (rows written since the anchor), never the
  model. Two replicas with no anchor (another history under the same model
  id, or a log compacted past every offset they shared) are compared by
  value, as checkpoints are: slower, never wrong.

* A plain checkpoint on either side, or replicas of different models with
  ``force``: every row is compared by value, a chunk of about 32 MiB per
  side at a time, so memory stays bounded whatever the tensor's size.

Numbers are over the delta B - A in float64 (bfloat16 widened exactly by
:func:`deltalog.dtypes.as_float`, integers and bool as float64). Elements
whose delta is not finite (NaN, infinity) count towards ``nonfinite_rows``
and are left out of l2, max_abs and significance.

A replica in the middle of a partial sync holds rows newer than its head in
its files, which the in-place comparison cannot see past; diff refuses it
(LockHeld) rather than report wrong numbers, also when the sync begins
while diff is reading (every read checks for it before and after).
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from . import kernels, lineage
from .dtypes import as_float, bits_dtype, rows_differ
from .errors import InvalidInput, LockHeld, ModelMismatch, NotAReplica, OffsetNotRetained
from .history import changed_rows, check_retained, parse_offset, resolve_offset, sorted_union, values_at
from .pending import pending_marker
from .layout import MARKER
from .replica import DEFAULT_BUCKET_ROWS, Replica

if TYPE_CHECKING:
    from .checkpoint import CheckpointTensor

CHUNK_BYTES = 32 << 20  # per side, per step of a value comparison
STATS_CHUNK_BYTES = 256 << 10  # float64 deltas per pass of the numpy statistics: stays in cache
STEP_BYTES = 256 << 10  # per side, per step of a comparison through the log: stays in cache
PASS_ROWS = 4096  # rows per pass of an in-place comparison: small passes keep both threads busy to the end

Progress = Callable[[str, int, int], None]


# -- sides ------------------------------------------------------------------------


@dataclass
class ReplicaSide:
    """A replica as it was at ``offset`` (a retained offset, pinned when the side was made)."""

    replica: Replica
    offset: int
    spec: str
    state_digest: int | None = None  # of the model at ``offset`` (None: the log cannot tell)
    kind = "replica"

    @classmethod
    def at(cls, replica: Replica, offset: int | None = None, spec: str | None = None) -> "ReplicaSide":
        """The replica at ``offset`` (default: its head now). OffsetNotRetained if it cannot be rebuilt."""
        if offset is None:
            state = replica.state
            offset, digest = state.head, state.digest
        else:
            offset = int(offset)
            check_retained(replica, offset)
            digest = replica.state_digest_at(offset)
        return cls(replica, offset, spec or replica.path, digest)

    @property
    def model_id(self) -> str:
        return self.replica.model_id

    @property
    def bucket_rows(self) -> int:
        return self.replica.bucket_rows

    def layout(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        return {t.name: (t.dtype, tuple(t.shape)) for t in self.replica.tensors}

    def describe(self) -> dict:
        return {"spec": self.spec, "kind": self.kind, "path": os.path.abspath(self.replica.path),
                "model_id": self.model_id, "offset": self.offset, "state_digest": lineage.to_hex(self.state_digest)}


@dataclass
class CheckpointSide:
    """A checkpoint's tensors (storage dtype, possibly memory-mapped)."""

    tensors: Mapping[str, CheckpointTensor]
    spec: str
    metadata: Mapping[str, str] = field(default_factory=dict)
    kind = "checkpoint"
    offset = None
    bucket_rows = None

    @classmethod
    def read(cls, path: str, spec: str | None = None, recursive: bool = False) -> "CheckpointSide":
        # Imported here: the checkpoint readers (zipfile, tempfile, ...) cost a replica-only diff ~8 ms of start-up.
        from .checkpoint import read_checkpoint, read_checkpoint_metadata

        return cls(read_checkpoint(path, recursive), spec or path, read_checkpoint_metadata(path))

    @property
    def model_id(self) -> str | None:
        return self.metadata.get("deltalog.model_id")

    def layout(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        return {name: (t.dtype, tuple(t.shape)) for name, t in self.tensors.items()}

    def describe(self) -> dict:
        return {"spec": self.spec, "kind": self.kind, "path": os.path.abspath(self.spec),
                "model_id": self.model_id, "offset": None, "state_digest": None}


Side = ReplicaSide | CheckpointSide


def _is_replica_dir(path: str) -> bool:
    return os.path.isdir(path) and os.path.exists(os.path.join(path, MARKER))


def _holds_npy(path: str) -> bool:
    return any(f.endswith(".npy") for _d, _s, files in os.walk(path) for f in files)


def parse_spec(spec: str) -> tuple[str, str, int | str | None]:
    """("replica", path, offset or None) or ("checkpoint", path, None) for a command-line side.

    A replica directory (it has a DELTALOG file) is a replica at its head;
    ``PATH@N`` with PATH a replica is that replica at offset N, and
    ``PATH@head~N`` or ``PATH@-N`` N retained offsets before its head (the
    text is kept, for history.resolve_offset); any other existing path is a
    checkpoint.
    """
    if not spec:
        raise InvalidInput("empty model path")
    if _is_replica_dir(spec):
        return "replica", spec, None
    path, at, offset = spec.rpartition("@")
    if at and path and _is_replica_dir(path):
        try:
            return "replica", path, parse_offset(offset)
        except InvalidInput:
            raise InvalidInput(f"{spec}: {offset!r} is not an offset",
                               hint="write REPLICA@OFFSET, REPLICA@head~N or REPLICA@-N, e.g. models/a@42") from None
    if os.path.exists(spec):
        if os.path.isdir(spec) and not _holds_npy(spec):
            raise NotAReplica(f"{spec}: neither a replica (no {MARKER} file) nor a checkpoint (no .npy files)",
                              hint="create a replica with 'deltalog init'")
        return "checkpoint", spec, None
    if at and path and os.path.exists(path):
        raise InvalidInput(f"{spec}: {path} is not a replica, so it has no offsets",
                           hint="REPLICA@OFFSET needs a replica directory; checkpoints are compared as they are")
    raise NotAReplica(f"{spec}: no such replica or checkpoint",
                      hint="give a replica directory, REPLICA@OFFSET, or a .npz/.safetensors/.npy-dir checkpoint")


@contextmanager
def open_side(spec: str, recursive: bool = False) -> Iterator[Side]:
    """Open one side of a diff from its command-line spelling; closes what it opened.
    ``recursive``: a directory checkpoint's subdirectories are read too (checkpoint.read_checkpoint)."""
    kind, path, offset = parse_spec(spec)
    if kind == "checkpoint":
        yield CheckpointSide.read(path, spec, recursive)
        return
    with Replica.open(path) as replica:
        yield ReplicaSide.at(replica, None if offset is None else resolve_offset(replica, offset), spec)


@contextmanager
def open_sides(specs: Iterable[str], recursive: bool = False) -> Iterator[list[Side]]:
    """Open the sides of a diff, like :func:`open_side` each, but a replica named by several sides
    (``A@K A``) is opened once: both sides read the same maps, so a new process faults its pages in,
    and tears them down at exit, once rather than twice (~0.1 s a side at 4 GiB)."""
    with ExitStack() as stack:
        opened: dict[str, Replica] = {}
        sides: list[Side] = []
        for spec in specs:
            kind, path, offset = parse_spec(spec)
            if kind == "checkpoint":
                sides.append(CheckpointSide.read(path, spec, recursive))
                continue
            replica = opened.get(os.path.abspath(path))
            if replica is None:
                replica = opened[os.path.abspath(path)] = stack.enter_context(Replica.open(path))
            sides.append(ReplicaSide.at(replica, None if offset is None else resolve_offset(replica, offset), spec))
        yield sides


# -- results ----------------------------------------------------------------------


@dataclass
class TensorDiff:
    """What changed in one tensor, B - A."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    bucket_rows: int
    top_k: int = 10
    changed_rows: int = 0
    changed_buckets: int = 0
    rows_compared: int = 0
    nonfinite_rows: int = 0
    zero_rows: int = 0  # bytes differ, numbers equal (-0.0 vs 0.0)
    significance: float = 0.0
    max_abs: float = 0.0
    sum_squares: float = 0.0
    histogram: dict[int, int] = field(default_factory=dict)  # floor(log10(row l2)) -> rows
    top_rows: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    top_l2: np.ndarray = field(default_factory=lambda: np.empty(0, np.float64))
    _last_bucket: int = -1

    @property
    def l2(self) -> float:
        return math.sqrt(self.sum_squares)

    def compare(self, rows: np.ndarray, a: np.ndarray, b: np.ndarray) -> None:
        """Account for ``rows`` (ascending, after any rows seen before) holding ``a`` on A and ``b`` on B."""
        fast = kernels.compare_rows(a, b, self.dtype) if len(rows) else None
        if fast is not None:
            self.account(np.asarray(rows, dtype=np.int64), fast, lambda pick: (a[pick], b[pick]))
            return
        self.rows_compared += len(rows)
        if not len(rows):
            return
        differs = rows_differ(a, b)
        if differs.all():
            self._changed(np.asarray(rows, dtype=np.int64), a, b)
        elif differs.any():
            keep = np.flatnonzero(differs)
            self._changed(np.asarray(rows, dtype=np.int64)[keep], a[keep], b[keep])

    def account(self, rows: np.ndarray, fast: kernels.RowComparison,
                values: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]) -> None:
        """Account for ``rows`` (ascending, after any rows seen before) as the compiled loop compared them.

        The same numbers as :meth:`compare`'s numpy path. ``values(pick)``
        gives (A, B) values of the rows at positions ``pick``: needed only
        for rows the loop left to numpy (status 2: NaN, infinity, huge
        deltas, or a dtype it has no loop for).
        """
        self.rows_compared += len(rows)
        changed = np.flatnonzero(fast.status)
        if not len(changed):
            return
        self._count_rows(rows[changed])
        self.significance += fast.sum_abs
        self.max_abs = max(self.max_abs, fast.max_abs)
        self.sum_squares += float(fast.row_squares.sum())  # 0 for rows of status 0 and 2
        row_l2 = np.sqrt(fast.row_squares[changed])
        special = fast.status[changed] == 2
        normal = row_l2
        if special.any():  # numpy's element-wise path, for these rows only
            pick = changed[special]
            a, b = values(pick)
            with np.errstate(invalid="ignore", over="ignore"):
                delta = np.subtract(as_float(b, self.dtype), as_float(a, self.dtype), dtype=np.float64)
            row_l2[special] = self._stats_nonfinite(delta.reshape(len(pick), -1))
            normal = row_l2[~special]
        self._count(normal[normal > 0], int(np.count_nonzero(normal == 0)))
        if self.top_k:
            self._keep_top(rows[changed], row_l2)

    def _count_rows(self, rows: np.ndarray) -> None:
        """Count changed rows and the buckets they fall in (rows ascending, after any counted before)."""
        self.changed_rows += len(rows)
        buckets = rows // self.bucket_rows
        distinct = buckets[np.r_[True, buckets[1:] != buckets[:-1]]]
        self.changed_buckets += len(distinct) - int(distinct[0] == self._last_bucket)
        self._last_bucket = int(distinct[-1])

    def _changed(self, rows: np.ndarray, a: np.ndarray, b: np.ndarray) -> None:
        self._count_rows(rows)
        # The statistics run over slices of ~256 KiB of float64 deltas, in two
        # buffers reused by every slice: the passes below then stay in cache.
        step = max(1, STATS_CHUNK_BYTES // (8 * max(1, a.shape[1])))
        n = min(step, len(rows))
        buffers = (np.empty((n, a.shape[1])), np.empty((n, a.shape[1])))
        ranks = [self._stats(a[i : i + step], b[i : i + step], buffers) for i in range(0, len(rows), step)]
        if self.top_k:
            self._keep_top(rows, np.concatenate(ranks))

    def _stats(self, a: np.ndarray, b: np.ndarray, buffers: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
        """Add the statistics of some changed rows; returns their rank for top-k (row l2, inf if not finite)."""
        delta, squares = buffers[0][: len(a)], buffers[1][: len(a)]
        with np.errstate(invalid="ignore", over="ignore"):
            # float64 holds the difference of two float32 (or narrower) values exactly.
            np.subtract(as_float(b, self.dtype), as_float(a, self.dtype), out=delta, dtype=np.float64)
            np.multiply(delta, delta, out=squares)
            row_squares = squares.sum(axis=1)
        if not np.isfinite(row_squares).all():  # NaN or inf in the delta, or squares past 1e308: rare
            return self._stats_nonfinite(delta.copy())
        mag = np.abs(delta, out=delta)
        self.significance += float(mag.sum())
        self.max_abs = max(self.max_abs, float(mag.max()))
        self.sum_squares += float(row_squares.sum())
        row_l2 = np.sqrt(row_squares)
        self._count(row_l2[row_l2 > 0], int(np.count_nonzero(row_l2 == 0)))
        return row_l2

    def _stats_nonfinite(self, delta: np.ndarray) -> np.ndarray:
        """:meth:`_stats` for rows holding NaN or infinite deltas (left out of the sums) or huge ones."""
        with np.errstate(invalid="ignore", over="ignore"):
            mag = np.abs(delta)
            finite = np.isfinite(mag)
            mag = np.where(finite, mag, 0.0)
            squares = mag * mag
            row_l2 = np.sqrt(squares.sum(axis=1))
        nonfinite = ~finite.all(axis=1)
        overflow = np.isinf(row_l2)
        if overflow.any():  # squares past 1e308 (float64 deltas past 1e154): scale the row first
            big = mag[overflow]
            scale = big.max(axis=1)
            with np.errstate(over="ignore"):
                row_l2[overflow] = scale * np.sqrt(((big / scale[:, None]) ** 2).sum(axis=1))
        self.nonfinite_rows += int(nonfinite.sum())
        self.significance += float(mag.sum())
        self.sum_squares += float(squares.sum())
        self.max_abs = max(self.max_abs, float(mag.max()))
        ok = ~nonfinite
        self._count(row_l2[ok & (row_l2 > 0)], int(np.count_nonzero(ok & (row_l2 == 0))))
        return np.where(nonfinite, np.inf, row_l2)  # a row that became NaN or inf matters most

    def _count(self, positive_l2: np.ndarray, zero_rows: int) -> None:
        self.zero_rows += zero_rows
        if positive_l2.size:
            exps = np.floor(np.log10(positive_l2)).astype(np.int64)  # within [-324, 308]: a small bincount
            low = int(exps.min())
            counts = np.bincount(exps - low)
            for e in np.flatnonzero(counts).tolist():
                self.histogram[low + e] = self.histogram.get(low + e, 0) + int(counts[e])

    def _keep_top(self, rows: np.ndarray, rank: np.ndarray) -> None:
        """Keep the top_k rows by rank (ties: lower row first) among those kept so far and ``rows``."""
        k = self.top_k
        if len(rank) > 4 * k:  # only rows ranked at least the k-th largest can make it
            kth = np.partition(rank, len(rank) - k)[len(rank) - k]
            pick = rank >= kth
            rows, rank = rows[pick], rank[pick]
        all_rows = np.concatenate([self.top_rows, rows])
        all_rank = np.concatenate([self.top_l2, rank])
        order = np.lexsort((all_rows, -all_rank))[:k]
        self.top_rows, self.top_l2 = all_rows[order], all_rank[order]

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "dtype": self.dtype,
            "shape": list(self.shape),
            "changed_rows": self.changed_rows,
            "changed_buckets": self.changed_buckets,
            "rows_compared": self.rows_compared,
            "l2": _number(self.l2),
            "max_abs": _number(self.max_abs),
            "significance": _number(self.significance),
            "nonfinite_rows": self.nonfinite_rows,
            "zero_rows": self.zero_rows,
            "top": [{"row": int(r), "l2": _number(float(v))} for r, v in zip(self.top_rows, self.top_l2)],
            "histogram": [{"log10": e, "count": self.histogram[e]} for e in sorted(self.histogram)],
        }


def _number(x: float) -> float | None:
    """JSON has no NaN or infinity: those become null."""
    return x if math.isfinite(x) else None


@dataclass
class DiffResult:
    a: dict  # describe() of each side
    b: dict
    method: str  # "digest" | "same-offset" | "log" | "values"
    bucket_rows: int
    tensors: list[TensorDiff]
    incomparable: list[dict]  # {name, reason, a: {dtype, shape} | None, b: ...}
    anchor: int | None = None  # "log": an offset where both sides were proven to hold one model

    @property
    def a_offset(self) -> int | None:
        return self.a["offset"]

    @property
    def b_offset(self) -> int | None:
        return self.b["offset"]

    @property
    def changed_rows(self) -> int:
        return sum(t.changed_rows for t in self.tensors)

    @property
    def changed_buckets(self) -> int:
        return sum(t.changed_buckets for t in self.tensors)

    @property
    def rows_compared(self) -> int:
        return sum(t.rows_compared for t in self.tensors)

    @property
    def identical(self) -> bool:
        return self.changed_rows == 0 and not self.incomparable

    def tensor(self, name: str) -> TensorDiff:
        for t in self.tensors:
            if t.name == name:
                return t
        raise KeyError(name)

    def to_json(self) -> dict:
        return {
            "identical": self.identical,
            "changed_rows": self.changed_rows,
            "changed_buckets": self.changed_buckets,
            "a_offset": self.a_offset,
            "b_offset": self.b_offset,
            "a": self.a,
            "b": self.b,
            "method": self.method,
            "anchor": self.anchor,
            "bucket_rows": self.bucket_rows,
            "rows_compared": self.rows_compared,
            "tensors": [t.to_json() for t in self.tensors],
            "incomparable": self.incomparable,
        }


# -- the operation ------------------------------------------------------------------


def diff(
    a: Side,
    b: Side,
    top: int = 10,
    tensors: Iterable[str] | None = None,
    force: bool = False,
    progress: Progress | None = None,
) -> DiffResult:
    """What changed from A to B (numbers are over B - A).

    ``tensors`` limits the comparison to those names (InvalidInput if a
    name is on neither side). Two different models, or tensors that exist
    on one side only or differ in dtype or shape, raise ModelMismatch
    unless ``force``: then the tensors both hold alike are compared by
    value and the rest are listed as incomparable.
    """
    if top < 0:
        raise InvalidInput(f"--top must be 0 or more, got {top}")
    progress = progress or (lambda stage, done, total: None)
    wanted = None if tensors is None else list(dict.fromkeys(tensors))
    if wanted is not None:
        _check_names(a, b, wanted)
    for side in (a, b):
        if isinstance(side, ReplicaSide):
            _refuse_pending_sync(side)
    one_model = _one_model(a, b)
    if not one_model:
        _check_model_ids(a, b, force)
    names, incomparable = _match_tensors(a, b, wanted, force)
    bucket_rows = next((s.bucket_rows for s in (a, b) if s.bucket_rows), DEFAULT_BUCKET_ROWS)
    layout = a.layout()
    results = [TensorDiff(n, layout[n][0], layout[n][1], bucket_rows, top) for n in names]
    anchor = None
    if one_model and a.state_digest is not None and a.state_digest == b.state_digest:
        method = "digest"  # the same model at both offsets: nothing to read
    elif one_model and _same_replica(a, b) and a.offset == b.offset:
        method = "same-offset"
    elif one_model and (anchor := _anchor(a, b)) is not None:
        method = "log"
        _diff_by_log(a, b, anchor, results, progress)
    else:
        method = "values"
        _diff_by_value(a, b, results, progress)
    return DiffResult(a.describe(), b.describe(), method, bucket_rows, results, incomparable, anchor)


def _refuse_pending_sync(side: ReplicaSide) -> None:
    """LockHeld while a partial sync is pending on the replica.

    Its tensor files then hold some rows newer than its head, which
    history.values_at (what diff reads through) does not yet account for;
    numbers from them would be wrong, so diff refuses rather than guess.
    """
    from .pending import pending_state

    pending = pending_state(side.replica)
    if pending is not None:
        raise LockHeld(
            f"{side.spec}: a partial sync to offset {pending.get('target')} is pending, "
            f"so its files are ahead of its head {side.replica.head}",
            hint="let 'deltalog sync' finish it, then diff again",
        )


def _check_names(a: Side, b: Side, wanted: list[str]) -> None:
    la, lb = a.layout(), b.layout()
    unknown = [n for n in wanted if n not in la and n not in lb]
    if unknown:
        known = sorted(set(la) | set(lb))
        raise InvalidInput(f"unknown tensor {unknown[0]!r} (in neither {a.spec} nor {b.spec})",
                           hint="known: " + ", ".join(known[:10]) + (", ..." if len(known) > 10 else ""))


def _one_model(a: Side, b: Side) -> bool:
    """True when both sides are replicas of one model id with one tensor layout and bucket size.

    That alone proves nothing about their histories (two inits given one
    --model-id, a follower that took a stray commit): :func:`_anchor` does.
    """
    if not (isinstance(a, ReplicaSide) and isinstance(b, ReplicaSide)):
        return False
    ra, rb = a.replica, b.replica
    return ra.model_id == rb.model_id and ra.bucket_rows == rb.bucket_rows and a.layout() == b.layout()


def _same_replica(a: ReplicaSide, b: ReplicaSide) -> bool:
    return os.path.realpath(a.replica.path) == os.path.realpath(b.replica.path)


ANCHOR_SEARCH = 1000  # records looked at, newest first, for an offset both sides held alike


def _anchor(a: ReplicaSide, b: ReplicaSide) -> int | None:
    """An offset at which both sides are proven to hold the same model, or None.

    One replica shares its own history: either side's offset. Two replicas
    need an offset both retain with equal, known state digests
    (deltalog.lineage): the sides' own offsets first, then the records of A
    at or before both, newest first. From such an offset m the rows that can
    differ are those A's log wrote between m and A's offset and those B's log
    wrote between m and B's: the cost follows the change again.
    """
    if _same_replica(a, b):
        return a.offset
    for m in (a.offset, b.offset):
        if _same_state_at(a, b, m):
            return m
    m = min(a.offset, b.offset)
    for _ in range(ANCHOR_SEARCH):
        m = a.replica.record_offset_at_or_before(m - 1) if m > 0 else None
        if m is None or m < a.replica.oldest_offset:
            m = a.replica.oldest_offset
            return m if _same_state_at(a, b, m) else None
        if _same_state_at(a, b, m):
            return m
    return None


def _same_state_at(a: ReplicaSide, b: ReplicaSide, offset: int) -> bool:
    """Both replicas retain ``offset`` and say the same state digest there."""
    digests = []
    for side in (a, b):
        try:
            check_retained(side.replica, offset)
        except OffsetNotRetained:
            return False
        digests.append(side.replica.state_digest_at(offset))
    return digests[0] is not None and digests[0] == digests[1]


def _check_model_ids(a: Side, b: Side, force: bool) -> None:
    if force or a.model_id is None or b.model_id is None:
        return
    if a.model_id != b.model_id:
        raise ModelMismatch(
            f"{a.spec} holds model {a.model_id} but {b.spec} holds model {b.model_id}",
            hint="pass --force to compare their values anyway",
        )
    if isinstance(a, ReplicaSide) and isinstance(b, ReplicaSide):
        raise ModelMismatch(
            f"{a.spec} and {b.spec} share model id {a.model_id} but not its layout "
            "(different tensors or bucket size)",
            hint="pass --force to compare their values anyway",
        )


def _match_tensors(a: Side, b: Side, wanted: list[str] | None, force: bool) -> tuple[list[str], list[dict]]:
    """(names to compare, incomparable entries). ModelMismatch on a mismatch unless ``force``."""
    la, lb = a.layout(), b.layout()
    names = sorted(set(la) | set(lb) if wanted is None else wanted)
    comparable, incomparable = [], []
    for name in names:
        ta, tb = la.get(name), lb.get(name)
        if ta is not None and ta == tb:
            comparable.append(name)
            continue
        if ta is None:
            reason = f"only in B ({b.spec})"
        elif tb is None:
            reason = f"only in A ({a.spec})"
        else:
            reason = f"A has {ta[0]}{list(ta[1])}, B has {tb[0]}{list(tb[1])}"
        incomparable.append({
            "name": name,
            "reason": reason,
            "a": None if ta is None else {"dtype": ta[0], "shape": list(ta[1])},
            "b": None if tb is None else {"dtype": tb[0], "shape": list(tb[1])},
        })
    if incomparable and not force:
        first = incomparable[0]
        more = f" (and {len(incomparable) - 1} more)" if len(incomparable) > 1 else ""
        raise ModelMismatch(
            f"{a.spec} and {b.spec} are not the same model: tensor {first['name']!r}: {first['reason']}{more}",
            hint="pass --force to compare the tensors they share",
        )
    return comparable, incomparable


# -- two replicas of one model: bucket versions, then the log --------------------------


def _diff_by_log(a: ReplicaSide, b: ReplicaSide, anchor: int, results: list[TensorDiff], progress: Progress) -> None:
    """Compare the rows either log wrote between the anchor and its side's offset.

    Both sides held one model at ``anchor``, so a row can differ only if a
    record between the anchor and a side's offset wrote it, on that side:
    exactly the rows compared (their row-index sections only are decoded,
    checksums checked). A row rewritten to the same bytes is no change.
    """
    if _same_replica(a, b):
        spans = [(a.replica, a.offset, b.offset)]
    else:
        spans = [(a.replica, anchor, a.offset), (b.replica, anchor, b.offset)]
    touched: dict[str, list[np.ndarray]] = {}
    for replica, x, y in spans:
        if x != y:
            for name, rows in changed_rows(replica, min(x, y), max(x, y)).items():
                touched.setdefault(name, []).append(rows)
    candidates = []
    bounds = {info.name: info.rows for info in a.replica.tensors}  # one model: checked before
    for t in results:
        cand = sorted_union(touched.get(t.name, []), bounds.get(t.name))
        if cand.size:
            candidates.append((t, cand))
    sides = (_Rows(a, names := [t.name for t in results]), _Rows(b, names))
    _compare_candidates(candidates, sides, progress)


def _compare_candidates(candidates: list[tuple[TensorDiff, np.ndarray]], sides: tuple["_Rows", "_Rows"],
                        progress: Progress) -> None:
    """Compare each tensor's candidate rows between the two sides, tensors in order, rows ascending.

    A tensor neither side has to patch (both read at heads that hold their
    offsets: the common case) is compared in place by the compiled loop, in
    passes that run ahead on two threads (scattered reads from two large
    maps are bound by memory latency; the loop releases the GIL) while this
    thread accounts for finished ones. Anything else is read a cache-sized
    step at a time, both sides at once, and compared here.
    """
    first, second = sides
    in_place = kernels.enabled()
    pool = _comparison_pool()
    passes: dict[int, list] = {}
    for i, (t, rows) in enumerate(candidates):
        if in_place and first.plain(t.name) and second.plain(t.name):
            passes[i] = [(part, pool.submit(_in_place_pass, t, part, sides))
                         for part in (rows[s : s + PASS_ROWS] for s in range(0, len(rows), PASS_ROWS))]
    try:
        _account_in_order(candidates, sides, passes, in_place, progress)
    finally:  # nothing of this diff runs on after it returns or raises
        futures = [f for tensor_passes in passes.values() for _part, f in tensor_passes]
        for future in futures:
            future.cancel()
        wait(futures)


def _account_in_order(candidates: list[tuple[TensorDiff, np.ndarray]], sides: tuple["_Rows", "_Rows"],
                      passes: dict[int, list], in_place: bool, progress: Progress) -> None:
    """Account for each tensor's in-place passes as they finish, and compare the rest here."""
    first, second = sides
    pool = _comparison_pool()
    total = sum(len(rows) for _t, rows in candidates)
    done = 0
    for i, (t, rows) in enumerate(candidates):
        finished = []
        for part, future in passes.get(i, ()):
            fast = future.result() if in_place else None
            if fast is None:  # a writer moved a side past its pinned head: the patching path from here on
                in_place = False
                future.cancel()
                continue
            finished.append(fast)
            done += len(part)
            progress("comparing changed rows", done, total)
        if finished:  # one account for the tensor: its numpy calls cost more per call than per row
            handled = sum(len(f.status) for f in finished)
            compared = rows[:handled]
            t.account(compared.astype(np.int64), kernels.RowComparison.joined(finished),
                      lambda pick: (first.take(t.name, compared[pick]), second.take(t.name, compared[pick])))
            rows = rows[handled:]
        step = max(1, STEP_BYTES // max(1, _row_bytes(t)))
        for start in range(0, len(rows), step):
            part = rows[start : start + step]
            side_a = pool.submit(first.take, t.name, part)
            vb = second.take(t.name, part)
            t.compare(part, side_a.result(), vb)
            done += len(part)
            progress("comparing changed rows", done, total)


_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _comparison_pool() -> ThreadPoolExecutor:
    """Two threads kept for every diff of the process: starting them per diff costs a thread start each."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="deltalog-diff")
        return _pool


def _forget_pool_in_child() -> None:
    """A forked child has none of the pool's threads: it must start its own, not queue work for ghosts."""
    global _pool, _pool_lock
    _pool, _pool_lock = None, threading.Lock()


os.register_at_fork(after_in_child=_forget_pool_in_child)


def _in_place_pass(t: TensorDiff, rows: np.ndarray, sides: tuple["_Rows", "_Rows"]) -> kernels.RowComparison | None:
    """Compare ``rows`` straight from both replicas' memory maps, nothing copied; None if a side moved on.

    Each side's rows are checked against their digests in the same pass
    (IntegrityError naming the first damaged row), and a pass a writer tore
    runs again (Replica.read_in_place).
    """
    first, second = sides
    ra, rb = first.side.replica, second.side.replica
    idx = rows.astype(np.int64)
    for side in sides:
        side.check_unpending()

    def on_a(view_a: np.ndarray, digests_a: np.ndarray | None):
        return rb.read_in_place(t.name, lambda view_b, digests_b: kernels.compare_rows(
            view_a, view_b, t.dtype, idx, digests_a, digests_b))

    head_a, (head_b, fast) = ra.read_in_place(t.name, on_a)
    for side in sides:  # a partial sync's chunk written meanwhile: its rows run ahead of the head read...
        side.check_unpending()
    pinned = (first.pinned, second.pinned)
    if (head_a, head_b) != pinned or (ra.head, rb.head) != pinned:  # ... or it has finished: the head moved
        return None
    for replica, bad in ((ra, fast.bad_a), (rb, fast.bad_b)):
        if bad is not None:
            raise replica.digest_error(t.name, int(idx[bad]))
    return fast


def _rows_of(t: TensorDiff) -> int:
    return t.shape[0] if t.shape else 1


def _row_bytes(t: TensorDiff) -> int:
    elems = math.prod(t.shape[1:]) if len(t.shape) > 1 else 1
    return elems * np.dtype(bits_dtype(t.dtype)).itemsize


# -- anything else: values, chunk by chunk -------------------------------------------


class _Rows:
    """Reads rows of one side, in storage dtype, shaped (rows, row_elems).

    A replica side is read at a head pinned on first use: rows its writer
    wrote after the side's own offset are put back to their values at that
    offset from a patch built once (O(rows written since the offset)).
    """

    def __init__(self, side: Side, names: list[str]):
        self.side = side
        self.names = names
        self._upto: int | None = None  # the head rows are read at; patched back to side.offset
        self._patch: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def read(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows start..stop-1."""
        if isinstance(self.side, CheckpointSide):
            array = self.side.tensors[name].array
            if array.ndim == 0:
                return np.asarray(array).reshape(1, 1)
            chunk = np.asarray(array[start:stop])
            return chunk.reshape(stop - start, -1) if chunk.size else chunk.reshape(stop - start, 0)
        return self.take(name, np.arange(start, stop, dtype=np.uint64))

    def take(self, name: str, rows: np.ndarray) -> np.ndarray:
        """Rows ``rows`` (sorted, unique) of a replica side, as of its offset."""
        replica = self.side.replica
        if self._upto is None:
            self._pin()
        self.check_unpending()
        head, values = replica.read_rows(name, rows)
        self.check_unpending()  # a partial sync that wrote rows ahead of the head during the read shows here...
        if head != self._upto or replica.head != self._upto:  # ... or it has finished: the head moved
            # A writer moved on since the pin: undo its records for these rows.
            _, moved = values_at(replica, self._upto, {name: rows})
            values = moved[name]
        patch_rows, old = self._patch.get(name, (None, None))
        if patch_rows is not None and len(rows):
            lo, hi = np.searchsorted(patch_rows, [rows[0], rows[-1] + 1])
            if hi > lo:  # rows written after the side's offset: their values at the offset
                pos = np.searchsorted(rows, patch_rows[lo:hi])
                hit = (pos < len(rows)) & (rows[np.minimum(pos, len(rows) - 1)] == patch_rows[lo:hi])
                values[pos[hit]] = old[lo:hi][hit]
        return values

    @property
    def pinned(self) -> int:
        """The head this side's rows are read at."""
        if self._upto is None:
            self._pin()
        return self._upto

    def plain(self, name: str) -> bool:
        """True when a replica side's files at the pinned head hold ``name`` as of the side's offset."""
        return isinstance(self.side, ReplicaSide) and self.pinned is not None and name not in self._patch

    def _pin(self) -> None:
        """Pin the head and build the patch for rows written in (offset, head]."""
        replica, offset = self.side.replica, self.side.offset
        self.check_unpending()
        upto = replica.head
        if upto != offset:
            touched = changed_rows(replica, offset, upto)
            touched = {n: r for n, r in touched.items() if n in self.names}
            _, old = values_at(replica, offset, touched)
            self._patch = {n: (touched[n], old[n]) for n in touched}
        self._upto = upto

    def check_unpending(self) -> None:
        """LockHeld while a partial sync is pending on a replica side: its files hold rows newer than its head.

        Checked before and after every read: a chunk written during a read
        leaves its marker set until the sync's last chunk moves the head, so
        after a read either the marker shows, or the head has moved (the
        caller then reads again through values_at, which undoes it).
        """
        if isinstance(self.side, ReplicaSide) and pending_marker(self.side.replica) is not None:
            raise LockHeld(f"{self.side.spec}: a partial sync began while it was being compared",
                           hint="let 'deltalog sync' finish it, then diff again")


def _diff_by_value(a: Side, b: Side, results: list[TensorDiff], progress: Progress) -> None:
    names = [t.name for t in results]
    ra, rb = _Rows(a, names), _Rows(b, names)
    total = sum(_rows_of(t) for t in results)
    done = 0
    for t in results:
        n_rows = _rows_of(t)
        step = max(1, CHUNK_BYTES // (_row_bytes(t) + 8))  # + the row index
        for start in range(0, n_rows, step):
            stop = min(n_rows, start + step)
            t.compare(np.arange(start, stop, dtype=np.int64), ra.read(t.name, start, stop), rb.read(t.name, start, stop))
            done += stop - start
            progress("comparing values", done, total)


__all__ = [
    "CHUNK_BYTES",
    "CheckpointSide",
    "DiffResult",
    "ReplicaSide",
    "Side",
    "TensorDiff",
    "diff",
    "open_side",
    "parse_spec",
]
