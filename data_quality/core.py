"""Shared machinery: parameters, the one ephemeral GX context, running a suite, reports.

Each table module supplies two functions:

* ``build_suite(params, layers=()) -> gx.ExpectationSuite`` — the expectations, each with a
  human-readable ``description`` that is what a failure report names;
* ``prepare(frame, params) -> polars.DataFrame`` — the frame plus *derived* columns where GX has
  no native expectation (list lengths, per-neuron counts, "sorted within neuron" steps, ...).
  Row order is kept, so GX's unexpected row indices point back into the caller's frame.

Only scalar columns travel to pandas (list columns are represented by their derived columns),
which keeps the conversion cheap for 100k-row record tables.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import polars as pl

from neuron_pipeline.lake.schemas import KEYS, PARTITION_COLUMN, SCHEMAS

# Floats beyond this are infinite; "finite" expectations are ``between(-FLOAT_MAX, FLOAT_MAX)``
# next to a not-null expectation (pandas treats NaN as null).
FLOAT_MAX = 1.7976931348623157e308
# Pearson correlations from numpy can land a few ulps outside [-1, 1].
CORRELATION_TOLERANCE = 1e-9
FAILING_ROWS_LIMIT = 20
UNEXPECTED_VALUES_LIMIT = 5
MISSING_VALUES_LIMIT = 20
VALUE_CHARS_LIMIT = 120
ROW_COLUMN = "row"
FAILED_COLUMN = "failed_expectations"
COVERAGE_COLUMN = "layer/neuron"


@dataclass(frozen=True)
class QualityParams:
    """What the data must look like, taken from the run's settings."""

    sequence_length: int = 64
    top_k: int = 20
    random_k: int = 20
    quantile_bins: int = 5
    per_quantile_bin: int = 2
    max_explanation_chars: int = 1000
    # Coverage: every one of these neurons must be present in every layer (when given).
    expected_neurons: tuple[int, ...] | None = None
    # neuron_activations.count must equal this (tokens seen per neuron), when given.
    corpus_tokens: int | None = None
    # Number of corpus sequences, when known: a corpus with fewer sequences than top_k /
    # random_k yields that many top / random records per neuron instead.
    corpus_sequences: int | None = None

    def __post_init__(self) -> None:
        if self.expected_neurons is not None and not isinstance(self.expected_neurons, tuple):
            object.__setattr__(self, "expected_neurons", tuple(int(n) for n in self.expected_neurons))

    @classmethod
    def from_settings(
        cls,
        settings: Any,
        *,
        expected_neurons: Iterable[int] | None = None,
        corpus_tokens: int | None = None,
        corpus_sequences: int | None = None,
        max_explanation_chars: int = 1000,
    ) -> "QualityParams":
        """Build from a ``neuron_pipeline.config.Settings`` (duck-typed: corpus + records)."""
        records = settings.records
        return cls(
            sequence_length=settings.corpus.sequence_length,
            top_k=records.top_k,
            random_k=records.random_k,
            quantile_bins=records.quantile_bins,
            per_quantile_bin=records.per_quantile_bin,
            max_explanation_chars=max_explanation_chars,
            expected_neurons=None if expected_neurons is None else tuple(int(n) for n in expected_neurons),
            corpus_tokens=corpus_tokens,
            corpus_sequences=corpus_sequences,
        )

    def expected_count(self, k: int) -> int:
        """Records of one kind per neuron: k, or fewer when the corpus has fewer sequences."""
        if self.corpus_sequences is not None:
            return min(k, self.corpus_sequences)
        return k


