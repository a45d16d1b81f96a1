"""verify: check every checksum of a replica and its tensors against its log.

Checks, in order: the log's records (checksum, offset chain, model id,
tensor names and shapes) and their state digest chain, each snapshot's
files (size, xxh3 and state digest), every row of the tensor files against
its row digest (format v2), the tensor files against the model rebuilt from
the newest snapshot plus the log and against the head's state digest, and
the bucket index against the records. Problems are collected, not raised,
so one run names everything that is damaged.

The state digest chain (format 4, deltalog.lineage): each record's digest
before it must be the one after the record before it (the first: the
oldest snapshot's); the digest after it must be what its rows make of the
one before (its new values' row digests against its old values'); the last
must be the head's; and the tensor files must give the head's.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from . import kernels, lineage, tensorfiles
from . import record as rec
from .dtypes import rows_differ
from .errors import DeltalogError
from .receive import snapshot_digest
from .replica import Replica

Progress = Callable[[str, int, int], None]  # (stage, done, total)


DAMAGE_KINDS = ("log", "snapshots", "tensors", "buckets")  # what a problem can be in, in report order


@dataclass
class VerifyReport:
    head: int
    records: int = 0
    snapshots: int = 0
    tensors: int = 0
    problems: list[str] = field(default_factory=list)
    damaged: list[str] = field(default_factory=list)  # DAMAGE_KINDS that have problems
    repair: str | None = None  # what to run, given what is damaged
    manifest_files_only: bool = True  # every snapshot problem is a manifest.json that replay --in-place rewrites

    @property
    def ok(self) -> bool:
        return not self.problems

    def add(self, kind: str, problem: str) -> None:
        self.problems.append(problem)
        if kind not in self.damaged:
            self.damaged = [k for k in DAMAGE_KINDS if k in self.damaged or k == kind]

    def extend(self, kind: str, problems) -> None:
        for problem in problems:
            self.add(kind, problem)

    def to_json(self) -> dict:
        return {
            "ok": self.ok,
            "head": self.head,
            "records_checked": self.records,
            "snapshots_checked": self.snapshots,
            "tensors_checked": self.tensors,
            "problems": self.problems,
            "damaged": self.damaged,
            "repair": self.repair,
        }


def verify(replica: Replica, wait: float = 0.0, progress: Progress | None = None) -> VerifyReport:
    """Verify ``replica``, holding its writer lock so the state cannot move underneath."""
    progress = progress or (lambda stage, done, total: None)
    with replica.writing(wait, upgrade=False):  # verify only reads: a v1 replica stays v1
        report = VerifyReport(head=replica.head)
        good_records = _check_records(replica, report, progress)
        log_ok = "log" not in report.damaged
        base = _check_snapshots(replica, report, progress)
        digests_ok = replica.has_row_digests and _check_row_digests(replica, report, progress,
                                                                    name_unreadable=base is None or not log_ok)
        # A damaged log cannot say what the tensors or the bucket index should be: rebuilding
        # without its damaged records would blame them for what the log lost. The tensors are
        # then judged by their row digests and the head's state digest alone.
        if base is not None and log_ok:
            _check_tensors(replica, base, good_records, report, progress)
        if digests_ok:
            _check_state_digest(replica, report)
        if log_ok:
            _check_buckets(replica, good_records, report)
        report.repair = _repair(replica, report, tensors_proven=digests_ok and replica.state_digest is not None)
    return report


def _repair(replica: Replica, report: VerifyReport, tensors_proven: bool) -> str | None:
    """The fix for what is damaged: never a command that would fail on the same damage."""
    damaged, path = set(report.damaged), replica.path
    if not damaged:
        return None
    if damaged == {"snapshots"} and report.manifest_files_only:
        return f"'deltalog replay {path} --in-place' writes each snapshot's manifest.json again from the log"
    if damaged & {"log", "snapshots", "buckets"}:
        if "tensors" not in damaged and tensors_proven:
            return (f"the tensor files hold the model at the head (their state digest matches): "
                    f"{tensorfiles.FROM_TENSORS_HINT.format(path=path)}; or "
                    f"{tensorfiles.RESEED_HINT.format(path=path)}")
        return f"{tensorfiles.RESEED_HINT.format(path=path)}, or restore the replica from a copy"
    return tensorfiles.REPAIR_HINT.format(path=path)


def _check_records(replica: Replica, report: VerifyReport, progress: Progress) -> set[int]:
    """Checksum and chain every record; returns the offsets of the sound ones."""
    oldest, head = replica.oldest_offset, replica.head
    good: set[int] = set()
    expected_base = oldest
    known = {t.name: t for t in replica.tensors}
    total = max(0, head - oldest)
    chain = _DigestChain(replica)
    for offset, blob in replica.iter_record_blobs():
        progress("records", min(offset - oldest, total), total)
        where = f"record {offset}"
        try:
            rec.check(blob, where)  # every byte, whatever later readers of the record decode
            record = rec.decode(blob, where, checked=True)
        except DeltalogError as exc:
            report.add("log", str(exc))
            expected_base = offset
            chain.running = None  # unknown after a record that cannot be read
            continue
        report.records += 1
        bad = []
        if record.offset != offset:
            bad.append(f"header says offset {record.offset}")
        if record.base != expected_base:
            bad.append(f"applies on {record.base} but follows {expected_base} (missing or out-of-order record)")
        if record.model_id != replica.model_id:
            bad.append(f"belongs to model {record.model_id}")
        for t in record.tensors:
            info = known.get(t.name)
            if info is None or t.dtype != info.dtype or t.new.shape[1:] != (info.row_elems,):
                bad.append(f"tensor {t.name!r} does not match the model")
            elif len(t.rows) and int(t.rows[-1]) >= info.rows:
                bad.append(f"tensor {t.name!r}: row {int(t.rows[-1])} out of range")
        report.extend("log", (f"{where}: {b}" for b in bad))
        if bad:
            chain.running = None
        else:
            good.add(offset)
            report.extend("log", (f"{where}: {b}" for b in chain.step(record, known)))
        expected_base = offset
    if expected_base != head:
        report.add("log", f"log ends at offset {expected_base} but the head is {head}")
    report.extend("log", chain.end())
    return good


class _DigestChain:
    """Follows the state digest from the oldest snapshot through every record to the head."""

    def __init__(self, replica: Replica):
        self.replica = replica
        try:
            manifest = replica.snapshot_manifest(replica.oldest_offset)
        except DeltalogError:  # _check_snapshots names it
            manifest = None
        self.running = None if manifest is None else lineage.from_hex(manifest.get("state_digest"))

    def step(self, record: rec.Record, known: dict) -> list[str]:
        bad = []
        if record.pre_digest is not None:
            if self.running is not None and record.pre_digest != self.running:
                bad.append(f"its state digest before is {lineage.to_hex(record.pre_digest)}, "
                           f"the model it applies on has {lineage.to_hex(self.running)}")
            self.running = record.pre_digest
        if self.running is not None and all(t.old is not None for t in record.tensors):
            self.running = lineage.advance(self.running, (
                (known[t.name].id, t.rows, kernels.row_digests(t.old), kernels.row_digests(t.new))
                for t in record.tensors))
            if record.post_digest is not None and record.post_digest != self.running:
                bad.append(f"its rows make state digest {lineage.to_hex(self.running)}, "
                           f"it says {lineage.to_hex(record.post_digest)}")
        if record.post_digest is not None or record.pre_digest is not None:
            self.running = record.post_digest
        return bad

    def end(self) -> list[str]:
        head = self.replica.state_digest
        if head is not None and self.running is not None and head != self.running:
            return [f"the head's state digest is {lineage.to_hex(head)}, "
                    f"the log's last record ends at {lineage.to_hex(self.running)}"]
        return []


def _check_state_digest(replica: Replica, report: VerifyReport) -> None:
    """The tensor files (their row digests, which matched their rows) must give the head's state digest."""
    want = replica.state_digest
    if want is None:
        return
    try:
        got = replica.digest_of_files()
    except DeltalogError as exc:
        report.add("tensors", str(exc))
        return
    if got != want:
        report.add("tensors",
            f"the tensor files give state digest {lineage.to_hex(got)}, the head {replica.head} has "
            f"{lineage.to_hex(want)}"
        )


