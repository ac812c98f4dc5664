"""The evaluation suite: puzzle metrics against hand counts, the per-token simulator against a plain
forward pass, planting on a tiny random model, and `neuron-pipeline eval` end to end."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest
import torch

from neuron_pipeline.interp.baseline import BaselineExplainer, BaselineSimulator
from neuron_pipeline.interp.evaluation import (
    PuzzleScores,
    discrimination,
    discrimination_rate,
    explainer_trials,
    names_answer,
)
from neuron_pipeline.interp.puzzles import PUZZLES, balanced_subset, tokenize
from neuron_pipeline.interp.simulator import SequenceSimulation


def test_puzzle_set_is_large_varied_and_well_formed():
    assert len(PUZZLES) >= 30
    kinds = {p.kind for p in PUZZLES}
    assert kinds == {"single_token", "token_family", "syntax", "position", "topic", "phrase", "negation"}
    for p in PUZZLES:
        assert len(p.false_explanations) >= 3 and p.true_explanation not in p.false_explanations
        assert any(r.max_activation > 0 for r in p.records), p.name
        assert all("".join(r.tokens) for r in p.records)
    assert len({p.name for p in PUZZLES}) == len(PUZZLES)
    assert tokenize("Of course, of course.") == ("Of", " course", ",", " of", " course", ".")
    # A short run still covers every kind.
    assert {p.kind for p in balanced_subset(7)} == kinds


def test_discrimination_counts_pairs_and_ties_by_hand():
    results = [PuzzleScores("a", "k", (0.9, 0.1, 0.95, 0.9)), PuzzleScores("b", "k", (0.5, 0.2, 0.2, 0.2))]
    # a: beats 0.1, loses to 0.95, ties 0.9 -> 1.5 of 3; b: 3 of 3.
    assert results[0].pairs_won == 1.5 and results[1].pairs_won == 3
    assert discrimination_rate(results) == pytest.approx(4.5 / 6)


class _ReadsTheTokens:
    """A simulator that fires on the quoted tokens of an explanation: perfect on token puzzles."""

    simulator_id = "lookup"
    model_name = "lookup"

    def simulate(self, explanation, excerpts):
        return BaselineSimulator().simulate(explanation, excerpts)


def test_a_token_reading_simulator_prefers_true_token_explanations():
    the = next(p for p in PUZZLES if p.name == "the")
    [scores] = discrimination(_ReadsTheTokens(), [the])
    assert scores.scores[0] == pytest.approx(1.0)  # 'the word "the"' names exactly the firing token
    assert scores.pairs_won == len(the.false_explanations)


def test_explainer_trials_score_the_written_explanation_and_check_the_name():
    the = next(p for p in PUZZLES if p.name == "the")
    [trial] = explainer_trials(BaselineExplainer(), _ReadsTheTokens(), [the])
    assert trial.explanation.startswith('the tokens "the"') and trial.named and trial.error is None
    assert trial.score == pytest.approx(1.0) and trial.true_score == pytest.approx(1.0)


def test_names_answer_matches_words_not_substrings():
    assert names_answer('the word "time"', ["time"])
    assert not names_answer("sometimes", ["time"])
    assert names_answer("question marks (?)", ["?"])
    assert names_answer("words about the family", ["family"])


@pytest.mark.slow
def test_per_token_simulator_matches_plain_forward_passes():
    """Prefix reuse, excerpt caches and batched questions give what one plain forward pass of the
    whole prompt gives, question by question (the bundled SmolLM2)."""
    from neuron_pipeline.interp.simulator import PerTokenSimulator, excerpt_questions
    from neuron_pipeline.llm.local import LocalLLM

    llm = LocalLLM("smollm2-135m-instruct")
    simulator = PerTokenSimulator(llm)
    excerpts = [("She", " left", " the", " house"), (" the", " dog", " barked", "\n", ' "')]
    fast = [llm.question_distributions(simulator.prefix(e), *zip(*[excerpt_questions(t) for t in excerpts])) for e in ("the word \"the\"", "dogs")]
    for explanation, results in zip(("the word \"the\"", "dogs"), fast):
        prefix = simulator.prefix(explanation)
        for tokens, result in zip(excerpts, results):
            context, questions = excerpt_questions(tokens)
            for row, question in enumerate(questions):
                ids = llm.tokenizer(prefix)["input_ids"] + llm.tokenizer(context + question, add_special_tokens=False)["input_ids"]
                with torch.inference_mode():
                    logits = llm.model(input_ids=torch.tensor([ids])).logits[0, -1].float()
                probs = torch.softmax(logits, -1)[list(llm.values.first)].double().numpy()
                expected = result.probabilities[row]
                # The "1"/"10" split moves mass between 1 and 10 only; all other values agree.
                others = [v for v in range(11) if v not in (1, 10)]
                np.testing.assert_allclose(expected[others], probs[others], rtol=2e-3, atol=1e-6)
                assert expected[1] + expected[10] == pytest.approx(probs[1], rel=2e-3)
    simulated = simulator.simulate("the word \"the\"", excerpts)
    assert [s.mode for s in simulated] == ["per_token_logprobs"] * 2 and len(simulated[1].expected_activations) == 5


@pytest.mark.slow
def test_planting_makes_a_neuron_fire_on_its_tokens(tmp_path):
    """A tiny random Llama: after planting, the neuron's top positions are the planted token's."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from neuron_pipeline.subject.loading import Subject
    from neuron_pipeline.subject.planting import Plant, plant, save_planted

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4)
    model = LlamaForCausalLM(config).eval()

    class _Tokens:
        def encode(self, text, add_special_tokens=False):
            return [int(text.strip())]

        def save_pretrained(self, folder):
            pass

    subject = Subject.from_model(model, "tiny", _Tokens())
    sequences = torch.randint(0, 64, (64, 16), generator=torch.Generator().manual_seed(1)).numpy()
    target = Plant("seven", 0, 5, (" 7",), ("7",))
    plant(subject, [target], sequences)
    captured = []
    handle = model.model.layers[0].mlp.down_proj.register_forward_pre_hook(lambda m, a: captured.append(a[0][..., 5]))
    with torch.inference_mode():
        model(input_ids=torch.as_tensor(sequences))
    handle.remove()
    activations = captured[0].reshape(-1)
    is_seven = torch.as_tensor(sequences.reshape(-1) == 7)
    top = torch.argsort(activations, descending=True)[: int(is_seven.sum())]
    assert is_seven[top].float().mean() >= 0.9
    assert float(model.model.layers[0].mlp.down_proj.weight[:, 5].abs().sum()) == 0.0  # the rest of the model untouched
    assert (save_planted(subject, tmp_path / "planted") / "config.json").is_file()


