"""Read and write model checkpoints: the tensors deltalog imports and exports.

A checkpoint is a ``.npz`` archive, a ``.safetensors`` file, or a directory
of ``.npy`` files (one tensor each, named by its path relative to the
directory without ``.npy``, e.g. ``layer1/weight``). Every tensor comes back
as a :class:`CheckpointTensor` whose array is in deltalog's little-endian
storage dtype (see :mod:`deltalog.dtypes`).

Checkpoint files are untrusted input: every problem found while reading is
raised as one :class:`~deltalog.errors.InvalidInput` line naming the file.
Large tensors are memory-mapped rather than read into RAM. Writes are atomic:
a reader sees the old checkpoint or the complete new one, never a partial one.

The safetensors format is small enough to implement here by hand: an 8-byte
little-endian header length N, N bytes of UTF-8 JSON describing each tensor
(``dtype``, ``shape``, ``data_offsets`` relative to the data buffer) plus an
optional ``__metadata__`` map of strings, then the data buffer.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import tempfile
import zipfile
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from . import dtypes
from .errors import InvalidInput, StorageError
from .tensorfiles import fsync_dir

KINDS = ("npz", "safetensors", "npy-dir")

_SUFFIX_KINDS = {".npz": "npz", ".safetensors": "safetensors"}

# safetensors dtype code <-> deltalog logical dtype name (public: server.py writes safetensors too)
SAFETENSORS_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U64": "uint64",
    "U32": "uint32",
    "U16": "uint16",
    "U8": "uint8",
    "BOOL": "bool",
}
SAFETENSORS_DTYPE_CODES = {v: k for k, v in SAFETENSORS_DTYPES.items()}

# Same cap as the reference implementation: a larger header is hostile, and
# without a cap a forged length would make us read the whole file as JSON.
_MAX_ST_HEADER = 100_000_000

# Each memory map holds a file descriptor for its lifetime, so a directory of
# thousands of small .npy files would exhaust the descriptor limit; small
# ones are cheap to read outright.
_MMAP_MIN_BYTES = 1 << 20

_NUMPY_FORMAT_HINT = "numpy formats cannot label bfloat16; write a .safetensors checkpoint instead"


@dataclass(frozen=True)
class CheckpointTensor:
    name: str
    dtype: str  # logical deltalog dtype name, a key of dtypes.STORAGE
    shape: tuple[int, ...]
    array: np.ndarray  # storage dtype, original shape; may be a read-only memmap


# --------------------------------------------------------------------------
# kind, names


def checkpoint_kind(path: str | os.PathLike) -> str:
    """"npz", "safetensors" or "npy-dir", for an existing path or a new one.

    A directory, a path ending in a separator, or a path with no suffix is an
    npy-dir; otherwise the suffix decides.
    """
    text = os.fspath(path)
    p = Path(text)
    if p.is_dir() or text.endswith(("/", os.sep)):
        return "npy-dir"
    suffix = p.suffix.lower()
    if suffix in _SUFFIX_KINDS:
        return _SUFFIX_KINDS[suffix]
    if suffix == "":
        return "npy-dir"
    raise InvalidInput(
        f"{text}: unknown checkpoint suffix {p.suffix!r}",
        hint="use .npz, .safetensors, or a directory of .npy files (end the path with '/')",
    )


def _name_problem(name: object) -> str | None:
    """Why ``name`` is not acceptable as a tensor name, or None."""
    if not isinstance(name, str):
        return f"tensor name {name!r} is not a string"
    if name == "":
        return "empty tensor name"
    # names become paths in npy-dirs: refuse anything that could escape one
    if name.startswith("/") or ".." in name.split("/") or "\0" in name:
        return f"unsafe tensor name {name!r}"
    return None


# --------------------------------------------------------------------------
# reading


def read_checkpoint(path: str | os.PathLike, recursive: bool = False) -> dict[str, CheckpointTensor]:
    """All tensors of the checkpoint at ``path``, sorted by name.

    A directory checkpoint is the .npy files directly in it. ``recursive``
    also reads those of its subdirectories, as tensors named ``sub/NAME``
    (what writing a tensor whose name holds '/' makes); without it, a
    subdirectory holding .npy files is refused rather than silently left
    out or silently read (a backup folder inside is not the model).
    """
    path = _existing(path)
    kind = checkpoint_kind(path)
    if kind == "safetensors":
        tensors = _read_safetensors(path)
    elif kind == "npz":
        tensors = _read_npz(path)
    else:
        tensors = _read_npy_dir(path, recursive)
    return {name: tensors[name] for name in sorted(tensors)}


def read_checkpoint_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The safetensors ``__metadata__`` map; empty for the numpy formats."""
    path = _existing(path)
    if checkpoint_kind(path) != "safetensors":
        return {}
    _, metadata, _ = _read_safetensors_header(path)
    return metadata