def _check_snapshots(replica: Replica, report: VerifyReport, progress: Progress) -> dict | None:
    """Verify every snapshot; returns the newest intact one at or before head."""
    head = replica.head
    before = len(report.problems)
    offsets = sorted(replica.snapshot_offsets())
    if not offsets or offsets[0] != replica.oldest_offset:
        report.add("snapshots", f"no snapshot at the oldest retained offset {replica.oldest_offset}")
    manifests = []
    for offset in offsets:
        try:
            manifests.append(replica.snapshot_manifest(offset))
        except DeltalogError as exc:  # its entry in the log: the files cannot be checked without it
            report.add("snapshots", str(exc))
    base = None
    manifest_files = 0  # problems only with manifest.json: the file for people and HTTP clients
    for n, manifest in enumerate(manifests):
        progress("snapshots", n, len(manifests))
        if (problem := tensorfiles.manifest_file_problem(replica.path, manifest)) is not None:
            report.add("snapshots", problem)
            manifest_files += 1
        problems = tensorfiles.verify_snapshot(replica.path, manifest)
        claimed = lineage.from_hex(manifest.get("state_digest"))
        if not problems and claimed is not None:
            got = snapshot_digest(tensorfiles.snapshot_path(replica.path, manifest["offset"]), manifest)
            if got != claimed:
                problems.append(f"snapshot {manifest['offset']}: its files give state digest {lineage.to_hex(got)}, "
                                f"its manifest says {lineage.to_hex(claimed)}")
        report.snapshots += 1
        report.extend("snapshots", problems)
        if not problems and manifest["offset"] <= head:
            base = manifest
    if base is None:
        report.add("snapshots", "no intact snapshot to rebuild the tensors from")
    report.manifest_files_only = len(report.problems) - before == manifest_files
    return base


