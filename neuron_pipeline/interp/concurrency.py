"""Keeping a concurrent LLM backend busy across neurons: a sliding window of tasks.

A stage's unit of work is a neuron (one explanation, with best-of-n and revision; one
simulation of its scored excerpts). Run one neuron at a time and a backend allowed 64 requests
in flight waits on the ~10 requests of one neuron; run the neurons in fixed batches and every
batch ends with a tail where few are left. ``map_windowed`` keeps ``workers`` neurons in
progress at all times — a new one starts the moment one finishes — each on its own thread; the
backend's own limit (the API client's semaphore, shared by all threads) caps what is on the
wire, so the window only has to be wide enough to keep that limit full.

Results come back as they complete, so memory holds at most ``workers`` tasks in progress plus
what the caller keeps. With ``workers <= 1`` everything runs inline, in order, on the calling
thread (the baseline and the local model: no threads, same behaviour as a plain loop).
"""

from __future__ import annotations

import concurrent.futures
from typing import Callable, Iterable, Iterator, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


def map_windowed(
    fn: Callable[[Item], Result], items: Iterable[Item], workers: int
) -> Iterator[tuple[Item, Result | Exception]]:
    """``(item, fn(item))`` for every item, at most ``workers`` running at once, in completion
    order; a task that raised comes back as ``(item, exception)``. ``items`` is consumed lazily,
    only as fast as slots free up (so a caller can load the next layer's work on demand)."""
    if workers <= 1:
        for item in items:
            try:
                result = fn(item)
            except Exception as exc:  # noqa: BLE001 - returned to the caller per task
                result = exc
            yield item, result
        return
    source = iter(items)
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="llm-window")
    pending: dict[concurrent.futures.Future, Item] = {}
    try:
        exhausted = False
        while True:
            while not exhausted and len(pending) < workers:
                try:
                    item = next(source)
                except StopIteration:
                    exhausted = True
                    break
                pending[pool.submit(fn, item)] = item
            if not pending:
                return
            done, _ = concurrent.futures.wait(pending, return_when=concurrent.futures.FIRST_COMPLETED)
            for future in done:
                item = pending.pop(future)
                try:
                    result = future.result()
                except Exception as exc:  # noqa: BLE001 - returned to the caller per task
                    result = exc
                yield item, result
    finally:
        # The caller stopped early (an error, an interrupt): tasks not started are dropped; the
        # running ones finish their current call (their answers still reach the LLM cache).
        pool.shutdown(wait=True, cancel_futures=True)
