"""Handing freed memory back to the OS between layers (BENCHMARKS.md, "A whole model on one machine")."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
from typing import Callable


def _libc_trim() -> Callable[[int], int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to hand back
        return None


_MALLOC_TRIM = _libc_trim()


def release_memory(collect: bool = True) -> None:
    """Hand memory freed by a finished layer back to the OS. The stages run in one process, and
    glibc keeps freed small blocks (millions of Python objects per layer) in its heap: without
    this, every later stage's resident memory starts at the high-water mark of the largest layer
    before it. ``collect=False`` skips the garbage collector's full pass, which holds the GIL for
    a while: an API stage with hundreds of requests in flight should not pause its event loop
    (the trim itself is a C call that releases the GIL)."""
    if collect:
        gc.collect()
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)
