"""spill.join: a record's pieces joined in memory, or from SPILL_BYTES on in an unnamed file."""

from __future__ import annotations

import errno
import os
import tempfile

import pytest

from deltalog import spill
from deltalog.errors import StorageError


@pytest.mark.parametrize("threshold", [0, 1 << 30], ids=["spilled", "in-memory"])
def test_join_is_the_concatenation_and_lets_the_parts_go(tmp_path, monkeypatch, threshold):
    monkeypatch.setattr(spill, "SPILL_BYTES", threshold)
    parts = [b"head", bytearray(b"\x00" * 5000), memoryview(b"tail")]
    joined = spill.join(parts, str(tmp_path))
    assert bytes(joined) == b"head" + b"\x00" * 5000 + b"tail"
    assert parts == []  # emptied: the caller's pieces go as they are written
    assert isinstance(joined, bytes) == (threshold > 0)
    assert os.listdir(tmp_path) == []  # the file has no name: nothing to clean up after a crash


def test_a_full_disk_is_a_storage_error_and_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(spill, "SPILL_BYTES", 0)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tempfile, "TemporaryFile", full)
    parts = [b"x" * 100]
    with pytest.raises(StorageError, match="disk full") as caught:
        spill.join(parts, str(tmp_path))
    assert caught.value.hint == "free disk space and retry"
    assert parts == [] and os.listdir(tmp_path) == []
