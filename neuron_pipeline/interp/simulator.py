"""The simulator interface: an explanation and excerpt tokens in, predicted activations out."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Protocol, Sequence

import math
import re

import numpy as np

from neuron_pipeline.interp.explainer import EXPLANATION_PREFIX, render_chat
from neuron_pipeline.interp.llm_protocol import ChatModel, ChatRequest, ValueDistributionModel, chat_all
from neuron_pipeline.interp.reporting import UnusableCompletion
from neuron_pipeline.interp.prompts import END_MARKER, MAX_VALUE, START_MARKER, content_hash, escape_token, load_template

# What stands in a value slot in the all-at-once prompt: the model never sees other predictions.
SLOT_FILLER = "unknown"
VALUES = tuple(range(MAX_VALUE + 1))
# Alternatives per generated token a chat simulator asks for: OpenAI's maximum.
MAX_TOP_LOGPROBS = 20


@dataclass(frozen=True)
class SequenceSimulation:
    tokens: tuple[str, ...]
    expected_activations: tuple[float, ...]  # on the 0-10 scale of the explainer's prompt
    mode: str  # how the values were obtained, e.g. "all_at_once_logprobs", "token_lookup"
    prompt_tokens: int = 0  # what simulating this excerpt cost
    completion_tokens: int = 0
    # Mean over the excerpt's slots of the share of the value tokens' probability mass the
    # simulator saw (1.0 locally; below 1 when a top-k API dropped values); None without logprobs.
    value_mass: float | None = None


class Simulator(Protocol):
    simulator_id: str
    model_name: str

    def simulate(self, explanation: str, excerpts: Sequence[Sequence[str]]) -> list[SequenceSimulation]: ...


def make_simulator_id(kind: str, model_name: str, prompt_hash: str, params: dict) -> str:
    return f"{kind}-" + content_hash(model_name, prompt_hash, json.dumps(params, sort_keys=True, default=str))[:12]


def excerpt_suffix(tokens: Sequence[str], filler: str = SLOT_FILLER) -> tuple[str, list[int]]:
    """The excerpt as "token<TAB>filler" lines closing the prompt; returns the text and the
    character offset of every value slot (where the filler starts)."""
    parts: list[str] = []
    slots: list[int] = []
    offset = 0
    for token in tokens:
        line_head = escape_token(token) + "\t"
        slots.append(offset + len(line_head))
        line = line_head + filler + "\n"
        parts.append(line)
        offset += len(line)
    parts.append(END_MARKER + "\n")
    return "".join(parts), slots


def refill_slots(suffix: str, slots: Sequence[int], filler: str) -> tuple[str, list[int]]:
    """The same excerpt suffix with every slot's filler replaced by ``filler`` (offsets shift).

    Used where a value takes two tokens (e.g. "1","0" for 10): a second pass with the first
    token in every slot gives p(second token | first) at each slot."""
    pieces: list[str] = []
    new_slots: list[int] = []
    cursor = 0
    length = 0
    for slot in slots:
        end = suffix.index("\n", slot)
        pieces.append(suffix[cursor:slot])
        length += slot - cursor
        new_slots.append(length)
        pieces.append(filler)
        length += len(filler)
        cursor = end
    pieces.append(suffix[cursor:])
    return "".join(pieces), new_slots


def expected_values(probabilities: np.ndarray) -> np.ndarray:
    """sum(k * p(k)) over k = 0..10, with p renormalized over those eleven values."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    totals = probabilities.sum(axis=-1, keepdims=True)
    normalized = np.divide(probabilities, totals, out=np.zeros_like(probabilities), where=totals > 0)
    return normalized @ np.arange(probabilities.shape[-1], dtype=np.float64)


_VALUE_LINE = re.compile(r"^(?P<token>.*)\t\s*(?P<value>-?\d+(?:\.\d+)?)\s*$")


def parse_simulated_values(completion: str, n_tokens: int) -> tuple[list[float], int]:
    """Values from "token<TAB>value" lines of a generated simulation, in order, clipped to 0..10.
    Missing or unreadable lines count as 0. Returns (values, number of lines that parsed)."""
    values: list[float] = []
    parsed = 0
    body = completion.split(START_MARKER, 1)[-1]
    for line in body.splitlines():
        if line.strip() == END_MARKER or len(values) == n_tokens:
            break
        match = _VALUE_LINE.match(line)
        if match is None:
            continue
        values.append(min(float(MAX_VALUE), max(0.0, float(match["value"]))))
        parsed += 1
    values += [0.0] * (n_tokens - len(values))
    return values, parsed


