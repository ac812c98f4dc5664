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


def check_result(report: QualityReport) -> dg.AssetCheckResult:
    metadata: dict = {
        "rows": report.rows,
        "expectations_evaluated": report.evaluated,
        "expectations_failed": report.failed,
        "summary": report.summary(),
    }
    if not report.success:
        metadata["failures"] = dg.MetadataValue.json(report.failures)
        metadata["failing_rows"] = dg.MetadataValue.md(report.failing_rows_markdown())
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
