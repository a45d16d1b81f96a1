"""replay: rebuild the model at an offset from a snapshot plus the log.

The live tensor files are never read: the model at offset h is the newest
intact snapshot at or before h with the new values of every record after
it, up to h, written in order (formats/FORMAT.md, "Retained offsets"). So
replay is what repairs damaged tensor files, exports an old model, and
what compaction folds records with.

Work goes one tensor at a time. A first pass over the records in
(snapshot, h] checks each header (a v1 record's trailer: all of it) and the
base chain (a missing, duplicated or out-of-order record is an
IntegrityError) and notes which records touch which tensor, from the
headers alone; then each tensor is copied from the snapshot (its xxh3
checked on the way) and only the records touching it are decompressed, for
that tensor only, each section checked as it is read (encoding v2). A tensor whose snapshot
copy is damaged is rebuilt from the next older snapshot, if one is left.

Three consumers:

- :func:`tensors_at` yields (info, array) per tensor, memory bounded by one
  tensor (compaction writes its snapshot from it);
- :func:`replay_to_checkpoint` (``replay --out``) builds each tensor in a
  scratch file beside the output and hands the memory maps to
  :func:`deltalog.checkpoint.write_checkpoint`, which writes atomically;
- :func:`repair_in_place` (``replay --in-place``) rebuilds the replica's own
  tensor files at the head under the writer lock, replacing only those that
  differ, each through a temporary file, fsync and rename.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import xxhash

from . import record as rec
from . import tensorfiles
from .errors import IntegrityError, InvalidInput, StorageError, os_hint
from .history import check_retained
from .replica import Replica
from .tensorfiles import TensorInfo

Progress = Callable[[str, int, int], None]  # (stage, done, total)

REPAIR_SUFFIX = ".replay-tmp"  # tensors/NNNNN.bin.replay-tmp while a repair runs
_CHUNK = 16 << 20


def _no_progress(stage: str, done: int, total: int) -> None:
    pass


class _Rebuilder:
    """Builds tensors at one offset from the snapshots and records of a replica."""

    def __init__(self, replica: Replica, offset: int):
        check_retained(replica, offset)
        self.replica = replica
        self.offset = offset
        self.candidates = sorted(
            (m for m in replica.snapshots() if m["offset"] <= offset), key=lambda m: m["offset"], reverse=True
        )
        if not self.candidates:
            raise IntegrityError(
                f"{replica.path}: no snapshot at or before offset {offset} to replay from",
                hint="run 'deltalog verify' to see what is damaged",
            )
        self._plans: dict[int, dict[str, list[int]]] = {}
        self._checked: dict[int, bool] = {}  # offset -> every byte checked by the plan (a v1 record)
        self.records_used: set[int] = set()
        self.bases_used: set[int] = set()

    def _plan(self, base: int) -> dict[str, list[int]]:
        """tensor name -> offsets of the records in (base, offset] writing it; checks the chain."""
        plan = self._plans.get(base)
        if plan is not None:
            return plan
        try:
            plan = self._read_plan(base)
        except IntegrityError as exc:
            raise _log_damaged(self.replica, exc) from None
        self._plans[base] = plan
        return plan

    def _read_plan(self, base: int) -> dict[str, list[int]]:
        plan: dict[str, list[int]] = {}
        expected = base
        path = self.replica.path
        for offset, blob in self.replica.iter_record_blobs(since=base, upto=self.offset):
            what = f"{path}: record {offset}"
            self._checked[offset] = rec.check_for_partial_decodes(blob, what)
            summary = rec.summarize(blob, what)
            if summary.offset != offset or summary.base != expected:
                raise IntegrityError(
                    f"{what}: applies on {summary.base} but follows {expected} (missing or out-of-order record)"
                )
            if summary.model_id != self.replica.model_id:
                raise IntegrityError(f"{what}: belongs to model {summary.model_id}")
            for t in summary.tensors:
                plan.setdefault(t["name"], []).append(offset)
            expected = offset
        if expected != self.offset:
            raise IntegrityError(f"{path}: the log ends at offset {expected} before offset {self.offset}")
        return plan

    def fill(self, info: TensorInfo, dest: np.ndarray) -> int:
        """Write the tensor at ``offset`` into ``dest`` ((rows, row_elems), storage dtype).

        Returns the offset of the snapshot it started from.
        """
        problems = []
        for manifest in self.candidates:
            try:
                _copy_from_snapshot(self.replica, manifest, info, dest)
            except IntegrityError as exc:
                problems.append(str(exc))
                continue
            plan = self._plan(manifest["offset"])
            for offset in plan.get(info.name, ()):
                blob = self.replica.record_blob(offset)
                try:
                    record = rec.decode(blob, f"{self.replica.path}: record {offset}", only={info.name},
                                        with_old=False, checked=self._checked[offset])
                except IntegrityError as exc:
                    raise _log_damaged(self.replica, exc) from None
                for t in record.tensors:
                    if t.new.shape[1:] != (info.row_elems,) or (len(t.rows) and int(t.rows[-1]) >= info.rows):
                        raise IntegrityError(
                            f"{self.replica.path}: record {offset}: tensor {info.name!r} does not match the model"
                        )
                    dest[t.rows.astype(np.intp)] = t.new
                self.records_used.add(offset)
            self.bases_used.add(manifest["offset"])
            return manifest["offset"]
        raise IntegrityError(
            f"{self.replica.path}: tensor {info.name!r}: no intact snapshot at or before offset {self.offset} "
            f"({problems[0]})"
        )


def _log_damaged(replica: Replica, exc: IntegrityError) -> IntegrityError:
    """``exc`` with the hint for a damaged log: the tensor files are not what to rebuild."""
    path = replica.path
    return IntegrityError(str(exc), hint=(
        f"the log is damaged, not the tensor files: if 'deltalog verify {path}' finds them intact, "
        f"{tensorfiles.FROM_TENSORS_HINT.format(path=path)}; else {tensorfiles.RESEED_HINT.format(path=path)}"))


def _copy_from_snapshot(replica: Replica, manifest: dict, info: TensorInfo, dest: np.ndarray) -> None:
    """Read a snapshot's file of ``info`` into ``dest``, checking size, dtype, shape and xxh3."""
    snap = manifest["offset"]
    entry = next((e for e in manifest["tensors"] if e.get("file") == info.file), None)
    where = f"{replica.path}: snapshot {snap}, tensor {info.name!r}"
    expected = (info.name, info.dtype, info.shape)
    if entry is None or (entry.get("name"), entry.get("dtype"), tuple(entry.get("shape", ()))) != expected:
        raise IntegrityError(f"{where}: the manifest does not match the model")
    if manifest.get("model_id") != replica.model_id:
        raise IntegrityError(f"{where}: snapshot belongs to model {manifest.get('model_id')}")
    path = os.path.join(tensorfiles.snapshot_path(replica.path, snap), info.file)
    digest = xxhash.xxh3_64()
    flat = dest.reshape(-1).view(np.uint8) if info.nbytes else np.empty(0, np.uint8)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size != info.nbytes:
                raise IntegrityError(f"{where}: {size} bytes, expected {info.nbytes}")
            view = memoryview(flat)
            pos = 0
            while pos < info.nbytes:
                n = f.readinto(view[pos : pos + _CHUNK])
                if not n:
                    raise IntegrityError(f"{where}: file shrank while being read")
                digest.update(view[pos : pos + n])
                pos += n
    except FileNotFoundError:
        raise IntegrityError(f"{where}: file missing ({path})", hint="a compaction may have removed it; retry") from None
    except OSError as exc:
        raise IntegrityError(f"{where}: cannot read {path}: {exc.strerror}") from None
    if digest.hexdigest() != entry["xxh3"]:
        raise IntegrityError(f"{where}: checksum mismatch")


