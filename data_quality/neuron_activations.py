"""neuron_activations: per-neuron statistics over the whole corpus."""

from __future__ import annotations

from typing import Any, Sequence

import polars as pl

from data_quality.core import (
    QualityParams,
    add_between,
    add_common,
    add_coverage,
    add_finite,
    add_not_null,
    list_len,
    new_suite,
    with_coverage_column,
)

TABLE = "neuron_activations"
# max/min are float32 and mean is accumulated in float64: a constant neuron can have its mean
# a few float32 ulps beyond max or min.
ORDER_TOLERANCE = 1e-4


def build_suite(params: QualityParams, layers: Sequence[str] = ()) -> Any:
    suite = new_suite(TABLE)
    add_common(suite, TABLE, ["model", "count", "len(quantile_boundaries)"])
    add_finite(suite, ["mean", "variance", "max", "min"])
    add_between(suite, "max - mean", -ORDER_TOLERANCE, None, "max >= mean")
    add_between(suite, "mean - min", -ORDER_TOLERANCE, None, "mean >= min")
    add_between(suite, "variance", 0, None)
    add_between(suite, "frac_positive", 0, 1)
    add_not_null(suite, ["frac_positive"])
    if params.corpus_tokens is not None:
        add_between(suite, "count", params.corpus_tokens, params.corpus_tokens, f"count == corpus tokens ({params.corpus_tokens})")
    else:
        add_between(suite, "count", 1, None)
    add_between(
        suite,
        "decreasing steps in quantile_boundaries",
        0,
        0,
        "quantile_boundaries are non-decreasing",
    )
    boundaries = max(params.quantile_bins - 1, 0)
    add_between(
        suite,
        "len(quantile_boundaries)",
        boundaries,
        boundaries,
        f"quantile_boundaries has quantile_bins - 1 = {boundaries} items",
    )
    add_coverage(suite, params, layers)
    return suite


def prepare(frame: pl.DataFrame, params: QualityParams) -> pl.DataFrame:
    mean = pl.col("mean").cast(pl.Float64)
    return with_coverage_column(
        frame.with_columns(
            (pl.col("max").cast(pl.Float64) - mean).alias("max - mean"),
            (mean - pl.col("min").cast(pl.Float64)).alias("mean - min"),
            list_len("quantile_boundaries"),
            pl.col("quantile_boundaries")
            .list.eval(pl.element().diff() < 0)
            .list.sum()
            .cast(pl.Int64)
            .alias("decreasing steps in quantile_boundaries"),
        )
    )
