"""Read and write the lake's Delta tables (deltalake + polars).

Each write replaces one slice of a table — a layer partition, or a layer and explainer id —
in a single Delta commit (``overwrite`` with a predicate), so a reader sees either the old
slice or the new one, never half of it, and other partitions are never touched.

Every function takes the lake as a ``Lake`` (lake/location.py: a local folder or an object-store
URI with its storage options) or as a plain folder path or URI.
"""

from __future__ import annotations

import os
import random
import time
from typing import Any, Iterable, Mapping

import polars as pl
import pyarrow as pa
from deltalake import CommitProperties, DeltaTable, Schema, WriterProperties, write_deltalake
from deltalake.exceptions import CommitFailedError, DeltaError, TableNotFoundError

from neuron_pipeline.lake.location import Lake, LakeError
from neuron_pipeline.lake.schemas import NEURON_ROW_GROUP_ROWS, PARTITION_COLUMN, SCHEMAS

LakeLike = Lake | str | os.PathLike[str]

# Two writers replacing the same slice of one table at the same time (two runs of one layer) race
# on the next Delta version; the loser's commit fails and the whole write is redone against the
# new table state, a bounded number of times with jittered backoff. When two writers *create* a
# table at once, deltalake's own commit retry would rebase the loser's create onto the winner's
# as a plain add (no conflict found: the loser read nothing) and the slice would hold both
# writers' rows: creating writes therefore run without it.
COMMIT_ATTEMPTS = 10
_COMMIT_BACKOFF_S = 0.05
_COMMIT_BACKOFF_MAX_S = 2.0


def table_path(lake: LakeLike, table: str) -> str:
    """Where a table is: its folder in a local lake, its URI in object storage."""
    if table not in SCHEMAS:
        raise LakeError(f"unknown table {table!r}: tables are {', '.join(SCHEMAS)}")
    return Lake.of(lake).table(table)


def _locate(lake: LakeLike, table: str) -> tuple[Lake, str]:
    lake = Lake.of(lake)
    return lake, table_path(lake, table)


def _is_table(lake: Lake, path: str) -> bool:
    try:
        return DeltaTable.is_deltatable(path, storage_options=lake.options())
    except OSError as exc:
        raise lake.storage_error(exc) from None


def _open(lake: Lake, path: str, version: int | None = None) -> DeltaTable:
    try:
        return DeltaTable(path, version=version, storage_options=lake.options())
    except OSError as exc:
        raise lake.storage_error(exc) from None


def table_exists(lake: LakeLike, table: str) -> bool:
    return _is_table(*_locate(lake, table))


def open_table(lake: LakeLike, table: str, version: int | None = None) -> DeltaTable:
    lake, path = _locate(lake, table)
    try:
        return _open(lake, path, version)
    except TableNotFoundError:
        raise LakeError(f"table {table!r} not found at {path}: materialize it first") from None


def to_arrow(table: str, data: pl.DataFrame | pa.Table | Iterable[Mapping[str, Any]]) -> pa.Table:
    """Cast rows to the table's schema; absent columns must be nullable and become null."""
    schema = SCHEMAS[table]
    if isinstance(data, pl.DataFrame):
        arrow = data.to_arrow()
    elif isinstance(data, pa.Table):
        arrow = data
    else:
        rows = list(data)
        # Keys are checked here: pa.Table.from_pylist(schema=...) would silently drop unknown ones.
        names = list(dict.fromkeys(key for row in rows for key in row))
        _reject_unknown(table, names)
        try:
            arrow = pa.Table.from_pylist(rows, schema=pa.schema([schema.field(n) for n in names]))
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            # e.g. an int layer for the string partition column: infer, then cast below.
            try:
                arrow = pa.Table.from_pylist(rows)
            except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
                raise LakeError(f"rows do not fit the {table!r} schema: {exc}") from None
    _reject_unknown(table, arrow.column_names)
    columns = []
    for field in schema:
        if field.name in arrow.column_names:
            try:
                columns.append(arrow.column(field.name).cast(field.type))
            except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as exc:
                raise LakeError(
                    f"column {field.name!r} of {table!r} cannot be stored as {field.type}: {exc}"
                ) from None
        else:
            columns.append(pa.nulls(arrow.num_rows, type=field.type))
    return pa.Table.from_arrays(columns, schema=schema)


