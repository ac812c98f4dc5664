"""Streaming capture of MLP-neuron activations: statistics and excerpt samples in one pass.

For every requested layer, one forward pass over the corpus keeps, per neuron:

* running statistics (count, mean, variance by Chan's merge, max, min, fraction > 0);
* the ``top_k`` excerpts with the highest max activation;
* a uniform random sample of ``random_k`` excerpts;
* a uniform sample of excerpt maxima (for quantile-bin boundaries) and a smaller uniform
  candidate pool from which ``per_quantile_bin`` excerpts per bin are picked at the end.

Uniform samples are "bottom-k sketches": each (layer, neuron, sequence) gets a fixed
pseudo-random 64-bit key and the k smallest keys are kept: a uniform sample without
replacement, deterministic for a seed. The keys do not depend on activations, so the members
are computed before the pass and each batch just copies its members' excerpts in; only the
top-k is merged batch by batch (a bounded sort of the entering candidates). Ties are broken by
sequence id, so the result equals a brute-force sort of the whole corpus. Memory is
O(neurons x records x sequence length), independent of the corpus size; the forward pass stops
after the deepest requested layer. The per-batch work is kept to a few passes over the
activations (see BENCHMARKS.md: capture costs a few percent of the forward pass).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import numpy as np
import torch

from neuron_pipeline.config import RecordsSettings

_MASK64 = (1 << 64) - 1
_SALT_RANDOM = 1
_SALT_QUANTILE = 2
# Candidates kept per quantile bin and per wanted record, so that each bin can be filled.
_QUANTILE_OVERSAMPLE = 4
# Keys hashed at once when planning the uniform samples (2 MiB of int64: stays in cache).
_KEY_CHUNK = 1 << 18
_SEQUENCE_CHUNK = 1024
_INT64_MAX = torch.iinfo(torch.int64).max


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
    """SplitMix64 finalizer on int64 tensors (wrapping arithmetic); returns a new tensor."""
    x = x + _GOLDEN
    x ^= _shr(x, 30)
    x *= _MIX1
    x ^= _shr(x, 27)
    x *= _MIX2
    x ^= _shr(x, 31)
    return x


def _neuron_keys(seed: int, salt: int, layer: int, neurons: torch.Tensor) -> torch.Tensor:
    """Per-(layer, neuron) part of the sample key: [len(neurons)]."""
    base = mix64(torch.tensor([seed * 4 + salt], dtype=torch.int64, device=neurons.device))
    return mix64(neurons.to(torch.int64) + mix64(base + layer))


def sample_keys(seed: int, salt: int, layer: int, neurons: torch.Tensor, sequence_ids: torch.Tensor) -> torch.Tensor:
    """Pseudo-random int64 key per (sequence, neuron): [len(sequence_ids), len(neurons)]."""
    per_neuron = _neuron_keys(seed, salt, layer, neurons)
    return mix64(sequence_ids.to(torch.int64)[:, None] + per_neuron[None, :])


def bottom_k_members(
    seed: int, salt: int, layer: int, neurons: torch.Tensor, n_sequences: int, k: int, ordered: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per neuron, the ``k`` sequences with the smallest keys: (ids, keys), each
    [len(neurons), min(k, n_sequences)].
    The first ``ordered`` (default: all) are in key order, the rest in no particular order.

    The keys depend only on (seed, layer, neuron, sequence id), so a uniform sample's members are
    known before any activation is seen. Neurons are independent: they are done in blocks, and
    each block's keys a chunk of sequences at a time, small enough to stay in cache whatever the
    corpus size; after the first chunk only keys under the current k-th smallest are merged.
    Keys of one neuron never tie (SplitMix64 is a bijection), so no tie-breaking is needed.
    """
    n = len(neurons)
    device = neurons.device
    take = min(k, n_sequences)
    ordered = take if ordered is None else min(ordered, take)
    ids_out = torch.empty((n, take), dtype=torch.int64, device=device)
    keys_out = torch.empty((n, take), dtype=torch.int64, device=device)
    if take == 0 or n == 0:
        return ids_out, keys_out
    per_neuron = _neuron_keys(seed, salt, layer, neurons)[:, None]
    chunk = min(n_sequences, max(4 * take, _SEQUENCE_CHUNK))
    block = max(1, _KEY_CHUNK // chunk)
    for first in range(0, n, block):
        salts = per_neuron[first : first + block]
        best_keys = best_ids = None
        for lo in range(0, n_sequences, chunk):
            ids = torch.arange(lo, min(lo + chunk, n_sequences), dtype=torch.int64, device=device)
            keys = mix64(salts + ids[None, :])  # [block, c]
            ids = ids[None, :].expand(len(salts), -1)
            if best_keys is not None:
                m = int((keys < best_keys.amax(1, keepdim=True)).sum(1).max().item())
                if m == 0:
                    continue
                entering = torch.topk(keys, m, dim=1, largest=False, sorted=False).indices
                keys = torch.cat([best_keys, keys.gather(1, entering)], 1)
                ids = torch.cat([best_ids, ids.gather(1, entering)], 1)
            if keys.shape[1] > take:
                best = torch.topk(keys, take, dim=1, largest=False, sorted=False).indices
                keys, ids = keys.gather(1, best), ids.gather(1, best)
            best_keys, best_ids = keys, ids
        if ordered == take:
            order = torch.sort(best_keys, dim=1).indices
        else:  # the smallest `ordered` first, in order; then the others as they are
            head = torch.topk(best_keys, ordered, dim=1, largest=False, sorted=True).indices
            rest = torch.ones_like(best_keys, dtype=torch.bool).scatter_(1, head, False)
            order = torch.cat([head, rest.nonzero()[:, 1].view(len(salts), take - ordered)], 1)
        rows = slice(first, first + len(salts))
        ids_out[rows], keys_out[rows] = best_ids.gather(1, order), best_keys.gather(1, order)
    return ids_out, keys_out


class _TopReservoir:
    """The k excerpts with the largest max activation per neuron, merged batch by batch.

    Keys (-max) and a rank -> physical-slot map are kept neuron-major ([N, k]) so every sort runs
    along a contiguous axis; payloads sit in fixed slots ([N, k, T]: an excerpt is one contiguous
    row) and are never re-sorted: an entering excerpt is copied once into the slot of the one it
    evicts. Ties in max activation keep the lower sequence id (stable sorts, batches in id order).
    """

    def __init__(self, k: int, n: int, seq_len: int, device, dtype: torch.dtype = torch.float32):
        self.k = k
        self.keys = torch.full((n, k), torch.inf, dtype=torch.float32, device=device)
        self.slot = torch.arange(k, device=device)[None, :].expand(n, k).contiguous()
        self.sequence_id = torch.full((n, k), -1, dtype=torch.int64, device=device)
        self.max_activation = torch.full((n, k), float("nan"), dtype=torch.float32, device=device)
        # Not zero-filled (tens of MB per layer): slots never filled are zeroed in payloads().
        self.activations = torch.empty((n, k, seq_len), dtype=dtype, device=device)

    def offer(self, activations: torch.Tensor, seq_max_t: torch.Tensor, sequence_ids: torch.Tensor) -> None:
        """activations [B, T, N]; seq_max_t [N, B] (each excerpt's max); sequence_ids [B]."""
        k = self.k
        new_keys = -seq_max_t
        # Only excerpts beating a neuron's current k-th key can enter: sort just that many.
        m = min(int((new_keys < self.keys[:, -1:]).sum(1).max().item()), new_keys.shape[1])
        if m == 0:
            return
        batch_order = torch.sort(new_keys, dim=1, stable=True).indices[:, :m]  # [N, m]
        merged = torch.cat([self.keys, new_keys.gather(1, batch_order)], 1)  # [N, k + m]
        order = torch.sort(merged, dim=1, stable=True).indices[:, :k]
        # Merging two sorted lists: candidates 0..e-1 enter, the old ranks k-e..k-1 leave.
        entrants = (order >= k).sum(1)  # [N]
        n = new_keys.shape[0]
        j = torch.arange(m, device=new_keys.device)[None, :]
        physical = self.slot.gather(1, (k - 1 - j).clamp(min=0).expand(n, m))  # freed slot for candidate j
        self.keys = merged.gather(1, order)
        self.slot = torch.cat([self.slot, physical], 1).gather(1, order)
        # Entrants as an [N, B] mask, listed excerpt-major (b, then n): the gather below then reads
        # neighbouring neurons' values from the same cache lines (neuron-major order was ~2x slower).
        entering = torch.zeros(new_keys.shape, dtype=torch.bool, device=new_keys.device)
        entering.scatter_(1, batch_order, j < entrants[:, None])
        rows, cols = entering.t().nonzero(as_tuple=True)
        if len(cols) == 0:
            return
        slot_of = torch.empty(new_keys.shape, dtype=torch.int64, device=new_keys.device).scatter_(1, batch_order, physical)
        slots = slot_of[cols, rows]
        self.sequence_id[cols, slots] = sequence_ids[rows]
        self.max_activation[cols, slots] = seq_max_t[cols, rows]
        _store_rows(self.activations, cols, slots, _excerpts(activations, rows, cols))

    def payloads(self) -> dict[str, torch.Tensor]:
        """Payloads in rank order: sequence_id / max_activation [N, k], activations [N, k, T]."""
        n, k, t = self.activations.shape
        rows = (torch.arange(n, device=self.slot.device)[:, None] * k + self.slot).view(-1)
        sequence_id = self.sequence_id.gather(1, self.slot)
        activations = self.activations.view(n * k, t).index_select(0, rows).view(n, k, t)
        activations[sequence_id < 0] = 0.0
        return {
            "sequence_id": sequence_id,
            "max_activation": self.max_activation.gather(1, self.slot),
            "activations": activations,
        }


class _PlannedSample:
    """A uniform sample whose members are known up front (``bottom_k_members``): each batch only
    copies the excerpts that belong to it, once, straight into their final rank."""

    def __init__(self, members: torch.Tensor, k: int, seq_len: int, dtype: torch.dtype = torch.float32):
        n = members.shape[0]
        # [N, k]; -1 = unused (the corpus has fewer than k sequences)
        self.sequence_id = torch.full((n, k), -1, dtype=torch.int64, device=members.device)
        self.sequence_id[:, : members.shape[1]] = members[:, :k]
        members = self.sequence_id
        self.max_activation = torch.full((n, k), float("nan"), dtype=torch.float32, device=members.device)
        self.activations = torch.empty((n, k, seq_len), dtype=dtype, device=members.device)
        self.activations[members < 0] = 0.0  # the only slots no batch fills (fewer sequences than k)
        # Every (neuron, rank) slot, ordered by the sequence that fills it, to slice per batch.
        cols, ranks = (members >= 0).nonzero(as_tuple=True)
        wanted = members[cols, ranks]
        order = torch.sort(wanted, stable=True).indices
        self._wanted, self._cols, self._ranks = wanted[order], cols[order], ranks[order]

    def offer(self, activations: torch.Tensor, seq_max_t: torch.Tensor, first_id: int) -> None:
        bounds = torch.tensor([first_id, first_id + activations.shape[0]], device=self._wanted.device)
        lo, hi = torch.searchsorted(self._wanted, bounds).tolist()
        if lo == hi:
            return
        rows = self._wanted[lo:hi] - first_id
        cols, ranks = self._cols[lo:hi], self._ranks[lo:hi]
        self.max_activation[cols, ranks] = seq_max_t[cols, rows]
        _store_rows(self.activations, cols, ranks, _excerpts(activations, rows, cols))

    def payloads(self) -> dict[str, torch.Tensor]:
        return {"sequence_id": self.sequence_id, "max_activation": self.max_activation, "activations": self.activations}


class _MaximaSample:
    """Excerpt maxima of a uniform sample (the bottom-k of the quantile keys), for quantile-bin
    boundaries. Quantiles ignore order, so each batch appends its members' maxima per neuron;
    a batch's members are the excerpts whose key is at most the neuron's k-th smallest."""

    def __init__(self, seed: int, layer: int, neurons: torch.Tensor, keys: torch.Tensor):
        """keys: [N, size], the members' keys (``bottom_k_members``)."""
        self.seed, self.layer, self.neurons = seed, layer, neurons
        n, self.size = keys.shape
        self.threshold = keys.amax(1, keepdim=True) if self.size else None  # [N, 1]
        self.maxima = torch.full((n, self.size), float("nan"), dtype=torch.float32, device=keys.device)
        self.filled = torch.zeros(n, dtype=torch.int64, device=keys.device)

    def offer(self, seq_max_t: torch.Tensor, sequence_ids: torch.Tensor) -> None:
        if self.threshold is None:
            return
        keys = sample_keys(self.seed, _SALT_QUANTILE, self.layer, self.neurons, sequence_ids).t()  # [N, B]
        member = keys <= self.threshold
        cols, rows = member.nonzero(as_tuple=True)
        if len(cols) == 0:
            return
        position = self.filled[cols] + (member.cumsum(1) - 1)[cols, rows]
        self.maxima[cols, position] = seq_max_t[cols, rows]
        self.filled += member.sum(1)

    def values(self) -> torch.Tensor:
        """[N, size]: every member's maximum (NaN only if a batch was missed)."""
        return self.maxima[:, : self.size]


def _excerpts(activations: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """activations[rows[i], :, cols[i]] for every i: [E, T]. (Strided reads of just these beat
    transposing the batch first, even when half the excerpts are wanted.)"""
    return activations[rows, :, cols]


def _store_rows(payload: torch.Tensor, cols: torch.Tensor, slots: torch.Tensor, rows: torch.Tensor) -> None:
    """payload[cols[i], slots[i]] = rows[i] for a [N, k, T] payload (index_copy_ on the flat view
    is several times faster than advanced-index assignment)."""
    n, k, t = payload.shape
    payload.view(n * k, t).index_copy_(0, cols * k + slots, rows.to(payload.dtype))


class Scratch:
    """One reusable buffer for the per-batch temporaries of every layer's statistics. A fresh
    [tokens, neurons] tensor per op is a fresh mapping from the allocator at this size, and
    first-touching its pages cost more than the op itself (measured: ~6 ms vs ~0.5 ms per op
    for a SmolLM2 batch); the accumulators run one after another, so they can share it."""

    def __init__(self):
        self._buffer: torch.Tensor | None = None

    def like(self, x: torch.Tensor) -> torch.Tensor:
        """An uninitialised tensor of x's shape, dtype and device (valid until the next call)."""
        n = x.numel()
        if self._buffer is None or self._buffer.numel() < n or self._buffer.dtype != x.dtype or self._buffer.device != x.device:
            self._buffer = torch.empty(n, dtype=x.dtype, device=x.device)
        return self._buffer[:n].view(x.shape)


def _column_sums(x: torch.Tensor) -> torch.Tensor:
    """x.sum(0) for a [rows, N] float32 matrix; on the CPU as a matrix-vector product, which runs
    ~10x faster there than torch's reduction over the leading axis."""
    if x.device.type == "cpu":
        return torch.ones(1, x.shape[0], dtype=x.dtype) @ x
    return x.sum(0, keepdim=True)


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

    ``n_sequences`` is the corpus size: the uniform samples' members are planned from it. Batches
    must arrive in sequence-id order as consecutive ranges (as ``capture_layers`` feeds them).
    The float64 running mean and variance live on the CPU when the device is Apple's MPS,
    which has no float64.
    """

    def __init__(
        self, layer: int, neurons: torch.Tensor, seq_len: int, records: RecordsSettings, device, n_sequences: int,
        scratch: Scratch | None = None, activation_dtype: torch.dtype = torch.float32,
    ):
        device = torch.device(device)
        self.scratch = scratch or Scratch()
        self.layer = layer
        self.neurons = neurons.to(device)
        self.records = records
        self.n_sequences = n_sequences
        n = len(neurons)
        self.count = 0
        self.next_id = 0
        self.stats_device = torch.device("cpu") if device.type == "mps" else device
        self.mean = torch.zeros(n, dtype=torch.float64, device=self.stats_device)
        self.m2 = torch.zeros(n, dtype=torch.float64, device=self.stats_device)
        self.max = torch.full((n,), -torch.inf, device=device)
        self.min = torch.full((n,), torch.inf, device=device)
        self.positive = torch.zeros(n, dtype=torch.int64, device=device)
        seed = records.seed
        self.activation_dtype = activation_dtype
        self.top = _TopReservoir(records.top_k, n, seq_len, device, activation_dtype)
        random_members, _ = bottom_k_members(seed, _SALT_RANDOM, layer, self.neurons, n_sequences, records.random_k)
        self.random = _PlannedSample(random_members, records.random_k, seq_len, activation_dtype)
        self.quantile_candidates = self.quantile_sample = None
        if records.quantile_bins:
            n_candidates = records.quantile_bins * records.per_quantile_bin * _QUANTILE_OVERSAMPLE
            # The maxima sample and the candidates share keys: candidates are its first members.
            members, keys = bottom_k_members(
                seed, _SALT_QUANTILE, layer, self.neurons, n_sequences, max(records.quantile_sample_size, n_candidates),
                ordered=n_candidates,
            )
            self.quantile_sample = _MaximaSample(seed, layer, self.neurons, keys)
            self.quantile_candidates = _PlannedSample(members, n_candidates, seq_len, activation_dtype)

    def update(self, activations: torch.Tensor, sequence_ids: torch.Tensor) -> None:
        """activations: [B, T, N] float32 for the selected neurons; sequence_ids: [B], the next
        consecutive ids of the corpus."""
        batch, seq_len, _ = activations.shape
        first = int(sequence_ids[0])
        if first != self.next_id or int(sequence_ids[-1]) != first + batch - 1 or first + batch > self.n_sequences:
            raise ValueError(
                f"batches must cover sequences 0..{self.n_sequences - 1} in order: got ids "
                f"{first}..{int(sequence_ids[-1])} after {self.next_id - 1}"
            )
        self.next_id = first + batch
        flat = activations.reshape(batch * seq_len, -1)
        # Chan et al.'s parallel merge: batch mean and sum of squared deviations (two-pass, in
        # float32 within the batch), merged into the running float64 moments.
        batch_count = flat.shape[0]
        mean32 = _column_sums(flat) / batch_count  # [1, N]
        work = self.scratch.like(flat)
        batch_m2 = _column_sums(torch.sub(flat, mean32, out=work).square_())[0].to(self.stats_device).double()
        batch_mean = mean32[0].to(self.stats_device).double()
        total = self.count + batch_count
        delta = batch_mean - self.mean
        self.mean = self.mean + delta * (batch_count / total)
        self.m2 = self.m2 + batch_m2 + delta**2 * (self.count * batch_count / total)
        self.count = total
        self.min = torch.minimum(self.min, flat.amin(0))
        # ceil(clamp(x, 0, 1)) is 1 for x > 0, else 0 (NaN stays NaN and fails finalize): a third
        # of the cost of summing (x > 0) or sign(x) on the CPU.
        self.positive += _column_sums(torch.clamp(flat, 0, 1, out=work).ceil_())[0].round().to(torch.int64)

        seq_max_t = activations.amax(1).t().contiguous()  # [N, B]
        self.max = torch.maximum(self.max, seq_max_t.amax(1))
        self.top.offer(activations, seq_max_t, sequence_ids.to(activations.device))
        self.random.offer(activations, seq_max_t, first)
        if self.quantile_sample is not None:
            self.quantile_sample.offer(seq_max_t, sequence_ids.to(self.neurons.device))
            self.quantile_candidates.offer(activations, seq_max_t, first)

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
        if self.next_id != self.n_sequences:
            raise ValueError(f"only sequences 0..{self.next_id - 1} of {self.n_sequences} were captured")
        variance = self.m2 / max(self.count - 1, 1)
        bins = self.records.quantile_bins
        samples = {"top": self._stored(self.top.payloads()), "random": self._stored(self.random.payloads())}
        boundaries = np.zeros((max(bins - 1, 0), len(self.neurons)), dtype=np.float32)
        if bins:
            maxima = self.quantile_sample.values()
            qs = torch.linspace(0, 1, bins + 1, dtype=torch.float64)[1:-1]
            boundaries = torch.quantile(maxima.cpu().double(), qs, dim=1).float().numpy()
            samples["quantile"] = _pick_quantile_records(
                self._stored(self.quantile_candidates.payloads()), boundaries, self.records.per_quantile_bin
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


    def _stored(self, payloads: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
        """Payloads as numpy; with a narrower storage type, each record's max_activation is the max
        of its stored values (rounding is monotonic: the ranking by exact maxima still holds)."""
        if self.activation_dtype != torch.float32:
            activations = payloads["activations"]
            if not torch.isfinite(activations).all():
                raise NonFiniteActivationsError(
                    f"layer {self.layer} has activations beyond the range of {str(self.activation_dtype).removeprefix('torch.')} "
                    "(max |activation| over 65504): set capture.activation_dtype: float32"
                )
            filled = payloads["sequence_id"] >= 0
            rounded = activations.amax(-1).float()
            payloads = {**payloads, "max_activation": torch.where(filled, rounded, payloads["max_activation"])}
        return _numpy(payloads)

    def state_bytes(self) -> dict[str, int]:
        """Bytes this layer's accumulator keeps, by part (measured on its tensors)."""
        def size(*tensors) -> int:
            return int(sum(t.numel() * t.element_size() for t in tensors if t is not None))

        parts = {
            "statistics": size(self.mean, self.m2, self.max, self.min, self.positive),
            "top": size(self.top.keys, self.top.slot, self.top.sequence_id, self.top.max_activation, self.top.activations),
            "random": _sample_bytes(self.random),
        }
        if self.quantile_sample is not None:
            parts["quantile"] = _sample_bytes(self.quantile_candidates) + size(
                self.quantile_sample.maxima, self.quantile_sample.filled, self.quantile_sample.threshold
            )
        return parts


def _sample_bytes(sample: "_PlannedSample") -> int:
    tensors = (sample.sequence_id, sample.max_activation, sample.activations, sample._wanted, sample._cols, sample._ranks)
    return int(sum(t.numel() * t.element_size() for t in tensors))


def _numpy(payloads: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """Neuron-major payloads ([N, k], [N, k, T]) as the [k, N] / [k, T, N] arrays of
    ``LayerCapture``: transposed views, no copy."""
    out = {}
    for name, tensor in payloads.items():
        array = tensor.cpu().numpy()
        out[name] = array.transpose(1, 2, 0) if array.ndim == 3 else array.T
    return out


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
    activation_dtype: torch.dtype | str = torch.float32,
) -> dict[int, LayerCapture]:
    """One forward pass over ``token_ids`` [S, T] feeding every requested layer's accumulator;
    every layer's result at once (``iter_captures`` hands them over one by one)."""
    return dict(
        iter_captures(subject, token_ids, layers, neurons, records, batch_size, progress, activation_dtype=activation_dtype)
    )


def iter_captures(
    subject,
    token_ids: np.ndarray,
    layers: Iterable[int],
    neurons: list[int],
    records: RecordsSettings,
    batch_size: int,
    progress: Callable[[int], None] | None = None,
    passes: list[list[int]] | None = None,
    activation_dtype: torch.dtype | str = torch.float32,
) -> Iterator[tuple[int, LayerCapture]]:
    """``(layer, LayerCapture)`` for every requested layer, in layer order. Each forward pass
    feeds the accumulators of its layers (``passes``: groups of layers, default one pass for
    all); after a pass each layer is finalized and handed over one at a time, its accumulator
    freed first, so the caller can write it and let it go before the next one is built."""
    layers = sorted({int(layer) for layer in layers})
    neurons = [int(n) for n in neurons]  # also accepts numpy arrays and tuples
    if len(token_ids) == 0:
        raise ValueError("the corpus has no sequences: check corpus.source")
    if not layers or layers[0] < 0 or layers[-1] >= subject.num_layers:
        raise ValueError(f"layers {layers} must be a non-empty selection of 0-{subject.num_layers - 1}")
    if not neurons or min(neurons) < 0 or max(neurons) >= subject.num_neurons:
        raise ValueError(f"neurons must be a non-empty selection of 0-{subject.num_neurons - 1}")
    groups = [sorted(group) for group in passes] if passes else [layers]
    if sorted(layer for group in groups for layer in group) != layers:
        raise ValueError(f"capture passes {groups} do not cover layers {layers} exactly once")
    for group in groups:
        accumulators = _forward_pass(
            subject, token_ids, group, neurons, records, batch_size, progress, storage_dtype(activation_dtype)
        )
        for layer in group:
            capture = accumulators.pop(layer).finalize()
            yield layer, capture
            del capture


def _forward_pass(
    subject, token_ids: np.ndarray, layers: list[int], neurons: list[int], records: RecordsSettings, batch_size: int,
    progress: Callable[[int], None] | None, activation_dtype: torch.dtype = torch.float32,
) -> dict[int, LayerAccumulator]:
    """One forward pass over the corpus, stopped after the deepest of ``layers``; returns each
    layer's filled accumulator."""
    device = subject.device
    neuron_index = torch.tensor(neurons, dtype=torch.long, device=device)
    take_all = len(neurons) == subject.num_neurons and neurons == list(range(subject.num_neurons))
    seq_len = token_ids.shape[1]
    scratch = Scratch()
    accumulators = {
        layer: LayerAccumulator(
            layer, neuron_index, seq_len, records, device, n_sequences=len(token_ids), scratch=scratch,
            activation_dtype=activation_dtype,
        )
        for layer in layers
    }
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
    return accumulators


# --------------------------------------------------------------------------- memory plan


def storage_dtype(name: torch.dtype | str) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    dtypes = {"float32": torch.float32, "float16": torch.float16}
    if name not in dtypes:
        raise ValueError(f"capture.activation_dtype {name!r} is not one of {', '.join(dtypes)}")
    return dtypes[name]


# Neurons of the accumulator built to measure a layer's kept state (every tensor is [neurons, ...]:
# the state is exactly linear in the neurons).
_MEASURE_NEURONS = 64


def layer_state_bytes(
    n_neurons: int, seq_len: int, n_sequences: int, records: RecordsSettings, activation_dtype: torch.dtype | str = torch.float32
) -> dict[str, int]:
    """Bytes one layer's capture keeps for ``n_neurons``, by part: measured on a real accumulator
    of a few neurons (on the CPU) and scaled."""
    block = min(n_neurons, _MEASURE_NEURONS)
    accumulator = LayerAccumulator(
        0, torch.arange(block), seq_len, records, "cpu", n_sequences, activation_dtype=storage_dtype(activation_dtype)
    )
    return {part: value * n_neurons // block for part, value in accumulator.state_bytes().items()}


def default_capture_memory_bytes() -> int:
    """40% of this machine's physical memory (the rest: the model, one layer downstream, others)."""
    try:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        total = 16 << 30
    return int(0.4 * total)


@dataclass
class CapturePlan:
    """How the requested layers are captured: the fewest forward passes whose kept state fits."""

    passes: list[list[int]]
    layer_bytes: dict[str, int]  # kept per layer, by part
    budget_bytes: int
    activation_dtype: str

    @property
    def bytes_per_layer(self) -> int:
        return sum(self.layer_bytes.values())

    def describe(self) -> str:
        per_layer = self.bytes_per_layer
        layers = sum(len(group) for group in self.passes)
        biggest = max(len(group) for group in self.passes)
        parts = ", ".join(f"{name} {value / 2**20:,.1f}" for name, value in self.layer_bytes.items())
        text = (
            f"capture plan: {layers} layers, {per_layer / 2**20:,.1f} MiB kept per layer ({parts} MiB; "
            f"{self.activation_dtype} activations), budget capture.max_memory_gb = {self.budget_bytes / 1e9:,.1f} GB: "
        )
        if len(self.passes) == 1:
            return text + f"one forward pass ({layers * per_layer / 2**30:,.2f} GiB)"
        ranges = ", ".join(f"{g[0]}-{g[-1]}" if len(g) > 1 else str(g[0]) for g in self.passes)
        text += f"{len(self.passes)} forward passes of at most {biggest} layers ({biggest * per_layer / 2**30:,.2f} GiB each): {ranges}"
        if biggest == 1 and 3 * per_layer > self.budget_bytes:
            text += " (one layer alone exceeds the budget: raise capture.max_memory_gb or select fewer neurons)"
        return text


def plan_capture(
    layers: Iterable[int], n_neurons: int, seq_len: int, n_sequences: int, records: RecordsSettings,
    activation_dtype: str = "float32", max_memory_gb: float | None = None,
) -> CapturePlan:
    """Split ``layers`` into the fewest contiguous forward passes whose buffers fit the budget.
    Finalizing a layer briefly takes about two more layers' worth (its payloads are copied out),
    so a pass holds at most ``budget / per_layer - 2`` layers (at least one)."""
    layers = sorted({int(layer) for layer in layers})
    parts = layer_state_bytes(n_neurons, seq_len, n_sequences, records, activation_dtype)
    per_layer = max(1, sum(parts.values()))
    budget = int(max_memory_gb * 1e9) if max_memory_gb else default_capture_memory_bytes()
    fit = max(1, budget // per_layer - 2)
    n_passes = -(-len(layers) // fit) if layers else 1
    size, extra = divmod(len(layers), n_passes)
    passes, start = [], 0
    for i in range(n_passes):
        end = start + size + (1 if i < extra else 0)
        passes.append(layers[start:end])
        start = end
    return CapturePlan([p for p in passes if p] or [layers], parts, budget, activation_dtype)
