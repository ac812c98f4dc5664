"""Prompt building: discretization, token escaping, record formatting, templates."""

from __future__ import annotations

import random
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from neuron_pipeline.interp import prompts
from neuron_pipeline.interp.prompts import (
    END_MARKER,
    MAX_VALUE,
    START_MARKER,
    PromptTemplateError,
    content_hash,
    discretize,
    escape_token,
    format_record,
    format_records,
    load_template,
    max_activation_of,
)
from neuron_pipeline.interp.records import ActivationRecord


def record(tokens, activations, sequence_id=-1) -> ActivationRecord:
    return ActivationRecord(tuple(tokens), tuple(float(a) for a in activations), sequence_id)


def unescape(text: str) -> str:
    """Inverse of escape_token, written independently: one backslash escapes the next char."""
    return re.sub(r"\\(.)", lambda m: {"t": "\t", "n": "\n", "r": "\r"}.get(m.group(1), m.group(1)), text, flags=re.S)


# ----------------------------------------------------------------------------- discretize


def test_discretize_floors_relative_to_max():
    # floor(10 * a / 1): 0.19 -> 1 (rounding would give 2), 0.99 -> 9, 1.0 -> 10
    assert discretize([0.0, 0.19, 0.5, 0.99, 1.0], 1.0) == [0, 1, 5, 9, 10]
    # max 2.5: 0.25 -> 1, 1.2 -> floor(4.8) = 4, 2.49 -> floor(9.96) = 9, 2.5 -> 10
    assert discretize([0.25, 1.2, 2.49, 2.5], 2.5) == [1, 4, 9, 10]


def test_discretize_negative_activations_are_zero():
    assert discretize([-5.0, -0.01, 0.0, 3.0], 3.0) == [0, 0, 0, 10]


def test_discretize_clips_above_max():
    # Values above the max shown (e.g. a record outside the explained set) stay at 10.
    assert discretize([4.0, 100.0, 2.0], 2.0) == [10, 10, 10]


@pytest.mark.parametrize("max_activation", [0.0, -1.0, float("nan"), float("inf")])
def test_discretize_without_a_usable_max_is_all_zero(max_activation):
    assert discretize([-1.0, 0.0, 2.0], max_activation) == [0, 0, 0]


def test_discretize_values_are_ints_in_range():
    rng = random.Random(1)
    acts = [rng.uniform(-3, 3) for _ in range(500)]
    top = max(acts)
    values = discretize(acts, top)
    assert all(isinstance(v, int) and 0 <= v <= MAX_VALUE for v in values)
    for a, v in zip(acts, values):
        # v = floor(10 a / max): v <= 10 a / max < v + 1
        if a > 0:
            assert v <= 10 * a / top < v + 1 or v == MAX_VALUE


def test_max_activation_of():
    assert max_activation_of([record("ab", [1, 3]), record("c", [-2])]) == 3
    assert max_activation_of([]) == 0.0
    assert max_activation_of([record("a", [-2])]) == -2


# -------------------------------------------------------------------------------- escaping


def test_escape_special_characters():
    assert escape_token("a\tb") == "a\\tb"
    assert escape_token("a\nb") == "a\\nb"
    assert escape_token("a\rb") == "a\\rb"
    assert escape_token("a\\b") == "a\\\\b"
    assert escape_token("plain word") == "plain word"
    # A literal backslash-t is not a tab after escaping.
    assert escape_token("\\t") == "\\\\t"
    assert escape_token("\\t") != escape_token("\t")


@pytest.mark.parametrize("token", ["<start>", "<end>", "x<start>y", "<end><start>", "<<start>>", "\\<start>"])
def test_markers_inside_tokens_are_neutralised(token):
    escaped = escape_token(token)
    assert START_MARKER not in escaped and END_MARKER not in escaped
    assert "\t" not in escaped and "\n" not in escaped
    assert unescape(escaped) == token


def test_escape_is_reversible_and_injective_on_nasty_tokens():
    rng = random.Random(7)
    alphabet = ["<start>", "<end>", "\\", "\t", "\n", "\r", "<", ">", "s", "t", "n", "e", "a", " ", "é"]
    seen: dict[str, str] = {}
    for _ in range(3000):
        token = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 6)))
        escaped = escape_token(token)
        assert START_MARKER not in escaped and END_MARKER not in escaped
        assert not set("\t\n\r") & set(escaped)
        assert unescape(escaped) == token
        assert seen.setdefault(escaped, token) == token


