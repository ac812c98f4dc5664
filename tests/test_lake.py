"""Lake I/O against real Delta tables: partition-scoped writes, reads, schemas, SQL views."""

from __future__ import annotations

from datetime import datetime, timezone

import polars as pl
import pyarrow as pa
import pytest
from deltalake import DeltaTable, write_deltalake

from neuron_pipeline.lake import (
    KEYS,
    PARTITION_COLUMN,
    PARTITIONED_TABLES,
    SCHEMAS,
    LakeError,
    open_table,
    read_table,
    table_exists,
    table_frame,
    table_path,
    write_table,
)
from neuron_pipeline.lake.io import to_arrow
from neuron_pipeline.lake.sql import connect


def score_rows(layer: int, neurons, explainer_id: str = "exp-a", score: float = 0.5):
    return [
        {
            "model": "m",
            "layer": str(layer),
            "neuron": n,
            "explainer_id": explainer_id,
            "simulator_id": "sim",
            "score": score + n / 100,
            "n_tokens": 64,
        }
        for n in neurons
    ]


def explanation_rows(layer: int, neurons, explainer_id: str, text: str = "x"):
    return [
        {
            "model": "m",
            "layer": str(layer),
            "neuron": n,
            "explainer_id": explainer_id,
            "explanation": f"{text} {n}",
            "created_at": datetime(2024, 1, 1, tzinfo=timezone.utc),
        }
        for n in neurons
    ]


def as_set(frame: pl.DataFrame, *columns: str) -> set[tuple]:
    return set(frame.select(columns).iter_rows())


# ------------------------------------------------------------------------------- schemas


def test_every_table_but_corpus_and_the_evaluation_report_is_partitioned_by_a_string_layer():
    assert PARTITION_COLUMN == "layer"
    # The evaluation suite's report is about explainer/simulator LLMs, not one subject model's layers.
    assert set(PARTITIONED_TABLES) == set(SCHEMAS) - {"corpus_tokens", "evaluations"}
    for table in PARTITIONED_TABLES:
        assert SCHEMAS[table].field("layer").type == pa.string()
    for table, schema in SCHEMAS.items():
        if table != "evaluations":
            assert "model" in schema.names, f"{table} rows must carry the subject model id"
        assert all(k in schema.names for k in KEYS[table])


def test_table_path_and_unknown_table(tmp_path):
    assert table_path(tmp_path, "scores") == str(tmp_path / "scores")
    with pytest.raises(LakeError) as excinfo:
        table_path(tmp_path, "score")
    assert "'score'" in str(excinfo.value) and "scores" in str(excinfo.value)


# ------------------------------------------------------------------------------ to_arrow


def test_to_arrow_fills_absent_nullable_columns_with_nulls():
    arrow = to_arrow("scores", [{"layer": "1", "neuron": 3, "score": 0.25}])
    assert arrow.schema == SCHEMAS["scores"]
    row = arrow.to_pylist()[0]
    assert row["layer"] == "1" and row["neuron"] == 3 and row["score"] == 0.25
    for column in set(SCHEMAS["scores"].names) - {"layer", "neuron", "score"}:
        assert row[column] is None


@pytest.mark.parametrize("kind", ["rows", "polars", "arrow"])
def test_to_arrow_rejects_unknown_columns(kind):
    rows = [{"layer": "1", "neuron": 3, "scroe": 0.25}]
    data = {"rows": rows, "polars": pl.DataFrame(rows), "arrow": pa.Table.from_pylist(rows)}[kind]
    with pytest.raises(LakeError) as excinfo:
        to_arrow("scores", data)
    assert "scroe" in str(excinfo.value)


def test_to_arrow_casts_to_schema_types():
    frame = pl.DataFrame({"layer": [2], "neuron": [7], "activations": [[0.5, 1.5]], "tokens": [["a", "b"]]})
    arrow = to_arrow("activation_records", frame)
    assert arrow.schema == SCHEMAS["activation_records"]
    assert arrow.column("layer").to_pylist() == ["2"]  # int layer becomes the string partition value
    assert arrow.schema.field("activations").type == pa.list_(pa.float32())
    # The same from plain dict rows.
    arrow = to_arrow("activation_records", [{"layer": 2, "neuron": 7}])
    assert arrow.column("layer").to_pylist() == ["2"]


