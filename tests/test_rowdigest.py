"""Row digests of the live tensor files (format v2): the function, every writer, every checked read.

The digest files must always describe the bytes the tensor files hold, so
each test compares tensors/NNNNN.digest with the digests of tensors/NNNNN.bin
computed afresh (not through verify), after each kind of writer: init,
commit, rollback, recovery after a crash between the log and the rows, a
new follower made from a snapshot, a partial sync, a rebase onto a newer
snapshot, a rejected `sync --check` and `replay --in-place`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import (REPO, Crash, apply_update, assert_same, bits, cli_json, crash_next_apply, crash_writer,
                      random_model, random_update, run_cli)

from deltalog import Replica, rowdigest, tensorfiles
from deltalog.compact import compact
from deltalog.errors import IntegrityError
from deltalog.replay import repair_in_place
from deltalog.rollback import rollback
from deltalog.verify import verify

# -- the function ------------------------------------------------------------------------------------------


def _rows_of(array: np.ndarray) -> list[bytes]:
    n = array.shape[0] if array.ndim else 1
    row_bytes = array.size * array.dtype.itemsize // n if n else 0
    raw = np.ascontiguousarray(array).tobytes()
    return [raw[i * row_bytes : (i + 1) * row_bytes] for i in range(n)]


@pytest.mark.parametrize(
    "dtype, shape",
    [
        (np.float32, (40, 64)),  # 256-byte rows: the u64 view, no copy
        (np.float32, (40, 3)),  # 12 bytes: the last word padded
        (np.float16, (40, 4)),  # 8 bytes
        (np.float16, (40,)),  # 2-byte rows
        (np.uint16, (40, 5)),
        (np.int8, (40,)),  # 1-byte rows
        (np.bool_, (40, 3)),
        (np.int64, (40, 2, 3)),
        (np.float64, (7, 0)),  # rows of 0 bytes: digest 0
        (np.int32, ()),  # a 0-D scalar: one row
        (np.float32, (0, 8)),  # no rows
        (np.uint8, (0,)),
    ],
)
def test_digests_follow_the_definition(dtype, shape):
    rng = np.random.default_rng(3)
    array = rng.integers(0, 256, size=int(np.prod(shape)) * np.dtype(dtype).itemsize, dtype=np.uint8)
    array = array.view(dtype).reshape(shape)
    got = rowdigest.row_digests(array)
    assert got.dtype == np.uint64 and got.shape == ((shape[0] if shape else 1),)
    assert got.tolist() == [rowdigest.reference_digest(row) for row in _rows_of(array)]
    if array.ndim and array.size and array.shape[0]:  # a strided view digests like its copy
        assert rowdigest.row_digests(array[::2]).tolist() == got[::2].tolist()


def test_known_values():
    assert rowdigest.reference_digest(b"") == 0
    assert rowdigest.reference_digest((1).to_bytes(8, "little")) == 0x8A436D43500ADA67  # FORMAT.md's examples
    assert rowdigest.reference_digest((1 << 32).to_bytes(8, "little")) == 0x2D965ECB583F0216
    assert rowdigest.reference_digest(bytes(range(1, 13))) == 0x9D21D61411363893
    assert rowdigest.row_digests(np.arange(1, 13, dtype=np.uint8).reshape(1, 12)).tolist() == [0x9D21D61411363893]
    # padding: a row of 3 bytes digests as its 8-byte zero-padded word, and the word order matters
    assert rowdigest.reference_digest(b"\x01\x02\x03") == rowdigest.reference_digest(b"\x01\x02\x03" + b"\0" * 5)
    assert rowdigest.reference_digest(b"\0" * 8 + b"\1") != rowdigest.reference_digest(b"\1" + b"\0" * 8)
    keys = rowdigest.keys(64)
    assert np.all(keys & np.uint64(1) == 1) and len(set(keys.tolist())) == 64


@pytest.mark.parametrize("dtype, row_elems", [(np.float32, 64), (np.float32, 3), (np.float16, 1), (np.int8, 1),
                                              (np.uint8, 13), (np.float64, 5)])
def test_every_single_bit_flip_is_detected(dtype, row_elems):
    """Flip each bit of a row in turn (all rows at once, one bit position each): no digest survives."""
    rng = np.random.default_rng(11)
    row_bytes = row_elems * np.dtype(dtype).itemsize
    base = rng.integers(0, 256, size=row_bytes, dtype=np.uint8)
    bits = row_bytes * 8
    flipped = np.tile(base, (bits, 1))
    positions = np.arange(bits)
    flipped[positions, positions // 8] ^= (1 << (positions % 8)).astype(np.uint8)
    good = rowdigest.row_digests(base.view(dtype).reshape(1, row_elems))
    bad = rowdigest.row_digests(flipped.view(dtype).reshape(bits, row_elems))
    assert np.all(bad != good[0])
    assert len(np.unique(bad)) == bits  # and no two flips collide either
    assert rowdigest.mismatches(flipped.view(dtype).reshape(bits, row_elems), np.full(bits, good[0])).tolist() == list(
        range(bits)
    )
    assert rowdigest.first_mismatch(base.view(dtype).reshape(1, row_elems), good) is None


@pytest.mark.parametrize("seed", [0, 1])
def test_every_pair_of_bit_flips_is_detected(seed):
    """All 130,816 two-bit errors of a 64-byte row (8 words): none leaves the digest unchanged."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=64, dtype=np.uint8)
    i, j = np.triu_indices(64 * 8, k=1)
    flipped = np.tile(base, (len(i), 1))
    for pos in (i, j):
        flipped[np.arange(len(pos)), pos // 8] ^= (1 << (pos % 8)).astype(np.uint8)
    good = rowdigest.row_digests(base.view(np.float64).reshape(1, 8))[0]
    assert not np.any(rowdigest.row_digests(flipped.view(np.float64)) == good)


def test_changes_confined_to_the_high_bits_of_words_are_detected():
    """Without the premix (v = w ^ (w >> 32)) these cancel: 2^63 + 2^63 = 0 mod 2^64."""
    row = np.array([[1.5, -2.25, 3.0, 0.125]], dtype=np.float64)
    negated = row * np.array([-1.0, -1.0, 1.0, 1.0])  # two sign bits: bit 63 of words 0 and 1
    assert rowdigest.row_digests(negated)[0] != rowdigest.row_digests(row)[0]
    f32 = np.arange(1, 9, dtype=np.float32).reshape(1, 8)
    f32_negated = f32 * np.array([1, -1, 1, -1, 1, 1, 1, 1], dtype=np.float32)  # elements 1 and 3
    assert rowdigest.row_digests(f32_negated)[0] != rowdigest.row_digests(f32)[0]
    exponents = row.copy()
    exponents.view(np.uint64)[0, :2] ^= np.uint64(0x7FF0000000000000)  # two whole exponent fields
    assert rowdigest.row_digests(exponents)[0] != rowdigest.row_digests(row)[0]


def test_speed_on_256_byte_rows():
    """Vectorised: a few GB/s on one core; the bar here only catches a per-row Python loop."""
    import time

    rows = np.random.default_rng(0).standard_normal((1 << 16, 64)).astype(np.float32)
    rowdigest.row_digests(rows)
    start = time.perf_counter()
    rowdigest.row_digests(rows)
    seconds = time.perf_counter() - start
    assert rows.nbytes / seconds > 200e6, f"{rows.nbytes / seconds / 1e9:.2f} GB/s"


# -- every writer keeps the digest files right -------------------------------------------------------------------


def assert_digests_right(path) -> None:
    """Each tensors/NNNNN.digest holds the digests of the bytes of tensors/NNNNN.bin, computed afresh."""
    with Replica.open(path) as r:
        assert r.has_row_digests
        for info in r.tensors:
            tensor = os.path.join(path, "tensors", info.file)
            data = np.fromfile(tensor, dtype=info.storage).reshape(info.rows, info.row_elems)
            with open(os.path.join(path, "tensors", info.digest_file), "rb") as f:
                stored = f.read()
            assert stored == rowdigest.row_digests(data).astype("<u8").tobytes(), info.name


def _flip(path, offset: int, mask: int = 0x10) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ mask]))


