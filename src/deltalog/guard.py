"""Guarded sync (`sync --check CMD`): keep an update only if a check accepts it.

Ekko recalls a model whose updates hurt its SLOs. Here an SRE's cron job
gives `sync` a command that judges the new model (an offline eval, a canary
query); when it fails, the destination goes back to where it was.

"Back to where it was" means the sync never happened, not a rollback record:
a follower keeps its source's offsets, and a local record would take an
offset that belongs to the source (the next sync would then find a replica
that looks level but is not). So the sync record is removed and its undo
values restored, with the bucket index entries the partial-sync state kept.

Flow, on a local destination, all under its writer lock:

1. Just before the final transaction of the sync, ``sync.unconfirmed`` is
   stored durably: {target, base, buckets (the bucket index as at base)}.
2. After the sync, CMD runs with DELTALOG_REPLICA, DELTALOG_HEAD,
   DELTALOG_PREVIOUS_HEAD and DELTALOG_SOURCE in its environment. The
   replica is at the new head, so CMD reads the candidate model.
3. CMD exits 0: the marker is deleted. Otherwise the sync is reverted:
   ``sync.revert`` (the intent) is stored, the record's old values are
   written and fsynced, then one transaction deletes the record, restores
   the bucket index and sets the head back to base. Recovery finishes a
   revert a crash interrupted.

A crash between 1 and 3 leaves the marker: the next ``sync --check`` runs
the check on that state first, before it syncs anything.
"""

from __future__ import annotations

import os
import subprocess
import sys

from . import record as rec
from .pending import pending_state
from .replica import Replica
from .store import bucket_key, offset_key

UNCONFIRMED_KEY = "sync.unconfirmed"
REVERT_KEY = "sync.revert"


def run_check(command: str, replica_path: str, head: int, previous: int | None, source: str) -> int:
    """Run the user's check through the shell; its output goes to our stderr. Returns its exit code."""
    env = {
        **os.environ,
        "DELTALOG_REPLICA": os.path.abspath(replica_path),
        "DELTALOG_HEAD": str(head),
        "DELTALOG_PREVIOUS_HEAD": "" if previous is None else str(previous),
        "DELTALOG_SOURCE": source,
    }
    return subprocess.run(command, shell=True, env=env, stdout=sys.stderr, stdin=subprocess.DEVNULL).returncode


def unconfirmed(replica: Replica) -> dict | None:
    """The marker of a sync not yet accepted by its check, if it still describes the head."""
    with replica.store.read() as txn:
        marker = replica.store.get_meta(txn, UNCONFIRMED_KEY)
    return marker if marker is not None and marker["target"] == replica.head else None


def mark_unconfirmed(replica: Replica, target: int) -> None:
    """Step 1: remember how to undo the sync that is about to finish (lock held)."""
    pending = pending_state(replica)
    marker = {"target": target, "base": replica.head, "buckets": pending["buckets"] if pending else {}}
    replica.store.write(lambda txn: replica.store.put_meta(txn, UNCONFIRMED_KEY, marker))


def confirm(replica: Replica) -> None:
    replica.store.write(lambda txn: txn.delete(UNCONFIRMED_KEY.encode(), db=replica.store.dbs["meta"]))


def revert(replica: Replica, marker: dict) -> None:
    """Step 3, on failure: undo the sync record at the head (lock held)."""

    def intend(txn):
        replica.store.put_meta(txn, REVERT_KEY, marker)
        replica._put_state(txn, applying=marker["base"])

    replica.store.write(intend)
    finish_revert(replica, marker)


def finish_revert(replica: Replica, marker: dict) -> None:
    """Write the undo values, then drop the record in one transaction (idempotent: recovery calls it too)."""
    target, base = marker["target"], marker["base"]
    store = replica.store
    with store.read() as txn:
        blob = store.get_record(txn, target)
        blob = None if blob is None else bytes(blob)
    if blob is not None:  # else the final transaction already ran
        record = rec.decode(blob, f"{replica.path}: record {target}")
        undo = [rec.TensorDelta(t.name, t.dtype, t.rows, t.old, None) for t in record.tensors if t.old is not None]
        replica._apply(rec.Record(target, base, "sync", 0.0, replica.model_id, undo))
        replica.flush()

    def drop(txn):
        meta = store.dbs["meta"]
        if store.get_record(txn, target) is not None:
            txn.delete(offset_key(target), db=store.dbs["records"])
        for name, entry in marker["buckets"].items():
            info = replica.info(name)
            for bucket, version, significance in zip(entry["b"], entry["ov"], entry["os"]):
                if version < 0:  # the bucket had no entry before the sync
                    txn.delete(bucket_key(info.id, bucket), db=store.dbs["buckets"])
                else:
                    store.put_bucket(txn, info.id, bucket, version, significance)
        gen = store.get_meta(txn, "state").get("gen", 0) + 1
        replica._put_state(txn, head=base, applied=base, applying=None, flushed=base, gen=gen)
        txn.delete(REVERT_KEY.encode(), db=meta)
        txn.delete(UNCONFIRMED_KEY.encode(), db=meta)

    store.write(drop)


class GuardedSink:
    """A local Sink that marks the sync unconfirmed before it finishes, and settles
    an unconfirmed sync left by a crashed run before anything else."""

    def __init__(self, sink, check: str, source_name: str):
        self._sink = sink
        self._check = check
        self._source = source_name
        self.outcome: dict | None = None  # set when a leftover unconfirmed sync was settled

    def __getattr__(self, name):
        return getattr(self._sink, name)

    def begin(self, wait: float, dry_run: bool = False) -> dict:
        state = self._sink.begin(wait, dry_run)
        replica = self._sink.replica
        marker = None if dry_run or replica is None else unconfirmed(replica)
        if marker is not None:
            code = run_check(self._check, replica.path, marker["target"], marker["base"], self._source)
            if code == 0:
                confirm(replica)
            else:
                revert(replica, marker)
                from .sync import sink_state

                state = sink_state(replica)
            self.outcome = {"offset": marker["target"], "exit_code": code, "accepted": code == 0}
        return state

    def finish(self, target: int, follow: dict) -> dict:
        mark_unconfirmed(self._sink.replica, target)
        return self._sink.finish(target, follow)
