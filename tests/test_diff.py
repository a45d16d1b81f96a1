"""Tests of deltalog.diff and `deltalog diff`: numbers against a brute-force numpy
comparison of whole models, the cost of a diff, exit codes and the JSON schema."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from contextlib import ExitStack
from unittest import mock

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import in_forked_child
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deltalog import diff as dl
from deltalog import dtypes, kernels
from deltalog.checkpoint import write_checkpoint
from deltalog.cli import cli
from deltalog.diff import CheckpointSide, ReplicaSide, diff, open_side, parse_spec
from deltalog.errors import InvalidInput, LockHeld, ModelMismatch, NotAReplica, OffsetNotRetained
from deltalog.replica import Replica

DELTALOG = os.path.join(os.path.dirname(sys.executable), "deltalog")
HYPOTHESIS = settings(max_examples=12, deadline=None,
                      suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

DTYPES = ["float32", "bfloat16", "float16", "float64", "int32", "uint8", "bool"]


@pytest.fixture(scope="module", autouse=True, params=["compiled", "numpy"])
def row_loops(request):
    """Every test here runs with diff's compiled row loops and with the numpy code they replace."""
    if request.param == "compiled" and not kernels.available():
        pytest.skip("deltalog._kernels was not built (no C compiler)")
    before = kernels.set_enabled(request.param == "compiled")
    env_before = os.environ.pop("DELTALOG_NO_KERNELS", None)
    if request.param == "numpy":  # for the `deltalog diff` processes the tests start, too
        os.environ["DELTALOG_NO_KERNELS"] = "1"
    yield request.param
    os.environ.pop("DELTALOG_NO_KERNELS", None)
    if env_before is not None:
        os.environ["DELTALOG_NO_KERNELS"] = env_before
    kernels.set_enabled(before)
SHAPES = [(), (7,), (40, 3), (23, 2, 2), (0, 3), (5, 0)]


# -- model and update stream generation ---------------------------------------------------


