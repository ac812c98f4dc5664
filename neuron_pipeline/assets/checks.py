"""Blocking data-quality gates: Great Expectations suites run on each layer *before* it is written.

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


class QualityGateFailed(dg.Failure):
    pass


class QualityGate:
    """Validates one table's frames layer by layer and reports one check result per run."""

    def __init__(self, table: str, params: QualityParams):
        self.table = table
        self.params = params
        self.reports: list[tuple[str, QualityReport]] = []

    def validate(self, frame: pl.DataFrame, layer: int | str | None = None) -> QualityReport:
        report = validate_table(self.table, frame, self.params)
        self.reports.append((str(layer) if layer is not None else "-", report))
        return report

    @property
    def passed(self) -> bool:
        return all(report.success for _, report in self.reports)

    def result(self) -> dg.AssetCheckResult:
        failed = [(layer, r) for layer, r in self.reports if not r.success]
        metadata: dict = {
            "layers": ", ".join(layer for layer, _ in self.reports),
            "rows": sum(r.rows for _, r in self.reports),
            "expectations_evaluated": sum(r.evaluated for _, r in self.reports),
            "expectations_failed": sum(r.failed for _, r in self.reports),
        }
        if failed:
            layer, report = failed[0]
            metadata["failed_layer"] = layer
            metadata["summary"] = report.summary()
            metadata["failures"] = dg.MetadataValue.json(report.failures)
            metadata["failing_rows"] = dg.MetadataValue.md(report.failing_rows_markdown())
        return dg.AssetCheckResult(
            asset_key=self.table,
            check_name=CHECK_NAME,
            passed=not failed,
            severity=dg.AssetCheckSeverity.ERROR,
            metadata=metadata,
        )

    def failure(self) -> QualityGateFailed:
        layer, report = next((layer, r) for layer, r in self.reports if not r.success)
        return QualityGateFailed(
            description=f"data quality: layer {layer} not written: {report.summary()}",
            metadata={"summary": report.summary()},
        )
