"""Checks of an LMDB data file (log/data.mdb) made with plain reads, before LMDB maps it.

LMDB maps data.mdb and trusts it: a page past the end of a truncated file
kills the process that touches it with SIGBUS, which no Python code can
catch. So before the first map, the file must hold every page in use: the
pages up to the newest meta page's ``mm_last_pg``, except pages LMDB never
wrote because they are free (a page a transaction allocated and freed again
is counted in ``mm_last_pg`` but never written, so a healthy file can be
that much short). Free pages are listed in LMDB's free database, which is
read here, from the file, only when the file is short.

The layout is liblmdb 0.9's (data version 1) on a 64-bit little-endian
build, which is what py-lmdb bundles: native byte order, 8-byte page
numbers, pages of ``psize`` bytes that start with a 16-byte header.
"""

from __future__ import annotations

import os
import struct
import sys
from dataclasses import dataclass

from .errors import IntegrityError, StorageError

_MDB_MAGIC = 0xBEEFC0DE
_PAGE_HEADER = 16  # mp_pgno u64, mp_pad u16, mp_flags u16, mp_lower u16, mp_upper u16
_P_BRANCH, _P_LEAF = 0x01, 0x02
_F_BIGDATA = 0x01  # a leaf node whose data lives in overflow pages
_NO_PAGE = 2**64 - 1  # md_root of an empty database
_PAGE_SIZES = frozenset(1 << n for n in range(9, 17))  # a power of two, 512 B to 64 KiB

# MDB_meta, after the page header: mm_magic u32, mm_version u32, mm_address,
# mm_mapsize, mm_dbs[2] (the free DB, then the main DB: 48 bytes each),
# mm_last_pg, mm_txnid. mm_psize is the free DB's md_pad.
_META = struct.Struct("=II8x8x" "IHHQQQQQ" "48x" "QQ")
_META_BYTES = _PAGE_HEADER + _META.size
_FLAGS_LOWER = struct.Struct("=HH")  # mp_flags, mp_lower at 10
_NODE = struct.Struct("=HHHH")  # mn_lo, mn_hi, mn_flags, mn_ksize (little-endian order)
_U16 = struct.Struct("=H")
_U64 = struct.Struct("=Q")


@dataclass(frozen=True)
class Meta:
    psize: int
    last_pgno: int
    txnid: int
    free_root: int  # root page of the free database, _NO_PAGE if it is empty
    free_tree_pages: int  # its branch and leaf pages: bounds the walk of a damaged tree


def _parse_meta(raw: bytes) -> Meta | None:
    """The meta page in ``raw``; None if it is short or not an LMDB meta page (LMDB refuses those itself)."""
    if len(raw) < _META_BYTES:
        return None
    magic, _version, psize, _flags, _depth, branch, leaf, _overflow, _entries, root, last_pgno, txnid = _META.unpack_from(
        raw, _PAGE_HEADER
    )
    if magic != _MDB_MAGIC:
        return None
    return Meta(psize, last_pgno, txnid, root, branch + leaf)


def newest_meta(f) -> Meta | None:
    """The meta page LMDB would use (the higher txn id of pages 0 and 1); None if page 0 is unusable."""
    f.seek(0)
    first = _parse_meta(f.read(_META_BYTES))
    if first is None or first.psize not in _PAGE_SIZES:
        return first
    f.seek(first.psize)
    second = _parse_meta(f.read(_META_BYTES))
    return first if second is None or second.txnid < first.txnid else second