def _existing(path: str | os.PathLike) -> str:
    text = os.fspath(path)
    if not os.path.exists(text):
        raise InvalidInput(f"{text}: checkpoint not found")
    return text


def _tensor(path: str, name: str, array: np.ndarray, logical: str | None = None) -> CheckpointTensor:
    problem = _name_problem(name)
    if problem:
        raise InvalidInput(f"{path}: {problem}")
    try:
        if logical is None:
            logical = dtypes.logical_name(array.dtype)
        array = dtypes.to_storage(array, logical)
    except InvalidInput as err:
        raise InvalidInput(f"{path}: tensor {name!r}: {err}", hint=err.hint) from None
    return CheckpointTensor(name, logical, tuple(array.shape), array)


def _read_safetensors_header(path: str) -> tuple[dict[str, dict], dict[str, str], int]:
    """(tensor entries, metadata, absolute offset of the data buffer)."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 8:
                raise InvalidInput(f"{path}: too short to be a safetensors file ({size} bytes)")
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                raise InvalidInput(
                    f"{path}: not a complete safetensors file: its first 8 bytes announce a {n}-byte header, "
                    f"but only {size - 8} bytes follow them",
                    hint="check that the file is a .safetensors checkpoint and was copied whole")
            if n > _MAX_ST_HEADER:
                raise InvalidInput(f"{path}: safetensors header length {n} exceeds the {_MAX_ST_HEADER}-byte limit")
            raw = f.read(n)
    except OSError as err:
        raise InvalidInput(f"{path}: cannot read: {err.strerror or err}") from None
    if len(raw) != n:
        raise InvalidInput(f"{path}: file changed while reading its safetensors header")

    def no_duplicates(pairs):
        keys = [k for k, _ in pairs]
        if len(set(keys)) != len(keys):
            raise ValueError("duplicate key in a JSON object")
        return dict(pairs)

    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=no_duplicates)
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        reason = "header is not UTF-8" if isinstance(err, UnicodeDecodeError) else f"bad header JSON ({err})"
        raise InvalidInput(f"{path}: {reason}") from None
    if not isinstance(header, dict):
        raise InvalidInput(f"{path}: safetensors header is not a JSON object")

    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise InvalidInput(f"{path}: __metadata__ must map strings to strings")

    buffer_len = size - 8 - n
    spans = []
    for name, entry in header.items():
        problem = _name_problem(name)
        if problem:
            raise InvalidInput(f"{path}: {problem}")
        where = f"{path}: tensor {name!r}"
        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
            raise InvalidInput(f"{where}: entry needs dtype, shape and data_offsets")
        code, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(code, str) or code not in SAFETENSORS_DTYPES:
            raise InvalidInput(f"{where}: unsupported dtype {code!r}", hint="supported: " + ", ".join(SAFETENSORS_DTYPES))
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise InvalidInput(f"{where}: shape {shape!r} is not a list of non-negative integers")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
            raise InvalidInput(f"{where}: data_offsets {offsets!r} is not a pair of integers")
        begin, end = offsets
        if not 0 <= begin <= end <= buffer_len:
            raise InvalidInput(f"{where}: data_offsets {offsets} outside the {buffer_len}-byte data buffer")
        itemsize = dtypes.storage_dtype(SAFETENSORS_DTYPES[code]).itemsize
        if end - begin != math.prod(shape) * itemsize:
            raise InvalidInput(
                f"{where}: data_offsets span {end - begin} bytes but shape {shape} of {code} needs "
                f"{math.prod(shape) * itemsize}"
            )
        spans.append((begin, end, name))

    spans.sort()
    for (_, prev_end, prev), (begin, _, name) in zip(spans, spans[1:]):
        if begin < prev_end:
            raise InvalidInput(f"{path}: tensors {prev!r} and {name!r} overlap in the data buffer")
    return header, metadata, 8 + n


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _read_safetensors(path: str) -> dict[str, CheckpointTensor]:
    header, _, data_start = _read_safetensors_header(path)
    if not header:
        return {}
    # One map for the whole file: one descriptor however many tensors.
    try:
        whole = np.memmap(path, dtype=np.uint8, mode="r")
    except (OSError, ValueError) as err:
        raise InvalidInput(f"{path}: cannot map file: {err}") from None
    if len(whole) < data_start + max(e["data_offsets"][1] for e in header.values()):
        raise InvalidInput(f"{path}: file shrank while being read")
    tensors = {}
    for name, entry in header.items():
        logical = SAFETENSORS_DTYPES[entry["dtype"]]
        begin, end = entry["data_offsets"]
        raw = whole[data_start + begin : data_start + end]
        array = raw.view(dtypes.storage_dtype(logical)).reshape(entry["shape"])
        tensors[name] = _tensor(path, name, array, logical)
    return tensors


# Errors numpy and zipfile raise on damaged archives and .npy streams.
_LOAD_ERRORS = (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error, NotImplementedError, RuntimeError)


def _read_npy_header(f: BinaryIO, where: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran_order, dtype) of the .npy stream ``f``, left at the data."""
    try:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            raise InvalidInput(f"{where}: unsupported .npy format version {version}")
    except InvalidInput:
        raise
    except Exception as err:  # numpy parses the header text with tokenize/ast and leaks their errors
        raise InvalidInput(f"{where}: not a valid .npy array ({_first_line(err)})") from None
    if dtype.hasobject:
        raise InvalidInput(f"{where}: object arrays are not supported")
    if any(d < 0 for d in shape):
        raise InvalidInput(f"{where}: negative dimension in shape {shape}")
    return shape, fortran, dtype


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


