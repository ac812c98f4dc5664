"""value_mass: the share of the value tokens' probability mass a simulation saw.

A top-k API lists only k alternatives per position; late in an excerpt the digits drop out of
them (DESIGN.md). Every simulation row records what share was captured, a neuron whose mean falls
under 0.9 is flagged, and the client asks for as many logprobs as the server allows."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from fake_openai import FakeOpenAIServer, _top, distribution  # noqa: E402

from neuron_pipeline.interp.simulator import (  # noqa: E402
    DIGIT_TOKENS,
    SLOT_FILLER,
    AllAtOnceSimulator,
    ChatSimulator,
    captured_value_mass,
    excerpt_suffix,
)
from neuron_pipeline.llm.openai_api import OpenAICompatible  # noqa: E402

EXCERPTS = [["She", " poured", " the", " tea"], [" on", " Monday", " morning"]]
EXPLANATION = "tea cups and Monday mornings"


def test_captured_value_mass_by_hand():
    log = math.log
    # Every value token listed: all of it captured.
    assert captured_value_mass({str(v): log(1 / 11) for v in range(11)}) == 1.0
    # Two digits listed (0.3 + 0.1), 9 value tokens missing; the list holds 0.3 + 0.1 + 0.5 = 0.9,
    # so the missing ones hold at most min(1 - 0.9, 9 * 0.1) = 0.1: captured >= 0.4 / 0.5.
    top = {"3": log(0.3), " 7": log(0.1), " the": log(0.5)}
    assert captured_value_mass(top) == pytest.approx(0.4 / 0.5)
    # The list holds almost everything, but each missing value is bounded by the smallest entry.
    top = {"3": log(0.2), " the": log(0.79), "x": log(0.001)}
    assert captured_value_mass(top, DIGIT_TOKENS) == pytest.approx(0.2 / (0.2 + min(0.009, 9 * 0.001)))
    assert captured_value_mass({" the": log(0.9)}) == 0.0


def test_the_client_asks_for_the_servers_maximum_and_reports_the_mass():
    """A server allowing 5 logprobs: the client asks 20, is refused with the cap named, asks 5
    from then on; each slot's value mass equals the hand computation on the fake's top 5."""
    prefix = "Neuron C\nExplanation: tea\n<start>\n"
    with FakeOpenAIServer(max_logprobs=5, max_lifetime_s=60) as fake:
        with OpenAICompatible("fake-model", base_url=fake.base_url, backoff_base_s=0.01) as client:
            assert client.supports_prompt_logprobs()
            suffixes, slots = zip(*(excerpt_suffix(t) for t in EXCERPTS))
            got = client.value_distributions(prefix, suffixes, slots)
            assert client.faults["logprobs_capped"] == 1 and "client_error" not in client.faults
        asked = [r.body["logprobs"] for r in fake.posts("/completions")]
    assert asked[:2] == [20, 5] and set(asked[2:]) == {5}
    for tokens, (suffix, suffix_slots), result in zip(EXCERPTS, (excerpt_suffix(t) for t in EXCERPTS), got):
        assert result.value_mass.shape == (len(tokens),)
        for slot, mass in zip(suffix_slots, result.value_mass):
            top = _top(distribution(prefix + suffix[:slot], SLOT_FILLER), 5, SLOT_FILLER)
            probs = {t: math.exp(lp) for t, lp in top.items()}
            captured = sum(p for t, p in probs.items() if t in DIGIT_TOKENS)
            missing = 10 - sum(t in DIGIT_TOKENS for t in probs)
            unseen = min(1 - sum(probs.values()), missing * min(probs.values()))
            assert mass == pytest.approx(captured / (captured + unseen))
            assert 0 < mass < 1  # 5 alternatives cannot hold 10 digits
    # With 20 alternatives every digit is listed.
    with FakeOpenAIServer(max_lifetime_s=60) as fake:
        with OpenAICompatible("fake-model", base_url=fake.base_url) as client:
            simulations = AllAtOnceSimulator(client).simulate(EXPLANATION, EXCERPTS)
    assert [s.value_mass for s in simulations] == [1.0, 1.0]


def test_chat_simulator_records_the_mass_of_its_top_logprobs():
    with FakeOpenAIServer(max_lifetime_s=60) as fake:
        with OpenAICompatible("fake-model", base_url=fake.base_url) as client:
            (simulation,) = ChatSimulator(client).simulate(EXPLANATION, EXCERPTS[:1])
            integers = ChatSimulator(client, use_logprobs=False).simulate(EXPLANATION, EXCERPTS[:1])[0]
        asked = [r.body.get("top_logprobs") for r in fake.posts("/chat/completions")]
    assert asked == [20, None]  # as many as OpenAI allows
    # The fake lists the value (0.6), its neighbours (0.15 each) and "x" (0.01): a value of 0 has
    # one neighbour, so 0.75 captured of at most 0.75 + min(0.24, 9 * 0.01).
    assert simulation.mode == "chat_top_logprobs" and 0.85 < simulation.value_mass < 1.0
    assert integers.mode == "chat_integers" and integers.value_mass is None


def test_low_value_mass_is_flagged_per_neuron():
    from neuron_pipeline.assets.metadata import low_value_mass, value_mass_metadata

    frame = pl.DataFrame(
        {
            "layer": ["0"] * 5,
            "neuron": [1, 1, 2, 2, 3],
            "simulator_id": ["s"] * 5,
            "value_mass": [0.95, 0.8, 1.0, 1.0, None],
        }
    )
    low = low_value_mass(frame)
    assert low["neuron"].to_list() == [1] and low["value_mass"][0] == pytest.approx(0.875)
    metadata = value_mass_metadata(frame)
    assert metadata["neurons_value_mass_below_0.9"] == 1 and metadata["value_mass_mean"] == pytest.approx(0.9375)
    assert "value_mass_warning" in metadata
    assert "value_mass_warning" not in value_mass_metadata(frame.filter(pl.col("neuron") != 1))


def test_value_mass_reaches_the_simulations_table_and_the_warning(tmp_path, monkeypatch):
    """Through Dagster: an API simulator on a server allowing 3 logprobs writes value_mass < 0.9
    in every row, and the asset's metadata flags the neurons; the local-style exact mass is 1."""
    import dagster as dg
    from conftest import small_settings

    from neuron_pipeline.definitions import build_definitions
    from neuron_pipeline.lake import read_table

    monkeypatch.setenv("FAKE_KEY", "sk-test-mass")
    with FakeOpenAIServer(max_logprobs=3, max_lifetime_s=240) as fake:
        api = {"backend": "openai", "model": "fake-model", "base_url": fake.base_url, "api_key_env": "FAKE_KEY"}
        settings = small_settings(
            tmp_path / "lake", layers="0", neurons="0-1", explainers=[api], simulators=[{**api, "mode": "prompt_logprobs"}]
        )
        defs = build_definitions(settings)
        instance = dg.DagsterInstance.ephemeral()
        keys = ["corpus_tokens", "neuron_activations", "activation_records", "explanations", "simulations"]
        for selection, partition in ((keys[:1], None), (keys[1:], "0")):
            result = dg.materialize(
                list(defs.assets), selection=[dg.AssetKey(k) for k in selection], resources=defs.resources,
                instance=instance, partition_key=partition,
            )
            assert result.success
        metadata = {
            key: value.value for event in result.get_asset_materialization_events()
            if event.asset_key == dg.AssetKey("simulations") for key, value in event.materialization.metadata.items()
        }
    simulations = read_table(settings.lake_location.folder, "simulations")
    assert simulations.height > 0 and simulations["value_mass"].null_count() == 0
    assert simulations["value_mass"].max() < 0.9
    assert metadata["neurons_value_mass_below_0.9"] == simulations["neuron"].n_unique() == 2
    assert "value_mass_warning" in metadata
    assert np.isclose(metadata["value_mass_mean"], simulations["value_mass"].mean(), atol=1e-4)
