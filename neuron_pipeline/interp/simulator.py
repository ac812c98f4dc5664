"""The simulator interface: an explanation and excerpt tokens in, predicted activations out."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Protocol, Sequence

from neuron_pipeline.interp.prompts import content_hash


@dataclass(frozen=True)
class SequenceSimulation:
    tokens: tuple[str, ...]
    expected_activations: tuple[float, ...]  # on the 0-10 scale of the explainer's prompt
    mode: str  # how the values were obtained, e.g. "all_at_once_logprobs", "token_lookup"


class Simulator(Protocol):
    simulator_id: str
    model_name: str

    def simulate(self, explanation: str, excerpts: Sequence[Sequence[str]]) -> list[SequenceSimulation]: ...


def make_simulator_id(kind: str, model_name: str, prompt_hash: str, params: dict) -> str:
    return f"{kind}-" + content_hash(model_name, prompt_hash, json.dumps(params, sort_keys=True, default=str))[:12]