def check_data_file(path: str, attempts: int = 3) -> None:
    """IntegrityError unless ``path``/data.mdb holds every page LMDB may read.

    The meta page is read before the file's size: a writer writes a
    transaction's pages before its meta page, so a commit racing with this
    check only makes the file longer than the meta read requires. A commit
    during the walk of the free database can change it, so a failure is
    retried while the txn id moves.
    """
    if sys.byteorder != "little" or struct.calcsize("P") != 8:
        return  # the layout read here is that of 64-bit little-endian builds
    data_file = os.path.join(path, "data.mdb")
    try:
        with open(data_file, "rb") as f:
            for _ in range(attempts):
                meta = newest_meta(f)
                size = os.fstat(f.fileno()).st_size
                problem = _missing_pages(f, meta, size)
                if problem is None:
                    return
                again = newest_meta(f)
                if again is None or meta is None or again.txnid == meta.txnid:
                    break
    except FileNotFoundError:
        raise IntegrityError(f"{path}: the log's data.mdb is missing") from None
    except OSError as exc:
        raise StorageError(f"{path}: cannot read the log: {exc.strerror}") from None
    raise IntegrityError(f"{path}: the log's data.mdb is {problem}")


def _missing_pages(f, meta: Meta | None, size: int) -> str | None:
    """What is wrong with a file of ``size`` bytes under ``meta``, or None if every page LMDB may read is there."""
    if size < _META_BYTES:
        return f"truncated ({size} bytes)"
    if meta is None:
        return None  # not an LMDB file, or a damaged magic: LMDB refuses it without mapping a page
    if meta.psize not in _PAGE_SIZES:
        return f"damaged (its meta page gives a page size of {meta.psize})"
    need = (meta.last_pgno + 1) * meta.psize
    if size >= need:
        return None
    free = _free_pages(f, meta, size)
    first_missing = size // meta.psize  # a partial page counts as missing
    if free is not None and all(p in free for p in range(first_missing, meta.last_pgno + 1)):
        return None  # only free pages LMDB never wrote are beyond the end
    return f"truncated ({size} bytes, its pages need {need})"


def _read_page(f, pgno: int, psize: int, size: int, length: int | None = None) -> bytes | None:
    """``length`` bytes (a page by default) of page ``pgno``; None if they are not all in the file."""
    length = psize if length is None else length
    start = pgno * psize
    if pgno < 2 or start + length > size:
        return None
    f.seek(start)
    data = f.read(length)
    return data if len(data) == length else None


def _free_pages(f, meta: Meta, size: int) -> set[int] | None:
    """The page numbers LMDB's free database lists; None if its tree cannot be read whole from the file.

    Its keys are txn ids, its values page-number lists (u64 count, then the
    numbers), big ones in overflow pages. The walk is bounded by the tree's
    page count from the meta page, so a damaged tree cannot loop.
    """
    free: set[int] = set()
    if meta.free_root == _NO_PAGE:
        return free
    stack, budget = [meta.free_root], meta.free_tree_pages
    while stack:
        budget -= 1
        page = _read_page(f, stack.pop(), meta.psize, size)
        if page is None or budget < 0:
            return None
        try:
            flags, lower = _FLAGS_LOWER.unpack_from(page, 10)
            for i in range(max(0, (lower - _PAGE_HEADER) // 2)):
                node = _U16.unpack_from(page, _PAGE_HEADER + 2 * i)[0]
                lo, hi, node_flags, ksize = _NODE.unpack_from(page, node)
                if flags & _P_BRANCH:
                    stack.append(lo | hi << 16 | node_flags << 32)
                elif flags & _P_LEAF:
                    ids = _leaf_ids(f, meta, size, page, node + _NODE.size + ksize, lo | hi << 16, node_flags)
                    if ids is None:
                        return None
                    free.update(ids)
                else:
                    return None
        except struct.error:
            return None
    return free


def _leaf_ids(f, meta: Meta, size: int, page: bytes, at: int, length: int, node_flags: int) -> tuple | None:
    """The page numbers of one free-database record (``length`` bytes at ``at`` of ``page``, or in overflow pages)."""
    if node_flags & _F_BIGDATA:
        overflow = _read_page(f, _U64.unpack_from(page, at)[0], meta.psize, size, _PAGE_HEADER + length)
        if overflow is None:
            return None
        data = overflow[_PAGE_HEADER:]
    else:
        data = page[at : at + length]
    count = _U64.unpack_from(data, 0)[0] if len(data) >= 8 else -1
    if count < 0 or (count + 1) * 8 > len(data):
        return None
    return struct.unpack_from(f"={count}Q", data, 8)
