"""Streaming capture of MLP-neuron activations: statistics and excerpt samples in one pass.

For every requested layer, one forward pass over the corpus keeps, per neuron:

* running statistics (count, mean, variance by Chan's merge, max, min, fraction > 0);
* the ``top_k`` excerpts with the highest max activation;
* a uniform random sample of ``random_k`` excerpts;
* a uniform sample of excerpt maxima (for quantile-bin boundaries) and a smaller uniform
  candidate pool from which ``per_quantile_bin`` excerpts per bin are picked at the end.

Uniform samples are "bottom-k sketches": each (layer, neuron, sequence) gets a fixed
pseudo-random 64-bit key and the k smallest keys are kept. This is a uniform sample without
replacement, deterministic for a seed, and mergeable batch by batch with the same bounded
sort-and-keep step as the top-k. Ties are broken by sequence id, so the result equals a
brute-force sort of the whole corpus. Memory is O(neurons x records x sequence length),
independent of the corpus size; the forward pass stops after the deepest requested layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np
import torch

from neuron_pipeline.config import RecordsSettings

_MASK64 = (1 << 64) - 1
_SALT_RANDOM = 1
_SALT_QUANTILE = 2
# Candidates kept per quantile bin and per wanted record, so that each bin can be filled.
_QUANTILE_OVERSAMPLE = 4


def _signed(value: int) -> int:
    value &= _MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


_GOLDEN = _signed(0x9E3779B97F4A7C15)
_MIX1 = _signed(0xBF58476D1CE4E5B9)
_MIX2 = _signed(0x94D049BB133111EB)


def _shr(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def mix64(x: torch.Tensor) -> torch.Tensor:
    """SplitMix64 finalizer on int64 tensors (wrapping arithmetic)."""
    x = x + _GOLDEN
    x = (x ^ _shr(x, 30)) * _MIX1
    x = (x ^ _shr(x, 27)) * _MIX2
    return x ^ _shr(x, 31)


def sample_keys(seed: int, salt: int, layer: int, neurons: torch.Tensor, sequence_ids: torch.Tensor) -> torch.Tensor:
    """Pseudo-random int64 key per (sequence, neuron): [len(sequence_ids), len(neurons)]."""
    base = mix64(torch.tensor([seed * 4 + salt], dtype=torch.int64, device=neurons.device))
    per_layer = mix64(base + layer)
    per_neuron = mix64(neurons.to(torch.int64) + per_layer)  # [N]
    return mix64(sequence_ids.to(torch.int64)[:, None] + per_neuron[None, :])


@dataclass
class _Reservoir:
    """Keeps the k rows with the smallest sort key per neuron column, with their payloads."""

    k: int
    keys: torch.Tensor  # [k, N]
    payloads: dict[str, torch.Tensor] = field(default_factory=dict)  # each [k, N] or [k, T, N]

    @classmethod
    def empty(cls, k: int, n: int, fill_key, key_dtype, payload_shapes: dict, device) -> "_Reservoir":
        keys = torch.full((k, n), fill_key, dtype=key_dtype, device=device)
        payloads = {name: torch.full(shape, fill, dtype=dtype, device=device) for name, (shape, dtype, fill) in payload_shapes.items()}
        return cls(k, keys, payloads)

    def offer(self, new_keys: torch.Tensor, new_payloads: dict[str, torch.Tensor]) -> None:
        if self.k == 0:
            return
        # Only rows that beat the current k-th key somewhere can enter: pre-select at most that
        # many per column from the batch, so the merge touches (k + m) rows instead of (k + B).
        threshold = self.keys[-1]
        entering = int((new_keys < threshold).sum(0).max().item())
        if entering == 0:
            return
        m = min(entering, new_keys.shape[0])
        batch_order = torch.sort(new_keys, dim=0, stable=True).indices[:m]  # [m, N]
        cand_keys = torch.cat([self.keys, new_keys.gather(0, batch_order)], 0)
        order = torch.sort(cand_keys, dim=0, stable=True).indices[: self.k]  # [k, N]
        self.keys = cand_keys.gather(0, order)
        for name, current in self.payloads.items():
            incoming = new_payloads[name]
            picked = incoming.gather(0, _expand_index(batch_order, incoming))
            merged = torch.cat([current, picked], 0)
            self.payloads[name] = merged.gather(0, _expand_index(order, merged))


def _expand_index(index: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Broadcast a [rows, N] row index over the middle (token) dimension of a [*, T, N] tensor."""
    if like.dim() == 2:
        return index
    return index[:, None, :].expand(index.shape[0], like.shape[1], index.shape[1])


