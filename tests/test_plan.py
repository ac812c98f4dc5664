"""`neuron-pipeline plan`: the bill before anything is paid. Its arithmetic against a hand count,
the paper profile without GPT-2 weights, and the CLI."""

from __future__ import annotations

import math

import pytest

from neuron_pipeline.config import load_settings
from neuron_pipeline.interp.records import ActivationRecord, NeuronId, NeuronRecord
from neuron_pipeline.plan import make_plan, render


def words(text: str) -> int:
    return len(text.split())


def fixed_records(n: int) -> list[NeuronRecord]:
    """Every neuron the same: 20 top and 20 random excerpts of 8 tokens."""
    excerpt = ActivationRecord((" the", " cat", " sat", " on", " the", " mat", " and", " slept"), (0, 1, 0, 0, 0, 2, 0, 0))
    return [NeuronRecord(NeuronId(0, j), top=[excerpt] * 20, random=[excerpt] * 20) for j in range(n)]


def test_plan_arithmetic_matches_a_hand_count():
    api = {"backend": "openai", "model": "m", "base_url": None}
    settings = load_settings(
        profile="demo",
        overrides={
            "layers": "0-1",
            "neurons": "0-4",
            "explainers": [{**api, "max_tokens": 60, "concurrency": 4, "usd_per_million_prompt": 2.0, "usd_per_million_completion": 10.0}],
            "simulators": [{**api, "concurrency": 8, "usd_per_million_prompt": 0.5, "usd_per_million_completion": 1.0}],
        },
        environ={},
    )
    plan = make_plan(settings, latency_s=2.0, count=words, counter_name="words", records=fixed_records(3), sample_name="3 fixed", shape=("m", 2, 10))
    explain, simulate = plan.stages
    assert plan.neurons == 10 and plan.layers == 2

    # By hand: one explainer request per neuron; its prompt in words, plus 4 per message.
    from neuron_pipeline.interp.explainer import LLMExplainer
    from neuron_pipeline.interp.simulator import ChatSimulator
    from neuron_pipeline.plan import _PLACEHOLDER_EXPLANATION, _Named

    excerpt = fixed_records(1)[0].top[0]
    request = LLMExplainer(_Named("m")).request([excerpt] * 5)
    per_explain = sum(words(content) + 4 for _, content in request.messages)
    assert (explain.calls, explain.prompt_tokens, explain.completion_tokens) == (10, 10 * per_explain, 10 * 60)
    assert explain.usd_online == pytest.approx((10 * per_explain * 2.0 + 600 * 10.0) / 1e6)
    assert explain.usd_batch == pytest.approx(explain.usd_online / 2)
    assert explain.wall_s == 3 * 2.0  # 10 calls, 4 at a time: 3 rounds of 2 s

    # 10 scored excerpts per neuron (5 top + 5 random), one chat call each; the answer is the
    # 8 token<TAB>value lines between <start> and <end>.
    sim_request = ChatSimulator(_Named("m")).request(_PLACEHOLDER_EXPLANATION, excerpt.tokens)
    per_simulate = sum(words(content) + 4 for _, content in sim_request.messages)
    answer = words("<start>\n" + "\n".join(f"{t}\t0" for t in excerpt.tokens) + "\n<end>")
    assert simulate.mode == "top_logprobs"  # OpenAI's API (no base_url): no prompt logprobs
    assert (simulate.calls, simulate.prompt_tokens, simulate.completion_tokens) == (100, 100 * per_simulate, 100 * answer)
    assert simulate.usd_online == pytest.approx((100 * per_simulate * 0.5 + 100 * answer * 1.0) / 1e6)
    assert simulate.wall_s == math.ceil(100 / 8) * 2.0
    assert plan.usd_online == pytest.approx(explain.usd_online + simulate.usd_online)
    assert plan.usd_all_batch == pytest.approx(plan.usd_online / 2)
    text = render(plan)
    assert "10 neurons" in text and f"{100 * per_simulate:,}" in text


def test_prompt_logprob_simulators_and_the_baseline():
    settings = load_settings(
        profile="demo",
        overrides={
            "layers": "all",
            "neurons": "all",
            "explainers": [{"backend": "baseline"}],
            "simulators": [{"backend": "openai", "model": "m", "base_url": "http://127.0.0.1:9/v1"}, {"backend": "baseline"}],
        },
        environ={},
    )
    plan = make_plan(settings, count=words, counter_name="words", records=fixed_records(2), sample_name="2", shape=("m", 1, 4))
    explain, vllm, baseline = plan.stages
    assert explain.calls == 0 and baseline.calls == 0 and explain.usd_batch is None
    # A self-hosted server: prompt logprobs, two passes per excerpt (the "1","0" refill), 1 token each.
    assert vllm.mode == "prompt_logprobs" and vllm.calls == 4 * 10 * 2 and vllm.completion_tokens == 4 * 10


def test_paper_profile_answers_for_all_gpt2_xl_neurons():
    settings = load_settings(profile="paper", environ={})
    plan = make_plan(settings, count=words, counter_name="words")
    assert plan.model == "gpt2-xl" and plan.neurons == 307_200
    gpt4o = plan.stages[0]
    assert gpt4o.calls == 307_200 and gpt4o.usd_online > 0
    assert "synthetic" in plan.sample


def test_plan_command(capsys, tmp_path):
    from neuron_pipeline.cli import main

    assert main(["plan", "--profile", "paper", "--latency", "0.5", "--json", str(tmp_path / "plan.json"), "--lake", str(tmp_path / "lake")]) == 0
    out = capsys.readouterr().out
    assert "307,200 neurons" in out and "with the Batch API" in out and "0.5 s per call" in out
    import json

    data = json.loads((tmp_path / "plan.json").read_text())
    assert data["neurons"] == 307_200 and data["usd_all_batch"] == pytest.approx(data["usd_online"] / 2)
    assert main(["plan", "--latency", "-1"]) == 2
    err = capsys.readouterr().err
    assert "--latency must be positive" in err and len(err.strip().splitlines()) == 1
