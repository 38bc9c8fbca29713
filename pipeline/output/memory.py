"""Handing freed memory back to the system after a burst of big, short-lived buffers.

Building the resume index reads a million rows in batches: Arrow's allocator keeps what the
decoding freed, and glibc's malloc keeps what numpy and the object-store client freed (the bodies
of the reads arrive on fsspec's I/O thread, whose malloc arena seldom shrinks on its own). Both
are free memory the process still holds: on a bucket output with no index cache, 1M rows left
the run 129 MB above its imports after the reads against 52 MB for the same parts on disk
(`scripts/bench.py bucket-resume`). Dask's worker-memory guide ("Memory not released back to the
OS") prescribes the same call, and Orthanc makes it from a housekeeping thread; here it is made
only after such a burst (the index build), not on a timer.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from collections.abc import Callable

import pyarrow as pa


def release_unused() -> None:
    """Return the free memory of Arrow's pool and of every glibc arena to the system."""
    pa.default_memory_pool().release_unused()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's `malloc_trim`, or None where the C library has none (macOS, musl)."""
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None


BIG_BUFFER = 4 << 20  # glibc mmaps buffers from this size up: their memory returns on free
_M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h)


@functools.cache
def return_big_buffers() -> None:
    """Fix glibc's mmap threshold at BIG_BUFFER for the process (once; a no-op without glibc).

    glibc raises the threshold to the size of each mmapped block freed (up to 32 MB), so after
    the first 20 MB answer the next ones come from the heaps of the threads that touch them
    (the writer's, the part's) and stay there: 60 answers of 20 MB through the sink peaked at
    +408 MB RSS, +287 MB with the threshold fixed (`tests/test_sink.py`, memory test). Buffers
    this big are few (answers, parts), so an mmap each costs nothing measurable.
    """
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt if name else None
    except (OSError, AttributeError):
        return
    if mallopt is not None:
        mallopt(_M_MMAP_THRESHOLD, BIG_BUFFER)
