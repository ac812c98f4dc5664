"""The corpus stage's one error type."""

from __future__ import annotations


class CorpusError(ValueError):
    """A user-facing corpus problem; the message is one line naming the problem and the fix."""
