"""Prompt building: how excerpts and activations are written for the explainer and simulator.

Activations are discretized to integers 0-10 relative to the largest activation shown
(floor(10 * max(a, 0) / max_a)); each token is one "token<TAB>value" line between start and
end markers. Tokens are escaped so corpus text can never forge a line, a value or a marker.
Prompt templates are versioned files next to this module; their content hash is stored with
every explanation.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import string
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Sequence

from neuron_pipeline.interp.records import ActivationRecord

START_MARKER = "<start>"
END_MARKER = "<end>"
MAX_VALUE = 10
# When fewer than this share of values is non-zero, the non-zero tokens are listed again.
SPARSE_FRACTION = 0.2


def discretize(activations: Sequence[float], max_activation: float) -> list[int]:
    if max_activation <= 0 or not math.isfinite(max_activation):
        return [0] * len(activations)
    return [min(MAX_VALUE, math.floor(MAX_VALUE * max(a, 0.0) / max_activation)) for a in activations]


# Characters that escaping changes (markers start with "<"). Most tokens hold none of them and are
# returned as they are: escaping every token of every excerpt was a visible share of an API stage's
# CPU per request (BENCHMARKS.md, "Where an API stage's CPU goes").
_ESCAPED = re.compile(r"[\\\t\n\r<]")
_ESCAPED_RUNNING = re.compile(r"[\\\t\n\r<>]")


def escape_token(token: str) -> str:
    """Make a token safe inside one "token<TAB>value" line.

    Backslashes are doubled first, then tab/newline/CR become ``\\t``/``\\n``/``\\r``, and a
    backslash goes inside any marker text (``<start>`` -> ``<\\start>``), so the markers never
    appear in a prompt except where the code puts them, and the escaping stays reversible.
    """
    if _ESCAPED.search(token) is None:
        return token
    escaped = token.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")
    for marker in (START_MARKER, END_MARKER):
        escaped = escaped.replace(marker, marker[0] + "\\" + marker[1:])
    return escaped


def format_record(record: ActivationRecord, max_activation: float | None) -> str:
    """One excerpt; with ``max_activation`` None, values are left out (the simulator's view)."""
    lines = [START_MARKER]
    if max_activation is None:
        lines += [escape_token(t) for t in record.tokens]
    else:
        values = discretize(record.activations, max_activation)
        lines += [f"{escape_token(t)}\t{v}" for t, v in zip(record.tokens, values)]
    lines.append(END_MARKER)
    return "\n".join(lines)


def format_records(records: Sequence[ActivationRecord], max_activation: float) -> str:
    """Excerpts for the explainer, plus the sparse-activation repeat when values are mostly zero."""
    blocks = [format_record(r, max_activation) for r in records]
    values = [v for r in records for v in discretize(r.activations, max_activation)]
    nonzero = [
        (t, v)
        for r in records
        for t, v in zip(r.tokens, discretize(r.activations, max_activation))
        if v > 0
    ]
    text = "\n".join(blocks)
    if values and nonzero and len(nonzero) / len(values) < SPARSE_FRACTION:
        repeat = "\n".join(f"{escape_token(t)}\t{v}" for t, v in nonzero)
        text += "\n\nSame activations, but with all zeros filtered out:\n" + START_MARKER + "\n" + repeat + "\n" + END_MARKER
    return text


def quote_token(token: str) -> str:
    """A token inside double quotes, escaped: leading spaces stay visible and no token can end
    the quote or break the line."""
    return '"' + escape_token(token).replace('"', '\\"') + '"'


def _escape_running_text(token: str) -> str:
    # In running text every angle bracket from the corpus is escaped, so "<<" and ">>" only ever
    # come from the highlight markers, also across token boundaries ("x<" + "<y").
    if _ESCAPED_RUNNING.search(token) is None:
        return token
    return escape_token(token).replace("<", "\\<").replace(">", "\\>")


def _highlight(token: str, value: int) -> str:
    text = _escape_running_text(token)
    if value <= 0:
        return text
    stripped = text.lstrip(" ")
    return text[: len(text) - len(stripped)] + f"<<{stripped}>>({value})"


def format_highlighted(records: Sequence[ActivationRecord], max_activation: float) -> str:
    """Excerpts as numbered lines of running text, each token where the neuron fired marked
    ``<<token>>(value)`` with its 0-10 value: compact, and read like prose by a chat model."""
    lines = []
    for number, record in enumerate(records, start=1):
        values = discretize(record.activations, max_activation)
        # Only spaces are trimmed: str.strip() would also eat separators like U+2028 that are text.
        lines.append(f"{number}. " + "".join(_highlight(t, v) for t, v in zip(record.tokens, values)).strip(" "))
    return "\n".join(lines)


def format_top_tokens(records: Sequence[ActivationRecord], max_activation: float, limit: int = 8) -> str:
    """The tokens with the highest 0-10 values in the excerpts, strongest first, with how often
    they reached it: the explainer sees at a glance which words carry the neuron."""
    best: dict[str, tuple[int, int]] = {}
    for record in records:
        for token, value in zip(record.tokens, discretize(record.activations, max_activation)):
            key = token.strip(" ")
            if value <= 0 or not key:
                continue
            top, count = best.get(key, (0, 0))
            best[key] = (value, 1) if value > top else (top, count + (value == top))
    ranked = sorted(best.items(), key=lambda kv: (-kv[1][0], -kv[1][1], kv[0]))[:limit]
    if not ranked:
        return "none"
    return ", ".join(
        f'{quote_token(token)} ({value}{f", {count} times" if count > 1 else ""})' for token, (value, count) in ranked
    )


def max_activation_of(records: Sequence[ActivationRecord]) -> float:
    return max((r.max_activation for r in records), default=0.0)


def content_hash(*parts: str) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.encode())
        digest.update(b"\x00")
    return digest.hexdigest()[:16]


