"""`neuron-pipeline status` on a lake with a stale, a failed and a complete layer (issue 15).

Real CLI runs on one Dagster instance (DAGSTER_HOME) and lake: layer 0 under an earlier explainer
setting (stale now), layer 1 under the current settings (complete), layer 2 while the simulator's
API server fails every call (its capture done, its explanations step failed)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import polars as pl
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from fake_openai import FakeOpenAIServer  # noqa: E402
from reliability.lake_checks import settings_variables, write_small_corpus  # noqa: E402

from neuron_pipeline.lake import read_table, table_exists  # noqa: E402

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
KEY_ENV = "NEURON_PIPELINE_STATUS_KEY"
PRICES = {"usd_per_million_prompt": 2.0, "usd_per_million_completion": 8.0}


def _config(path: Path, corpus: Path, fake: FakeOpenAIServer, baseline_tokens: int) -> Path:
    path.write_text(json.dumps({
        "corpus": {"source": str(corpus), "max_sequences": 24},
        "explainers": [{"backend": "baseline", "baseline_tokens": baseline_tokens}],
        "simulators": [{"backend": "openai", "model": "fake", "base_url": fake.base_url, "api_key_env": KEY_ENV,
                        "max_retries": 1, "timeout_s": 10, **PRICES}],
    }))
    return path


def test_status_shows_stale_failed_and_complete_layers_and_the_spend(tmp_path, monkeypatch, capsys):
    import dagster as dg

    from neuron_pipeline.assets.status import LAYER_STAGES, pipeline_status
    from neuron_pipeline.cli import EXIT_RUN_FAILED, main
    from neuron_pipeline.config import load_settings

    for key in settings_variables():
        monkeypatch.delenv(key)
    home = tmp_path / "home"
    home.mkdir()
    shutil.copy(ROOT / "deploy" / "dagster.yaml", home / "dagster.yaml")
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    monkeypatch.setenv(KEY_ENV, "sk-status")
    corpus = write_small_corpus(tmp_path / "corpus", chars=12_000)
    lake = tmp_path / "lake"
    with FakeOpenAIServer(max_lifetime_s=600) as fake:
        earlier = _config(tmp_path / "earlier.yaml", corpus, fake, baseline_tokens=4)
        current = _config(tmp_path / "current.yaml", corpus, fake, baseline_tokens=6)

        def run(config: Path, layer: str) -> int:
            return main(["run", "--config", str(config), "--lake", str(lake), "--layers", layer, "--neurons", "0-3"])

        assert run(earlier, "0") == 0
        assert run(current, "1") == 0
        fake.fault_rates = {"503": 1.0}  # the API is down: layer 2's simulator cannot start
        assert run(current, "2") == EXIT_RUN_FAILED
        fake.fault_rates = {}
        capsys.readouterr()

        # The same settings as the runs (the neuron selection is part of the capture's recipe).
        assert main(["status", "--config", str(current), "--lake", str(lake), "--neurons", "0-3"]) == 0
    out = capsys.readouterr().out
    settings = load_settings(config_file=str(current), overrides={"lake": str(lake), "neurons": "0-3"})
    with dg.DagsterInstance.get() as instance:
        status = {layer.layer: layer for layer in pipeline_status(settings, instance).layers}

    states = {layer: {stage: s.state for stage, s in status[layer].stages.items()} for layer in status}
    stages = [stage for stage, _ in LAYER_STAGES]
    after_explanations = stages[stages.index("explanations"):]
    before = {stage: "complete" for stage in stages if stage not in after_explanations}  # capture, output tokens
    assert {"capture", "explanations", "simulations", "scores", "layer_summary"} <= set(stages)
    assert states["0"] == {**before, **dict.fromkeys(after_explanations, "stale")}, states["0"]
    assert states["1"] == dict.fromkeys(stages, "complete"), states["1"]
    assert states["2"] == {**before, "explanations": "failed", **dict.fromkeys(after_explanations[1:], "missing")}, states["2"]
    assert "code version" in status["0"].stages["explanations"].why
    assert "server_error after 2 attempts" in status["2"].stages["explanations"].why
    assert status["1"].todo() == [] and status["2"].todo() == after_explanations

    # The same on the screen, one line per reason.
    assert "layer 0 explanations stale: explanations has a new code version" in out
    assert "layer 2 explanations failed: run " in out and "server_error after 2 attempts" in out
    assert f"layer 0: {', '.join(after_explanations)}; layer 2: {', '.join(after_explanations)}" in out

    # LLM spend: the tokens stored with the simulations (and scorer results) at the configured prices.
    expected = {}
    for table, entries in (("simulations", settings.simulators), ("scorer_results", settings.scorer_entries)):
        priced = {(e.usd_per_million_prompt, e.usd_per_million_completion) for e in entries if e.backend != "baseline"}
        rows_of = read_table(lake, table) if table_exists(lake, table) else pl.DataFrame()
        for layer, rows in (rows_of.group_by("layer") if rows_of.height else []):
            prompt, completion = int(rows["prompt_tokens"].sum()), int(rows["completion_tokens"].sum())
            if not prompt + completion:
                continue
            [(per_prompt, per_completion)] = priced
            tokens, usd = expected.get(layer[0], (0, 0.0))
            expected[layer[0]] = (tokens + prompt + completion, usd + (prompt * per_prompt + completion * per_completion) / 1e6)
    assert set(expected) == {"0", "1"}
    for layer, (tokens, usd) in expected.items():
        assert tokens > 0 and status[layer].llm_tokens == tokens
        assert status[layer].llm_usd == pytest.approx(usd)
    total = sum(usd for _, usd in expected.values())
    assert f"${total:.4f} at the configured prices" in out
    assert read_table(lake, "explanations").filter(pl.col("layer") == "2").is_empty()


def test_status_of_a_lake_without_tables_is_one_line(tmp_path, capsys, monkeypatch):
    from neuron_pipeline.cli import EXIT_USER_ERROR, main

    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    assert main(["status", "--lake", str(tmp_path / "nothing")]) == EXIT_USER_ERROR
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "no lake tables" in err[0]
