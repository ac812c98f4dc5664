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
    # One row per scored (neuron, explainer); each scorer's column is that explanation's stored score.
    assert side.height == read_table(lake, "scores").select("neuron", "explainer_id").n_unique() > 0
    for method in ("detection", "fuzzing", "embedding"):
        stored = results.filter(pl.col("method") == method).select("neuron", "explainer_id", stored="score")
        joined = side.join(stored, on=["neuron", "explainer_id"], how="left")
        assert joined[method].to_list() == joined["stored"].to_list()
    assert side["embedding"].is_not_null().any()
    assert set(side.columns) == {"layer", "neuron", "explainer_id", "simulation", "detection", "fuzzing", "embedding"}

    # Nothing changed: every chat request is served from the LLM cache.
    calls = len(server.posts("/chat/completions"))
    second = _run(defs, ["explanations", "scorer_results"], instance, partition_key="0")
    assert len(server.posts("/chat/completions")) == calls
    assert second["scorer_results"]["cache_misses"] == 0 and second["scorer_results"]["scored_anew"] == 0
    assert read_table(lake, "scorer_results").height == 27

    # Shown where people look: `show`, the viewer's neuron page and its layer page.
    from neuron_pipeline.cli import main
    from neuron_pipeline.viewer import build_viewer

    detection_id = results.filter(pl.col("method") == "detection")["scorer_id"][0]
    build_viewer(lake, tmp_path / "viewer")
    from neuron_pipeline.viewer.build import read_neuron

    neuron_page = read_neuron(tmp_path / "viewer", "0", 0)["html"]
    assert detection_id in neuron_page and "embedding" in neuron_page and "bal. acc." in neuron_page
    layer_page = (tmp_path / "viewer" / "layer_0" / "index.html").read_text()
    assert "Detection, fuzzing and embedding scores" in layer_page and "mean simulation score" in layer_page
    assert main(["show", "0", "0", "--lake", str(lake), "--excerpts", "1"]) == 0


def test_show_prints_scorer_lines():
    from neuron_pipeline.cli import _scorer_lines
    from neuron_pipeline.lake import table_frame

    rows = table_frame(
        "scorer_results",
        [
            {"method": "detection", "scorer_model": "m", "balanced_accuracy": 0.75, "f1": 0.8, "auroc": None, "n_judged": 8,
             "labels": [True] * 10, "failed_groups": 1, "prompt_tokens": 900, "completion_tokens": 100, "null_reason": None},
            {"method": "embedding", "scorer_model": "all-MiniLM-L6-v2", "auroc": None, "n_judged": 12, "labels": [True] * 12,
             "failed_groups": 0, "prompt_tokens": 0, "completion_tokens": 0, "null_reason": "no non-activating excerpt judged"},
        ],
    )
    assert _scorer_lines(rows) == [
        "  detection (m): balanced accuracy 0.750 (F1 0.800, AUROC n/a; 8 of 10 excerpts judged, 1 failed groups; 1,000 tokens)",
        "  embedding (all-MiniLM-L6-v2): AUROC n/a on 12 excerpts [no non-activating excerpt judged]",
    ]
