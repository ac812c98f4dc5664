"""Blocking data-quality gates: Great Expectations suites run on a stage's rows *before* they are written.

A failing suite stops the step before the write (so bad rows never land) and, being a blocking
check, stops every downstream asset of the run. The check result, with the failed expectations
and a sample of failing rows, shows in the Dagster UI.
"""

import threading

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


class UpstreamGate:
    """The upstream gate of one asset run, one layer at a time: ``check(layer)`` validates the
    stored ``upstream`` rows of a layer and raises ``QualityGateFailed`` if they are corrupt;
    ``result()`` is the passing check result once every layer was checked. A stage that walks its
    layers on the calling thread (the embeddings) checks each layer right before reading it, so a
    corrupt layer stops it before anything of that layer is computed (layers before it are kept,
    as after any interrupted run). The explanations stage checks each layer of activation_records
    when it plans the layer, on its prefetch thread while the previous layer's calls are in flight
    (``run_by_layer`` then finishes the layers planned before a corrupt one and raises); the
    stages whose upstream is small validate every layer first (``gate_upstream``). Layers with no
    stored rows are left to the asset (it says what to materialize first)."""

    def __init__(self, table: str, upstream: str, lake, settings):
        from neuron_pipeline.lake import read_table

        self.table, self.upstream, self.lake = table, upstream, lake
        sequences = read_table(lake, "corpus_tokens", columns=["sequence_id"]).height or None
        self.params = QualityParams.from_settings(settings, corpus_sequences=sequences)
        self._reports: list[QualityReport] = []
        self._checked: set[int] = set()
        self._lock = threading.Lock()  # check() may run on a prefetch thread

    def check(self, layer: int) -> None:
        from neuron_pipeline.lake import read_table

        with self._lock:
            if layer in self._checked:
                return
            # One layer at a time: memory holds one layer of the upstream table, whatever the run's size.
            frame = read_table(self.lake, self.upstream, where={"layer": str(layer)})
            self._checked.add(layer)
            if frame.is_empty():
                return
            report = validate_table(self.upstream, frame, self.params)
            del frame
            if report.success:
                self._reports.append(report)
                return
        metadata = {"upstream": self.upstream, "layers": str(sorted(self._checked)), **_report_metadata(report),
                    "rows": report.rows, "layer": str(layer)}  # fmt: skip
        raise QualityGateFailed(
            dg.AssetCheckResult(
                asset_key=self.table, check_name=UPSTREAM_CHECK_NAME, passed=False,
                severity=dg.AssetCheckSeverity.ERROR, metadata=metadata,
            ),
            dg.Failure(
                description=f"data quality: the stored {self.upstream} rows of layer {layer} fail their suite, "
                f"so {self.table} was not computed for it: {report.summary()}. Re-materialize {self.upstream} for this layer."
            ),
        )

    def result(self, layers: list[int]) -> dg.AssetCheckResult:
        """The passing check result over ``layers`` (any not checked yet are checked now)."""
        for layer in layers:
            self.check(layer)
        metadata: dict = {"upstream": self.upstream, "layers": str(layers), "rows": 0}
        if not self._reports:
            metadata["summary"] = f"{self.upstream}: no stored rows for layers {layers}"
            return dg.AssetCheckResult(asset_key=self.table, check_name=UPSTREAM_CHECK_NAME, passed=True, metadata=metadata)
        combined = combine_reports(self.upstream, self._reports)
        metadata.update(_report_metadata(combined), rows=combined.rows)
        return dg.AssetCheckResult(
            asset_key=self.table, check_name=UPSTREAM_CHECK_NAME, passed=True, severity=dg.AssetCheckSeverity.ERROR,
            metadata=metadata,
        )


def gate_upstream(table: str, upstream: str, lake, layers: list[int], settings):
    """Validate the stored upstream rows this asset is about to read, every layer before the
    asset starts (``UpstreamGate`` for one layer at a time). Yields a failing check result and
    raises if they are corrupt; returns the passing result for the final yield, as
    ``upstream_result = yield from gate_upstream(...)``."""
    gate = UpstreamGate(table, upstream, lake, settings)
    try:
        return gate.result(layers)
    except QualityGateFailed as failed:
        yield failed.result
        raise failed.failure from None