def random_values(rng: np.random.Generator, logical: str, shape: tuple[int, ...], special: bool = True) -> np.ndarray:
    """Values in storage dtype; floats sometimes hold NaN, inf and -0.0."""
    storage = dtypes.storage_dtype(logical)
    if logical == "bool":
        return rng.integers(0, 2, size=shape).astype(storage)
    if logical in ("int32", "uint8"):
        info = np.iinfo(storage)
        return rng.integers(max(info.min, -1000), min(info.max, 1000), size=shape, endpoint=True).astype(storage)
    values = rng.standard_normal(size=shape) * 10.0 ** rng.integers(-4, 3, size=shape)
    if special and values.size and rng.random() < 0.3:
        flat = values.reshape(-1)
        picks = rng.integers(0, flat.size, size=3)
        flat[picks] = rng.choice([np.nan, np.inf, -np.inf, -0.0, 0.0], size=3)
    if logical == "bfloat16":
        with np.errstate(over="ignore", invalid="ignore"):
            return (values.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
    with np.errstate(over="ignore", invalid="ignore"):
        return values.astype(storage)


def random_model(rng, n_tensors: int) -> dict[str, tuple[np.ndarray, str]]:
    model = {}
    for i in range(n_tensors):
        logical = DTYPES[rng.integers(len(DTYPES))]
        shape = SHAPES[rng.integers(len(SHAPES))]
        model[f"t{i}"] = (np.asarray(random_values(rng, logical, shape)), logical)
    return model


def rows_of(array: np.ndarray) -> int:
    return array.shape[0] if array.ndim else 1


def as_rows(array: np.ndarray) -> np.ndarray:
    """(rows, row_elems) view: -1 cannot be used when a dimension is 0."""
    return array.reshape(rows_of(array), math.prod(array.shape[1:]))


def random_update(rng, model) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Some rows of some tensors: new values, or values the rows already hold, or values of other rows."""
    update = {}
    for name, (array, logical) in model.items():
        n = rows_of(array)
        if n == 0 or rng.random() < 0.4:
            continue
        rows = rng.choice(n, size=int(rng.integers(1, min(n, 8) + 1)), replace=False)
        flat = as_rows(array)
        choice = rng.random()
        if choice < 0.15:  # rewrite to the same bytes: never a change
            values = flat[rows].copy()
        elif choice < 0.3:  # rows take values other rows had: undo may restore them
            values = flat[rng.integers(0, n, size=len(rows))].copy()
        else:
            values = random_values(rng, logical, (len(rows), flat.shape[1]))
        update[name] = (rows, values)
    return update


def apply(model, update):
    out = {name: (np.array(array), logical) for name, (array, logical) in model.items()}
    for name, (rows, values) in update.items():
        array, _ = out[name]
        view = as_rows(array)
        view[rows] = values.reshape(len(rows), view.shape[1])
    return out


def grow(path: str, model, rng, commits: int, states: dict) -> None:
    """Commit ``commits`` random updates to the replica at ``path``; record the model at each offset."""
    with Replica.open(path) as r:
        current = states[r.head]
        for _ in range(commits):
            update = random_update(rng, current)
            offset = r.commit(update)
            current = apply(current, update)
            states[offset] = current


# -- the brute-force reference -------------------------------------------------------------


def brute(a_model, b_model, bucket_rows: int, top: int, names=None) -> dict[str, dict]:
    """Per tensor: the diff of two whole models, by numpy over every row."""
    expected = {}
    for name in names or sorted(a_model):
        a, logical = a_model[name]
        b, _ = b_model[name]
        a2, b2 = as_rows(a), as_rows(b)
        bits = dtypes.bits_dtype(logical)
        changed = np.flatnonzero((a2.view(bits) != b2.view(bits)).any(axis=1))
        with np.errstate(invalid="ignore", over="ignore"):
            delta = dtypes.as_float(b2[changed], logical).astype(np.float64) - dtypes.as_float(a2[changed], logical).astype(np.float64)
        finite = np.isfinite(delta)
        clean = np.where(finite, np.abs(delta), 0.0)
        row_l2 = np.sqrt((clean**2).sum(axis=1))
        nonfinite = ~finite.all(axis=1)
        rank = np.where(nonfinite, np.inf, row_l2)
        order = sorted(range(len(changed)), key=lambda i: (-rank[i], changed[i]))[:top]
        positive = row_l2[~nonfinite & (row_l2 > 0)]
        hist: dict[int, int] = {}
        for e in np.floor(np.log10(positive)).astype(int).tolist():
            hist[e] = hist.get(e, 0) + 1
        expected[name] = {
            "changed_rows": len(changed),
            "changed_buckets": len(set((changed // bucket_rows).tolist())),
            "l2": float(np.sqrt((clean**2).sum())),
            "max_abs": float(clean.max()) if clean.size else 0.0,
            "significance": float(clean.sum()),
            "nonfinite_rows": int(nonfinite.sum()),
            "zero_rows": int((~nonfinite & (row_l2 == 0)).sum()),
            "top": [(int(changed[i]), None if math.isinf(rank[i]) else float(rank[i])) for i in order],
            "histogram": [{"log10": e, "count": hist[e]} for e in sorted(hist)],
        }
    return expected


def close(x, y) -> bool:
    return (x is None and y is None) or (x is not None and y is not None and math.isclose(x, y, rel_tol=1e-9, abs_tol=1e-300))


def assert_matches(result, expected: dict[str, dict]) -> None:
    got = {t["name"]: t for t in result.to_json()["tensors"]}
    assert sorted(got) == sorted(expected)
    for name, want in expected.items():
        t = got[name]
        where = f"tensor {name}"
        for key in ("changed_rows", "changed_buckets", "nonfinite_rows", "zero_rows", "histogram"):
            assert t[key] == want[key], f"{where}: {key} {t[key]} != {want[key]}"
        for key in ("l2", "max_abs", "significance"):
            assert close(t[key], want[key]), f"{where}: {key} {t[key]} != {want[key]}"
        assert [e["row"] for e in t["top"]] == [r for r, _ in want["top"]], where
        assert all(close(e["l2"], v) for e, (_, v) in zip(t["top"], want["top"])), where
        assert sum(h["count"] for h in t["histogram"]) + t["zero_rows"] + t["nonfinite_rows"] == t["changed_rows"]
    assert result.changed_rows == sum(w["changed_rows"] for w in expected.values())
    assert result.identical == (result.changed_rows == 0 and not result.incomparable)
    json.loads(json.dumps(result.to_json()), parse_constant=_refuse)  # strict JSON: no NaN/Infinity


def _refuse(token):
    raise AssertionError(f"non-standard JSON constant {token}")


def as_checkpoint_tensors(model):
    return {name: (array, logical) for name, (array, logical) in model.items()}


# -- one replica, two offsets -------------------------------------------------------------


@HYPOTHESIS
@given(seed=st.integers(0, 2**32 - 1), bucket_rows=st.sampled_from([1, 3, 8, 1024]), tiny=st.booleans(),
       data=st.data())
def test_replica_at_two_offsets_matches_bruteforce(seed, bucket_rows, tiny, data):
    rng = np.random.default_rng(seed)
    with tempfile.TemporaryDirectory() as tmp, _chunks(tiny):
        model = random_model(rng, int(rng.integers(1, 4)))
        path = os.path.join(tmp, "r")
        Replica.init(path, as_checkpoint_tensors(model), bucket_rows=bucket_rows).close()
        states = {0: model}
        grow(path, model, rng, 6, states)
        offsets = sorted(states)
        x = data.draw(st.sampled_from(offsets), label="x")
        y = data.draw(st.sampled_from(offsets), label="y")
        top = data.draw(st.integers(0, 5), label="top")
        with Replica.open(path) as r:
            result = diff(ReplicaSide.at(r, x), ReplicaSide.at(r, y), top=top)
            assert (result.a_offset, result.b_offset) == (x, y)
            assert result.method in ("digest", "same-offset", "log")
            assert_matches(result, brute(states[x], states[y], bucket_rows, top))
            at_head = diff(ReplicaSide.at(r, x), ReplicaSide.at(r), top=top)
            assert at_head.b_offset == offsets[-1]
            assert_matches(at_head, brute(states[x], states[offsets[-1]], bucket_rows, top))


def _chunks(tiny: bool):
    """Tiny chunks put boundaries inside tensors and batches: bucket counts must survive them."""
    stack = ExitStack()
    if tiny:
        stack.enter_context(mock.patch.object(dl, "CHUNK_BYTES", 24))
        stack.enter_context(mock.patch.object(dl, "STEP_BYTES", 40))
    return stack


# -- two replicas of one model ---------------------------------------------------------------


@HYPOTHESIS
@given(seed=st.integers(0, 2**32 - 1), bucket_rows=st.sampled_from([2, 5, 64]), tiny=st.booleans(), data=st.data())
def test_two_replicas_of_one_model_match_bruteforce(seed, bucket_rows, tiny, data):
    rng = np.random.default_rng(seed)
    with tempfile.TemporaryDirectory() as tmp, _chunks(tiny):
        model = random_model(rng, int(rng.integers(1, 4)))
        a_path, b_path = os.path.join(tmp, "a"), os.path.join(tmp, "b")
        Replica.init(a_path, as_checkpoint_tensors(model), bucket_rows=bucket_rows).close()
        states = {0: model}
        grow(a_path, model, rng, int(rng.integers(0, 4)), states)
        shutil.copytree(a_path, b_path)  # B follows A's writer up to here, then stays behind
        copied = max(states)
        grow(a_path, model, rng, 5, states)
        head = max(states)
        top = data.draw(st.integers(0, 4), label="top")
        with Replica.open(a_path) as ra, Replica.open(b_path) as rb:
            for left, right, want in [
                (ReplicaSide.at(rb), ReplicaSide.at(ra), (copied, head)),
                (ReplicaSide.at(ra), ReplicaSide.at(rb), (head, copied)),
            ]:
                result = diff(left, right, top=top)
                assert (result.a_offset, result.b_offset) == want
                assert_matches(result, brute(states[want[0]], states[want[1]], bucket_rows, top))
                assert result.rows_compared <= _rows_written(ra, copied, head)
            # A at an earlier offset against B at its head, and B in its past against A in its past
            x = data.draw(st.sampled_from(sorted(states)), label="x")
            y = data.draw(st.sampled_from([o for o in sorted(states) if o <= copied]), label="y")
            result = diff(ReplicaSide.at(ra, x), ReplicaSide.at(rb, y), top=top)
            assert_matches(result, brute(states[x], states[y], bucket_rows, top))


def _rows_written(replica: Replica, since: int, upto: int) -> int:
    return sum(s.rows for s in replica.iter_summaries(since) if s.offset <= upto)


def do_sync(src: str, dst: str, **budget):
    """One local sync, in-process."""
    from deltalog import sync, transport

    source, sink = transport.open_source(src), transport.open_sink(dst)
    try:
        return sync.sync(source, sink, source_name=src, destination_name=dst, **budget)
    finally:
        source.close()
        sink.close()


def test_followers_fed_by_sync_match_bruteforce(tmp_path):
    """Followers made and fed by sync: coalesced sync records, per-row versions, a base snapshot."""
    pytest.importorskip("deltalog.sync")
    from deltalog.pending import pending_state

    rng = np.random.default_rng(5)
    model = {"emb": (random_values(rng, "float32", (60, 3)), "float32"),
             "bf": (random_values(rng, "bfloat16", (9,)), "bfloat16"),
             "s": (np.asarray(random_values(rng, "float64", ())), "float64")}
    a, b, c = (str(tmp_path / n) for n in "abc")
    Replica.init(a, as_checkpoint_tensors(model), bucket_rows=4).close()
    states = {0: model}
    grow(a, model, rng, 2, states)
    assert do_sync(a, b).complete  # a new follower, from a's snapshot
    grow(a, model, rng, 3, states)
    assert do_sync(a, b).complete  # one coalesced sync record
    grow(a, model, rng, 3, states)
    assert do_sync(b, c).complete  # multi-hop: c follows b
    grow(a, model, rng, 2, states)
    with Replica.open(a) as ra, Replica.open(b) as rb, Replica.open(c) as rc:
        sides = [ra, rb, rc]
        for left in sides:
            for right in sides:
                result = diff(ReplicaSide.at(left), ReplicaSide.at(right), top=3)
                assert result.method in ("digest", "log", "same-offset")
                assert_matches(result, brute(states[left.head], states[right.head], 4, 3))
        for x in sorted(states):
            try:
                past = ReplicaSide.at(rb, x)
            except OffsetNotRetained:
                continue
            assert_matches(diff(past, ReplicaSide.at(ra), top=3), brute(states[x], states[ra.head], 4, 3))
            assert_matches(diff(ReplicaSide.at(rc), past, top=3), brute(states[rc.head], states[x], 4, 3))

    # a sync stopped by its budget leaves rows newer than the head in b's files: refused
    result = do_sync(a, b, max_bytes=64, chunk_bytes=64)
    with Replica.open(b) as rb, Replica.open(a) as ra:
        if pending_state(rb) is not None:
            with pytest.raises(LockHeld):
                diff(ReplicaSide.at(rb), ReplicaSide.at(ra))
        else:
            assert result.complete


def emb_and_bias(rng: np.random.Generator, emb_rows: int, bias_rows: int) -> dict:
    """A float32 table of 4 columns and a float64 vector, without NaN or infinity."""
    return {"emb": (random_values(rng, "float32", (emb_rows, 4), special=False), "float32"),
            "bias": (random_values(rng, "float64", (bias_rows,), special=False), "float64")}


def test_a_log_compacted_past_every_shared_offset_is_compared_by_value(tmp_path):
    """No offset both replicas still hold: nothing proves they share a history, so every row is
    compared (bucket versions would assume it); from A's own oldest offset on, its log is enough."""
    rng, model, a_path, b_path, states = _grown(tmp_path, seed=7, rows=(400, 50), bucket_rows=16, commits=2)
    shutil.copytree(a_path, b_path)
    grow(a_path, model, rng, 6, states)
    head = max(states)
    with Replica.open(a_path) as ra:  # what compact does to the log: records up to 4 are gone
        ra.store.write(lambda txn: (ra.store.delete_records(txn, 4), ra.store.put_meta(txn, "oldest", 4)))
    with Replica.open(a_path) as ra, Replica.open(b_path) as rb:
        result = diff(ReplicaSide.at(rb), ReplicaSide.at(ra), top=3)
        assert result.method == "values" and result.anchor is None
        assert_matches(result, brute(states[2], states[head], 16, 3))
        assert result.rows_compared == 450
        with pytest.raises(OffsetNotRetained):
            ReplicaSide.at(ra, 3)
        result = diff(ReplicaSide.at(ra, 4), ReplicaSide.at(ra), top=3)
        assert result.method == "log"
        assert_matches(result, brute(states[4], states[head], 16, 3))


def test_a_follower_that_took_a_stray_commit_is_never_called_identical(tmp_path):
    """The same offset on both sides, different models: the state digests tell them apart, and the
    rows come from the logs since the last offset both held alike (the anchor)."""
    pytest.importorskip("deltalog.sync")
    rng, model, a, b, states = _grown(tmp_path, seed=11, rows=(300, 40), bucket_rows=8, commits=1)
    _sync_local(a, b)
    with Replica.open(b) as rb:  # a mistake on the serving replica: offset 2 here is not A's offset 2
        rb.commit({"emb": (np.arange(20), np.full((20, 4), 7.0, np.float32))})
    grow(a, model, rng, 1, states)
    with Replica.open(a) as ra, Replica.open(b) as rb:
        assert ra.head == rb.head == 2 and ra.state_digest != rb.state_digest
        result = diff(ReplicaSide.at(ra), ReplicaSide.at(rb), top=3)
        assert not result.identical and result.method == "log" and result.anchor == 1
        b_model = {k: (v.copy(), d) for k, (v, d) in states[1].items()}
        b_model["emb"][0][:20] = 7.0
        assert_matches(result, brute(states[2], b_model, 8, 3))
        assert diff(ReplicaSide.at(ra, 1), ReplicaSide.at(rb, 1)).method == "digest"


def _grown(tmp_path, seed: int, rows: tuple[int, int], bucket_rows: int, commits: int):
    """(rng, model, path of A, path for B, states): A made from emb_and_bias and grown by ``commits``."""
    rng = np.random.default_rng(seed)
    model = emb_and_bias(rng, *rows)
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    Replica.init(a, as_checkpoint_tensors(model), bucket_rows=bucket_rows).close()
    states = {0: model}
    grow(a, model, rng, commits, states)
    return rng, model, a, b, states


def _sync_local(src: str, dst: str) -> None:
    from deltalog import sync, transport

    source = transport.open_source(src, transport.TransportOptions())
    sink = transport.open_sink(dst, transport.TransportOptions())
    try:
        assert sync.sync(source, sink, source_name=src, destination_name=dst).complete
    finally:
        sink.close()
        source.close()


# -- checkpoints ------------------------------------------------------------------------------


@HYPOTHESIS
@given(seed=st.integers(0, 2**32 - 1), fmt=st.sampled_from(["ck.safetensors", "ck.npz", "ckdir"]),
       tiny=st.booleans(), data=st.data())
def test_checkpoints_against_replicas_and_each_other(seed, fmt, tiny, data):
    rng = np.random.default_rng(seed)
    with tempfile.TemporaryDirectory() as tmp, _chunks(tiny):
        model = random_model(rng, int(rng.integers(1, 4)))
        if not fmt.endswith(".safetensors"):  # numpy formats cannot label bfloat16
            model = {n: (a, d) if d != "bfloat16" else (a.view(np.uint16), "uint16") for n, (a, d) in model.items()}
        path = os.path.join(tmp, "r")
        Replica.init(path, as_checkpoint_tensors(model), bucket_rows=4).close()
        states = {0: model}
        grow(path, model, rng, 4, states)
        offsets = sorted(states)
        other = apply(states[offsets[-1]], random_update(rng, states[offsets[-1]]))
        ck1, ck2 = os.path.join(tmp, "1" + fmt), os.path.join(tmp, "2" + fmt)
        write_checkpoint(ck1, as_checkpoint_tensors(other))
        write_checkpoint(ck2, as_checkpoint_tensors(states[offsets[0]]))
        x = data.draw(st.sampled_from(offsets), label="x")
        with Replica.open(path) as r:
            c1, c2 = CheckpointSide.read(ck1), CheckpointSide.read(ck2)
            result = diff(ReplicaSide.at(r, x), c1, top=3)  # a replica in its past, rebuilt chunk by chunk
            assert result.method == "values" and result.b_offset is None and result.a_offset == x
            assert_matches(result, brute(states[x], other, 4, 3))
            result = diff(c1, ReplicaSide.at(r), top=3)
            assert_matches(result, brute(other, states[offsets[-1]], 4, 3))
        result = diff(c2, c1, top=2)
        assert (result.a_offset, result.b_offset) == (None, None)
        assert_matches(result, brute(states[offsets[0]], other, 1024, 2))


def test_replica_pinned_while_a_writer_moves_on(tmp_path, monkeypatch):
    """A side is pinned when opened: records a writer appends meanwhile are undone."""
    rng = np.random.default_rng(3)
    model = {"emb": (random_values(rng, "float32", (300, 2), special=False), "float32")}
    path = str(tmp_path / "r")
    Replica.init(path, model, bucket_rows=8).close()
    states = {0: model}
    grow(path, model, rng, 3, states)
    ck = str(tmp_path / "c.npz")
    write_checkpoint(ck, model)
    with Replica.open(path) as r:
        side = ReplicaSide.at(r)
        grow(path, model, rng, 3, states)  # another handle commits after the side was pinned
        assert r.head > side.offset
        result = diff(CheckpointSide.read(ck), side)
        assert_matches(result, brute(model, states[side.offset], 8, 10))


def test_replica_in_the_middle_of_a_partial_sync_is_refused(tmp_path):
    """Its files hold rows newer than its head, which values_at does not see: no wrong numbers."""
    from deltalog import pending

    path = str(tmp_path / "r")
    Replica.init(path, {"emb": np.zeros((8, 2), np.float32)}).close()
    with Replica.open(path) as r:
        r.store.write(lambda txn: r.store.put_meta(txn, pending.PENDING_KEY, {"base": 0, "target": 5, "chunks": 0,
                                                                           "buckets": {}}))
        with pytest.raises(LockHeld, match="partial sync"):
            diff(ReplicaSide.at(r), ReplicaSide.at(r))


def test_a_partial_sync_that_begins_mid_diff_is_refused_not_misreported(tmp_path, monkeypatch):
    """A budgeted sync into B after diff pinned B's head writes rows ahead of that head (CI caught
    diff reporting them): every read checks for the pending marker, before and after."""
    rng = np.random.default_rng(11)
    model = emb_and_bias(rng, 600, 40)
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    Replica.init(a, as_checkpoint_tensors(model), bucket_rows=8).close()
    states = {0: model}
    assert do_sync(a, b).complete
    grow(a, model, rng, 4, states)
    pinned = dl._Rows._pin

    def pin_then_sync_one_chunk(self):
        pinned(self)
        if self.side.replica.path == b:  # B is now read at its pinned head; a sync stops after one chunk
            result = do_sync(a, b, max_bytes=64, chunk_bytes=64)
            assert not result.complete

    monkeypatch.setattr(dl._Rows, "_pin", pin_then_sync_one_chunk)
    with Replica.open(a) as ra, Replica.open(b) as rb:
        with pytest.raises(LockHeld, match="partial sync"):
            diff(ReplicaSide.at(ra), ReplicaSide.at(rb))
    monkeypatch.setattr(dl._Rows, "_pin", pinned)
    assert do_sync(a, b).complete  # and once the sync is done, the numbers are exact again
    grow(a, model, rng, 2, states)
    with Replica.open(a) as ra, Replica.open(b) as rb:
        assert_matches(diff(ReplicaSide.at(rb), ReplicaSide.at(ra)), brute(states[rb.head], states[ra.head], 8, 10))


def test_a_sync_that_writes_a_chunk_under_a_read_and_finishes_after_it_is_not_misreported(tmp_path, monkeypatch):
    """The chunk's rows are in what the read saw, and the marker that would say so is gone by the
    time the read is checked: the moved head must send the rows down the path that undoes them."""
    rng = np.random.default_rng(12)
    model = {"emb": (random_values(rng, "float32", (600, 4), special=False), "float32")}
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    Replica.init(a, as_checkpoint_tensors(model), bucket_rows=8).close()
    states = {0: model}
    assert do_sync(a, b).complete
    grow(a, model, rng, 3, states)
    pinned_at = {}
    real_read_rows, real_in_place = Replica.read_rows, Replica.read_in_place

    def around(real):
        def read(self, *args, **kwargs):
            interfere = self.path == b and not pinned_at.get("done")
            if interfere:  # a chunk lands in B's files just before the read, the rest of the sync just after
                pinned_at["done"] = True
                assert not do_sync(a, b, max_bytes=64, chunk_bytes=64).complete
            result = real(self, *args, **kwargs)
            if interfere:
                assert do_sync(a, b).complete
            return result
        return read

    monkeypatch.setattr(Replica, "read_rows", around(real_read_rows))
    monkeypatch.setattr(Replica, "read_in_place", around(real_in_place))
    with Replica.open(a) as ra, Replica.open(b) as rb:
        side_b = ReplicaSide.at(rb)
        try:
            result = diff(ReplicaSide.at(ra), side_b)
        except LockHeld:
            return
    assert pinned_at.get("done")
    assert result.b_offset == 0
    assert_matches(result, brute(states[max(states)], states[0], 8, 10))


# -- what a change is ---------------------------------------------------------------------------


def test_row_rewritten_to_the_same_value_is_no_change(tmp_path):
    path = str(tmp_path / "r")
    emb = np.arange(40, dtype=np.float32).reshape(20, 2)
    Replica.init(path, {"emb": emb}, bucket_rows=4).close()
    with Replica.open(path) as r:
        r.commit({"emb": ([3], np.array([[9, 9]], np.float32))})
        r.commit({"emb": ([3], emb[3:4])})  # back to what it was
        with r.writing():  # a record that writes the same bytes (as a rollback may)
            r.append_record("rollback", {"emb": ([5, 6], emb[5:7])}, target=0)
        assert r.head == 3 and r.bucket_index("emb")[1][0] == 3
        result = diff(ReplicaSide.at(r, 0), ReplicaSide.at(r))
        assert result.identical and result.changed_rows == 0 and result.changed_buckets == 0
        assert result.method == "digest" and result.rows_compared == 0  # the same model: nothing read
        result = diff(ReplicaSide.at(r, 1), ReplicaSide.at(r))
        assert result.method == "log" and result.changed_rows == 1  # row 3
        assert result.rows_compared == 3  # rows 3, 5, 6: found by the log, 5 and 6 equal by value
        assert diff(ReplicaSide.at(r, 0), ReplicaSide.at(r, 1)).changed_rows == 1


def test_bfloat16_widened_exactly_and_nonfinite_reported(tmp_path):
    path = str(tmp_path / "r")
    bf = np.array([0x3F80, 0x4000, 0x0000, 0x3F80], np.uint16)  # 1.0, 2.0, 0.0, 1.0
    Replica.init(path, {"w": (bf, "bfloat16")}, bucket_rows=2).close()
    with Replica.open(path) as r:
        # 1.0 -> 1.0078125 (next bf16), 2.0 -> NaN, +0.0 -> -0.0
        r.commit({"w": ([0, 1, 2], np.array([0x3F81, 0x7FC0, 0x8000], np.uint16))})
        result = diff(ReplicaSide.at(r, 0), ReplicaSide.at(r), top=5)
    t = result.tensor("w")
    assert t.changed_rows == 3 and t.nonfinite_rows == 1 and t.zero_rows == 1
    assert t.max_abs == 2.0**-7 and t.l2 == 2.0**-7 and t.significance == 2.0**-7
    data = t.to_json()
    assert data["top"] == [{"row": 1, "l2": None}, {"row": 0, "l2": 2.0**-7}, {"row": 2, "l2": 0.0}]
    assert data["histogram"] == [{"log10": -3, "count": 1}]
    assert t.changed_buckets == 2


# -- cost follows the change ------------------------------------------------------------------


@pytest.fixture
def rows_read(monkeypatch):
    """Counts every row read from a replica's tensor files."""
    counter = {"rows": 0}
    original = Replica.read_rows

    def counting(self, name, rows, timeout=30.0):
        counter["rows"] += len(rows)
        return original(self, name, rows, timeout)

    monkeypatch.setattr(Replica, "read_rows", counting)
    return counter


def test_cost_follows_the_change_not_the_model(tmp_path, rows_read):
    rng = np.random.default_rng(11)
    n = 200_000
    model = {"emb": (rng.standard_normal((n, 8)).astype(np.float32), "float32"),
             "dense": (rng.standard_normal((16, 16)).astype(np.float32), "float32")}
    a_path, b_path = str(tmp_path / "a"), str(tmp_path / "b")
    Replica.init(a_path, model, bucket_rows=1024).close()
    with Replica.open(a_path) as r:
        r.commit({"emb": (rng.choice(n, 30, replace=False), rng.standard_normal((30, 8)).astype(np.float32))})
    shutil.copytree(a_path, b_path)
    touched = 0
    with Replica.open(a_path) as r:
        for _ in range(5):
            rows = rng.choice(n, 20, replace=False)
            r.commit({"emb": (rows, rng.standard_normal((20, 8)).astype(np.float32)),
                      "dense": (np.arange(16), rng.standard_normal((16, 16)).astype(np.float32))})
        touched = _rows_written(r, 1, r.head)
    assert touched <= 5 * 36

    with Replica.open(a_path) as ra, Replica.open(b_path) as rb:
        rows_read["rows"] = 0
        result = diff(ReplicaSide.at(rb), ReplicaSide.at(ra))
        assert result.method == "log" and 0 < result.changed_rows <= touched
        assert result.rows_compared <= touched
        assert rows_read["rows"] <= 2 * touched  # both sides, changed rows only: never the 200k rows

        rows_read["rows"] = 0
        result = diff(ReplicaSide.at(ra, 1), ReplicaSide.at(ra, 3))
        assert 0 < rows_read["rows"] <= 2 * touched

        rows_read["rows"] = 0
        assert diff(ReplicaSide.at(rb), ReplicaSide.at(ra, 1)).identical  # same offset: nothing read
        assert rows_read["rows"] == 0

        # a checkpoint has no log: every row is compared, which is what the log path avoids
        ck = str(tmp_path / "c.npz")
        write_checkpoint(ck, model)
        rows_read["rows"] = 0
        result = diff(CheckpointSide.read(ck), ReplicaSide.at(ra))
        assert result.method == "values" and rows_read["rows"] == n + 16


# -- models that do not match -----------------------------------------------------------------


def test_different_models_need_force(tmp_path):
    x = {"emb": np.zeros((10, 2), np.float32), "bias": np.zeros(3, np.float32)}
    Replica.init(str(tmp_path / "a"), x).close()
    Replica.init(str(tmp_path / "b"), {**x, "emb": np.ones((10, 2), np.float32)}).close()
    Replica.init(str(tmp_path / "c"), {"emb": np.zeros((10, 2), np.float32), "extra": np.zeros(1, np.int8)},
                 model_id="shared").close()
    Replica.init(str(tmp_path / "d"), {"emb": np.ones((10, 2), np.float32), "extra": np.zeros(1, np.int8)},
                 model_id="shared").close()
    with open_side(str(tmp_path / "a")) as a, open_side(str(tmp_path / "b")) as b:
        with pytest.raises(ModelMismatch, match="holds model"):
            diff(a, b)
        result = diff(a, b, force=True)
        assert result.method == "values" and result.tensor("emb").changed_rows == 10 and not result.incomparable
    with open_side(str(tmp_path / "a")) as a, open_side(str(tmp_path / "c")) as c:
        with pytest.raises(ModelMismatch):
            diff(a, c)
        result = diff(a, c, force=True)
        assert [t.name for t in result.tensors] == ["emb"] and result.identical is False
        assert [(i["name"], i["a"], i["b"]) for i in result.incomparable] == [
            ("bias", {"dtype": "float32", "shape": [3]}, None), ("extra", None, {"dtype": "int8", "shape": [1]})]
        assert diff(a, c, force=True, tensors=["emb"]).identical
        with pytest.raises(InvalidInput, match="unknown tensor"):
            diff(a, c, tensors=["nope"])
    # same --model-id given to two inits: not one history, whatever the id says: compared by value
    with open_side(str(tmp_path / "c")) as c, open_side(str(tmp_path / "d")) as d:
        result = diff(c, d)
        assert result.method == "values" and result.tensor("emb").changed_rows == 10
        assert result.a["state_digest"] != result.b["state_digest"]


def test_checkpoint_shape_or_dtype_mismatch(tmp_path):
    Replica.init(str(tmp_path / "r"), {"emb": np.zeros((10, 2), np.float32)}).close()
    write_checkpoint(str(tmp_path / "c.npz"), {"emb": (np.zeros((10, 3), np.float32), "float32")})
    write_checkpoint(str(tmp_path / "m.safetensors"), {"emb": (np.zeros((10, 2), np.float32), "float32")},
                     metadata={"deltalog.model_id": "someone-else"})
    with open_side(str(tmp_path / "r")) as r, open_side(str(tmp_path / "c.npz")) as c:
        with pytest.raises(ModelMismatch, match=r"A has float32\[10, 2\], B has float32\[10, 3\]"):
            diff(r, c)
        assert diff(r, c, force=True).incomparable[0]["name"] == "emb"
    with open_side(str(tmp_path / "r")) as r, open_side(str(tmp_path / "m.safetensors")) as m:
        with pytest.raises(ModelMismatch, match="someone-else"):
            diff(r, m)
        assert diff(r, m, force=True).identical


# -- specs --------------------------------------------------------------------------------------


def test_parse_spec(tmp_path):
    r = str(tmp_path / "r")
    Replica.init(r, {"emb": np.zeros((4, 2), np.float32)}).close()
    ck = str(tmp_path / "c.npz")
    write_checkpoint(ck, {"emb": (np.zeros((4, 2), np.float32), "float32")})
    os.mkdir(tmp_path / "empty")
    assert parse_spec(r) == ("replica", r, None)
    assert parse_spec(r + "@0") == ("replica", r, 0)
    assert parse_spec(r + "@17") == ("replica", r, 17)
    assert parse_spec(ck) == ("checkpoint", ck, None)
    assert parse_spec(r + "@-1") == ("replica", r, "-1") and parse_spec(r + "@head~2")[2] == "head~2"
    for bad in (r + "@", r + "@-", r + "@x", r + "@ 1", r + "@head~", r + "@+1", ck + "@1", ""):
        with pytest.raises(InvalidInput):
            parse_spec(bad)
    for missing in (str(tmp_path / "nope"), str(tmp_path / "nope@3"), str(tmp_path / "empty")):
        with pytest.raises(NotAReplica):
            parse_spec(missing)
    with pytest.raises(OffsetNotRetained):
        with open_side(r + "@1"):
            pass


def test_a_replica_named_by_both_sides_is_opened_once(tmp_path):
    """A@K A reads one set of maps (a new process faults them in and tears them down once)."""
    r, other = str(tmp_path / "r"), str(tmp_path / "o")
    Replica.init(r, {"emb": np.zeros((40, 2), np.float32)}, bucket_rows=8).close()
    shutil.copytree(r, other)
    with Replica.open(r) as w:
        w.commit({"emb": ([3, 30], np.ones((2, 2), np.float32))})
    opened = []
    real_open = Replica.open
    with mock.patch.object(Replica, "open", side_effect=lambda path: opened.append(path) or real_open(path)):
        with dl.open_sides([r + "@0", os.path.join(tmp_path, ".", "r")]) as (a, b):
            assert a.replica is b.replica and (a.offset, b.offset) == (0, 1)
            shared = diff(a, b)
        assert opened == [r]
        with dl.open_sides([r + "@0", other]) as (a, b):
            assert a.replica is not b.replica
    with open_side(r + "@0") as a, open_side(r) as b:  # what each side alone gives
        alone = diff(a, b)
    assert shared.to_json()["changed_rows"] == alone.to_json()["changed_rows"] == 2
    assert {**shared.to_json(), "b": None} == {**alone.to_json(), "b": None}


# -- the command --------------------------------------------------------------------------------


@pytest.fixture
def two_replicas(tmp_path):
    """a: model at offsets 0..3; b: a copy of a at offset 1."""
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    emb = np.arange(200, dtype=np.float32).reshape(100, 2)
    Replica.init(a, {"emb": emb, "scale": np.float64(1.0)}, bucket_rows=10).close()
    with Replica.open(a) as r:
        r.commit({"emb": ([1], np.array([[5, 5]], np.float32))})
    shutil.copytree(a, b)
    with Replica.open(a) as r:
        r.commit({"emb": ([50, 51, 99], np.full((3, 2), -1, np.float32))})
        r.commit({"scale": ([0], np.array([2.0]))})
    return a, b


def run(*args):
    return CliRunner().invoke(cli, ["diff", *args])


def test_cli_exit_codes_and_human_output(two_replicas):
    a, b = two_replicas
    same = run(b, a + "@1")
    assert same.exit_code == 0, same.output
    assert "identical" in same.stdout
    differ = run(b, a, "--top", "2")
    assert differ.exit_code == 1, differ.output
    assert "4 rows changed in 3 buckets" in differ.stdout and "emb" in differ.stdout and "\x1b[" not in differ.stdout
    assert run(a + "@2", a, "--tensor", "emb").exit_code == 0
    quiet = run(b, a, "--quiet")
    assert quiet.exit_code == 1 and quiet.stdout == ""


def test_cli_json_schema(two_replicas):
    a, b = two_replicas
    result = run(b, a, "--json", "--top", "2")
    assert result.exit_code == 1
    data = json.loads(result.stdout)
    assert {"changed_rows", "changed_buckets", "a_offset", "b_offset", "tensors"} <= data.keys()
    assert (data["changed_rows"], data["changed_buckets"], data["a_offset"], data["b_offset"]) == (4, 3, 1, 3)
    assert data["identical"] is False and data["method"] == "log" and data["incomparable"] == []
    emb = {t["name"]: t for t in data["tensors"]}["emb"]
    assert {"name", "changed_rows", "changed_buckets", "l2", "max_abs", "significance", "top", "histogram"} <= emb.keys()
    assert emb["changed_rows"] == 3 and emb["changed_buckets"] == 2
    # rows 50, 51, 99 held (100, 101), (102, 103), (198, 199) and became (-1, -1)
    assert emb["max_abs"] == 200.0 and emb["significance"] == 101 + 102 + 103 + 104 + 199 + 200
    assert math.isclose(emb["l2"], math.sqrt(sum(v * v for v in (101, 102, 103, 104, 199, 200))))
    assert emb["top"] == [{"row": 99, "l2": math.hypot(199, 200)}, {"row": 51, "l2": math.hypot(103, 104)}]
    assert emb["histogram"] == [{"log10": 2, "count": 3}]
    same = run(a, a + "@3", "--json")
    assert same.exit_code == 0 and json.loads(same.stdout)["identical"] is True


def test_cli_checkpoint_against_replica(two_replicas, tmp_path):
    a, _b = two_replicas
    ck = str(tmp_path / "ck.safetensors")
    with Replica.open(a) as r:
        write_checkpoint(ck, {n: (r.read_tensor(n), r.info(n).dtype) for n in r.tensor_names})
    result = run(ck, a, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["a_offset"] is None and data["b_offset"] == 3 and data["method"] == "values"
    assert run(ck, a + "@0").exit_code == 1


def deltalog(*args):
    return subprocess.run([DELTALOG, *args], capture_output=True, text=True, timeout=60)


@pytest.mark.skipif(not os.path.exists(DELTALOG), reason="the deltalog script is not installed in this venv")
def test_cli_errors_end_to_end(two_replicas, tmp_path):
    a, b = two_replicas
    other = str(tmp_path / "other")
    Replica.init(other, {"emb": np.zeros((100, 2), np.float32), "scale": np.float64(1.0)}).close()

    p = deltalog("diff", a, other)
    assert p.returncode == 6 and "pass --force" in p.stderr and "Traceback" not in p.stderr
    p = deltalog("diff", a, other, "--force", "--json")
    assert p.returncode == 1 and json.loads(p.stdout)["changed_rows"] > 0
    p = deltalog("diff", a + "@9", b, "--json")
    assert p.returncode == 7 and json.loads(p.stdout)["error"]["type"] == "OffsetNotRetained"
    p = deltalog("diff", b + "@2", a)  # b was copied at 1: its log never held 2
    assert p.returncode == 7, p.stderr
    p = deltalog("diff", a + "@x", b)  # a malformed argument is a usage error, as --to x is elsewhere
    assert p.returncode == 2 and "is not an offset" in p.stderr and p.stderr.count("\n") == 1, p.stderr
    p = deltalog("diff", a, str(tmp_path / "missing.npz") + "@3")
    assert p.returncode == 3, p.stderr  # a missing file stays "no such replica" (exit 3)
    assert deltalog("diff", str(tmp_path / "missing"), b).returncode == 3
    assert deltalog("diff", a, b, "--tensor", "nope").returncode == 11
    p = deltalog("diff", b, a)
    assert p.returncode == 1 and "rows changed" in p.stdout


def test_diff_works_in_a_child_forked_after_a_diff(tmp_path):
    """diff keeps two comparison threads per process; a forked child has none of them and must start its own."""
    rng = np.random.default_rng(13)
    model = {"emb": (random_values(rng, "float32", (300, 4), special=False), "float32")}
    path = str(tmp_path / "r")
    Replica.init(path, as_checkpoint_tensors(model), bucket_rows=8).close()
    states = {0: model}
    grow(path, model, rng, 2, states)
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    shutil.copytree(path, a)
    shutil.copytree(path, b)
    grow(a, model, rng, 2, states)
    with Replica.open(a) as ra, Replica.open(b) as rb:
        want = diff(ReplicaSide.at(rb), ReplicaSide.at(ra)).changed_rows
    assert want

    def same_answer_in_child() -> bool:
        with Replica.open(a) as ra, Replica.open(b) as rb:
            return diff(ReplicaSide.at(rb), ReplicaSide.at(ra)).changed_rows == want

    in_forked_child(same_answer_in_child)


def test_identical_under_tensor_names_what_was_compared(tmp_path, rng):
    """With --tensor, 'identical' is about those tensors only: the line says so, not that A and B are."""
    from conftest import random_model, run_cli

    model = random_model(rng, rows=40)
    path = tmp_path / "r"
    with Replica.init(path, model, bucket_rows=8) as r:
        r.commit({"item_emb": (np.arange(3), np.full((3, 8), 2.0, np.float32))})
    proc = run_cli("diff", f"{path}@0", path, "--tensor", "bias")
    assert proc.returncode == 0 and "identical in tensor bias (the others not compared)" in proc.stderr + proc.stdout
    assert run_cli("diff", f"{path}@0", path).returncode == 1
