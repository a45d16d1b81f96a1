"""Give the C heap's free pages back to the operating system.

glibc keeps memory that a big array freed for the next allocation, and
after the first large free it stops giving arrays their own mappings (its
mmap threshold adapts up to 32 MiB), so a loop that works through big
transient arrays one at a time grows the process by the sum of them, not
the largest. :func:`release` (``malloc_trim(0)``) returns those free pages;
a loop that streams a large change calls it between its pieces.
:func:`bound_retention` fixes the thresholds instead, for a process
deltalog owns (the command), so that nothing needs to remember to. Elsewhere
(another C library, no glibc) both do nothing.
"""

from __future__ import annotations

import ctypes


def _libc_function(name: str, *argtypes):
    try:
        function = getattr(ctypes.CDLL(None), name)  # the process's own symbols (no ctypes.util: it runs ldconfig)
    except (OSError, AttributeError):
        return None
    function.argtypes = list(argtypes)
    function.restype = ctypes.c_int
    return function


_TRIM = _libc_function("malloc_trim", ctypes.c_size_t)
_MALLOPT = _libc_function("mallopt", ctypes.c_int, ctypes.c_int)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h

# What a deltalog process asks of glibc (bound_retention): an array from 4 MiB up gets a
# mapping of its own, given back when it is freed, and at most 16 MiB of free heap is kept.
# Adaptive, glibc kept up to twice the largest array freed so far (it raises both to that
# size, up to 32 MiB): a sync destination of a 4 GiB model held 30-50 MiB of freed arrays
# at its peak (bench/syncmem.py --size 4 --minutes 3 --chunk-bytes 64M: +289 -> +236..+243 MiB).
MMAP_THRESHOLD_BYTES = 4 << 20
TRIM_THRESHOLD_BYTES = 16 << 20

# Below this, what was freed is not worth a release: the next arrays would fault their
# pages in again (a sync of a few MiB measured ~5% slower releasing after every tensor).
WORTH_BYTES = 4 << 20


def release(freed: int | None = None) -> None:
    """Return the heap's free pages to the system (a few microseconds to a millisecond),
    unless the caller says it freed less than WORTH_BYTES."""
    if _TRIM is not None and (freed is None or freed >= WORTH_BYTES):
        _TRIM(0)


def bound_retention() -> None:
    """Fix glibc's mmap and trim thresholds (MMAP_THRESHOLD_BYTES, TRIM_THRESHOLD_BYTES) for
    this process. For the deltalog command only, at its start: a library leaves its host's
    allocator alone."""
    if _MALLOPT is not None:
        _MALLOPT(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
        _MALLOPT(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
