"""The Batch API (``batch: true``): JSONL uploaded, batch submitted and polled, answers matched by
custom id, half price, failed and expired requests asked again, and a run killed while its batch
is pending resumes that batch instead of paying again. Against tests/fake_openai.py's
/v1/files and /v1/batches."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from fake_openai import FakeOpenAIServer  # noqa: E402

from neuron_pipeline.interp.llm_protocol import ChatRequest, ChatResponse  # noqa: E402
from neuron_pipeline.llm.batch import BatchChatModel, custom_id  # noqa: E402
from neuron_pipeline.llm.cache import LLMCache  # noqa: E402
from neuron_pipeline.llm.openai_api import LLMRequestError, OpenAICompatible  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def ask(i: int) -> ChatRequest:
    return ChatRequest(messages=(("user", f"Neuron C\n<start>\n word{i}\t9\n<end>"),), max_tokens=20)


def uploaded_lines(fake: FakeOpenAIServer) -> list[dict]:
    return [json.loads(line) for f in fake.files.values() if f["purpose"] == "batch" for line in f["data"].splitlines()]


def test_requests_from_many_threads_go_in_one_batch_at_half_price(tmp_path):
    with FakeOpenAIServer(max_lifetime_s=60) as fake:
        prices = {"usd_per_million_prompt": 2.0, "usd_per_million_completion": 8.0}
        with OpenAICompatible("fake-model", base_url=fake.base_url, **prices) as online:
            expected = online.chat_many([ask(i) for i in range(6)])
            online_usd = online.usage["usd"]
        with OpenAICompatible("fake-model", base_url=fake.base_url, **prices) as client:
            model = BatchChatModel(client, LLMCache(tmp_path / "cache.sqlite"), poll_s=0.02, collect_s=0.3)
            results: dict[int, list] = {}
            # Three callers at once (as the stages keep several neurons in progress), one repeated request.
            threads = [
                threading.Thread(target=lambda k=k: results.__setitem__(k, model.chat_many([ask(2 * k), ask(2 * k + 1), ask(0)])))
                for k in range(3)
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            batch_usd = client.usage["usd"]
        assert len(fake.posts("/chat/completions")) == 6  # only the online client's
        assert len(fake.posts("/batches")) == 1 and len(fake.posts("/files")) == 1
        lines = uploaded_lines(fake)
        assert len(lines) == 6  # ask(0) three times: sent once
        assert {line["custom_id"] for line in lines} == {custom_id(line["body"]) for line in lines}
        assert all(line["url"] == "/v1/chat/completions" and line["method"] == "POST" for line in lines)
        for k in range(3):
            got = results[k]
            assert all(isinstance(r, ChatResponse) for r in got)
            assert [r.texts for r in got] == [expected[2 * k].texts, expected[2 * k + 1].texts, expected[0].texts]
        assert batch_usd == pytest.approx(online_usd / 2)
        assert [b["status"] for b in LLMCache(tmp_path / "cache.sqlite").batches()] == ["completed"]


@pytest.mark.parametrize("outcome, kind, failed", [("partial", "batch_failed", {2, 5}), ("expired", "batch_expired", {3, 4, 5})])
def test_requests_a_batch_did_not_answer_are_errors_and_asked_again(tmp_path, outcome, kind, failed):
    store = LLMCache(tmp_path / "cache.sqlite")
    requests = [ask(i) for i in range(6)]
    with FakeOpenAIServer(max_lifetime_s=60, batch_outcome=outcome) as fake:
        with OpenAICompatible("fake-model", base_url=fake.base_url) as client:
            first = BatchChatModel(client, store, poll_s=0.02, collect_s=0.05).chat_many(requests)
            assert {i for i, r in enumerate(first) if isinstance(r, LLMRequestError)} == failed
            assert all(r.kind == kind for r in first if isinstance(r, Exception))
            assert client.faults[kind] == len(failed)
            fake.batch_outcome = "completed"
            # The next run asks again: the requests answered come back from the settled batch
            # (nothing new paid), the failed ones go out in a new batch.
            second = BatchChatModel(client, store, poll_s=0.02, collect_s=0.05).chat_many(requests)
        assert all(isinstance(r, ChatResponse) for r in second)
        assert [r.texts for i, r in enumerate(second) if i not in failed] == [r.texts for i, r in enumerate(first) if i not in failed]
        assert len(fake.posts("/batches")) == 2
        second_upload = [f for f in fake.files.values() if f["purpose"] == "batch"][1]
        assert len(second_upload["data"].splitlines()) == len(failed)
    assert [b["status"] for b in store.batches()] == ["completed", "expired" if outcome == "expired" else "completed"]


def test_a_failed_batch_fails_its_requests_in_one_line(tmp_path):
    with FakeOpenAIServer(max_lifetime_s=60, batch_outcome="failed") as fake:
        with OpenAICompatible("fake-model", base_url=fake.base_url) as client:
            results = BatchChatModel(client, poll_s=0.02, collect_s=0.05).chat_many([ask(1), ask(2)])
    assert all(isinstance(r, LLMRequestError) and r.kind == "batch_failed" for r in results)
    assert "rejected" in str(results[0]) and "\n" not in str(results[0])


_SUBMITTER = """
import sys, time
sys.path.insert(0, {repo!r})
from neuron_pipeline.interp.llm_protocol import ChatRequest
from neuron_pipeline.llm.batch import BatchChatModel
from neuron_pipeline.llm.cache import LLMCache
from neuron_pipeline.llm.openai_api import OpenAICompatible
client = OpenAICompatible("fake-model", base_url={url!r})
model = BatchChatModel(client, LLMCache({cache!r}), poll_s=0.05, collect_s=0.05)
model.chat_many([ChatRequest(messages=(("user", f"Neuron C\\n<start>\\n word{{i}}\\t9\\n<end>"),), max_tokens=20) for i in range(5)])
print("ANSWERED", flush=True)
"""


def _batches_recorded(cache: Path) -> int:
    if not cache.exists():
        return 0
    try:
        return sqlite3.connect(cache).execute("SELECT count(*) FROM batches").fetchone()[0]
    except sqlite3.Error:  # not created yet
        return 0


def test_a_run_killed_while_its_batch_is_pending_resumes_it_without_paying_again(tmp_path):
    cache = tmp_path / "cache.sqlite"
    with FakeOpenAIServer(max_lifetime_s=120, batch_polls=10**6) as fake:  # the batch stays in progress
        script = _SUBMITTER.format(repo=str(REPO), url=fake.base_url, cache=str(cache))
        process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:  # until the batch id is on disk and it is being polled
                if _batches_recorded(cache) and len(fake.gets) >= 2:
                    break
                assert process.poll() is None, process.stderr.read()[-2000:]
                time.sleep(0.05)
            os.kill(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
        finally:
            if process.poll() is None:
                process.kill()
        assert "ANSWERED" not in process.stdout.read()
        (batch,) = LLMCache(cache).batches()
        assert len(fake.posts("/batches")) == 1 and batch["status"] == "submitted"

        fake.batch_polls = 1  # the batch ends soon
        with OpenAICompatible("fake-model", base_url=fake.base_url) as client:
            resumed = BatchChatModel(client, LLMCache(cache), poll_s=0.02, collect_s=0.05)
            results = resumed.chat_many([ask(i) for i in range(5)])
        assert all(isinstance(r, ChatResponse) and r.texts[0] for r in results)
        assert len(fake.posts("/batches")) == 1 and len(fake.posts("/files")) == 1  # nothing submitted or paid twice
        assert fake.gets.count(f"/v1/batches/{batch['batch_id']}") >= 3
        assert [b["status"] for b in LLMCache(cache).batches()] == ["completed"]


def test_batch_mode_through_the_pipeline(tmp_path, monkeypatch):
    """``batch: true`` on an explainer and a chat simulator: no online chat call, explanations and
    simulations written, costs at half the configured price."""
    import dagster as dg
    from conftest import small_settings

    from neuron_pipeline.definitions import build_definitions
    from neuron_pipeline.lake import read_table

    monkeypatch.setenv("FAKE_KEY", "sk-test-batch")
    with FakeOpenAIServer(max_lifetime_s=240, batch_polls=1) as fake:
        api = {
            "backend": "openai", "model": "fake-model", "base_url": fake.base_url, "api_key_env": "FAKE_KEY",
            "batch": True, "batch_poll_s": 0.05, "usd_per_million_prompt": 1.0, "usd_per_million_completion": 1.0,
        }
        settings = small_settings(tmp_path / "lake", layers="0", neurons="0-1", explainers=[api], simulators=[api])
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
            str(event.asset_key.path[-1]): {k: v.value for k, v in event.materialization.metadata.items()}
            for event in result.get_asset_materialization_events()
        }
        assert not fake.posts("/chat/completions") and len(fake.posts("/batches")) >= 2
    lake = settings.lake_location.folder
    explanations = read_table(lake, "explanations")
    assert explanations.height == 2 and explanations["error"].null_count() == 2
    simulations = read_table(lake, "simulations")
    assert simulations.height > 0 and set(simulations["mode"]) == {"chat_top_logprobs"}
    tokens = int(simulations["prompt_tokens"].sum() + simulations["completion_tokens"].sum())
    assert metadata["simulations"]["usd_in_layers"] == pytest.approx(tokens / 1e6 / 2, rel=1e-6)
    # The bill of the configured run, before it was paid, on the explanations asset.
    plan = metadata["explanations"]
    assert plan["plan_neurons"] == 2 and plan["plan_calls"] == 2 + 2 * 10
    assert plan["plan_usd_batch"] == pytest.approx(plan["plan_usd_online"] / 2, abs=1e-4)  # rounded to 4 places
    store = LLMCache(lake / "_llm_cache" / "calls.sqlite")
    assert store.batches() and all(b["status"] == "completed" for b in store.batches())


def test_batch_settings_that_cannot_work_are_one_line_errors():
    from neuron_pipeline.config import ConfigError, load_settings

    api = {"backend": "openai", "model": "m", "base_url": "http://127.0.0.1:9/v1", "batch": True}
    with pytest.raises(ConfigError, match="batch: true needs the openai backend"):
        load_settings(profile="demo", overrides={"explainers": [{"backend": "local", "batch": True}]}, environ={})
    with pytest.raises(ConfigError, match="use mode top_logprobs or integers"):
        load_settings(profile="demo", overrides={"simulators": [{**api, "mode": "prompt_logprobs"}]}, environ={})
    settings = load_settings(profile="demo", overrides={"simulators": [api]}, environ={})
    assert settings.simulators[0].batch and settings.simulators[0].batch_poll_s == 30.0