def _source(tmp_path, rng, commits: int = 4):
    model = random_model(rng)
    src = tmp_path / "src"
    with Replica.init(src, model, bucket_rows=16) as r:
        for _ in range(commits):
            u = random_update(rng, model)
            r.commit(u)
            apply_update(model, u)
    return src, model


def test_init_commit_and_rollback_keep_the_digests(tmp_path, rng):
    src, model = _source(tmp_path, rng)
    assert_digests_right(src)
    with Replica.open(src) as r:
        result = rollback(r, 1)
        assert result.offset == r.head
    assert_digests_right(src)
    with Replica.open(src) as r:
        r.commit({"step": ([0], np.array([7], np.int64)), "item_emb": (np.arange(300), np.zeros((300, 8), np.float32))})
    assert_digests_right(src)


@pytest.mark.parametrize("point", ["before-rows", "rows-not-digests", "before-applied"])
def test_recovery_after_a_crash_between_log_and_apply_rewrites_the_digests(tmp_path, rng, monkeypatch, point):
    src, model = _source(tmp_path, rng, commits=1)
    update = {"item_emb": (np.arange(0, 300, 7), rng.standard_normal((43, 8)).astype(np.float32))}

    r = Replica.open(src)
    crash_next_apply(monkeypatch, point)
    with pytest.raises(Crash):
        r.commit(update)
    monkeypatch.undo()
    crash_writer(r)
    r.store.close()
    with Replica.open(src) as reopened:  # the open finishes the abandoned write, rows and digests
        apply_update(model, update)
        assert reopened.state.settled
        assert_same(reopened, model)
    assert_digests_right(src)