def _read_npz(path: str) -> dict[str, CheckpointTensor]:
    tensors = {}
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if info.is_dir():
                    continue
                if not info.filename.endswith(".npy"):
                    raise InvalidInput(f"{path}: member {info.filename!r} is not a .npy array")
                name = info.filename[: -len(".npy")]
                where = f"{path}: member {info.filename!r}"
                if name in tensors:
                    raise InvalidInput(f"{path}: duplicate tensor name {name!r}")
                with archive.open(info) as f:
                    shape, fortran, dtype = _read_npy_header(f, where)
                    nbytes = math.prod(shape) * dtype.itemsize
                    # The directory's size bounds what we allocate for a forged shape.
                    if nbytes > info.file_size - f.tell():
                        raise InvalidInput(f"{where}: truncated (shape {shape} of {dtype} needs {nbytes} bytes)")
                    data = f.read(nbytes)
                if len(data) != nbytes:
                    raise InvalidInput(f"{where}: truncated (shape {shape} of {dtype} needs {nbytes} bytes)")
                array = np.frombuffer(data, dtype=dtype).reshape(shape, order="F" if fortran else "C")
                tensors[name] = _tensor(path, name, array)
    except _LOAD_ERRORS as err:
        raise InvalidInput(f"{path}: not a valid .npz archive ({_first_line(err)})") from None
    return tensors


