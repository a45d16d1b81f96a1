"""The compiled row loops (deltalog._kernels) against their numpy definitions.

Every compiled function must give exactly what the numpy code gives: the
digests bit for bit (rowdigest.reference_digest is the definition), and
diff's numbers through TensorDiff with the loops on and off.
"""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deltalog import kernels, rowdigest
from deltalog.diff import ReplicaSide, TensorDiff, diff
from deltalog.errors import IntegrityError
from deltalog.replica import Replica

compiled = pytest.mark.skipif(not kernels.available(), reason="deltalog._kernels was not built (no C compiler)")
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture
def loops_off():
    before = kernels.set_enabled(False)
    yield
    kernels.set_enabled(before)


def test_ci_builds_the_compiled_loops():
    """CI must exercise the compiled path: a build that silently fell back to numpy fails here."""
    if os.environ.get("CI") and not kernels.available():
        pytest.fail("deltalog._kernels did not build: is a C compiler installed?")


@compiled
@SETTINGS
@given(rows=st.integers(0, 9), row_bytes=st.integers(0, 41), seed=st.integers(0, 2**32 - 1))
def test_row_digests_match_the_definition(rows, row_bytes, seed):
    data = np.random.default_rng(seed).integers(0, 256, size=(rows, row_bytes), dtype=np.uint8)
    got = kernels.row_digests(data)
    assert got.tolist() == [rowdigest.reference_digest(bytes(r)) for r in data]
    assert np.array_equal(got, rowdigest.row_digests(data))


@compiled
@SETTINGS
@given(seed=st.integers(0, 2**32 - 1), shape=st.sampled_from([(50, 3), (50, 64), (20, 2, 5), (30,), (9, 1)]),
       dtype=st.sampled_from(["<f4", "<u2", "<f8", "i1", "<i8"]))
def test_gather_rows_copies_and_hashes_like_numpy(seed, shape, dtype):
    rng = np.random.default_rng(seed)
    table = rng.integers(0, 256, size=(shape[0], *shape[1:], np.dtype(dtype).itemsize), dtype=np.uint8)
    table = table.view(dtype).reshape(shape)
    idx = np.sort(rng.choice(shape[0], size=int(rng.integers(0, shape[0] + 1)), replace=False))
    values, digests = kernels.gather_rows(table, idx, digests=True)
    assert values.shape == (len(idx), *shape[1:]) and values.dtype == table.dtype
    assert np.array_equal(values.view(np.uint8), np.take(table, idx, axis=0).view(np.uint8))
    assert np.array_equal(digests, rowdigest.row_digests(np.take(table, idx, axis=0)))


