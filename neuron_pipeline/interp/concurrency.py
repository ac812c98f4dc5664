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
import queue
import threading
from typing import Callable, Iterable, Iterator, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


def map_windowed(
    fn: Callable[[Item], Result], items: Iterable[Item], workers: int, prefetch: bool = False
) -> Iterator[tuple[Item, Result | Exception]]:
    """``(item, fn(item))`` for every item, at most ``workers`` running at once, in completion
    order; a task that raised comes back as ``(item, exception)``. ``items`` is consumed lazily,
    only as fast as slots free up (so a caller can load the next layer's work on demand); with
    ``prefetch`` (and ``workers > 1``) it is consumed on a background thread, up to ``workers``
    items ahead of the window."""
    if workers <= 1:
        for item in items:
            try:
                result = fn(item)
            except Exception as exc:  # noqa: BLE001 - returned to the caller per task
                result = exc
            yield item, result
        return
    source = _prefetched(items, workers) if prefetch else iter(items)
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
        close = getattr(source, "close", None)
        if close is not None:
            close()
        pool.shutdown(wait=True, cancel_futures=True)


_DONE = object()


class _Failed:
    def __init__(self, exc: BaseException):
        self.exc = exc


def _prefetched(items: Iterable[Item], depth: int) -> Iterator[Item]:
    """``items`` produced on a background thread, up to ``depth`` ahead: preparing the next tasks
    (reading a chunk of records from the lake, building prompts) overlaps with the calls in flight
    instead of leaving freed slots empty meanwhile."""
    buffer: queue.Queue = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()

    def put(value) -> bool:
        while not stop.is_set():
            try:
                buffer.put(value, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(item):
                    return
        except BaseException as exc:  # noqa: BLE001 - re-raised on the consuming thread
            put(_Failed(exc))
            return
        put(_DONE)

    thread = threading.Thread(target=produce, name="llm-window-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            value = buffer.get()
            if value is _DONE:
                return
            if isinstance(value, _Failed):
                raise value.exc
            yield value
    finally:
        stop.set()
        thread.join(timeout=5)