@dataclass
class QualityReport:
    table: str
    success: bool
    evaluated: int  # expectations evaluated
    failed: int
    # Per failed expectation: expectation type, description, column(s), unexpected_count,
    # a few unexpected values (or missing values for coverage), observed value.
    failures: list[dict] = field(default_factory=list)
    # A sample (<= 20 rows) of the rows that break any expectation, with their row index and
    # the descriptions of the expectations they break.
    failing_rows: pl.DataFrame = field(default_factory=pl.DataFrame)
    rows: int = 0

    def summary(self) -> str:
        if self.success:
            return f"{self.table}: all {self.evaluated} expectations passed on {self.rows} rows"
        parts = []
        for failure in self.failures:
            text = failure["description"]
            if failure.get("exception"):
                text += f" (error: {failure['exception']})"
            elif failure.get("missing_count"):
                text += f" ({failure['missing_count']} missing, e.g. {failure.get('missing_values', [])[:5]})"
            elif failure.get("unexpected_count"):
                text += f" ({failure['unexpected_count']} rows, e.g. {failure.get('unexpected_values', [])[:3]})"
            elif failure.get("observed_value") is not None:
                text += f" (observed {failure['observed_value']})"
            parts.append(text)
        return f"{self.table}: {self.failed} of {self.evaluated} expectations failed: " + "; ".join(parts)

    def failing_rows_markdown(self, max_cell_chars: int = 60) -> str:
        """The failing rows as a Markdown table, long lists and strings shortened."""
        if self.failing_rows.is_empty():
            return "(no failing rows)"
        columns = self.failing_rows.columns

        def cell(value: Any) -> str:
            if isinstance(value, list):
                head = ", ".join(_cell_text(v) for v in value[:6])
                text = f"[{head}{', ...' if len(value) > 6 else ''}] ({len(value)} items)"
            else:
                text = _cell_text(value)
            text = text if len(text) <= max_cell_chars else text[: max_cell_chars - 3] + "..."
            return text.replace("|", "\\|").replace("\n", " ")

        lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        for row in self.failing_rows.iter_rows():
            lines.append("| " + " | ".join(cell(v) for v in row) + " |")
        return "\n".join(lines)

    def to_metadata(self) -> dict[str, Any]:
        """Plain JSON-able dict (for Dagster asset-check metadata)."""
        return {
            "table": self.table,
            "success": self.success,
            "rows": self.rows,
            "evaluated": self.evaluated,
            "failed": self.failed,
            "summary": self.summary(),
            "failures": self.failures,
        }


# --------------------------------------------------------------------------- GX context

_LOCK = threading.RLock()
_CONTEXT: Any = None
_BATCH_DEFINITIONS: dict[str, Any] = {}
_DATASOURCE = "neuron_pipeline_lake"


def gx_context() -> Any:
    """The process-wide ephemeral GX context (created once, progress bars off)."""
    global _CONTEXT
    with _LOCK:
        if _CONTEXT is None:
            import great_expectations as gx
            from great_expectations.data_context.types.base import ProgressBarsConfig

            context = gx.get_context(mode="ephemeral")
            context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
            context.data_sources.add_pandas(_DATASOURCE)
            _CONTEXT = context
        return _CONTEXT


def _batch_definition(table: str) -> Any:
    with _LOCK:
        if table not in _BATCH_DEFINITIONS:
            datasource = gx_context().data_sources.get(_DATASOURCE)
            asset = datasource.add_dataframe_asset(name=table)
            _BATCH_DEFINITIONS[table] = asset.add_batch_definition_whole_dataframe(f"{table}_whole")
        return _BATCH_DEFINITIONS[table]


# --------------------------------------------------------------------------- suite helpers


def new_suite(table: str) -> Any:
    import great_expectations as gx

    gx_context()  # a suite needs an active context, even one that is never saved
    return gx.ExpectationSuite(name=f"neuron_pipeline.{table}")


def add(suite: Any, description: str, expectation: Any) -> None:
    """Add an expectation with the description that reports will name it by."""
    expectation.description = description
    suite.add_expectation(expectation)


def gxe() -> Any:
    import great_expectations.expectations as expectations

    return expectations


def add_not_null(suite: Any, columns: Sequence[str]) -> None:
    for column in columns:
        add(suite, f"{column} is not null", gxe().ExpectColumnValuesToNotBeNull(column=column))


def add_finite(suite: Any, columns: Sequence[str]) -> None:
    """Not null, not NaN (pandas reads both as missing) and not infinite."""
    for column in columns:
        add(suite, f"{column} is not null/NaN", gxe().ExpectColumnValuesToNotBeNull(column=column))
        add(
            suite,
            f"{column} is finite",
            gxe().ExpectColumnValuesToBeBetween(column=column, min_value=-FLOAT_MAX, max_value=FLOAT_MAX),
        )


def add_between(
    suite: Any, column: str, min_value: float | None, max_value: float | None, description: str | None = None
) -> None:
    if description is None:
        if min_value is not None and max_value is not None:
            description = (
                f"{column} == {_fmt(min_value)}" if min_value == max_value else f"{column} in [{_fmt(min_value)}, {_fmt(max_value)}]"
            )
        elif min_value is not None:
            description = f"{column} >= {_fmt(min_value)}"
        else:
            description = f"{column} <= {_fmt(max_value)}"
    add(suite, description, gxe().ExpectColumnValuesToBeBetween(column=column, min_value=min_value, max_value=max_value))


def add_common(suite: Any, table: str, not_null: Sequence[str]) -> None:
    """Non-empty table, required columns present, unique keys, partition column well-formed."""
    add(suite, f"{table} is not empty", gxe().ExpectTableRowCountToBeBetween(min_value=1))
    keys = KEYS[table]
    add_not_null(suite, list(dict.fromkeys([*keys, *not_null])))
    if len(keys) == 1:
        add(suite, f"{keys[0]} is unique", gxe().ExpectColumnValuesToBeUnique(column=keys[0]))
    else:
        add(
            suite,
            f"({', '.join(keys)}) is unique",
            gxe().ExpectCompoundColumnsToBeUnique(column_list=list(keys)),
        )
    if PARTITION_COLUMN in SCHEMAS[table].names:
        add(
            suite,
            "layer is a decimal layer index",
            gxe().ExpectColumnValuesToMatchRegex(column=PARTITION_COLUMN, regex=r"^[0-9]+$"),
        )
    if "neuron" in SCHEMAS[table].names:
        add_between(suite, "neuron", 0, None)


