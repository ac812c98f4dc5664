"""The output side of a neuron for explainers: the tokens its output weights promote and suppress
(the ``neuron_output_tokens`` table), written into a prompt.

Gur-Arieh et al. (2025) found that explanations which combine what makes a neuron fire (its top
excerpts) with what it does to the output (the tokens it promotes) predict interventions better
than either alone. An output-aware explainer gets both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from neuron_pipeline.interp.prompts import content_hash, quote_token

# Tokens per direction shown to the explainer.
SHOWN_TOKENS = 10


@dataclass(frozen=True)
class OutputTokens:
    """A neuron's top promoted and suppressed tokens, strongest first."""

    promoted: tuple[str, ...]
    suppressed: tuple[str, ...] = ()

    @classmethod
    def of(cls, promoted: Sequence[str], suppressed: Sequence[str] = ()) -> "OutputTokens":
        return cls(tuple(promoted), tuple(suppressed))

    def fingerprint(self) -> str:
        return content_hash("promoted", *self.promoted[:SHOWN_TOKENS], "suppressed", *self.suppressed[:SHOWN_TOKENS])


def _quoted(tokens: Sequence[str]) -> str:
    # Quoted and escaped: leading spaces stay visible and no token can break the line.
    return ", ".join(quote_token(t) for t in tokens[:SHOWN_TOKENS]) or "(none)"


def format_output_tokens(outputs: OutputTokens) -> str:
    """Two lines for the prompt: promoted tokens, then suppressed ones."""
    return f"Promotes: {_quoted(outputs.promoted)}\nSuppresses: {_quoted(outputs.suppressed)}"