class PromptTemplateError(ValueError):
    pass


@dataclass(frozen=True)
class PromptTemplate:
    name: str
    text: str
    placeholders: tuple[str, ...]  # the fields the template holds (all filled in by the code)

    @property
    def hash(self) -> str:
        return content_hash(self.name, self.text)

    def render(self, **values: str) -> str:
        return self.text.format(**values)


def load_template(name: str, required: Sequence[str], optional: Sequence[str] = ()) -> PromptTemplate:
    """Load ``prompts/<name>.txt`` and check it has every placeholder the code fills in, and no other.

    ``name`` may also be the path of a template file of one's own (it ends in ``.txt`` or holds a
    path separator); its name is then the file's stem."""
    if name.endswith(".txt") or "/" in name or os.sep in name:
        file = Path(name).expanduser()
        if not file.is_file():
            raise PromptTemplateError(f"prompt template file {name!r} not found: give the path of an existing .txt file")
        try:
            text = file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise PromptTemplateError(f"cannot read prompt template file {name!r} ({type(exc).__name__}): use a UTF-8 text file") from None
        template_name = file.stem
    else:
        path = resources.files("neuron_pipeline.interp") / "prompts" / f"{name}.txt"
        if not path.is_file():
            raise PromptTemplateError(f"prompt template {name!r} not found in neuron_pipeline/interp/prompts/")
        text = path.read_text()
        template_name = name
    try:
        found = {field for _, field, _, _ in string.Formatter().parse(text) if field is not None}
    except ValueError as exc:
        raise PromptTemplateError(f"prompt template {name!r} is not a valid template ({exc}): write literal braces as {{{{ and }}}}") from None
    missing = [p for p in required if p not in found]
    if missing:
        raise PromptTemplateError(
            f"prompt template {name!r} lacks placeholder(s) {', '.join('{' + m + '}' for m in missing)}: add them"
        )
    unknown = sorted(found - set(required) - set(optional))
    if unknown:
        raise PromptTemplateError(
            f"prompt template {name!r} has unknown placeholder(s) {', '.join('{' + u + '}' for u in unknown)}: "
            f"only {', '.join('{' + r + '}' for r in (*required, *optional))} are filled in; write literal braces as {{{{ and }}}}"
        )
    return PromptTemplate(template_name, text, tuple(p for p in (*required, *optional) if p in found))
