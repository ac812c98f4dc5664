"""The no-LLM baseline: characteristic tokens as the explanation, token lookup as the simulation."""

from __future__ import annotations

import hashlib
import json

import pytest

from neuron_pipeline.interp.baseline import (
    BASELINE_VERSION,
    BaselineExplainer,
    BaselineSimulator,
    characteristic_tokens,
    format_baseline_explanation,
    parse_token_values,
    token_key,
)
from neuron_pipeline.interp.explainer import make_explainer_id
from neuron_pipeline.interp.records import ActivationRecord
from neuron_pipeline.interp.scoring import ScoredSequence, score_simulation
from neuron_pipeline.interp.simulator import make_simulator_id


def record(tokens, activations) -> ActivationRecord:
    return ActivationRecord(tuple(tokens), tuple(float(a) for a in activations))


# max activation 10. Normalized (clipped at 0) activations per token type:
#   cat: " Cat" 1.0, "cat " 0.6, "CAT" 0.8 -> mean 0.8 -> value 8
#   dog: 0.5 -> 5;  sat: 0.2 -> 2 (exactly at the 0.2 threshold);  on: 0.1 (below threshold)
#   the: 0 and -0.3 clipped to 0 -> 0
RECORDS = [
    record([" Cat", "sat", "on", "the"], [10, 2, 1, 0]),
    record(["cat ", "CAT", "dog", "the"], [6, 8, 5, -3]),
]


def _sha(*parts: str) -> str:
    return hashlib.sha256(b"".join(p.encode() + b"\x00" for p in parts)).hexdigest()


def test_token_key():
    assert token_key("  Cat\n") == "cat"
    assert token_key("ÉCOLE") == "école"


def test_characteristic_tokens_by_hand():
    assert characteristic_tokens(RECORDS, limit=10) == [("cat", 8), ("dog", 5), ("sat", 2)]


def test_characteristic_tokens_limit_keeps_the_best():
    assert characteristic_tokens(RECORDS, limit=2) == [("cat", 8), ("dog", 5)]
    assert characteristic_tokens(RECORDS, limit=1) == [("cat", 8)]


def test_mean_not_max_decides():
    # "a" peaks at the max once but is usually silent: mean (1 + 0 + 0 + 0) / 4 = 0.25.
    # "b" never peaks but is steady: mean 0.6.
    records = [record(["a", "b", "a", "b", "a", "a"], [10, 6, 0, 6, 0, 0])]
    assert characteristic_tokens(records, limit=5) == [("b", 6), ("a", 2)]


def test_ties_break_alphabetically():
    records = [record(["zeta", "alpha", "mid"], [5, 5, 10])]
    assert characteristic_tokens(records, limit=3) == [("mid", 10), ("alpha", 5), ("zeta", 5)]


def test_whitespace_only_tokens_are_ignored():
    records = [record([" ", "\n", "x"], [10, 10, 5])]
    assert characteristic_tokens(records, limit=3) == [("x", 5)]


def test_small_means_get_at_least_one():
    # mean 0.21 -> round(2.1) = 2; mean 0.2 exactly -> 2; value never below 1 when listed.
    records = [record(["big", "small"], [100, 21])]
    assert characteristic_tokens(records, limit=3) == [("big", 10), ("small", 2)]


@pytest.mark.parametrize("activations", [[0, 0, 0], [-1, -2, -0.5], [0, -3, 0]])
def test_dead_neuron_has_no_characteristic_tokens(activations):
    records = [record(["a", "b", "c"], activations)]
    assert characteristic_tokens(records, limit=8) == []
    explanation = BaselineExplainer().explain(records)
    assert explanation.text == "no characteristic tokens"
    assert explanation.error is None
    simulation = BaselineSimulator().simulate(explanation.text, [["a", "b", "c"], ["a"]])
    assert [s.expected_activations for s in simulation] == [(0.0, 0.0, 0.0), (0.0,)]


def test_no_records():
    assert characteristic_tokens([], limit=3) == []


# ----------------------------------------------------------------- explanation text round trip


def test_explanation_text_format():
    assert format_baseline_explanation([("cat", 8), ("dog", 5)]) == 'the tokens "cat" (8), "dog" (5)'
    assert format_baseline_explanation([]) == "no characteristic tokens"


