"""Where the parts of an encoded record (encoding v2, formats/FORMAT.md section 4) lie, for tests that damage them."""

from __future__ import annotations

import struct

from deltalog import record as rec


def v2_spans(blob) -> tuple[tuple[int, int], dict[tuple[str, str], tuple[int, int]]]:
    """(header span, {(tensor, section): span}) of a record of encoding v2; spans are (start, stop)."""
    blob = bytes(blob)
    (hlen,) = struct.unpack_from(">I", blob, 8)
    header = rec.unpack(blob[12 : 12 + hlen], "test")
    pos, sections = 12 + hlen + 8, {}  # the header, then its u64 checksum, then the sections
    for t in header["tensors"]:
        for key in rec.SECTION_KEYS:
            if key in t["sections"]:
                sections[(t["name"], key)] = (pos, pos + t["sections"][key][1])
                pos += t["sections"][key][1]
    assert pos == len(blob), "sections must fill the record"
    return (12, 12 + hlen), sections