def test_to_arrow_empty_rows_give_empty_typed_table():
    arrow = to_arrow("scores", [])
    assert arrow.num_rows == 0 and arrow.schema == SCHEMAS["scores"]


def test_to_arrow_values_that_do_not_fit_are_a_lake_error():
    with pytest.raises(LakeError) as excinfo:
        to_arrow("scores", pl.DataFrame({"layer": ["1"], "neuron": ["seven"]}))
    assert "neuron" in str(excinfo.value)


def test_table_frame_types():
    frame = table_frame("explanations", explanation_rows(0, [1], "e"))
    assert frame.columns == SCHEMAS["explanations"].names
    assert frame.schema["layer"] == pl.String
    assert frame.schema["neuron"] == pl.Int32
    assert frame.schema["prompt_tokens"] == pl.Int64
    assert frame.schema["created_at"] == pl.Datetime("us", "UTC")
    assert frame["error"].to_list() == [None]
    records = table_frame("activation_records", [{"layer": "0", "neuron": 1, "activations": [1.0], "tokens": ["a"]}])
    assert records.schema["activations"] == pl.List(pl.Float32)
    assert records.schema["tokens"] == pl.List(pl.String)
    assert records.schema["max_activation"] == pl.Float32


# --------------------------------------------------------------------------- write/read


def test_missing_table_reads_as_empty_frame_with_schema(tmp_path):
    assert not table_exists(tmp_path, "scores")
    frame = read_table(tmp_path, "scores")
    assert frame.height == 0
    assert frame.columns == SCHEMAS["scores"].names
    assert frame.schema["neuron"] == pl.Int32
    assert read_table(tmp_path, "scores", columns=["neuron", "score"]).columns == ["neuron", "score"]
    with pytest.raises(LakeError):
        open_table(tmp_path, "scores")


def test_write_creates_layer_partition_folders(tmp_path):
    version = write_table(tmp_path, "scores", score_rows(0, range(3)) + score_rows(12, range(2)))
    assert version == 0
    assert table_exists(tmp_path, "scores")
    folders = sorted(p.name for p in (tmp_path / "scores").iterdir() if p.is_dir() and p.name != "_delta_log")
    assert folders == ["layer=0", "layer=12"]
    assert list((tmp_path / "scores" / "layer=12").glob("*.parquet"))
    assert open_table(tmp_path, "scores").metadata().partition_columns == ["layer"]


def test_replace_where_replaces_only_that_layer(tmp_path):
    write_table(tmp_path, "scores", score_rows(0, range(3), score=0.1), replace_where={"layer": "0"})
    write_table(tmp_path, "scores", score_rows(1, range(4), score=0.2), replace_where={"layer": "1"})
    version = write_table(tmp_path, "scores", score_rows(0, [7], score=0.9), replace_where={"layer": "0"})
    assert version == 2
    frame = read_table(tmp_path, "scores")
    assert as_set(frame, "layer", "neuron") == {("0", 7), ("1", 0), ("1", 1), ("1", 2), ("1", 3)}
    layer1 = read_table(tmp_path, "scores", where={"layer": "1"}).sort("neuron")
    assert layer1["score"].to_list() == pytest.approx([0.2, 0.21, 0.22, 0.23])


def test_versions_increment_and_time_travel(tmp_path):
    versions = [
        write_table(tmp_path, "scores", score_rows(0, range(n)), replace_where={"layer": "0"}) for n in (1, 2, 3)
    ]
    assert versions == [0, 1, 2]
    assert open_table(tmp_path, "scores").version() == 2
    for version, n in zip(versions, (1, 2, 3)):
        assert read_table(tmp_path, "scores", version=version).height == n
    assert read_table(tmp_path, "scores").height == 3
    assert open_table(tmp_path, "scores", version=0).version() == 0
    with pytest.raises(LakeError):
        read_table(tmp_path, "scores", version=17)