@pytest.mark.parametrize(
    "tokens",
    [
        [("cat", 8), ("dog", 5)],
        [('say "hi"', 7), ("back\\slash", 3), ("trailing\\", 2)],
        [("ü", 10), ("日本", 4), ("emoji 🙂", 1), ("ﬁ", 2)],
        [('", "x" (9), "', 6), ("(3)", 5), (",", 4), ("a b", 3)],
        [("tab\there", 4), ("line\nbreak", 3), ("\\u0041", 2), ("'", 1)],
    ],
)
def test_explanation_round_trips_through_parse(tokens):
    text = format_baseline_explanation(tokens)
    assert parse_token_values(text) == {token: float(value) for token, value in tokens}


def test_explainer_output_round_trips_through_parse():
    text = BaselineExplainer(max_tokens=10).explain(RECORDS).text
    assert parse_token_values(text) == {"cat": 8.0, "dog": 5.0, "sat": 2.0}


def test_parse_free_text_explanations():
    text = 'fires on "Cat" (7) and on "dog", sometimes "bird" (12); also "CAT" (1)'
    # Case-insensitive keys, missing value -> top value, above 10 clipped, first mention wins.
    assert parse_token_values(text) == {"cat": 7.0, "dog": 10.0, "bird": 10.0}
    assert parse_token_values('"x" (2.5)') == {"x": 2.5}
    assert parse_token_values("no quoted tokens here") == {}
    assert parse_token_values('"" (3), "   " (4)') == {}


# ---------------------------------------------------------------------------------- simulator


def test_simulator_looks_tokens_up():
    explanation = format_baseline_explanation([("cat", 8), ("dog", 5)])
    excerpts = [[" Cat", "sat", "DOG ", "cats"], ["the", "dog"]]
    simulation = BaselineSimulator().simulate(explanation, excerpts)
    assert len(simulation) == 2
    assert simulation[0].tokens == (" Cat", "sat", "DOG ", "cats")
    assert simulation[0].expected_activations == (8.0, 0.0, 5.0, 0.0)
    assert simulation[1].expected_activations == (0.0, 5.0)
    assert all(s.mode == "token_lookup" for s in simulation)


def test_simulator_with_no_excerpts():
    assert BaselineSimulator().simulate('"a" (1)', []) == []


def test_baseline_end_to_end_scores_a_token_neuron_perfectly():
    # A neuron that fires on "cat" only: the baseline explanation recovers it exactly.
    explain = [record(["the", "cat", "sat"], [0, 4, 0]), record(["a", "cat"], [0, 4])]
    score_top = [record(["cat", "dog"], [4, 0]), record(["my", "cat", "ran"], [0, 4, 0])]
    score_random = [record(["x", "y", "cat"], [0, 0, 4])]
    explanation = BaselineExplainer().explain(explain).text
    simulator = BaselineSimulator()
    top_sim = simulator.simulate(explanation, [r.tokens for r in score_top])
    rand_sim = simulator.simulate(explanation, [r.tokens for r in score_random])
    result = score_simulation(
        [ScoredSequence(r.activations, s.expected_activations) for r, s in zip(score_top, top_sim)],
        [ScoredSequence(r.activations, s.expected_activations) for r, s in zip(score_random, rand_sim)],
        value_scale=4.0 / 10,
    )
    assert result.score == pytest.approx(1.0)
    assert result.rsquared == pytest.approx(1.0)


# ----------------------------------------------------------------------------------------- ids


def test_explainer_id_is_stable_and_pinned():
    prompt_hash = _sha(BASELINE_VERSION)[:16]
    params = json.dumps({"max_tokens": 8}, sort_keys=True)
    expected = "baseline-" + _sha(BASELINE_VERSION, prompt_hash, params)[:12]
    explainer = BaselineExplainer()
    assert explainer.prompt_hash == prompt_hash
    assert explainer.explainer_id == expected
    assert BaselineExplainer(max_tokens=8).explainer_id == expected
    assert explainer.model_name == BASELINE_VERSION


def test_explainer_id_changes_with_max_tokens():
    ids = {BaselineExplainer(max_tokens=n).explainer_id for n in (1, 4, 8, 16)}
    assert len(ids) == 4


def test_simulator_id_is_stable_and_distinct():
    expected = "baseline-" + _sha(BASELINE_VERSION, _sha(BASELINE_VERSION)[:16], "{}")[:12]
    assert BaselineSimulator().simulator_id == expected == BaselineSimulator().simulator_id
    assert BaselineSimulator().simulator_id != BaselineExplainer().explainer_id


