"""scorer_results: detection / fuzzing / embedding scores per (layer, neuron, explainer_id, scorer_id)."""

from __future__ import annotations

from typing import Any, Sequence

import polars as pl

from data_quality.core import CORRELATION_TOLERANCE, QualityParams, add, add_between, add_common, gxe, list_len, new_suite

TABLE = "scorer_results"
METHODS = ["detection", "fuzzing", "embedding"]
METRICS = ["score", "balanced_accuracy", "f1", "precision", "recall", "auroc"]
REASON = "null_reason where score is null"
JUDGED = "judged predictions"
LABELLED = "n_activating + n_non_activating"
HEADLINE = "score is the method's headline metric"


def build_suite(params: QualityParams, layers: Sequence[str] = ()) -> Any:
    suite = new_suite(TABLE)
    add_common(suite, TABLE, ["model", "scorer_id", "method", "scorer_model", "len(labels)"])
    add(suite, f"method in {{{', '.join(METHODS)}}}", gxe().ExpectColumnValuesToBeInSet(column="method", value_set=METHODS))
    for column in METRICS:
        add_between(suite, column, 0, 1 + CORRELATION_TOLERANCE, f"{column} in [0, 1] or null")
    add(suite, "null_reason given when score is null", gxe().ExpectColumnValuesToNotBeNull(column=REASON))
    add_between(suite, HEADLINE, 1, 1, "score is balanced_accuracy (detection, fuzzing) or auroc (embedding)")
    for column in ("len(predictions)", "len(probabilities)", "len(sequence_ids)"):
        add(
            suite,
            f"{column} == len(labels)",
            gxe().ExpectColumnPairValuesToBeEqual(column_A=column, column_B="len(labels)", ignore_row_if="neither"),
        )
    # A prediction is never made up: as many answers as excerpts judged, and those split into labels.
    add(
        suite,
        "n_judged == number of non-null predictions (embedding: every excerpt)",
        gxe().ExpectColumnPairValuesToBeEqual(column_A="n_judged", column_B=JUDGED, ignore_row_if="neither"),
    )
    add(
        suite,
        "n_activating + n_non_activating == n_judged",
        gxe().ExpectColumnPairValuesToBeEqual(column_A=LABELLED, column_B="n_judged", ignore_row_if="neither"),
    )
    for column in ("n_judged", "failed_groups", "prompt_tokens", "completion_tokens", "calls"):
        add_between(suite, column, 0, None)
    return suite


def prepare(frame: pl.DataFrame, params: QualityParams) -> pl.DataFrame:
    score_missing = pl.col("score").is_null() | pl.col("score").is_nan()
    reason = pl.when(pl.col("null_reason").str.strip_chars() != "").then(pl.col("null_reason"))
    headline = pl.when(pl.col("method") == "embedding").then(pl.col("auroc")).otherwise(pl.col("balanced_accuracy"))
    same = (pl.col("score") == headline) | (pl.col("score").is_null() & headline.is_null())
    judged = (
        pl.when(pl.col("method") == "embedding")
        .then(pl.col("labels").list.len())
        .otherwise(pl.col("predictions").list.eval(pl.element().is_not_null()).list.sum())
    )
    return frame.with_columns(
        pl.when(score_missing).then(reason).otherwise(pl.lit("(score present)")).alias(REASON),
        same.fill_null(False).cast(pl.Int64).alias(HEADLINE),
        judged.cast(pl.Int64).alias(JUDGED),
        (pl.col("n_activating") + pl.col("n_non_activating")).cast(pl.Int64).alias(LABELLED),
        list_len("labels"),
        list_len("predictions"),
        list_len("probabilities"),
        list_len("sequence_ids"),
    )
