"""The output-aware explainer: its prompt shows each neuron's promoted and suppressed tokens from
neuron_output_tokens (its own template and explainer id); `show` prints them next to the excerpts."""

from __future__ import annotations

import dagster as dg
import polars as pl
import pytest

from neuron_pipeline.cli import main
from neuron_pipeline.config import ConfigError, load_settings
from neuron_pipeline.definitions import build_definitions
from neuron_pipeline.interp.outputs import OutputTokens, format_output_tokens
from neuron_pipeline.interp.prompts import load_template
from neuron_pipeline.lake import read_table

from conftest import small_settings
from fake_openai import FakeOpenAIServer

KEY_ENV = "NEURON_PIPELINE_TEST_LLM_KEY"


def test_settings_choose_the_output_aware_template_and_refuse_the_baseline():
    settings = load_settings(overrides={"explainers": [{"backend": "local", "output_tokens": True}]}, environ={})
    assert settings.explainers[0].prompt == "explainer_outputs_v1"
    custom = load_settings(overrides={"explainers": [{"backend": "local", "output_tokens": True, "prompt": "mine.txt"}]}, environ={})
    assert custom.explainers[0].prompt == "mine.txt"
    with pytest.raises(ConfigError, match="output_tokens needs an LLM explainer"):
        load_settings(overrides={"explainers": [{"backend": "baseline", "output_tokens": True}]}, environ={})


def test_prompt_lines_escape_tokens():
    text = format_output_tokens(OutputTokens.of([" money", 'say "hi"', "a\nb"], [" the"]))
    assert text.splitlines() == ['Promotes: " money", "say \\"hi\\"", "a\\nb"', 'Suppresses: " the"']
    assert format_output_tokens(OutputTokens.of([], [])) == "Promotes: (none)\nSuppresses: (none)"


def test_output_aware_explainer_reads_each_neurons_promoted_tokens(tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "sk-test")
    with FakeOpenAIServer(max_lifetime_s=240) as fake:
        aware = {"backend": "openai", "model": "fake-model", "base_url": fake.base_url, "api_key_env": KEY_ENV,
                 "output_tokens": True}
        plain = {key: value for key, value in aware.items() if key != "output_tokens"}
        settings = small_settings(tmp_path / "lake", layers="1", neurons="0-2", explainers=[plain, aware])
        defs = build_definitions(settings)
        instance = dg.DagsterInstance.ephemeral()
        keys = ["neuron_activations", "activation_records", "neuron_output_tokens", "explanations"]

        def run():
            result = dg.materialize(list(defs.assets), selection=[dg.AssetKey(k) for k in keys], resources=defs.resources,
                                    instance=instance, partition_key="1")
            assert result.success
            return result

        assert dg.materialize(list(defs.assets), selection=[dg.AssetKey("corpus_tokens")], resources=defs.resources,
                              instance=instance).success
        run()
        lake = settings.lake_location
        outputs = read_table(lake, "neuron_output_tokens", where={"layer": "1", "neuron": [0, 1, 2]}).sort("neuron")
        explanations = read_table(lake, "explanations").sort("explainer_id", "neuron")
        ids = explanations["explainer_id"].unique().to_list()
        assert len(ids) == 2  # its own explainer id, next to the plain LLM explainer's
        aware_rows = explanations.filter(pl.col("prompt_hash") == load_template("explainer_outputs_v1", ("records", "output_tokens")).hash)
        assert aware_rows["neuron"].to_list() == [0, 1, 2] and aware_rows["error"].is_null().all()
        prompts = [
            next(m["content"] for m in reversed(r.body["messages"]) if m["role"] == "user")
            for r in fake.posts("/chat/completions")
        ]
        with_outputs = [p for p in prompts if "\nPromotes: " in p]
        assert len(with_outputs) == 3 and len(prompts) == 6  # only the output-aware explainer's prompts
        for row, explanation in zip(outputs.iter_rows(named=True), aware_rows["explanation"].to_list()):
            expected = format_output_tokens(OutputTokens.of(row["promoted_tokens"], row["suppressed_tokens"]))
            assert sum(expected in p for p in with_outputs) == 1  # each neuron's own tokens, once
            # The fake explainer repeats the first promoted token it was shown.
            assert f'makes the model say "{row["promoted_tokens"][0].strip()}' in explanation  # (closing quote parsed off)

        fake.reset()
        again = run()  # nothing changed: every explanation kept, no call made
        [event] = [e for e in again.get_asset_materialization_events() if e.asset_key.to_user_string() == "explanations"]
        assert event.materialization.metadata["new_calls"].value == 0
        assert fake.posts("/chat/completions") == []


def test_show_prints_promoted_and_suppressed_tokens(small_lake, capsys):
    assert main(["show", "1", "2", "--lake", str(small_lake), "--excerpts", "1"]) == 0
    out = capsys.readouterr().out
    row = read_table(small_lake, "neuron_output_tokens", where={"layer": "1", "neuron": 2}).row(0, named=True)
    promotes = next(line for line in out.splitlines() if line.startswith("promotes"))
    suppresses = next(line for line in out.splitlines() if line.startswith("suppresses"))
    assert repr(row["promoted_tokens"][0]) in promotes and f"{row['promoted_logits'][0]:+.2f}" in promotes
    assert repr(row["suppressed_tokens"][0]) in suppresses and f"{row['suppressed_logits'][0]:+.2f}" in suppresses
    assert out.index("promotes") < out.index("top 1 excerpts")


def test_plan_prices_the_output_aware_prompt():
    from neuron_pipeline.plan import make_plan

    from test_plan import fixed_records, words

    api = {"backend": "openai", "model": "m", "base_url": None}
    settings = load_settings(
        profile="demo",
        overrides={"layers": "0", "neurons": "0-1", "explainers": [api, {**api, "output_tokens": True}],
                   "simulators": [{"backend": "baseline"}]},
        environ={},
    )
    plan = make_plan(settings, latency_s=1.0, count=words, counter_name="words", records=fixed_records(2),
                     sample_name="2 fixed", shape=("m", 1, 2))
    plain, aware = [s for s in plan.stages if s.stage == "explain"]
    # The same excerpts plus two lines of ten quoted tokens, and its own longer instructions.
    assert aware.calls == plain.calls == 2 and aware.prompt_tokens > plain.prompt_tokens + 2 * 20
