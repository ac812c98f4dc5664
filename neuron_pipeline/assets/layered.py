"""How the stages after the capture walk a run: one layer at a time, neurons in bounded chunks.

Whatever the number of layers in a run, a stage holds one layer's rows (read from the lake a
chunk of neurons at a time, packed into typed frames as results arrive), validates them, writes
them and lets them go before the next layer is flushed: peak memory is one layer's working set,
not the run's (BENCHMARKS.md, "A whole model on one machine"). LLM work runs in a sliding window
across neurons *and* layers (``interp.concurrency.map_windowed``): the next layer's neurons start
while the last ones of the previous layer are still on the wire, so a concurrent API backend
never drains at a layer boundary.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator

import polars as pl

from neuron_pipeline.interp.concurrency import map_windowed
from neuron_pipeline.interp.records import NeuronRecord, neuron_records_from_rows
from neuron_pipeline.lake import read_table, table_frame
from neuron_pipeline.memory import release_memory

# Neurons whose activation records are read from the lake (and turned into Python objects) at
# once: ~50 excerpts of 64 tokens each is ~0.3 MB of Python objects per neuron.
NEURON_CHUNK = 256
# Result rows kept as Python dicts before they are packed into one typed (Arrow) frame.
ROW_CHUNK = 4096


def llm_workers(entry: Any) -> int:
    """Neurons in progress at once for an explainer / simulator: an API backend gets as many as
    it may have requests in flight (its client caps what is on the wire); the baseline and a local
    model run one neuron at a time on the calling thread."""
    return int(getattr(entry, "concurrency", 1) or 1) if getattr(entry, "backend", None) == "openai" else 1


def layer_neurons(lake, layer: int) -> list[int]:
    """The neurons with activation records in a layer (reads one column)."""
    frame = read_table(lake, "activation_records", where={"layer": str(layer)}, columns=["neuron"])
    return sorted(frame["neuron"].unique().to_list())


def record_chunks(
    lake, layer: int, neurons: list[int], chunk: int = NEURON_CHUNK, kinds: tuple[str, ...] = ("top", "random")
) -> Iterator[dict[int, NeuronRecord]]:
    """The neurons' records of the given kinds, ``chunk`` neurons per read (the table is sorted by
    neuron in row groups, so each read touches only its neurons' row groups). Explaining and
    simulating use the top and random excerpts (a plain explainer only the top ones), not the
    quantile ones: turning rows into Python objects is the largest share of an API stage's CPU
    per neuron (BENCHMARKS.md, "Where an API stage's CPU goes"), so rows nobody reads are left in
    the lake."""
    for start in range(0, len(neurons), chunk):
        part = neurons[start : start + chunk]
        rows = read_table(lake, "activation_records", where={"layer": str(layer), "neuron": part, "kind": list(kinds)})
        yield {key.neuron: record for key, record in neuron_records_from_rows(rows.iter_rows(named=True)).items()}


class RowBuffer:
    """Rows of one table for one layer, packed into typed frames every ``ROW_CHUNK`` rows (a
    frame of float32 lists takes a fraction of the memory of the same rows as Python objects)."""

    def __init__(self, table: str):
        self.table = table
        self._rows: list[dict] = []
        self._frames: list[pl.DataFrame] = []

    def add(self, row: dict) -> None:
        self._rows.append(row)
        if len(self._rows) >= ROW_CHUNK:
            self._pack()

    def add_frame(self, frame: pl.DataFrame) -> None:
        if frame.height:
            self._frames.append(frame)

    def _pack(self) -> None:
        if self._rows:
            self._frames.append(table_frame(self.table, self._rows))
            self._rows = []

    def frame(self) -> pl.DataFrame:
        self._pack()
        return pl.concat(self._frames) if self._frames else table_frame(self.table, [])


def run_by_layer(
    layers: Iterable[int],
    plan: Callable[[int], tuple[Any, Iterable[Any]]],
    work: Callable[[Any], Any],
    collect: Callable[[Any, Any, Any], None],
    flush: Callable[[int, Any], None],
    workers: int,
) -> None:
    """For each layer: ``plan(layer) -> (state, tasks)`` (tasks may be a lazy iterable), every
    task through ``work`` in a sliding window of ``workers`` across layers, each result handed to
    ``collect(state, task, result)`` (an exception is a result), and ``flush(layer, state)`` once
    the layer's last task is collected. Layers overlap only within the window: memory holds the
    states of the layers that have tasks in flight (one layer, when ``workers <= 1``).

    ``collect`` and ``flush`` run on the calling thread; ``work`` on worker threads and ``plan``
    on a prefetch thread (ahead of the window) when ``workers > 1``. When ``plan`` raises (a
    layer failing its upstream gate), no further layer is planned: the layers already planned
    finish and are flushed, then the error is raised. (Flushing on a writer thread
    instead was measured and dropped: the quality gate's Python work then competes for the GIL with
    the client's event loop, and at concurrency 256 the explanation stage kept 0.22 of the limit
    busy instead of 0.42; BENCHMARKS.md.)"""
    # layer -> [state, tasks done, tasks planned (None until the layer is fully planned)]
    open_layers: dict[int, list] = {}

    def finish(layer: int) -> None:
        state = open_layers.pop(layer)[0]
        flush(layer, state)
        del state
        release_memory(collect=workers <= 1)

    stopped: list[Exception] = []

    def tasks() -> Iterator[tuple[int, Any]]:
        # With workers > 1 this runs on a prefetch thread, ahead of the window: it only plans.
        for layer in layers:
            try:
                state, items = plan(layer)
            except Exception as exc:  # noqa: BLE001 - raised once the planned layers are done
                stopped.append(exc)
                return
            open_layers[layer] = [state, 0, None]
            del state
            planned = 0
            for item in items:
                planned += 1
                yield layer, item
            yield layer, _Planned(planned)

    def run(task: tuple[int, Any]) -> Any:
        return None if isinstance(task[1], _Planned) else work(task[1])

    for (layer, item), result in map_windowed(run, tasks(), workers, prefetch=workers > 1):
        entry = open_layers[layer]
        if isinstance(item, _Planned):
            entry[2] = item.count
        else:
            collect(entry[0], item, result)
            entry[1] += 1
        if entry[1] == entry[2]:
            finish(layer)
    if stopped:
        raise stopped[0]


class _Planned:
    """Marks the end of a layer's tasks (how many there were)."""

    def __init__(self, count: int):
        self.count = count
