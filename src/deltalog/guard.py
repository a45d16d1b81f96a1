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
   stored durably (receive.mark_unconfirmed): how to undo it.
2. After the sync, CMD runs with DELTALOG_REPLICA, DELTALOG_HEAD,
   DELTALOG_PREVIOUS_HEAD and DELTALOG_SOURCE in its environment. The
   replica is at the new head, so CMD reads the candidate model.
3. CMD exits 0: the marker is deleted. Otherwise the sync is reverted
   (receive.revert_sync, a crash-safe change of its own).

A crash between 1 and 3 leaves the marker: the next ``sync --check`` runs
the check on that state first, before it syncs anything.
"""

from __future__ import annotations

import os
import subprocess
import sys

from .receive import confirm, mark_unconfirmed, revert_sync, sink_state, unconfirmed


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
                revert_sync(replica, marker)
                state = sink_state(replica)
            self.outcome = {"offset": marker["target"], "exit_code": code, "accepted": code == 0}
        return state

    def finish(self, target: int, follow: dict, digest: str | None = None) -> dict:
        mark_unconfirmed(self._sink.replica, target)
        return self._sink.finish(target, follow, digest)