@dataclass
class LayerCapture:
    """Everything captured for one layer, as numpy arrays indexed [..., neuron position]."""

    layer: int
    neurons: np.ndarray  # [N] neuron indices in the model
    count: int
    mean: np.ndarray
    variance: np.ndarray
    max: np.ndarray
    min: np.ndarray
    frac_positive: np.ndarray
    quantile_boundaries: np.ndarray  # [bins - 1, N]
    # name -> dict(sequence_id [k, N], max_activation [k, N], activations [k, T, N], extra)
    samples: dict[str, dict[str, np.ndarray]]


class NonFiniteActivationsError(ValueError):
    pass


class LayerAccumulator:
    """Bounded-memory per-layer state updated batch by batch (all on the model's device).

    The float64 running mean and variance live on the CPU when the device is Apple's MPS,
    which has no float64.
    """

    def __init__(self, layer: int, neurons: torch.Tensor, seq_len: int, records: RecordsSettings, device):
        device = torch.device(device)
        self.layer = layer
        self.neurons = neurons.to(device)
        self.records = records
        n = len(neurons)
        self.count = 0
        self.stats_device = torch.device("cpu") if device.type == "mps" else device
        self.mean = torch.zeros(n, dtype=torch.float64, device=self.stats_device)
        self.m2 = torch.zeros(n, dtype=torch.float64, device=self.stats_device)
        self.max = torch.full((n,), -torch.inf, device=device)
        self.min = torch.full((n,), torch.inf, device=device)
        self.positive = torch.zeros(n, dtype=torch.int64, device=device)

        def excerpt_reservoir(k: int, key_dtype, fill_key) -> _Reservoir:
            return _Reservoir.empty(
                k,
                n,
                fill_key,
                key_dtype,
                {
                    "sequence_id": ((k, n), torch.int64, -1),
                    "max_activation": ((k, n), torch.float32, float("nan")),
                    "activations": ((k, seq_len, n), torch.float32, 0.0),
                },
                device,
            )

        int_max = torch.iinfo(torch.int64).max
        self.top = excerpt_reservoir(records.top_k, torch.float32, torch.inf)  # key = -max activation
        self.random = excerpt_reservoir(records.random_k, torch.int64, int_max)
        n_candidates = records.quantile_bins * records.per_quantile_bin * _QUANTILE_OVERSAMPLE
        self.quantile_candidates = excerpt_reservoir(n_candidates, torch.int64, int_max)
        # The maxima sample shares its keys with the candidates, so candidates are a subset of it.
        self.quantile_sample = _Reservoir.empty(
            max(records.quantile_sample_size, n_candidates) if records.quantile_bins else 0,
            n,
            int_max,
            torch.int64,
            {"max_activation": ((max(records.quantile_sample_size, n_candidates), n), torch.float32, float("nan"))},
            device,
        )

    def update(self, activations: torch.Tensor, sequence_ids: torch.Tensor) -> None:
        """activations: [B, T, N] float32 for the selected neurons; sequence_ids: [B]."""
        batch, seq_len, _ = activations.shape
        flat = activations.reshape(batch * seq_len, -1)
        # Chan et al.'s parallel merge of mean and sum of squared deviations.
        batch_count = flat.shape[0]
        flat64 = flat.to(self.stats_device).to(torch.float64)
        batch_mean = flat64.mean(0)
        batch_m2 = ((flat64 - batch_mean) ** 2).sum(0)
        total = self.count + batch_count
        delta = batch_mean - self.mean
        self.mean = self.mean + delta * (batch_count / total)
        self.m2 = self.m2 + batch_m2 + delta**2 * (self.count * batch_count / total)
        self.count = total
        self.max = torch.maximum(self.max, flat.amax(0))
        self.min = torch.minimum(self.min, flat.amin(0))
        self.positive += (flat > 0).sum(0)

        seq_max = activations.amax(1)  # [B, N]
        seq_ids = sequence_ids.to(activations.device)[:, None].expand_as(seq_max)
        payload = {"sequence_id": seq_ids, "max_activation": seq_max, "activations": activations}
        self.top.offer(-seq_max, payload)
        seed = self.records.seed
        random_keys = sample_keys(seed, _SALT_RANDOM, self.layer, self.neurons, sequence_ids.to(self.neurons.device))
        self.random.offer(random_keys, payload)
        if self.records.quantile_bins:
            quantile_keys = sample_keys(seed, _SALT_QUANTILE, self.layer, self.neurons, sequence_ids.to(self.neurons.device))
            self.quantile_candidates.offer(quantile_keys, payload)
            self.quantile_sample.offer(quantile_keys, {"max_activation": seq_max})

    def finalize(self) -> LayerCapture:
        if self.count == 0:
            raise ValueError("no tokens were captured: the corpus is empty")
        stats = {
            "mean": self.mean,
            "max": self.max,
            "min": self.min,
        }
        for name, value in stats.items():
            if not torch.isfinite(value).all():
                raise NonFiniteActivationsError(
                    f"layer {self.layer} produced NaN/inf activations (non-finite {name}; fp16 overflow?): "
                    "capture with subject.dtype float32 or bfloat16"
                )
        variance = self.m2 / max(self.count - 1, 1)
        bins = self.records.quantile_bins
        samples = {
            "top": _numpy(self.top.payloads),
            "random": _numpy(self.random.payloads),
        }
        boundaries = np.zeros((max(bins - 1, 0), len(self.neurons)), dtype=np.float32)
        if bins:
            maxima = self.quantile_sample.payloads["max_activation"]
            filled = int((~torch.isnan(maxima[:, 0])).sum().item())
            if filled:
                qs = torch.linspace(0, 1, bins + 1, dtype=torch.float64)[1:-1]
                boundaries = torch.quantile(maxima[:filled].cpu().double(), qs, dim=0).float().numpy()
            samples["quantile"] = _pick_quantile_records(
                _numpy(self.quantile_candidates.payloads), boundaries, self.records.per_quantile_bin
            )
        return LayerCapture(
            layer=self.layer,
            neurons=self.neurons.cpu().numpy(),
            count=self.count,
            mean=self.mean.cpu().numpy(),
            variance=variance.cpu().numpy(),
            max=self.max.cpu().numpy(),
            min=self.min.cpu().numpy(),
            frac_positive=self.positive.cpu().double().numpy() / self.count,
            quantile_boundaries=boundaries,
            samples=samples,
        )


