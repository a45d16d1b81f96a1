"""Live tensor files of a model too big for the kernel's dirty threshold are cached in small pages.

A row stored through the shared map dirties the whole page-cache folio it
lands in (up to 2 MiB on ext4 since Linux 6.16): for a model past half of
dirty_background, freshly written files are dropped from the cache and read
back in single pages (deltalog.tensorfiles.prefers_small_pages). These tests
check the decision and that every bulk writer of live files asks for it.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from deltalog import Replica, tensorfiles
from deltalog.verify import verify


@pytest.fixture
def advice(monkeypatch):
    """(basename, advice) of every posix_fadvise call, still passed on to the kernel."""
    if not hasattr(os, "posix_fadvise"):
        pytest.skip("no posix_fadvise here")
    calls = []
    real = os.posix_fadvise

    def recording(fd, offset, length, what):
        calls.append((os.path.basename(os.readlink(f"/proc/self/fd/{fd}")), what))
        return real(fd, offset, length, what)

    monkeypatch.setattr(os, "posix_fadvise", recording)
    return calls


def _model():
    return {"emb": np.arange(4096 * 8, dtype=np.float32).reshape(4096, 8), "bias": np.ones(16, np.float64)}


LIVE = {"00000.bin", "00000.digest", "00001.bin", "00001.digest"}


def _recached(calls) -> set[str]:
    dropped = {name for name, what in calls if what == os.POSIX_FADV_DONTNEED}
    reread = {name for name, what in calls if what == os.POSIX_FADV_WILLNEED}
    assert dropped == reread  # each file dropped is read back
    return dropped


def test_small_pages_only_past_half_the_dirty_threshold(monkeypatch):
    monkeypatch.setattr(tensorfiles, "_dirty_background_bytes", lambda: 1000)
    assert tensorfiles.prefers_small_pages(501)
    assert not tensorfiles.prefers_small_pages(500)
    monkeypatch.setattr(tensorfiles, "_dirty_background_bytes", lambda: None)
    assert not tensorfiles.prefers_small_pages(1 << 50)


def test_init_of_a_big_model_recaches_every_live_file(tmp_path, monkeypatch, advice):
    monkeypatch.setattr(tensorfiles, "_dirty_background_bytes", lambda: 2)
    Replica.init(str(tmp_path / "r"), _model(), bucket_rows=64).close()
    assert _recached(advice) == LIVE  # not the snapshot's copies
    with Replica.open(str(tmp_path / "r")) as r:
        r.commit({"emb": (np.array([5]), np.full((1, 8), 7, np.float32))})
        assert not verify(r).problems
        assert np.array_equal(r.read_tensor("emb")[5], np.full(8, 7, np.float32))


def test_init_of_a_small_model_keeps_the_cache(tmp_path, monkeypatch, advice):
    monkeypatch.setattr(tensorfiles, "_dirty_background_bytes", lambda: 1 << 40)
    Replica.init(str(tmp_path / "r"), _model(), bucket_rows=64).close()
    assert _recached(advice) == set()


def test_copying_a_snapshot_over_the_tensors_recaches_them(tmp_path, monkeypatch, advice):
    Replica.init(str(tmp_path / "r"), _model(), bucket_rows=64).close()
    with Replica.open(str(tmp_path / "r")) as r:
        manifest = r.snapshots()[0]
    monkeypatch.setattr(tensorfiles, "_dirty_background_bytes", lambda: 2)
    advice.clear()
    tensorfiles.copy_snapshot_into_tensors(str(tmp_path / "r"), manifest)
    assert _recached(advice) == LIVE
