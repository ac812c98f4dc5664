"""Great Expectations suites for the lake tables, one module per table.

``validate_table(table, frame, params)`` runs the table's suite on a polars frame in the
process-wide ephemeral GX context and returns a :class:`QualityReport` fit for Dagster
asset-check metadata (``report.to_metadata()``, ``report.summary()``, ``report.failing_rows``).
"""

from __future__ import annotations

from typing import Any, Callable

import polars as pl

from data_quality import (
    activation_records,
    corpus_tokens,
    explanation_embeddings,
    explanations,
    layer_summary,
    neuron_activations,
    neuron_output_tokens,
    scorer_results,
    scores,
    simulations,
)
from data_quality.core import QualityParams, QualityReport, gx_context, validate

_MODULES = {
    "corpus_tokens": corpus_tokens,
    "neuron_activations": neuron_activations,
    "activation_records": activation_records,
    "explanations": explanations,
    "simulations": simulations,
    "scores": scores,
    "scorer_results": scorer_results,
    "layer_summary": layer_summary,
    "neuron_output_tokens": neuron_output_tokens,
    "explanation_embeddings": explanation_embeddings,
}

# Table name -> suite builder: ``build_suite(params, layers=()) -> gx.ExpectationSuite``.
SUITES: dict[str, Callable[..., Any]] = {name: module.build_suite for name, module in _MODULES.items()}
# Table name -> ``prepare(frame, params) -> polars.DataFrame`` adding the derived columns.
PREPARERS: dict[str, Callable[[pl.DataFrame, QualityParams], pl.DataFrame]] = {
    name: module.prepare for name, module in _MODULES.items()
}


def validate_table(table: str, frame: pl.DataFrame, params: QualityParams | None = None) -> QualityReport:
    """Validate one lake table's rows (typically one layer partition) against its suite."""
    if table not in SUITES:
        raise KeyError(f"no data-quality suite for table {table!r}: tables are {', '.join(SUITES)}")
    return validate(table, frame, params or QualityParams(), SUITES[table], PREPARERS[table])


__all__ = ["PREPARERS", "QualityParams", "QualityReport", "SUITES", "gx_context", "validate_table"]