def _numpy(payloads: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {name: tensor.cpu().numpy() for name, tensor in payloads.items()}


def quantile_bin_of(max_activation: np.ndarray, boundaries: np.ndarray) -> np.ndarray:
    """Bin b holds maxima in (boundary[b-1], boundary[b]]: ties at a boundary go to the lower bin,
    so a sparse neuron's many all-zero excerpts land in bin 0 rather than the top bin."""
    return (max_activation[:, None, :] > boundaries[None, :, :]).sum(1) if boundaries.size else np.zeros_like(
        max_activation, dtype=np.int64
    )


def _pick_quantile_records(candidates: dict[str, np.ndarray], boundaries: np.ndarray, per_bin: int) -> dict:
    """From candidates in uniform-random order, keep the first ``per_bin`` of each quantile bin."""
    valid = candidates["sequence_id"] >= 0
    bins = quantile_bin_of(candidates["max_activation"], boundaries)
    bins = np.where(valid, bins, -1)
    n_bins = boundaries.shape[0] + 1
    keep = np.zeros_like(valid)
    rank = np.zeros(bins.shape, dtype=np.int64)
    for b in range(n_bins):
        in_bin = bins == b
        order_in_bin = np.cumsum(in_bin, axis=0) - 1
        chosen = in_bin & (order_in_bin < per_bin)
        keep |= chosen
        rank = np.where(chosen, order_in_bin, rank)
    # Candidates that were not picked look exactly like unused slots of the other samples:
    # sequence_id -1, max_activation NaN, activations 0 (and quantile_bin -1).
    out = dict(candidates)
    out["sequence_id"] = np.where(keep, candidates["sequence_id"], -1)
    out["max_activation"] = np.where(keep, candidates["max_activation"], np.float32(np.nan))
    out["activations"] = np.where(keep[:, None, :], candidates["activations"], np.float32(0))
    out["quantile_bin"] = np.where(keep, bins, -1)
    out["bin_rank"] = rank
    return out


class _StopForward(Exception):
    """Raised by the deepest layer's hook: nothing after it is needed."""


def capture_layers(
    subject,
    token_ids: np.ndarray,
    layers: Iterable[int],
    neurons: list[int],
    records: RecordsSettings,
    batch_size: int,
    progress: Callable[[int], None] | None = None,
) -> dict[int, LayerCapture]:
    """One forward pass over ``token_ids`` [S, T] feeding every requested layer's accumulator."""
    layers = sorted({int(layer) for layer in layers})
    neurons = [int(n) for n in neurons]  # also accepts numpy arrays and tuples
    if len(token_ids) == 0:
        raise ValueError("the corpus has no sequences: check corpus.source")
    if not layers or layers[0] < 0 or layers[-1] >= subject.num_layers:
        raise ValueError(f"layers {layers} must be a non-empty selection of 0-{subject.num_layers - 1}")
    if not neurons or min(neurons) < 0 or max(neurons) >= subject.num_neurons:
        raise ValueError(f"neurons must be a non-empty selection of 0-{subject.num_neurons - 1}")
    device = subject.device
    neuron_index = torch.tensor(neurons, dtype=torch.long, device=device)
    take_all = len(neurons) == subject.num_neurons and neurons == list(range(subject.num_neurons))
    seq_len = token_ids.shape[1]
    accumulators = {layer: LayerAccumulator(layer, neuron_index, seq_len, records, device) for layer in layers}
    current_ids: dict[str, torch.Tensor] = {}
    deepest = layers[-1]

    def make_hook(layer: int):
        def record(hidden: torch.Tensor) -> None:
            acts = hidden if take_all else hidden.index_select(-1, neuron_index)
            accumulators[layer].update(acts.float(), current_ids["ids"])
            if layer == deepest:
                raise _StopForward

        if subject.spec.capture == "input":
            return lambda module, args: record(args[0])
        return lambda module, args, output: record(output)

    handles = []
    try:
        for layer in layers:
            module = subject.neuron_module(layer)
            hook = make_hook(layer)
            if subject.spec.capture == "input":
                handles.append(module.register_forward_pre_hook(hook))
            else:
                handles.append(module.register_forward_hook(hook))
        with torch.inference_mode():
            for start in range(0, len(token_ids), batch_size):
                batch = torch.as_tensor(token_ids[start : start + batch_size], dtype=torch.long)
                current_ids["ids"] = torch.arange(start, start + len(batch), dtype=torch.int64)
                try:
                    subject.model(input_ids=batch.to(device), use_cache=False)
                except _StopForward:
                    pass
                if progress is not None:
                    progress(len(batch))
    finally:
        for handle in handles:
            handle.remove()
    return {layer: acc.finalize() for layer, acc in accumulators.items()}