# The value tokens a tokenizer can write at a slot: "0".."10", or "0".."9" when it writes 10 as "1","0".
VALUE_TOKENS = tuple(str(v) for v in VALUES)
DIGIT_TOKENS = tuple(str(v) for v in range(10))


_VALUE_TOKEN_SET = frozenset(VALUE_TOKENS)


def captured_value_mass(top: dict[str, float], value_tokens: Sequence[str] = VALUE_TOKENS) -> float:
    """Of the value tokens' probability mass at one position, the share a top-k answer shows
    (``top``: token -> logprob, the k alternatives listed). A value token missing from the list
    has a probability of at most the smallest one listed, and all missing ones together at most
    what the list leaves of 1; so the share returned is a lower bound, exact (1.0) when every
    value token is listed. 0.0 when no value token is listed."""
    return _slot_reading(top, _VALUE_TOKEN_SET if value_tokens is VALUE_TOKENS else frozenset(value_tokens))[1]


def _slot_reading(candidates: dict[str, float], wanted: frozenset[str]) -> tuple[float | None, float]:
    """(expected value over 0..10, captured value mass) at one value slot, in one pass over its
    alternatives (plain Python: a simulation answer has one slot per excerpt token, and numpy's
    per-call overhead on eleven numbers cost more than the arithmetic). The expected value is
    None when no alternative is a value."""
    probs = [0.0] * (MAX_VALUE + 1)
    captured, listed_sum, listed_min, present = 0.0, 0.0, math.inf, set()
    for text, logprob in candidates.items():
        p = math.exp(logprob) if logprob > -math.inf else 0.0
        listed_sum += p
        listed_min = min(listed_min, p)
        key = text.strip()
        if key.isdigit() and int(key) <= MAX_VALUE:
            probs[int(key)] += p
        if key in wanted:
            captured += p
            present.add(key)
    total = sum(probs)
    expected = sum(k * p for k, p in enumerate(probs)) / total if total > 0 else None
    missing = len(wanted - present)
    if missing == 0:
        return expected, 1.0
    if captured <= 0:
        return expected, 0.0
    unseen = min(max(0.0, 1.0 - listed_sum), missing * listed_min)
    return expected, captured / (captured + unseen)


def values_from_top_logprobs(completion_logprobs, n_tokens: int) -> list[float] | None:
    """Expected values read at each generated value token: the first token after each tab.
    None when the completion does not have one value token per excerpt token."""
    read = values_and_mass_from_top_logprobs(completion_logprobs, n_tokens)
    return None if read is None else read[0]


def values_and_mass_from_top_logprobs(completion_logprobs, n_tokens: int) -> tuple[list[float], list[float]] | None:
    """``values_from_top_logprobs`` and, per value token, the share of the value mass its top
    alternatives captured (``captured_value_mass``)."""
    expected: list[float] = []
    masses: list[float] = []
    after_tab = False
    for token in completion_logprobs:
        if after_tab:
            after_tab = False
            value, mass = _slot_reading({**token.top, token.token: token.logprob}, _VALUE_TOKEN_SET)
            if value is None:
                return None
            expected.append(value)
            masses.append(mass)
        if token.token.endswith("\t"):
            after_tab = True
    return (expected[:n_tokens], masses[:n_tokens]) if len(expected) >= n_tokens else None


def mean_value_mass(masses) -> float | None:
    """One excerpt's value mass: the mean over its slots (None when unknown)."""
    if masses is None or len(masses) == 0:
        return None
    return float(np.mean(masses))


class AllAtOnceSimulator:
    """The paper's all-at-once simulator: one forward pass per excerpt gives the distribution over
    0..10 at every value slot; the prediction is its expected value. Batching and prefix reuse are
    the backend's business (see ``neuron_pipeline.llm.local``)."""

    mode = "all_at_once_logprobs"

    def __init__(self, model: ValueDistributionModel, template_name: str = "simulator_v1"):
        self.model = model
        self.template = load_template(template_name, required=("explanation",))
        self.model_name = model.model_name
        self.simulator_id = make_simulator_id("all_at_once", self.model_name, self.template.hash, {})

    def prefix(self, explanation: str) -> str:
        return self.template.render(explanation=explanation)

    def simulate(self, explanation: str, excerpts: Sequence[Sequence[str]]) -> list[SequenceSimulation]:
        suffixes, slots = zip(*(excerpt_suffix(tokens) for tokens in excerpts)) if excerpts else ((), ())
        distributions = self.model.value_distributions(self.prefix(explanation), suffixes, slots)
        return [
            SequenceSimulation(
                tuple(tokens),
                tuple(float(v) for v in expected_values(d.probabilities)),
                self.mode,
                d.prompt_tokens,
                value_mass=mean_value_mass(d.value_mass),
            )
            for tokens, d in zip(excerpts, distributions)
        ]


