"""evaluations: the evaluation suite's results, one row per check and (explainer, simulator, prompt)."""

from __future__ import annotations

from typing import Any, Sequence

import polars as pl

from data_quality.core import QualityParams, add, add_between, add_common, gxe, new_suite

TABLE = "evaluations"
CHECKS = ["puzzle_discrimination", "puzzle_explanations", "planted_recovery", "planted_named"]


def build_suite(params: QualityParams, layers: Sequence[str] = ()) -> Any:
    suite = new_suite(TABLE)
    add_common(suite, TABLE, ["n", "details", "machine"])
    add(suite, "check is a known check", gxe().ExpectColumnValuesToBeInSet(column="check", value_set=CHECKS))
    add_between(suite, "n", 1, None)
    # Shares lie in [0, 1]; mean correlation scores in [-1, 1].
    add_between(suite, "value", -1, 1, "value in [-1, 1] or null")
    add_between(suite, "reference_value", -1, 1, "reference_value in [-1, 1] or null")
    add_between(suite, "baseline_value", -1, 1, "baseline_value in [-1, 1] or null")
    return suite


def prepare(frame: pl.DataFrame, params: QualityParams) -> pl.DataFrame:
    return frame
