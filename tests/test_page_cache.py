"""Live tensor files of a model too big for the kernel's dirty threshold are cached in small pages.

A row stored through the shared map dirties the whole page-cache folio it
lands in (up to 2 MiB on ext4 since Linux 6.16): for a model past half of
dirty_background, freshly written files are dropped from the cache and read
back in single pages (deltalog.tensorfiles.prefers_small_pages). These tests
check the decision, that every bulk writer of live files asks for it, that the
read-back covers the whole file, and that a writer notices when another
program's read() brought large folios back and re-caches
(deltalog.tensorfiles.SmallPageGuard).
"""

from __future__ import annotations

import os
import time

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


# -- a writer notices large folios that another program brought back ------------------------

MiB = 1 << 20


def _evict_and_read_back(paths) -> None:
    """What a backup does to a live replica after memory pressure evicted its pages: the pages go,
    then read() in cat's 128 KiB chunks caches the files again, in large folios where the kernel
    uses them (readahead grows them along the file: 4 KiB at its start, 2 MiB after ~32 MiB)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            while os.read(fd, 128 << 10):
                pass
        finally:
            os.close(fd)


@pytest.fixture
def large_folios(tmp_path):
    """Skip unless read() caches a file in folios much larger than a page here, with the stores
    into them counted in /proc/thread-self/io (ext4 on Linux >= 6.16 does)."""
    if not hasattr(os, "posix_fadvise") or tensorfiles.thread_dirtied_bytes() is None:
        pytest.skip("no posix_fadvise or /proc/thread-self/io here: the guard is off")
    import mmap

    path = str(tmp_path / "probe.bin")  # as big as the table below
    with open(path, "wb") as f:
        f.write(bytes(16 * MiB))
        f.flush()
        os.fsync(f.fileno())
    _evict_and_read_back([path])
    with open(path, "r+b") as f:
        mapped = mmap.mmap(f.fileno(), 16 * MiB)
    before = tensorfiles.thread_dirtied_bytes()
    for offset in range(0, 16 * MiB, MiB):
        mapped[offset + 1000] = 1
    dirtied = (tensorfiles.thread_dirtied_bytes() - before) // 16
    mapped.close()
    os.remove(path)
    if dirtied < 128 << 10:
        pytest.skip(f"read() cached the probe file in small pages here ({dirtied} bytes dirtied a store): "
                    "no large folios to recover from")


def _table():
    return np.arange(65536 * 64, dtype=np.float32).reshape(65536, 64)  # 16 MiB, 256 B a row


def _process_dirtied_bytes() -> int:
    """What every thread of this process dirtied so far (the writer touches row pages on another thread)."""
    with open("/proc/self/io", "rb") as f:
        text = f.read()
    start = text.index(b"\nwrite_bytes:") + 13
    return int(text[start : text.index(b"\n", start)])


def _commit_random(r, expected, rng, n=16) -> int:
    """Commit n random rows; returns the bytes dirtied per row doing it (rows, digests and the log)."""
    idx = np.unique(rng.integers(0, expected.shape[0], n))
    values = rng.standard_normal((len(idx), 64)).astype(np.float32)
    expected[idx] = values
    before = _process_dirtied_bytes()
    r.commit({"emb": (idx, values)})
    return (_process_dirtied_bytes() - before) // len(idx)


def test_a_writer_recaches_files_a_reader_brought_back_in_large_folios(tmp_path, monkeypatch, large_folios):
    monkeypatch.setattr(tensorfiles, "_dirty_background_bytes", lambda: 2)  # a "big" model
    expected = _table()
    Replica.init(str(tmp_path / "r"), {"emb": expected}, bucket_rows=1024).close()
    rng = np.random.default_rng(3)
    with Replica.open(str(tmp_path / "r")) as r:
        guard = r.writer.page_guard
        _commit_random(r, expected, rng)  # init cached the files in small pages: nothing to do
        assert guard.recaches == 0
        r.flush()  # clean pages, unmapped by reclaim (here: this handle's maps dropped)...
        r.maps.forget()
        _evict_and_read_back(tensorfiles.live_file_paths(r.maps.dir, r.tensors))  # ... evicted and read back
        assert _commit_random(r, expected, rng) >= 64 << 10  # a store dirties a large folio
        assert guard.recaches == 1
        r.flush()  # every page clean again: the next stores show what they dirty
        assert _commit_random(r, expected, rng) < 16 << 10  # a row dirties a page or two again
        assert guard.recaches == 1
        assert np.array_equal(r.read_tensor("emb"), expected)
        assert not verify(r).problems
    with Replica.open(str(tmp_path / "r")) as r:
        assert np.array_equal(r.read_tensor("emb"), expected)


def test_recaching_under_a_reader_that_has_the_files_mapped(tmp_path, monkeypatch, large_folios):
    monkeypatch.setattr(tensorfiles, "_dirty_background_bytes", lambda: 2)
    expected = _table()
    Replica.init(str(tmp_path / "r"), {"emb": expected}, bucket_rows=1024).close()
    rng = np.random.default_rng(4)
    with Replica.open(str(tmp_path / "r")) as r, Replica.open(str(tmp_path / "r")) as reader:
        _evict_and_read_back(tensorfiles.live_file_paths(r.maps.dir, r.tensors))
        assert np.array_equal(reader.read_tensor("emb"), expected)  # the reader maps every page
        _commit_random(r, expected, rng)
        assert r.writer.page_guard.recaches == 1  # its pages stay (mapped), and read the same
        assert np.array_equal(reader.read_tensor("emb"), expected)
        assert np.array_equal(reader.read_rows("emb", np.arange(100))[1], expected[:100])
        assert not verify(reader).problems


class _Dirtying:
    """thread_dirtied_bytes that moves by ``per_call`` each time it is read."""

    def __init__(self, per_call: int):
        self.per_call, self.total = per_call, 0

    def __call__(self) -> int:
        self.total += self.per_call
        return self.total


def _guard(tmp_path, monkeypatch, dirtied_per_check: int, small_pages: bool = True):
    """A SmallPageGuard on a fake clock; returns (guard, clock, events: "flush" / "unmap" / "recache")."""
    events = []
    maps = tensorfiles.TensorMaps(str(tmp_path))
    monkeypatch.setattr(maps, "unmap_pages", lambda: events.append("unmap"))
    monkeypatch.setattr(tensorfiles, "recache_in_small_pages", lambda path: events.append("recache"))
    monkeypatch.setattr(tensorfiles, "prefers_small_pages", lambda model_bytes: small_pages)
    monkeypatch.setattr(tensorfiles, "thread_dirtied_bytes", _Dirtying(dirtied_per_check))
    clock = [1000.0]
    return tensorfiles.SmallPageGuard(maps, clock=lambda: clock[0]), clock, events


INFOS = [tensorfiles.TensorInfo(0, "emb", "float32", (1 << 20, 64))]


def _stores(guard, events, rows=100) -> bool:
    return guard.check(guard.mark(INFOS), [(INFOS[0], rows)], INFOS, lambda: events.append("flush"))


def test_the_guard_flushes_before_it_drops_pages(tmp_path, monkeypatch):
    guard, _clock, events = _guard(tmp_path, monkeypatch, 100 * (2 << 20))  # 2 MiB a row
    assert _stores(guard, events)
    assert events == ["flush", "unmap", "recache", "recache"]  # fsynced, unmapped, then the .bin and .digest
    assert guard.last == (100 * (2 << 20), 100)


def test_the_guard_leaves_small_pages_and_small_models_alone(tmp_path, monkeypatch):
    guard, _clock, events = _guard(tmp_path, monkeypatch, 100 * (8 << 10))  # 8 KiB a row: small pages
    assert not _stores(guard, events) and events == []
    guard, _clock, events = _guard(tmp_path, monkeypatch, 100 * (2 << 20), small_pages=False)
    assert not _stores(guard, events) and events == []
    assert tensorfiles.thread_dirtied_bytes.total == 0  # not even read for a model that wants large folios


def test_the_guard_is_rate_limited_and_backs_off(tmp_path, monkeypatch):
    guard, clock, events = _guard(tmp_path, monkeypatch, 100 * (2 << 20))
    interval = tensorfiles.RECACHE_INTERVAL
    assert _stores(guard, events)
    clock[0] += interval - 1
    assert not _stores(guard, events)  # too soon: left alone
    assert (guard.recaches, guard.suppressed) == (1, 1)
    clock[0] += 2
    assert _stores(guard, events)  # back within twice the interval: the next wait doubles
    clock[0] += 2 * interval - 1
    assert not _stores(guard, events)
    clock[0] += 2
    assert _stores(guard, events)
    clock[0] += 100 * interval  # a long quiet spell: the wait starts over
    assert _stores(guard, events)
    clock[0] += interval + 1
    assert _stores(guard, events)
    assert (guard.recaches, guard.suppressed) == (5, 2)
    assert events.count("flush") == 5


def test_what_small_pages_can_dirty():
    import mmap

    page = mmap.PAGESIZE
    table = tensorfiles.TensorInfo(0, "emb", "float32", (1 << 22, 64))  # 1 GiB of 256-byte rows (page-aligned)
    assert tensorfiles.small_page_bytes([(table, 1)]) == 2 * page  # the row's page and its digest's
    assert tensorfiles.small_page_bytes([(table, 1 << 16)]) == min(1 << 16, table.nbytes // page) * page + min(
        (1 << 16) * page, (1 << 22) * 8)  # the digest file (32 MiB) holds fewer pages than rows stored
    odd = tensorfiles.TensorInfo(1, "odd", "float32", (1000, 3))  # 12-byte rows straddle pages
    assert tensorfiles.small_page_bytes([(odd, 1)]) == 3 * page
    assert tensorfiles.small_page_bytes([(odd, 1000)]) == (-(-12000 // page) + -(-8000 // page)) * page  # the files
    assert tensorfiles.small_page_bytes([(table, 0), (odd, 0)]) == 0


def test_a_commit_that_touches_most_of_the_table_is_judged_by_the_whole_file(tmp_path, monkeypatch):
    import mmap

    if mmap.PAGESIZE != 4096:
        pytest.skip("figures for 4 KiB pages")
    table = tensorfiles.TensorInfo(0, "emb", "float32", (1 << 22, 64))  # 1 GiB, 32 MiB of digests
    rows = 1 << 16  # 64 k random rows: a quarter of the pages in small pages, every folio if large
    in_small_pages = (1 << 18) * (1 - np.exp(-rows / (1 << 18))) * 4096 + (32 << 20)  # 264 MiB
    worst_case = rows * 4096 + (32 << 20)  # each row on a page of its own: 288 MiB
    for dirtied, large in ((int(in_small_pages), False), (worst_case, False),
                           ((1 << 30) + (32 << 20), True), (579 << 20, True)):  # all large; some (measured)
        guard, _clock, events = _guard(tmp_path, monkeypatch, dirtied)
        assert guard.check(guard.mark([table]), [(table, rows)], [table], lambda: events.append("flush")) == large


def _resident_fraction(path: str) -> float:
    """The fraction of a file's pages in the page cache (mincore of a private map of it)."""
    import ctypes
    import mmap

    size = os.path.getsize(path)
    pages = -(-size // mmap.PAGESIZE)
    vec = (ctypes.c_ubyte * pages)()
    with open(path, "rb") as f:
        mapped = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY)  # writable: ctypes can take its address
    start = ctypes.c_char.from_buffer(mapped)
    try:
        failed = ctypes.CDLL(None, use_errno=True).mincore(
            ctypes.c_void_p(ctypes.addressof(start)), ctypes.c_size_t(size), vec)
        errno = ctypes.get_errno()
    finally:
        del start  # the map cannot close while ctypes holds its buffer
        mapped.close()
    if failed:
        pytest.skip(f"mincore failed: {os.strerror(errno)}")
    return sum(b & 1 for b in vec) / pages


def test_recaching_reads_the_whole_file_back(tmp_path):
    """WILLNEED reads at most one readahead window per call: one call for the whole file left
    all but its first window to be faulted back in by commits (in large folios, where readahead
    grew them)."""
    if not hasattr(os, "posix_fadvise") or not os.path.exists("/proc/self/io"):
        pytest.skip("Linux only")
    path = str(tmp_path / "f.bin")
    with open(path, "wb") as f:
        f.write(bytes(64 * MiB))
        f.flush()
        os.fsync(f.fileno())
    tensorfiles.recache_in_small_pages(path)
    for _ in range(50):  # the reads are in flight; a page counts once it is read
        if _resident_fraction(path) > 0.9:
            break
        time.sleep(0.1)
    assert _resident_fraction(path) > 0.9
