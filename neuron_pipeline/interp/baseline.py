"""The no-LLM floor: list a neuron's characteristic tokens, then simulate by token lookup.

Every LLM explanation is reported next to this baseline, so a score says how much the LLM
adds over "this neuron fires on these tokens".
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from typing import Sequence

from neuron_pipeline.interp.explainer import Explanation, make_explainer_id
from neuron_pipeline.interp.prompts import MAX_VALUE, content_hash, max_activation_of
from neuron_pipeline.interp.records import ActivationRecord
from neuron_pipeline.interp.simulator import SequenceSimulation, make_simulator_id

BASELINE_VERSION = "token-lookup-v1"
# A token type must reach this mean share of the max activation to count as characteristic.
MIN_MEAN_FRACTION = 0.2
_PAIR = re.compile(r'("(?:[^"\\]|\\.)*")(?:\s*\((\d+(?:\.\d+)?)\))?')


def token_key(token: str) -> str:
    """Tokens match case-insensitively and regardless of surrounding whitespace."""
    return token.strip().lower()


def characteristic_tokens(records: Sequence[ActivationRecord], limit: int) -> list[tuple[str, int]]:
    """Token types with the highest mean activation (as 0-10 of the max) over the excerpts."""
    max_activation = max_activation_of(records)
    if max_activation <= 0:
        return []
    totals: dict[str, list[float]] = defaultdict(list)
    for record in records:
        for token, activation in zip(record.tokens, record.activations):
            key = token_key(token)
            if key:
                totals[key].append(max(activation, 0.0) / max_activation)
    means = {key: sum(v) / len(v) for key, v in totals.items()}
    ranked = sorted(
        ((k, m) for k, m in means.items() if m >= MIN_MEAN_FRACTION), key=lambda km: (-km[1], km[0])
    )[:limit]
    return [(key, max(1, round(MAX_VALUE * mean))) for key, mean in ranked]


def format_baseline_explanation(tokens: Sequence[tuple[str, int]]) -> str:
    if not tokens:
        return "no characteristic tokens"
    return "the tokens " + ", ".join(f"{json.dumps(t, ensure_ascii=False)} ({v})" for t, v in tokens)


def parse_token_values(explanation: str) -> dict[str, float]:
    """Quoted tokens in an explanation, with their "(value)" if given (else the top value)."""
    values: dict[str, float] = {}
    for quoted, value in _PAIR.findall(explanation):
        try:
            token = json.loads(quoted)
        except json.JSONDecodeError:
            token = quoted[1:-1]
        key = token_key(token)
        if key and key not in values:
            values[key] = min(float(value), MAX_VALUE) if value else float(MAX_VALUE)
    return values


class BaselineExplainer:
    model_name = BASELINE_VERSION

    def __init__(self, max_tokens: int = 8):
        self.max_tokens = max_tokens
        self.prompt_hash = content_hash(BASELINE_VERSION)
        self.explainer_id = make_explainer_id("baseline", BASELINE_VERSION, self.prompt_hash, {"max_tokens": max_tokens})

    def explain(self, records: Sequence[ActivationRecord]) -> Explanation:
        return Explanation(format_baseline_explanation(characteristic_tokens(records, self.max_tokens)))


class BaselineSimulator:
    model_name = BASELINE_VERSION
    mode = "token_lookup"

    def __init__(self) -> None:
        self.simulator_id = make_simulator_id("baseline", BASELINE_VERSION, content_hash(BASELINE_VERSION), {})

    def simulate(self, explanation: str, excerpts: Sequence[Sequence[str]]) -> list[SequenceSimulation]:
        lookup = parse_token_values(explanation)
        return [
            SequenceSimulation(tuple(tokens), tuple(lookup.get(token_key(t), 0.0) for t in tokens), self.mode)
            for tokens in excerpts
        ]


def baseline_score(explain: Sequence[ActivationRecord], score_top: Sequence[ActivationRecord],
                   score_random: Sequence[ActivationRecord], max_tokens: int = 8) -> float | None:
    """The baseline's score of one neuron, as the pipeline computes it: the top tokens of the
    explanation excerpts, simulated by look-up on the scoring excerpts (None where undefined)."""
    from neuron_pipeline.interp.scoring import ScoredSequence, score_simulation

    explanation = BaselineExplainer(max_tokens).explain(explain).text
    simulator = BaselineSimulator()

    def scored(records):
        simulated = simulator.simulate(explanation, [r.tokens for r in records])
        return [ScoredSequence(r.activations, s.expected_activations) for r, s in zip(records, simulated)]

    return score_simulation(scored(score_top), scored(score_random)).score


def best_and_worst(scores: dict[int, float | None], best: int, worst: int) -> list[int]:
    """The ``best`` highest- and ``worst`` lowest-scored neurons (neurons without a score are
    neither), in index order; ties go to the lower index."""
    scored = [n for n, s in scores.items() if s is not None]
    highest = sorted(scored, key=lambda n: (-scores[n], n))[:best]
    lowest = sorted(scored, key=lambda n: (scores[n], n))[:worst]
    return sorted(set(highest) | set(lowest))
