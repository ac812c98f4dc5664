"""explanations: one explainer output per (layer, neuron, explainer_id)."""

from __future__ import annotations

from typing import Any, Sequence

import polars as pl

from data_quality.core import QualityParams, add_between, add_common, new_suite

TABLE = "explanations"
OK_LENGTH = "len(explanation) where error is null"
LENGTH = "len(explanation)"


def build_suite(params: QualityParams, layers: Sequence[str] = ()) -> Any:
    suite = new_suite(TABLE)
    add_common(suite, TABLE, ["model", "explainer_id", "prompt_hash"])
    add_between(suite, OK_LENGTH, 1, None, "explanation non-empty when error is null")
    add_between(
        suite, LENGTH, 0, params.max_explanation_chars, f"explanation at most {params.max_explanation_chars} chars"
    )
    add_between(suite, "prompt_tokens", 0, None)
    add_between(suite, "completion_tokens", 0, None)
    return suite


def prepare(frame: pl.DataFrame, params: QualityParams) -> pl.DataFrame:
    stripped_length = pl.col("explanation").str.strip_chars().str.len_chars().fill_null(0).cast(pl.Int64)
    return frame.with_columns(
        pl.when(pl.col("error").is_null()).then(stripped_length).alias(OK_LENGTH),
        pl.col("explanation").str.len_chars().cast(pl.Int64).alias(LENGTH),
    )
