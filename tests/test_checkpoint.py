"""Tests of deltalog.checkpoint: round trips, byte layout, hostile input, atomic writes."""

from __future__ import annotations

import io
import json
import os
import struct
import zipfile

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deltalog import checkpoint as ck
from deltalog import dtypes
from deltalog.checkpoint import CheckpointTensor, checkpoint_kind, read_checkpoint, read_checkpoint_metadata, write_checkpoint
from deltalog.errors import InvalidInput, StorageError

FORMATS = ["npz", "safetensors", "npy-dir"]
SHAPES = [(), (5,), (3, 4), (2, 3, 2), (0, 3)]
NUMPY_FORMATS = ["npz", "npy-dir"]


def target(tmp_path, fmt, stem="ck"):
    return {"npz": tmp_path / f"{stem}.npz", "safetensors": tmp_path / f"{stem}.safetensors", "npy-dir": tmp_path / stem}[fmt]


def sample(logical: str, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Random bit patterns in the storage dtype: floats include NaN payloads, infs, -0.0."""
    rng = np.random.default_rng(seed)
    storage = dtypes.storage_dtype(logical)
    if logical == "bool":
        return rng.integers(0, 2, size=shape).astype(storage)
    bits = dtypes.bits_dtype(logical)
    raw = rng.integers(0, 256, size=int(np.prod(shape)) * storage.itemsize, dtype=np.uint8)
    return raw.view(bits).reshape(shape).view(storage)


def bits(array: np.ndarray) -> bytes:
    return np.ascontiguousarray(array).tobytes()


def assert_same(tensor: CheckpointTensor, array: np.ndarray, logical: str):
    assert tensor.dtype == logical
    assert tensor.shape == array.shape
    assert tensor.array.shape == array.shape
    assert tensor.array.dtype == dtypes.storage_dtype(logical)
    assert bits(tensor.array) == bits(array)


def assert_invalid(path, match: str | None = None):
    """read_checkpoint(path) fails with InvalidInput: one line naming the file."""
    with pytest.raises(InvalidInput) as info:
        read_checkpoint(path)
    message = info.value.one_line()
    assert "\n" not in message
    assert str(path) in message
    if match:
        assert match in message
    return message


# --------------------------------------------------------------------------
# round trips


# bfloat16 only in safetensors: see test_bfloat16_refused_by_numpy_formats
@pytest.mark.parametrize(
    "logical, fmt",
    [(t, f) for t in sorted(dtypes.STORAGE) for f in FORMATS if t != "bfloat16" or f == "safetensors"],
)
def test_round_trip_every_dtype_and_shape(tmp_path, fmt, logical):
    tensors = {f"t{i}": (sample(logical, shape, seed=i), logical) for i, shape in enumerate(SHAPES)}
    path = target(tmp_path, fmt)
    write_checkpoint(path, tensors)
    got = read_checkpoint(path)
    assert list(got) == sorted(tensors)
    for name, (array, _) in tensors.items():
        assert got[name].name == name
        assert_same(got[name], array, logical)


@pytest.mark.parametrize("fmt", FORMATS)
def test_nan_payloads_and_negative_zero_are_bit_exact(tmp_path, fmt):
    f32 = np.array([0x7FC00001, 0xFFC12345, 0x7F800001, 0x80000000, 0x7F800000], dtype="<u4").view("<f4")
    f64 = np.array([0x7FF8000000000123, 0xFFF0000000000001, 0x8000000000000000], dtype="<u8").view("<f8")
    f16 = np.array([0x7E01, 0xFD55, 0x8000], dtype="<u2").view("<f2")
    tensors = {"f32": (f32, "float32"), "f64": (f64, "float64"), "f16": (f16, "float16")}
    path = target(tmp_path, fmt)
    write_checkpoint(path, tensors)
    got = read_checkpoint(path)
    for name, (array, logical) in tensors.items():
        assert_same(got[name], array, logical)


def test_bfloat16_round_trips_through_safetensors(tmp_path):
    bf16 = np.array([0x3F80, 0x7FC1, 0x8000, 0xFF80], dtype="<u2")  # 1.0, NaN payload, -0.0, -inf
    path = tmp_path / "m.safetensors"
    write_checkpoint(path, {"w": (bf16, "bfloat16"), "u": (bf16.copy(), "uint16")})
    got = read_checkpoint(path)
    assert_same(got["w"], bf16, "bfloat16")
    assert_same(got["u"], bf16, "uint16")
    assert json.loads(_parse_safetensors(path)[0])["w"]["dtype"] == "BF16"


@pytest.mark.parametrize("fmt", NUMPY_FORMATS)
def test_bfloat16_refused_by_numpy_formats(tmp_path, fmt):
    path = target(tmp_path, fmt)
    with pytest.raises(InvalidInput) as info:
        write_checkpoint(path, {"w": (np.zeros(3, "<u2"), "bfloat16")})
    assert ".safetensors" in info.value.one_line()
    assert os.listdir(tmp_path) == []


def test_metadata_round_trip(tmp_path):
    path = tmp_path / "m.safetensors"
    meta = {"format": "pt", "step": "1200", "note": "ünïcode ✓"}
    write_checkpoint(path, {"a": (np.arange(3, dtype="<i4"), "int32")}, metadata=meta)
    assert read_checkpoint_metadata(path) == meta
    write_checkpoint(path, {"a": (np.arange(3, dtype="<i4"), "int32")})
    assert read_checkpoint_metadata(path) == {}
    assert "__metadata__" not in read_checkpoint(path)


@pytest.mark.parametrize("fmt", NUMPY_FORMATS)
def test_metadata_is_not_silently_dropped(tmp_path, fmt):
    path = target(tmp_path, fmt)
    with pytest.raises(InvalidInput):
        write_checkpoint(path, {"a": (np.zeros(1, "<f4"), "float32")}, metadata={"k": "v"})
    write_checkpoint(path, {"a": (np.zeros(1, "<f4"), "float32")}, metadata={})
    assert read_checkpoint_metadata(path) == {}


def test_npy_dir_nested_names(tmp_path):
    tensors = {
        "layer1/weight": (sample("float32", (2, 3)), "float32"),
        "layer1/bias": (sample("float32", (3,)), "float32"),
        "emb/user/table": (sample("int64", (4, 2)), "int64"),
        "top": (np.array(True), "bool"),
    }
    path = tmp_path / "out"
    write_checkpoint(path, tensors)
    assert (path / "layer1" / "weight.npy").is_file()
    assert (path / "emb" / "user" / "table.npy").is_file()
    with pytest.raises(InvalidInput, match="holds .npy files too"):  # a subdirectory is read only when asked
        read_checkpoint(path)
    got = read_checkpoint(path, recursive=True)
    assert list(got) == sorted(tensors)
    for name, (array, logical) in tensors.items():
        assert_same(got[name], array, logical)


def test_npy_dir_written_by_numpy_is_read(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    np.save(tmp_path / "a" / "b" / "w.npy", np.arange(6, dtype=">f4").reshape(2, 3))  # big-endian
    np.save(tmp_path / "f.npy", np.asfortranarray(np.arange(6, dtype="<i2").reshape(2, 3)))
    (tmp_path / "README.txt").write_text("not a tensor")
    assert list(read_checkpoint(tmp_path / "a" / "b")) == ["w"]
    got = read_checkpoint(tmp_path, recursive=True)
    assert list(got) == ["a/b/w", "f"]
    assert got["a/b/w"].array.dtype == np.dtype("<f4")
    assert got["a/b/w"].array.tolist() == np.arange(6, dtype="<f4").reshape(2, 3).tolist()
    assert got["f"].array.tolist() == np.arange(6).reshape(2, 3).tolist()


def test_big_endian_npz_converted_to_little_endian(tmp_path):
    path = tmp_path / "be.npz"
    np.savez(path, w=np.array([1.5, -0.0, 3.25], dtype=">f8"), i=np.array([1, -2], dtype=">i4"))
    got = read_checkpoint(path)
    assert got["w"].dtype == "float64" and got["w"].array.dtype == np.dtype("<f8")
    assert bits(got["w"].array) == bits(np.array([1.5, -0.0, 3.25], dtype="<f8"))
    assert got["i"].array.tolist() == [1, -2]


def test_large_tensors_are_memory_mapped_read_only(tmp_path):
    big = sample("float32", (512, 1024))  # 2 MiB: above the mmap threshold
    tensors = {"big": (big, "float32"), "small": (sample("int8", (4,)), "int8")}
    for fmt in ("safetensors", "npy-dir"):
        path = target(tmp_path, fmt)
        write_checkpoint(path, tensors)
        array = read_checkpoint(path)["big"].array
        assert isinstance(array, np.memmap) or isinstance(array.base, np.memmap), fmt
        assert not array.flags.writeable
        assert bits(array) == bits(big)


def test_safetensors_overwrite_keeps_old_mapping_valid(tmp_path):
    path = tmp_path / "m.safetensors"
    old = sample("float64", (300,))
    write_checkpoint(path, {"x": (old, "float64")})
    mapped = read_checkpoint(path)["x"].array
    write_checkpoint(path, {"x": (np.zeros(10, "<f8"), "float64")})
    assert bits(mapped) == bits(old)  # the atomic rename left the old inode alone
    assert read_checkpoint(path)["x"].shape == (10,)


def test_reading_and_writing_back_a_memmapped_checkpoint(tmp_path):
    src = tmp_path / "a.safetensors"
    tensors = {"x": (sample("float16", (4, 5)), "float16"), "y": (np.asfortranarray(sample("int32", (3, 4))), "int32")}
    write_checkpoint(src, tensors)
    read = read_checkpoint(src)
    for fmt in FORMATS:
        out = target(tmp_path, fmt, stem="copy")
        write_checkpoint(out, {t.name: (t.array, t.dtype) for t in read.values()})
        for name, (array, logical) in tensors.items():
            assert_same(read_checkpoint(out)[name], array, logical)


# --------------------------------------------------------------------------
# kinds and write validation


@pytest.mark.parametrize(
    "name, kind",
    [
        ("m.npz", "npz"),
        ("m.NPZ", "npz"),
        ("m.safetensors", "safetensors"),
        ("out", "npy-dir"),
        ("out.v2/", "npy-dir"),
        ("a/b/out", "npy-dir"),
    ],
)
def test_checkpoint_kind_by_suffix(tmp_path, name, kind):
    assert checkpoint_kind(str(tmp_path / name) + ("/" if name.endswith("/") else "")) == kind


def test_checkpoint_kind_directory_and_unknown_suffix(tmp_path):
    (tmp_path / "odd.name").mkdir()
    assert checkpoint_kind(tmp_path / "odd.name") == "npy-dir"
    for name in ("m.pt", "m.npy", "m.tar.gz"):
        with pytest.raises(InvalidInput):
            checkpoint_kind(tmp_path / name)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("bad", ["", "/abs", "../up", "a/../b", "a/.."])
def test_write_refuses_unsafe_names(tmp_path, fmt, bad):
    with pytest.raises(InvalidInput):
        write_checkpoint(target(tmp_path, fmt), {bad: (np.zeros(1, "<f4"), "float32")})
    assert os.listdir(tmp_path) == []


def test_write_refuses_bad_dtypes_and_odd_npy_dir_names(tmp_path):
    with pytest.raises(InvalidInput):
        write_checkpoint(tmp_path / "a.npz", {"x": (np.zeros(1, "<f4"), "float8")})
    with pytest.raises(InvalidInput):  # array does not match its label
        write_checkpoint(tmp_path / "a.npz", {"x": (np.zeros(1, "<f8"), "float32")})
    with pytest.raises(InvalidInput):
        write_checkpoint(tmp_path / "a.safetensors", {"__metadata__": (np.zeros(1, "<f4"), "float32")})
    for names in (["a//b"], ["a/./b"], ["a/"], ["a", "a.npy/b"]):
        with pytest.raises(InvalidInput):
            write_checkpoint(tmp_path / "d", {n: (np.zeros(1, "<f4"), "float32") for n in names})
    assert os.listdir(tmp_path) == []


def test_write_accepts_big_endian_input(tmp_path):
    path = tmp_path / "m.safetensors"
    write_checkpoint(path, {"x": (np.array([1.0, 2.0], dtype=">f4"), "float32")})
    assert read_checkpoint(path)["x"].array.tolist() == [1.0, 2.0]


def test_npy_dir_target_must_be_absent_or_empty(tmp_path):
    tensors = {"x": (np.arange(3, dtype="<i8"), "int64")}
    empty = tmp_path / "empty"
    empty.mkdir()
    write_checkpoint(empty, tensors)
    assert read_checkpoint(empty)["x"].array.tolist() == [0, 1, 2]
    with pytest.raises(InvalidInput, match="not empty"):
        write_checkpoint(empty, tensors)
    (tmp_path / "file").write_bytes(b"x")
    with pytest.raises(InvalidInput):
        write_checkpoint(tmp_path / "file", tensors)
    assert sorted(os.listdir(tmp_path)) == ["empty", "file"]


# --------------------------------------------------------------------------
# atomicity


@pytest.mark.parametrize("fmt", FORMATS)
def test_write_leaves_no_temp_files(tmp_path, fmt):
    path = target(tmp_path, fmt)
    write_checkpoint(path, {"a/b": (np.ones(4, "<f4"), "float32")})
    if fmt != "npy-dir":
        write_checkpoint(path, {"c": (np.ones(2, "<f4"), "float32")})  # overwrite in place
    assert os.listdir(tmp_path) == [path.name]


@pytest.mark.parametrize("fmt", FORMATS)
def test_failed_write_cleans_up_and_keeps_old_file(tmp_path, fmt, monkeypatch):
    path = target(tmp_path, fmt)
    if fmt != "npy-dir":
        write_checkpoint(path, {"old": (np.ones(2, "<f4"), "float32")})
    before = sorted(os.listdir(tmp_path))

    def refuse(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", refuse)
    with pytest.raises(StorageError, match="No space left"):
        write_checkpoint(path, {"new": (np.ones(2, "<f4"), "float32")})
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == before
    if fmt != "npy-dir":
        assert list(read_checkpoint(path)) == ["old"]


# --------------------------------------------------------------------------
# safetensors byte layout


def _parse_safetensors(path) -> tuple[bytes, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return raw[8 : 8 + n], raw[8 + n :]


def test_safetensors_byte_layout(tmp_path):
    path = tmp_path / "m.safetensors"
    b = np.array([1, 2, 3], dtype="<i2")
    a = np.array([[1.5, -2.0]], dtype="<f8")
    c = np.array(True)
    write_checkpoint(path, {"b": (b, "int16"), "a": (a, "float64"), "c": (c, "bool")}, metadata={"k": "v"})
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert (8 + n) % 8 == 0
    header_bytes = raw[8 : 8 + n]
    assert header_bytes.rstrip(b" ").endswith(b"}")
    assert set(header_bytes[len(header_bytes.rstrip(b" ")) :]) <= {ord(" ")}
    header = json.loads(header_bytes.decode("utf-8"))
    assert header == {
        "__metadata__": {"k": "v"},
        "a": {"dtype": "F64", "shape": [1, 2], "data_offsets": [0, 16]},
        "b": {"dtype": "I16", "shape": [3], "data_offsets": [16, 22]},
        "c": {"dtype": "BOOL", "shape": [], "data_offsets": [22, 23]},
    }
    assert raw[8 + n :] == a.tobytes() + b.tobytes() + b"\x01"


def test_safetensors_written_by_hand_is_read(tmp_path):
    # a minimal unpadded file as another writer might produce, with trailing gap between tensors
    header = json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}).encode()
    data = b"\xff" * 4 + np.array([1.0, 2.0], "<f4").tobytes()
    path = tmp_path / "h.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    got = read_checkpoint(path)
    assert got["w"].array.tolist() == [1.0, 2.0]


def test_empty_checkpoints(tmp_path):
    write_checkpoint(tmp_path / "e.safetensors", {})
    assert read_checkpoint(tmp_path / "e.safetensors") == {}
    write_checkpoint(tmp_path / "e.npz", {})
    assert read_checkpoint(tmp_path / "e.npz") == {}
    with pytest.raises(InvalidInput):  # it could not be read back: an npy-dir needs a .npy file
        write_checkpoint(tmp_path / "e", {})
    assert sorted(os.listdir(tmp_path)) == ["e.npz", "e.safetensors"]


# --------------------------------------------------------------------------
# hostile and corrupt input


def write_st(path, header, data=b"", length=None):
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return path


def entry(dtype="F32", shape=(2,), offsets=(0, 8)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


@pytest.mark.parametrize(
    "header, data, length, problem",
    [
        (b"{}", b"", 1 << 40, "announce a 1099511627776-byte header, but only 2 bytes follow"),
        (b"{not json", b"", None, "bad header JSON"),
        (b"\xff\xfe{}", b"", None, "not UTF-8"),
        (b"[1, 2]", b"", None, "not a JSON object"),
        (b'{"a": {"dtype": "F32", "shape": [], "data_offsets": [0, 4]}, "a": 1}', b"\0" * 4, None, "duplicate"),
        ({"w": entry(offsets=(0, 16))}, b"\0" * 8, None, "outside"),
        ({"w": entry(offsets=(8, 0))}, b"\0" * 8, None, "outside"),
        ({"w": entry(offsets=(-8, 0))}, b"\0" * 8, None, "outside"),
        ({"w": entry(offsets=(0, 4))}, b"\0" * 8, None, "needs 8"),
        ({"w": entry(shape=(-2,), offsets=(0, 8))}, b"\0" * 8, None, "non-negative"),
        ({"w": entry(shape=(2.0,))}, b"\0" * 8, None, "non-negative"),
        ({"w": entry(shape=(True, 2))}, b"\0" * 8, None, "non-negative"),
        ({"w": entry(offsets=(0, 8.0))}, b"\0" * 8, None, "pair of integers"),
        ({"w": entry(offsets=(0,))}, b"\0" * 8, None, "pair of integers"),
        ({"a": entry(), "b": entry(offsets=(4, 12))}, b"\0" * 12, None, "overlap"),
        ({"w": entry(dtype="F8_E4M3", shape=(8,))}, b"\0" * 8, None, "unsupported dtype"),
        ({"w": entry(dtype="C64", shape=(1,))}, b"\0" * 8, None, "unsupported dtype"),
        ({"w": {"dtype": "F32", "shape": [2]}}, b"\0" * 8, None, "data_offsets"),
        ({"w": [1, 2]}, b"\0" * 8, None, "data_offsets"),
        ({"": entry()}, b"\0" * 8, None, "empty tensor name"),
        ({"../evil": entry()}, b"\0" * 8, None, "unsafe tensor name"),
        ({"a/../../b": entry()}, b"\0" * 8, None, "unsafe tensor name"),
        ({"/etc/passwd": entry()}, b"\0" * 8, None, "unsafe tensor name"),
        ({"__metadata__": {"k": 1}}, b"", None, "__metadata__"),
        ({"__metadata__": ["k"]}, b"", None, "__metadata__"),
    ],
)
def test_bad_safetensors(tmp_path, header, data, length, problem):
    path = write_st(tmp_path / "bad.safetensors", header, data, length)
    assert_invalid(path, problem)


def test_safetensors_too_short(tmp_path):
    path = tmp_path / "short.safetensors"
    path.write_bytes(b"\x02\0\0")
    assert_invalid(path, "too short")
    with pytest.raises(InvalidInput):
        read_checkpoint_metadata(path)


def test_zero_size_tensors_may_share_offsets(tmp_path):
    header = {"e": entry(shape=(0, 4), offsets=(0, 0)), "w": entry(offsets=(0, 8)), "z": entry(shape=(0,), offsets=(8, 8))}
    path = write_st(tmp_path / "z.safetensors", header, np.array([1, 2], "<f4").tobytes())
    got = read_checkpoint(path)
    assert got["e"].shape == (0, 4) and got["z"].shape == (0,)
    assert got["w"].array.tolist() == [1.0, 2.0]


def test_missing_paths_and_unknown_suffix(tmp_path):
    for name in ("nope.npz", "nope.safetensors", "nope"):
        assert_invalid(tmp_path / name, "not found")
        with pytest.raises(InvalidInput):
            read_checkpoint_metadata(tmp_path / name)
    (tmp_path / "m.pt").write_bytes(b"whatever")
    assert_invalid(tmp_path / "m.pt", "unknown checkpoint suffix")
    (tmp_path / "plainfile").write_bytes(b"whatever")
    assert_invalid(tmp_path / "plainfile", "not a directory")


def test_directory_without_npy_files(tmp_path):
    d = tmp_path / "d"
    (d / "sub").mkdir(parents=True)
    (d / "notes.txt").write_text("hi")
    assert_invalid(d, "no .npy files")


def test_truncated_npy(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    np.save(d / "w.npy", np.arange(100, dtype="<f8"))
    raw = (d / "w.npy").read_bytes()
    for cut in (len(raw) - 1, 130, 60, 5, 0):
        (d / "w.npy").write_bytes(raw[:cut])
        assert_invalid(d)


def test_truncated_npy_message_names_the_file(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    np.save(d / "w.npy", np.arange(100, dtype="<f8"))
    (d / "w.npy").write_bytes((d / "w.npy").read_bytes()[:-8])
    assert_invalid(d, str(d / "w.npy"))


def _raw_npy(header: bytes, data: bytes = b"") -> bytes:
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header + data


@pytest.mark.parametrize(
    "header, problem",
    [
        (b"{'descr': '<f4', 'fortran_order': False, 'shape': (-2, 3), }", "negative dimension"),
        (b"{'descr': ('<f4',", "not a valid .npy array"),  # numpy leaks tokenize.TokenError here
        (b"{'descr': 'nonsense', 'fortran_order': False, 'shape': (1,), }", "not a valid .npy array"),
        (b"[1, 2, 3]", "not a valid .npy array"),
    ],
)
def test_hostile_npy_headers(tmp_path, header, problem):
    d = tmp_path / "d"
    d.mkdir()
    (d / "x.npy").write_bytes(_raw_npy(header, b"\0" * 64))
    assert_invalid(d, problem)
    path = tmp_path / "z.npz"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("x.npy", _raw_npy(header, b"\0" * 64))
    assert_invalid(path, problem)


def test_object_arrays_refused(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    np.save(d / "o.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    assert_invalid(d, "object arrays")
    path = tmp_path / "o.npz"
    np.savez(path, o=np.array([1, "x"], dtype=object))
    assert_invalid(path, "object arrays")


@pytest.mark.parametrize("array", [np.zeros(2, np.complex64), np.array(["ab"]), np.zeros(2, "M8[s]"), np.zeros(2, "f4,i4")])
def test_unsupported_numpy_dtypes(tmp_path, array):
    path = tmp_path / "u.npz"
    np.savez(path, x=array)
    assert_invalid(path, "unsupported dtype")
    d = tmp_path / "d"
    d.mkdir()
    np.save(d / "x.npy", array)
    assert_invalid(d, "unsupported dtype")


def test_truncated_and_odd_npz(tmp_path):
    good = tmp_path / "good.npz"
    np.savez(good, a=np.arange(50, dtype="<i4"), b=np.ones((3, 3), "<f4"))
    raw = good.read_bytes()
    bad = tmp_path / "bad.npz"
    for cut in (len(raw) - 1, len(raw) // 2, 100, 10, 0):
        bad.write_bytes(raw[:cut])
        assert_invalid(bad)
    with zipfile.ZipFile(bad, "w") as z:
        z.writestr("readme.txt", "hello")
    assert_invalid(bad, "not a .npy array")
    with zipfile.ZipFile(bad, "w") as z:
        z.writestr("../x.npy", _npy_bytes(np.zeros(2, "<f4")))
    assert_invalid(bad, "unsafe tensor name")
    with zipfile.ZipFile(bad, "w") as z:
        z.writestr("x.npy", _npy_bytes(np.zeros(100, "<f4"))[:-4])
    assert_invalid(bad, "truncated")
    np.save(tmp_path / "plain.npy", np.zeros(3))
    os.replace(tmp_path / "plain.npy", bad)  # a .npy file under a .npz name
    assert_invalid(bad)


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, array)
    return buf.getvalue()


# --------------------------------------------------------------------------
# property tests: nothing but InvalidInput, ever

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _read_or_invalid(path):
    try:
        got = read_checkpoint(path)
    except InvalidInput as err:
        assert "\n" not in err.one_line()
        return None
    for t in got.values():
        assert t.array.shape == t.shape and t.array.dtype == dtypes.storage_dtype(t.dtype)
        t.array.tobytes()  # the data must really be there
    return got


@FUZZ
@given(data=st.binary(max_size=300), suffix=st.sampled_from([".safetensors", ".npz", ".npy"]))
def test_fuzz_random_bytes(tmp_path, data, suffix):
    if suffix == ".npy":
        d = tmp_path / "d"
        d.mkdir(exist_ok=True)
        (d / "x.npy").write_bytes(data)
        _read_or_invalid(d)
    else:
        path = tmp_path / f"r{suffix}"
        path.write_bytes(data)
        _read_or_invalid(path)


@pytest.fixture(scope="module")
def real_files(tmp_path_factory):
    base = tmp_path_factory.mktemp("real")
    tensors = {
        "emb": (sample("float32", (6, 4)), "float32"),
        "half": (sample("bfloat16", (5,)), "bfloat16"),
        "flag": (np.array(True), "bool"),
    }
    write_checkpoint(base / "r.safetensors", tensors, metadata={"k": "v"})
    del tensors["half"]
    write_checkpoint(base / "r.npz", tensors)
    np.save(base / "r.npy", tensors["emb"][0])
    return {s: (base / f"r{s}").read_bytes() for s in (".safetensors", ".npz", ".npy")}


@FUZZ
@given(suffix=st.sampled_from([".safetensors", ".npz", ".npy"]), cut=st.integers(0, 10_000), flips=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=3))
def test_fuzz_truncated_and_corrupted_real_files(tmp_path, real_files, suffix, cut, flips):
    raw = bytearray(real_files[suffix])
    for pos, byte in flips:
        raw[pos % len(raw)] = byte
    raw = bytes(raw[: cut % (len(raw) + 1)])
    if suffix == ".npy":
        d = tmp_path / "d"
        d.mkdir(exist_ok=True)
        (d / "x.npy").write_bytes(raw)
        _read_or_invalid(d)
    else:
        path = tmp_path / f"t{suffix}"
        path.write_bytes(raw)
        _read_or_invalid(path)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**65), 2**65) | st.floats() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)
small_ints = st.integers(-2, 24)
entries = st.fixed_dictionaries(
    {
        "dtype": st.sampled_from(sorted(ck.SAFETENSORS_DTYPES) + ["F8_E5M2", "X"]) | json_values,
        "shape": st.lists(small_ints, max_size=3) | json_values,
        "data_offsets": st.lists(small_ints, min_size=2, max_size=2) | json_values,
    }
) | json_values


@FUZZ
@given(
    header=st.dictionaries(st.sampled_from(["a", "b", "c/d", "", "..", "__metadata__"]), entries, max_size=4),
    data=st.binary(max_size=40),
)
def test_fuzz_structured_safetensors_headers(tmp_path, header, data):
    path = write_st(tmp_path / "s.safetensors", json.dumps(header).encode(), data)
    got = _read_or_invalid(path)
    if got is not None:
        try:
            read_checkpoint_metadata(path)
        except InvalidInput:
            pytest.fail("metadata unreadable although the tensors were read")
