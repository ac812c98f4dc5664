"""Detection, fuzzing and embedding scorers and contrastive explanations: metrics against values
computed by hand, excerpt choice and held-out rules on fixed records, malformed answers (retried,
then recorded as failed, never guessed), the fake OpenAI server, the real embedding model and the
bundled SmolLM2."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from fake_openai import FakeOpenAIServer  # noqa: E402

from neuron_pipeline.interp.classification import (  # noqa: E402
    ScoringSample,
    auroc,
    classification_metrics,
    parse_yes_no,
    MalformedAnswer,
    records_seen,
    scoring_sample,
    shuffled_groups,
    yes_probability,
)
from neuron_pipeline.interp.contrastive import ContrastiveExplainer, quiet_excerpts  # noqa: E402
from neuron_pipeline.interp.detection import DetectionScorer  # noqa: E402
from neuron_pipeline.interp.embedding_scoring import EmbeddingScorer  # noqa: E402
from neuron_pipeline.interp.fuzzing import FuzzingScorer, active_positions, marked_text  # noqa: E402
from neuron_pipeline.interp.llm_protocol import ChatRequest, ChatResponse, TokenLogprobs  # noqa: E402
from neuron_pipeline.interp.records import ActivationRecord, NeuronId, NeuronRecord, split_records  # noqa: E402


def rec(seq: int, text: str, peak: float, at: int = 1) -> ActivationRecord:
    tokens = tuple(" " + w for w in text.split())
    acts = tuple(peak if i == at else 0.0 for i in range(len(tokens)))
    return ActivationRecord(tokens, acts, seq)


# --------------------------------------------------------------------------- metrics by hand


def test_metrics_match_hand_computed_values():
    labels = [True, True, True, False, False]
    predictions = [True, False, True, True, False]
    probabilities = [0.9, 0.4, 0.8, 0.7, 0.1]
    m = classification_metrics(labels, predictions, probabilities)
    # TP 2, FN 1, FP 1, TN 1: recall 2/3, specificity 1/2, precision 2/3, F1 2*2/(4+1+1).
    assert m.recall == pytest.approx(2 / 3)
    assert m.balanced_accuracy == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert m.precision == pytest.approx(2 / 3)
    assert m.f1 == pytest.approx(4 / 6)
    # Positives 0.9, 0.4, 0.8 vs negatives 0.7, 0.1: 5 of 6 pairs ordered right.
    assert m.auroc == pytest.approx(5 / 6)
    assert (m.n_judged, m.n_activating, m.n_quiet) == (5, 3, 2)


def test_unjudged_excerpts_are_left_out_not_guessed():
    m = classification_metrics([True, True, False, False], [True, None, None, False], [0.9, None, None, 0.2])
    assert (m.n_judged, m.balanced_accuracy, m.auroc) == (2, 1.0, 1.0)
    # A judged excerpt without a probability: no AUROC at all rather than a partial one.
    assert classification_metrics([True, False], [True, False], [0.9, None]).auroc is None
    none = classification_metrics([True, False], [None, None], [None, None])
    assert none.balanced_accuracy is None and none.null_reason == "no excerpt judged"


def test_auroc_counts_ties_half_and_needs_both_classes():
    assert auroc([True, False], [0.5, 0.5]) == 0.5
    assert auroc([True, True, False], [0.3, 0.9, 0.3]) == pytest.approx(0.75)
    assert auroc([True, True], [0.1, 0.2]) is None
    m = classification_metrics([True, True], [True, True])
    assert m.balanced_accuracy is None and m.null_reason == "no non-activating excerpt judged"
    assert m.precision == 1.0 and m.f1 == 1.0


# --------------------------------------------------------------------------- parsing


def test_parse_yes_no_needs_an_answer_for_every_excerpt():
    parsed = parse_yes_no("1: yes\n2: No\nExcerpt 3: YES\n7: no", 3)
    assert {k: v[0] for k, v in parsed.items()} == {1: True, 2: False, 3: True}
    with pytest.raises(MalformedAnswer, match="excerpt\\(s\\) 2"):
        parse_yes_no("1: yes\n3: no", 3)
    with pytest.raises(MalformedAnswer, match="two answers"):
        parse_yes_no("1: yes\n1: no\n2: no", 2)
    with pytest.raises(MalformedAnswer):
        parse_yes_no("yes, yes and no", 3)


def test_yes_probability_reads_the_answer_token_alternatives():
    text = "1: yes\n2: no"
    tokens = (
        TokenLogprobs("1", 0.0),
        TokenLogprobs(":", 0.0),
        TokenLogprobs(" yes", math.log(0.6), {" yes": math.log(0.6), " no": math.log(0.2), " maybe": math.log(0.2)}),
        TokenLogprobs("\n", 0.0),
        TokenLogprobs("2", 0.0),
        TokenLogprobs(":", 0.0),
        TokenLogprobs(" no", math.log(0.9), {" no": math.log(0.9)}),
    )
    parsed = parse_yes_no(text, 2)
    assert yes_probability(tokens, parsed[1][1]) == pytest.approx(0.75)
    assert yes_probability(tokens, parsed[2][1]) == pytest.approx(0.0)


# --------------------------------------------------------------------------- which excerpts


def _neuron() -> NeuronRecord:
    top = [rec(100 + i, f"top excerpt number {i} here", 10.0 - 0.1 * i) for i in range(20)]
    random_records = [rec(200 + i, f"random text {i} with cat", 1.0 if i % 2 else 3.0) for i in range(20)]
    quantile = {
        0: [rec(300, "low bin one", 0.5), rec(301, "low bin two", 0.6)],
        3: [rec(330, "mid bin one", 5.0), rec(100, "same sequence as top 0", 9.0)],
        4: [rec(340, "high bin one", 8.0), rec(341, "high bin two", 7.0)],
    }
    return NeuronRecord(NeuronId(0, 0), top, random_records, quantile)


def test_scoring_sample_draws_across_bins_and_never_what_an_explainer_saw():
    record = _neuron()
    splits = split_records(record, 5, 5, 5)
    sample = scoring_sample(record, splits.explain, n_activating=6, n_quiet=4, activating_min=0.4, quiet_max=0.2)
    seen = {r.sequence_id for r in splits.explain}
    ids = [r.sequence_id for r in sample.activating]
    # Bins from the highest down, round robin; bin 0 is below the activating bar; sequence 100
    # (shown to the explainer as top excerpt 0) is never scored, not even from a quantile bin.
    assert ids[:3] == [340, 330, 341]
    assert len(ids) == 6 and not set(ids) & seen and 100 not in ids
    assert all(r.max_activation >= 4.0 for r in sample.activating)
    # Non-activating: random excerpts below 0.2 x 10.0 only.
    assert [r.sequence_id for r in sample.quiet] == [201, 203, 205, 207]
    assert sample.top_activation == 10.0


def test_records_seen_by_each_kind_of_explainer():
    record = _neuron()
    splits = split_records(record, 5, 5, 5)

    class Plain:
        pass

    class Refining:
        def explain_splits(self, splits_list):
            return []

    assert records_seen(Plain(), splits) == splits.explain
    assert len(records_seen(Refining(), splits)) == len(splits.explain) + len(splits.holdout_top) + len(splits.holdout_random)


def test_groups_are_shuffled_the_same_way_for_the_same_neuron():
    a = shuffled_groups(12, 5, ("detection", ("3", 7)))
    assert [len(g) for g in a] == [5, 5, 2]
    assert sorted(i for g in a for i in g) == list(range(12))
    assert a == shuffled_groups(12, 5, ("detection", ("3", 7)))
    assert a != shuffled_groups(12, 5, ("detection", ("3", 8)))


# --------------------------------------------------------------------------- malformed answers


class Scripted:
    """A chat model answering from a list of replies (a callable gets the request)."""

    model_name = "scripted"

    def __init__(self, replies):
        self.replies = list(replies)
        self.requests: list[ChatRequest] = []

    def chat(self, request: ChatRequest) -> ChatResponse:
        self.requests.append(request)
        reply = self.replies.pop(0)
        text = reply(request) if callable(reply) else reply
        return ChatResponse((text,), prompt_tokens=100, completion_tokens=10)


def _sample(n_act=2, n_quiet=2) -> ScoringSample:
    act = tuple(rec(i, f"the cat sat {i}", 9.0) for i in range(n_act))
    quiet = tuple(rec(50 + i, f"a dog ran {i}", 0.1) for i in range(n_quiet))
    return ScoringSample(act, quiet, 9.0)


def test_a_malformed_reply_is_asked_again_with_the_format():
    model = Scripted(["1: yes\n2: no", "1: yes\n2: no\n3: yes\n4: no"])
    [result] = DetectionScorer(model, group_size=4, use_logprobs=False).score_many([("cats", _sample())])
    assert len(model.requests) == 2
    retry = model.requests[1].messages
    # The bad reply, the format, and the prefill the template ends with.
    assert retry[-3] == ("assistant", "1: yes\n2: no") and "exactly 4 lines" in retry[-2][1]
    assert retry[-1] == ("assistant", "1:") and sum(role == "assistant" and text == "1:" for role, text in retry) == 1
    assert result.failed_groups == 0 and result.calls == 2 and result.metrics.n_judged == 4
    assert result.prompt_tokens == 200 and result.completion_tokens == 20


def test_a_reply_that_stays_malformed_is_recorded_as_failed_never_guessed():
    model = Scripted(["1: yes"] * 3)
    [result] = DetectionScorer(model, group_size=4, max_retries=2, use_logprobs=False).score_many([("cats", _sample())])
    assert len(model.requests) == 3  # the first try and two re-asks
    assert result.predictions == [None] * 4
    assert result.metrics.balanced_accuracy is None and result.metrics.n_judged == 0
    assert result.failed_groups == 1 and result.error.startswith("every group failed: malformed answer")


def test_one_failed_group_leaves_the_others_judged():
    model = Scripted(["garbage", "1: yes\n2: no"])
    scorer = DetectionScorer(model, group_size=2, max_retries=0, use_logprobs=False)
    [result] = scorer.score_many([("cats", _sample(2, 2))])
    assert result.failed_groups == 1 and result.error is None
    assert sum(p is not None for p in result.predictions) == 2 and result.metrics.n_judged == 2


# --------------------------------------------------------------------------- fuzzing marks


def test_fuzzing_marks_the_active_tokens_or_as_many_random_ones():
    record = ActivationRecord((" The", " cat", " sat", " on", " the", " mat"), (0.0, 9.0, 0.0, 0.0, 0.0, 5.0), 1)
    assert active_positions(record, 10.0) == [1, 5]
    assert marked_text(record.tokens, [1, 2]) == "The <<cat sat>> on the mat"
    assert marked_text((" a", " <<", ">>"), [0]) == "<<a>> < <> >"
    scorer = FuzzingScorer(Scripted([]), use_logprobs=False)
    sample = ScoringSample((record, ActivationRecord(record.tokens, record.activations, 2)), (), 10.0)
    (first, y1, text1), (second, y2, text2) = scorer.marked_excerpts(sample, seed=0)
    assert (y1, text1) == (True, "The <<cat>> sat on the <<mat>>")
    # Two random quiet tokens marked instead (neighbours share one mark).
    assert y2 is False and "<<cat" not in text2 and "mat>>" not in text2 and 1 <= text2.count("<<") <= 2


# --------------------------------------------------------------------------- embedding


class BagOfWords:
    """A tiny deterministic embedder: normalized word counts over a fixed vocabulary."""

    model_name = "bag-of-words"
    vocabulary = ["monday", "tuesday", "days", "week", "cake", "flour"]

    def embed(self, texts):
        import numpy as np

        rows = []
        for text in texts:
            words = text.lower().replace(",", " ").split()
            v = np.array([words.count(w) for w in self.vocabulary], dtype=np.float32)
            rows.append(v / max(float(np.linalg.norm(v)), 1e-9))
        return np.stack(rows)


def test_embedding_scorer_auroc_by_hand():
    act = (rec(1, "see you monday", 9.0), rec(2, "tuesday week", 9.0))
    quiet = (rec(3, "flour cake", 0.1), rec(4, "week of cake", 0.1))
    [result] = EmbeddingScorer(BagOfWords()).score_many([("days of the week, monday", ScoringSample(act, quiet, 9.0))])
    # Query (days, week, monday) . excerpt: "see you monday" 1/sqrt(3), "tuesday week" 1/sqrt(6),
    # "flour cake" 0, "week of cake" 1/sqrt(6): 3 of 4 pairs ordered right and one tie (half).
    expected = [1 / math.sqrt(3), 1 / math.sqrt(6), 0.0, 1 / math.sqrt(6)]
    assert result.probabilities == pytest.approx(expected, abs=1e-6)
    assert result.metrics.auroc == 0.875 and result.labels == [True, True, False, False]
    assert result.predictions == [None] * 4 and result.calls == 0
    [empty] = EmbeddingScorer(BagOfWords()).score_many([("", ScoringSample(act, quiet, 9.0))])
    assert empty.metrics.auroc is None and empty.metrics.null_reason == "empty explanation"


def test_embedding_scorer_with_the_offline_minilm():
    from neuron_pipeline.llm.embeddings import load_embedder

    act = (rec(1, "They came back on Monday morning", 9.0), rec(2, "every Sunday and Tuesday she walked", 9.0))
    quiet = (rec(3, "Mix the flour with butter and sugar", 0.1), rec(4, "the ship sailed across the sea", 0.1))
    [result] = EmbeddingScorer(load_embedder()).score_many([("names of days of the week", ScoringSample(act, quiet, 9.0))])
    assert result.metrics.auroc == 1.0
    assert min(result.probabilities[:2]) > max(result.probabilities[2:])


# --------------------------------------------------------------------------- contrastive


def test_contrastive_explainer_shows_hard_negatives_first_and_they_are_never_scored():
    top = [rec(100 + i, f"the cat number {i}", 10.0) for i in range(20)]  # peaks on " cat"
    random_records = [rec(200 + i, f"dog text {i} here", 0.5) for i in range(18)]
    random_records += [rec(250, "a cat slept there", 0.5), rec(251, "one cat again", 0.5)]
    record = NeuronRecord(NeuronId(0, 0), top, random_records, {})
    splits = split_records(record, 5, 5, 5)
    negatives, hard = quiet_excerpts(splits, 4)
    assert hard == 2 and {r.sequence_id for r in negatives[:2]} == {250, 251}
    model = Scripted([" cats."])
    explainer = ContrastiveExplainer(model, negatives=4)
    assert explainer.explainer_id.startswith("contrastive-")
    [explanation] = explainer.explain_splits([splits])
    assert explanation.text == "cats"
    prompt = model.requests[0].messages[-2][1]
    assert "Quiet on:\n1: a cat slept there" in prompt or "Quiet on:\n1: one cat again" in prompt
    seen = records_seen(explainer, splits)
    sample = scoring_sample(record, seen, 10, 20)
    assert not {250, 251} & {r.sequence_id for r in sample.quiet}
    assert len(sample.quiet) == 20 - 4  # every random excerpt is quiet; the four shown are left out


# --------------------------------------------------------------------------- fake OpenAI server


@pytest.fixture
def server():
    with FakeOpenAIServer() as fake:
        yield fake


def _api(server, **kwargs):
    from neuron_pipeline.llm.openai_api import OpenAICompatible

    return OpenAICompatible("fake-model", base_url=server.base_url, api_key_env="NO_SUCH_KEY_ENV", max_retries=1, **kwargs)


def _days_sample() -> ScoringSample:
    act = (rec(1, "see you on monday then", 9.0), rec(2, "it was monday again", 9.0), rec(5, "monday came", 9.0))
    quiet = (rec(3, "flour and cake", 0.1), rec(4, "the big ship", 0.1))
    return ScoringSample(act, quiet, 9.0)


def test_detection_through_the_fake_openai_server(server):
    scorer = DetectionScorer(_api(server), group_size=3)
    [result] = scorer.score_many([('the word "monday" and words like it', _days_sample())])
    m = result.metrics
    assert (m.balanced_accuracy, m.precision, m.recall, m.f1) == (1.0, 1.0, 1.0, 1.0)
    assert m.auroc == 1.0  # p(yes) 0.8 on every yes, 0.2 on every no
    assert result.calls == 2 and len(server.posts("/chat/completions")) == 2
    body = server.posts("/chat/completions")[0].body
    assert body["logprobs"] is True and body["top_logprobs"] == 5
    assert result.prompt_tokens > 0 and result.completion_tokens > 0


def test_fake_server_garbled_reply_is_retried_then_recorded_failed(server):
    scorer = DetectionScorer(_api(server), group_size=5, max_retries=1)
    server.script("garbled", "ok")
    [ok] = scorer.score_many([('the word "monday"', _days_sample())])
    assert ok.failed_groups == 0 and ok.metrics.balanced_accuracy == 1.0 and ok.calls == 2
    second = server.posts("/chat/completions")[-1].body["messages"]
    # The bad reply, then the format reminder (the API backend moves the "1:" prefill into it).
    assert second[-2] == {"role": "assistant", "content": "1: yes\nI am not sure about the others."}
    assert second[-1]["role"] == "user" and "exactly 5 lines" in second[-1]["content"]
    server.reset()
    server.script("garbled", "garbled")
    [failed] = scorer.score_many([('the word "monday"', _days_sample())])
    assert failed.metrics.n_judged == 0 and failed.predictions == [None] * 5 and failed.failed_groups == 1
    assert "malformed" in failed.error and len(server.posts("/chat/completions")) == 2


def test_fuzzing_through_the_fake_openai_server(server):
    act = tuple(
        ActivationRecord((" on", " monday", " we", " met", " the", " vicar"), (0.0, 9.0, 0.0, 0.0, 0.0, 0.0), i)
        for i in range(4)
    )
    scorer = FuzzingScorer(_api(server), group_size=4)
    [result] = scorer.score_many([('the word "monday"', ScoringSample(act, (), 9.0))])
    # Right marks sit on "monday" (yes); random marks never do (no).
    assert result.labels == [True, False, True, False]
    assert result.predictions == [True, False, True, False] and result.metrics.balanced_accuracy == 1.0


# --------------------------------------------------------------------------- local LLM


@pytest.mark.slow
def test_detection_with_the_bundled_smollm2():
    from neuron_pipeline.llm.local import LocalLLM

    scorer = DetectionScorer(LocalLLM("smollm2-135m-instruct"), group_size=5, max_retries=0)
    [result] = scorer.score_many([("names of days of the week", _days_sample())])
    # The template's "1:" prefill keeps even a 135M model in the answer format.
    assert result.failed_groups == 0 and result.calls == 1 and result.prompt_tokens > 0
    assert result.metrics.n_judged == 5 and all(p is not None for p in result.predictions)
    assert result.metrics.balanced_accuracy is not None
    # Local models give top_logprobs: p(yes) for every excerpt, hence an AUROC.
    assert all(0.0 <= p <= 1.0 for p in result.probabilities) and result.metrics.auroc is not None


# --------------------------------------------------------------------------- bench arithmetic


def test_bench_agreement_counts_pairs_of_explanations_by_hand():
    import polars as pl

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from bench.scorer_bench import agreement

    frame = pl.DataFrame(
        {
            "layer": ["0", "0", "0", "1", "1"],
            "neuron": [0, 0, 0, 0, 0],
            "explainer_id": ["a", "b", "c", "a", "b"],
            "simulation (LLM)": [0.9, 0.1, 0.5, 0.3, 0.2],
            "simulation (baseline)": [None, None, None, None, None],
            "detection": [0.8, 0.6, 0.7, 0.5, 0.5],
            "fuzzing": [0.5, 0.6, 0.7, 0.9, 0.1],
            "embedding": [0.7, 0.6, 0.9, 0.4, 0.6],
        }
    )
    pairs = agreement(frame)
    # Layer 0: a>b, a>c, c>b by simulation and by detection; layer 1: detection ties (no preference).
    assert pairs[("simulation (LLM)", "detection")] == (3, 3)
    # Fuzzing: b>a, c>a, c>b on layer 0 (1 of 3 agrees with simulation), a>b on layer 1 (agrees).
    assert pairs[("simulation (LLM)", "fuzzing")] == (4, 2)
    assert pairs[("simulation (LLM)", "simulation (baseline)")] == (0, 0)


# --------------------------------------------------------------------------- settings


def test_scorer_settings_from_the_readme_and_their_errors(tmp_path):
    import re

    import yaml

    from neuron_pipeline.config import ConfigError, load_settings

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = next(b for b in re.findall(r"```yaml\n(.*?)```", readme, flags=re.S) if "scorers:" in b and "method: fuzzing" in b)
    settings = load_settings(profile="demo", overrides=yaml.safe_load(block), environ={})
    assert [s.method for s in settings.scorer_entries] == ["embedding", "detection", "fuzzing"]
    assert settings.scorer_entries[1].template == "detection_v1" and settings.scorer_entries[1].group_size == 5
    # The demo profile without a section: embedding, plus detection and fuzzing on the LLM simulator's neurons.
    demo = load_settings(profile="demo", environ={})
    llm = next(s for s in demo.simulators if s.backend != "baseline")
    derived = [s for s in demo.scorer_entries if s.method != "embedding"]
    assert [s.method for s in derived] == ["detection", "fuzzing"]
    assert all((s.backend, s.model, s.layers, s.neurons) == (llm.backend, llm.model, llm.layers, llm.neurons) for s in derived)
    assert load_settings(profile="demo", overrides={"scorers": []}, environ={}).scorer_entries == []
    bad = [
        ({"scorers": [{"method": "detection"}]}, "needs a chat model"),
        ({"scorers": [{"method": "embedding", "backend": "local"}]}, "remove `backend`"),
        ({"scorers": [{"method": "embedding", "quiet_max": 0.5, "activating_min": 0.3}]}, "lower quiet_max"),
        ({"explainers": [{"backend": "baseline", "contrastive": True}]}, "contrastive explanations need an LLM"),
    ]
    for overrides, message in bad:
        with pytest.raises(ConfigError, match=message) as error:
            load_settings(profile="demo", overrides=overrides, environ={})
        assert "\n" not in str(error.value)


def test_embedding_reads_the_window_around_each_excerpts_peak():
    from neuron_pipeline.interp.embedding_scoring import peak_window

    tokens = tuple(f" t{i}" for i in range(64))
    at = lambda peak: ActivationRecord(tokens, tuple(1.0 if i == peak else 0.0 for i in range(64)), 0)  # noqa: E731
    assert peak_window(at(30)) == tokens[18:34]  # 12 before the peak, the peak, 3 after
    assert peak_window(at(2)) == tokens[:16] and peak_window(at(63)) == tokens[48:]
    assert peak_window(ActivationRecord(tokens[:10], (0.0,) * 10, 0)) == tokens[:10]


# --------------------------------------------------------------------------- quality gate


def test_scorer_results_gate_catches_made_up_or_inconsistent_rows():
    from data_quality import validate_table
    from neuron_pipeline.lake import table_frame

    good = {
        "model": "m", "layer": "0", "neuron": 1, "explainer_id": "e", "scorer_id": "detection-x", "method": "detection",
        "scorer_model": "s", "score": 0.75, "balanced_accuracy": 0.75, "f1": 0.8, "precision": 0.7, "recall": 1.0,
        "auroc": None, "n_judged": 3, "n_activating": 2, "n_non_activating": 1, "failed_groups": 1, "prompt_tokens": 10,
        "completion_tokens": 2, "calls": 2, "null_reason": None, "input_hash": "h", "sequence_ids": [1, 2, 3, 4],
        "labels": [True, True, False, False], "predictions": [True, True, False, None], "probabilities": [None] * 4,
    }
    assert validate_table("scorer_results", table_frame("scorer_results", [good])).success
    cases = {
        "n_judged == number of non-null predictions": {"predictions": [True, True, False, True]},  # a guessed answer
        "score is balanced_accuracy": {"score": 0.9},
        "null_reason given when score is null": {"score": None, "balanced_accuracy": None},
        "len(predictions) == len(labels)": {"predictions": [True, True, False]},
        "f1 in [0, 1]": {"f1": 1.5},
        "method in": {"method": "vibes"},
    }
    for description, change in cases.items():
        report = validate_table("scorer_results", table_frame("scorer_results", [{**good, **change}]))
        assert not report.success and description in report.summary(), description


def test_a_bad_scorer_prompt_stops_the_run_before_anything_is_written(tmp_path, capsys):
    from neuron_pipeline.cli import main

    bad = tmp_path / "mine.txt"
    bad.write_text("Explanation: {explanation}\n")  # no {excerpts}
    config = tmp_path / "c.yaml"
    config.write_text(f"scorers:\n  - method: detection\n    backend: local\n    prompt: {bad}\n")
    code = main(["run", "--config", str(config), "--lake", str(tmp_path / "lake"), "--layers", "0", "--neurons", "0"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "lacks placeholder(s) {excerpts}" in err and "\n" not in err
    assert not (tmp_path / "lake").exists()


def test_detection_through_the_batch_api(tmp_path):
    """`batch: true` on a scorer entry: every group of every explanation goes out in one batch;
    a malformed reply is asked again in the next one."""
    from neuron_pipeline.config import ScorerSettings
    from neuron_pipeline.llm import LLMCache, make_scorer

    with FakeOpenAIServer(max_lifetime_s=60) as fake:
        settings = ScorerSettings(
            method="detection", backend="openai", model="fake-model", base_url=fake.base_url,
            api_key_env="NO_SUCH_KEY_ENV", batch=True, batch_poll_s=0.02, group_size=3,
        )
        scorer = make_scorer(settings, LLMCache(tmp_path / "cache.sqlite"))
        results = scorer.score_many([('the word "monday"', _days_sample()), ('the word "cake"', _days_sample())])
    assert len(fake.posts("/batches")) == 1 and len(fake.posts("/chat/completions")) == 0
    assert [r.calls for r in results] == [2, 2] and all(r.failed_groups == 0 for r in results)
    assert results[0].metrics.balanced_accuracy == 1.0
    assert results[1].predictions == [False, False, False, True, False]  # only "flour and cake" names cake