def add_coverage(suite: Any, params: QualityParams, layers: Sequence[str]) -> None:
    """Every expected neuron is present (in every layer of the frame)."""
    if params.expected_neurons is None:
        return
    expected = sorted(set(params.expected_neurons))
    if len(layers) <= 1:
        where = f" in layer {layers[0]}" if layers else ""
        add(
            suite,
            f"all {len(expected)} expected neurons present{where}",
            gxe().ExpectColumnDistinctValuesToContainSet(column="neuron", value_set=expected),
        )
    else:
        value_set = [f"{layer}/{neuron}" for layer in layers for neuron in expected]
        add(
            suite,
            f"all {len(expected)} expected neurons present in each of {len(layers)} layers",
            gxe().ExpectColumnDistinctValuesToContainSet(column=COVERAGE_COLUMN, value_set=value_set),
        )


def with_coverage_column(frame: pl.DataFrame) -> pl.DataFrame:
    """Adds the "layer/neuron" column used for coverage when a frame holds several layers."""
    if frame.height and frame.get_column(PARTITION_COLUMN).n_unique() > 1:
        return frame.with_columns(
            (pl.col(PARTITION_COLUMN) + pl.lit("/") + pl.col("neuron").cast(pl.String)).alias(COVERAGE_COLUMN)
        )
    return frame


# --------------------------------------------------------------------------- derived columns


def list_len(column: str) -> pl.Expr:
    return pl.col(column).list.len().cast(pl.Int64).alias(f"len({column})")


def nonfinite_items(column: str) -> pl.Expr:
    """Number of null / NaN / infinite items of a list column (null for a null list)."""
    return (
        pl.col(column)
        .list.eval(pl.element().is_finite().fill_null(False).not_())
        .list.sum()
        .cast(pl.Int64)
        .alias(f"non-finite items in {column}")
    )


def first_in_group(keys: Sequence[str]) -> pl.Expr:
    """True on the first row (in frame order) of each group."""
    return pl.int_range(pl.len()).over(list(keys)) == 0


# --------------------------------------------------------------------------- running


def validate(
    table: str,
    frame: pl.DataFrame,
    params: QualityParams,
    build_suite: Callable[..., Any],
    prepare: Callable[[pl.DataFrame, QualityParams], pl.DataFrame],
) -> QualityReport:
    schema = SCHEMAS[table]
    typed = pl.from_arrow(schema.empty_table()).schema
    missing_columns = [name for name in schema.names if name not in frame.columns]
    original = frame
    if missing_columns:
        # Fill absent columns with typed nulls so that the suite still runs and reports.
        frame = frame.with_columns([pl.lit(None, dtype=typed[name]).alias(name) for name in missing_columns])
    # Untyped all-null columns (dtype Null, e.g. from a dict of Nones) get the schema's type.
    untyped = [c for c in typed if c in frame.columns and frame.schema[c] == pl.Null]
    if untyped:
        frame = frame.with_columns([pl.col(c).cast(typed[c]) for c in untyped])
    prepared = prepare(frame, params)
    layers: list[str] = []
    if PARTITION_COLUMN in prepared.columns and prepared.height:
        layers = sorted(
            (v for v in prepared.get_column(PARTITION_COLUMN).unique().to_list() if v is not None),
            key=lambda v: (len(v), v),
        )
    suite = build_suite(params, layers)
    scalar = prepared.select(
        [name for name, dtype in prepared.schema.items() if not dtype.is_nested() and dtype != pl.Object]
    )
    pandas_frame = scalar.to_pandas()

    with _LOCK:
        batch = _batch_definition(table).get_batch(batch_parameters={"dataframe": pandas_frame})
        result = batch.validate(
            suite,
            result_format={
                "result_format": "COMPLETE",
                "partial_unexpected_count": UNEXPECTED_VALUES_LIMIT,
                "return_unexpected_index_query": False,
            },
        )
    return _report(table, original, prepared, result, missing_columns)


