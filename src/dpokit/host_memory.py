"""Keep a CPU training process's resident memory close to what it actually holds (glibc malloc only).

A training step allocates and frees the same large tensors every time (activations, gradients, a chunk of logits).
glibc keeps freed heap memory, and as the holes left by one step fit the next step's tensors only in part, the heap
grows: peak RSS creeps up step after step. `release_free_memory`, called after each optimizer step, hands the
heap's free pages back (malloc_trim), and `lean_allocator` fixes the mmap threshold at 32 MiB (the ceiling of
glibc's own dynamic threshold), so the largest blocks (a chunk of logits) are always mapped and unmapped on their
own. A lower threshold keeps RSS a little lower still but maps every activation afresh: the kernel faults in and
zeroes each page again, every step. Elsewhere (macOS, musl, Windows) both do nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import sys

M_MMAP_THRESHOLD = -3          # mallopt parameter number in glibc's malloc.h
LEAN_MMAP_THRESHOLD = 32 << 20  # bytes


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """The C library, once per process (finding it runs `ldconfig`), when it is glibc."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def lean_allocator() -> bool:
    """Map allocations of 32 MiB and more on their own (returned to the OS when freed); True if it took effect.
    A threshold set in the environment (glibc's `MALLOC_MMAP_THRESHOLD_`) is the user's choice and is kept."""
    libc = _glibc()
    if libc is not None and "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return True
    return bool(libc is not None and libc.mallopt(M_MMAP_THRESHOLD, LEAN_MMAP_THRESHOLD))


def release_free_memory() -> None:
    """Give the heap's free pages back to the OS (malloc_trim)."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