def test_sync_writers_keep_the_digests(tmp_path, rng):
    """A new follower (from a snapshot), a partial sync and its completion, and a rebase onto a newer snapshot."""
    src, model = _source(tmp_path, rng)
    dst = tmp_path / "dst"
    cli_json("sync", src, dst)
    assert_digests_right(dst)
    with Replica.open(src) as r:
        for _ in range(6):
            r.commit(random_update(rng, model, max_rows=60))
    proc = run_cli("sync", src, dst, "--max-bytes", "2K", "--json")
    assert proc.returncode == 1 and not json.loads(proc.stdout)["complete"]
    with Replica.open(dst) as d:
        assert d.pending_sync() is not None
    assert_digests_right(dst)  # the pending rows are in the files: so are their digests
    cli_json("sync", src, dst)
    assert_digests_right(dst)
    with Replica.open(src) as r:
        r.commit(random_update(rng, model))
        compact(r)  # a snapshot at the head, the log before it dropped (its digests kept)
        oldest = r.oldest_offset
        r.commit(random_update(rng, model))
    result = cli_json("sync", src, dst)
    assert result["snapshot_offset"] == oldest  # rebased: the snapshot copied over the files
    assert_digests_right(dst)
    with Replica.open(dst) as d, Replica.open(src) as s:
        for name in s.tensor_names:
            assert np.array_equal(bits(d.read_tensor(name)), bits(s.read_tensor(name))), name


def test_a_rejected_sync_check_reverts_rows_and_digests(tmp_path, rng):
    src, model = _source(tmp_path, rng, commits=1)
    dst = tmp_path / "dst"
    cli_json("sync", src, dst)
    with Replica.open(src) as r:
        for _ in range(3):
            r.commit(random_update(rng, model))
    assert run_cli("sync", src, dst, "--check", "false").returncode == 10
    assert_digests_right(dst)
    with Replica.open(dst) as d:
        assert d.head == 1 and verify(d).ok


def test_replay_in_place_rebuilds_damaged_rows_and_digests(tmp_path, rng):
    src, model = _source(tmp_path, rng)
    with Replica.open(src) as r:
        item, bias = r.info("item_emb"), r.info("bias")
    _flip(os.path.join(src, "tensors", item.file), 5 * item.row_bytes + 1)  # a row
    _flip(os.path.join(src, "tensors", bias.digest_file), 8 * 3)  # a digest
    with Replica.open(src) as r:
        with pytest.raises(IntegrityError, match="'item_emb' row 5"):
            r.read_tensor("item_emb")
        with pytest.raises(IntegrityError, match="'bias' row 3"):
            r.read_rows("bias", [3])
        result = repair_in_place(r)
        assert sorted(result.repaired) == ["bias", "item_emb"]
        assert_same(r, model)
        assert verify(r).ok
    assert_digests_right(src)
    assert not [n for n in os.listdir(os.path.join(src, "tensors")) if n.endswith(".replay-tmp")]


def test_a_missing_digest_file_is_named_and_rebuilt(tmp_path, rng):
    src, model = _source(tmp_path, rng)
    with Replica.open(src) as r:
        info = r.info("ids")
    os.unlink(os.path.join(src, "tensors", info.digest_file))
    proc = run_cli("verify", src)
    assert proc.returncode == 5 and info.digest_file in proc.stderr and "--in-place" in proc.stderr
    with Replica.open(src) as r:
        with pytest.raises(IntegrityError, match="digest file"):
            r.commit({"ids": ([0], np.array([[1, 2, 3]], np.int32))})
        assert r.head == 4  # refused before anything was logged
    assert run_cli("replay", src, "--in-place").returncode == 0
    assert_digests_right(src)


# -- checked reads ------------------------------------------------------------------------------------------------