def test_eval_without_an_llm_simulator_is_one_line(tmp_path, capsys):
    from neuron_pipeline.cli import main

    config = tmp_path / "c.yaml"
    config.write_text("explainers:\n  - backend: baseline\nsimulators:\n  - backend: baseline\n")
    assert main(["eval", "--config", str(config), "--lake", str(tmp_path / "lake")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["neuron-pipeline: error: eval needs at least one LLM simulator: add one to `simulators:` or pass --models"]
    assert not (tmp_path / "lake" / "evaluations").exists()


def test_eval_of_an_unknown_model_is_one_line(tmp_path, capsys):
    from neuron_pipeline.cli import main

    assert main(["eval", "--models", "no-such-model-anywhere", "--lake", str(tmp_path / "lake")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no-such-model-anywhere" in err[0]
    assert not (tmp_path / "lake" / "evaluations").exists()


@pytest.mark.slow
def test_eval_writes_the_table_and_the_report(tmp_path):
    """`neuron-pipeline eval` with the bundled SmolLM2 on one puzzle: gated rows in the lake, EVALUATION.md."""
    from neuron_pipeline.cli import main

    report = tmp_path / "EVALUATION.md"
    lake = tmp_path / "lake"
    assert main(["eval", "--models", "smollm2-135m-instruct", "--puzzles", "1", "--no-planted", "--lake", str(lake), "--report", str(report)]) == 0
    rows = pl.read_delta(str(lake / "evaluations"))
    assert sorted(rows["check"].to_list()) == ["puzzle_discrimination", "puzzle_explanations", "puzzle_explanations"]
    discrimination_row = rows.filter(pl.col("check") == "puzzle_discrimination").row(0, named=True)
    assert discrimination_row["n"] == 4 and 0 <= discrimination_row["value"] <= 1
    assert discrimination_row["simulator_model"].startswith("smollm2-135m-instruct (per_token_logprobs)")
    baseline = rows.filter(pl.col("explainer_model") == "baseline").row(0, named=True)
    assert json.loads(baseline["details"])["named"] == 1.0  # the baseline lists the firing token itself
    text = report.read_text()
    assert "Simulators: do they prefer the true explanation?" in text and "smollm2-135m-instruct" in text


def test_planted_best_of_is_ranked_by_the_evaluations_llm_simulator_and_labelled():
    """A best-of-n (or revising) explainer in the planted run ranks its candidates with the first
    LLM simulator of the evaluation, never the token look-up; its rows carry the variant."""
    from neuron_pipeline.config import load_settings
    from neuron_pipeline.evaluation import _prompt_label, _ranking_simulators

    settings = load_settings(profile="demo", environ={}, overrides={
        "explainers": [{"backend": "local", "model": "qwen2.5-coder-1.5b-instruct", "best_of": 4}],
        "simulators": [{"backend": "baseline"}, {"backend": "local", "model": "qwen2.5-coder-1.5b-instruct"},
                       {"backend": "local", "model": "smollm2-135m-instruct"}],
    })  # fmt: skip
    [ranker] = _ranking_simulators(settings, settings.explainers)
    assert ranker.backend == "local" and ranker.model == "qwen2.5-coder-1.5b-instruct"
    greedy = settings.explainers[0].model_copy(update={"best_of": 1})
    assert _ranking_simulators(settings, [greedy]) == []  # nothing to rank: the token look-up stays
    assert _prompt_label(settings.explainers[0], None) == "explainer_v4 · best-of-4"
    assert _prompt_label(greedy, None) == "explainer_v4"


def test_the_report_tells_apart_two_prompts_of_one_explainer_model(tmp_path):
    """Two prompts of the same explainer model on the planted neurons: each line names its prompt."""
    from neuron_pipeline.evaluation import EvaluationRow, evaluation_frame, write_report

    rows = [
        EvaluationRow("planted_named", "qwen", "", prompt, value, 3, details={"named": {}, "explanations": {"house": text}})
        for prompt, value, text in (("explainer_v4", 1.0, '"house": the word "house"'), ("explainer_v3", 0.0, "rooms"))
    ]
    text = write_report(evaluation_frame(rows, 34), tmp_path / "EVALUATION.md", "neuron-pipeline eval").read_text()
    assert "- **Named by qwen** (explainer_v4): 1.000; house: '\"house\": the word \"house\"'" in text
    assert "- **Named by qwen** (explainer_v3): 0.000; house: 'rooms'" in text
