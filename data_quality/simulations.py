"""simulations: the simulator's expected activation (0-10) per token of each scored excerpt."""

from __future__ import annotations

from typing import Any, Sequence

import polars as pl

from data_quality.core import (
    QualityParams,
    add,
    add_between,
    add_common,
    gxe,
    list_len,
    new_suite,
    nonfinite_items,
)

TABLE = "simulations"
MIN_EXPECTED = "min(expected_activations)"
MAX_EXPECTED = "max(expected_activations)"
# Failed simulations are rows too (lake/schemas.py): error set, expected_activations and mode null.
SIMULATED = "expected_activations and mode where error is null"


def build_suite(params: QualityParams, layers: Sequence[str] = ()) -> Any:
    suite = new_suite(TABLE)
    add_common(
        suite,
        TABLE,
        ["model", "explainer_id", "simulator_id", "kind", "rank", "sequence_id", "len(tokens)"],
    )
    add(suite, "expected_activations and mode given when error is null", gxe().ExpectColumnValuesToNotBeNull(column=SIMULATED))
    # "calibration" rows are the held-out excerpts a calibrated simulator fits its line on.
    add(
        suite,
        "kind in {top, random, calibration}",
        gxe().ExpectColumnValuesToBeInSet(column="kind", value_set=["top", "random", "calibration"]),
    )
    add(
        suite,
        "len(expected_activations) == len(tokens)",
        gxe().ExpectColumnPairValuesToBeEqual(
            column_A="len(expected_activations)", column_B="len(tokens)", ignore_row_if="either_value_is_missing"
        ),
    )
    add(
        suite,
        "len(true_activations) == len(tokens)",
        gxe().ExpectColumnPairValuesToBeEqual(
            column_A="len(true_activations)", column_B="len(tokens)", ignore_row_if="neither"
        ),
    )
    add_between(suite, "len(tokens)", 1, None)
    add_between(suite, MIN_EXPECTED, 0, 10, "expected_activations >= 0")
    add_between(suite, MAX_EXPECTED, 0, 10, "expected_activations <= 10")
    add_between(suite, "non-finite items in expected_activations", 0, 0, "expected_activations are finite")
    add_between(suite, "non-finite items in true_activations", 0, 0, "true_activations are finite")
    add_between(suite, "len(mode)", 1, None, "mode is non-empty")
    add_between(suite, "value_mass", 0, 1, "value_mass in [0, 1] (null without logprobs)")
    return suite


def prepare(frame: pl.DataFrame, params: QualityParams) -> pl.DataFrame:
    return frame.with_columns(
        list_len("tokens"),
        list_len("expected_activations"),
        list_len("true_activations"),
        pl.col("expected_activations").list.min().cast(pl.Float64).alias(MIN_EXPECTED),
        pl.col("expected_activations").list.max().cast(pl.Float64).alias(MAX_EXPECTED),
        nonfinite_items("expected_activations"),
        nonfinite_items("true_activations"),
        pl.col("mode").str.strip_chars().str.len_chars().cast(pl.Int64).alias("len(mode)"),
        pl.when(pl.col("error").is_not_null())
        .then(pl.lit("(failed)"))
        .when(pl.col("expected_activations").is_not_null() & pl.col("mode").is_not_null())
        .then(pl.lit("(simulated)"))
        .alias(SIMULATED),
    )
