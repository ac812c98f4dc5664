"""Scoring an explanation by how well its simulation matches the real activations."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np


@dataclass(frozen=True)
class ScoredSequence:
    """Real activations of one excerpt next to the simulator's expected values."""

    true_activations: Sequence[float]
    expected_activations: Sequence[float]

    def __post_init__(self) -> None:
        if len(self.true_activations) != len(self.expected_activations):
            raise ValueError(
                f"simulation has {len(self.expected_activations)} values for {len(self.true_activations)} tokens"
            )


@dataclass(frozen=True)
class Score:
    score: float | None  # pooled correlation over top + random excerpts: the paper's headline score
    score_top: float | None
    score_random: float | None
    rsquared: float | None
    absolute_dev_explained: float | None
    n_tokens: int
    null_reason: str | None = None


def _flatten(sequences: Sequence[ScoredSequence]) -> tuple[np.ndarray, np.ndarray]:
    if not sequences:
        return np.zeros(0), np.zeros(0)
    real = np.concatenate([np.asarray(s.true_activations, dtype=np.float64) for s in sequences])
    predicted = np.concatenate([np.asarray(s.expected_activations, dtype=np.float64) for s in sequences])
    return real, predicted


def correlation(real: np.ndarray, predicted: np.ndarray) -> float | None:
    """Pearson correlation; None when either side is constant (correlation undefined)."""
    if len(real) < 2 or np.ptp(real) == 0 or np.ptp(predicted) == 0:
        return None
    value = float(np.corrcoef(real, predicted)[0, 1])
    return value if math.isfinite(value) else None


def rsquared(real: np.ndarray, predicted: np.ndarray) -> float | None:
    """1 - mean((r - p)^2) / mean(r^2): the fraction of the signal's energy the prediction explains."""
    denominator = float(np.mean(real**2)) if len(real) else 0.0
    if denominator == 0:
        return None
    return 1.0 - float(np.mean((real - predicted) ** 2)) / denominator


def absolute_dev_explained(real: np.ndarray, predicted: np.ndarray) -> float | None:
    """1 - mean|r - p| / mean|r|."""
    denominator = float(np.mean(np.abs(real))) if len(real) else 0.0
    if denominator == 0:
        return None
    return 1.0 - float(np.mean(np.abs(real - predicted))) / denominator


def score_simulation(
    top: Sequence[ScoredSequence], random: Sequence[ScoredSequence], value_scale: float = 1.0
) -> Score:
    """Score simulated excerpts. Correlations are scale-free; ``value_scale`` maps the simulator's
    0-10 values back to activation units (max activation / 10) for rsquared and deviation explained."""
    real_all, pred_all = _flatten([*top, *random])
    real_top, pred_top = _flatten(top)
    real_random, pred_random = _flatten(random)
    score = correlation(real_all, pred_all)
    reason = None
    if score is None:
        if len(real_all) < 2:
            reason = "fewer than two scored tokens"
        elif np.ptp(real_all) == 0:
            reason = "real activations are constant"
        else:
            reason = "simulated activations are constant"
    scaled = pred_all * value_scale
    return Score(
        score=score,
        score_top=correlation(real_top, pred_top),
        score_random=correlation(real_random, pred_random),
        rsquared=rsquared(real_all, scaled),
        absolute_dev_explained=absolute_dev_explained(real_all, scaled),
        n_tokens=len(real_all),
        null_reason=reason,
    )
