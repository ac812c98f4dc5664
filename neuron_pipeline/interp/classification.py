"""What the classification scorers (detection, fuzzing, embedding) share: which excerpts are
scored, the metrics, and asking a chat model yes/no about small groups of excerpts.

Excerpts (per neuron, never one the explainer saw):

* activating: excerpt max >= ``activating_min`` x the neuron's top activation, drawn across the
  capture's activation-quantile bins (highest bin first, round robin) and then from the top
  excerpts at evenly spaced ranks, so moderate activations are judged too, not only the peak;
* non-activating: excerpts of the uniform random sample whose max stays below ``quiet_max`` x
  the top activation (the gap between the two thresholds keeps ambiguous excerpts out).

A reply must say yes or no for every excerpt of its group. One that does not is asked again
(``max_retries`` times, with the bad reply and a reminder of the format); after that the group
is recorded as failed and its excerpts are left unjudged, never guessed.
"""

from __future__ import annotations

import json
import math
import random
import re
from dataclasses import dataclass, field
from typing import Iterable, Protocol, Sequence

import numpy as np

from neuron_pipeline.interp.llm_protocol import ChatModel, ChatRequest, TokenLogprobs, chat_all
from neuron_pipeline.interp.prompts import content_hash
from neuron_pipeline.interp.records import ActivationRecord, NeuronRecord, RecordSplits

# Fractions of the neuron's top activation (stated in the README and the scorer id).
ACTIVATING_MIN = 0.4
QUIET_MAX = 0.25


# --------------------------------------------------------------------------- which excerpts


@dataclass(frozen=True)
class ScoringSample:
    """The excerpts one explanation is judged on: activating ones (label True) and quiet ones."""

    activating: tuple[ActivationRecord, ...]
    quiet: tuple[ActivationRecord, ...]
    top_activation: float = 0.0

    @property
    def labelled(self) -> list[tuple[ActivationRecord, bool]]:
        return [(r, True) for r in self.activating] + [(r, False) for r in self.quiet]


def records_seen(explainer: object, splits: RecordSplits) -> list[ActivationRecord]:
    """The records an explainer was shown (or chose its explanation with): never scored.

    An explainer may say so itself (``records_seen(splits)``); one that reads whole splits
    (best-of-n, revision) saw the held-out records too; a plain explainer saw the explain split."""
    own = getattr(explainer, "records_seen", None)
    if own is not None:
        return list(own(splits))
    if hasattr(explainer, "explain_splits"):
        return [*splits.explain, *splits.holdout_top, *splits.holdout_random]
    return list(splits.explain)


def spread(items: Sequence, k: int) -> list:
    """k items at evenly spaced positions (all of them when there are at most k)."""
    if k <= 0:
        return []
    if len(items) <= k:
        return list(items)
    return [items[math.floor(i * len(items) / k)] for i in range(k)]


def scoring_sample(
    record: NeuronRecord,
    seen: Iterable[ActivationRecord],
    n_activating: int,
    n_quiet: int,
    activating_min: float = ACTIVATING_MIN,
    quiet_max: float = QUIET_MAX,
) -> ScoringSample:
    """Activating and quiet excerpts of one neuron that no explainer saw (see the module doc)."""
    excluded = {r.sequence_id for r in seen}
    top_activation = max((r.max_activation for r in [*record.top, *record.random]), default=0.0)
    if top_activation <= 0 or not math.isfinite(top_activation):
        return ScoringSample((), (), top_activation)
    used: set[int] = set(excluded)

    def fresh(candidates: Iterable[ActivationRecord]) -> list[ActivationRecord]:
        out = []
        for r in candidates:
            if r.sequence_id not in used:
                used.add(r.sequence_id)
                out.append(r)
        return out

    activating_floor = activating_min * top_activation
    bins = [
        [r for r in record.quantile[b] if r.max_activation >= activating_floor]
        for b in sorted(record.quantile, reverse=True)
    ]
    round_robin = [b[i] for i in range(max((len(b) for b in bins), default=0)) for b in bins if i < len(b)]
    from_bins = fresh(round_robin)[:n_activating]
    top = [r for r in record.top if r.max_activation >= activating_floor and r.sequence_id not in used]
    from_top = fresh(spread(top, n_activating - len(from_bins)))
    quiet = fresh(r for r in record.random if r.max_activation < quiet_max * top_activation)[:n_quiet]
    return ScoringSample(tuple(from_bins + from_top), tuple(quiet), top_activation)


