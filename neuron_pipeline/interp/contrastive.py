"""Contrastive explanations (as in EleutherAI's Delphi): the explainer sees the top excerpts and
also excerpts where the neuron stays quiet, hard negatives first (quiet excerpts holding the
tokens the neuron peaks on), so an explanation has to name what separates them instead of
describing whatever is common in text.

The quiet excerpts come from the held-out part of the random sample (never the scored random
split), and the explainer reports them in ``records_seen`` so no scorer judges them.
"""

from __future__ import annotations

from typing import Sequence

from neuron_pipeline.interp.baseline import characteristic_tokens, token_key
from neuron_pipeline.interp.classification import QUIET_MAX, excerpt_text
from neuron_pipeline.interp.explainer import Explanation, _to_explanation, make_explainer_id, render_chat
from neuron_pipeline.interp.llm_protocol import ChatModel, ChatRequest, chat_all
from neuron_pipeline.interp.prompts import format_records, load_template, max_activation_of
from neuron_pipeline.interp.records import ActivationRecord, RecordSplits

DEFAULT_TEMPLATE = "explainer_contrastive_v1"


def peak_tokens(records: Sequence[ActivationRecord], limit: int = 8) -> set[str]:
    """The tokens a neuron peaks on: each excerpt's strongest token and its characteristic tokens."""
    keys = {token_key(r.tokens[max(range(len(r.tokens)), key=r.activations.__getitem__)]) for r in records if r.tokens}
    keys |= {key for key, _ in characteristic_tokens(records, limit)}
    return {k for k in keys if k}


def quiet_excerpts(
    splits: RecordSplits, count: int, quiet_max: float = QUIET_MAX
) -> tuple[list[ActivationRecord], int]:
    """Up to ``count`` held-out random excerpts where the neuron stays below ``quiet_max`` of its
    top activation, hard negatives first. Returns them and how many are hard negatives."""
    top = max_activation_of(splits.explain)
    if count <= 0 or top <= 0:
        return [], 0
    quiet = [r for r in splits.holdout_random if r.max_activation < quiet_max * top]
    peaks = peak_tokens(splits.explain)
    hard = [r for r in quiet if any(token_key(t) in peaks for t in r.tokens)]
    easy = [r for r in quiet if r not in hard]
    chosen = (hard + easy)[:count]
    return chosen, min(len(hard), count)


class ContrastiveExplainer:
    """An LLM explainer shown top excerpts and quiet ones; its own prompt file and explainer id."""

    def __init__(
        self,
        model: ChatModel,
        template_name: str = DEFAULT_TEMPLATE,
        max_tokens: int = 60,
        temperature: float = 0.0,
        negatives: int = 4,
    ):
        self.model = model
        self.template = load_template(template_name, required=("records", "negatives"))
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.n_negatives = negatives
        self.model_name = model.model_name
        self.prompt_hash = self.template.hash
        self.explainer_id = make_explainer_id(
            "contrastive",
            self.model_name,
            self.prompt_hash,
            {"max_tokens": max_tokens, "temperature": temperature, "negatives": negatives, "quiet_max": QUIET_MAX},
        )

    def records_seen(self, splits: RecordSplits) -> list[ActivationRecord]:
        return [*splits.explain, *quiet_excerpts(splits, self.n_negatives)[0]]

    def request(self, splits: RecordSplits) -> ChatRequest:
        negatives, _ = quiet_excerpts(splits, self.n_negatives)
        listing = "\n".join(f"{i}: {excerpt_text(r.tokens)}" for i, r in enumerate(negatives, start=1)) or "(none found)"
        return ChatRequest(
            messages=render_chat(
                self.template,
                records=format_records(splits.explain, max_activation_of(splits.explain)),
                negatives=listing,
            ),
            max_tokens=self.max_tokens,
            temperature=self.temperature,
            stop=("\n",),
        )

    def explain(self, records: Sequence[ActivationRecord]) -> Explanation:
        """Without splits there are no quiet excerpts to show: top excerpts only."""
        return self.explain_splits([RecordSplits(list(records), [], [], [], [])])[0]

    def explain_splits(self, splits_list: Sequence[RecordSplits]) -> list[Explanation]:
        responses = chat_all(self.model, [self.request(s) for s in splits_list])
        return [_to_explanation(response) for response in responses]