NASTY = ["Hello", "\t", "\n", "a\tb\nc", "<start>", "<end>", "\\", "\\t5", " 7", "", "é", "\r\n"]


def test_formatted_record_has_one_line_per_token_and_one_pair_of_markers():
    rec = record(NASTY, [i * 0.5 for i in range(len(NASTY))])
    text = format_record(rec, max_activation=rec.max_activation)
    lines = text.split("\n")
    assert len(lines) == len(NASTY) + 2
    assert lines[0] == START_MARKER and lines[-1] == END_MARKER
    assert text.count(START_MARKER) == 1 and text.count(END_MARKER) == 1
    expected_values = discretize(rec.activations, rec.max_activation)
    for line, token, value in zip(lines[1:-1], NASTY, expected_values):
        token_text, value_text = line.split("\t")  # exactly one tab per line
        assert unescape(token_text) == token
        assert int(value_text) == value
    assert lines[-2].endswith("\t10")  # the largest activation shown gets 10


def test_simulator_view_has_no_values():
    rec = record(NASTY, [1.0] * len(NASTY))
    text = format_record(rec, max_activation=None)
    lines = text.split("\n")
    assert len(lines) == len(NASTY) + 2
    assert "\t" not in text
    assert [unescape(line) for line in lines[1:-1]] == NASTY
    assert text.count(START_MARKER) == 1 and text.count(END_MARKER) == 1


def test_format_record_uses_the_given_max_not_the_records_own():
    rec = record(["a", "b"], [1.0, 2.0])
    assert format_record(rec, 4.0).split("\n")[1:3] == ["a\t2", "b\t5"]


# ---------------------------------------------------------------------- sparse repeat block


def test_sparse_records_repeat_the_nonzero_tokens():
    # 10 tokens, one non-zero: 10% < 20% -> repeat block with that token only.
    rec = record([f"t{i}" for i in range(10)], [0, 0, 0, 4.0, 0, 0, 0, 0, 0, 0])
    text = format_records([rec], 4.0)
    assert text.startswith(format_record(rec, 4.0))
    assert text.count(START_MARKER) == 2 and text.count(END_MARKER) == 2
    repeat = text[len(format_record(rec, 4.0)) :]
    assert "zeros filtered out" in repeat
    body = repeat.split(START_MARKER + "\n", 1)[1].split("\n" + END_MARKER)[0]
    assert body == "t3\t10"


def test_repeat_block_spans_records_and_uses_the_shared_max():
    a = record([f"a{i}" for i in range(10)], [0] * 9 + [2.0])
    b = record([f"b{i}" for i in range(10)], [4.0] + [0] * 9)
    # 2 non-zero of 20 values = 10% -> repeat; values relative to max 4 -> a9: 5, b0: 10
    text = format_records([a, b], 4.0)
    body = text.rsplit(START_MARKER + "\n", 1)[1].split("\n" + END_MARKER)[0]
    assert body.split("\n") == ["a9\t5", "b0\t10"]


def test_no_repeat_block_at_or_above_twenty_percent():
    # 2 of 10 non-zero is exactly 20%: not "under 20%".
    rec = record([f"t{i}" for i in range(10)], [1.0, 1.0] + [0] * 8)
    text = format_records([rec], 1.0)
    assert text == format_record(rec, 1.0)
    assert text.count(START_MARKER) == 1


def test_no_repeat_block_when_everything_is_zero():
    rec = record(["a", "b", "c"], [0.0, -1.0, 0.0])
    assert format_records([rec], 1.0) == format_record(rec, 1.0)


def test_small_activations_that_discretize_to_zero_count_as_zero():
    # 0.05 of max 1 -> floor(0.5) = 0: only the 1.0 is non-zero (1 of 6 < 20%).
    rec = record(list("abcdef"), [0.05, 0.05, 0.05, 0.05, 0.05, 1.0])
    text = format_records([rec], 1.0)
    assert text.rsplit(START_MARKER + "\n", 1)[1].split("\n" + END_MARKER)[0] == "f\t10"


