"""How results and failures read to people: labels for explainers and simulators, which
(explainer, simulator) pairs mean something, and how an error is worded and classified.

Ids stay hashes (a new prompt or parameter gets a new id, old rows stay queryable); the label is
what a person reads next to them: model, prompt version and variant, e.g.
``smollm2-135m-instruct · explainer_v1 · best of 4 + revision`` or
``qwen2.5-coder-1.5b · simulator_v1 · all-at-once · calibrated``. Labels are derived here, in
one place, from the explainer / simulator objects, and stored with the rows (``explainer_label``,
``simulator_label``) so SQL users see them too.
"""

from __future__ import annotations

from pathlib import PurePath
from typing import Any

SEPARATOR = " · "
BASELINE_PREFIX = "baseline-"
# Explanation errors that mean "the model answered, but nothing usable was in it" (as opposed to a
# call that failed): counted apart in the failure reports.
UNUSABLE_PREFIX = "unusable completion"

# How each simulator class produces its values, for the label.
_SIMULATOR_MODES = {
    "AllAtOnceSimulator": "all-at-once",
    "PerTokenSimulator": "per-token",
    "BaselineSimulator": "token look-up",
}


def is_baseline_id(identifier: str | None) -> bool:
    return bool(identifier) and str(identifier).startswith(BASELINE_PREFIX)


def pair_is_meaningful(explainer_id: str, simulator_id: str) -> bool:
    """The baseline (token look-up) simulator reads only the quoted tokens of the baseline
    explainer's explanations: a prose explanation simulated by it scores noise. LLM simulators
    simulate every explanation."""
    return not is_baseline_id(simulator_id) or is_baseline_id(explainer_id)


class UnusableCompletion(ValueError):
    """The model answered, but nothing usable was in the answer (its message starts with
    ``UNUSABLE_PREFIX``)."""

    def __init__(self, text: str):
        super().__init__(f"{UNUSABLE_PREFIX}: {text[:200]!r}")


def is_unusable(error: str | None) -> bool:
    return bool(error) and error.startswith(UNUSABLE_PREFIX)


def error_text(exc: BaseException) -> str:
    """One line for a failed call, as stored in an ``error`` column: "Kind: message"."""
    if isinstance(exc, UnusableCompletion):
        return str(exc)
    message = str(exc).splitlines()[0][:300] if str(exc) else ""
    return f"{type(exc).__name__}: {message}"


def short_model_name(name: str | None) -> str:
    """A model name as people say it: a path becomes its last part (without ``.gguf``)."""
    if not name:
        return "?"
    text = str(name).rstrip("/\\")
    if "/" in text or "\\" in text:
        if text.startswith(("/", "~", ".")) or "\\" in text or text.endswith(".gguf"):
            text = PurePath(text.replace("\\", "/")).name
    return text.removesuffix(".gguf")


def _template_name(obj: Any) -> str | None:
    template = getattr(obj, "template", None)
    return getattr(template, "name", None)


def explainer_label(explainer: Any) -> str:
    """``model · prompt · variant`` of an explainer object (baseline, LLM, best-of-n / revision)."""
    if type(explainer).__name__ == "BaselineExplainer":
        return f"baseline{SEPARATOR}top tokens ({getattr(explainer, 'max_tokens', '?')})"
    base = getattr(explainer, "base", None)
    core = base if base is not None and hasattr(base, "model_name") else explainer
    parts = [short_model_name(getattr(core, "model_name", None))]
    template = _template_name(core)
    if template:
        parts.append(template)
    temperature = getattr(core, "temperature", 0.0) or 0.0
    variant = []
    n = getattr(explainer, "n", 1) or 1
    if base is not None and n > 1:
        variant.append(f"best of {n}")
    if base is not None and getattr(explainer, "revise", False):
        variant.append("revision")
    elif temperature and n == 1:
        variant.append(f"temperature {temperature:g}")
    if variant:
        parts.append(" + ".join(variant))
    return SEPARATOR.join(parts)


def simulator_label(simulator: Any) -> str:
    """``model · prompt · mode [· calibrated]`` of a simulator object."""
    calibrated = bool(getattr(simulator, "calibrate", False))
    core = getattr(simulator, "base", None) if calibrated else simulator
    core = core if core is not None else simulator
    name = type(core).__name__
    if name == "BaselineSimulator":
        parts = ["baseline", "token look-up"]
    else:
        parts = [short_model_name(getattr(core, "model_name", None))]
        template = _template_name(core)
        if template:
            parts.append(template)
        mode = _SIMULATOR_MODES.get(name)
        if mode is None and name == "ChatSimulator":
            mode = "chat top-logprobs" if getattr(core, "use_logprobs", False) else "chat integers"
        if mode is None:
            mode = getattr(core, "mode", None) or name
        parts.append(str(mode))
    if calibrated:
        parts.append("calibrated")
    return SEPARATOR.join(parts)


def label_or_id(label: str | None, identifier: str | None) -> str:
    """What to print for an explainer / simulator: its label, else (rows written before labels
    existed) its id."""
    return label or identifier or "?"