# --------------------------------------------------------------------------- metrics


@dataclass(frozen=True)
class ClassificationMetrics:
    balanced_accuracy: float | None
    f1: float | None
    precision: float | None
    recall: float | None
    auroc: float | None
    n_judged: int  # excerpts with a prediction
    n_activating: int  # of those, activating ones
    n_quiet: int
    null_reason: str | None = None  # why balanced_accuracy is null, when it is


def auroc(labels: Sequence[bool], scores: Sequence[float]) -> float | None:
    """Area under the ROC curve: the chance that a random positive outranks a random negative
    (ties count half). None without both classes."""
    positives = [s for s, y in zip(scores, labels) if y]
    negatives = [s for s, y in zip(scores, labels) if not y]
    if not positives or not negatives:
        return None
    pos = np.asarray(positives, dtype=np.float64)[:, None]
    neg = np.asarray(negatives, dtype=np.float64)[None, :]
    return float(((pos > neg).sum() + 0.5 * (pos == neg).sum()) / (pos.size * neg.size))


def classification_metrics(
    labels: Sequence[bool], predictions: Sequence[bool | None], probabilities: Sequence[float | None] | None = None
) -> ClassificationMetrics:
    """Metrics over the judged excerpts (prediction not None). AUROC needs a probability for every
    judged excerpt; precision is None with no positive prediction."""
    judged = [(bool(y), bool(p), None if probabilities is None else probabilities[i]) for i, (y, p) in enumerate(zip(labels, predictions)) if p is not None]
    tp = sum(1 for y, p, _ in judged if y and p)
    fp = sum(1 for y, p, _ in judged if not y and p)
    fn = sum(1 for y, p, _ in judged if y and not p)
    tn = sum(1 for y, p, _ in judged if not y and not p)
    positives, negatives = tp + fn, fp + tn
    reason = None
    if not judged:
        reason = "no excerpt judged"
    elif not positives:
        reason = "no activating excerpt judged"
    elif not negatives:
        reason = "no non-activating excerpt judged"
    recall = tp / positives if positives else None
    specificity = tn / negatives if negatives else None
    balanced = (recall + specificity) / 2 if recall is not None and specificity is not None else None
    precision = tp / (tp + fp) if tp + fp else None
    f1 = 2 * tp / (2 * tp + fp + fn) if positives else None
    probs = [q for _, _, q in judged]
    area = None
    if judged and all(q is not None and math.isfinite(q) for q in probs):
        area = auroc([y for y, _, _ in judged], probs)  # type: ignore[arg-type]
    return ClassificationMetrics(balanced, f1, precision, recall, area, len(judged), positives, negatives, reason)


# --------------------------------------------------------------------------- results


@dataclass
class ScorerResult:
    """One explanation's judgements by one scorer, excerpt by excerpt, and what they cost."""

    metrics: ClassificationMetrics
    sequence_ids: list[int] = field(default_factory=list)
    labels: list[bool] = field(default_factory=list)
    predictions: list[bool | None] = field(default_factory=list)  # None: not judged (failed group)
    probabilities: list[float | None] = field(default_factory=list)  # p(yes) or a similarity
    prompt_tokens: int = 0
    completion_tokens: int = 0
    calls: int = 0
    failed_groups: int = 0
    error: str | None = None  # every group failed: why (first failure)


def result_from(
    items: Sequence[tuple[int, bool]],
    predictions: Sequence[bool | None],
    probabilities: Sequence[float | None],
    **cost,
) -> ScorerResult:
    labels = [y for _, y in items]
    metrics = classification_metrics(labels, predictions, probabilities)
    return ScorerResult(metrics, [s for s, _ in items], labels, list(predictions), list(probabilities), **cost)


# --------------------------------------------------------------------------- yes/no groups

