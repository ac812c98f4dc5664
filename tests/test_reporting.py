"""Failures are never reported as success, and results read by name.

- explanations from chat servers that do not continue a trailing assistant message (a server
  that answers a full sentence, one that echoes the prefix, one that answers garbage);
- failed and unusable calls, per explainer and simulator, in the tables, the run summary, the
  UI metadata, the viewer and ``show``; a total failure ends ``neuron-pipeline run`` with exit 1
  and one line naming it;
- labels (model · prompt · variant) next to every id; meaningless pairs (prose through the token
  look-up) neither computed nor shown.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import polars as pl
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from fake_openai import FakeOpenAIServer  # noqa: E402

from neuron_pipeline.interp.explainer import LLMExplainer, parse_explanation  # noqa: E402
from neuron_pipeline.interp.llm_protocol import without_prefill  # noqa: E402
from neuron_pipeline.interp.records import ActivationRecord  # noqa: E402
from neuron_pipeline.interp.reporting import (  # noqa: E402
    UNUSABLE_PREFIX,
    explainer_label,
    is_unusable,
    pair_is_meaningful,
    simulator_label,
)
from neuron_pipeline.lake import read_table  # noqa: E402
from neuron_pipeline.lake.outcomes import (  # noqa: E402
    describe_failure,
    failure_report,
    meaningful_pair_expr,
    total_failures,
)

KEY_ENV = "NEURON_PIPELINE_REPORTING_KEY"


def _api(fake: FakeOpenAIServer, **extra) -> dict:
    return {"backend": "openai", "model": "fake-model", "base_url": fake.base_url, "api_key_env": KEY_ENV, "max_retries": 0, **extra}


def _records() -> list[ActivationRecord]:
    tokens = ["She", " poured", " the", " tea", " into", " a", " cup"]
    return [
        ActivationRecord(tokens, [0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 3.0], sequence_id=0),
        ActivationRecord(tokens, [0.0, 0.0, 0.0, 2.0, 0.0, 0.0, 0.5], sequence_id=1),
    ]


# --------------------------------------------------------------------------- prefill and parsing


@pytest.mark.parametrize(
    "completion, expected",
    [
        (' the word "cup" and words like it.', 'the word "cup" and words like it'),  # continued the prefill
        ('This neuron responds to the word "cup" and words like it.', 'the word "cup" and words like it'),
        ('The main thing neuron C does is find the word "cup".', 'the word "cup"'),
        ("Neuron C finds cups. It also fires on mugs.", "cups"),
        ("The main thing neuron C does is find\nnames of days", "names of days"),  # the echo on its own line
        ("**Answer:** days of the week", "days of the week"),
        ("findings of science", "findings of science"),  # a word that starts like a verb stays
        ("<start>\ncup\t10\n<end>", ""),  # the listing continued: unusable
        ("!!! ### 123", ""),
        ("The main thing neuron C does is find", ""),  # only the prefix
    ],
)
def test_parse_explanation_reads_continued_fresh_and_echoed_answers(completion, expected):
    assert parse_explanation(completion) == expected


def test_prefill_moves_into_the_prompt_for_chat_servers():
    explainer_v1 = (("system", "s"), ("user", "Neuron C\n...\nFinish the sentence. The main thing neuron C does is find"),
                    ("assistant", "The main thing neuron C does is find"))
    assert without_prefill(explainer_v1) == explainer_v1[:2]  # the user message already asks for it
    own = (("user", "Describe the neuron."), ("assistant", "It fires on"))
    assert without_prefill(own) == (("user", "Describe the neuron.\n\nFinish this sentence: It fires on"),)
    no_prefill = (("user", "Describe the neuron."),)
    assert without_prefill(no_prefill) == no_prefill


@pytest.mark.parametrize(
    "template, ending",
    [
        ("explainer_v1", "The main thing neuron C does is find"),  # ends in an assistant prefill
        ("explainer_v2", "The main thing this neuron does is find ..."),  # no prefill
        ("explainer_v3", "The main thing this neuron does is find ..."),  # no prefill
        ("explainer_v4", 'Strongest tokens: "cup" (10), "tea" (6)'),  # the default: ends with the strongest tokens
    ],
)
@pytest.mark.parametrize("style", ["continue", "sentence", "echo", "garbage"])
def test_explanations_against_chat_servers_that_do_not_continue_the_prefill(style, template, ending, monkeypatch):
    """The same neuron explained by servers that word their answer differently: the explanation
    is the same phrase, or (garbage) an explanation error counted as unusable."""
    from neuron_pipeline.llm.openai_api import OpenAICompatible

    monkeypatch.setenv(KEY_ENV, "sk-reporting")
    with FakeOpenAIServer(explainer_style=style) as fake:
        with OpenAICompatible("fake-model", base_url=fake.base_url, api_key_env=KEY_ENV, max_retries=0) as backend:
            explanation = LLMExplainer(backend, template_name=template).explain(_records())
        sent = fake.posts("/chat/completions")[0].body["messages"]
    assert sent[-1]["role"] == "user", "a trailing assistant message was sent to a chat server"
    assert sent[-1]["content"].endswith(ending)
    if style == "garbage":
        assert explanation.text == "" and is_unusable(explanation.error), explanation
        assert "cup\\t10" in explanation.error  # the answer is quoted in the error
    else:
        assert explanation.error is None
        assert explanation.text == 'the word "cup" and words like it'


# --------------------------------------------------------------------------- labels and pairs


def test_labels_name_model_prompt_and_variant(monkeypatch):
    from neuron_pipeline.config import ExplainerSettings, SimulatorSettings
    from neuron_pipeline.llm import make_explainer, make_simulator

    monkeypatch.setenv(KEY_ENV, "sk-reporting")
    with FakeOpenAIServer() as fake:
        api = {k: v for k, v in _api(fake).items() if k != "max_retries"}
        assert explainer_label(make_explainer(ExplainerSettings())) == "baseline · top tokens (8)"
        assert explainer_label(make_explainer(ExplainerSettings(**api))) == "fake-model · explainer_v4"
        refined = make_explainer(ExplainerSettings(**api, best_of=4, revise=True))
        assert explainer_label(refined) == "fake-model · explainer_v4 · best of 4 + revision"
        assert simulator_label(make_simulator(SimulatorSettings())) == "baseline · token look-up"
        assert simulator_label(make_simulator(SimulatorSettings(**api, mode="prompt_logprobs"))) == "fake-model · simulator_v1 · all-at-once"
        chat = make_simulator(SimulatorSettings(**api, mode="top_logprobs", calibrate=True))
        assert simulator_label(chat) == "fake-model · simulator_v1 · chat top-logprobs · calibrated"
        integers = make_simulator(SimulatorSettings(**api, mode="integers"))
        assert simulator_label(integers) == "fake-model · simulator_v1 · chat integers"


def test_meaningful_pairs_one_rule_in_python_and_polars():
    pairs = [("baseline-a", "baseline-b"), ("baseline-a", "chat-c"), ("llm-d", "chat-c"), ("llm-d", "baseline-b")]
    frame = pl.DataFrame(pairs, schema=["explainer_id", "simulator_id"], orient="row")
    assert frame.select(meaningful_pair_expr())[:, 0].to_list() == [pair_is_meaningful(*p) for p in pairs]
    assert [pair_is_meaningful(*p) for p in pairs] == [True, True, True, False]


def test_llm_explainers_with_only_the_token_lookup_simulator_is_one_clear_error(tmp_path, capsys):
    from neuron_pipeline.cli import EXIT_USER_ERROR, main

    config = tmp_path / "config.yaml"
    config.write_text(json.dumps({"explainers": [{"backend": "local"}], "simulators": [{"backend": "baseline"}]}))
    code = main(["run", "--config", str(config), "--lake", str(tmp_path / "lake"), "--layers", "0", "--neurons", "0"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == EXIT_USER_ERROR and len(err) == 1 and "add a simulator with backend local or openai" in err[0]
    assert not (tmp_path / "lake").exists()


# --------------------------------------------------------------------------- failure report


def test_failure_report_counts_failed_and_unusable_with_the_first_error():
    explanations = pl.DataFrame(
        {
            "layer": ["0"] * 4,
            "neuron": [0, 1, 2, 3],
            "explainer_id": ["llm-a"] * 4,
            "explainer_label": ["m · explainer_v1"] * 4,
            "error": [None, "LLMRequestError: 400", f"{UNUSABLE_PREFIX}: '!!'", "LLMRequestError: 500"],
        }
    )
    simulations = pl.DataFrame(  # two excerpts per simulated explanation; one neuron failed on all of them
        {
            "layer": ["0"] * 4,
            "neuron": [0, 0, 1, 1],
            "explainer_id": ["baseline-b"] * 4,
            "simulator_id": ["chat-s"] * 4,
            "simulator_label": ["m · simulator_v1 · chat integers"] * 4,
            "error": [None, None, f"{UNUSABLE_PREFIX}: ''", f"{UNUSABLE_PREFIX}: ''"],
        }
    )
    report = failure_report(explanations, simulations)
    rows = {row["role"]: row for row in report.iter_rows(named=True)}
    assert rows["explainer"] | {} == {
        "role": "explainer", "id": "llm-a", "label": "m · explainer_v1", "attempted": 4, "failed": 2, "unusable": 1,
        "first_error": "LLMRequestError: 400",
    }
    assert (rows["simulator"]["attempted"], rows["simulator"]["failed"], rows["simulator"]["unusable"]) == (2, 0, 1)
    assert total_failures(report).is_empty()
    everything_failed = total_failures(failure_report(explanations.filter(pl.col("error").is_not_null()), None))
    assert describe_failure(everything_failed.row(0, named=True)) == (
        "explainer llm-a (m · explainer_v1): 3 of 3 explanations failed (1 unusable; first error: LLMRequestError: 400)"
    )


def test_failed_simulation_rows_pass_the_quality_gate():
    from data_quality import QualityParams, validate_table
    from neuron_pipeline.lake import table_frame

    row = {
        "model": "m", "layer": "0", "neuron": 1, "explainer_id": "e", "simulator_id": "s", "kind": "top", "rank": 0,
        "sequence_id": 3, "tokens": ["a", "b"], "true_activations": [0.0, 1.0], "input_hash": "h",
        "prompt_tokens": 0, "completion_tokens": 0,
    }
    ok = {**row, "expected_activations": [0.0, 10.0], "mode": "chat_integers", "neuron": 2}
    failed = {**row, "expected_activations": None, "mode": None, "error": "LLMRequestError: 500"}
    params = QualityParams()
    assert validate_table("simulations", table_frame("simulations", [ok, failed]), params).success
    silent = {**row, "expected_activations": None, "mode": None}  # no values and no error: refused
    report = validate_table("simulations", table_frame("simulations", [ok, silent]), params)
    assert not report.success and "expected_activations and mode given when error is null" in report.summary()


def test_tables_written_before_new_columns_get_them_added(tmp_path):
    """A lake from before the labels: its tables are not refused; the new (nullable) columns are
    added on the next write and read as null until then."""
    import pyarrow as pa
    from deltalake import write_deltalake

    from neuron_pipeline.lake import SCHEMAS, check_table_schema, write_table

    old = pa.schema([f for f in SCHEMAS["scores"] if f.name not in ("explainer_label", "simulator_label")])
    row = {"model": "m", "layer": "0", "neuron": 1, "explainer_id": "e", "simulator_id": "s", "score": 0.5, "n_tokens": 3}
    write_deltalake(str(tmp_path / "scores"), pa.Table.from_pylist([row], schema=old), partition_by=["layer"])
    check_table_schema(tmp_path, "scores")  # not refused
    assert read_table(tmp_path, "scores")["explainer_label"].to_list() == [None]
    write_table(tmp_path, "scores", [{**row, "layer": "1", "explainer_label": "x"}], replace_where={"layer": "1"})
    frame = read_table(tmp_path, "scores", columns=["layer", "explainer_label"]).sort("layer")
    assert frame.rows() == [("0", None), ("1", "x")]


# --------------------------------------------------------------------------- through `neuron-pipeline run`


def _config(tmp_path: Path, explainer_fake: FakeOpenAIServer, simulator_fake: FakeOpenAIServer) -> Path:
    config = tmp_path / "config.yaml"
    config.write_text(
        json.dumps(
            {
                "corpus": {"max_sequences": 24},
                "records": {"score_top": 3, "score_random": 3},
                "explainers": [{"backend": "baseline"}, _api(explainer_fake)],
                "simulators": [{"backend": "baseline"}, _api(simulator_fake, mode="integers")],
                "scorers": [],  # detection / fuzzing would share the simulator's server and its scripted faults
            }
        )
    )
    return config


def _run(tmp_path: Path, config: Path) -> int:
    from neuron_pipeline.cli import main

    return main(["run", "--config", str(config), "--lake", str(tmp_path / "lake"), "--layers", "0", "--neurons", "0-3"])


@pytest.mark.parametrize(
    "case, expected",
    [
        ("explainer calls fail", "explainer llm-{e} (fake-model · explainer_v4): 4 of 4 explanations failed (first error: LLMRequestError: "),
        ("explainer answers garbage", "explainer llm-{e} (fake-model · explainer_v4): 4 of 4 explanations failed (4 unusable; first error: unusable completion: '<start>"),
        ("simulator answers prose", "simulator chat-{s} (fake-model · simulator_v1 · chat integers): 8 of 8 simulations failed (8 unusable; "),
    ],
)
def test_a_total_failure_ends_the_run_with_exit_1_and_one_line_naming_it(case, expected, tmp_path, capsys, monkeypatch):
    from neuron_pipeline.cli import EXIT_RUN_FAILED

    monkeypatch.setenv(KEY_ENV, "sk-reporting")
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    style = {"explainer answers garbage": "garbage", "simulator answers prose": "simulator_garbage"}.get(case, "continue")
    with FakeOpenAIServer(explainer_style=style) as explainer_fake, FakeOpenAIServer(explainer_style=style) as simulator_fake:
        if case == "explainer calls fail":
            explainer_fake.fault_rates = {"400": 1.0}
        code = _run(tmp_path, _config(tmp_path, explainer_fake, simulator_fake))
    captured = capsys.readouterr()
    err = [line for line in captured.err.splitlines() if line.strip()]
    explainer_id = read_table(tmp_path / "lake", "explanations").filter(pl.col("explainer_id").str.starts_with("llm-"))["explainer_id"][0]
    simulator_id = read_table(tmp_path / "lake", "simulations").filter(pl.col("simulator_id").str.starts_with("chat-"))["simulator_id"][0]
    assert code == EXIT_RUN_FAILED and len(err) == 1, captured.err[-3000:]
    line = expected.format(e=explainer_id.removeprefix("llm-"), s=simulator_id.removeprefix("chat-"))
    assert err[0].startswith(f"neuron-pipeline: run failed: {line}"), err[0]
    # The baseline's results are still there, and the summary was printed before the failure.
    baseline_id = read_table(tmp_path / "lake", "layer_summary").filter(pl.col("explainer_id").str.starts_with("baseline-"))["explainer_id"][0]
    assert baseline_id in captured.out and "failed or unusable LLM calls" in captured.out


def test_partial_failures_are_visible_in_summary_metadata_viewer_and_show(tmp_path, capsys, monkeypatch):
    """Two of four explanations fail (HTTP 400), one simulation comes back empty: the run succeeds,
    and every place a person reads results says so, with labels next to the ids; the meaningless
    pair (the LLM explainer's prose through the token look-up) is nowhere."""
    import dagster as dg

    from neuron_pipeline.cli import main

    monkeypatch.setenv(KEY_ENV, "sk-reporting")
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
    (tmp_path / "dagster_home").mkdir()
    with FakeOpenAIServer() as explainer_fake, FakeOpenAIServer() as simulator_fake:
        explainer_fake.script("400", "400")
        simulator_fake.script("empty_content")
        code = _run(tmp_path, _config(tmp_path, explainer_fake, simulator_fake))
    out = capsys.readouterr().out
    assert code == 0

    lake = tmp_path / "lake"
    explanations = read_table(lake, "explanations")
    llm = explanations.filter(pl.col("explainer_id").str.starts_with("llm-"))
    assert llm["error"].is_not_null().sum() == 2 and set(llm["explainer_label"]) == {"fake-model · explainer_v4"}
    llm_id = llm["explainer_id"][0]
    simulations = read_table(lake, "simulations")
    failed = simulations.filter(pl.col("error").is_not_null())
    assert failed.select("neuron", "explainer_id").n_unique() == 1 and failed["error"][0].startswith(UNUSABLE_PREFIX)
    assert failed["expected_activations"].is_null().all()
    chat_id = simulations.filter(pl.col("simulator_id").str.starts_with("chat-"))["simulator_id"][0]

    # Meaningless pairs: not computed.
    for table in ("simulations", "scores", "layer_summary"):
        rows = read_table(lake, table)
        assert rows.filter((pl.col("explainer_id") == llm_id) & pl.col("simulator_id").str.starts_with("baseline-")).is_empty(), table
    scores = read_table(lake, "scores")
    failed_score = scores.filter(pl.col("null_reason").str.starts_with("simulation failed: unusable completion"))
    assert failed_score.height == 1 and failed_score["score"].is_null().all()
    summary = read_table(lake, "layer_summary")
    assert summary.height == 3 and summary["explainer_label"].is_not_null().all() and summary["simulator_label"].is_not_null().all()

    # Run summary: labels, ids and the failure table.
    # (rich wraps long labels inside their cells)
    for text in ("fake-model · explainer_v4", "fake-model · simulator_v1", llm_id, chat_id,
                 "failed or unusable LLM calls", "LLMRequestError"):
        assert text in out, text

    # UI metadata: the explanations and simulations materializations carry the failure report.
    instance = dg.DagsterInstance.get()
    reports = {}
    for key in ("explanations", "simulations"):
        event = instance.get_latest_materialization_event(dg.AssetKey(key))
        metadata = event.asset_materialization.metadata
        reports[key] = {row["id"]: row for row in metadata["failure_report"].value}
        assert "failures" in metadata
    assert (reports["explanations"][llm_id]["attempted"], reports["explanations"][llm_id]["failed"]) == (4, 2)
    assert reports["explanations"][llm_id]["first_error"].startswith("LLMRequestError")
    assert (reports["simulations"][chat_id]["attempted"], reports["simulations"][chat_id]["unusable"]) == (6, 1)
    by_pair = instance.get_latest_materialization_event(dg.AssetKey("scores")).asset_materialization.metadata["scores_by_pair"]
    assert "fake-model · explainer_v4" in by_pair.value and "baseline · token look-up" in by_pair.value
    instance.dispose()

    # Viewer: headline per pair with neuron counts, labels, the failure table; no meaningless pair.
    index = (tmp_path / "viewer" / "index.html").read_text()
    assert "Scores by explainer → simulator" in index and "Failed or unusable LLM calls" in index
    assert "fake-model · explainer_v4" in index and "baseline · token look-up" in index
    assert "fake-model · explainer_v4 <span class=\"arrow\">→</span> baseline · token look-up" not in index
    assert "mean score" in index

    # show: labels next to the ids.
    failed_neuron = int(llm.filter(pl.col("error").is_not_null())["neuron"][0])
    assert main(["show", "0", str(failed_neuron), "--lake", str(lake)]) == 0
    shown = capsys.readouterr().out
    assert "fake-model · explainer_v4" in shown and "(failed: LLMRequestError" in shown
    assert "baseline · token look-up" in shown
