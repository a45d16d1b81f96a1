"""Object-store relays as a sync Source: ``deltalog sync s3://bucket/prefix DST`` (deltalog.relay).

Pull only: publishing (``deltalog sync PRIMARY s3://...``) is not a Sink,
since a relay applies nothing; the CLI calls deltalog.relay.publish.
"""

from __future__ import annotations

from ..objstore import ObjectStore
from ..relay import RelayReader


def open_source(spec, options) -> "RelaySource":
    return RelaySource(spec.text)


class RelaySource(RelayReader):
    """A relay read by the sync engine: hello, chunks, snapshots, wait_for_head."""

    def __init__(self, url: str):
        super().__init__(ObjectStore(url))

    @property
    def reusable(self) -> bool:
        return True

    def close(self) -> None:
        pass