_ANSWER = re.compile(r"(?im)^[^\S\n]*(?:[*#>-]+[^\S\n]*)?(?:excerpt|example|text)?[^\S\n]*(\d+)[^\S\n]*[:.)\-=][^\S\n]*\**[^\S\n]*(yes|no)\b")
RETRY_MESSAGE = (
    "That reply did not answer every excerpt. Answer again with exactly {n} lines, one per excerpt, "
    "each the excerpt number, a colon and yes or no, like:\n{example}"
)


class MalformedAnswer(ValueError):
    pass


def parse_yes_no(text: str, n: int) -> dict[int, tuple[bool, int]]:
    """Excerpt number (1..n) -> (answer, character offset of the yes/no word). Raises
    ``MalformedAnswer`` unless every excerpt got exactly one answer (numbers beyond n are
    ignored; two different answers for one excerpt are malformed)."""
    answers: dict[int, tuple[bool, int]] = {}
    for match in _ANSWER.finditer(text):
        number = int(match.group(1))
        if not 1 <= number <= n:
            continue
        answer = match.group(2).lower() == "yes"
        if number in answers and answers[number][0] != answer:
            raise MalformedAnswer(f"two answers for excerpt {number}")
        answers.setdefault(number, (answer, match.start(2)))
    missing = [i for i in range(1, n + 1) if i not in answers]
    if missing:
        raise MalformedAnswer(f"no yes/no for excerpt(s) {', '.join(map(str, missing))}")
    return answers


def _parse_with_prefill(text: str, prefill: str, n: int) -> tuple[dict[int, tuple[bool, int]], int]:
    """Parse the prefill and its continuation, else the reply alone; returns the answers and the
    length of the prefill their offsets include."""
    if prefill:
        try:
            return parse_yes_no(prefill + text, n), len(prefill)
        except MalformedAnswer:
            pass
    return parse_yes_no(text, n), 0


def yes_probability(logprobs: Sequence[TokenLogprobs], offset: int) -> float | None:
    """p(yes) / (p(yes) + p(no)) at the generated token holding the character ``offset``, from its
    top alternatives; None when neither word is among them."""
    position = 0
    for token in logprobs:
        end = position + len(token.token)
        if position <= offset < end or (offset < position and token.token.strip()):
            candidates = {**token.top, token.token: token.logprob}
            yes = sum(math.exp(lp) for t, lp in candidates.items() if t.strip().strip(":").lower() == "yes")
            no = sum(math.exp(lp) for t, lp in candidates.items() if t.strip().strip(":").lower() == "no")
            return yes / (yes + no) if yes + no > 0 else None
        position = end
    return None


def answer_format(n: int) -> str:
    return "\n".join(f"{i}: {'yes' if i % 2 else 'no'}" for i in range(1, n + 1))


@dataclass
class _Group:
    owner: int  # index of the explanation being scored
    items: list[int]  # indices into the owner's excerpt list
    messages: tuple[tuple[str, str], ...]
    attempts: int = 0
    answers: dict[int, tuple[bool, float | None]] | None = None
    failure: str | None = None