def test_make_ids_depend_on_every_input_but_not_param_order():
    base = make_explainer_id("local", "model-a", "hash1", {"temperature": 0.0, "max_tokens": 60})
    assert base == make_explainer_id("local", "model-a", "hash1", {"max_tokens": 60, "temperature": 0.0})
    assert base.startswith("local-")
    assert base != make_explainer_id("local", "model-b", "hash1", {"temperature": 0.0, "max_tokens": 60})
    assert base != make_explainer_id("local", "model-a", "hash2", {"temperature": 0.0, "max_tokens": 60})
    assert base != make_explainer_id("local", "model-a", "hash1", {"temperature": 0.5, "max_tokens": 60})
    assert make_simulator_id("openai", "m", "h", {}) != make_simulator_id("openai", "m", "h", {"mode": "x"})


# --------------------------------------------------------------------------- neurons chosen by the baseline


def test_best_and_worst_pick_by_score_skip_undefined_and_break_ties_by_index():
    from neuron_pipeline.interp.baseline import best_and_worst

    scores = {0: 0.2, 1: None, 2: 0.9, 3: 0.2, 4: -0.1, 5: 0.9}
    assert best_and_worst(scores, 1, 1) == [2, 4]
    assert best_and_worst(scores, 2, 0) == [2, 5]
    assert best_and_worst(scores, 0, 2) == [0, 4]
    assert best_and_worst(scores, 9, 9) == [0, 2, 3, 4, 5]  # never the unscored neuron 1


def test_baseline_selector_spec_is_parsed_and_mixing_forms_is_refused():
    from neuron_pipeline.config import ExplainerSettings, baseline_selectors

    assert baseline_selectors("best:2, worst:1") == (2, 1) and baseline_selectors("worst:3") == (0, 3)
    assert baseline_selectors("0-3") is None and baseline_selectors("all") is None
    with pytest.raises(ValueError, match="mixes best:/worst: with indices"):
        ExplainerSettings(backend="local", neurons="best:1,4")


def test_llm_entries_with_best_and_worst_run_on_the_neurons_the_baseline_scores_highest_and_lowest(tmp_path, monkeypatch):
    """Through `neuron-pipeline run`: the LLM explainer and simulator (a local OpenAI-compatible
    server) run on exactly the neurons whose baseline score, in the scores table, is the highest
    and the lowest of each layer; with `explanations: llm` the LLM simulator, and the detection and
    fuzzing scorers derived from it, skip the baseline's (the embedding scorer judges both)."""
    import sys
    from pathlib import Path

    import polars as pl

    sys.path.insert(0, str(Path(__file__).parent))
    from fake_openai import FakeOpenAIServer

    from neuron_pipeline.cli import main
    from neuron_pipeline.lake import read_table

    monkeypatch.setenv("NEURON_PIPELINE_SELECTOR_KEY", "sk-selector")
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    with FakeOpenAIServer() as fake:
        api = {"backend": "openai", "model": "fake-model", "base_url": fake.base_url,
               "api_key_env": "NEURON_PIPELINE_SELECTOR_KEY", "neurons": "best:1,worst:1"}
        config = tmp_path / "config.json"
        config.write_text(json.dumps({
            "corpus": {"max_sequences": 24},
            "explainers": [{"backend": "baseline"}, api],
            "simulators": [{"backend": "baseline"}, {**api, "mode": "integers", "explanations": "llm"}],
        }))
        code = main(["run", "--config", str(config), "--lake", str(tmp_path / "lake"), "--layers", "0-1", "--neurons", "0-7"])
    assert code == 0
    lake = tmp_path / "lake"
    scores = read_table(lake, "scores")
    baseline = scores.filter(pl.col("explainer_id").str.starts_with("baseline-") & pl.col("simulator_id").str.starts_with("baseline-")
                             & pl.col("score").is_not_null())
    llm = read_table(lake, "explanations").filter(pl.col("explainer_id").str.starts_with("llm-"))
    simulated = read_table(lake, "simulations").filter(pl.col("simulator_id").str.starts_with("chat-"))
    # explanations: llm - the LLM simulator read the LLM's explanations only
    assert simulated.height and simulated["explainer_id"].str.starts_with("llm-").all()
    judged = read_table(lake, "scorer_results")
    by_llm = judged.filter(pl.col("method").is_in(["detection", "fuzzing"]))
    assert set(by_llm["method"]) == {"detection", "fuzzing"}
    assert by_llm["explainer_id"].str.starts_with("llm-").all()
    embedded = judged.filter(pl.col("method") == "embedding")
    assert embedded["explainer_id"].str.starts_with("baseline-").any() and embedded["explainer_id"].str.starts_with("llm-").any()
    # Scored layer by layer: one commit per layer, each replacing only its own layer's rows.
    from deltalake import DeltaTable

    commits = DeltaTable(str(lake / "scorer_results")).history()
    assert sorted(c["operationParameters"]["predicate"].split(" AND ")[0] for c in commits) == ["layer = '0'", "layer = '1'"]
    for layer in ("0", "1"):
        ranked = baseline.filter(pl.col("layer") == layer).sort(["score", "neuron"], descending=[True, False])
        worst = baseline.filter(pl.col("layer") == layer).sort(["score", "neuron"])["neuron"][0]
        expected = sorted({ranked["neuron"][0], worst})
        assert sorted(llm.filter(pl.col("layer") == layer)["neuron"].to_list()) == expected, layer
        assert sorted(simulated.filter(pl.col("layer") == layer)["neuron"].unique().to_list()) == expected, layer


