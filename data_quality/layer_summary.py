"""layer_summary: score distribution per (layer, explainer_id, simulator_id)."""

from __future__ import annotations

from typing import Any, Sequence

import polars as pl

from data_quality.core import CORRELATION_TOLERANCE, QualityParams, add_between, add_common, new_suite

TABLE = "layer_summary"
SCORE_COLUMNS = ["mean_score", "median_score", "p90_score", "best_score"]


def build_suite(params: QualityParams, layers: Sequence[str] = ()) -> Any:
    suite = new_suite(TABLE)
    add_common(suite, TABLE, ["model", "neurons_scored", "neurons_null"])
    add_between(suite, "neurons_scored", 0, None)
    add_between(suite, "neurons_null", 0, None)
    for column in SCORE_COLUMNS:
        add_between(
            suite, column, -1 - CORRELATION_TOLERANCE, 1 + CORRELATION_TOLERANCE, f"{column} in [-1, 1] or null"
        )
    add_between(suite, "frac_score_ge_0_8", 0, 1, "frac_score_ge_0_8 in [0, 1] or null")
    add_between(suite, "best_neuron", 0, None)
    return suite


def prepare(frame: pl.DataFrame, params: QualityParams) -> pl.DataFrame:
    return frame
