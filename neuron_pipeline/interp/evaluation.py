"""Measuring explainers and simulators on ground truth (the puzzles in ``interp/puzzles.py``).

- Simulator discrimination: for every puzzle, the simulator simulates the puzzle's sentences from
  the true explanation and from each false one; a pair (true, false) is won when the true
  explanation's score is higher (a tie counts half). Chance is 50 %.
- Explainer quality: the explainer sees the puzzle's sentences with their activations, writes an
  explanation, and the simulator scores it on the same sentences, next to the true explanation's
  score and the no-LLM baseline's; ``named`` says whether the explanation mentions the answer.

Pure functions over the method's interfaces: any ``Simulator`` and ``Explainer`` work.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from neuron_pipeline.interp.explainer import Explainer
from neuron_pipeline.interp.puzzles import Puzzle
from neuron_pipeline.interp.scoring import ScoredSequence, score_simulation
from neuron_pipeline.interp.simulator import Simulator


@dataclass(frozen=True)
class PuzzleScores:
    """One simulator's scores of every explanation of one puzzle (true first)."""

    puzzle: str
    kind: str
    scores: tuple[float, ...]  # undefined correlations count as 0 (the simulation said nothing)

    @property
    def pairs_won(self) -> float:
        true, *false = self.scores
        return sum(1.0 if true > f else 0.5 if true == f else 0.0 for f in false)

    @property
    def pairs(self) -> int:
        return len(self.scores) - 1


@dataclass(frozen=True)
class ExplainerTrial:
    puzzle: str
    kind: str
    explanation: str
    error: str | None
    score: float  # of the written explanation, by the simulator
    true_score: float  # of the puzzle's true explanation, by the same simulator
    named: bool  # the explanation mentions one of the puzzle's answer words


def explanation_score(simulator: Simulator, explanation: str, puzzle: Puzzle) -> float:
    """Pooled correlation of the simulation with the puzzle's activations (0 where undefined)."""
    simulated = simulator.simulate(explanation, [r.tokens for r in puzzle.records])
    scored = [ScoredSequence(r.activations, s.expected_activations) for r, s in zip(puzzle.records, simulated)]
    score = score_simulation(scored, [])
    return float(score.score) if score.score is not None else 0.0


def discrimination(simulator: Simulator, puzzles: Sequence[Puzzle]) -> list[PuzzleScores]:
    return [
        PuzzleScores(p.name, p.kind, tuple(explanation_score(simulator, e, p) for e in p.explanations)) for p in puzzles
    ]


def discrimination_rate(results: Sequence[PuzzleScores]) -> float:
    pairs = sum(r.pairs for r in results)
    return sum(r.pairs_won for r in results) / pairs if pairs else float("nan")


def names_answer(explanation: str, answer_words: Sequence[str]) -> bool:
    text = " " + re.sub(r"[\"'“”‘’`]", " ", explanation.lower()) + " "
    for answer in answer_words:
        answer = answer.lower()
        if not answer[:1].isalnum():  # punctuation answers such as "?" or ","
            if answer in explanation:
                return True
        elif re.search(r"(?<![a-z])" + re.escape(answer) + r"(?![a-z])", text):
            return True
    return False


def explainer_trials(
    explainer: Explainer, simulator: Simulator, puzzles: Sequence[Puzzle], true_scores: Sequence[float] | None = None
) -> list[ExplainerTrial]:
    """Explain every puzzle from its sentences and score the explanation with ``simulator``."""
    explain_many = getattr(explainer, "explain_many", None)
    batches = [list(p.records) for p in puzzles]
    explanations = explain_many(batches) if explain_many else [explainer.explain(b) for b in batches]
    trials = []
    for i, (puzzle, explanation) in enumerate(zip(puzzles, explanations)):
        score = explanation_score(simulator, explanation.text, puzzle) if explanation.text else 0.0
        true_score = true_scores[i] if true_scores is not None else explanation_score(simulator, puzzle.true_explanation, puzzle)
        trials.append(
            ExplainerTrial(
                puzzle.name,
                puzzle.kind,
                explanation.text,
                explanation.error,
                score,
                true_score,
                names_answer(explanation.text, puzzle.answer_words),
            )
        )
    return trials


def mean(values: Sequence[float]) -> float:
    return float(np.mean(values)) if len(values) else float("nan")
