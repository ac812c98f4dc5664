"""The local transformers backend on the real bundled SmolLM2, and the LLM call cache."""

from __future__ import annotations

import numpy as np
import pytest

from neuron_pipeline.interp.llm_protocol import ChatRequest, ChatResponse, SlotDistributions
from neuron_pipeline.interp.simulator import AllAtOnceSimulator, excerpt_suffix, expected_values
from neuron_pipeline.llm.cache import CachedChatModel, CachedValueModel, LLMCache

pytestmark = pytest.mark.slow

EXCERPTS = [
    ["She", " poured", " the", " tea", " into", " a", " china", " cup", "."],
    [" On", " Monday", " we", " met"],
    # Tokens that must be escaped: a tab, a newline and a forged marker.
    [" the", " Darcy", "\t", " family", "\n", "<end>", " of", " Pemberley", " house", " and", " grounds", "!"],
    [" A"],
]


@pytest.fixture(scope="module")
def llm():
    from neuron_pipeline.llm.local import LocalLLM

    return LocalLLM("smollm2-135m-instruct", device="cpu", batch_size=3)


def test_digit_splitting_tokenizer_has_a_two_token_ten(llm):
    # SmolLM2 writes 10 as "1" "0": the slot distribution alone cannot tell 1 from 10.
    assert llm.values.split_short == 1 and llm.values.split_long == 10
    assert llm.values.first[1] == llm.values.first[10]
    assert llm.tokenizer.decode([llm.values.split_second]) == "0"


def test_batched_prefix_reused_values_equal_the_slow_reference(llm):
    simulator = AllAtOnceSimulator(llm)
    prefix = simulator.prefix("names of days of the week.")
    suffixes, slots = zip(*(excerpt_suffix(tokens) for tokens in EXCERPTS))
    fast = llm.value_distributions(prefix, suffixes, slots)
    slow = llm.reference_value_distributions(prefix, suffixes, slots)
    assert len(fast) == len(EXCERPTS)
    for tokens, f, s in zip(EXCERPTS, fast, slow):
        assert f.probabilities.shape == (len(tokens), 11)
        # Probabilities of 0..10 at each slot are a sub-distribution of the next-token distribution.
        assert np.all(f.probabilities >= 0) and np.all(f.probabilities.sum(1) <= 1 + 1e-6)
        np.testing.assert_allclose(expected_values(f.probabilities), expected_values(s.probabilities), atol=1e-4)
        np.testing.assert_allclose(f.probabilities, s.probabilities, atol=1e-5)


def test_simulation_follows_the_explanation(llm):
    simulator = AllAtOnceSimulator(llm)
    [days] = simulator.simulate("names of days of the week.", [EXCERPTS[1]])
    assert days.mode == "all_at_once_logprobs"
    assert days.value_mass == 1.0  # the whole vocabulary is seen: every value's mass is captured
    assert len(days.expected_activations) == 4
    assert all(0 <= v <= 10 for v in days.expected_activations)
    # " Monday" is the day: it gets the highest predicted activation of the excerpt.
    assert int(np.argmax(days.expected_activations)) == 1


def test_chat_is_deterministic_and_counts_tokens(llm):
    request = ChatRequest(messages=(("user", "Name a colour."), ("assistant", "A colour is")), max_tokens=8)
    first, second = llm.chat(request), llm.chat(request)
    assert first.texts == second.texts and first.texts[0].strip()
    assert first.prompt_tokens > 5 and 0 < first.completion_tokens <= 8


def test_chat_top_logprobs_include_the_chosen_token(llm):
    response = llm.chat(ChatRequest(messages=(("user", "Count: 1 2 3"),), max_tokens=3, top_logprobs=5))
    steps = response.logprobs[0]
    assert len(steps) == response.completion_tokens
    for step in steps:
        assert len(step.top) == 5
        assert step.logprob <= max(step.top.values()) + 1e-6


class _CountingChat:
    model_name = "counting"

    def __init__(self):
        self.calls = 0

    def chat(self, request):
        self.calls += 1
        return ChatResponse((f"reply to {request.messages[-1][1]}",), prompt_tokens=7, completion_tokens=3)


class _CountingValues:
    model_name = "counting-values"

    def __init__(self):
        self.excerpts = 0

    def value_distributions(self, prefix, suffixes, slots):
        self.excerpts += len(suffixes)
        return [SlotDistributions(np.full((len(s), 11), 1 / 11), prompt_tokens=11) for s in slots]


def test_cache_pays_once_and_survives_a_new_process(tmp_path):
    path = tmp_path / "cache" / "calls.sqlite"
    backend = _CountingChat()
    cached = CachedChatModel(backend, LLMCache(path))
    requests = [ChatRequest(messages=(("user", f"q{i}"),)) for i in range(3)]
    first = cached.chat_many(requests)
    assert backend.calls == 3 and cached.new_prompt_tokens == 21
    # A new cache object on the same file (as after a crash and restart) answers from disk.
    reopened = CachedChatModel(backend, LLMCache(path))
    again = reopened.chat_many(requests + [ChatRequest(messages=(("user", "q3"),))])
    assert backend.calls == 4
    assert [r.texts for r in again[:3]] == [r.texts for r in first]
    assert reopened.cache.hits == 3 and reopened.cache.misses == 1
    # Any change to the request is a different call.
    reopened.chat(ChatRequest(messages=(("user", "q0"),), temperature=0.5))
    assert backend.calls == 5


def test_cached_answers_keep_their_logprobs_in_the_format_of_earlier_caches(tmp_path):
    """A top_logprobs answer goes through the cache unchanged, and is written as the JSON that
    ``dataclasses.asdict`` gave before (so entries written by earlier versions still read)."""
    import dataclasses
    import json

    from neuron_pipeline.interp.llm_protocol import TokenLogprobs
    from neuron_pipeline.llm.cache import _response_from_json, _response_to_json

    steps = (TokenLogprobs("cup", -0.1, {"cup": -0.1, " mug": -2.5}), TokenLogprobs("\t", 0.0, {}), TokenLogprobs("7", -0.3, {"7": -0.3, "8": -1.4}))
    response = ChatResponse(("cup\t7",), prompt_tokens=5, completion_tokens=3, logprobs=(steps, steps[:1]))
    text = _response_to_json(response)
    assert json.loads(text) == json.loads(json.dumps(dataclasses.asdict(response)))
    assert _response_from_json(text) == response

    class _Logprobs:
        model_name = "logprobs"
        calls = 0

        def chat(self, request):
            self.calls += 1
            return response

    backend = _Logprobs()
    path = tmp_path / "c.sqlite"
    CachedChatModel(backend, LLMCache(path)).chat(ChatRequest(messages=(("user", "q"),), top_logprobs=5))
    again = CachedChatModel(backend, LLMCache(path)).chat(ChatRequest(messages=(("user", "q"),), top_logprobs=5))
    assert backend.calls == 1 and again == response


def test_value_cache_is_per_excerpt(tmp_path):
    backend = _CountingValues()
    cached = CachedValueModel(backend, LLMCache(tmp_path / "c.sqlite"))
    suffixes, slots = zip(*(excerpt_suffix(t) for t in EXCERPTS))
    cached.value_distributions("prefix", suffixes[:2], slots[:2])
    result = cached.value_distributions("prefix", suffixes, slots)
    assert backend.excerpts == 4  # 2, then only the 2 new ones
    assert [r.probabilities.shape for r in result] == [(len(t), 11) for t in EXCERPTS]
    cached.value_distributions("another explanation", suffixes[:1], slots[:1])
    assert backend.excerpts == 5
