"""Ways to get per-neuron statistics and excerpt samples out of a model, stepped batch by batch
so the bench can interleave them (same batch, methods in rotating order).

* ``Bare``: the model forward with no capture, stopped at the same depth (a hook on the deepest
  neuron module raises, exactly where ``capture_layers`` stops).
* ``Streaming``: the project's streaming capture: the same hooks as
  ``neuron_pipeline.subject.capture.capture_layers`` feeding ``LayerAccumulator``; the bench
  smoke test checks that this driver returns what ``capture_layers`` returns.
* ``CacheAll``: TransformerLens-style ``run_with_cache``: hooks store every layer's full
  [tokens x neurons] activations for the whole corpus (stopping at the same depth, like
  ``run_with_cache(stop_at_layer=...)``); at the end, per layer, one sort over the whole corpus
  (the project's selection code run once on everything: same top-k / random / quantile records).
* ``HiddenStates``: the common Hugging Face recipe: ``model(..., output_hidden_states=True)``
  (full forward, logits included) with forward hooks that keep a copy of every layer's neuron
  activations; concatenated and sorted at the end like ``CacheAll``.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from neuron_pipeline.config import RecordsSettings
from neuron_pipeline.subject.capture import LayerAccumulator, LayerCapture


class _Stop(Exception):
    pass


def _register(subject, layer: int, fn: Callable[[torch.Tensor], None]):
    module = subject.neuron_module(layer)
    if subject.spec.capture == "input":
        return module.register_forward_pre_hook(lambda m, args: fn(args[0]))
    return module.register_forward_hook(lambda m, args, output: fn(output))


class Method:
    name = "method"

    def __init__(self, subject, layers: list[int], neurons: list[int], records: RecordsSettings, n_seq: int, seq_len: int):
        self.subject = subject
        self.layers = sorted(layers)
        self.deepest = self.layers[-1]
        self.neurons = neurons
        self.records = records
        self.n_seq = n_seq
        self.seq_len = seq_len
        self.take_all = neurons == list(range(subject.num_neurons))
        self.neuron_index = torch.tensor(neurons, dtype=torch.long)

    def select(self, hidden: torch.Tensor) -> torch.Tensor:
        return (hidden if self.take_all else hidden.index_select(-1, self.neuron_index)).float()

    def setup(self) -> None:
        pass

    def step(self, batch: torch.Tensor, start: int) -> None:
        raise NotImplementedError

    def finish(self) -> dict[int, LayerCapture] | None:
        return None

    def state_bytes(self) -> int:
        return 0

    def _forward_with_hooks(
        self, batch: torch.Tensor, on_layer: Callable[[int, torch.Tensor], None], layers: list[int] | None = None
    ) -> None:
        """Forward ``batch`` with ``on_layer`` called at each of ``layers`` (default: all measured
        ones), stopping at the deepest measured layer as ``capture_layers`` does."""

        def make(layer):
            def fn(hidden):
                on_layer(layer, hidden)
                if layer == self.deepest:
                    raise _Stop

            return fn

        handles = [_register(self.subject, layer, make(layer)) for layer in (self.layers if layers is None else layers)]
        try:
            with torch.inference_mode():
                self.subject.model(input_ids=batch, use_cache=False)
        except _Stop:
            pass
        finally:
            for handle in handles:
                handle.remove()


class Bare(Method):
    name = "bare forward"

    def step(self, batch, start):
        self._forward_with_hooks(batch, lambda layer, hidden: None, layers=[self.deepest])


class Streaming(Method):
    name = "streaming capture (project)"

    def setup(self):
        self.accs = {
            layer: LayerAccumulator(layer, self.neuron_index, self.seq_len, self.records, torch.device("cpu"), self.n_seq)
            for layer in self.layers
        }

    def step(self, batch, start):
        ids = torch.arange(start, start + len(batch), dtype=torch.int64)
        self._forward_with_hooks(batch, lambda layer, hidden: self.accs[layer].update(self.select(hidden), ids))

    def finish(self):
        return {layer: acc.finalize() for layer, acc in self.accs.items()}

    def state_bytes(self) -> int:
        total = 0
        for acc in self.accs.values():
            for value in vars(acc).values():
                total += _tensor_bytes(value)
        return total


def _tensor_bytes(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.nbytes
    if isinstance(value, dict):
        return sum(_tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(v) for v in value)
    if hasattr(value, "__dict__") and not isinstance(value, (torch.nn.Module, RecordsSettings)):
        return sum(_tensor_bytes(v) for v in vars(value).values())
    return 0


def records_from_full(layer: int, acts: torch.Tensor, neuron_index: torch.Tensor, records: RecordsSettings) -> LayerCapture:
    """Brute force over a whole cached layer [S, T, N]: one selection over every sequence
    (the project's selection code, called once, so tie-breaking and sampling are identical)."""
    acc = LayerAccumulator(layer, neuron_index, acts.shape[1], records, torch.device("cpu"), acts.shape[0])
    acc.update(acts, torch.arange(acts.shape[0], dtype=torch.int64))
    return acc.finalize()


class CacheAll(Method):
    name = "cache all + sort (TransformerLens-style)"

    def setup(self):
        n = len(self.neurons)
        # Preallocated and touched now, so the memory shows up when the cache is created.
        self.cache = {layer: torch.zeros(self.n_seq, self.seq_len, n) for layer in self.layers}

    def step(self, batch, start):
        def keep(layer, hidden):
            self.cache[layer][start : start + len(batch)] = self.select(hidden)

        self._forward_with_hooks(batch, keep)

    def finish(self):
        out = {}
        for layer in self.layers:
            out[layer] = records_from_full(layer, self.cache[layer], self.neuron_index, self.records)
        return out

    def state_bytes(self) -> int:
        return sum(t.nbytes for t in self.cache.values())


class HiddenStates(Method):
    name = "output_hidden_states + hooks (HF-style)"

    def setup(self):
        self.kept: dict[int, list[torch.Tensor]] = {layer: [] for layer in self.layers}

    def step(self, batch, start):
        def keep(layer, hidden):
            self.kept[layer].append(self.select(hidden).clone())

        handles = [_register(self.subject, layer, lambda h, l=layer: keep(l, h)) for layer in self.layers]
        try:
            with torch.inference_mode():
                out = self.subject.model(input_ids=batch, use_cache=False, output_hidden_states=True)
                del out
        finally:
            for handle in handles:
                handle.remove()

    def finish(self):
        out = {}
        for layer in self.layers:
            full = torch.cat(self.kept[layer], 0)
            self.kept[layer] = [full]
            out[layer] = records_from_full(layer, full, self.neuron_index, self.records)
        return out

    def state_bytes(self) -> int:
        return sum(t.nbytes for chunks in self.kept.values() for t in chunks)


def compare_captures(a: dict[int, LayerCapture], b: dict[int, LayerCapture], stats_rtol: float = 1e-5) -> list[str]:
    """Differences between two capture results (empty when they agree): records exactly, stats to rtol."""
    problems = []
    if sorted(a) != sorted(b):
        return [f"layers {sorted(a)} != {sorted(b)}"]
    for layer in a:
        x, y = a[layer], b[layer]
        for name in ("count",):
            if getattr(x, name) != getattr(y, name):
                problems.append(f"layer {layer} {name}")
        for name in ("mean", "variance", "max", "min", "frac_positive", "quantile_boundaries"):
            u, v = getattr(x, name), getattr(y, name)
            if not np.allclose(u, v, rtol=stats_rtol, atol=1e-6):
                problems.append(f"layer {layer} {name}: max abs diff {np.abs(u - v).max():.3g}")
        for kind in x.samples:
            for field_name, value in x.samples[kind].items():
                other = y.samples.get(kind, {}).get(field_name)
                if other is None or not np.array_equal(value, other, equal_nan=True):
                    problems.append(f"layer {layer} {kind}.{field_name} differs")
    return problems
