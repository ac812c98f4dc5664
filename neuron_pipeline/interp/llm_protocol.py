"""What the method needs from an LLM, as two small protocols (implemented in ``neuron_pipeline.llm``).

Keeping them here lets the explainer and simulator stay pure: they build prompts, call one of
these, and parse what comes back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, Sequence

import numpy as np


@dataclass(frozen=True)
class ChatRequest:
    messages: tuple[tuple[str, str], ...]  # (role, content) pairs
    max_tokens: int = 60
    temperature: float = 0.0
    n: int = 1  # completions wanted (best-of-n sampling)
    top_logprobs: int = 0  # alternatives per generated token, 0 for none
    seed: int = 0
    stop: tuple[str, ...] = ()  # generation ends at any of these strings


@dataclass(frozen=True)
class TokenLogprobs:
    token: str
    logprob: float
    top: dict[str, float] = field(default_factory=dict)  # alternative token -> logprob


@dataclass(frozen=True)
class ChatResponse:
    texts: tuple[str, ...]
    prompt_tokens: int = 0
    completion_tokens: int = 0
    # Per completion, per generated token; empty when the backend returned none.
    logprobs: tuple[tuple[TokenLogprobs, ...], ...] = ()


class ChatModel(Protocol):
    model_name: str

    def chat(self, request: ChatRequest) -> ChatResponse: ...


@dataclass(frozen=True)
class SlotDistributions:
    """Probabilities of the values 0..10 at each value slot of one excerpt: [slots, 11].

    ``value_mass`` [slots]: the share of the value tokens' probability mass the backend saw (1.0
    for a local model, which sees the whole vocabulary; for a top-k API, see
    ``interp.simulator.captured_value_mass``); None when unknown."""

    probabilities: np.ndarray
    prompt_tokens: int = 0
    value_mass: np.ndarray | None = None


class ValueDistributionModel(Protocol):
    """A model that exposes next-token distributions inside a prompt (local weights, or a server
    returning prompt logprobs). ``prefix`` is shared by all ``suffixes``; ``slots[i]`` are the
    character offsets in ``suffixes[i]`` where a value would be written."""

    model_name: str

    def value_distributions(
        self, prefix: str, suffixes: Sequence[str], slots: Sequence[Sequence[int]]
    ) -> list[SlotDistributions]: ...


def chat_all(model: ChatModel, requests: Sequence[ChatRequest]) -> list[ChatResponse | Exception]:
    """Send many requests: concurrently when the backend can (``chat_many``), else one by one.
    A failed request comes back as its exception, so one bad call never loses the others."""
    chat_many = getattr(model, "chat_many", None)
    if chat_many is not None:
        return list(chat_many(requests))
    results: list[ChatResponse | Exception] = []
    for request in requests:
        try:
            results.append(model.chat(request))
        except Exception as exc:  # noqa: BLE001 - reported per request by the caller
            results.append(exc)
    return results


def _normalized(text: str) -> str:
    return " ".join(text.lower().split()).rstrip(" .…")


def without_prefill(messages: Sequence[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
    """The messages for a chat server that answers a trailing assistant message with a new turn
    instead of continuing it (OpenAI; vLLM unless asked to): the prefill is never assumed to be
    continued. It moves into the prompt: dropped when the last user message already ends with it
    (explainer_v1 asks "... The main thing neuron C does is find"), else the user is asked to
    finish it. What comes back may then repeat it; ``parse_explanation`` strips it."""
    if not messages or messages[-1][0] != "assistant":
        return tuple(messages)
    prefill = messages[-1][1].strip()
    rest = list(messages[:-1])
    if not prefill:
        return tuple(rest)
    if rest and rest[-1][0] == "user":
        role, content = rest[-1]
        if not _normalized(content).endswith(_normalized(prefill)):
            rest[-1] = (role, f"{content}\n\nFinish this sentence: {prefill}")
    else:
        rest.append(("user", f"Finish this sentence: {prefill}"))
    return tuple(rest)
