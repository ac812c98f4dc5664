"""Beyond the paper: best-of-n explanations, one revision round, and linear calibration."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from neuron_pipeline.assets.scores import score_layer
from neuron_pipeline.interp.baseline import BaselineSimulator
from neuron_pipeline.interp.explainer import LLMExplainer
from neuron_pipeline.interp.llm_protocol import ChatResponse
from neuron_pipeline.interp.records import ActivationRecord, NeuronId, NeuronRecord, split_records
from neuron_pipeline.interp.variants import CalibratedSimulator, RefiningExplainer, fit_calibration
from neuron_pipeline.lake import table_frame


class ScriptedChat:
    model_name = "scripted"

    def __init__(self, replies):
        self.replies = list(replies)
        self.requests = []

    def chat(self, request):
        self.requests.append(request)
        return self.replies.pop(0)


def _record(i: int, fires_on_cat: bool) -> ActivationRecord:
    tokens = (" the", " cat" if fires_on_cat else " dog", " sat", f" {i}")
    return ActivationRecord(tokens, (0.0, 3.0 if fires_on_cat else 0.0, 0.0, 0.1 * (i % 3)), i)


def _splits():
    top = [_record(i, True) for i in range(20)]
    random = [_record(100 + i, i % 2 == 0) for i in range(20)]
    return split_records(NeuronRecord(NeuronId(0, 0), top, random), 5, 5, 5)


def test_best_of_n_keeps_the_candidate_that_simulates_best_on_held_out_records():
    chat = ScriptedChat([ChatResponse((' the tokens "dog" (10)', ' the tokens "cat" (10)', " nothing in particular"), 900, 30)])
    explainer = RefiningExplainer(LLMExplainer(chat), BaselineSimulator(), n=3)
    [result] = explainer.explain_splits([_splits()])
    assert result.text == 'the tokens "cat" (10)'
    assert result.prompt_tokens == 900 and result.completion_tokens == 30
    request = chat.requests[0]
    assert request.n == 3 and request.temperature >= 0.7  # sampling, not three greedy copies


def test_revision_replaces_the_explanation_only_when_it_simulates_better():
    splits = _splits()
    better = ScriptedChat([ChatResponse((' the tokens "dog" (10)',), 900, 10), ChatResponse((' the tokens "cat" (10)',), 300, 8)])
    [revised] = RefiningExplainer(LLMExplainer(better), BaselineSimulator(), revise=True).explain_splits([splits])
    assert revised.text == 'the tokens "cat" (10)'
    assert (revised.prompt_tokens, revised.completion_tokens) == (1200, 18)  # both calls are accounted
    # The revision prompt shows the earlier explanation and excerpts it predicted badly.
    revision_prompt = better.requests[1].messages[-2][1]
    # The worst-simulated are the "dog" excerpts: predicted 10 there, the neuron stays at 0.
    assert 'the tokens "dog" (10)' in revision_prompt and " dog\t0" in revision_prompt

    worse = ScriptedChat([ChatResponse((' the tokens "cat" (10)',), 900, 10), ChatResponse((" the tokens \"sat\" (10)",), 300, 8)])
    [kept] = RefiningExplainer(LLMExplainer(worse), BaselineSimulator(), revise=True).explain_splits([splits])
    assert kept.text == 'the tokens "cat" (10)'


def test_variants_have_their_own_explainer_and_simulator_ids():
    base = LLMExplainer(ScriptedChat([]))
    ids = {
        base.explainer_id,
        RefiningExplainer(base, BaselineSimulator(), n=4).explainer_id,
        RefiningExplainer(base, BaselineSimulator(), revise=True).explainer_id,
        RefiningExplainer(base, BaselineSimulator(), n=4, revise=True).explainer_id,
    }
    assert len(ids) == 4
    assert CalibratedSimulator(BaselineSimulator()).simulator_id != BaselineSimulator().simulator_id


def test_fit_calibration_recovers_a_line_and_handles_degenerate_input():
    simulated = np.array([0.0, 2.0, 5.0, 10.0])
    slope, intercept = fit_calibration(0.3 * simulated - 0.5, simulated)
    assert slope == pytest.approx(0.3) and intercept == pytest.approx(-0.5)
    assert fit_calibration(np.array([1.0, 2.0]), np.array([4.0, 4.0])) == (1.0, 0.0)


def test_calibrated_scores_use_the_line_fitted_on_calibration_rows():
    rng = np.random.default_rng(0)

    def row(kind, rank, simulated, real):
        return {
            "model": "m", "layer": "0", "neuron": 0, "explainer_id": "e", "simulator_id": "s", "kind": kind,
            "rank": rank, "sequence_id": rank, "tokens": ["t"] * len(real), "true_activations": list(real),
            "expected_activations": list(simulated), "mode": "x", "input_hash": "h",
        }  # fmt: skip

    rows = []
    for kind, count in (("top", 3), ("random", 3), ("calibration", 4)):
        for rank in range(count):
            simulated = rng.uniform(0, 10, 8)
            rows.append(row(kind, rank, simulated, 0.25 * simulated + 1.0))  # real is an exact line of simulated
    calibrated = score_layer(table_frame("simulations", rows), {0: 3.5}).row(0, named=True)
    assert calibrated["rsquared"] == pytest.approx(1.0) and calibrated["absolute_dev_explained"] == pytest.approx(1.0)
    assert calibrated["score"] == pytest.approx(1.0)
    # Without calibration rows the 0-10 values are only rescaled by max activation / 10: not exact.
    plain = score_layer(table_frame("simulations", [r for r in rows if r["kind"] != "calibration"]), {0: 3.5})
    assert plain["score"][0] == pytest.approx(1.0) and plain["rsquared"][0] < 0.99
    assert isinstance(plain, pl.DataFrame)


def test_variants_run_through_the_pipeline_against_an_openai_compatible_server(tmp_path, monkeypatch):
    """best_of + revise + calibrate as config switches, end to end over a real HTTP server."""
    import dagster as dg
    from conftest import small_settings
    from fake_openai import FakeOpenAIServer

    from neuron_pipeline.definitions import build_definitions
    from neuron_pipeline.lake import read_table

    monkeypatch.setenv("FAKE_KEY", "sk-test-variants")
    with FakeOpenAIServer(max_lifetime_s=240) as fake:
        api = {"backend": "openai", "model": "fake-model", "base_url": fake.base_url, "api_key_env": "FAKE_KEY"}
        settings = small_settings(
            tmp_path / "lake",
            layers="0",
            neurons="0-2",
            explainers=[{"backend": "baseline"}, {**api, "best_of": 3, "revise": True}],
            simulators=[{**api, "calibrate": True}],
        )
        defs = build_definitions(settings)
        instance = dg.DagsterInstance.ephemeral()
        keys = ["corpus_tokens", "neuron_activations", "activation_records", "explanations", "simulations", "scores"]
        for selection, partition in ((keys[:1], None), (keys[1:], "0")):
            result = dg.materialize(
                list(defs.assets),
                selection=[dg.AssetKey(k) for k in selection],
                resources=defs.resources,
                instance=instance,
                partition_key=partition,
            )
            assert result.success
        chat_requests = fake.posts("/chat/completions")

    explanations = read_table(settings.lake_location.folder, "explanations")
    refined = explanations.filter(pl.col("explainer_id").str.starts_with("llm-"))
    assert refined.height == 3 and refined["error"].null_count() == 3
    assert refined["explanation"].str.contains("word").all()
    # Three candidates were asked for in one request per neuron, then one revision each.
    assert sorted(r.body.get("n", 1) for r in chat_requests) == [1, 1, 1, 3, 3, 3]
    simulations = read_table(settings.lake_location.folder, "simulations")
    assert set(simulations["kind"].unique()) == {"top", "random", "calibration"}
    assert set(simulations["mode"].unique()) == {"all_at_once_logprobs"}
    scores = read_table(settings.lake_location.folder, "scores")
    assert scores["simulator_id"].str.starts_with("calibrated-").all()
    assert scores.height == 6  # 3 neurons x (baseline + refined explanations)
