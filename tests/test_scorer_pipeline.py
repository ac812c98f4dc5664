"""Detection, fuzzing and embedding scores through Dagster into the lake: every explanation is
scored, never on an excerpt its explainer saw, side by side with the simulation score in one SQL
query, and nothing already paid for is asked again. The chat model is the fake OpenAI server."""

from __future__ import annotations

import sys
from pathlib import Path

import dagster as dg
import polars as pl
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from conftest import small_settings  # noqa: E402
from fake_openai import FakeOpenAIServer  # noqa: E402

from neuron_pipeline.definitions import build_definitions  # noqa: E402
from neuron_pipeline.interp.contrastive import quiet_excerpts  # noqa: E402
from neuron_pipeline.interp.records import neuron_records_from_rows, split_records  # noqa: E402
from neuron_pipeline.lake import read_table  # noqa: E402
from neuron_pipeline.lake.sql import connect  # noqa: E402

LAYER_ASSETS = ["neuron_activations", "activation_records", "explanations", "simulations", "scores", "scorer_results"]

# One query: the simulation score and the three classification scores of each (neuron, explainer).
SIDE_BY_SIDE = """
select s.layer, s.neuron, s.explainer_id, s.score as simulation,
       max(r.score) filter (where r.method = 'detection') as detection,
       max(r.score) filter (where r.method = 'fuzzing') as fuzzing,
       max(r.score) filter (where r.method = 'embedding') as embedding
from scores s left join scorer_results r using (layer, neuron, explainer_id)
group by all order by s.neuron, s.explainer_id
"""


def _run(defs, keys, instance, **kwargs):
    result = dg.materialize(
        list(defs.assets), selection=[dg.AssetKey(k) for k in keys], resources=defs.resources, instance=instance, **kwargs
    )
    assert result.success
    return {
        e.asset_key.to_user_string(): {k: v.value for k, v in e.materialization.metadata.items()}
        for e in result.get_asset_materialization_events()
    }


@pytest.fixture
def server():
    with FakeOpenAIServer() as fake:
        yield fake


def test_scorers_in_the_lake_side_by_side_with_simulation(tmp_path, server):
    api = {"backend": "openai", "model": "fake-model", "base_url": server.base_url, "api_key_env": "NO_SUCH_KEY_ENV"}
    settings = small_settings(
        tmp_path / "lake",
        layers="0",
        neurons="0-2",
        explainers=[{"backend": "baseline"}, api, {**api, "contrastive": True}],
        simulators=[{"backend": "baseline"}],
    )
    # No `scorers:` section: embedding everywhere, detection and fuzzing on the explainers' backend.
    assert [s.method for s in settings.scorer_entries] == ["embedding", "detection", "fuzzing"]
    defs = build_definitions(settings)
    instance = dg.DagsterInstance.ephemeral()
    _run(defs, ["corpus_tokens"], instance)
    first = _run(defs, LAYER_ASSETS, instance, partition_key="0")
    lake = settings.lake_location.folder

    explanations = read_table(lake, "explanations")
    kinds = sorted({e.split("-")[0] for e in explanations["explainer_id"]})
    assert kinds == ["baseline", "contrastive", "llm"] and explanations["error"].is_null().all()
    contrastive_prompts = [r.body["messages"] for r in server.posts("/chat/completions") if "Quiet on:" in str(r.body)]
    assert len(contrastive_prompts) == 3

    results = read_table(lake, "scorer_results")
    # Every explanation (3 neurons x 3 explainers) by every scorer.
    assert results.group_by("method").len().sort("method")["len"].to_list() == [9, 9, 9]
    assert results.filter(pl.col("method") != "embedding")["prompt_tokens"].min() > 0
    assert results.filter(pl.col("method") == "embedding")["calls"].max() == 0
    assert first["scorer_results"]["rows"] == 27 and first["scorer_results"]["scored_anew"] == 27

    # Held out: no scored excerpt was shown to any explainer of the neuron, and every explainer
    # of a neuron is judged on the same excerpts.
    records = neuron_records_from_rows(read_table(lake, "activation_records").iter_rows(named=True))
    for key, record in records.items():
        splits = split_records(record, 5, 5, 5)
        shown = {r.sequence_id for r in splits.explain} | {r.sequence_id for r in quiet_excerpts(splits, 4)[0]}
        mine = results.filter((pl.col("neuron") == key.neuron) & (pl.col("method") == "detection"))
        assert mine.height == 3
        scored = [set(ids) for ids in mine["sequence_ids"]]
        assert all(ids == scored[0] for ids in scored) and not scored[0] & shown

    con = connect(lake)
    side = con.sql(SIDE_BY_SIDE).pl()
    assert side.height == 9
    for method in ("detection", "fuzzing", "embedding"):
        stored = results.filter(pl.col("method") == method).sort("neuron", "explainer_id")["score"].to_list()
        assert side[method].to_list() == stored
    assert side["simulation"].is_not_null().any() and side["embedding"].is_not_null().any()
    assert set(side.columns) == {"layer", "neuron", "explainer_id", "simulation", "detection", "fuzzing", "embedding"}

    # Nothing changed: every chat request is served from the LLM cache.
    calls = len(server.posts("/chat/completions"))
    second = _run(defs, ["explanations", "scorer_results"], instance, partition_key="0")
    assert len(server.posts("/chat/completions")) == calls
    assert second["scorer_results"]["cache_misses"] == 0 and second["scorer_results"]["scored_anew"] == 0
    assert read_table(lake, "scorer_results").height == 27
