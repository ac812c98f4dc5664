"""Beyond the paper's single explanation: best-of-n sampling and one round of revision.

* Best-of-n: sample n explanations, simulate each on records the scorer never uses (the
  holdout split; the explainer's own excerpts when there is none), keep the best.
* Revision: simulate the explanation, show the explainer the excerpts it predicted worst,
  and let it rewrite the explanation once (Bills et al. found revisions help).

Both are wrappers around an ``LLMExplainer`` with their own explainer id, so variants sit side
by side in the tables and can be compared in SQL.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from neuron_pipeline.interp.explainer import Explanation, LLMExplainer, best_of, make_explainer_id, parse_explanation, render_chat
from neuron_pipeline.interp.llm_protocol import ChatRequest, chat_all
from neuron_pipeline.interp.prompts import discretize, format_records, load_template, max_activation_of
from neuron_pipeline.interp.records import ActivationRecord, RecordSplits
from neuron_pipeline.interp.reporting import UnusableCompletion, error_text
from neuron_pipeline.interp.scoring import ScoredSequence, correlation, score_simulation
from neuron_pipeline.interp.simulator import Simulator

# Excerpts shown to the explainer when it revises.
REVISION_EXCERPTS = 3


def validation_records(splits: RecordSplits) -> list[ActivationRecord]:
    """Records for choosing among explanations: never the scored ones."""
    held_out = [*splits.holdout_top, *splits.holdout_random]
    return held_out or list(splits.explain)


def simulation_score(simulator: Simulator, explanation: str, records: Sequence[ActivationRecord]) -> float:
    """Pooled correlation of the explanation's simulation on ``records`` (-1 when undefined)."""
    if not explanation or not records:
        return -1.0
    simulated = simulator.simulate(explanation, [r.tokens for r in records])
    pairs = [ScoredSequence(r.activations, s.expected_activations) for r, s in zip(records, simulated)]
    score = score_simulation(pairs, []).score
    return -1.0 if score is None else score


def worst_simulated(simulator: Simulator, explanation: str, records: Sequence[ActivationRecord], k: int) -> list[ActivationRecord]:
    """The k records whose simulation is furthest from the real activations (on the 0-10 scale)."""
    simulated = simulator.simulate(explanation, [r.tokens for r in records])
    max_activation = max_activation_of(records)
    errors = []
    for record, simulation in zip(records, simulated):
        real = np.asarray(discretize(record.activations, max_activation), dtype=float)
        errors.append(float(np.mean((real - np.asarray(simulation.expected_activations)) ** 2)))
    order = np.argsort(errors)[::-1]
    return [records[i] for i in order[:k]]


@dataclass
class RefiningExplainer:
    """An LLM explainer with best-of-n selection and/or one revision round."""

    base: LLMExplainer
    ranker: Simulator  # simulator used to compare candidate explanations
    n: int = 1
    revise: bool = False
    reviser_template: str = "reviser_v1"

    def __post_init__(self) -> None:
        self.reviser = load_template(self.reviser_template, required=("explanation", "records"))
        self.model_name = self.base.model_name
        self.uses_output_tokens = self.base.uses_output_tokens
        self.prompt_hash = self.base.prompt_hash + (f"+{self.reviser.hash}" if self.revise else "")
        self.explainer_id = make_explainer_id(
            "llm",
            self.model_name,
            self.prompt_hash,
            {
                "base": self.base.explainer_id,
                "best_of": self.n,
                "revise": self.revise,
                "ranker": getattr(self.ranker, "simulator_id", "?"),
            },
        )

    def explain(self, records: Sequence[ActivationRecord]) -> Explanation:
        return self.base.explain(records)

    def explain_splits(self, splits_list: Sequence[RecordSplits]) -> list[Explanation]:
        responses = chat_all(self.base.model, [self.base.request(s.explain, n=self.n, outputs=s.output_tokens) for s in splits_list])
        results = []
        for splits, response in zip(splits_list, responses):
            if isinstance(response, Exception):
                results.append(Explanation("", error=error_text(response)))
                continue
            prompt_tokens, completion_tokens = response.prompt_tokens, response.completion_tokens
            candidates = list(dict.fromkeys(c for c in (parse_explanation(t) for t in response.texts) if c))
            if not candidates:
                results.append(Explanation("", prompt_tokens, completion_tokens, error=str(UnusableCompletion(response.texts[0] if response.texts else ""))))
                continue
            validation = validation_records(splits)
            chosen = candidates[0]
            if len(candidates) > 1:
                chosen = max(candidates, key=lambda c: simulation_score(self.ranker, c, validation))
            if self.revise:
                worst = worst_simulated(self.ranker, chosen, validation, REVISION_EXCERPTS)
                request = ChatRequest(
                    messages=render_chat(
                        self.reviser,
                        explanation=chosen,
                        records=format_records(worst, max_activation_of(worst)),
                    ),
                    max_tokens=self.base.max_tokens,
                    temperature=0.0,
                    stop=("\n",),
                )
                [revision] = chat_all(self.base.model, [request])
                if not isinstance(revision, Exception):
                    prompt_tokens += revision.prompt_tokens
                    completion_tokens += revision.completion_tokens
                    revised = best_of(revision.texts)
                    # Keep the revision only if it simulates at least as well on the validation records.
                    if revised and simulation_score(self.ranker, revised, validation) >= simulation_score(
                        self.ranker, chosen, validation
                    ):
                        chosen = revised
            results.append(Explanation(chosen, prompt_tokens, completion_tokens))
        return results


def fit_calibration(real: np.ndarray, simulated: np.ndarray) -> tuple[float, float]:
    """Least-squares line real ~ a * simulated + b on a calibration split ((1, 0) if degenerate)."""
    real = np.asarray(real, dtype=float)
    simulated = np.asarray(simulated, dtype=float)
    if len(real) < 2 or np.ptp(simulated) == 0:
        return 1.0, 0.0
    slope, intercept = np.polyfit(simulated, real, 1)
    return float(slope), float(intercept)


__all__ = ["RefiningExplainer", "fit_calibration", "simulation_score", "validation_records", "worst_simulated", "correlation"]


class CalibratedSimulator:
    """A simulator whose values are mapped to activation units by a line fitted, per neuron, on
    a calibration split (the holdout records). The fit happens at scoring time from the stored
    ``calibration`` simulations; simulating is the base simulator's."""

    calibrate = True

    def __init__(self, base: Simulator):
        from neuron_pipeline.interp.simulator import make_simulator_id

        self.base = base
        self.model_name = base.model_name
        self.model = getattr(base, "model", None)
        self.simulator_id = make_simulator_id("calibrated", base.model_name, "", {"base": base.simulator_id})

    def simulate(self, explanation, excerpts):
        return self.base.simulate(explanation, excerpts)