def tensors_at(replica: Replica, offset: int, progress: Progress | None = None) -> Iterator[tuple[TensorInfo, np.ndarray]]:
    """(info, (rows, row_elems) array) of every tensor at ``offset``, one at a time.

    Each array is fresh and owned by the caller; only one is alive at a time
    unless the caller keeps them.
    """
    progress = progress or _no_progress
    rebuilder = _Rebuilder(replica, offset)
    tensors = replica.tensors
    for n, info in enumerate(tensors):
        progress("tensors", n, len(tensors))
        array = np.empty((info.rows, info.row_elems), dtype=info.storage)
        rebuilder.fill(info, array)
        yield info, array
    progress("tensors", len(tensors), len(tensors))


# -- replay --out ---------------------------------------------------------------


@dataclass
class ReplayResult:
    offset: int
    out: str
    format: str
    snapshots_used: list[int]
    records_applied: int
    tensors: int
    bytes: int

    def to_json(self) -> dict:
        return {
            "offset": self.offset,
            "out": self.out,
            "format": self.format,
            "snapshots_used": self.snapshots_used,
            "records_applied": self.records_applied,
            "tensors": self.tensors,
            "bytes": self.bytes,
        }


def _scratch_map(path: str, info: TensorInfo) -> np.ndarray:
    """A writable (rows, row_elems) map of a new file of the tensor's size, its disk space reserved.

    A sparse file (truncate) would run out of space only while the map is
    written: on a full disk that is SIGBUS, or EFAULT from a read into it,
    not ENOSPC. Allocating the blocks up front makes a full disk an OSError
    here, before anything is built.
    """
    if info.nbytes == 0:
        return np.zeros((info.rows, info.row_elems), dtype=info.storage)
    with open(path, "wb") as f:
        if hasattr(os, "posix_fallocate"):
            os.posix_fallocate(f.fileno(), 0, info.nbytes)
        else:  # no way to reserve here (macOS): sparse, as before
            f.truncate(info.nbytes)
    return np.memmap(path, dtype=info.storage, mode="r+", shape=(info.rows, info.row_elems))