def _read_npy_dir(path: str, recursive: bool) -> dict[str, CheckpointTensor]:
    if not os.path.isdir(path):
        raise InvalidInput(f"{path}: not a directory (an npy-dir checkpoint is a directory of .npy files)")
    tensors = {}
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames.sort()
        found = sorted(f for f in filenames if f.endswith(".npy"))
        if found and dirpath != path and not recursive:
            raise InvalidInput(
                f"{path}: its subdirectory {os.path.relpath(dirpath, path)} holds .npy files too "
                f"({found[0]}, ...), which are not read",
                hint="pass --recursive to read them as tensors named 'SUBDIR/NAME', or move them out")
        for filename in found:
            file = os.path.join(dirpath, filename)
            name = os.path.relpath(file, path)[: -len(".npy")].replace(os.sep, "/")
            tensors[name] = _tensor(file, name, _load_npy(file))
    if not tensors:
        raise InvalidInput(f"{path}: directory holds no .npy files")
    return tensors


def _load_npy(file: str) -> np.ndarray:
    try:
        with open(file, "rb") as f:
            shape, fortran, dtype = _read_npy_header(f, file)
            offset = f.tell()
            nbytes = math.prod(shape) * dtype.itemsize
            size = os.fstat(f.fileno()).st_size
            if size - offset < nbytes:
                raise InvalidInput(f"{file}: truncated (shape {shape} of {dtype} needs {nbytes} bytes)")
            order = "F" if fortran else "C"
            if nbytes < _MMAP_MIN_BYTES:
                return np.frombuffer(f.read(nbytes), dtype=dtype).reshape(shape, order=order)
        return np.memmap(file, dtype=dtype, mode="r", offset=offset, shape=shape, order=order)
    except _LOAD_ERRORS as err:
        raise InvalidInput(f"{file}: cannot read .npy ({_first_line(err)})") from None


# --------------------------------------------------------------------------
# writing


