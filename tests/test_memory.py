"""release_memory hands memory freed by a finished layer back to the OS (glibc keeps it otherwise)."""

from __future__ import annotations

import gc
import os

import pytest

from neuron_pipeline.memory import _MALLOC_TRIM, release_memory


def _rss_mib() -> float:
    with open(f"/proc/{os.getpid()}/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.skipif(_MALLOC_TRIM is None or not os.path.exists("/proc/self/statm"),
                    reason="needs glibc's malloc_trim and /proc (Linux)")
def test_freed_blocks_go_back_to_the_os():
    before = _rss_mib()
    rows = [("x" * 1000) + str(i) for i in range(200_000)]  # ~200 MiB of malloc'd blocks
    survivors = rows[::1000]  # a few kept, as a layer's results are, so the heap cannot shrink from its top
    allocated = _rss_mib()
    assert allocated - before > 150
    del rows
    gc.collect()
    freed = _rss_mib()
    release_memory()
    trimmed = _rss_mib()
    assert len(survivors) == 200
    # Freed but still resident until trimmed; trimmed back near the start.
    assert freed - trimmed > 150, (before, allocated, freed, trimmed)
    assert trimmed - before < 50, (before, allocated, freed, trimmed)
