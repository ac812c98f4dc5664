"""The explainer interface: records in, a plain-language explanation out."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Protocol, Sequence

from neuron_pipeline.interp.prompts import content_hash
from neuron_pipeline.interp.records import ActivationRecord


@dataclass(frozen=True)
class Explanation:
    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None  # set when the explainer failed; text is then empty


class Explainer(Protocol):
    explainer_id: str  # hash of (model, prompt template, parameters): a new prompt gets a new id
    model_name: str
    prompt_hash: str

    def explain(self, records: Sequence[ActivationRecord]) -> Explanation: ...


def make_explainer_id(kind: str, model_name: str, prompt_hash: str, params: dict) -> str:
    return f"{kind}-" + content_hash(model_name, prompt_hash, json.dumps(params, sort_keys=True, default=str))[:12]
