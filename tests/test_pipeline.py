"""The Dagster side: Definitions load, and a real materialization fills every table correctly."""

from __future__ import annotations

import math

import dagster as dg
import polars as pl
import pytest

from neuron_pipeline.definitions import build_definitions
from neuron_pipeline.lake import SCHEMAS, read_table, table_path

from conftest import small_settings

LAYER_ASSETS = [
    "neuron_activations",
    "activation_records",
    "neuron_output_tokens",
    "explanations",
    "explanation_embeddings",
    "simulations",
    "scores",
    "scorer_results",
    "layer_summary",
]


def _materialize(defs: dg.Definitions, keys, **kwargs) -> dg.ExecuteInProcessResult:
    return dg.materialize(
        list(defs.assets),
        selection=[dg.AssetKey(k) for k in keys],
        resources=defs.resources,
        instance=kwargs.pop("instance", None) or dg.DagsterInstance.ephemeral(),
        **kwargs,
    )


def test_definitions_load(tmp_path):
    defs = build_definitions(small_settings(tmp_path / "lake"))
    dg.Definitions.validate_loadable(defs)
    graph = defs.resolve_asset_graph()
    assert {k.to_user_string() for k in graph.get_all_asset_keys()} == {"corpus_tokens", *LAYER_ASSETS, "neuron_viewer", "evaluations"}
    capture = graph.get(dg.AssetKey("activation_records"))
    # One partition per decoder layer of the bundled SmolLM2 (30 layers), keys as strings.
    assert capture.partitions_def.get_partition_keys() == [str(i) for i in range(30)]
    assert capture.backfill_policy == dg.BackfillPolicy.single_run()
    assert defs.resolve_job_def("full_pipeline") is not None
    assert set(defs.resources) == {"pipeline", "subject_model", "llm"}


def test_definitions_module_loads_default_profile():
    import neuron_pipeline.definitions as module

    assert isinstance(module.defs, dg.Definitions)
    assert module.defs.resolve_asset_graph().get(dg.AssetKey("scores")).partitions_def is not None