def _report(
    table: str, original: pl.DataFrame, prepared: pl.DataFrame, result: Any, missing_columns: list[str]
) -> QualityReport:
    failures: list[dict] = []
    row_failures: dict[int, list[str]] = {}
    if missing_columns:
        # Checked before GX: absent columns were filled with nulls so the suite could still run.
        failures.append(
            {
                "expectation": "expect_table_columns_to_match_set",
                "description": f"all {table} columns of lake/schemas.py present",
                "columns": missing_columns,
                "missing_count": len(missing_columns),
                "missing_values": missing_columns,
                "unexpected_count": len(missing_columns),
            }
        )
    for item in result.results:
        if item.success:
            continue
        config = item.expectation_config
        kwargs = {k: v for k, v in dict(config.kwargs).items() if k != "batch_id"}
        description = config.description or config.type
        failure: dict[str, Any] = {"expectation": config.type, "description": description}
        if "column" in kwargs:
            failure["column"] = kwargs["column"]
        for key in ("column_list", "column_A", "column_B"):
            if key in kwargs:
                failure.setdefault("columns", [])
                failure["columns"] += kwargs[key] if isinstance(kwargs[key], list) else [kwargs[key]]
        for key in ("min_value", "max_value"):
            if kwargs.get(key) is not None:
                failure[key] = _jsonable(kwargs[key])
        res = dict(item.result or {})
        exception = (item.exception_info or {}).get("exception_message") if isinstance(item.exception_info, dict) else None
        if exception is None and isinstance(item.exception_info, dict):
            # GX nests exception info per metric when several metrics failed.
            for info in item.exception_info.values():
                if isinstance(info, dict) and info.get("raised_exception"):
                    exception = info.get("exception_message")
                    break
        if exception:
            failure["exception"] = str(exception)[:300]
        if "missing_count" in res and "partial_missing_list" in res:
            failure["missing_count"] = int(res["missing_count"])
            failure["missing_values"] = [_jsonable(v) for v in res["partial_missing_list"][:MISSING_VALUES_LIMIT]]
            failure["unexpected_count"] = int(res["missing_count"])
        elif "unexpected_count" in res:
            failure["unexpected_count"] = int(res["unexpected_count"])
            failure["element_count"] = int(res.get("element_count", 0))
            failure["unexpected_percent"] = round(float(res.get("unexpected_percent") or 0.0), 4)
            values = res.get("partial_unexpected_list") or []
            column = failure.get("column")
            failure["unexpected_values"] = [
                _jsonable(v, integral=_is_integer_column(prepared, column)) for v in values[:UNEXPECTED_VALUES_LIMIT]
            ]
            for index in res.get("unexpected_index_list") or []:
                if isinstance(index, (int,)) or hasattr(index, "__index__"):
                    row_failures.setdefault(int(index), []).append(description)
        else:
            failure["unexpected_count"] = None
        if "observed_value" in res and res["observed_value"] is not None:
            failure["observed_value"] = _jsonable(_truncate_list(res["observed_value"]))
        failures.append(failure)

    failing_rows = original.clear()
    if row_failures and original.height:
        rows = sorted(row_failures)[:FAILING_ROWS_LIMIT]
        failing_rows = (
            original.with_row_index(ROW_COLUMN)
            .filter(pl.col(ROW_COLUMN).is_in(rows))
            .with_columns(
                pl.col(ROW_COLUMN).cast(pl.Int64),
                pl.Series(FAILED_COLUMN, ["; ".join(dict.fromkeys(row_failures[r])) for r in rows]),
            )
        )
    evaluated = len(result.results) + (1 if missing_columns else 0)
    return QualityReport(
        table=table,
        success=bool(result.success) and not missing_columns,
        evaluated=evaluated,
        failed=len(failures),
        failures=failures,
        failing_rows=failing_rows,
        rows=original.height,
    )


def _is_integer_column(frame: pl.DataFrame, column: str | None) -> bool:
    return column is not None and column in frame.columns and frame.schema[column].is_integer()


def _truncate_list(value: Any) -> Any:
    if isinstance(value, (list, tuple)) and len(value) > MISSING_VALUES_LIMIT:
        return list(value[:MISSING_VALUES_LIMIT]) + [f"... {len(value) - MISSING_VALUES_LIMIT} more"]
    return value


def _jsonable(value: Any, integral: bool = False) -> Any:
    """Plain Python for metadata: numpy scalars unwrapped, NaN/inf as strings, long text cut."""
    if value is None:
        return None
    if hasattr(value, "item") and not isinstance(value, (list, tuple, dict, str)):
        try:
            value = value.item()
        except (ValueError, TypeError):
            pass
    if isinstance(value, float):
        if math.isnan(value):
            return "NaN"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        if integral and value.is_integer():
            return int(value)
        return value
    if isinstance(value, (bool, int)):
        return value
    if isinstance(value, str):
        return value if len(value) <= VALUE_CHARS_LIMIT else value[:VALUE_CHARS_LIMIT] + f"... ({len(value)} chars)"
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, integral) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v, integral) for k, v in value.items()}
    return _jsonable(str(value))


def _cell_text(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _fmt(value: float | None) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)
