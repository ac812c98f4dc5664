"""Escaping for everything that reaches a page: corpus tokens and LLM text are untrusted.

Two contexts exist in the generated pages and each has one helper:

- HTML text and attribute values: :func:`esc` (``& < > " '`` become entities);
- JSON embedded in ``<script type="application/json">``: :func:`script_json`, which also escapes
  ``< > &`` and U+2028/U+2029 so no value can close the script element (``</script>``) or open
  a comment, and non-finite floats become ``null`` (``JSON.parse`` rejects NaN).

The pages' JavaScript only ever inserts data with ``textContent`` / ``title`` (never
``innerHTML``), and every page carries a Content-Security-Policy that forbids inline scripts
and any non-local request, as a second line of defence.
"""

from __future__ import annotations

import html
import json
import math
from typing import Any

# Only the page's own local files; no network, no inline script, no plugins, no frames.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self' file:; style-src 'self' file:; img-src 'self' file: data:; "
    "base-uri 'none'; form-action 'none'"
)

_SCRIPT_ESCAPES = {
    "<": "\\u003c",
    ">": "\\u003e",
    "&": "\\u0026",
    "\u2028": "\\u2028",
    "\u2029": "\\u2029",
}


def esc(value: Any) -> str:
    """``value`` as HTML text, safe in element content and in quoted attribute values."""
    return html.escape("" if value is None else str(value), quote=True)


def finite(value: Any) -> float | None:
    """A float, or None for null / NaN / infinity."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _clean(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def script_json(value: Any) -> str:
    """JSON for the body of ``<script type="application/json">``: it cannot end the element."""
    try:
        text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    except ValueError:  # a NaN or infinity somewhere: JSON has no such value
        text = json.dumps(_clean(value), ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    for raw, escaped in _SCRIPT_ESCAPES.items():
        text = text.replace(raw, escaped)
    return text
