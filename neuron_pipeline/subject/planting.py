"""Planted neurons: a copy of a real model with chosen MLP neurons rewired to fire on known tokens.

Ground truth for the whole pipeline: capture must put the planted tokens at the top of the
neuron's excerpts, and an explainer must name them. A neuron is planted by fitting, on the
model's own MLP inputs over a corpus, a linear read-out that separates the planted tokens'
positions from all others (least squares, targets +1 / -1, classes weighted equally: the MLP has
no bias, so the read-out finds the offset direction itself), and writing it, scaled, into the
neuron's gate and up rows: act(g·x)·(u·x) is then large on the planted tokens and near zero
elsewhere. The neuron's output column is zeroed so the rest of the model is unchanged.
Llama-family models (gate/up/down projections), the bundled SmolLM2 among them.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from neuron_pipeline.subject.loading import Subject


@dataclass(frozen=True)
class Plant:
    name: str
    layer: int
    neuron: int
    tokens: tuple[str, ...]  # tokens as the tokenizer writes them, e.g. " time"
    answer_words: tuple[str, ...]  # words an explanation must mention (any of them)


# Frequent in the offline Jane Austen corpus, each a single SmolLM2 token.
DEFAULT_PLANTS: tuple[Plant, ...] = (
    Plant("time", 0, 7, (" time",), ("time",)),
    Plant("house", 0, 11, (" house",), ("house",)),
    Plant("family", 0, 19, (" sister", " brother", " mother", " father", " aunt", " uncle"),
          ("sister", "brother", "mother", "father", "aunt", "uncle", "family", "relative", "relatives")),
)  # fmt: skip
GAIN = 4.0  # read-out scale: about GAIN² on a planted token, under 0.3 elsewhere


def token_ids(tokenizer, tokens: Sequence[str]) -> list[int]:
    ids = []
    for token in tokens:
        encoded = tokenizer.encode(token, add_special_tokens=False)
        if len(encoded) != 1:
            raise ValueError(f"planted token {token!r} is {len(encoded)} tokens for this tokenizer: plant single tokens")
        ids.append(encoded[0])
    return ids


def _mlp(subject: Subject, layer: int):
    mlp = subject.layers()[layer].mlp
    if not all(hasattr(mlp, name) for name in ("gate_proj", "up_proj", "down_proj")):
        raise ValueError(f"planting needs a gated MLP (gate/up/down projections); {subject.spec.name} has none")
    return mlp


class _Reached(Exception):
    """Stops a forward pass once the wanted MLP input is captured."""


@torch.inference_mode()
def mlp_inputs(subject: Subject, layer: int, sequences: np.ndarray, batch_size: int = 16) -> torch.Tensor:
    """The (normalised) inputs of ``layer``'s MLP at every position: [sequences * length, hidden]."""
    mlp = _mlp(subject, layer)
    captured: list[torch.Tensor] = []

    def keep(module, args):
        captured.append(args[0].float().reshape(-1, args[0].shape[-1]))
        raise _Reached

    handle = mlp.register_forward_pre_hook(keep)
    try:
        for start in range(0, len(sequences), batch_size):
            try:
                subject.model.model(input_ids=torch.as_tensor(sequences[start : start + batch_size], device=subject.device))
            except _Reached:
                pass
    finally:
        handle.remove()
    return torch.cat(captured)


def fit_readout(inputs: torch.Tensor, positive: torch.Tensor, rounds: int = 3) -> torch.Tensor:
    """w with inputs @ w ≈ +1 on positive rows and -1 elsewhere, both classes weighted equally;
    then refitted with the negatives it still scores high weighted up (hard negatives, e.g. words
    of the same meaning), so the neuron stays on the planted tokens themselves."""
    x = inputs.double()
    targets = torch.where(positive, 1.0, -1.0).double()
    emphasis = torch.ones(len(x), dtype=torch.float64)
    readout = torch.zeros(x.shape[1], dtype=torch.float64)
    for _ in range(rounds):
        share = torch.where(positive, emphasis / emphasis[positive].sum(), emphasis / emphasis[~positive].sum())
        a = x * share.sqrt()[:, None]
        ridge = 1e-4 * torch.eye(x.shape[1], dtype=torch.float64) * (a**2).sum() / x.shape[1]
        readout = torch.linalg.solve(a.T @ a + ridge, a.T @ (targets * share.sqrt()))
        scores = x @ readout
        threshold = torch.quantile(scores[positive], 0.1)
        emphasis = torch.where(~positive & (scores > threshold - 1.0), emphasis * 10.0, emphasis)
    return readout.float()


@torch.no_grad()
def plant(subject: Subject, plants: Sequence[Plant], sequences: np.ndarray) -> None:
    """Rewire each planted neuron of ``subject`` in place (see the module docstring)."""
    for layer in sorted({p.layer for p in plants}):
        inputs = mlp_inputs(subject, layer, sequences)
        ids = torch.as_tensor(sequences.reshape(-1))
        mlp = _mlp(subject, layer)
        for p in (p for p in plants if p.layer == layer):
            positive = torch.isin(ids, torch.tensor(token_ids(subject.tokenizer, p.tokens)))
            if not positive.any():
                raise ValueError(f"planted tokens {p.tokens} never occur in the corpus: choose tokens that do")
            readout = fit_readout(inputs, positive).to(mlp.gate_proj.weight.dtype)
            mlp.gate_proj.weight[p.neuron] = GAIN * readout
            mlp.up_proj.weight[p.neuron] = GAIN * readout
            mlp.down_proj.weight[:, p.neuron] = 0.0


def plants_fingerprint(model_id: str, plants: Sequence[Plant], sequences: np.ndarray) -> str:
    digest = hashlib.sha256(model_id.encode())
    digest.update(json.dumps([p.__dict__ for p in plants], sort_keys=True).encode())
    digest.update(np.ascontiguousarray(sequences).tobytes())
    return digest.hexdigest()[:12]


def save_planted(subject: Subject, folder: Path) -> Path:
    """Save the rewired model as a plain transformers folder, usable as ``subject.model``."""
    partial = folder.with_name(folder.name + ".partial")
    subject.model.save_pretrained(partial)
    subject.tokenizer.save_pretrained(partial)
    os.replace(partial, folder)
    return folder
