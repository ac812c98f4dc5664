"""Detection scoring (Paulo et al. 2024; EleutherAI's Delphi): a chat model reads the explanation
and a shuffled mix of activating and non-activating excerpts, in small groups, and says for each
whether the neuron fires on it. Only a chat model is needed, no prompt logprobs; with
``top_logprobs`` the probability of "yes" also gives an AUROC."""

from __future__ import annotations

from typing import Sequence

from neuron_pipeline.interp.classification import (
    ScorerResult,
    ScoringSample,
    collect,
    excerpt_text,
    judge_groups,
    make_scorer_id,
    shuffled_groups,
)
from neuron_pipeline.interp.explainer import render_chat
from neuron_pipeline.interp.llm_protocol import ChatModel
from neuron_pipeline.interp.prompts import load_template

# Alternatives asked per generated token when probabilities are wanted.
TOP_LOGPROBS = 5


class DetectionScorer:
    method = "detection"

    def __init__(
        self,
        model: ChatModel,
        template_name: str = "detection_v1",
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
        # The excerpt choice (counts, thresholds) is part of what the score means.
        self.scorer_id = make_scorer_id(
            self.method,
            self.model_name,
            self.prompt_hash,
            {"group_size": group_size, "logprobs": use_logprobs, **(sample_params or {})},
        )

    def messages(self, explanation: str, excerpts: Sequence[Sequence[str]]) -> tuple[tuple[str, str], ...]:
        listing = "\n".join(f"{i}: {excerpt_text(tokens)}" for i, tokens in enumerate(excerpts, start=1))
        return render_chat(self.template, explanation=explanation, excerpts=listing)

    def score_many(self, items: Sequence[tuple[str, ScoringSample]], seeds: Sequence = ()) -> list[ScorerResult]:
        """Score several explanations; all their first requests go out together."""
        owner_items, group_messages = [], []
        for owner, (explanation, sample) in enumerate(items):
            labelled = sample.labelled
            owner_items.append([(r.sequence_id, y) for r, y in labelled])
            seed = seeds[owner] if owner < len(seeds) else owner
            for group in shuffled_groups(len(labelled), self.group_size, (self.method, seed)):
                excerpts = [labelled[i][0].tokens for i in group]
                group_messages.append((owner, group, self.messages(explanation, excerpts)))
        groups, cost = judge_groups(
            self.model, group_messages, self.max_retries, TOP_LOGPROBS if self.use_logprobs else 0
        )
        return collect(len(items), owner_items, groups, cost, self.use_logprobs)