def test_reads_of_a_rotted_row_fail_and_other_rows_still_read(tmp_path, rng):
    src, model = _source(tmp_path, rng)
    with Replica.open(src) as r:
        info = r.info("user_emb")  # float16 rows of 8 values: 16 bytes
        model["user_emb"][40] = 1.0
        changed_at = r.commit({"user_emb": ([40], model["user_emb"][[40]])})  # so diff reads row 40
    _flip(os.path.join(src, "tensors", info.file), 40 * info.row_bytes + 15, 0x01)
    with Replica.open(src) as r:
        head = r.head
        with pytest.raises(IntegrityError) as exc:
            r.read_rows("user_emb", [3, 40, 41])
        assert "'user_emb' row 40" in str(exc.value) and f"deltalog replay {src} --in-place" in exc.value.hint
        _h, rows = r.read_rows("user_emb", [3, 41])  # cost and check follow the rows read
        assert np.array_equal(rows.view(np.uint16), model["user_emb"][[3, 41]].view(np.uint16))
        with pytest.raises(IntegrityError, match="row 40"):  # its undo value would be wrong: no record
            r.commit({"user_emb": ([40], np.zeros((1, 8), np.float16))})
        with pytest.raises(IntegrityError, match="row 40"):  # nor a snapshot sealing the damage
            with r.writing():
                r.make_snapshot()
        assert r.head == head
        r.commit({"user_emb": ([41], np.zeros((1, 8), np.float16))})  # other rows still commit
    proc = run_cli("diff", f"{src}@{changed_at - 1}", src)
    assert proc.returncode == 5 and "row 40" in proc.stderr and "Traceback" not in proc.stderr


def test_verify_names_the_rotted_rows_boundedly(tmp_path, rng):
    src, _model = _source(tmp_path, rng)
    with Replica.open(src) as r:
        info = r.info("item_emb")
    rotted = list(range(100, 115))
    for row in rotted:
        _flip(os.path.join(src, "tensors", info.file), row * info.row_bytes + 2)
    with Replica.open(src) as r:
        report = verify(r)
    problems = report.problems
    digest_lines = [p for p in problems if "row digests" in p]
    assert len(digest_lines) == 1, problems
    line = digest_lines[0]
    assert line.startswith("tensor 'item_emb': 15 rows differ from their row digests (rows 100, 101,")
    assert "109 and 5 more" in line and "110" not in line
    assert report.damaged == ["tensors"] and "--in-place" in report.repair
    proc = run_cli("verify", src, "--json")
    assert proc.returncode == 5 and any("row digests" in p for p in json.loads(proc.stdout)["problems"])


def test_a_handle_opened_before_another_process_upgraded_keeps_the_digests(tmp_path):
    """Handle A opens a v1 replica; another process upgrades it; A's next write must write digests."""
    import shutil

    path = tmp_path / "replica"
    shutil.copytree(os.path.join(REPO, "formats", "golden", "v1", "replica"), path)
    with Replica.open(path) as a:
        assert not a.has_row_digests
        child = (
            "import numpy as np; from deltalog import Replica\n"
            f"with Replica.open({str(path)!r}) as r: r.commit({{'counts': ([1], np.array([5], np.int64))}})\n"
        )
        subprocess.run([sys.executable, "-c", child], check=True, cwd=REPO)
        a.commit({"counts": ([2], np.array([6], np.int64))})
        assert a.has_row_digests
    assert_digests_right(path)
    with Replica.open(path) as r:
        assert r.read_tensor("counts")[1:3].tolist() == [5, 6] and verify(r).ok


def test_tensorfiles_digest_helpers(tmp_path):
    info = tensorfiles.TensorInfo(3, "t", "float16", (5, 3))
    rows = np.arange(15, dtype=np.float16).reshape(5, 3)
    path = str(tmp_path / info.digest_file)
    tensorfiles.write_digest_file(path, rows)
    assert info.digest_file == "00003.digest"
    assert tensorfiles.digest_path(str(tmp_path / info.file)) == path
    assert tensorfiles.map_digests(path, info, writable=False).tolist() == rowdigest.row_digests(rows).tolist()
    with open(path, "ab") as f:
        f.write(b"\0")
    with pytest.raises(IntegrityError, match="has 41 bytes, expected 40"):
        tensorfiles.map_digests(path, info, writable=False)


def test_a_long_lived_writer_follows_a_replay_in_place_that_replaced_only_a_digest_file(tmp_path, rng):
    """A training job keeps its handle open; a replay --in-place elsewhere renames a new digest file over
    the damaged one: the job's next commit must write into the new file, not the unlinked old one."""
    src, model = _source(tmp_path, rng)
    with Replica.open(src) as r:
        info = r.info("item_emb")
        r.commit({"item_emb": ([1], np.ones((1, 8), np.float32))})  # its maps are cached now
        _flip(os.path.join(src, "tensors", info.digest_file), 8 * 7)
        proc = run_cli("replay", src, "--in-place", "--json")  # another process, between two commits
        assert proc.returncode == 0 and json.loads(proc.stdout)["repaired"] == ["item_emb"], proc.stderr
        r.commit({"item_emb": ([7, 8], np.full((2, 8), 2.0, np.float32))})
        assert r.read_tensor("item_emb")[7, 0] == 2.0
    assert_digests_right(src)