def replay_to_checkpoint(
    replica: Replica, out: str | os.PathLike, offset: int | None = None, progress: Progress | None = None,
    force: bool = False,
) -> ReplayResult:
    """Write the model at ``offset`` (default: head) as a checkpoint at ``out``.

    An existing ``out`` is refused before any work unless ``force`` (then it
    is replaced atomically; an npy directory only when empty).

    The format follows the path (see checkpoint.checkpoint_kind). Tensors are
    built in a scratch directory beside ``out`` (so it needs free space about
    the model's size there), then written atomically: ``out`` is either the
    complete checkpoint or untouched. A safetensors checkpoint carries the
    model id and offset in its metadata. The writer lock is not taken.
    """
    from .checkpoint import checkpoint_kind, write_checkpoint

    progress = progress or _no_progress
    out = os.fspath(out)
    kind = checkpoint_kind(out)
    if kind == "npy-dir" and os.path.isdir(out) and os.listdir(out):  # --force or not: never emptied for us
        raise InvalidInput(f"{out}: output directory is not empty",
                           hint="a directory of .npy files is written only into an empty one: remove its files, "
                                "or choose another --out")
    if os.path.lexists(out) and not force and not (os.path.isdir(out) and not os.listdir(out)):
        raise InvalidInput(f"{out}: exists", hint="pass --force to replace it, or choose another --out")
    offset = replica.head if offset is None else int(offset)
    rebuilder = _Rebuilder(replica, offset)
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent):
        raise InvalidInput(f"{out}: directory {parent} does not exist")
    try:
        scratch = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(os.path.abspath(out))}.replay-")
    except OSError as exc:
        raise StorageError(f"cannot write under {parent}: {exc.strerror}") from None
    try:
        arrays = {}
        tensors = replica.tensors
        for n, info in enumerate(tensors):
            progress("rebuilding", n, len(tensors))
            try:
                dest = _scratch_map(os.path.join(scratch, info.file), info)
            except OSError as exc:
                raise StorageError(
                    f"cannot write under {parent}: {exc.strerror}",
                    hint="replay needs free space about the model's size beside --out",
                ) from None
            rebuilder.fill(info, dest)
            if isinstance(dest, np.memmap):
                dest.flush()
                # reopen read-only: drop the dirty mapping, keep memory bounded by the page cache
                dest = np.memmap(dest.filename, dtype=info.storage, mode="r", shape=(info.rows, info.row_elems))
            arrays[info.name] = (dest.reshape(info.shape), info.dtype)
        progress("writing", 0, 1)
        metadata = {"deltalog.model_id": replica.model_id, "deltalog.offset": str(offset)} if kind == "safetensors" else None
        write_checkpoint(out, arrays, metadata)
        progress("writing", 1, 1)
        del arrays
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return ReplayResult(
        offset=offset,
        out=out,
        format=kind,
        snapshots_used=sorted(rebuilder.bases_used),
        records_applied=len(rebuilder.records_used),
        tensors=len(replica.tensors),
        bytes=sum(t.nbytes for t in replica.tensors),
    )


