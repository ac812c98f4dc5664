"""scores: correlation scores per (layer, neuron, explainer_id, simulator_id)."""

from __future__ import annotations

from typing import Any, Sequence

import polars as pl

from data_quality.core import (
    CORRELATION_TOLERANCE,
    QualityParams,
    add,
    add_between,
    add_common,
    add_coverage,
    gxe,
    new_suite,
    with_coverage_column,
)

TABLE = "scores"
REASON = "null_reason where score is null"
CORRELATIONS = ["score", "score_top", "score_random"]


def build_suite(params: QualityParams, layers: Sequence[str] = ()) -> Any:
    suite = new_suite(TABLE)
    add_common(suite, TABLE, ["model", "explainer_id", "simulator_id"])
    for column in CORRELATIONS:
        add_between(
            suite,
            column,
            -1 - CORRELATION_TOLERANCE,
            1 + CORRELATION_TOLERANCE,
            f"{column} in [-1, 1] or null",
        )
    add_between(suite, "rsquared", None, 1 + CORRELATION_TOLERANCE, "rsquared <= 1 or null")
    add_between(suite, "absolute_dev_explained", None, 1 + CORRELATION_TOLERANCE, "absolute_dev_explained <= 1 or null")
    add(suite, "null_reason given when score is null", gxe().ExpectColumnValuesToNotBeNull(column=REASON))
    add_between(suite, "n_tokens", 0, None)
    add_coverage(suite, params, layers)
    return suite


def prepare(frame: pl.DataFrame, params: QualityParams) -> pl.DataFrame:
    score_missing = pl.col("score").is_null() | pl.col("score").is_nan()
    reason = pl.when(pl.col("null_reason").str.strip_chars() != "").then(pl.col("null_reason"))
    return with_coverage_column(
        frame.with_columns(
            pl.when(score_missing).then(reason).otherwise(pl.lit("(score present)")).alias(REASON),
        )
    )
