"""neuron_output_tokens: per neuron, the tokens its output weights promote and suppress."""

from __future__ import annotations

from typing import Any, Sequence

import polars as pl

from data_quality.core import (
    QualityParams,
    add_between,
    add_common,
    add_coverage,
    list_len,
    new_suite,
    nonfinite_items,
    with_coverage_column,
)

TABLE = "neuron_output_tokens"
LIST_COLUMNS = [
    "promoted_tokens",
    "promoted_token_ids",
    "promoted_logits",
    "suppressed_tokens",
    "suppressed_token_ids",
    "suppressed_logits",
]
PROMOTED_RISES = "increasing steps in promoted_logits"
SUPPRESSED_FALLS = "decreasing steps in suppressed_logits"
GAP = "min(promoted_logits) - max(suppressed_logits)"


def build_suite(params: QualityParams, layers: Sequence[str] = ()) -> Any:
    suite = new_suite(TABLE)
    add_common(suite, TABLE, ["model", "weights_hash", *(f"len({c})" for c in LIST_COLUMNS)])
    add_between(suite, "len(promoted_tokens)", 1, None, "at least one promoted token")
    for column in LIST_COLUMNS[1:3]:
        add_between(suite, f"len({column}) - len(promoted_tokens)", 0, 0, f"{column} has one item per promoted token")
    for column in LIST_COLUMNS[3:]:
        add_between(suite, f"len({column}) - len(promoted_tokens)", 0, 0, f"{column} has as many items as promoted_tokens")
    for column in ("promoted_logits", "suppressed_logits"):
        add_between(suite, f"non-finite items in {column}", 0, 0, f"{column} are finite")
    add_between(suite, "min(token ids)", 0, None, "token ids >= 0")
    add_between(suite, PROMOTED_RISES, 0, 0, "promoted_logits are highest first")
    add_between(suite, SUPPRESSED_FALLS, 0, 0, "suppressed_logits are lowest first")
    add_between(suite, GAP, 0, None, "every promoted logit >= every suppressed logit")
    add_coverage(suite, params, layers)
    return suite


def prepare(frame: pl.DataFrame, params: QualityParams) -> pl.DataFrame:
    lengths = [list_len(c) for c in LIST_COLUMNS]
    frame = frame.with_columns(
        *lengths,
        nonfinite_items("promoted_logits"),
        nonfinite_items("suppressed_logits"),
        pl.min_horizontal(
            pl.col("promoted_token_ids").list.min(), pl.col("suppressed_token_ids").list.min()
        ).cast(pl.Int64).alias("min(token ids)"),
        pl.col("promoted_logits").list.eval(pl.element().diff() > 0).list.sum().cast(pl.Int64).alias(PROMOTED_RISES),
        pl.col("suppressed_logits").list.eval(pl.element().diff() < 0).list.sum().cast(pl.Int64).alias(SUPPRESSED_FALLS),
        (pl.col("promoted_logits").list.min() - pl.col("suppressed_logits").list.max()).cast(pl.Float64).alias(GAP),
    )
    return with_coverage_column(
        frame.with_columns(
            (pl.col(f"len({c})") - pl.col("len(promoted_tokens)")).alias(f"len({c}) - len(promoted_tokens)")
            for c in LIST_COLUMNS[1:]
        )
    )
