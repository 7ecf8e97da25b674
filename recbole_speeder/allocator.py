"""glibc's allocator set for training loops (``keep_freed_memory``).

A CPU training step allocates and frees the same large activations every step. glibc serves blocks above its mmap
threshold (at most 32 MB) with fresh ``mmap`` calls and hands them back with ``munmap``, and trims the heap top
after frees: every step then pays the kernel to map and zero-fill the same pages again (BENCHMARKS.md,
"Allocator", measures what that costs). Serving every block from the heap and never trimming it keeps the pages
mapped: the
process holds on to its peak memory instead of returning it between steps. No effect off glibc (macOS, musl).
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's malloc.h
M_TOP_PAD = -2
M_MMAP_MAX = -4
KEEP = ((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, 2**31 - 1), (M_TOP_PAD, 64 * 2**20))


def keep_freed_memory(enabled: bool) -> bool:
    """With ``enabled``, make glibc keep freed memory for reuse; True if the allocator took the settings."""
    if not enabled:
        return False
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return all(mallopt(parameter, value) == 1 for parameter, value in KEEP)
