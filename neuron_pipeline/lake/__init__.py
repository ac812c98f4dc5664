"""Delta lake tables: schemas, where the lake is (a folder or object storage), reads and atomic
per-partition writes."""

from neuron_pipeline.lake.io import (
    Lake,
    LakeError,
    check_table_schema,
    open_table,
    read_table,
    table_exists,
    table_frame,
    table_path,
    write_table,
)
from neuron_pipeline.lake.schemas import KEYS, PARTITION_COLUMN, PARTITIONED_TABLES, SCHEMAS

__all__ = [
    "KEYS",
    "Lake",
    "LakeError",
    "PARTITIONED_TABLES",
    "PARTITION_COLUMN",
    "SCHEMAS",
    "check_table_schema",
    "open_table",
    "read_table",
    "table_exists",
    "table_frame",
    "table_path",
    "write_table",
]
