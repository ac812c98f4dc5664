"""The LLM path end to end: the bundled SmolLM2 explains, simulates and scores real neurons next to
the baseline, and nothing already paid for is paid again."""

from __future__ import annotations

import shutil

import dagster as dg
import polars as pl
import pytest

from neuron_pipeline.definitions import build_definitions
from neuron_pipeline.lake import read_table

from conftest import small_settings

pytestmark = pytest.mark.slow

LAYER_ASSETS = ["neuron_activations", "activation_records", "explanations", "simulations", "scores", "layer_summary"]
LOCAL = {"backend": "local", "layers": "0", "neurons": "0"}


def _run(defs, keys, instance, **kwargs):
    result = dg.materialize(
        list(defs.assets),
        selection=[dg.AssetKey(k) for k in keys],
        resources=defs.resources,
        instance=instance,
        **kwargs,
    )
    assert result.success
    return {
        e.asset_key.to_user_string(): {k: v.value for k, v in e.materialization.metadata.items()}
        for e in result.get_asset_materialization_events()
    }


def test_local_llm_explains_simulates_and_scores_next_to_the_baseline(tmp_path):
    settings = small_settings(
        tmp_path / "lake",
        layers="0",
        neurons="0-2",
        explainers=[{"backend": "baseline"}, LOCAL],
        simulators=[{"backend": "baseline"}, LOCAL],
    )
    defs = build_definitions(settings)
    instance = dg.DagsterInstance.ephemeral()
    _run(defs, ["corpus_tokens"], instance)
    first = _run(defs, LAYER_ASSETS, instance, partition_key="0")
    lake = settings.lake_location.folder

    explanations = read_table(lake, "explanations")
    llm_rows = explanations.filter(pl.col("explainer_id").str.starts_with("llm-"))
    assert llm_rows["neuron"].to_list() == [0]  # the LLM only runs on its subset
    assert llm_rows["explainer_model"][0] == "smollm2-135m-instruct"
    assert llm_rows["prompt_tokens"][0] > 500 and llm_rows["completion_tokens"][0] > 0
    assert explanations.filter(pl.col("explainer_id").str.starts_with("baseline-")).height == 3

    simulations = read_table(lake, "simulations")
    # A local model simulates token by token unless told otherwise.
    llm_sims = simulations.filter(pl.col("simulator_id").str.starts_with("per_token-"))
    assert set(llm_sims["mode"].unique()) == {"per_token_logprobs"}
    # Both explanations of neuron 0 are simulated by the LLM: 5 top + 5 random excerpts each.
    assert llm_sims.group_by("explainer_id").len()["len"].to_list() == [10, 10]
    assert llm_sims["expected_activations"].list.max().max() <= 10

    summary = read_table(lake, "layer_summary")
    llm_summary = summary.filter(pl.col("explainer_id").str.starts_with("llm-"))
    # Scored by the LLM simulator only: the token look-up cannot read a prose explanation.
    assert llm_summary.height == 1 and llm_summary["simulator_id"][0].startswith("per_token-")
    assert llm_summary["explainer_label"][0] == "smollm2-135m-instruct · explainer_v4"
    assert llm_summary["simulator_label"][0] == "smollm2-135m-instruct · simulator_per_token_v1 · per-token"
    assert llm_summary["baseline_mean_score"].is_not_null().all()
    assert first["explanations"]["cache_misses"] >= 1

    # Nothing changed: no new explanation, simulation or LLM call.
    second = _run(defs, LAYER_ASSETS, instance, partition_key="0")
    assert second["explanations"]["new_calls"] == 0 and second["simulations"]["new_simulations"] == 0
    assert second["explanations"]["cache_misses"] == 0 and second["simulations"]["cache_misses"] == 0

    # A crash that lost the tables (but not the LLM cache): the re-run is served from the cache.
    for table in ("explanations", "simulations", "scores", "layer_summary"):
        shutil.rmtree(lake / table)
    third = _run(defs, LAYER_ASSETS, instance, partition_key="0")
    assert third["explanations"]["new_calls"] == 4  # 3 baseline + 1 LLM neuron, recomputed
    assert third["explanations"]["cache_misses"] == 0 and third["explanations"]["cache_hits"] >= 1
    assert third["simulations"]["cache_misses"] == 0
    assert third["explanations"]["new_prompt_tokens"] == 0
    again = read_table(lake, "explanations").filter(pl.col("explainer_id").str.starts_with("llm-"))
    assert again["explanation"].to_list() == llm_rows["explanation"].to_list()