def test_replace_where_on_layer_and_explainer_id(tmp_path):
    write_table(
        tmp_path,
        "explanations",
        explanation_rows(0, range(3), "old") + explanation_rows(0, range(3), "new") + explanation_rows(1, range(2), "new"),
    )
    write_table(
        tmp_path,
        "explanations",
        explanation_rows(0, [0], "new", text="revised"),
        replace_where={"layer": "0", "explainer_id": "new"},
    )
    frame = read_table(tmp_path, "explanations")
    assert as_set(frame, "layer", "explainer_id", "neuron") == {
        ("0", "old", 0),
        ("0", "old", 1),
        ("0", "old", 2),
        ("0", "new", 0),
        ("1", "new", 0),
        ("1", "new", 1),
    }
    revised = read_table(tmp_path, "explanations", where={"layer": "0", "explainer_id": "new"})
    assert revised["explanation"].to_list() == ["revised 0"]
    untouched = read_table(tmp_path, "explanations", where={"layer": "1"}).sort("neuron")
    assert untouched["explanation"].to_list() == ["x 0", "x 1"]


def test_replace_where_with_an_integer_layer_value(tmp_path):
    write_table(tmp_path, "scores", score_rows(3, range(2)) + score_rows(4, range(2)))
    write_table(tmp_path, "scores", score_rows(3, [9]), replace_where={"layer": 3})
    assert as_set(read_table(tmp_path, "scores"), "layer", "neuron") == {("3", 9), ("4", 0), ("4", 1)}


def test_write_without_replace_where_replaces_the_whole_table(tmp_path):
    write_table(tmp_path, "scores", score_rows(0, range(2)) + score_rows(1, range(2)))
    write_table(tmp_path, "scores", score_rows(5, [1]))
    assert as_set(read_table(tmp_path, "scores"), "layer", "neuron") == {("5", 1)}


def test_empty_write_clears_only_the_slice(tmp_path):
    write_table(tmp_path, "scores", score_rows(0, range(2)) + score_rows(1, range(2)))
    write_table(tmp_path, "scores", [], replace_where={"layer": "0"})
    assert as_set(read_table(tmp_path, "scores"), "layer", "neuron") == {("1", 0), ("1", 1)}


def test_replace_where_with_a_list_of_layers(tmp_path):
    write_table(tmp_path, "scores", score_rows(0, [0]) + score_rows(1, [0]) + score_rows(2, [0]))
    write_table(tmp_path, "scores", score_rows(0, [5]) + score_rows(2, [5]), replace_where={"layer": ["0", "2"]})
    assert as_set(read_table(tmp_path, "scores"), "layer", "neuron") == {("0", 5), ("1", 0), ("2", 5)}


def test_rows_outside_the_slice_are_refused_and_nothing_is_written(tmp_path):
    write_table(tmp_path, "scores", score_rows(0, range(2)), replace_where={"layer": "0"})
    before = read_table(tmp_path, "scores")
    with pytest.raises(LakeError) as excinfo:
        write_table(tmp_path, "scores", score_rows(0, [5]) + score_rows(1, [5]), replace_where={"layer": "0"})
    assert "layer" in str(excinfo.value) and "'1'" in str(excinfo.value)
    assert open_table(tmp_path, "scores").version() == 0
    assert read_table(tmp_path, "scores").equals(before)


def test_rows_outside_an_explainer_slice_are_refused(tmp_path):
    with pytest.raises(LakeError):
        write_table(
            tmp_path,
            "explanations",
            explanation_rows(0, [0], "a") + explanation_rows(0, [1], "b"),
            replace_where={"layer": "0", "explainer_id": "a"},
        )
    assert not table_exists(tmp_path, "explanations")  # not even an empty table was created


def test_replace_where_on_unknown_column_is_refused(tmp_path):
    with pytest.raises(LakeError):
        write_table(tmp_path, "scores", score_rows(0, [0]), replace_where={"layr": "0"})


def test_predicate_values_with_quotes(tmp_path):
    tricky = "o'brien's \"prompt\" -- ' OR '1'='1"
    write_table(
        tmp_path,
        "explanations",
        explanation_rows(0, range(2), tricky) + explanation_rows(0, range(2), "plain"),
    )
    write_table(
        tmp_path,
        "explanations",
        explanation_rows(0, [9], tricky, text="new"),
        replace_where={"layer": "0", "explainer_id": tricky},
    )
    frame = read_table(tmp_path, "explanations")
    assert as_set(frame, "explainer_id", "neuron") == {(tricky, 9), ("plain", 0), ("plain", 1)}
    only = read_table(tmp_path, "explanations", where={"explainer_id": tricky})
    assert only["neuron"].to_list() == [9]


