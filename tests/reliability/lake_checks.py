"""Checks of a lake after faults: every Delta version readable, keys unique, slices complete."""

from __future__ import annotations

import json
import os
import sqlite3
import threading
from pathlib import Path
from typing import Any

import polars as pl
from deltalake import DeltaTable

from neuron_pipeline.lake import KEYS, SCHEMAS, table_path

ROOT = Path(__file__).resolve().parents[2]
ARTIFACT = ROOT / "artifacts" / "reliability.json"
_artifact_lock = threading.Lock()

# The columns that name one slice a write replaces, per table; a slice must be complete.
SLICES = {
    "neuron_activations": ["layer"],
    "activation_records": ["layer"],
    "explanations": ["layer", "explainer_id"],
    "simulations": ["layer", "explainer_id", "simulator_id"],
    "scores": ["layer", "explainer_id", "simulator_id"],
}


def record(section: str, data: dict[str, Any]) -> None:
    """Merge one test's figures into artifacts/reliability.json (RELIABILITY.md is made from it)."""
    with _artifact_lock:
        ARTIFACT.parent.mkdir(parents=True, exist_ok=True)
        try:
            current = json.loads(ARTIFACT.read_text())
        except (OSError, ValueError):
            current = {}
        current[section] = data
        temporary = ARTIFACT.with_suffix(".tmp")
        temporary.write_text(json.dumps(current, indent=2, sort_keys=True, default=str))
        os.replace(temporary, ARTIFACT)


def settings_variables() -> list[str]:
    """Environment variables that change the pipeline's settings or Dagster instance (a test run
    must not pick them up from the developer's shell or `make test`); the model cache stays."""
    return [k for k in os.environ if k.startswith("NEURON_PIPELINE__") or k in ("NEURON_PIPELINE_CONFIG", "NEURON_PIPELINE_PROFILE", "DAGSTER_HOME")]


def tables_in(lake: Path) -> list[str]:
    return [t for t in SCHEMAS if DeltaTable.is_deltatable(str(table_path(lake, t)))]


def duplicate_keys(frame: pl.DataFrame, table: str) -> int:
    keys = KEYS[table]
    if frame.is_empty():
        return 0
    return frame.height - frame.select(keys).unique().height


def incomplete_slices(frame: pl.DataFrame, table: str, neurons: set[int], per_neuron: dict[str, int] | None = None) -> list[str]:
    """Slices (e.g. one layer of activation_records) that lack a neuron, or whose neurons lack rows."""
    if table not in SLICES or frame.is_empty():
        return []
    problems = []
    for key, group in frame.group_by(SLICES[table]):
        found = set(group["neuron"].to_list())
        if found != neurons:
            problems.append(f"{table} {dict(zip(SLICES[table], key))}: neurons {sorted(found)} != {sorted(neurons)}")
        if per_neuron and table in per_neuron:
            counts = group.group_by("neuron").len()
            short = counts.filter(pl.col("len") != per_neuron[table])
            if short.height:
                problems.append(f"{table} {dict(zip(SLICES[table], key))}: rows per neuron {dict(short.iter_rows())}")
    return problems


def check_all_versions(
    lake: Path, neurons: set[int], per_neuron: dict[str, int] | None = None, complete: tuple[str, ...] | None = None
) -> dict[str, int]:
    """Read every table at every version (deltalake and polars); each must load, have unique keys
    and complete slices (of the ``complete`` tables; all by default). Returns versions checked per table."""
    checked = {}
    for table in tables_in(lake):
        path = str(table_path(lake, table))
        latest = DeltaTable(path).version()
        for version in range(latest + 1):
            arrow = DeltaTable(path, version=version).to_pyarrow_table()
            frame = pl.read_delta(path, version=version)
            assert frame.height == arrow.num_rows, (table, version)
            assert duplicate_keys(frame, table) == 0, f"{table} v{version} has duplicate keys"
            problems = incomplete_slices(frame, table, neurons, per_neuron) if complete is None or table in complete else []
            assert not problems, f"{table} v{version}: {problems}"
        checked[table] = latest + 1
    return checked


def cache_rows(lake: Path, kind: str | None = None) -> int:
    """Answers in the lake's LLM cache (of one kind: "chat" or "value_distributions")."""
    path = lake / "_llm_cache" / "calls.sqlite"
    if not path.exists():
        return 0
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30) as db:
        if kind is None:
            return db.execute("SELECT count(*) FROM calls").fetchone()[0]
        return db.execute("SELECT count(*) FROM calls WHERE kind = ?", (kind,)).fetchone()[0]


def cache_integrity(lake: Path) -> str:
    path = lake / "_llm_cache" / "calls.sqlite"
    if not path.exists():
        return "absent"
    with sqlite3.connect(str(path), timeout=30) as db:
        return db.execute("PRAGMA integrity_check").fetchone()[0]


def delta_version(lake: Path, table: str) -> int:
    path = str(table_path(lake, table))
    return DeltaTable(path).version() if DeltaTable.is_deltatable(path) else -1


def final_content(lake: Path) -> dict[str, pl.DataFrame]:
    """The result tables without volatile columns, sorted by key, for comparing two lakes."""
    out = {}
    for table in ("neuron_activations", "activation_records", "explanations", "simulations", "scores", "layer_summary"):
        frame = pl.read_delta(str(table_path(lake, table)))
        frame = frame.drop([c for c in ("created_at",) if c in frame.columns])
        out[table] = frame.sort(KEYS[table])
    return out


def write_small_corpus(folder: Path, chars: int = 60_000) -> Path:
    """A text file with the opening of Pride and Prejudice (about 230 windows of 64 tokens): real
    prose that tokenizes in a fraction of a second, where all six novels take seconds per run."""
    from neuron_pipeline.corpus import fetch_janeausten

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "pride-and-prejudice-opening.txt"
    text = (fetch_janeausten() / "prideprejudice.txt").read_text(encoding="utf-8")
    path.write_text(text[:chars], encoding="utf-8")
    return path
