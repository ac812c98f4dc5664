"""Activation records: the excerpts a neuron is explained and scored on, and their splits."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterable, Mapping, Sequence, TypeVar

if TYPE_CHECKING:
    from neuron_pipeline.interp.outputs import OutputTokens

T = TypeVar("T")


@dataclass(frozen=True)
class ActivationRecord:
    """One excerpt: its tokens and the neuron's activation at each of them."""

    tokens: tuple[str, ...]
    activations: tuple[float, ...]
    sequence_id: int = -1

    def __post_init__(self) -> None:
        if len(self.tokens) != len(self.activations):
            raise ValueError(f"{len(self.tokens)} tokens but {len(self.activations)} activations")

    @property
    def max_activation(self) -> float:
        return max(self.activations) if self.activations else 0.0


@dataclass(frozen=True)
class NeuronId:
    layer: int
    neuron: int


@dataclass
class NeuronRecord:
    """Everything captured for one neuron: top excerpts (rank order), a random sample, quantile bins."""

    neuron: NeuronId
    top: list[ActivationRecord] = field(default_factory=list)
    random: list[ActivationRecord] = field(default_factory=list)
    quantile: dict[int, list[ActivationRecord]] = field(default_factory=dict)


@dataclass(frozen=True)
class RecordSplits:
    """Disjoint uses of a neuron's records: the scorer never sees what the explainer saw."""

    explain: list[ActivationRecord]
    score_top: list[ActivationRecord]
    score_random: list[ActivationRecord]
    # Left-over records, for calibration or choosing among candidate explanations.
    holdout_top: list[ActivationRecord]
    holdout_random: list[ActivationRecord]
    # What the neuron writes to the output, for output-aware explainers (None for the others).
    output_tokens: "OutputTokens | None" = None


def interleaved_splits(items: Sequence[T], n_splits: int) -> list[list[T]]:
    """Item i goes to split i mod n, so each split spans the whole range of ranks."""
    return [list(items[i::n_splits]) for i in range(n_splits)]


def top_split_count(n_top: int, explain_top: int, score_top: int) -> int:
    """Interleaved splits of the top records: each holds enough for explaining and for scoring."""
    return max(2, n_top // max(explain_top, score_top, 1))


def split_records(
    record: NeuronRecord, explain_top: int, score_top: int, score_random: int
) -> RecordSplits:
    """Split 0 of the interleaved top records explains, split 1 scores, the rest is held out.

    The split count is sized by the larger of ``explain_top`` and ``score_top``, so a configuration
    with more scored than explained excerpts still scores ``score_top`` of them. With very few
    records, split 1 is topped up by split-0 records the explainer did not see.
    """
    n_top = len(record.top)
    top_splits = interleaved_splits(range(n_top), top_split_count(n_top, explain_top, score_top))
    explain = top_splits[0][:explain_top]
    unseen = top_splits[0][explain_top:]
    score = top_splits[1][:score_top]
    score = sorted(score + unseen[: score_top - len(score)])
    used = set(explain) | set(score)
    holdout = [i for i in range(n_top) if i not in used]
    random_splits = interleaved_splits(record.random, max(1, len(record.random) // max(score_random, 1)))
    return RecordSplits(
        explain=[record.top[i] for i in explain],
        score_top=[record.top[i] for i in score],
        score_random=random_splits[0][:score_random],
        holdout_top=[record.top[i] for i in holdout],
        holdout_random=random_splits[0][score_random:] + [r for split in random_splits[1:] for r in split],
    )


def neuron_records_from_rows(rows: Iterable[Mapping]) -> dict[NeuronId, NeuronRecord]:
    """Group activation_records rows (dicts with layer, neuron, kind, rank, ...) by neuron."""
    grouped: dict[NeuronId, dict[str, list[tuple[int, int, ActivationRecord]]]] = {}
    for row in rows:
        key = NeuronId(int(row["layer"]), int(row["neuron"]))
        record = ActivationRecord(tuple(row["tokens"]), tuple(map(float, row["activations"])), int(row["sequence_id"]))
        bin_index = row.get("quantile_bin")
        grouped.setdefault(key, {}).setdefault(row["kind"], []).append(
            (int(bin_index) if bin_index is not None else -1, int(row["rank"]), record)
        )
    result = {}
    for key, kinds in grouped.items():
        quantile: dict[int, list[ActivationRecord]] = {}
        for bin_index, _, rec in sorted(kinds.get("quantile", []), key=lambda t: (t[0], t[1])):
            quantile.setdefault(bin_index, []).append(rec)
        result[key] = NeuronRecord(
            neuron=key,
            top=[r for _, _, r in sorted(kinds.get("top", []), key=lambda t: t[1])],
            random=[r for _, _, r in sorted(kinds.get("random", []), key=lambda t: t[1])],
            quantile=quantile,
        )
    return result
