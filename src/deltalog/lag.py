"""How far a follower is behind its source: now when that is cheap, else as of its last sync.

A follower records what its last sync saw of the source (meta "follow":
source, source_head, in_sync_at, synced_at). Those figures go stale as soon
as the source commits again, and ``status`` must not pass them off as
current. :func:`refresh` looks at the source itself when it is a local
path (one LMDB read of its head, and of the header of the first record
past the follower's head), and otherwise leaves the recorded figures
marked as what they are: ``lag_live`` False and ``lag_as_of`` the time of
the last sync. Asking a remote source (ssh, http, a relay) would make
``status`` wait on the network, so it is never done here.

The fields (in ``Replica.status()`` of a follower):

lag_offsets   the source's head minus the follower's head (>= 0)
lag_seconds   seconds since the follower last held its source's head:
              0 when it holds it now; when live and behind, since the
              source wrote its first record past the follower's head;
              otherwise since the last sync that reached the source's head
              (an upper bound), None when none has
lag_as_of     unix time the figures describe (now when live)
lag_live      True when source_head was read from the source just now
lag_note      (only when a local source could not be read) why not
"""

from __future__ import annotations

import os
import time

from .errors import DeltalogError


def refresh(status: dict, now: float | None = None) -> dict:
    """``status`` (of a follower) with its lag read from a local source now; unchanged otherwise.

    Nothing here raises: a source that is gone, unreadable or another model
    leaves the recorded figures (``lag_live`` False) and says why in
    ``lag_note``.
    """
    source = status.get("source")
    if not source:
        return status
    if not _is_local_path(source):
        return status
    now = time.time() if now is None else now
    head = int(status["head"])
    try:
        from .replica import Replica

        with Replica.open(source) as src:
            if src.model_id != status.get("model_id"):
                status["lag_note"] = "the source path now holds another model"
                return status
            source_head = src.head
            moved_at = None
            if source_head > head and src.oldest_offset <= head:  # else the record past our head is compacted away
                first = next(src.iter_summaries(head, source_head), None)
                moved_at = None if first is None else first.time
    except (DeltalogError, OSError) as exc:
        status["lag_note"] = f"the source is not readable now: {exc}"
        return status
    status["source_head"] = source_head
    status["lag_offsets"] = max(0, source_head - head)
    if source_head <= head:
        status["lag_seconds"] = 0.0
    elif moved_at is not None:
        status["lag_seconds"] = round(max(0.0, now - moved_at), 3)
    # else (no record past our head is kept): the recorded upper bound stays
    status["lag_as_of"] = now
    status["lag_live"] = True
    return status


def _is_local_path(text: str) -> bool:
    from .transport import parse_spec

    try:
        return parse_spec(text).scheme == "local" and os.path.isabs(text)
    except DeltalogError:
        return False