# -- replay --in-place ------------------------------------------------------------


@dataclass
class RepairResult:
    offset: int
    snapshots_used: list[int]
    records_applied: int
    tensors_checked: int
    repaired: list[str] = field(default_factory=list)
    manifests_rewritten: list[int] = field(default_factory=list)  # snapshots whose manifest.json was rewritten

    def to_json(self) -> dict:
        return {
            "offset": self.offset,
            "in_place": True,
            "snapshots_used": self.snapshots_used,
            "records_applied": self.records_applied,
            "tensors_checked": self.tensors_checked,
            "repaired": self.repaired,
            "manifests_rewritten": self.manifests_rewritten,
        }


def _same_content(path_a: str, path_b: str) -> bool:
    """Whether two files hold the same bytes (a missing file differs)."""
    try:
        if os.path.getsize(path_a) != os.path.getsize(path_b):
            return False
        with open(path_a, "rb") as a, open(path_b, "rb") as b:
            while True:
                chunk = a.read(_CHUNK)
                if chunk != b.read(_CHUNK):
                    return False
                if not chunk:
                    return True
    except OSError:
        return False


def repair_in_place(
    replica: Replica, offset: int | None = None, wait: float = 0.0, progress: Progress | None = None
) -> RepairResult:
    """Rebuild the replica's tensor files at its head from snapshot + log.

    Under the writer lock. Each tensor is rebuilt into
    ``tensors/NNNNN.bin.replay-tmp``; if the live file differs (or is
    missing or of the wrong size) the rebuilt one is fsynced and renamed
    over it, so a crash leaves the old file or the new one, never a mix.
    Its row digest file is rebuilt from the rebuilt rows the same way
    (``tensors/NNNNN.digest.replay-tmp``).
    Identical files are left alone. Processes that hold the old file mapped
    keep seeing it until they reopen the replica (a writer's handle maps the
    new files when it next takes the lock). The rows of a pending
    partial sync are written back on top, as the files held them.
    """
    progress = progress or _no_progress
    with replica.writing(wait):
        head = replica.head
        if offset is not None and int(offset) != head:
            raise InvalidInput(
                f"{replica.path}: --in-place rebuilds the head ({head}), not offset {offset}",
                hint="use 'replay --out' to export an older model, or 'rollback --to' to make it the head",
            )
        rebuilder = _Rebuilder(replica, head)
        from .pending import merged_pending

        pending = merged_pending(replica)  # a partial sync's rows are ahead of the head in the files
        tensor_dir = os.path.join(replica.path, tensorfiles.TENSOR_DIR)
        try:
            os.makedirs(tensor_dir, exist_ok=True)
            for name in os.listdir(tensor_dir):  # leftovers of a repair that crashed
                if name.endswith(REPAIR_SUFFIX):
                    os.unlink(os.path.join(tensor_dir, name))
        except OSError as exc:
            raise StorageError(f"{tensor_dir}: {exc.strerror}") from None
        repaired = []
        tensors = replica.tensors
        for n, info in enumerate(tensors):
            progress("tensors", n, len(tensors))
            live = os.path.join(tensor_dir, info.file)
            tmp = live + REPAIR_SUFFIX
            live_digest = os.path.join(tensor_dir, info.digest_file)
            tmp_digest = live_digest + REPAIR_SUFFIX
            try:
                dest = _scratch_map(tmp, info)
                rebuilder.fill(info, dest)
                if info.name in pending:
                    dest[pending[info.name].rows.astype(np.intp)] = pending[info.name].new
                if isinstance(dest, np.memmap):
                    dest.flush()
                if replica.has_row_digests:  # the digests of the rebuilt rows (format v2)
                    tensorfiles.write_digest_file(tmp_digest, dest, fsync=False)
                del dest
                changed = False
                if info.nbytes == 0 and os.path.exists(live):
                    pass  # nothing to compare: _scratch_map made no file
                else:
                    if info.nbytes == 0:
                        open(tmp, "wb").close()
                    changed = _install_if_different(tmp, live)
                if replica.has_row_digests:
                    changed = _install_if_different(tmp_digest, live_digest) or changed
                if not changed:
                    continue
                tensorfiles.fsync_dir(tensor_dir)
            except OSError as exc:
                _unlink_quietly(tmp)
                _unlink_quietly(tmp_digest)
                raise StorageError(f"{live}: cannot rebuild: {exc.strerror}", hint="check free space and permissions") from None
            except BaseException:
                _unlink_quietly(tmp)
                _unlink_quietly(tmp_digest)
                raise
            repaired.append(info.name)
        progress("tensors", len(tensors), len(tensors))
        if repaired:
            tensorfiles.recache_model_files(  # commits store rows into them: see there
                tensorfiles.live_file_paths(tensor_dir, [i for i in tensors if i.name in repaired]),
                tensorfiles.model_file_bytes(tensors))
            replica.reload_tensor_files()
        manifests = _rewrite_manifest_files(replica)
    return RepairResult(
        offset=head,
        snapshots_used=sorted(rebuilder.bases_used),
        records_applied=len(rebuilder.records_used),
        tensors_checked=len(tensors),
        repaired=repaired,
        manifests_rewritten=manifests,
    )


