"""What the explanations and simulations tables say about failed work, per explainer and simulator.

One report, read by the run summary (cli.py), the assets' UI metadata and the viewer: for each
explainer, the neurons it ran on, how many failed (the call kept failing) or came back unusable
(an answer with nothing usable in it), and the first error; for each simulator the same over the
explanations it simulated. A row whose ``failed + unusable == attempted`` is a total failure: the
CLI exits 1 naming it.
"""

from __future__ import annotations

from typing import Any

import polars as pl

from neuron_pipeline.interp.reporting import BASELINE_PREFIX, UNUSABLE_PREFIX

REPORT_COLUMNS = ["role", "id", "label", "attempted", "failed", "unusable", "first_error"]
_EMPTY = pl.DataFrame(
    schema={
        "role": pl.String,
        "id": pl.String,
        "label": pl.String,
        "attempted": pl.Int64,
        "failed": pl.Int64,
        "unusable": pl.Int64,
        "first_error": pl.String,
    }
)


def _tally(frame: pl.DataFrame, role: str, id_column: str, label_column: str, unit: list[str]) -> pl.DataFrame:
    if frame.is_empty():
        return _EMPTY
    per_unit = frame.group_by([id_column, *unit]).agg(
        pl.col(label_column).drop_nulls().first().alias("label"),
        pl.col("error").drop_nulls().first().alias("error"),
    )
    unusable = pl.col("error").str.starts_with(UNUSABLE_PREFIX).fill_null(False)
    report = (
        per_unit.sort([id_column, *unit])
        .group_by(id_column, maintain_order=True)
        .agg(
            pl.col("label").drop_nulls().first().alias("label"),
            pl.len().cast(pl.Int64).alias("attempted"),
            (pl.col("error").is_not_null() & ~unusable).sum().cast(pl.Int64).alias("failed"),
            unusable.sum().cast(pl.Int64).alias("unusable"),
            pl.col("error").drop_nulls().first().alias("first_error"),
        )
        .rename({id_column: "id"})
        .with_columns(pl.lit(role).alias("role"), pl.coalesce("label", "id").alias("label"))
    )
    return report.select(REPORT_COLUMNS)


def failure_report(explanations: pl.DataFrame | None, simulations: pl.DataFrame | None) -> pl.DataFrame:
    """Per explainer (unit: a neuron) and per simulator (unit: one neuron's explanation), the
    counts above. Either frame may be None or lack rows; simulations need only the columns
    layer, neuron, explainer_id, simulator_id, simulator_label and error."""
    parts = []
    if explanations is not None and explanations.height:
        parts.append(_tally(explanations, "explainer", "explainer_id", "explainer_label", ["layer", "neuron"]))
    if simulations is not None and simulations.height:
        parts.append(
            _tally(simulations, "simulator", "simulator_id", "simulator_label", ["layer", "neuron", "explainer_id"])
        )
    return pl.concat(parts) if parts else _EMPTY


def total_failures(report: pl.DataFrame) -> pl.DataFrame:
    """Rows of a failure report whose every attempt failed or came back unusable."""
    return report.filter((pl.col("attempted") > 0) & (pl.col("failed") + pl.col("unusable") == pl.col("attempted")))


def describe_failure(row: dict[str, Any]) -> str:
    """'explainer llm-… (label): 4 of 4 explanations failed (1 unusable; first error: …)' for one
    report row."""
    unit = "explanations" if row["role"] == "explainer" else "simulations"
    name = row["id"] if row["label"] in (None, row["id"]) else f"{row['id']} ({row['label']})"
    notes = [f"{row['unusable']} unusable"] if row["unusable"] else []
    if row.get("first_error"):
        notes.append(f"first error: {row['first_error'].splitlines()[0][:200]}")
    text = f"{row['role']} {name}: {row['failed'] + row['unusable']} of {row['attempted']} {unit} failed"
    return text + (f" ({'; '.join(notes)})" if notes else "")


def report_from_metadata(values: list[list[dict[str, Any]]]) -> pl.DataFrame:
    """Merge failure reports carried in asset metadata (one list of rows per materialization)."""
    rows = [row for value in values for row in value]
    if not rows:
        return _EMPTY
    frame = pl.DataFrame(rows, schema=_EMPTY.schema)
    return (
        frame.group_by("role", "id", maintain_order=True)
        .agg(
            pl.col("label").drop_nulls().first(),
            pl.col("attempted").sum(),
            pl.col("failed").sum(),
            pl.col("unusable").sum(),
            pl.col("first_error").drop_nulls().first(),
        )
        .select(REPORT_COLUMNS)
    )


def meaningful_pair_expr() -> pl.Expr:
    """``interp.reporting.pair_is_meaningful`` as a polars expression over explainer_id and
    simulator_id (the same rule; tests check they agree)."""
    return ~pl.col("simulator_id").str.starts_with(BASELINE_PREFIX) | pl.col("explainer_id").str.starts_with(
        BASELINE_PREFIX
    )


def meaningful_pairs(frame: pl.DataFrame) -> pl.DataFrame:
    """Rows whose (explainer, simulator) pair means something: e.g. rows an earlier version wrote
    for a prose explanation scored by the token look-up are left out of what people read."""
    return frame.filter(meaningful_pair_expr()) if frame.height else frame