def _reject_unknown(table: str, names: Iterable[str]) -> None:
    unknown = [c for c in names if c not in SCHEMAS[table].names]
    if unknown:
        raise LakeError(f"columns {unknown} are not in the {table!r} schema (lake/schemas.py)")


def _is_text(table: str, column: str) -> bool:
    return pa.types.is_string(SCHEMAS[table].field(column).type)


def _literal(value: Any, text: bool = False) -> str:
    """A SQL literal; values of text columns are always quoted (layer 3 means '3')."""
    if not text and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return "'" + str(value).replace("'", "''") + "'"


def _predicate(where: Mapping[str, Any], table: str | None = None) -> str:
    clauses = []
    for column, value in where.items():
        text = table is not None and _is_text(table, column)
        if isinstance(value, (list, tuple, set)):
            values = sorted(value, key=str)
            clauses.append(f"{column} IN ({', '.join(_literal(v, text) for v in values)})")
        else:
            clauses.append(f"{column} = {_literal(value, text)}")
    return " AND ".join(clauses)


def check_table_schema(lake: LakeLike, table: str) -> None:
    """Raise ``LakeError`` when a Delta table exists at the table's path with another schema
    (nothing to check when there is no table yet)."""
    lake, path = _locate(lake, table)
    if _is_table(lake, path):
        _check_existing_schema(lake, path, table)


def _check_existing_schema(lake: Lake, path: str, table: str) -> list[str]:
    """Refuse to write into a Delta table whose columns, types or partitioning differ from ours.

    Columns this version of the schema added at its end (nullable, e.g. the labels) are not a
    difference: they are returned, and ``write_table`` adds them before writing (old rows read
    them as null)."""
    try:
        existing_table = _open(lake, path)
    except DeltaError as exc:
        raise LakeError(
            f"the Delta table at {path} cannot be read ({str(exc).splitlines()[0][:160]}): "
            "move it away or point --lake at another folder or URI"
        ) from None
    existing = {f.name: str(f.type) for f in existing_table.schema().fields}
    expected = {f.name: str(f.type) for f in Schema.from_arrow(SCHEMAS[table]).fields}
    missing = [name for name in expected if name not in existing]
    names = list(expected)
    addable = missing if missing == names[len(names) - len(missing) :] else []
    missing = [name for name in missing if name not in addable]
    extra = [name for name in existing if name not in expected]
    retyped = [f"{name} is {existing[name]}, not {expected[name]}" for name in expected if name in existing and existing[name] != expected[name]]
    want_partitions = [PARTITION_COLUMN] if PARTITION_COLUMN in SCHEMAS[table].names else []
    partitions = list(existing_table.metadata().partition_columns)
    problems = []
    if missing:
        problems.append(f"missing {missing}")
    if extra:
        problems.append(f"unexpected {extra}")
    if retyped:
        problems.append("; ".join(retyped))
    if partitions != want_partitions:
        problems.append(f"partitioned by {partitions}, not {want_partitions}")
    if problems:
        raise LakeError(
            f"the Delta table at {path} does not have the {table!r} schema ({'; '.join(problems)}): "
            "move it away or point --lake at another folder or URI"
        )
    return addable


def _add_columns(lake: Lake, path: str, table: str, columns: list[str]) -> None:
    """Add columns a newer schema appended (nullable) to an existing table: a metadata-only commit."""
    fields = Schema.from_arrow(pa.schema([SCHEMAS[table].field(name) for name in columns])).fields
    _open(lake, path).alter.add_columns(fields)