def _rewrite_manifest_files(replica: Replica) -> list[int]:
    """Write again, from the log, each snapshot's manifest.json that does not match it (lock held)."""
    rewritten = []
    for offset in replica.snapshot_offsets():
        manifest = replica.snapshot_manifest(offset)  # a damaged entry in the log: the rebuild raised already
        if not os.path.isdir(tensorfiles.snapshot_path(replica.path, offset)):
            continue  # its files are gone too: verify names that, and no manifest.json would make it whole
        if tensorfiles.manifest_file_problem(replica.path, manifest) is None:
            continue
        try:
            tensorfiles.rewrite_manifest_file(replica.path, manifest)
        except OSError as exc:
            raise StorageError(f"{tensorfiles.snapshot_path(replica.path, offset)}: cannot write its manifest.json: "
                               f"{exc.strerror}", hint=os_hint(exc)) from None
        rewritten.append(offset)
    return rewritten


def _install_if_different(tmp: str, live: str) -> bool:
    """Rename a rebuilt file over the live one (fsynced first) unless they already match; True if it did."""
    if _same_content(tmp, live):
        os.unlink(tmp)
        return False
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, live)
    return True


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


__all__ = ["RepairResult", "ReplayResult", "repair_in_place", "replay_to_checkpoint", "tensors_at"]