def test_materialize_one_layer_fills_every_table(tmp_path):
    settings = small_settings(tmp_path / "lake", layers="1")
    defs = build_definitions(settings)
    instance = dg.DagsterInstance.ephemeral()
    assert _materialize(defs, ["corpus_tokens"], instance=instance).success
    result = _materialize(defs, LAYER_ASSETS, partition_key="1", instance=instance)
    assert result.success
    lake = settings.lake_location.folder
    records = settings.records

    corpus = pl.read_delta(str(table_path(lake, "corpus_tokens")))
    assert corpus.height == 48
    assert corpus["token_ids"].list.len().unique().to_list() == [64]

    stats = pl.read_delta(str(table_path(lake, "neuron_activations")))
    assert sorted(stats["neuron"].to_list()) == list(range(8))
    assert stats["layer"].unique().to_list() == ["1"]
    assert stats["count"].unique().to_list() == [48 * 64]
    assert (stats["max"] >= stats["mean"]).all() and (stats["mean"] >= stats["min"]).all()

    recs = pl.read_delta(str(table_path(lake, "activation_records")))
    counts = recs.group_by("neuron", "kind").len()
    assert counts.filter(pl.col("kind") == "top")["len"].unique().to_list() == [records.top_k]
    assert counts.filter(pl.col("kind") == "random")["len"].unique().to_list() == [records.random_k]
    quantile = counts.filter(pl.col("kind") == "quantile")["len"]
    assert quantile.max() <= records.quantile_bins * records.per_quantile_bin
    assert (recs["tokens"].list.len() == 64).all() and (recs["activations"].list.len() == 64).all()
    # Stored max equals the max over the stored per-token activations.
    assert (recs["activations"].list.max() - recs["max_activation"]).abs().max() < 1e-6
    # The records' token strings come from the corpus sequences they cite.
    joined = recs.join(corpus.select("sequence_id", corpus_tokens="tokens"), on="sequence_id")
    assert (joined["tokens"] == joined["corpus_tokens"]).all()
    # Top records are ordered by max activation, and the first equals the neuron's global max.
    top = recs.filter(pl.col("kind") == "top").sort("neuron", "rank")
    for neuron, group in top.group_by("neuron"):
        values = group["max_activation"].to_list()
        assert values == sorted(values, reverse=True)
        # (Records keep float16 activations by default, capture.activation_dtype: the max of the stored
        # values is the exact max rounded to float16's 11 significant bits.)
        assert math.isclose(values[0], stats.filter(pl.col("neuron") == neuron[0])["max"][0], rel_tol=1e-3)

    explanations = pl.read_delta(str(table_path(lake, "explanations")))
    assert explanations.height == 8
    assert explanations.select("neuron", "explainer_id").n_unique() == 8
    assert explanations["explanation"].str.len_chars().min() > 0
    assert explanations["prompt_hash"].null_count() == 0

    sims = pl.read_delta(str(table_path(lake, "simulations")))
    per_neuron = sims.group_by("neuron", "kind").len()
    assert per_neuron.filter(pl.col("kind") == "top")["len"].unique().to_list() == [records.score_top]
    assert per_neuron.filter(pl.col("kind") == "random")["len"].unique().to_list() == [records.score_random]
    assert (sims["expected_activations"].list.len() == sims["tokens"].list.len()).all()
    assert sims["expected_activations"].list.max().max() <= 10
    # The scorer never sees the excerpts the explainer saw (interleaved splits of the top records).
    top_recs = recs.filter(pl.col("kind") == "top")
    explained_ranks = top_recs.filter(pl.col("rank") % (records.top_k // records.explain_top) == 0)
    overlap = sims.filter(pl.col("kind") == "top").join(
        explained_ranks.select("neuron", "sequence_id"), on=["neuron", "sequence_id"]
    )
    assert overlap.height == 0

    scores = pl.read_delta(str(table_path(lake, "scores")))
    assert scores.height == 8
    valid = scores.filter(pl.col("score").is_not_null())
    assert valid["score"].is_between(-1, 1).all()
    assert scores.filter(pl.col("score").is_null())["null_reason"].null_count() == 0

    # No LLM configured: the embedding scorer alone, on every explanation.
    scorer_rows = pl.read_delta(str(table_path(lake, "scorer_results")))
    assert scorer_rows["method"].to_list() == ["embedding"] * 8 and scorer_rows["calls"].max() == 0

    summary = pl.read_delta(str(table_path(lake, "layer_summary")))
    assert summary.height == 1
    assert summary["neurons_scored"][0] + summary["neurons_null"][0] == 8
    if valid.height:
        assert math.isclose(summary["mean_score"][0], valid["score"].mean(), rel_tol=1e-9)
        assert summary["best_score"][0] == valid["score"].max()

    for table in set(SCHEMAS) - {"evaluations"}:  # the evaluation report is its own job, not a layer's
        frame = pl.read_delta(str(table_path(lake, table)))
        assert frame.columns == SCHEMAS[table].names, table
        if table != "corpus_tokens":
            assert frame["model"].unique().to_list() == ["smollm2-135m-instruct"]


class _ForwardCounter:
    """Counts forward calls entering chosen decoder layers of the loaded subject."""

    def __init__(self, subject, layers):
        self.calls = {layer: 0 for layer in layers}
        self.handles = [
            subject.layers()[layer].register_forward_pre_hook(self._hook(layer)) for layer in layers
        ]

    def _hook(self, layer):
        def hook(module, args):
            self.calls[layer] += 1

        return hook

    def close(self):
        for handle in self.handles:
            handle.remove()


def test_layer_range_is_one_forward_pass_and_single_layer_stops_early(tmp_path):
    from neuron_pipeline.assets.resources import SubjectModelResource

    settings = small_settings(tmp_path / "lake", layers="0-2")
    defs = build_definitions(settings)
    instance = dg.DagsterInstance.ephemeral()
    assert _materialize(defs, ["corpus_tokens"], instance=instance).success
    subject = SubjectModelResource(pipeline=defs.resources["pipeline"]).load()
    batches = math.ceil(48 / settings.subject.batch_size)
    counter = _ForwardCounter(subject, [0, 1, 2, 3])
    try:
        result = _materialize(
            defs,
            ["neuron_activations", "activation_records"],
            instance=instance,
            tags={"dagster/asset_partition_range_start": "0", "dagster/asset_partition_range_end": "2"},
        )
        assert result.success
        # Three layers, one pass: each layer ran once per batch, and nothing past layer 2 ran.
        assert counter.calls == {0: batches, 1: batches, 2: batches, 3: 0}
        stats = read_table(settings.lake_location.folder, "neuron_activations")
        assert sorted(stats["layer"].unique().to_list()) == ["0", "1", "2"]

        # The capture was the run's last step that loads the model: it let the model go, and the
        # next run loads it again (the counter goes on the newly loaded one).
        counter.close()
        reloaded = SubjectModelResource(pipeline=defs.resources["pipeline"]).load()
        assert reloaded is not subject
        counter = _ForwardCounter(reloaded, [0, 1, 2, 3])
        assert _materialize(defs, ["neuron_activations", "activation_records"], partition_key="1", instance=instance).success
        # Layer 1 alone: the pass stops inside layer 1 (its MLP input is the last thing computed).
        assert counter.calls == {0: batches, 1: batches, 2: 0, 3: 0}
    finally:
        counter.close()


def test_rematerializing_with_nothing_changed_makes_no_new_explainer_calls(tmp_path):
    settings = small_settings(tmp_path / "lake", layers="0")
    defs = build_definitions(settings)
    instance = dg.DagsterInstance.ephemeral()
    assert _materialize(defs, ["corpus_tokens"], instance=instance).success
    first = _materialize(defs, LAYER_ASSETS, partition_key="0", instance=instance)
    second = _materialize(defs, LAYER_ASSETS, partition_key="0", instance=instance)

    def new_calls(result, asset, key):
        [event] = [e for e in result.get_asset_materialization_events() if e.asset_key == dg.AssetKey(asset)]
        return event.materialization.metadata[key].value

    assert new_calls(first, "explanations", "new_calls") == 8
    assert new_calls(second, "explanations", "new_calls") == 0
    assert new_calls(first, "simulations", "new_simulations") == 8
    assert new_calls(second, "simulations", "new_simulations") == 0
    # The kept rows are the same rows, not recomputed ones.
    explanations = read_table(settings.lake_location.folder, "explanations")
    assert explanations.height == 8


@pytest.mark.parametrize("table", ["explanations", "scores"])
def test_other_partitions_survive_a_rewrite(small_lake, table):
    before = read_table(small_lake, table)
    assert sorted(before["layer"].unique().to_list()) == ["0", "1"]
    from neuron_pipeline.lake import write_table

    layer1 = before.filter(pl.col("layer") == "1")
    write_table(small_lake, table, layer1, replace_where={"layer": "1"})
    after = read_table(small_lake, table)
    assert after.sort(after.columns[:6]).equals(before.sort(before.columns[:6]))


def test_quality_gate_stops_bad_rows_before_they_land(tmp_path, monkeypatch):
    import neuron_pipeline.assets.capture as capture_module

    original = capture_module.records_frame

    def unsorted_records(*args, **kwargs):
        frame = original(*args, **kwargs)
        # Corrupt the capture: top records no longer sorted by max activation.
        return frame.with_columns(
            rank=pl.when(pl.col("kind") == "top").then(19 - pl.col("rank")).otherwise(pl.col("rank"))
        )

    monkeypatch.setattr(capture_module, "records_frame", unsorted_records)
    settings = small_settings(tmp_path / "lake", layers="0")
    defs = build_definitions(settings)
    instance = dg.DagsterInstance.ephemeral()
    assert _materialize(defs, ["corpus_tokens"], instance=instance).success
    # (neuron_output_tokens needs no capture: it is left out of this run.)
    after_capture = [t for t in LAYER_ASSETS if t != "neuron_output_tokens"]
    result = _materialize(defs, after_capture, partition_key="0", instance=instance, raise_on_error=False)
    assert not result.success
    evaluations = {e.asset_key.to_user_string(): e for e in result.get_asset_check_evaluations()}
    assert evaluations["activation_records"].passed is False
    assert "failed" in evaluations["activation_records"].metadata["summary"].value
    # Nothing was written for the bad layer, and nothing downstream ran.
    from neuron_pipeline.lake import table_exists

    for table in after_capture:
        assert not table_exists(settings.lake_location.folder, table), table
    materialized = {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}
    assert materialized == set()