def test_read_filters_columns_and_in_lists(tmp_path):
    write_table(tmp_path, "scores", score_rows(0, range(5)) + score_rows(1, range(5), explainer_id="exp-b"))
    frame = read_table(tmp_path, "scores", where={"layer": "0", "neuron": [1, 3, 99]}, columns=["neuron", "score"])
    assert frame.columns == ["neuron", "score"]
    assert sorted(frame["neuron"].to_list()) == [1, 3]
    assert sorted(frame["score"].to_list()) == pytest.approx([0.51, 0.53])
    assert read_table(tmp_path, "scores", where={"explainer_id": ("exp-b",)}).height == 5
    assert read_table(tmp_path, "scores", where={"layer": {"0", "1"}, "neuron": 4}).height == 2
    assert read_table(tmp_path, "scores", where={"layer": "7"}).height == 0
    # An integer layer means the string partition value.
    assert read_table(tmp_path, "scores", where={"layer": 1}).height == 5
    assert read_table(tmp_path, "scores", where={"layer": [0, 1]}).height == 10


def test_read_unknown_columns_are_a_lake_error(tmp_path):
    write_table(tmp_path, "scores", score_rows(0, [0]))
    with pytest.raises(LakeError):
        read_table(tmp_path, "scores", where={"nope": 1})
    with pytest.raises(LakeError):
        read_table(tmp_path, "scores", columns=["nope"])


def test_round_trip_keeps_types_and_values(tmp_path):
    rows = [
        {
            "model": "m",
            "layer": "3",
            "neuron": 11,
            "kind": "quantile",
            "rank": 1,
            "quantile_bin": 2,
            "sequence_id": 2**40,
            "tokens": ["\tä", "<start>", ""],
            "activations": [0.5, -1.25, 3.0],
            "max_activation": 3.0,
        }
    ]
    write_table(tmp_path, "activation_records", rows, replace_where={"layer": "3"})
    frame = read_table(tmp_path, "activation_records")
    assert frame.columns == SCHEMAS["activation_records"].names
    assert frame.schema == table_frame("activation_records", rows).schema
    assert frame.to_dicts() == rows


def test_polars_reads_the_table_directly(tmp_path):
    write_table(tmp_path, "scores", score_rows(0, range(3)) + score_rows(1, range(2)))
    frame = pl.read_delta(str(tmp_path / "scores"))
    assert frame.height == 5
    assert frame.schema["layer"] == pl.String
    assert pl.scan_delta(str(tmp_path / "scores")).filter(pl.col("layer") == "1").collect().height == 2


def test_corpus_tokens_are_unpartitioned(tmp_path):
    rows = [{"model": "m", "corpus": "c", "sequence_id": i, "token_ids": [1, 2], "tokens": ["a", "b"]} for i in range(3)]
    write_table(tmp_path, "corpus_tokens", rows)
    assert not [p for p in (tmp_path / "corpus_tokens").iterdir() if p.name.startswith("layer=")]
    assert open_table(tmp_path, "corpus_tokens").metadata().partition_columns == []
    assert read_table(tmp_path, "corpus_tokens")["sequence_id"].sort().to_list() == [0, 1, 2]


# ------------------------------------------------------------------------- foreign tables


def test_table_with_missing_columns_is_refused(tmp_path):
    write_deltalake(str(tmp_path / "explanations"), pa.table({"layer": ["0"], "model": ["m"]}))
    with pytest.raises(LakeError) as excinfo:
        write_table(tmp_path, "explanations", explanation_rows(0, [1], "e"), replace_where={"layer": "0"})
    assert "schema" in str(excinfo.value)
    assert DeltaTable(str(tmp_path / "explanations")).version() == 0


def test_table_with_an_extra_column_is_refused(tmp_path):
    table = SCHEMAS["scores"].empty_table().append_column("extra", pa.array([], pa.string()))
    write_deltalake(str(tmp_path / "scores"), table, partition_by=["layer"])
    with pytest.raises(LakeError) as excinfo:
        write_table(tmp_path, "scores", score_rows(0, [1]), replace_where={"layer": "0"})
    assert "schema" in str(excinfo.value) and "extra" in str(excinfo.value)