def judge_groups(
    model: ChatModel,
    group_messages: Sequence[tuple[int, list[int], tuple[tuple[str, str], ...]]],
    max_retries: int,
    top_logprobs: int,
    max_tokens_per_item: int = 8,
) -> tuple[list["_Group"], dict[int, dict[str, int]]]:
    """Ask every group at once (``chat_all``: concurrent or batched where the backend can), then
    ask the malformed ones again, up to ``max_retries`` times. Returns the groups with their
    answers (or failure) and, per owner, the tokens and calls spent."""
    groups = [_Group(owner, items, messages) for owner, items, messages in group_messages]
    cost: dict[int, dict[str, int]] = {}
    pending = list(groups)
    while pending:
        requests = [
            ChatRequest(
                messages=g.messages,
                max_tokens=max_tokens_per_item * len(g.items) + 8,
                temperature=0.0,
                top_logprobs=top_logprobs,
            )
            for g in pending
        ]
        responses = chat_all(model, requests)
        retry = []
        for group, response in zip(pending, responses):
            group.attempts += 1
            spent = cost.setdefault(group.owner, {"prompt_tokens": 0, "completion_tokens": 0, "calls": 0})
            spent["calls"] += 1
            if isinstance(response, Exception):
                group.failure = f"{type(response).__name__}: {str(response).splitlines()[0][:200] if str(response) else ''}"
                continue  # the backend already retried transient faults
            spent["prompt_tokens"] += response.prompt_tokens
            spent["completion_tokens"] += response.completion_tokens
            text = response.texts[0] if response.texts else ""
            # A template may end in an assistant prefill ("1:"): a local model continues it, an API
            # model may answer from the start; either reading is accepted.
            prefill = group.messages[-1][1] if group.messages[-1][0] == "assistant" else ""
            try:
                parsed, shift = _parse_with_prefill(text, prefill, len(group.items))
            except MalformedAnswer as exc:
                group.failure = f"malformed answer ({exc}): {text[:120]!r}"
                if group.attempts <= max_retries:
                    n = len(group.items)
                    head = group.messages[:-1] if prefill else group.messages
                    said = text if text.lstrip().startswith("1") else prefill + text
                    group.messages = head + (
                        ("assistant", said.strip() or "(no answer)"),
                        ("user", RETRY_MESSAGE.format(n=n, example=answer_format(n))),
                    ) + ((("assistant", prefill),) if prefill else ())
                    retry.append(group)
                continue
            logprobs = response.logprobs[0] if response.logprobs else ()
            group.answers = {
                number: (answer, yes_probability(logprobs, offset - shift) if logprobs else None)
                for number, (answer, offset) in parsed.items()
            }
            group.failure = None
        pending = retry
    return groups, cost


def shuffled_groups(n_items: int, group_size: int, seed_parts: Sequence) -> list[list[int]]:
    """Item indices shuffled with a seed from ``seed_parts`` (same neuron -> same order), cut into
    groups of at most ``group_size``."""
    rng = random.Random(content_hash(*(str(p) for p in seed_parts)))
    order = list(range(n_items))
    rng.shuffle(order)
    return [order[i : i + group_size] for i in range(0, len(order), group_size)]


def collect(
    n_owners: int,
    owner_items: Sequence[Sequence[tuple[int, bool]]],
    groups: Sequence["_Group"],
    cost: dict[int, dict[str, int]],
    probability_available: bool,
) -> list[ScorerResult]:
    """Per owner: predictions in excerpt order (None where its group failed) and the metrics."""
    results = []
    for owner in range(n_owners):
        items = owner_items[owner]
        predictions: list[bool | None] = [None] * len(items)
        probabilities: list[float | None] = [None] * len(items)
        failures = []
        own_groups = [g for g in groups if g.owner == owner]
        for group in own_groups:
            if group.answers is None:
                failures.append(group.failure or "no answer")
                continue
            for position, item in enumerate(group.items, start=1):
                answer, probability = group.answers[position]
                predictions[item] = answer
                probabilities[item] = probability if probability_available else None
        spent = cost.get(owner, {"prompt_tokens": 0, "completion_tokens": 0, "calls": 0})
        error = f"every group failed: {failures[0]}" if own_groups and len(failures) == len(own_groups) else None
        results.append(result_from(items, predictions, probabilities, failed_groups=len(failures), error=error, **spent))
    return results


def excerpt_text(tokens: Sequence[str]) -> str:
    """An excerpt as one line of text (line breaks shown as the visible escape ``\\n``)."""
    return "".join(tokens).replace("\r", "").replace("\n", "\\n").strip()


def make_scorer_id(method: str, model_name: str, prompt_hash: str, params: dict) -> str:
    return f"{method}-" + content_hash(model_name, prompt_hash, json.dumps(params, sort_keys=True, default=str))[:12]


class ClassificationScorer(Protocol):
    """What the asset needs from a scorer (detection, fuzzing, embedding)."""

    method: str
    scorer_id: str
    model_name: str

    def score_many(self, items: Sequence[tuple[str, ScoringSample]], seeds: Sequence = ()) -> list[ScorerResult]:
        """Score (explanation, excerpts) pairs; ``seeds`` fix each one's shuffle (same neuron, same order)."""
        ...
