"""Fuzzing scoring (Paulo et al. 2024; EleutherAI's Delphi): activating excerpts with some tokens
marked, either the tokens the neuron really fires on or as many tokens drawn at random from the
quiet ones; a chat model says for each whether the marking fits the explanation. It tests whether
an explanation pins down *where* the neuron fires, not only which texts."""

from __future__ import annotations

import random
from typing import Sequence

from neuron_pipeline.interp.classification import (
    ACTIVATING_MIN,
    ScorerResult,
    ScoringSample,
    collect,
    judge_groups,
    make_scorer_id,
    shuffled_groups,
)
from neuron_pipeline.interp.detection import TOP_LOGPROBS
from neuron_pipeline.interp.explainer import render_chat
from neuron_pipeline.interp.llm_protocol import ChatModel
from neuron_pipeline.interp.prompts import content_hash, load_template
from neuron_pipeline.interp.records import ActivationRecord

OPEN, CLOSE = "<<", ">>"
# At most this many tokens are marked per excerpt (the strongest ones): a dense neuron would
# otherwise have half an excerpt marked.
MAX_MARKED = 5


def active_positions(record: ActivationRecord, top_activation: float, min_fraction: float = ACTIVATING_MIN) -> list[int]:
    """Token positions where the neuron fires (>= min_fraction of its top activation), strongest
    first, at most MAX_MARKED; the excerpt's strongest token when none reaches the bar."""
    floor = min_fraction * top_activation
    ranked = sorted(range(len(record.activations)), key=lambda i: -record.activations[i])
    chosen = [i for i in ranked if record.activations[i] >= floor][:MAX_MARKED]
    return sorted(chosen or ranked[:1])


def random_positions(record: ActivationRecord, count: int, avoid: Sequence[int], rng: random.Random) -> list[int]:
    """``count`` positions away from the active ones, at random."""
    candidates = [i for i in range(len(record.tokens)) if i not in set(avoid) and record.tokens[i].strip()]
    if len(candidates) < count:
        candidates = [i for i in range(len(record.tokens)) if i not in set(avoid)]
    return sorted(rng.sample(candidates, min(count, len(candidates))))


def marked_text(tokens: Sequence[str], positions: Sequence[int]) -> str:
    """The excerpt as one line with runs of marked tokens inside << >> (leading spaces stay
    outside the marks); marker characters already in the text are broken up."""
    marked = set(positions)
    out: list[str] = []
    inside = False
    for i, token in enumerate(tokens):
        text = token.replace("\r", "").replace("\n", "\\n").replace("<<", "< <").replace(">>", "> >")
        if i in marked and not inside:
            stripped = text.lstrip()
            out.append(text[: len(text) - len(stripped)] + OPEN + stripped)
            inside = True
        elif i not in marked and inside:
            out.append(CLOSE + text)
            inside = False
        else:
            out.append(text)
    if inside:
        out.append(CLOSE)
    return "".join(out).strip()


class FuzzingScorer:
    method = "fuzzing"

    def __init__(
        self,
        model: ChatModel,
        template_name: str = "fuzzing_v1",
        group_size: int = 5,
        max_retries: int = 2,
        use_logprobs: bool = True,
        sample_params: dict | None = None,
    ):
        self.model = model
        self.template = load_template(template_name, required=("explanation", "excerpts"))
        self.group_size = group_size
        self.max_retries = max_retries
        self.use_logprobs = use_logprobs
        self.model_name = model.model_name
        self.prompt_hash = self.template.hash
        self.scorer_id = make_scorer_id(
            self.method,
            self.model_name,
            self.prompt_hash,
            {"group_size": group_size, "logprobs": use_logprobs, "max_marked": MAX_MARKED, **(sample_params or {})},
        )

    def marked_excerpts(self, sample: ScoringSample, seed) -> list[tuple[ActivationRecord, bool, str]]:
        """Every other activating excerpt marked right (label True), the rest marked at random."""
        rng = random.Random(content_hash(self.method, str(seed)))
        out = []
        for index, record in enumerate(sample.activating):
            active = active_positions(record, sample.top_activation)
            if index % 2 == 0:
                out.append((record, True, marked_text(record.tokens, active)))
            else:
                out.append((record, False, marked_text(record.tokens, random_positions(record, len(active), active, rng))))
        return out

    def score_many(self, items: Sequence[tuple[str, ScoringSample]], seeds: Sequence = ()) -> list[ScorerResult]:
        owner_items, group_messages = [], []
        for owner, (explanation, sample) in enumerate(items):
            seed = seeds[owner] if owner < len(seeds) else owner
            marked = self.marked_excerpts(sample, seed)
            owner_items.append([(r.sequence_id, y) for r, y, _ in marked])
            for group in shuffled_groups(len(marked), self.group_size, (self.method, seed)):
                listing = "\n".join(f"{i}: {marked[j][2]}" for i, j in enumerate(group, start=1))
                group_messages.append((owner, group, render_chat(self.template, explanation=explanation, excerpts=listing)))
        groups, cost = judge_groups(
            self.model, group_messages, self.max_retries, TOP_LOGPROBS if self.use_logprobs else 0
        )
        return collect(len(items), owner_items, groups, cost, self.use_logprobs)
