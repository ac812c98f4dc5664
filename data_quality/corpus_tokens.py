"""corpus_tokens: fixed-length token sequences cut from the corpus."""

from __future__ import annotations

from typing import Any, Sequence

import polars as pl

from data_quality.core import QualityParams, add_between, add_common, list_len, new_suite

TABLE = "corpus_tokens"


def build_suite(params: QualityParams, layers: Sequence[str] = ()) -> Any:
    suite = new_suite(TABLE)
    add_common(suite, TABLE, ["model", "corpus", "sequence_id", "len(token_ids)", "len(tokens)"])
    length = params.sequence_length
    add_between(suite, "len(token_ids)", length, length)
    add_between(suite, "len(tokens)", length, length)
    add_between(suite, "min(token_ids)", 0, None, "token ids are >= 0")
    return suite


def prepare(frame: pl.DataFrame, params: QualityParams) -> pl.DataFrame:
    return frame.with_columns(
        list_len("token_ids"),
        list_len("tokens"),
        pl.col("token_ids").list.min().cast(pl.Int64).alias("min(token_ids)"),
    )
