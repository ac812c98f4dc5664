"""explanation_embeddings: one unit-length sentence embedding per explanation."""

from __future__ import annotations

from typing import Any, Sequence

import polars as pl

from data_quality.core import QualityParams, add_between, add_common, new_suite, nonfinite_items

TABLE = "explanation_embeddings"
NORM = "norm(embedding)"
# float32 embeddings normalised in float32: a few ulps off 1.
NORM_TOLERANCE = 1e-3


def build_suite(params: QualityParams, layers: Sequence[str] = ()) -> Any:
    suite = new_suite(TABLE)
    add_common(suite, TABLE, ["model", "explainer_id", "embedding_model", "text_hash", "len(embedding)"])
    add_between(suite, "len(embedding)", 1, None, "embedding is non-empty")
    add_between(suite, "embedding widths in the frame", 1, 1, "every embedding has the same width")
    add_between(suite, "non-finite items in embedding", 0, 0, "embedding is finite")
    add_between(suite, NORM, 1 - NORM_TOLERANCE, 1 + NORM_TOLERANCE, "embedding has unit length")
    return suite


def prepare(frame: pl.DataFrame, params: QualityParams) -> pl.DataFrame:
    widths = frame.get_column("embedding").list.len().n_unique() if frame.height else 1
    return frame.with_columns(
        pl.col("embedding").list.len().cast(pl.Int64).alias("len(embedding)"),
        pl.lit(widths, dtype=pl.Int64).alias("embedding widths in the frame"),
        nonfinite_items("embedding"),
        pl.col("embedding").list.eval(pl.element().cast(pl.Float64).pow(2)).list.sum().sqrt().alias(NORM),
    )