def excerpt_questions(tokens: Sequence[str]) -> tuple[str, list[str]]:
    """The excerpt once, then one question per token: the token alone (JSON-quoted, so quotes,
    tabs and newlines stay on one line) and a tab; the value slot follows. A question of a few
    tokens keeps the cost near the all-at-once prompt's; the token's place is in the excerpt line
    (which occurrence is asked is not marked: EVALUATION.md shows what that costs on phrases)."""
    context = f"Excerpt: {json.dumps(''.join(tokens), ensure_ascii=False)}\n"
    return context, [f"{json.dumps(token, ensure_ascii=False)}\t" for token in tokens]


class PerTokenSimulator:
    """Asks about every token on its own: the explanation, the excerpt, then for one token the
    distribution over 0..10 in the value slot. Unlike all-at-once,
    no slot is read after many filler lines, where the value tokens lose almost all probability
    mass (DESIGN.md); the prefix and each excerpt are computed once and the questions are batched
    on top (``neuron_pipeline.llm.local.LocalLLM.question_distributions``)."""

    mode = "per_token_logprobs"

    def __init__(self, model, template_name: str = "simulator_per_token_v1"):
        self.model = model
        self.template = load_template(template_name, required=("explanation",))
        self.model_name = model.model_name
        self.simulator_id = make_simulator_id("per_token", self.model_name, self.template.hash, {})

    def prefix(self, explanation: str) -> str:
        text = explanation.strip()
        if text and text[-1] not in ".!?":
            text += "."
        return self.template.render(explanation=text)

    def simulate(self, explanation: str, excerpts: Sequence[Sequence[str]]) -> list[SequenceSimulation]:
        contexts, questions = zip(*(excerpt_questions(tokens) for tokens in excerpts)) if excerpts else ((), ())
        distributions = self.model.question_distributions(self.prefix(explanation), contexts, questions)
        return [
            SequenceSimulation(
                tuple(tokens), tuple(float(v) for v in expected_values(d.probabilities)), self.mode, d.prompt_tokens
            )
            for tokens, d in zip(excerpts, distributions)
        ]


class ChatSimulator:
    """For chat-only APIs: the model writes "token<TAB>value" lines. With ``top_logprobs`` the
    value is the expected value over the alternatives at each value token; otherwise (or when
    they are unusable) the written integer is taken as is."""

    def __init__(self, model: ChatModel, template_name: str = "simulator_v1", use_logprobs: bool = True):
        self.model = model
        self.template = load_template(template_name, required=("explanation",))
        self.use_logprobs = use_logprobs
        self.model_name = model.model_name
        self.simulator_id = make_simulator_id(
            "chat", self.model_name, self.template.hash, {"logprobs": use_logprobs}
        )

    def request(self, explanation: str, tokens: Sequence[str]) -> ChatRequest:
        listing = "\n".join(escape_token(t) for t in tokens)
        user = (
            self.template.render(explanation=explanation)
            + listing
            + f"\n{END_MARKER}\n\nRewrite the {len(tokens)} lines of neuron C above, each as the token, a tab and "
            "its activation (0-10), between <start> and <end>."
        )
        return ChatRequest(
            messages=(("user", user),),
            max_tokens=8 * len(tokens) + 16,
            temperature=0.0,
            # As many alternatives as an API gives (OpenAI's cap; the backend lowers it to its server's).
            top_logprobs=MAX_TOP_LOGPROBS if self.use_logprobs else 0,
        )

    def simulate(self, explanation: str, excerpts: Sequence[Sequence[str]]) -> list[SequenceSimulation]:
        results = []
        responses = chat_all(self.model, [self.request(explanation, tokens) for tokens in excerpts])
        for tokens, response in zip(excerpts, responses):
            if isinstance(response, Exception):
                raise response
            text = response.texts[0] if response.texts else ""
            read = None
            if self.use_logprobs and response.logprobs:
                read = values_and_mass_from_top_logprobs(response.logprobs[0], len(tokens))
            mode, mass = "chat_top_logprobs", None
            if read is None:
                values, parsed = parse_simulated_values(text, len(tokens))
                if not parsed:  # not one "token<TAB>value" line: reported as unusable, not as all zeros
                    raise UnusableCompletion(text)
                mode = "chat_integers"
            else:
                values, mass = read[0], mean_value_mass(read[1])
            results.append(
                SequenceSimulation(
                    tuple(tokens), tuple(values), mode, response.prompt_tokens, response.completion_tokens, value_mass=mass
                )
            )
        return results
