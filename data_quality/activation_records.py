"""activation_records: per neuron the top, random and quantile-bin excerpts."""

from __future__ import annotations

from typing import Any, Sequence

import polars as pl

from data_quality.core import (
    QualityParams,
    add,
    add_between,
    add_common,
    add_coverage,
    first_in_group,
    gxe,
    list_len,
    new_suite,
    nonfinite_items,
    with_coverage_column,
)

TABLE = "activation_records"
MAX_TOLERANCE = 1e-5
NEURON = ["layer", "neuron"]

TOP_COUNT = "top records per neuron"
RANDOM_COUNT = "random records per neuron"
BIN_COUNT = "records per (neuron, quantile_bin)"
BIN_OF_QUANTILE = "quantile_bin of quantile records (-1 = null)"
BIN_OF_OTHER = "quantile_bin of top/random records"
RISE = "max_activation rise over previous top rank"
MAX_GAP = "|max(activations) - max_activation|"


def _kinds(params: QualityParams) -> list[str]:
    if params.quantile_bins > 0 and params.per_quantile_bin > 0:
        return ["top", "random", "quantile"]
    return ["top", "random"]


def build_suite(params: QualityParams, layers: Sequence[str] = ()) -> Any:
    suite = new_suite(TABLE)
    add_common(
        suite,
        TABLE,
        ["model", "kind", "rank", "sequence_id", "max_activation", "len(tokens)", "len(activations)"],
    )
    kinds = _kinds(params)
    add(suite, f"kind in {{{', '.join(kinds)}}}", gxe().ExpectColumnValuesToBeInSet(column="kind", value_set=kinds))
    add_between(suite, "rank", 0, None)
    add(
        suite,
        "an excerpt appears at most once per (neuron, kind)",
        gxe().ExpectCompoundColumnsToBeUnique(column_list=["layer", "neuron", "kind", "sequence_id"]),
    )
    top, random = params.expected_count(params.top_k), params.expected_count(params.random_k)
    add_between(suite, TOP_COUNT, top, top, f"exactly {top} top records per neuron")
    add_between(suite, RANDOM_COUNT, random, random, f"exactly {random} random records per neuron")
    if "quantile" in kinds:
        add_between(
            suite, BIN_COUNT, 1, params.per_quantile_bin, f"at most {params.per_quantile_bin} records per (neuron, quantile_bin)"
        )
        add_between(
            suite,
            BIN_OF_QUANTILE,
            0,
            params.quantile_bins - 1,
            f"quantile records have quantile_bin in [0, {params.quantile_bins - 1}]",
        )
    add(
        suite,
        "quantile_bin is null for top/random records",
        gxe().ExpectColumnValuesToBeNull(column=BIN_OF_OTHER),
    )
    add_between(suite, RISE, None, 0, "top records sorted by max_activation descending within a neuron by rank")
    length = params.sequence_length
    add_between(suite, "len(tokens)", length, length)
    add_between(suite, "len(activations)", length, length)
    add_between(suite, "non-finite items in activations", 0, 0, "activations are finite")
    add_between(suite, MAX_GAP, None, MAX_TOLERANCE, f"max_activation == max(activations) (tolerance {MAX_TOLERANCE:g})")
    add_coverage(suite, params, layers)
    return suite


def prepare(frame: pl.DataFrame, params: QualityParams) -> pl.DataFrame:
    kind = pl.col("kind")
    is_quantile = kind == "quantile"
    bin_group = ["layer", "neuron", "kind", "quantile_bin"]
    max_activation = pl.col("max_activation").cast(pl.Float64)
    return with_coverage_column(
        frame.with_columns(
            list_len("tokens"),
            list_len("activations"),
            nonfinite_items("activations"),
            (pl.col("activations").list.max().cast(pl.Float64) - max_activation).abs().alias(MAX_GAP),
            # Per-neuron counts sit on the neuron's first row only, so that a failure counts neurons.
            pl.when(first_in_group(NEURON))
            .then((kind == "top").sum().over(NEURON))
            .cast(pl.Int64)
            .alias(TOP_COUNT),
            pl.when(first_in_group(NEURON))
            .then((kind == "random").sum().over(NEURON))
            .cast(pl.Int64)
            .alias(RANDOM_COUNT),
            pl.when(is_quantile & first_in_group(bin_group))
            .then(pl.len().over(bin_group))
            .cast(pl.Int64)
            .alias(BIN_COUNT),
            pl.when(is_quantile).then(pl.col("quantile_bin").fill_null(-1)).cast(pl.Int64).alias(BIN_OF_QUANTILE),
            pl.when(~is_quantile).then(pl.col("quantile_bin")).cast(pl.Int64).alias(BIN_OF_OTHER),
            pl.when(kind == "top")
            .then(max_activation - max_activation.shift(1).over(["layer", "neuron", "kind"], order_by="rank"))
            .alias(RISE),
        )
    )
