"""SQL over the lake with DuckDB: every existing table is a view of the same name."""

from __future__ import annotations

import importlib.util
import platform
from pathlib import Path

import duckdb

from neuron_pipeline.lake.io import Lake, LakeLike, open_table, table_exists, table_path
from neuron_pipeline.lake.schemas import SCHEMAS


def _delta_extension() -> Path | None:
    """DuckDB cannot download its delta extension offline; the duckdb-ext-delta wheel ships it."""
    spec = importlib.util.find_spec("duckdb_ext")
    if spec is None or not spec.submodule_search_locations:
        return None
    arch = {"x86_64": "amd64", "aarch64": "arm64", "arm64": "arm64"}.get(platform.machine(), platform.machine())
    root = Path(list(spec.submodule_search_locations)[0]) / "extensions" / f"v{duckdb.__version__}"
    candidate = root / f"linux_{arch}" / "delta.duckdb_extension"
    return candidate if candidate.is_file() else None


def connect(lake: LakeLike) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection with one view per lake table, read through ``delta_scan``.

    Without the delta extension the tables are read through deltalake -> Arrow instead, and so
    is an object-store lake: ``delta_scan`` on s3:// / gs:// / az:// needs DuckDB's httpfs or
    azure extension, which cannot be downloaded offline and would not see deltalake's storage
    options; the Arrow dataset reads through deltalake with them."""
    lake = Lake.of(lake)
    con = duckdb.connect()
    extension = _delta_extension() if lake.folder is not None else None
    use_delta_scan = False
    if extension is not None:
        try:
            con.execute(f"LOAD '{extension}'")
            use_delta_scan = True
        except duckdb.Error:
            use_delta_scan = False
    for table in SCHEMAS:
        if not table_exists(lake, table):
            continue
        if use_delta_scan:
            path = table_path(lake, table).replace("'", "''")
            con.execute(f"CREATE VIEW {table} AS SELECT * FROM delta_scan('{path}')")
        else:
            con.register(table, open_table(lake, table).to_pyarrow_dataset())
    return con
