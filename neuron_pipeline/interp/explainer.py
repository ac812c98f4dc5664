"""The explainer interface: records in, a plain-language explanation out."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Protocol, Sequence

from neuron_pipeline.interp.llm_protocol import ChatModel, ChatRequest, ChatResponse, chat_all
from neuron_pipeline.interp.prompts import (
    PromptTemplate,
    PromptTemplateError,
    content_hash,
    format_highlighted,
    format_records,
    format_top_tokens,
    load_template,
    max_activation_of,
)
from neuron_pipeline.interp.outputs import OutputTokens, format_output_tokens
from neuron_pipeline.interp.records import ActivationRecord
from neuron_pipeline.interp.reporting import UNUSABLE_PREFIX, UnusableCompletion, error_text

# The paper's framing: explanations complete this sentence, and the simulator is shown it.
EXPLANATION_PREFIX = "the main thing this neuron does is find"
MAX_EXPLANATION_CHARS = 400


@dataclass(frozen=True)
class Explanation:
    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None  # set when the explainer failed; text is then empty


class Explainer(Protocol):
    explainer_id: str  # hash of (model, prompt template, parameters): a new prompt gets a new id
    model_name: str
    prompt_hash: str

    def explain(self, records: Sequence[ActivationRecord]) -> Explanation: ...


def make_explainer_id(kind: str, model_name: str, prompt_hash: str, params: dict) -> str:
    return f"{kind}-" + content_hash(model_name, prompt_hash, json.dumps(params, sort_keys=True, default=str))[:12]


def load_explainer_template(name: str, output_tokens: bool = False) -> PromptTemplate:
    """An explainer template shows the excerpts as token<TAB>value lines ({records}, explainer_v1)
    or as running text with the firing tokens marked ({highlighted}, explainer_v2 to v4), optionally with
    a summary of the strongest tokens ({top_tokens}); an output-aware one also {output_tokens}."""
    template = load_template(
        name, required=("output_tokens",) if output_tokens else (), optional=("records", "highlighted", "top_tokens")
    )
    if not {"records", "highlighted"} & set(template.placeholders):
        raise PromptTemplateError(
            f"explainer prompt template {name!r} shows no excerpts: add a {{records}} or {{highlighted}} placeholder"
        )
    return template


def render_chat(template: PromptTemplate, **values: str) -> tuple[tuple[str, str], ...]:
    """A template with ``[system]`` / ``[user]`` / ``[assistant]`` section headers -> chat messages."""
    messages: list[tuple[str, list[str]]] = []
    for line in template.render(**values).splitlines():
        header = line.strip()
        if header in ("[system]", "[user]", "[assistant]"):
            messages.append((header[1:-1], []))
        elif messages:
            messages[-1][1].append(line)
        elif line.strip():
            messages.append(("user", [line]))
    return tuple((role, "\n".join(lines).strip("\n")) for role, lines in messages)


# How a chat model that was not continuing the prompt's sentence tends to open its answer
# ("This neuron responds to ...", "Neuron C finds ..."): dropped, so what is left completes
# "the main thing this neuron does is find".
_ANSWER_LEAD = re.compile(
    r"^(?:(?:the )?main thing )?(?:(?:neuron [a-z]|this neuron|the neuron|it)\s+)?(?:does is |mainly |mostly |primarily )?"
    r"(?:finds?|fires (?:on|for)|responds to|activates (?:on|for)|is activated by|detects|looks for|picks up(?: on)?|recogni[sz]es)\b[\s:,-]*",
    re.IGNORECASE,
)
_ANSWER_LABEL = re.compile(r"^(?:[*_#>\-\s]+|(?:answer|explanation)\s*:\s*)+", re.IGNORECASE)


def _strip_lead(text: str) -> str:
    text = _ANSWER_LABEL.sub("", text).strip("*_ ").strip()
    lowered = text.lower()
    for prefix in (EXPLANATION_PREFIX, "the main thing neuron c does is find", "neuron c finds"):
        index = lowered.find(prefix)
        if index != -1 and index < 20:
            return text[index + len(prefix) :].strip()
    match = _ANSWER_LEAD.match(text)
    return text[match.end() :].strip() if match else text


def _strip_quotes(text: str) -> str:
    """Quotes around the whole answer, or left unpaired at either end; a quoted word at the end
    of the explanation ('the word "cup"') keeps its quotes."""
    for quote in "\"'`":
        inner = text[1:-1]
        if len(text) >= 2 and text[0] == text[-1] == quote and quote not in inner:
            text = inner.strip()
        if text.startswith(quote) and text.count(quote) % 2:
            text = text[1:].strip()
        if text.endswith(quote) and text.count(quote) % 2:
            text = text[:-1].strip()
    return text


def is_usable_explanation(text: str) -> bool:
    """Words, not an echo of the excerpt listing (tabs, markers) or special tokens."""
    if not re.search(r"[^\W\d_]{2,}", text):
        return False
    return "\t" not in text and "<start>" not in text and "<end>" not in text and "<|" not in text


def parse_explanation(completion: str) -> str:
    """The explanation inside a completion, whether the model continued the prompt's sentence or
    answered afresh (chat servers do not continue a trailing assistant message): the first line
    with content, without an echoed prefix or a "This neuron responds to"-style opening, wrapping
    quotes or a trailing period. Empty if nothing usable is there (garbage, an echoed listing)."""
    text = ""
    for line in completion.strip().splitlines():
        text = _strip_lead(line.strip())
        if text:  # a line that was only the echoed prefix: the answer is on the next one
            break
    if not text:
        return ""
    # One phrase: small models run on past the first sentence.
    sentence_end = re.search(r"(?<!\.)[.!?](?=\s+[A-Z]|$)", text)
    if sentence_end:
        text = text[: sentence_end.start()]
    for _ in range(2):  # quotes and a final period, in either order
        text = _strip_quotes(text.strip())
        if text.endswith(".") and not text.endswith("..."):
            text = text[:-1].rstrip()
    text = text[:MAX_EXPLANATION_CHARS]
    return text if is_usable_explanation(text) else ""


def best_of(texts: Sequence[str]) -> str:
    """First non-empty parsed explanation (the caller ranks candidates when it can score them)."""
    for text in texts:
        parsed = parse_explanation(text)
        if parsed:
            return parsed
    return ""


def explainer_placeholders(output_tokens: bool) -> tuple[str, ...]:
    """What an explainer template must hold: the excerpts, and for an output-aware explainer the
    neuron's promoted / suppressed tokens."""
    return ("records", "output_tokens") if output_tokens else ("records",)