@compiled
@pytest.mark.parametrize("row_bytes", [4, 256, 4096, 40000])
def test_block_boundaries_change_nothing(row_bytes):
    """Rows are gathered and compared in blocks (32 KiB of scratch, at most 512 rows): many blocks, odd tails."""
    rng = np.random.default_rng(row_bytes)
    n_rows = max(3, (5 << 20) // row_bytes)  # several blocks' worth of rows at every row size
    elems = row_bytes // 4
    a = rng.standard_normal((n_rows, elems)).astype(np.float32)
    b = a.copy()
    changed = rng.random(n_rows) < 0.5
    b[changed] += np.float32(0.25)
    rows = np.sort(rng.choice(n_rows, size=n_rows * 2 // 3, replace=False)).astype(np.int64)
    values, digests = kernels.gather_rows(a, rows, digests=True)
    assert np.array_equal(values, a[rows]) and np.array_equal(digests, rowdigest.row_digests(a[rows]))
    da, db = rowdigest.row_digests(a), rowdigest.row_digests(b)
    fast = kernels.compare_rows(a, b, "float32", rows, da, db)
    assert fast.status.tolist() == changed[rows].astype(int).tolist()
    want = ((b[rows].astype(np.float64) - a[rows]) ** 2).sum(axis=1)
    assert np.allclose(fast.row_squares, want, rtol=1e-12, atol=0)
    assert (fast.bad_a, fast.bad_b) == (None, None)
    db[rows[-1]] ^= 1  # the very last row of the last block
    assert kernels.compare_rows(a, b, "float32", rows, da, db).bad_b == len(rows) - 1


@compiled
def test_the_extension_refuses_misuse_instead_of_reading_astray():
    from deltalog import _kernels

    a = np.zeros((4, 2), np.float32)
    status, squares = np.zeros(4, np.uint8), np.zeros(4)
    digests = np.zeros(4, np.uint64)
    with pytest.raises(ValueError, match="only with an index"):  # would otherwise go unchecked
        _kernels.compare_rows(a, a, 8, 0, None, digests, None, status, squares)
    with pytest.raises(ValueError):
        _kernels.compare_rows(a, a[:3], 8, 0, None, None, None, status, squares)
    with pytest.raises(IndexError):
        _kernels.compare_rows(a, a, 8, 0, np.array([0, 4], np.int64), None, None, status[:2], squares[:2])
    with pytest.raises(ValueError):  # a row size that is not a whole number of elements
        _kernels.compare_rows(a, a, 6, 0, None, None, None, status, squares)
    _kernels.gather_rows(np.zeros(0, np.uint8), 0, np.zeros(0, np.int64), np.zeros(0, np.uint8), None)  # no rows


@compiled
def test_gather_rows_refuses_rows_out_of_range():
    table = np.zeros((4, 3), np.float32)
    with pytest.raises(IndexError):
        kernels.gather_rows(table, np.array([1, 4]), digests=False)
    with pytest.raises(IndexError):
        kernels.gather_rows(table, np.array([-1]), digests=False)


def _awkward(rng: np.random.Generator, dtype: str, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(A, B): rows equal, slightly changed, -0.0 for 0.0, NaN, infinity, huge and tiny deltas."""
    a = (rng.standard_normal(shape) * 10.0 ** rng.integers(-6, 4, size=shape)).astype(np.float64)
    b = a.copy()
    n = shape[0]
    kinds = rng.integers(0, 8, size=n)
    for i, kind in enumerate(kinds):
        if kind == 1:
            b[i] += rng.standard_normal(shape[1]) * 1e-3
        elif kind == 2:
            a[i, 0], b[i, 0] = 0.0, -0.0
        elif kind == 3:
            b[i, rng.integers(shape[1])] = np.nan
        elif kind == 4:
            b[i, rng.integers(shape[1])] = rng.choice([np.inf, -np.inf])
        elif kind == 5:
            a[i, 0], b[i, 0] = -1e300, 1e300  # squares past float64's range
        elif kind == 6:
            b[i] = a[i] * (1 + 1e-7)
    with np.errstate(over="ignore", invalid="ignore"):
        if dtype == "bfloat16":
            return tuple((x.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16) for x in (a, b))
        return a.astype(dtype), b.astype(dtype)


def _numbers(t: TensorDiff) -> dict:
    return {**t.to_json(), "top": [(e["row"], e["l2"]) for e in t.to_json()["top"]]}


@compiled
@SETTINGS
@given(seed=st.integers(0, 2**32 - 1), dtype=st.sampled_from(["float32", "float64", "bfloat16", "float16", "int32"]),
       elems=st.sampled_from([1, 3, 8, 13, 64]), in_place=st.booleans())
def test_compare_gives_numpys_numbers(seed, dtype, elems, in_place):
    """TensorDiff with the compiled loop (contiguous or in place on whole tables) equals the numpy path."""
    rng = np.random.default_rng(seed)
    storage = "float16" if dtype == "float16" else dtype
    if dtype == "int32":
        a = rng.integers(-1000, 1000, size=(60, elems)).astype(np.int32)
        b = np.where(rng.random((60, elems)) < 0.2, a + 1, a).astype(np.int32)
    else:
        a, b = _awkward(rng, "<u2" if dtype == "bfloat16" else storage, (60, elems))
    rows = np.sort(rng.choice(60, size=int(rng.integers(1, 61)), replace=False)).astype(np.int64)
    want = TensorDiff("t", dtype, (60, elems), 4, top_k=5)
    before = kernels.set_enabled(False)
    try:
        want.compare(rows, a[rows], b[rows])
    finally:
        kernels.set_enabled(before)
    got = TensorDiff("t", dtype, (60, elems), 4, top_k=5)
    if in_place:
        fast = kernels.compare_rows(a, b, dtype, rows)
        got.account(rows, fast, lambda pick: (a[rows[pick]], b[rows[pick]]))
    else:
        got.compare(rows, a[rows], b[rows])
    w, g = _numbers(want), _numbers(got)
    for key in ("l2", "max_abs", "significance"):
        x, y = w.pop(key), g.pop(key)
        assert (x is None and y is None) or x == pytest.approx(y, rel=1e-12, abs=1e-300), key
    wt, gt = w.pop("top"), g.pop("top")
    assert [r for r, _ in wt] == [r for r, _ in gt]
    assert all((x is None and y is None) or x == pytest.approx(y, rel=1e-12) for (_, x), (_, y) in zip(wt, gt))
    assert w == g


@compiled
def test_compare_in_place_reports_the_first_bad_digest_of_each_side():
    rng = np.random.default_rng(3)
    a = rng.standard_normal((100, 8)).astype(np.float32)
    b = a.copy()
    b[40:] += 1
    da, db = rowdigest.row_digests(a), rowdigest.row_digests(b)
    rows = np.arange(10, 100, 3, dtype=np.int64)
    fast = kernels.compare_rows(a, b, "float32", rows, da, db)
    assert (fast.bad_a, fast.bad_b) == (None, None)
    da[rows[7]] ^= 1
    db[rows[2]] ^= 1 << 40
    db[rows[20]] ^= 1
    fast = kernels.compare_rows(a, b, "float32", rows, da, db)
    assert (fast.bad_a, fast.bad_b) == (7, 2)
    assert fast.status.tolist() == [int(r >= 40) for r in rows]  # the comparison itself went on


@compiled
def test_compare_leaves_anything_but_little_endian_storage_to_numpy():
    a = np.arange(6, dtype=">f4").reshape(3, 2)  # big-endian: the loop would read the bytes wrongly
    assert kernels.compare_rows(a, a + 1, "float32") is None
    assert kernels.compare_rows(a.astype("<f4"), a.astype("<f8"), "float32") is None  # the sides disagree
    assert kernels.compare_rows(a.astype("<f4"), a.astype("<f4") + 1, "float32").status.tolist() == [1, 1, 1]
    t = TensorDiff("t", "float32", (3, 2), 2)
    t.compare(np.arange(3), a, a + 1)  # numpy's path then gives the numbers
    assert t.changed_rows == 3 and t.max_abs == 1.0


def test_loops_can_be_turned_off(loops_off):
    assert not kernels.enabled()
    assert kernels.compare_rows(np.zeros((2, 2)), np.ones((2, 2)), "float64") is None
    values, digests = kernels.gather_rows(np.arange(12.0).reshape(4, 3), np.array([3, 1]), digests=True)
    assert values.tolist() == [[9.0, 10.0, 11.0], [3.0, 4.0, 5.0]]
    assert np.array_equal(digests, rowdigest.row_digests(values))


@pytest.mark.parametrize("loops", ["compiled", "numpy"])
@pytest.mark.parametrize("damaged", ["a", "b"])
def test_diff_of_two_replicas_refuses_a_rotted_row_on_either_side(tmp_path, loops, damaged):
    """Both sides at their heads: the in-place comparison checks every row it reads against its digest."""
    if loops == "compiled" and not kernels.available():
        pytest.skip("deltalog._kernels was not built")
    rng = np.random.default_rng(5)
    model = {"emb": rng.standard_normal((3000, 16)).astype(np.float32)}
    a_path, b_path = str(tmp_path / "a"), str(tmp_path / "b")
    Replica.init(a_path, model, bucket_rows=64).close()
    shutil.copytree(a_path, b_path)
    changed = np.sort(rng.choice(3000, size=300, replace=False))
    with Replica.open(a_path) as r:
        r.commit({"emb": (changed, rng.standard_normal((300, 16)).astype(np.float32))})
    victim = int(changed[123])
    path = a_path if damaged == "a" else b_path
    with Replica.open(path) as r:
        file = os.path.join(path, "tensors", r.info("emb").file)
    with open(file, "r+b") as f:  # one bit of one changed row, under the replica's feet
        f.seek(victim * 64 + 5)
        byte = f.read(1)[0]
        f.seek(victim * 64 + 5)
        f.write(bytes([byte ^ 0x10]))
    before = kernels.set_enabled(loops == "compiled")
    try:
        with Replica.open(a_path) as ra, Replica.open(b_path) as rb:
            with pytest.raises(IntegrityError, match=f"tensor 'emb' row {victim}:"):
                diff(ReplicaSide.at(rb), ReplicaSide.at(ra))
    finally:
        kernels.set_enabled(before)


def _reference_planes(array: np.ndarray, xor_with: np.ndarray | None) -> np.ndarray:
    raw = array.reshape(-1).view(np.uint8)
    if xor_with is not None:
        raw = raw ^ xor_with.reshape(-1).view(np.uint8)
    return np.ascontiguousarray(raw.reshape(-1, array.dtype.itemsize).T)


@compiled
@pytest.mark.parametrize("dtype", ["<f4", "<f8", "<u2", "<u1", "<u8"])
@pytest.mark.parametrize("count", [0, 1, 4095, 4096, 4097, 10_000])  # 4096: the compiled XOR's block
@pytest.mark.parametrize("with_xor", [False, True])
def test_shuffle_planes_compiled_and_numpy_agree(dtype, count, with_xor):
    rng = np.random.default_rng(count)
    array = rng.integers(0, 256, count * np.dtype(dtype).itemsize, dtype=np.uint8).view(dtype)
    other = rng.integers(0, 256, array.nbytes, dtype=np.uint8).view(dtype) if with_xor else None
    want = _reference_planes(array, other)
    assert np.array_equal(kernels.shuffle_planes(array, other), want)
    before = kernels.set_enabled(False)
    try:
        assert np.array_equal(kernels.shuffle_planes(array, other), want)
    finally:
        kernels.set_enabled(before)


def test_shuffle_planes_refuses_arrays_of_different_sizes():
    with pytest.raises(ValueError, match="size"):
        kernels.shuffle_planes(np.zeros(4, np.float32), np.zeros(5, np.float32))


@compiled
@pytest.mark.parametrize("dtype", ["<f4", "<f8", "<u2", "<u1", "<u8"])
@pytest.mark.parametrize("count", [0, 1, 7, 4097])
@pytest.mark.parametrize("with_xor", [False, True])
def test_join_planes_undoes_shuffle_planes_compiled_and_numpy(dtype, count, with_xor):
    rng = np.random.default_rng(count)
    array = rng.integers(0, 256, count * np.dtype(dtype).itemsize, dtype=np.uint8).view(dtype)
    other = rng.integers(0, 256, array.nbytes, dtype=np.uint8).view(dtype) if with_xor else None
    planes = _reference_planes(array, other).reshape(-1)
    for compiled_loops in (True, False):
        before = kernels.set_enabled(compiled_loops)
        try:
            joined = kernels.join_planes(planes, np.dtype(dtype), other)
        finally:
            kernels.set_enabled(before)
        assert joined.dtype == np.dtype(dtype) and joined.tobytes() == array.tobytes()
        assert joined.flags.writeable and not np.shares_memory(joined, planes)


def test_join_planes_refuses_buffers_that_do_not_fit():
    with pytest.raises(ValueError, match="whole number"):
        kernels.join_planes(np.zeros(6, np.uint8), np.dtype("<f4"))
    with pytest.raises(ValueError, match="size"):
        kernels.join_planes(np.zeros(8, np.uint8), np.dtype("<f4"), np.zeros(3, np.float32))


@compiled
@pytest.mark.parametrize("row_bytes", [1, 8, 256, 4100])  # 4100: rows straddle pages
def test_touch_rows_leaves_every_byte_as_it_was(tmp_path, row_bytes):
    import mmap

    rows = 64
    data = np.random.default_rng(row_bytes).integers(0, 256, rows * row_bytes, dtype=np.uint8)
    path = tmp_path / "t.bin"
    path.write_bytes(data.tobytes())
    with open(path, "r+b") as f, mmap.mmap(f.fileno(), 0) as mm:
        table = np.frombuffer(mm, dtype=np.uint8).reshape(rows, row_bytes)
        kernels.touch_rows(table, np.array([0, 5, rows - 1, 5]))
        assert np.array_equal(table.reshape(-1), data)
        with pytest.raises(ValueError, match="out of range"):
            kernels.touch_rows(table, np.array([rows]))
        del table
    assert path.read_bytes() == data.tobytes()


@compiled
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@given(seed=st.integers(0, 2**32 - 1), rows=st.integers(0, 40), elems=st.integers(1, 70))
@SETTINGS
def test_row_significance_compiled_and_numpy_agree(dtype, seed, rows, elems):
    """A record's significance, compiled: numpy's sums (to rounding: numpy sums pairwise), with a
    NaN counting 0 and an infinity (or an overflow) the cap, as the numpy code counts them."""
    from deltalog.dtypes import row_significance

    rng = np.random.default_rng(seed)
    old = rng.standard_normal((rows, elems)).astype(dtype)
    new = (old + rng.standard_normal(old.shape) * 10.0 ** rng.integers(-6, 3)).astype(dtype)
    special = np.array([np.nan, np.inf, -np.inf, np.finfo(dtype).max, -np.finfo(dtype).max], dtype=dtype)
    for _ in range(rng.integers(0, 4) if rows else 0):
        (new if rng.random() < 0.5 else old)[rng.integers(rows), rng.integers(elems)] = rng.choice(special)
    compiled_sums = kernels.row_abs_sums(old, new, dtype)
    before = kernels.set_enabled(False)
    try:
        assert kernels.row_abs_sums(old, new, dtype) is None
        with np.errstate(over="ignore"):  # two changes near the dtype's max overflow a float64 sum: inf both ways
            reference = row_significance(old, new, dtype)
    finally:
        kernels.set_enabled(before)
    assert compiled_sums.dtype == np.float64 and np.allclose(compiled_sums, reference, rtol=1e-12, atol=0)


def test_row_significance_leaves_other_dtypes_to_numpy():
    rows = np.zeros((3, 4), dtype=np.int32)
    assert kernels.row_abs_sums(rows, rows + 1, "int32") is None
