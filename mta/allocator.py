"""The C allocator's settings for a node process (I4: memory follows the bound).

glibc serves allocations above ``M_MMAP_THRESHOLD`` with their own mappings, returned to
the system when freed. By default the threshold rises to the size of each such block
freed (up to 32 MiB), so after the first large bodies every later one comes from the
heap, whose freed space is fragmented and seldom returned: the process's resident size
then creeps past what it holds. Fixing the threshold keeps message-sized buffers in
mappings of their own.
"""

from __future__ import annotations

import ctypes
import ctypes.util

#: ``mallopt`` parameter number of ``M_MMAP_THRESHOLD`` (glibc's malloc.h).
_M_MMAP_THRESHOLD = -3
#: Blocks from this size on are mapped on their own: message-sized buffers, not the
#: 256 KiB chunks and slices, which the heap reuses without page faults (at 128 KiB,
#: glibc's initial default, intake of 1 MB messages ran 30% slower, BENCHMARKS.md).
MMAP_THRESHOLD_BYTES = 1024 * 1024


def fix_mmap_threshold(threshold: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Fix glibc's mmap threshold; False where the C library is not glibc."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, threshold))