class LLMExplainer:
    """Explains a neuron from its top excerpts with a chat model and a versioned prompt template.

    With ``output_tokens`` the prompt also shows the tokens the neuron promotes and suppresses
    (``interp/outputs.py``); such an explainer is asked with ``explain_many(batches, outputs)``."""

    def __init__(
        self,
        model: ChatModel,
        template_name: str = "explainer_v4",
        max_tokens: int = 60,
        temperature: float = 0.0,
        output_tokens: bool = False,
    ):
        self.model = model
        self.uses_output_tokens = output_tokens
        self.template = load_explainer_template(template_name, output_tokens)
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.model_name = model.model_name
        self.prompt_hash = self.template.hash
        params: dict = {"max_tokens": max_tokens, "temperature": temperature}
        if output_tokens:  # (absent otherwise, so the ids of existing explainers stay as they were)
            params["output_tokens"] = True
        self.explainer_id = make_explainer_id("llm", self.model_name, self.prompt_hash, params)

    def request(self, records: Sequence[ActivationRecord], n: int = 1, outputs: OutputTokens | None = None) -> ChatRequest:
        max_activation = max_activation_of(records)
        fill = {
            "records": lambda: format_records(records, max_activation),
            "highlighted": lambda: format_highlighted(records, max_activation),
            "top_tokens": lambda: format_top_tokens(records, max_activation),
        }
        values = {name: fill[name]() for name in self.template.placeholders if name in fill}
        if self.uses_output_tokens:
            if outputs is None:
                raise ValueError("an output-aware explainer needs the neuron's output tokens: materialize neuron_output_tokens")
            values["output_tokens"] = format_output_tokens(outputs)
        return ChatRequest(
            messages=render_chat(self.template, **values),
            max_tokens=self.max_tokens,
            temperature=self.temperature if n == 1 else max(self.temperature, 0.7),
            n=n,
            stop=("\n",),
        )

    def explain(self, records: Sequence[ActivationRecord]) -> Explanation:
        return self.explain_many([records])[0]

    def explain_many(
        self, batches: Sequence[Sequence[ActivationRecord]], outputs: Sequence[OutputTokens | None] | None = None
    ) -> list[Explanation]:
        """Explain several neurons; requests go out concurrently when the backend allows."""
        outputs = list(outputs) if outputs is not None else [None] * len(batches)
        responses = chat_all(self.model, [self.request(records, outputs=out) for records, out in zip(batches, outputs)])
        return [_to_explanation(response) for response in responses]


def _to_explanation(response: ChatResponse | Exception) -> Explanation:
    if isinstance(response, Exception):  # a call that kept failing: recorded per neuron, the run goes on
        return Explanation("", error=error_text(response))
    text = best_of(response.texts)
    error = None
    if not text:
        error = str(UnusableCompletion(response.texts[0])) if response.texts else f"{UNUSABLE_PREFIX}: no completion"
    return Explanation(text, response.prompt_tokens, response.completion_tokens, error=error)