def write_checkpoint(
    path: str | os.PathLike,
    tensors: Mapping[str, tuple[np.ndarray, str]],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write ``tensors`` (name -> (storage array, logical dtype)) atomically.

    The format follows :func:`checkpoint_kind`. ``metadata`` is only
    representable in safetensors; passing it for another format is an error
    rather than a silent loss.
    """
    text = os.fspath(path)
    kind = checkpoint_kind(text)
    metadata = dict(metadata or {})
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise InvalidInput("checkpoint metadata must map strings to strings")
    if metadata and kind != "safetensors":
        raise InvalidInput(f"{text}: a {kind} checkpoint cannot hold metadata", hint="write a .safetensors checkpoint")
    prepared = _prepare(text, kind, tensors)
    try:
        if kind == "safetensors":
            _atomic_file(text, lambda f: _write_safetensors(f, prepared, metadata))
        elif kind == "npz":
            _atomic_file(text, lambda f: _write_npz(f, prepared))
        else:
            _write_npy_dir(text, prepared)
    except OSError as err:
        raise StorageError(f"cannot write checkpoint {text}: {err.strerror or err}") from None


def _prepare(path: str, kind: str, tensors: Mapping[str, tuple[np.ndarray, str]]) -> list[tuple[str, np.ndarray, str]]:
    """Validate everything before the first byte is written; sorted by name."""
    if kind == "safetensors" and "__metadata__" in tensors:
        raise InvalidInput(f"{path}: '__metadata__' is reserved in safetensors and cannot name a tensor")
    prepared = []
    for name in sorted(tensors, key=str):
        problem = _name_problem(name)
        if problem:
            raise InvalidInput(f"{path}: {problem}")
        array, logical = tensors[name]
        dtypes.storage_dtype(logical)  # unknown names raise here
        if logical == "bfloat16" and kind != "safetensors":
            raise InvalidInput(f"{path}: tensor {name!r} is bfloat16", hint=_NUMPY_FORMAT_HINT)
        try:
            array = dtypes.to_storage(np.asarray(array), logical)
        except InvalidInput as err:
            raise InvalidInput(f"{path}: tensor {name!r}: {err}", hint=err.hint) from None
        prepared.append((name, array, logical))
    if kind == "npy-dir":
        if not prepared:
            raise InvalidInput(f"{path}: an npy-dir checkpoint needs at least one tensor")
        names = {name for name, _, _ in prepared}
        for name, _, _ in prepared:
            parts = name.split("/")
            if "" in parts or "." in parts:
                raise InvalidInput(f"{path}: tensor name {name!r} has an empty or '.' path segment")
            # "a" is stored as a.npy, which "a.npy/b" would need as a directory
            for i in range(1, len(parts)):
                stem = "/".join(parts[:i]).removesuffix(".npy")
                if stem != "/".join(parts[:i]) and stem in names:
                    raise InvalidInput(f"{path}: tensor names {stem!r} and {name!r} collide as files")
    return prepared


def _atomic_file(path: str, write) -> None:
    """Run ``write(f)`` on a temp file beside ``path``, then rename it into place."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600: give the file what open() would
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        _remove_quietly(tmp)
        raise
    fsync_dir(directory)


def _umask() -> int:
    """The process's umask, read without changing it (Linux 4.7+ shows it in /proc), else by setting it back."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # elsewhere reading it means setting it: put it straight back
    os.umask(mask)
    return mask


def _remove_quietly(file: str) -> None:
    try:
        os.unlink(file)
    except OSError:
        pass


def _write_safetensors(f: BinaryIO, prepared: list[tuple[str, np.ndarray, str]], metadata: dict[str, str]) -> None:
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = metadata
    offset = 0
    for name, array, logical in prepared:
        header[name] = {
            "dtype": SAFETENSORS_DTYPE_CODES[logical],
            "shape": list(array.shape),
            "data_offsets": [offset, offset + array.nbytes],
        }
        offset += array.nbytes
    raw = json.dumps(header, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-(8 + len(raw)) % 8)  # the data buffer starts 8-byte aligned
    f.write(struct.pack("<Q", len(raw)))
    f.write(raw)
    for _, array, _ in prepared:
        _write_bytes(f, array)


def _write_bytes(f: BinaryIO, array: np.ndarray) -> None:
    # Only the non-contiguous case copies; a memmapped source streams from the page cache.
    flat = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
    f.write(memoryview(flat))


def _write_npz(f: BinaryIO, prepared: list[tuple[str, np.ndarray, str]]) -> None:
    # By hand rather than np.savez: tensor names would clash with its keyword arguments.
    with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
        for name, array, _ in prepared:
            with archive.open(name + ".npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, array, allow_pickle=False)


def _write_npy_dir(path: str, prepared: list[tuple[str, np.ndarray, str]]) -> None:
    target = os.path.abspath(path)
    if os.path.lexists(target):
        if not os.path.isdir(target) or os.path.islink(target):
            raise InvalidInput(f"{path}: exists and is not a directory")
        if os.listdir(target):
            raise InvalidInput(f"{path}: output directory is not empty")
    parent = os.path.dirname(target)
    tmp = tempfile.mkdtemp(dir=parent, prefix="." + os.path.basename(target) + ".", suffix=".tmp")
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700: give the directory what mkdir would
        for name, array, _ in prepared:
            file = os.path.join(tmp, *name.split("/")) + ".npy"
            os.makedirs(os.path.dirname(file), exist_ok=True)
            with open(file, "xb") as f:
                np.lib.format.write_array(f, array, allow_pickle=False)
                f.flush()
                os.fsync(f.fileno())
        for directory, _, _ in os.walk(tmp):
            fsync_dir(directory)
        # rename(2) replaces an empty directory atomically, so an existing empty target is fine
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(parent)


__all__ = [
    "KINDS",
    "CheckpointTensor",
    "checkpoint_kind",
    "read_checkpoint",
    "read_checkpoint_metadata",
    "write_checkpoint",
]