def test_multiple_records_are_separated_blocks():
    recs = [record(["x", "y"], [0, 1]), record(["z"], [1])]
    text = format_records(recs, 1.0)
    assert text == format_record(recs[0], 1.0) + "\n" + format_record(recs[1], 1.0)


# ------------------------------------------------------------------------------- templates


@pytest.fixture
def template_dir(tmp_path, monkeypatch):
    """Point load_template at a temporary package folder instead of the installed prompts."""
    (tmp_path / "prompts").mkdir()
    monkeypatch.setattr(prompts, "resources", SimpleNamespace(files=lambda package: tmp_path))
    return tmp_path / "prompts"


def test_template_loads_and_renders(template_dir: Path):
    (template_dir / "unit_v1.txt").write_text("Explain {records}\nthe main thing this neuron does is find{suffix}")
    template = load_template("unit_v1", ["records", "suffix"])
    assert template.name == "unit_v1"
    assert template.placeholders == ("records", "suffix")
    assert template.render(records="R", suffix="") == "Explain R\nthe main thing this neuron does is find"


def test_template_hash_follows_content(template_dir: Path):
    path = template_dir / "unit_v1.txt"
    path.write_text("A {x}")
    first = load_template("unit_v1", ["x"]).hash
    assert load_template("unit_v1", ["x"]).hash == first
    assert first == content_hash("unit_v1", "A {x}")
    path.write_text("B {x}")
    assert load_template("unit_v1", ["x"]).hash != first


def test_missing_template(template_dir: Path):
    with pytest.raises(PromptTemplateError) as excinfo:
        load_template("nope_v9", ["records"])
    assert "'nope_v9'" in str(excinfo.value) and "not found" in str(excinfo.value)


def test_missing_placeholder(template_dir: Path):
    (template_dir / "unit_v1.txt").write_text("Explain {records} with {{literal braces}}")
    with pytest.raises(PromptTemplateError) as excinfo:
        load_template("unit_v1", ["records", "explanation", "tokens"])
    message = str(excinfo.value)
    assert "{explanation}" in message and "{tokens}" in message
    assert "{records}" not in message
    # Escaped braces are not placeholders.
    with pytest.raises(PromptTemplateError):
        load_template("unit_v1", ["literal braces"])


def test_missing_template_in_the_real_package():
    with pytest.raises(PromptTemplateError):
        load_template("definitely_not_a_template_v0", [])


# ---------------------------------------------------------------------------------- hashes


def test_content_hash():
    assert content_hash("a", "b") == content_hash("a", "b")
    assert len(content_hash("x")) == 16
    assert content_hash("a", "b") != content_hash("b", "a")
    # Parts are separated: moving the boundary changes the hash.
    assert content_hash("ab", "c") != content_hash("a", "bc")
    import hashlib

    assert content_hash("a", "b") == hashlib.sha256(b"a\x00b\x00").hexdigest()[:16]


def test_highlighted_excerpts_mark_only_firing_tokens_and_corpus_brackets_cannot_forge_a_mark():
    record = ActivationRecord([" a", " x<", "<y", ">>", " cup", "\n"], [0.0, 0.0, 0.0, 0.0, 2.0, 0.0])
    line = prompts.format_highlighted([record], max_activation=2.0)
    assert line == "1. a x\\<\\<y\\>\\> <<cup>>(10)\\n"
    # The only unescaped "<<" / ">>" are the marker's own.
    assert re.sub(r"\\.", "", line).count("<<") == 1 and re.sub(r"\\.", "", line).count(">>") == 1


def test_top_tokens_are_quoted_escaped_and_ranked_by_value_then_count():
    records = [
        ActivationRecord([' "', " cup", " tea", " cup"], [4.0, 4.0, 2.0, 4.0]),
        ActivationRecord([" tea\t"], [1.0]),
    ]
    assert prompts.format_top_tokens(records, 4.0) == '"cup" (10, 2 times), "\\"" (10), "tea" (5), "tea\\t" (2)'
    assert prompts.format_top_tokens([ActivationRecord([" a"], [0.0])], 1.0) == "none"
