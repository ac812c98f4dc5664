"""Embedding scoring: an embedding model ranks a neuron's activating and non-activating excerpts
by their similarity to the explanation; the score is the AUROC of that ranking (0.5: the
explanation says nothing about which texts make the neuron fire). No LLM, so it runs on every
explanation."""

from __future__ import annotations

from typing import Protocol, Sequence

import numpy as np

from neuron_pipeline.interp.classification import (
    ClassificationMetrics,
    ScorerResult,
    ScoringSample,
    auroc,
    excerpt_text,
    make_scorer_id,
)
from neuron_pipeline.interp.records import ActivationRecord

# Tokens embedded per excerpt: the window around its strongest token, mostly before it (a causal
# model's neuron sees only what precedes). A quarter of a 64-token excerpt: about a quarter of the cost.
WINDOW = 16
AFTER_PEAK = 3


def peak_window(record: ActivationRecord, window: int = WINDOW) -> tuple[str, ...]:
    """The ``window`` tokens around the excerpt's strongest token (the same rule for every excerpt,
    activating or not, so position carries no label)."""
    if window <= 0 or len(record.tokens) <= window:
        return record.tokens
    peak = max(range(len(record.activations)), key=record.activations.__getitem__)
    end = min(len(record.tokens), max(peak + 1 + AFTER_PEAK, window))
    return record.tokens[end - window : end]


class Embedder(Protocol):
    model_name: str

    def embed(self, texts: Sequence[str]) -> np.ndarray: ...  # unit-length rows


class EmbeddingScorer:
    method = "embedding"

    def __init__(self, embedder: Embedder, sample_params: dict | None = None, window: int = WINDOW):
        self.embedder = embedder
        self.window = window
        self.model_name = embedder.model_name
        self.scorer_id = make_scorer_id(self.method, self.model_name, "", {"window": window, **(sample_params or {})})

    def text(self, record: ActivationRecord) -> str:
        return excerpt_text(peak_window(record, self.window))

    def score_many(self, items: Sequence[tuple[str, ScoringSample]], seeds: Sequence = ()) -> list[ScorerResult]:
        """All texts of all explanations embedded in one call (excerpts shared by several
        explanations of a neuron are embedded once)."""
        texts: dict[str, int] = {}
        for explanation, sample in items:
            for text in [explanation, *(self.text(r) for r, _ in sample.labelled)]:
                texts.setdefault(text, len(texts))
        vectors = self.embedder.embed(list(texts)) if texts else np.zeros((0, 1), dtype=np.float32)
        results = []
        for explanation, sample in items:
            labelled = sample.labelled
            query = vectors[texts[explanation]]
            similarities = [float(vectors[texts[self.text(r)]] @ query) for r, _ in labelled]
            labels = [y for _, y in labelled]
            area = auroc(labels, similarities) if explanation.strip() else None
            n_activating = sum(labels)
            reason = None
            if area is None:
                reason = "empty explanation" if not explanation.strip() else (
                    "no activating excerpt" if not n_activating else "no non-activating excerpt"
                )
            metrics = ClassificationMetrics(None, None, None, None, area, len(labels), n_activating, len(labels) - n_activating, reason)
            results.append(
                ScorerResult(metrics, [r.sequence_id for r, _ in labelled], labels, [None] * len(labels), similarities, calls=0)
            )
        return results
