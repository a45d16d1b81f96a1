"""Give the C heap's free pages back to the operating system.

glibc keeps memory that a big array freed for the next allocation, and
after the first large free it stops giving arrays their own mappings (its
mmap threshold adapts up to 32 MiB), so a loop that works through big
transient arrays one at a time grows the process by the sum of them, not
the largest. :func:`release` (``malloc_trim(0)``) returns those free pages;
a loop that streams a large change calls it between its pieces. Elsewhere
(another C library, no glibc) it does nothing.
"""

from __future__ import annotations

import ctypes


def _malloc_trim():
    try:
        trim = ctypes.CDLL(None).malloc_trim  # the process's own symbols (no ctypes.util: it runs ldconfig)
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


_TRIM = _malloc_trim()
# Below this, what was freed is not worth a release: the next arrays would fault their
# pages in again (a sync of a few MiB measured ~5% slower releasing after every tensor).
WORTH_BYTES = 4 << 20


def release(freed: int | None = None) -> None:
    """Return the heap's free pages to the system (a few microseconds to a millisecond),
    unless the caller says it freed less than WORTH_BYTES."""
    if _TRIM is not None and (freed is None or freed >= WORTH_BYTES):
        _TRIM(0)