def write_table(
    lake: LakeLike,
    table: str,
    data: pl.DataFrame | pa.Table | Iterable[Mapping[str, Any]],
    replace_where: Mapping[str, Any] | None = None,
) -> int:
    """Atomically replace the rows matching ``replace_where`` (all rows if None) by ``data``.

    Returns the new table version.
    """
    arrow = to_arrow(table, data)
    lake, path = _locate(lake, table)
    partitioned = PARTITION_COLUMN in SCHEMAS[table].names
    if replace_where:
        bad = [c for c in replace_where if c not in SCHEMAS[table].names]
        if bad:
            raise LakeError(f"cannot replace rows of {table!r} by unknown columns {bad}")
        # Rows outside the slice being replaced would be silently dropped: refuse instead.
        for column, value in replace_where.items():
            allowed = {str(v) for v in value} if isinstance(value, (list, tuple, set)) else {str(value)}
            found = {str(v) for v in arrow.column(column).unique().to_pylist()}
            if found - allowed:
                raise LakeError(f"rows for {column}={sorted(found - allowed)} fall outside the slice being written")
    row_group = NEURON_ROW_GROUP_ROWS.get(table)
    writer_properties = WriterProperties(max_row_group_size=row_group) if row_group else None
    rng = random.Random()
    for attempt in range(COMMIT_ATTEMPTS):
        exists = _is_table(lake, path)
        if exists:
            added = _check_existing_schema(lake, path, table)
            if added:
                _add_columns(lake, path, table, added)
        elif lake.folder is not None:  # object stores have no folders to create
            try:
                lake.folder.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise LakeError(f"cannot create the lake folder {lake.folder}: {exc.strerror or exc}") from None
        try:
            write_deltalake(
                path,
                arrow,
                mode="overwrite",
                partition_by=[PARTITION_COLUMN] if partitioned else None,
                predicate=_predicate(replace_where, table) if replace_where else None,
                schema_mode=None,
                # Creating: no rebasing onto a concurrent create (see COMMIT_ATTEMPTS). On an existing
                # table deltalake's own retry is sound (it checks what the other commit touched) and
                # saves redoing writes of other slices.
                commit_properties=None if exists else CommitProperties(max_commit_retries=0),
                writer_properties=writer_properties,
                storage_options=lake.options(),
            )
            break
        except OSError as exc:
            raise lake.storage_error(exc) from None
        except DeltaError as exc:
            if not _is_commit_conflict(exc) or attempt == COMMIT_ATTEMPTS - 1:
                tried = f" (after {attempt + 1} attempts)" if attempt else ""
                raise LakeError(f"cannot write {table!r} at {path}{tried}: {exc}") from None
            time.sleep(min(_COMMIT_BACKOFF_MAX_S, _COMMIT_BACKOFF_S * 2**attempt) * rng.uniform(0.5, 1.5))
    return _open(lake, path).version()


def _is_commit_conflict(exc: DeltaError) -> bool:
    """A commit lost to a concurrent writer (worth redoing on the new table state)."""
    if isinstance(exc, CommitFailedError):
        return True
    text = str(exc).lower()
    # Two writers creating the same table: both try to write version 0.
    return "already exists" in text and "version" in text


def read_table(
    lake: LakeLike,
    table: str,
    where: Mapping[str, Any] | None = None,
    columns: list[str] | None = None,
    version: int | None = None,
) -> pl.DataFrame:
    """Read a table (optionally filtered by equality/IN on columns); empty if it does not exist."""
    lake, path = _locate(lake, table)
    names = SCHEMAS[table].names
    unknown = [c for c in [*(where or {}), *(columns or [])] if c not in names]
    if unknown:
        raise LakeError(f"columns {unknown} are not in the {table!r} schema: columns are {', '.join(names)}")
    if not _is_table(lake, path):
        empty = pl.from_arrow(SCHEMAS[table].empty_table())
        return empty.select(columns) if columns else empty
    frame = pl.scan_delta(path, version=version, storage_options=lake.options())
    try:
        present = frame.collect_schema().names()
    except DeltaError as exc:
        raise LakeError(f"cannot read {table!r} at {path} (version={version}): {exc}") from None
    except OSError as exc:
        raise lake.storage_error(exc) from None
    absent = [name for name in names if name not in present]
    if absent:  # columns a newer schema appended, not yet added to this table: null
        dtypes = pl.from_arrow(SCHEMAS[table].empty_table()).schema
        frame = frame.with_columns(pl.lit(None, dtype=dtypes[name]).alias(name) for name in absent)
    for column, value in (where or {}).items():
        text = _is_text(table, column)
        if isinstance(value, (list, tuple, set)):
            frame = frame.filter(pl.col(column).is_in([str(v) if text else v for v in value]))
        else:
            frame = frame.filter(pl.col(column) == (str(value) if text else value))
    if columns:
        frame = frame.select(columns)
    try:
        return frame.collect()
    except DeltaError as exc:
        raise LakeError(f"cannot read {table!r} at {path} (version={version}): {exc}") from None
    except OSError as exc:
        raise lake.storage_error(exc) from None


def table_frame(table: str, rows: pl.DataFrame | pa.Table | Iterable[Mapping[str, Any]]) -> pl.DataFrame:
    """Rows as a polars frame typed exactly like the table (absent nullable columns become null)."""
    return pl.from_arrow(to_arrow(table, rows))
