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


class QualityGateFailed(Exception):
    """Rows failed their suite: carries the failing check result (to yield) and the step failure
    (to raise), for gates run inside callbacks that cannot yield Dagster events themselves."""

    def __init__(self, result: dg.AssetCheckResult, failure: dg.Failure):
        super().__init__(failure.description)
        self.result = result
        self.failure = failure


def check_rows(table: str, frame: pl.DataFrame, params: QualityParams, skip_empty: bool = False) -> QualityReport | None:
    """Validate rows about to be written; raise ``QualityGateFailed`` if they fail. With
    ``skip_empty`` an empty slice (a layer with nothing to write) is not validated: None."""
    if skip_empty and frame.is_empty():
        return None
    report = validate_table(table, frame, params)
    if not report.success:
        layers = frame["layer"].unique().sort().to_list() if "layer" in frame.columns and frame.height else []
        where = f" (layer {', '.join(layers)})" if layers else ""
        raise QualityGateFailed(
            check_result(report), dg.Failure(description=f"data quality: {table}{where} not written: {report.summary()}")
        )
    return report


def gate(table: str, frame: pl.DataFrame, params: QualityParams, skip_empty: bool = False):
    """Validate rows about to be written. Yields the check result and raises if they fail,
    so an asset uses it as ``report = yield from gate(...)`` right before ``write_table``."""
    try:
        return check_rows(table, frame, params, skip_empty)
    except QualityGateFailed as failed:
        yield failed.result
        raise failed.failure from None


def combine_reports(table: str, reports: list[QualityReport | None]) -> QualityReport:
    """One passing report for the slices of a run validated one by one (a layer, a chunk):
    rows summed, expectations as evaluated on each slice; empty slices (None) left out. (When
    every slice was empty, the asset validates the run's empty rows as a whole, as before.)"""
    reports = [r for r in reports if r is not None]
    return QualityReport(
        table=table,
        success=all(r.success for r in reports),
        evaluated=max((r.evaluated for r in reports), default=0),
        failed=sum(r.failed for r in reports),
        rows=sum(r.rows for r in reports),
    )


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

    sequences = read_table(lake, "corpus_tokens", columns=["sequence_id"]).height or None
    params = QualityParams.from_settings(settings, corpus_sequences=sequences)
    metadata: dict = {"upstream": upstream, "layers": str(layers), "rows": 0}
    reports = []
    # One layer at a time: memory holds one layer of the upstream table, whatever the run's size.
    for layer in layers:
        frame = read_table(lake, upstream, where={"layer": str(layer)})
        if frame.is_empty():
            continue
        report = validate_table(upstream, frame, params)
        del frame
        reports.append(report)
        if not report.success:
            metadata.update(_report_metadata(report), rows=report.rows, layer=str(layer))
            yield dg.AssetCheckResult(
                asset_key=table,
                check_name=UPSTREAM_CHECK_NAME,
                passed=False,
                severity=dg.AssetCheckSeverity.ERROR,
                metadata=metadata,
            )
            raise dg.Failure(
                description=f"data quality: the stored {upstream} rows of layer {layer} fail their suite, "
                f"so {table} was not computed: {report.summary()}. Re-materialize {upstream} for this layer."
            )
    if not reports:
        metadata["summary"] = f"{upstream}: no stored rows for layers {layers}"
        return dg.AssetCheckResult(asset_key=table, check_name=UPSTREAM_CHECK_NAME, passed=True, metadata=metadata)
    combined = combine_reports(upstream, reports)
    metadata.update(_report_metadata(combined), rows=combined.rows)
    return dg.AssetCheckResult(
        asset_key=table, check_name=UPSTREAM_CHECK_NAME, passed=True, severity=dg.AssetCheckSeverity.ERROR, metadata=metadata
    )