def test_table_with_a_retyped_column_is_refused(tmp_path):
    fields = [pa.field("neuron", pa.string()) if f.name == "neuron" else f for f in SCHEMAS["scores"]]
    write_deltalake(str(tmp_path / "scores"), pa.schema(fields).empty_table(), partition_by=["layer"])
    with pytest.raises(LakeError) as excinfo:
        write_table(tmp_path, "scores", score_rows(0, [1]), replace_where={"layer": "0"})
    assert "schema" in str(excinfo.value) and "neuron" in str(excinfo.value)
    assert DeltaTable(str(tmp_path / "scores")).version() == 0


def test_table_with_other_partitioning_is_refused(tmp_path):
    write_deltalake(str(tmp_path / "scores"), SCHEMAS["scores"].empty_table())  # not partitioned
    with pytest.raises(LakeError) as excinfo:
        write_table(tmp_path, "scores", score_rows(0, [1]), replace_where={"layer": "0"})
    assert "schema" in str(excinfo.value) and "partitioned" in str(excinfo.value)


# ------------------------------------------------------------------------------------ SQL


def test_duckdb_views_over_the_lake(tmp_path):
    write_table(tmp_path, "scores", score_rows(0, range(3)) + score_rows(1, range(4)))
    write_table(tmp_path, "explanations", explanation_rows(0, range(2), "exp-a") + explanation_rows(0, [0], "exp-z"))
    con = connect(tmp_path)
    try:
        assert con.execute("SELECT count(*) FROM scores").fetchone()[0] == 7
        assert con.execute("SELECT count(*) FROM scores WHERE layer = '1'").fetchone()[0] == 4
        joined = con.execute(
            "SELECT count(*) FROM scores s JOIN explanations e USING (layer, neuron, explainer_id)"
        ).fetchone()[0]
        assert joined == 2  # neurons 0 and 1 of layer 0 under exp-a
        assert con.execute("SELECT count(*) FROM explanations").fetchone()[0] == 3
        # Tables that do not exist yet are simply absent.
        with pytest.raises(Exception):
            con.execute("SELECT count(*) FROM simulations")
    finally:
        con.close()


def test_duckdb_sees_only_the_latest_version(tmp_path):
    write_table(tmp_path, "scores", score_rows(0, range(3)), replace_where={"layer": "0"})
    write_table(tmp_path, "scores", score_rows(0, range(1)), replace_where={"layer": "0"})
    con = connect(tmp_path)
    try:
        assert con.execute("SELECT count(*), max(neuron) FROM scores").fetchone() == (1, 0)
    finally:
        con.close()


def test_records_are_written_in_neuron_row_groups_that_readers_skip(tmp_path):
    """activation_records rows (sorted by neuron) go into bounded parquet row groups, so reading one
    neuron touches one row group rather than decoding the partition."""
    import pyarrow.parquet as pq

    from neuron_pipeline.lake.schemas import NEURON_ROW_GROUP_ROWS

    per_group = NEURON_ROW_GROUP_ROWS["activation_records"]
    neurons = 3 * per_group // 40 + 1  # 40 records per neuron: a bit over three row groups
    frame = pl.DataFrame(
        {
            "model": "m",
            "layer": "0",
            "neuron": pl.Series([n for n in range(neurons) for _ in range(40)], dtype=pl.Int32),
            "kind": "top",
            "rank": pl.Series(list(range(40)) * neurons, dtype=pl.Int32),
            "sequence_id": pl.Series([n * 40 + r for n in range(neurons) for r in range(40)], dtype=pl.Int64),
            "tokens": [["a", "b"]] * (neurons * 40),
            "activations": [[0.5, 1.5]] * (neurons * 40),
            "max_activation": 1.5,
        }
    )
    write_table(tmp_path, "activation_records", frame, replace_where={"layer": 0})
    [parquet] = (tmp_path / "activation_records" / "layer=0").glob("*.parquet")
    metadata = pq.ParquetFile(parquet).metadata
    assert metadata.num_row_groups == 4
    neuron_column = metadata.schema.to_arrow_schema().get_field_index("neuron")
    ranges = [
        (metadata.row_group(i).column(neuron_column).statistics.min, metadata.row_group(i).column(neuron_column).statistics.max)
        for i in range(metadata.num_row_groups)
    ]
    assert all(hi <= next_lo for (_, hi), (next_lo, _) in zip(ranges, ranges[1:]))  # disjoint: skippable
    one = read_table(tmp_path, "activation_records", where={"layer": 0, "neuron": neurons - 2})
    assert one["sequence_id"].to_list() == [(neurons - 2) * 40 + r for r in range(40)]
