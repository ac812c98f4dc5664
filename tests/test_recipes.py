"""Every recipe in README's "Reading the tables" section runs against a real lake.

The code blocks are taken from README.md itself and executed from the folder that holds the
``lake/`` directory (the recipes use the relative path ``lake/<table>``, as a user would from the
project folder), so the README cannot rot. Spark runs only where pyspark and the Delta JARs are
available offline (``DELTA_SPARK_JARS``); otherwise that recipe is skipped with the reason.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import shutil
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
SECTION = "## Reading the tables"


def _blocks(language: str) -> list[str]:
    text = README.read_text(encoding="utf-8")
    assert SECTION in text, f"README.md has no {SECTION!r} section"
    section = text.split(SECTION, 1)[1]
    section = re.split(r"^## ", section, maxsplit=1, flags=re.M)[0]
    return re.findall(rf"^```{language}\n(.*?)^```", section, flags=re.S | re.M)


PYTHON = _blocks("python")
BASH = _blocks("bash")


def _name(block: str) -> str:
    for key in ("pyspark", "delta_scan", "lake.sql", "to_pyarrow_dataset", "to_pandas", "version=", "scan_delta"):
        if key in block:
            return {"lake.sql": "duckdb-connect", "version=": "time-travel", "scan_delta": "polars"}.get(key, key)
    return "recipe"


def test_readme_has_every_kind_of_recipe():
    text = "\n".join(PYTHON)
    for needle in ("pl.scan_delta(", "version=", "delta_scan(", "neuron_pipeline.lake.sql import connect",
                   "LOAD '", "to_pyarrow_dataset()", "to_pandas(", 'spark.read.format("delta")'):
        assert needle in text, needle
    assert any("neuron-pipeline query" in block for block in BASH)
    for block in PYTHON:  # the Spark recipe, skipped below without JARs, at least compiles
        compile(block, "README.md recipe", "exec")


def _spark_ready() -> str | None:
    """Why the Spark recipe cannot run here, or None when it can."""
    if importlib.util.find_spec("pyspark") is None:
        return "pyspark is not installed"
    jars = os.environ.get("DELTA_SPARK_JARS")
    if not jars or not any(Path(jars).glob("delta-spark*.jar")):
        return "no Delta Lake JARs: Spark fetches them from Maven, which is unreachable offline (set DELTA_SPARK_JARS)"
    return None


@pytest.fixture(scope="module")
def project(small_lake, tmp_path_factory):
    """A project folder holding a copy of the small lake with a second version of `explanations`
    (layer 1 re-explained), so time travel has an earlier version to go back to."""
    import polars as pl

    from neuron_pipeline.lake import read_table, write_table

    root = tmp_path_factory.mktemp("project")
    shutil.copytree(small_lake, root / "lake")
    revised = read_table(root / "lake", "explanations", where={"layer": "1"}).with_columns(
        explanation=pl.lit("revised: ") + pl.col("explanation")
    )
    write_table(root / "lake", "explanations", revised, replace_where={"layer": "1"})
    return root


@pytest.mark.parametrize("block", PYTHON, ids=[f"{i}-{_name(b)}" for i, b in enumerate(PYTHON)])
def test_python_recipe_runs(block, project, monkeypatch, capsys):
    from neuron_pipeline.lake import read_table

    if "pyspark" in block:
        reason = _spark_ready()
        if reason:
            pytest.skip(f"Spark recipe not run: {reason}")
    monkeypatch.chdir(project)  # the recipes read lake/<table> relative to the project folder
    assert (Path("lake") / "scores").is_dir()
    namespace: dict = {"__name__": "__recipe__"}
    exec(compile(block, "README.md recipe", "exec"), namespace)
    # The recipes must produce data, not just run: check what they bound or printed.
    out = capsys.readouterr().out
    if "scan_delta" in block:
        assert namespace["layer"].height > 0 and set(namespace["layer"]["layer"]) == {"1"}
        assert namespace["best"].height > 0 and "explanation" in namespace["best"].columns
        scores = namespace["best"]["score"].drop_nulls().to_list()
        assert scores == sorted(scores, reverse=True)
    if "version=" in block:
        layer1 = read_table("lake", "explanations", where={"layer": "1"}).height
        assert len(namespace["history"]) >= 2
        assert namespace["before"].height == namespace["now"].height
        assert not namespace["before"]["explanation"].str.starts_with("revised: ").any()
        assert namespace["changed"].height == layer1 > 0  # exactly the re-explained layer
    if "to_pandas" in block:
        assert len(namespace["scores"]) > 0 and set(namespace["explanations"]["layer"]) == {"1"}
    if "list_cosine_similarity" in block:  # the SQL search ranks like `neuron-pipeline search`
        from neuron_pipeline.lake.search import search

        expected = search("lake", "names of people", top=5)
        assert namespace["hits"].height == 5
        assert namespace["hits"].select("layer", "neuron", "explainer_id").rows() == expected.select(
            "layer", "neuron", "explainer_id").rows()
    if "to_pyarrow_dataset" in block or "delta_scan" in block or "connect(" in block:
        assert out.strip(), "the DuckDB recipe printed nothing"
        assert "1" in out


@pytest.mark.parametrize("line", [line for block in BASH for line in block.splitlines() if line.startswith("neuron-pipeline query")])
def test_cli_recipe_runs(line, small_lake, monkeypatch, tmp_path, capsys):
    from neuron_pipeline.cli import main

    monkeypatch.chdir(tmp_path)
    args = shlex.split(line)[1:] + ["--lake", str(small_lake)]
    assert main(args) == 0
    out = capsys.readouterr().out
    if "--out" in args:
        target = tmp_path / args[args.index("--out") + 1]
        assert target.is_file() and target.stat().st_size > 0
    else:
        assert "avg(score)" in out or "count" in out