def test_derived_detection_and_fuzzing_judge_what_their_simulator_simulates():
    """Without a `scorers:` section the detection and fuzzing scorers copy the LLM simulator's
    `explanations`, so `explanations: llm` halves a slow local judge's work too; the embedding
    scorer (no LLM) always judges every explanation."""
    from neuron_pipeline.config import Settings

    local = {"backend": "local", "model": "qwen2.5-coder-0.5b-instruct"}
    only_llm = Settings.model_validate({"explainers": [{"backend": "baseline"}, local],
                                        "simulators": [{"backend": "baseline"}, {**local, "explanations": "llm"}]})
    judged = {s.method: s.explanations for s in only_llm.scorer_entries}
    assert judged == {"embedding": "all", "detection": "llm", "fuzzing": "llm"}
    every = Settings.model_validate({"explainers": [{"backend": "baseline"}, local], "simulators": [{"backend": "baseline"}, local]})
    assert {s.explanations for s in every.scorer_entries} == {"all"}
    with pytest.raises(ValueError, match="explanations"):
        Settings.model_validate({"scorers": [{"method": "detection", **local, "explanations": "some"}]})


def test_a_selector_that_picks_nothing_in_a_layer_is_a_warning(monkeypatch):
    """`best:N,worst:N` in a layer where no neuron has a defined baseline score (all flat) picks no
    neuron; the step says so instead of leaving the layer out silently. Index specs never warn."""
    import neuron_pipeline.assets.explanations as explanations
    from neuron_pipeline.config import Settings

    class Log:
        def __init__(self):
            self.warnings = []

        def warning(self, message):
            self.warnings.append(message)

    picked = {0: [3, 5], 1: []}
    monkeypatch.setattr(explanations, "select_neurons", lambda spec, candidates, lake, layer, settings: picked[layer])
    log = Log()
    chosen = explanations.selections("best:1,worst:1", [0, 1], {0: [3, 4, 5], 1: [0, 1, 2]}, None, Settings(), log)
    assert chosen == picked
    assert len(log.warnings) == 1 and log.warnings[0].startswith("layer 1:") and "best:1,worst:1" in log.warnings[0]
    quiet = Log()
    explanations.selections("0-2", [1], {1: [0, 1, 2]}, None, Settings(), quiet)
    assert quiet.warnings == []


def test_best_and_worst_rank_by_the_configured_baseline():
    from neuron_pipeline.config import Settings

    assert Settings().baseline_tokens == 8
    custom = Settings.model_validate({"explainers": [{"backend": "baseline", "baseline_tokens": 3}]})
    assert custom.baseline_tokens == 3


@pytest.mark.parametrize("section", ["simulators", "scorers"])
def test_llm_only_entries_without_an_llm_explainer_are_refused(section):
    """`explanations: llm` with only the baseline explainer would judge nothing while the run looks
    complete: a config error naming the entry and the fix."""
    from neuron_pipeline.config import Settings

    local = {"backend": "local", "model": "qwen2.5-coder-0.5b-instruct", "explanations": "llm"}
    entry = {**local, "method": "detection"} if section == "scorers" else local
    with pytest.raises(ValueError, match=rf"{section}\[1\] has `explanations: llm`.*add an LLM explainer or set `explanations: all`"):
        Settings.model_validate({"explainers": [{"backend": "baseline"}],
                                 section: [{"backend": "baseline"} if section == "simulators" else {"method": "embedding"}, entry]})
    # With an LLM explainer the same entry is fine.
    Settings.model_validate({"explainers": [{"backend": "baseline"}, {"backend": "local"}], section: [entry]})