def _check_tensors(
    replica: Replica, base: dict, good: set[int], report: VerifyReport, progress: Progress
) -> None:
    """Rebuild each tensor from snapshot + log and compare it bitwise with its file."""
    after = sorted(o for o in good if o > base["offset"])
    snap_dir = tensorfiles.snapshot_path(replica.path, base["offset"])
    from .pending import merged_pending

    pending = merged_pending(replica)  # a partial sync: rows already ahead of the head
    for n, info in enumerate(replica.tensors):
        progress("tensors", n, len(replica.tensors))
        expected = np.array(tensorfiles.map_rows(os.path.join(snap_dir, info.file), info, writable=False))
        for offset in after:
            blob = replica.record_blob(offset)
            record = rec.decode(blob, f"record {offset}", only={info.name}, with_old=False, checked=True)
            for t in record.tensors:
                expected[t.rows.astype(np.intp)] = t.new
        if info.name in pending:
            expected[pending[info.name].rows.astype(np.intp)] = pending[info.name].new
        try:
            actual = replica.rows_view(info.name)
        except DeltalogError as exc:
            report.add("tensors", str(exc))
            continue
        differs = rows_differ(expected, np.asarray(actual)) if info.nbytes else []
        bad = int(np.count_nonzero(differs))
        if bad:
            first = int(np.flatnonzero(differs)[0])
            report.add("tensors",
                f"tensor {info.name!r}: {bad} rows differ from the log's head (first: row {first})"
            )
        report.tensors += 1


MAX_ROWS_NAMED = 10  # rows named per tensor in a problem line


def _check_row_digests(replica: Replica, report: VerifyReport, progress: Progress, name_unreadable: bool) -> bool:
    """Every row of every tensor file against its row digest: one problem line per tensor, naming its first bad rows.

    An unreadable tensor file is named here only when no snapshot lets
    _check_tensors name it. True when every row matched.
    """
    found = len(report.problems)  # to tell whether this check added any
    for n, info in enumerate(replica.tensors):
        progress("row digests", n, len(replica.tensors))
        try:
            actual = replica.rows_view(info.name)
        except DeltalogError as exc:
            if name_unreadable:
                report.add("tensors", str(exc))
            continue
        try:
            stored = tensorfiles.map_digests(replica.digest_path(info), info, writable=False)
        except DeltalogError as exc:
            report.add("tensors", str(exc))
            continue
        bad_rows: list[int] = []
        count = 0
        for start, digests in tensorfiles.digest_blocks(actual):
            bad = np.flatnonzero(digests != stored[start : start + len(digests)])
            count += len(bad)
            bad_rows.extend(int(start + b) for b in bad[: MAX_ROWS_NAMED - len(bad_rows)])
        if count:
            more = f" and {count - len(bad_rows)} more" if count > len(bad_rows) else ""
            report.add("tensors",
                f"tensor {info.name!r}: {count} rows differ from their row digests "
                f"(rows {', '.join(map(str, bad_rows))}{more})"
            )
    return len(report.problems) == found


def _check_buckets(replica: Replica, good: set[int], report: VerifyReport) -> None:
    """Bucket versions must be the offset of the last record touching the bucket."""
    expected: dict[str, dict[int, int]] = {t.name: {} for t in replica.tensors}
    for offset in sorted(good):
        record = rec.decode(replica.record_blob(offset), f"record {offset}", with_old=False, checked=True)
        for t in record.tensors:
            buckets = (t.rows // np.uint64(replica.bucket_rows)).tolist()
            if t.versions is None:
                expected[t.name].update(dict.fromkeys(buckets, offset))
            else:  # a coalesced sync: a bucket's version is the newest row version in it
                newest: dict[int, int] = {}
                for bucket, version in zip(buckets, t.versions.tolist()):
                    newest[bucket] = max(version, newest.get(bucket, 0))
                expected[t.name].update(newest)
    from .pending import pending_buckets

    for name, held in pending_buckets(replica.pending_sync()).items():
        expected[name].update(held)
    oldest = replica.oldest_offset
    for info in replica.tensors:
        index = replica.bucket_index(info.name)
        want_by_bucket = expected[info.name]
        for bucket, (version, _sig) in index.items():
            want = want_by_bucket.get(bucket)
            if (want is not None and version != want) or (want is None and version > oldest):
                report.add("buckets",
                    f"bucket index: tensor {info.name!r} bucket {bucket} has version {version}, "
                    f"the log says {want if want is not None else f'<= {oldest}'}"
                )
        for bucket, want in want_by_bucket.items():
            if bucket not in index:
                report.add("buckets", f"bucket index: tensor {info.name!r} bucket {bucket} missing (log says {want})")
