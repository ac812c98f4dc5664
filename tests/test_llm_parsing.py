"""Parsing what LLMs really write: explanations and simulated values from messy completions."""

from __future__ import annotations

import math

import pytest

from neuron_pipeline.interp.explainer import LLMExplainer, parse_explanation, render_chat
from neuron_pipeline.interp.llm_protocol import ChatResponse, TokenLogprobs
from neuron_pipeline.interp.prompts import load_template
from neuron_pipeline.interp.records import ActivationRecord
from neuron_pipeline.interp.simulator import (
    ChatSimulator,
    excerpt_suffix,
    parse_simulated_values,
    refill_slots,
    values_from_top_logprobs,
)


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        (" cups, pots and saucers.", "cups, pots and saucers"),
        ("The main thing this neuron does is find \"dates\".", "dates"),
        ("the main thing neuron C does is find words about money", "words about money"),
        ("\n\n  references to the sea. Also it fires on boats. And more", "references to the sea"),
        ("'quoted phrases'", "quoted phrases"),
        ("e.g. names of people", "e.g. names of people"),
        ("tokens like... and so on", "tokens like... and so on"),
        ("   \n  \n", ""),
        ("", ""),
        ("x" * 1000, "x" * 400),
        # explainer_v4's shape: the quoted words first, then what they share; the quotes stay.
        ('"window": the word "window"', '"window": the word "window"'),
        ('"rain", "storm": weather words.', '"rain", "storm": weather words'),
        ('"house": the noun "house"\nExcerpt 2 also', '"house": the noun "house"'),
    ],
)
def test_parse_explanation(completion, expected):
    assert parse_explanation(completion) == expected


def test_parse_simulated_values_tolerates_extra_text_missing_lines_and_out_of_range():
    completion = (
        "Sure! Here are the activations:\n<start>\nThe\t0\n cat\t12\n sat\t-3\nthis line is chatter\n"
        " on\t4.5\n<end>\nHope this helps"
    )
    values, parsed = parse_simulated_values(completion, 6)
    assert values == [0.0, 10.0, 0.0, 4.5, 0.0, 0.0]  # clipped to 0..10, missing lines are 0
    assert parsed == 4


def test_parse_simulated_values_stops_at_the_token_count():
    values, parsed = parse_simulated_values("a\t1\nb\t2\nc\t3\n", 2)
    assert values == [1.0, 2.0] and parsed == 2


def test_escaped_tokens_keep_one_line_and_one_slot_each():
    tokens = ["a\tb", "line\nbreak", "<end>", "back\\slash", " "]
    suffix, slots = excerpt_suffix(tokens)
    lines = suffix.splitlines()
    assert len(lines) == len(tokens) + 1 and lines[-1] == "<end>"
    assert [suffix[s : s + 7] for s in slots] == ["unknown"] * len(tokens)
    refilled, new_slots = refill_slots(suffix, slots, "1")
    assert [refilled[s] for s in new_slots] == ["1"] * len(tokens)
    assert refilled.count("\n") == suffix.count("\n")


def _step(token: str, top: dict[str, float]) -> TokenLogprobs:
    return TokenLogprobs(token, top.get(token, -0.1), top)


def test_values_from_top_logprobs_reads_the_token_after_each_tab():
    steps = [
        _step("The", {"The": -0.1}),
        _step("\t", {"\t": -0.01}),
        _step("0", {"0": math.log(0.75), "10": math.log(0.25)}),
        _step("\n", {"\n": -0.01}),
        _step(" cat", {" cat": -0.1}),
        _step("\t", {"\t": -0.01}),
        _step("8", {"8": math.log(0.5), "6": math.log(0.5), " the": math.log(0.1)}),
    ]
    values = values_from_top_logprobs(steps, 2)
    assert values == pytest.approx([2.5, 7.0])
    assert values_from_top_logprobs(steps, 3) is None  # fewer value tokens than excerpt tokens


class _ScriptedChat:
    model_name = "scripted"

    def __init__(self, responses):
        self.responses = list(responses)
        self.requests = []

    def chat(self, request):
        self.requests.append(request)
        item = self.responses.pop(0)
        if isinstance(item, Exception):
            raise item
        return item


RECORDS = [ActivationRecord(("The", " cat"), (0.0, 2.0)), ActivationRecord((" a", " dog"), (0.0, 1.0))]


def test_llm_explainer_records_errors_instead_of_raising():
    model = _ScriptedChat(
        [
            ChatResponse((" cats and dogs.",), 100, 5),
            ChatResponse(("   ",), 100, 1),
            TimeoutError("server did not answer"),
        ]
    )
    explainer = LLMExplainer(model, "explainer_v1")
    good, empty, failed = explainer.explain_many([RECORDS, RECORDS, RECORDS])
    assert good.text == "cats and dogs" and good.error is None and good.prompt_tokens == 100
    assert empty.text == "" and "unusable completion" in empty.error
    assert failed.text == "" and failed.error.startswith("TimeoutError")
    # The records went into the prompt with activations discretized to 0..10.
    user = model.requests[0].messages[-2][1]
    assert " cat\t10" in user and " dog\t5" in user


def test_the_default_explainer_shows_marked_text_and_strongest_tokens_without_prefill():
    model = _ScriptedChat([ChatResponse(("The main thing this neuron does is find cats and dogs.",), 100, 5)])
    explanation = LLMExplainer(model).explain(RECORDS + [ActivationRecord((" cat", " sat"), (2.0, 0.5))])
    # An answer that repeats the sentence's start is parsed back to the phrase.
    assert explanation.text == "cats and dogs"
    messages = model.requests[0].messages
    assert messages[-1][0] == "user"  # no trailing assistant message for servers that do not continue one
    user = messages[-1][1]
    assert "1. The <<cat>>(10)" in user and "2. a <<dog>>(5)" in user and "3. <<cat>>(10) <<sat>>(2)" in user
    assert 'Strongest tokens: "cat" (10, 2 times), "dog" (5), "sat" (2)' in user


def test_explainer_template_renders_few_shot_chat_with_prefill():
    messages = render_chat(load_template("explainer_v1", ("records",)), records="<start>\nx\t3\n<end>")
    roles = [role for role, _ in messages]
    assert roles[0] == "system" and roles[-1] == "assistant" and roles.count("user") == 3
    assert "x\t3" in messages[-2][1]


def test_chat_simulator_falls_back_to_integers_when_logprobs_are_unusable():
    model = _ScriptedChat([ChatResponse(("<start>\nThe\t1\n cat\t9\n<end>",), 50, 10)])
    [simulation] = ChatSimulator(model).simulate("cats", [["The", " cat"]])
    assert simulation.mode == "chat_integers"
    assert simulation.expected_activations == (1.0, 9.0)
    assert model.requests[0].top_logprobs > 0
