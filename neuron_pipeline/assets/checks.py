"""Blocking data-quality gates: Great Expectations suites run on a stage's rows *before* they are written.

A failing suite stops the step before the write (so bad rows never land) and, being a blocking
check, stops every downstream asset of the run. The check result, with the failed expectations
and a sample of failing rows, shows in the Dagster UI.
"""

import dagster as dg
import polars as pl

from data_quality import QualityParams, QualityReport, validate_table

CHECK_NAME = "great_expectations"


def quality_check_spec(table: str) -> dg.AssetCheckSpec:
    return dg.AssetCheckSpec(
        CHECK_NAME,
        asset=table,
        blocking=True,
        description=f"Great Expectations suite data_quality/{table}.py, run on every layer before it is written.",
    )


def _report_metadata(report: QualityReport) -> dict:
    """What a check shows in the UI: expectations evaluated and failed, and the failing rows."""
    metadata: dict = {
        "expectations_evaluated": report.evaluated,
        "expectations_failed": report.failed,
        "summary": report.summary(),
    }
    if not report.success:
        metadata["failures"] = dg.MetadataValue.json(report.failures)
        metadata["failing_rows"] = dg.MetadataValue.md(report.failing_rows_markdown())
    return metadata


def check_result(report: QualityReport) -> dg.AssetCheckResult:
    metadata: dict = {"rows": report.rows, **_report_metadata(report)}
    return dg.AssetCheckResult(
        asset_key=report.table,
        check_name=CHECK_NAME,
        passed=report.success,
        severity=dg.AssetCheckSeverity.ERROR,
        metadata=metadata,
    )


def gate(table: str, frame: pl.DataFrame, params: QualityParams):
    """Validate rows about to be written. Yields the check result and raises if they fail,
    so an asset uses it as ``report = yield from gate(...)`` right before ``write_table``."""
    report = validate_table(table, frame, params)
    if not report.success:
        yield check_result(report)
        raise dg.Failure(description=f"data quality: {table} not written: {report.summary()}")
    return report


# --------------------------------------------------------------------------- upstream gates

UPSTREAM_CHECK_NAME = "upstream_quality"


def upstream_check_spec(table: str, upstream: str) -> dg.AssetCheckSpec:
    return dg.AssetCheckSpec(
        UPSTREAM_CHECK_NAME,
        asset=table,
        blocking=True,
        description=f"Before {table} is computed, the stored {upstream} rows of its layers pass "
        f"data_quality/{upstream}.py again: a table changed outside the pipeline stops here.",
    )


def gate_upstream(table: str, upstream: str, lake, layers: list[int], settings):
    """Validate the stored upstream rows this asset is about to read. Yields a failing check
    result and raises if they are corrupt; returns the passing result for the final yield, as
    ``upstream_result = yield from gate_upstream(...)``. Layers with no stored rows are left to
    the asset (it says what to materialize first)."""
    from neuron_pipeline.lake import read_table

    frame = read_table(lake, upstream, where={"layer": [str(layer) for layer in layers]})
    sequences = read_table(lake, "corpus_tokens", columns=["sequence_id"]).height or None
    metadata: dict = {"upstream": upstream, "layers": str(layers), "rows": frame.height}
    if frame.is_empty():
        metadata["summary"] = f"{upstream}: no stored rows for layers {layers}"
        return dg.AssetCheckResult(asset_key=table, check_name=UPSTREAM_CHECK_NAME, passed=True, metadata=metadata)
    report = validate_table(upstream, frame, QualityParams.from_settings(settings, corpus_sequences=sequences))
    metadata.update(_report_metadata(report))
    result = dg.AssetCheckResult(
        asset_key=table,
        check_name=UPSTREAM_CHECK_NAME,
        passed=report.success,
        severity=dg.AssetCheckSeverity.ERROR,
        metadata=metadata,
    )
    if not report.success:
        yield result
        raise dg.Failure(
            description=f"data quality: the stored {upstream} rows of layers {layers} fail their suite, "
            f"so {table} was not computed: {report.summary()}. Re-materialize {upstream} for these layers."
        )
    return result
