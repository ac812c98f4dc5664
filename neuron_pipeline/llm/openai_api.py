"""An OpenAI-compatible backend on the ``openai`` SDK: OpenAI itself, vLLM, llama.cpp's server, Ollama, any base URL.

``OpenAICompatible`` is a ``ChatModel`` (explainer, chat simulator) and, where the server returns
prompt logprobs, a ``ValueDistributionModel`` (the paper's all-at-once simulator).

How it works:

- The API key is read once, at construction, from the environment variable named by
  ``api_key_env``; it is never logged, shown in ``repr`` or put into an error message.
- Requests go through the SDK's ``openai.AsyncOpenAI`` (``POST /chat/completions`` and
  ``/completions`` through its generic ``post`` with a raw ``httpx2.Response`` back: the SDK builds,
  sends and retries the request; the project reads the JSON itself, so a malformed answer is
  recognised and retried, and no pydantic model is built per answer), on the SDK's aiohttp transport (``DefaultAioHttpClient``: about a quarter less client CPU
  per request than its httpx one, BENCHMARKS.md section 4), on a private asyncio event loop in a
  daemon thread; ``chat`` / ``chat_many`` / ``value_distributions`` are plain synchronous calls.
  Server-specific parameters (vLLM's ``top_k``, ``repetition_penalty``...) go in ``extra_body``.
- The SDK's retries: 429 (``Retry-After`` / ``retry-after-ms`` honoured, in seconds or as an HTTP
  date), 408, 409, 5xx, timeouts and connection errors are retried up to ``max_retries`` times; other
  4xx are not. The project adds: OpenAI's ``insufficient_quota`` 429 is not retried (no credit comes
  back by waiting), the backoff without ``Retry-After`` is ``backoff_base_s * 2**attempt`` with
  jitter, capped at ``backoff_max_s``, and malformed answers (invalid JSON, missing fields) are
  retried within the same ``max_retries``. A 3xx is not followed (the key goes to ``base_url``
  only); proxies come from the environment (``HTTP(S)_PROXY``, ``ALL_PROXY``, ``NO_PROXY``);
  credentials in ``base_url`` (``https://user:pass@host/v1``) become HTTP Basic auth.
- Every attempt passes ``_SDKClient._send_request``: a semaphore keeps at most ``concurrency``
  attempts on the wire (a retry waiting for its turn holds no slot), the budget is checked, and
  every fault is counted in ``faults`` (see ``FAULT_KINDS``); a request that keeps failing raises
  ``LLMRequestError`` (``chat_many`` returns it in the request's place).
- Budget: before each attempt, spent tokens >= ``budget_tokens`` or spent dollars >=
  ``budget_usd`` raises ``BudgetExceeded``. Spending is read from each response's ``usage``
  (estimated at 4 characters a token when a server omits it). Up to ``concurrency`` requests
  already in flight when the cap is reached still complete, so a budget can be overshot by that
  much.
- Logprobs: as many alternatives as the server allows. ``max_logprobs`` (default 20: vLLM's default
  ``--max-logprobs`` and OpenAI's chat cap) is asked for; a server that refuses it with a 400 naming
  its maximum ("at most 5", "max allowed: 20") is asked again with that maximum, which is
  remembered (counted as ``logprobs_capped``).

Prompt logprobs (``value_distributions``) use the legacy completions endpoint with ``echo=True,
logprobs=k, max_tokens=1``: the echoed prompt tokens come back with their ``top_logprobs`` and
``text_offset``, and the entry of the token that starts at a value slot is the distribution over
what is written there. A one-time probe (``supports_prompt_logprobs``) finds out whether the
server returns prompt logprobs at all (OpenAI's API does not: ``PromptLogprobsUnsupported``;
llama.cpp's own server returns them for generated tokens only: same), whether its tokenizer writes
10 as "1","0" (then a second pass with "1" in every slot splits p("1") by p("0") against
p(newline) after it, as in ``neuron_pipeline.llm.local``), and whether the echoed distributions
sit one token off (llama-cpp-python's server attaches to each token the distribution of the
*next* position): the probe text repeats the alphabet, which any trained LM continues by copying,
so the offset at which each entry's most likely token matches the echoed text tells the shift,
which is then corrected. On a randomly initialised model the probe cannot tell and assumes no
shift (logged). A top-k answer lists only k alternatives per position: the share of the value
tokens' mass that the k captured is reported per slot (``SlotDistributions.value_mass``, see
``captured_value_mass``).
"""

from __future__ import annotations

import asyncio
import base64
import collections
import concurrent.futures
import contextvars
import json
import logging
import math
import os
import random
import re
import ssl
import threading
import weakref
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Sequence
from urllib.parse import SplitResult, unquote, urlsplit, urlunsplit

import anyio
import httpx2
import numpy as np
import openai

from neuron_pipeline.config import ConfigError
from neuron_pipeline.interp.llm_protocol import ChatRequest, ChatResponse, SlotDistributions, TokenLogprobs, without_prefill
from neuron_pipeline.interp.prompts import MAX_VALUE
from neuron_pipeline.interp.simulator import DIGIT_TOKENS, VALUE_TOKENS, captured_value_mass, refill_slots

log = logging.getLogger(__name__)

OPENAI_BASE_URL = "https://api.openai.com/v1"
# Sent to self-hosted servers when no key is set (vLLM, llama.cpp, Ollama accept anything).
PLACEHOLDER_KEY = "sk-no-key-required"
# Alternatives per position asked for by default: vLLM's default --max-logprobs, OpenAI chat's cap.
MAX_TOP_LOGPROBS = 20

FAULT_KINDS = {
    "rate_limited": "HTTP 429; retried after Retry-After or a backoff",
    "quota_exhausted": "HTTP 429 insufficient_quota (no credit left); not retried",
    "server_error": "HTTP 5xx; retried",
    "timeout": "no answer within timeout_s (or HTTP 408); retried",
    "connection": "connection refused, reset or dropped; retried",
    "malformed": "2xx with invalid JSON or missing fields; retried",
    "conflict": "HTTP 409; retried (as the openai SDK does)",
    "client_error": "HTTP 3xx or 4xx other than 408, 409 and 429; not retried",
    "unusable_content": "valid answer without usable text (empty completion, no choices); returned as is",
    "logprobs_missing": "logprobs asked for but not in the answer; returned without them",
    "logprobs_rejected": "the server refused chat logprobs; answered without them, and not asked for again",
    "logprobs_capped": "the server refused that many logprobs (HTTP 400 naming its maximum); asked again with its maximum",
    "usage_missing": "no usage field; tokens estimated from characters",
    "budget_exceeded": "token or dollar budget spent; request not sent",
    "batch_expired": "Batch API: the request was not run within the completion window; asked again on the next run",
    "batch_failed": "Batch API: the request (or the whole batch) failed; asked again on the next run",
}

_PATHS = {"chat": "/chat/completions", "completions": "/completions"}

# Text for the one-time echo-logprobs probe: a repeated alphabet (an LM predicts the second copy
# by copying, which reveals a shifted alignment) and one value line showing how "10" tokenizes.
_ALPHABET = " ".join("abcdefghijklmnopqrstuvwxyz")
PROBE_TEXT = f"{_ALPHABET}\n{_ALPHABET}\n{_ALPHABET}\nx\t10\n"

# A 400 that names the server's logprobs maximum: vLLM "... greater than max allowed: 20",
# OpenAI "Expected a value <= 20", "... must be at most 5", "less than or equal to 5".
_LOGPROBS_CAP = re.compile(r"(?:max(?:imum)?(?: allowed)?|<=|at most|less than or equal to)\D{0,12}?(\d+)", re.IGNORECASE)


def require_key(base_url: str | None, api_key_env: str) -> str | None:
    """The API key from ``api_key_env``; a one-line ``ConfigError`` when OpenAI's own API (no
    ``base_url``) is asked for without one. Self-hosted servers may go without a key."""
    key = os.environ.get(api_key_env) or None
    if base_url is None and key is None:
        raise ConfigError(
            f"set {api_key_env} to your OpenAI API key (or give base_url for a self-hosted OpenAI-compatible server)"
        )
    return key


class ServerUnreachable(ConfigError):
    """Nothing answers at the configured base URL: the run would only record failures."""


def check_reachable(
    base_url: str | None, timeout_s: float = 5.0, api_key: str | None = None, api_key_env: str = "OPENAI_API_KEY"
) -> None:
    """Fail fast, in one line, when no server accepts connections at ``base_url`` (a TCP connect
    to its host and port), or, given ``api_key``, when the server rejects the key (HTTP 401/403 to
    ``GET /models`` through the SDK; any other answer, or none, passes: not every server has that
    route). The TCP check is skipped when a proxy is configured for the URL (the client goes through
    the proxy). No redirect is followed."""
    import socket

    url = (base_url or OPENAI_BASE_URL).rstrip("/")
    shown = _without_userinfo(url)
    parts, port = _http_url(url)
    if _proxy_for(parts) is None:
        try:
            socket.create_connection((parts.hostname, port), timeout=timeout_s).close()
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            raise ServerUnreachable(
                f"cannot reach the OpenAI-compatible server at {shown} ({reason}): start it, or fix base_url"
            ) from None
    if api_key:
        http = openai.DefaultHttpxClient(follow_redirects=False, timeout=timeout_s)
        try:
            with openai.OpenAI(api_key=api_key, base_url=url, max_retries=0, timeout=timeout_s, http_client=http) as client:
                client.models.with_raw_response.list()
        except (openai.AuthenticationError, openai.PermissionDeniedError) as exc:
            raise ConfigError(
                f"the server at {shown} rejected the API key in {api_key_env} (HTTP {exc.status_code}): set a valid key"
            ) from None
        except (openai.OpenAIError, OSError, ValueError):
            pass  # no verdict: the calls themselves will tell


class BudgetExceeded(RuntimeError):
    """The token or dollar budget of this client is spent; no further request is sent."""


class PromptLogprobsUnsupported(RuntimeError):
    """The server does not return (usable) prompt logprobs: use a chat simulator instead."""


class LLMRequestError(RuntimeError):
    """A request that failed for good (retries used up, or an error not worth retrying)."""

    def __init__(self, message: str, kind: str, status_code: int | None = None, attempts: int = 1):
        super().__init__(message)
        self.kind = kind
        self.status_code = status_code
        self.attempts = attempts


class _Malformed(Exception):
    """A 2xx answer the client cannot read."""


@dataclass
class _Attempts:
    """One call's attempts so far (shared by the SDK's retries and the project's malformed retries)."""

    limit: int  # max_retries + 1
    count: int = 0
    last_kind: str | None = None

    @property
    def retries_left(self) -> int:
        return max(0, self.limit - self.count - 1)


# The call whose attempts the SDK is making right now (set per task by OpenAICompatible._call).
_CURRENT_CALL: contextvars.ContextVar[_Attempts | None] = contextvars.ContextVar("neuron_pipeline_llm_call", default=None)


@dataclass
class _Meter:
    """What every attempt of one OpenAICompatible passes: its concurrency, budget and counters."""

    model_name: str
    concurrency: int
    budget_tokens: int | None
    budget_usd: float | None
    backoff_base_s: float
    backoff_max_s: float
    faults: collections.Counter = field(default_factory=collections.Counter)
    usage: dict = field(default_factory=lambda: {"calls": 0, "retries": 0, "prompt_tokens": 0, "completion_tokens": 0, "usd": 0.0})
    semaphore: asyncio.Semaphore | None = None
    random: random.Random = field(default_factory=random.Random)

    def check_budget(self) -> None:
        spent = self.usage["prompt_tokens"] + self.usage["completion_tokens"]
        if self.budget_tokens is not None and spent >= self.budget_tokens:
            self.faults["budget_exceeded"] += 1
            raise BudgetExceeded(f"token budget spent: {int(spent)} of {self.budget_tokens} tokens used by {self.model_name}")
        if self.budget_usd is not None and self.usage["usd"] >= self.budget_usd:
            self.faults["budget_exceeded"] += 1
            raise BudgetExceeded(f"dollar budget spent: ${self.usage['usd']:.4f} of ${self.budget_usd:.4f} used by {self.model_name}")

    def fault(self, kind: str) -> None:
        self.faults[kind] += 1
        call = _CURRENT_CALL.get()
        if call is not None:
            call.last_kind = kind

    def delay(self, attempt: int, retry_after: float | None) -> float:
        """Seconds before retry number ``attempt + 1``: the server's ``Retry-After`` when it gave
        one (a little jitter spreads the crowd), else exponential backoff with jitter."""
        if retry_after is not None and math.isfinite(retry_after) and retry_after > 0:
            return min(retry_after, max(self.backoff_max_s, 60.0)) * self.random.uniform(1.0, 1.1)
        return min(self.backoff_max_s, self.backoff_base_s * 2**attempt) * self.random.uniform(0.5, 1.0)


class _SDKClient(openai.AsyncOpenAI):
    """``openai.AsyncOpenAI`` with the project's per-attempt accounting (``_send_request`` is the
    SDK's one call per attempt), backoff bounds and quota rule; its ``max_retries`` is what is left
    of the current call's attempts."""

    _meter: _Meter
    _default_max_retries = 0

    @property  # type: ignore[override]
    def max_retries(self) -> int:
        call = _CURRENT_CALL.get()
        return call.retries_left if call is not None else self._default_max_retries

    @max_retries.setter
    def max_retries(self, value: int) -> None:
        self._default_max_retries = value

    async def _send_request(self, request: httpx2.Request, *, stream: bool, **kwargs) -> httpx2.Response:
        meter = self._meter
        call = _CURRENT_CALL.get()
        async with meter.semaphore:
            meter.check_budget()
            meter.usage["calls"] += 1
            if call is not None:
                if call.count:
                    meter.usage["retries"] += 1
                call.count += 1
            try:
                response = await super()._send_request(request, stream=stream, **kwargs)
            except (httpx2.RequestError, ssl.SSLError, anyio.EndOfStream) as exc:
                meter.fault(_transport_kind(exc))
                raise
        status = response.status_code
        if not 200 <= status < 300:
            if not response.is_closed:
                await response.aread()
            meter.fault(_status_kind(status, response.content))
        return response

    def _should_retry(self, response: httpx2.Response) -> bool:
        if response.status_code == 429 and _error_code(response.content) == "insufficient_quota":
            return False
        return super()._should_retry(response)

    def _calculate_retry_timeout(self, remaining_retries: int, options, response_headers=None) -> float:
        call = _CURRENT_CALL.get()
        attempt = (call.count - 1) if call is not None else 0
        delay = self._meter.delay(attempt, self._parse_retry_after_header(response_headers))
        kind = call.last_kind if call is not None else "fault"
        log.info("%s: %s (attempt %d), retrying in %.2fs", self._meter.model_name, kind, attempt + 1, delay)
        return delay


def _transport_kind(exc: BaseException) -> str:
    """"timeout" or "connection" for an attempt that got no answer. The SDK's aiohttp transport
    maps every aiohttp connection error (a reset too) to ``httpx2.ConnectTimeout``: the aiohttp
    exception underneath tells which it was."""
    cause = exc.__cause__ if exc.__cause__ is not None else exc
    return "timeout" if isinstance(cause, (TimeoutError, httpx2.TimeoutException)) else "connection"


def _status_kind(status: int, content: bytes) -> str:
    if status == 429:
        return "quota_exhausted" if _error_code(content) == "insufficient_quota" else "rate_limited"
    if status >= 500:
        return "server_error"
    if status == 408:
        return "timeout"
    if status == 409:
        return "conflict"
    return "client_error"


def _error_code(content: bytes) -> str:
    body = _error_body(content)
    error = body.get("error", body) if isinstance(body, dict) else None
    return str(error.get("code") or error.get("type") or "") if isinstance(error, dict) else ""


@dataclass(frozen=True)
class _Echo:
    tokens: list[str]
    top: list[dict[str, float] | None]
    offsets: list[int] | None
    prompt_tokens: int


@dataclass(frozen=True)
class EchoFormat:
    """What the probe learned about a server's echoed prompt logprobs."""

    split_ten: bool  # the tokenizer writes 10 as "1", "0"
    shift: int  # entry i carries the distribution of token i + shift (0 when correct)


class OpenAICompatible:
    """Chat and prompt-logprob access to any OpenAI-compatible server (see the module docstring)."""

    # An answer with no text at all is a server glitch (the cache does not keep it; a re-run asks again).
    empty_answers_are_glitches = True

    def __init__(
        self,
        model: str,
        base_url: str | None = None,
        api_key_env: str = "OPENAI_API_KEY",
        concurrency: int = 8,
        max_retries: int = 6,
        timeout_s: float = 60.0,
        budget_tokens: int | None = None,
        budget_usd: float | None = None,
        usd_per_million_prompt: float = 0.0,
        usd_per_million_completion: float = 0.0,
        backoff_base_s: float = 0.5,
        backoff_max_s: float = 30.0,
        value_logprobs: int = MAX_TOP_LOGPROBS,
        extra_body: dict[str, Any] | None = None,
    ):
        if concurrency < 1:
            raise ConfigError(f"concurrency must be at least 1, got {concurrency}")
        if max_retries < 0:
            raise ConfigError(f"max_retries must be 0 or more, got {max_retries}")
        if timeout_s <= 0:
            raise ConfigError(f"timeout_s must be positive, got {timeout_s}")
        key = require_key(base_url, api_key_env)
        self.model_name = model
        self.base_url = (base_url or OPENAI_BASE_URL).rstrip("/")
        _http_url(self.base_url)  # a one-line ConfigError for a URL that is not http(s)
        self.api_key_env = api_key_env
        self.concurrency = concurrency
        self.max_retries = max_retries
        self.timeout_s = timeout_s
        self.budget_tokens = budget_tokens
        self.budget_usd = budget_usd
        self.usd_per_million_prompt = usd_per_million_prompt
        self.usd_per_million_completion = usd_per_million_completion
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        # Alternatives asked for per position (the server's cap once it named one).
        self.value_logprobs = max(1, value_logprobs)
        self.extra_body = dict(extra_body or {})
        self._meter = _Meter(model, concurrency, budget_tokens, budget_usd, backoff_base_s, backoff_max_s)
        self.faults: collections.Counter[str] = self._meter.faults
        self.usage: dict[str, float] = self._meter.usage
        self._secret = key  # kept only to scrub it out of error messages
        self._chat_logprobs: bool | None = None  # False once the server refused them
        self._max_completion_tokens = False  # True once the server asked for that name instead of max_tokens
        self._echo_format: EchoFormat | None = None
        self._echo_unsupported: str | None = None
        self._probe_task: asyncio.Future | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True, name=f"openai-compatible:{model}")
        self._thread.start()
        try:
            self._client = asyncio.run_coroutine_threadsafe(self._open(key), self._loop).result()
        except BaseException:
            self._loop.call_soon_threadsafe(self._loop.stop)
            raise
        self._finalizer = weakref.finalize(self, _shutdown, self._loop, self._thread, self._client)

    async def _open(self, key: str | None) -> _SDKClient:
        """The SDK client, made on the private loop (aiohttp wants its session there)."""
        self._meter.semaphore = asyncio.Semaphore(self.concurrency)
        limits = httpx2.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency)
        parts, _ = _http_url(self.base_url)
        # The proxy is resolved here, once: with trust_env aiohttp would also look up ~/.netrc on
        # every request (in a thread).
        http = openai.DefaultAioHttpClient(
            limits=limits, follow_redirects=False, timeout=self.timeout_s, trust_env=False, proxy=_proxy_for(parts)
        )
        headers = {}
        if parts.username or parts.password:  # like httpx: credentials in the URL become Basic auth
            pair = f"{unquote(parts.username or '')}:{unquote(parts.password or '')}".encode()
            headers["Authorization"] = "Basic " + base64.b64encode(pair).decode()
        client = _SDKClient(
            api_key=key or PLACEHOLDER_KEY,
            base_url=_without_userinfo(self.base_url),
            max_retries=self.max_retries,
            timeout=self.timeout_s,
            http_client=http,
            default_headers=headers or None,
        )
        client._meter = self._meter
        return client

    def __repr__(self) -> str:
        return (
            f"OpenAICompatible(model={self.model_name!r}, base_url={_without_userinfo(self.base_url)!r}, "
            f"api_key_env={self.api_key_env!r}, concurrency={self.concurrency})"
        )

    __str__ = __repr__

    def __getstate__(self):
        raise TypeError("OpenAICompatible holds a live connection pool and cannot be pickled; build one per process")

    def close(self) -> None:
        """Close connections and stop the background loop (also done at garbage collection)."""
        self._finalizer()

    def __enter__(self) -> "OpenAICompatible":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- public sync API -----------------------------------------------------------------------

    def chat(self, request: ChatRequest) -> ChatResponse:
        return self._run(self._chat(request))

    def chat_many(self, requests: Sequence[ChatRequest]) -> list[ChatResponse | Exception]:
        """All requests at once (at most ``concurrency`` in flight); a failed one comes back as
        its exception, in its place."""
        return _collect(self.submit_chat(requests))

    def submit_chat(self, requests: Sequence[ChatRequest]) -> list[concurrent.futures.Future]:
        """Start all requests; one future per request (a ``ChatResponse``, or the request's
        exception), each resolving the moment its answer arrives — so a caller can persist every
        answer at once instead of after the whole batch (see ``neuron_pipeline.llm.cache``)."""
        futures: list[concurrent.futures.Future] = []
        try:
            for request in requests:
                futures.append(self._submit(self._chat(request)))
        except BaseException:
            for future in futures:
                future.cancel()
            raise
        return futures

    def submit_value_distributions(
        self, prefix: str, suffixes: Sequence[str], slots: Sequence[Sequence[int]]
    ) -> list[concurrent.futures.Future]:
        """Like ``value_distributions``, one future per excerpt (its ``SlotDistributions`` or its
        exception), each resolving as soon as that excerpt's requests are answered."""
        futures: list[concurrent.futures.Future] = []
        try:
            for suffix, suffix_slots in zip(suffixes, slots):
                futures.append(self._submit(self._one_distribution(prefix, suffix, list(suffix_slots))))
        except BaseException:
            for future in futures:
                future.cancel()
            raise
        return futures

    def supports_prompt_logprobs(self) -> bool:
        """Whether the server returns usable prompt logprobs (one probe request, then cached)."""
        try:
            self._run(self._get_echo_format())
        except PromptLogprobsUnsupported:
            return False
        return True

    def value_distributions(
        self, prefix: str, suffixes: Sequence[str], slots: Sequence[Sequence[int]]
    ) -> list[SlotDistributions]:
        return self._run(self._value_distributions(prefix, list(suffixes), [list(s) for s in slots]))

    @property
    def echo_format(self) -> EchoFormat | None:
        """What the probe found (None before it ran or when unsupported)."""
        return self._echo_format

    @property
    def sdk(self) -> openai.AsyncOpenAI:
        """The SDK client (for the Batch API: files and batches), used on ``run_async``'s loop."""
        return self._client

    def run_async(self, coroutine: Awaitable):
        """Run a coroutine on this client's loop (where ``sdk`` lives) and wait for its result."""
        return self._run(coroutine)

    # --- plumbing --------------------------------------------------------------------------------

    def _submit(self, coroutine: Awaitable) -> concurrent.futures.Future:
        if self._loop.is_closed() or not self._thread.is_alive():
            coroutine.close()  # type: ignore[attr-defined]
            raise RuntimeError("this OpenAICompatible client is closed")
        if threading.current_thread() is self._thread:
            coroutine.close()  # type: ignore[attr-defined]
            raise RuntimeError("OpenAICompatible's sync methods cannot be called from its own event loop")
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop)

    def _run(self, coroutine: Awaitable):
        future = self._submit(coroutine)
        try:
            return future.result()
        except BaseException:
            future.cancel()
            raise

    def _scrub(self, text: str) -> str:
        if self._secret and len(self._secret) >= 4:
            text = text.replace(self._secret, "***")
        return text

    # --- one request with retries ----------------------------------------------------------------

    async def _call(self, endpoint: str, params: dict[str, Any], parse: Callable[[dict], Any]) -> Any:
        """One request through the SDK (its retries for HTTP faults), plus retries of malformed
        answers, all within ``max_retries + 1`` attempts; the parsed answer, or ``LLMRequestError``."""
        call = _Attempts(self.max_retries + 1)
        token = _CURRENT_CALL.set(call)
        try:
            while True:
                try:
                    data = await self._send(endpoint, params)
                    result = parse(data)
                except _Malformed as exc:
                    self._meter.fault("malformed")
                    if call.count >= call.limit:
                        raise self._failure(endpoint, "malformed", None, str(exc), call.count) from None
                    delay = self._meter.delay(call.count - 1, None)
                    log.info("%s: malformed (attempt %d), retrying in %.2fs", self.model_name, call.count, delay)
                    await asyncio.sleep(delay)
                    continue
                except openai.APIStatusError as exc:
                    code, message = _error_detail(exc.response.content)
                    status = exc.status_code
                    text = f"HTTP {status}" + (f" {code}" if code else "") + (f": {message}" if message else "")
                    if 300 <= status < 400:
                        text += " (redirects are not followed: the key goes to base_url only)"
                    kind = call.last_kind or _status_kind(status, exc.response.content)
                    raise self._failure(endpoint, kind, status, text, call.count) from None
                except openai.APIConnectionError as exc:  # APITimeoutError is one
                    kind = call.last_kind if call.last_kind in ("timeout", "connection") else _transport_kind(exc.__cause__ or exc)
                    cause = exc.__cause__.__cause__ if exc.__cause__ is not None and exc.__cause__.__cause__ is not None else exc.__cause__
                    message = "no answer in time" if kind == "timeout" else f"connection failed ({type(cause or exc).__name__})"
                    raise self._failure(endpoint, kind, None, message, call.count) from None
                self._account(data, params, result)
                return result
        finally:
            _CURRENT_CALL.reset(token)

    async def _send(self, endpoint: str, params: dict[str, Any]) -> dict:
        """One SDK call (with its retries): the answer's JSON object, or ``_Malformed``.

        Through the SDK's generic ``post`` (its route for raw requests: same retries, errors and
        headers as ``chat.completions.create``): the typed ``create`` first walks the params
        through its TypedDict transform, 1.2 of its 1.9 ms of CPU per explainer request
        (BENCHMARKS.md section 4), which for plain JSON params changes nothing. ``extra_body`` is
        merged into the body, as the SDK's ``extra_body`` does."""
        body = {**params, **self.extra_body} if self.extra_body else params
        response = await self._client.post(_PATHS[endpoint], body=body, cast_to=httpx2.Response)
        return _json_object(response.content)

    def _failure(self, endpoint: str, kind: str, status: int | None, message: str, attempts: int) -> LLMRequestError:
        tried = f" after {attempts} attempts" if attempts > 1 else ""
        return LLMRequestError(
            f"{kind}{tried} from {endpoint} endpoint of {self.model_name}: {self._scrub(message)}", kind, status, max(1, attempts)
        )

    def _account(self, data: dict, params: dict, result: Any, price_factor: float = 1.0) -> None:
        usage = data.get("usage")
        prompt_tokens = completion_tokens = None
        if isinstance(usage, dict):
            prompt_tokens, completion_tokens = usage.get("prompt_tokens"), usage.get("completion_tokens")
        if not isinstance(prompt_tokens, (int, float)) or not isinstance(completion_tokens, (int, float)):
            self.faults["usage_missing"] += 1
            prompt_chars = len(json.dumps(params.get("messages") or params.get("prompt") or ""))
            completion_chars = sum(len(t) for t in getattr(result, "texts", ()) or ())
            prompt_tokens, completion_tokens = prompt_chars // 4 + 1, completion_chars // 4 + 1
        self.usage["prompt_tokens"] += int(prompt_tokens)
        self.usage["completion_tokens"] += int(completion_tokens)
        self.usage["usd"] += price_factor * (
            prompt_tokens * self.usd_per_million_prompt + completion_tokens * self.usd_per_million_completion
        ) / 1e6

    def _logprobs_cap(self, exc: LLMRequestError, asked: int) -> int | None:
        """The server's logprobs maximum when ``exc`` is a 400 refusing ``asked`` of them (counted
        as ``logprobs_capped``, not as a client error), else None."""
        if exc.status_code not in (400, 422) or "logprob" not in str(exc).lower():
            return None
        found = [int(m) for m in _LOGPROBS_CAP.findall(str(exc))]
        cap = next((n for n in found if 0 < n < asked), None)
        if cap is None:
            return None
        self.faults["client_error"] -= 1
        if self.faults["client_error"] <= 0:
            del self.faults["client_error"]
        self.faults["logprobs_capped"] += 1
        log.info("%s: the server allows at most %d logprobs (asked %d); asking for %d from now on", self.model_name, cap, asked, cap)
        return cap

    # --- chat --------------------------------------------------------------------------------------

    def chat_params(self, request: ChatRequest) -> tuple[dict[str, Any], bool]:
        """The JSON body of a chat request (without ``extra_body``), and whether it asks for logprobs."""
        params: dict[str, Any] = {
            "model": self.model_name,
            # A trailing assistant prefill is never assumed to be continued (interp/llm_protocol.py).
            "messages": [{"role": role, "content": content} for role, content in without_prefill(request.messages)],
            "max_tokens": request.max_tokens,
            "temperature": request.temperature,
            "n": request.n,
            "seed": request.seed,
        }
        if self._max_completion_tokens:
            params["max_completion_tokens"] = params.pop("max_tokens")
        want_logprobs = request.top_logprobs > 0 and self._chat_logprobs is not False
        if want_logprobs:
            params.update(logprobs=True, top_logprobs=min(self.value_logprobs, request.top_logprobs))
        return params, want_logprobs

    def read_chat(self, data: Any, params: dict[str, Any], want_logprobs: bool, price_factor: float = 1.0) -> ChatResponse:
        """A chat answer's JSON (e.g. one line of a Batch API output file) as a ``ChatResponse``,
        its tokens accounted at ``price_factor`` times the prices; ``LLMRequestError`` (malformed)
        when it cannot be read."""
        try:
            if not isinstance(data, dict):
                raise _Malformed("the answer is not a JSON object")
            result = self._parse_chat(data, want_logprobs)
        except _Malformed as exc:
            self.faults["malformed"] += 1
            raise LLMRequestError(f"malformed answer from {self.model_name}: {exc}", "malformed") from None
        self._account(data, params, result, price_factor)
        return result

    async def _chat(self, request: ChatRequest) -> ChatResponse:
        params, want_logprobs = self.chat_params(request)
        while True:
            try:
                return await self._call("chat", params, lambda data: self._parse_chat(data, want_logprobs))
            except LLMRequestError as exc:
                if exc.status_code not in (400, 422):
                    raise
                if want_logprobs and (cap := self._logprobs_cap(exc, params["top_logprobs"])) is not None:
                    self.value_logprobs = min(self.value_logprobs, cap)
                    params["top_logprobs"] = cap
                    continue
                if "max_tokens" in params and "max_completion_tokens" in str(exc):
                    # OpenAI's reasoning models take only the newer name; remembered for later calls.
                    params["max_completion_tokens"] = params.pop("max_tokens")
                    response = await self._call("chat", params, lambda data: self._parse_chat(data, want_logprobs))
                    self._max_completion_tokens = True
                    return response
                if not want_logprobs:
                    raise
                params = {k: v for k, v in params.items() if k not in ("logprobs", "top_logprobs")}
                response = await self._call("chat", params, lambda data: self._parse_chat(data, False))
                self.faults["logprobs_rejected"] += 1
                if self._chat_logprobs is None:
                    log.warning("%s: the server refused chat logprobs; continuing without them", self.model_name)
                self._chat_logprobs = False
                return response

    def _parse_chat(self, data: dict, want_logprobs: bool) -> ChatResponse:
        choices = data.get("choices")
        if not isinstance(choices, list):
            raise _Malformed("the answer has no 'choices' list")
        texts: list[str] = []
        logprobs: list[tuple[TokenLogprobs, ...]] = []
        missing = 0
        for choice in sorted(choices, key=lambda c: c.get("index", 0) if isinstance(c, dict) else 0):
            message = choice.get("message") if isinstance(choice, dict) else None
            if not isinstance(message, dict):
                raise _Malformed("a choice has no 'message' object")
            content = message.get("content")
            if content is not None and not isinstance(content, str):
                raise _Malformed("a message's 'content' is not text")
            texts.append(content or "")
            if want_logprobs:
                parsed = _parse_chat_logprobs(choice.get("logprobs"))
                missing += parsed is None
                logprobs.append(parsed or ())
        if not texts or not any(t.strip() for t in texts):
            self.faults["unusable_content"] += 1
        if want_logprobs and texts and missing:
            self.faults["logprobs_missing"] += 1
        usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
        return ChatResponse(
            tuple(texts),
            int(usage.get("prompt_tokens") or 0),
            int(usage.get("completion_tokens") or 0),
            tuple(logprobs) if any(logprobs) else (),
        )

    # --- prompt logprobs ---------------------------------------------------------------------------

    async def _echo(self, prompt: str) -> _Echo | None:
        while True:
            params = {
                "model": self.model_name,
                "prompt": prompt,
                "echo": True,
                "logprobs": self.value_logprobs,
                "max_tokens": 1,
                "temperature": 0.0,
            }
            try:
                return await self._call("completions", params, _parse_echo)
            except LLMRequestError as exc:
                cap = self._logprobs_cap(exc, params["logprobs"])
                if cap is None:
                    raise
                self.value_logprobs = min(self.value_logprobs, cap)

    async def _get_echo_format(self) -> EchoFormat:
        if self._echo_format is not None:
            return self._echo_format
        if self._echo_unsupported is not None:
            raise PromptLogprobsUnsupported(self._echo_unsupported)
        task = self._probe_task
        if task is None or (task.done() and (task.cancelled() or task.exception() is not None)):
            self._probe_task = asyncio.ensure_future(self._probe())
        return await asyncio.shield(self._probe_task)

    async def _probe(self) -> EchoFormat:
        try:
            echo = await self._echo(PROBE_TEXT)
        except LLMRequestError as exc:
            if exc.kind != "client_error":
                raise  # the server is down or overloaded: no verdict, probe again next time
            reason = f"{self.model_name} at {_without_userinfo(self.base_url)} refused echo with logprobs ({exc}); use a chat simulator"
            return self._unsupported(reason)
        if echo is None:
            return self._unsupported(
                f"{self.model_name} at {_without_userinfo(self.base_url)} returns no prompt logprobs (echo=True, logprobs=k); use a chat simulator"
            )
        try:
            starts = _token_starts(echo, PROBE_TEXT)
        except PromptLogprobsUnsupported as exc:
            return self._unsupported(str(exc))
        ten = PROBE_TEXT.index("\t10\n") + 1
        first = starts.get(ten)
        if first is None:
            return self._unsupported(f"{self.model_name}'s tokenizer merges the tab with the value that follows it: value slots cannot be read")
        if echo.tokens[first].strip() == "10":
            split_ten = False
        elif echo.tokens[first] == "1" and ten + 1 in starts and echo.tokens[starts[ten + 1]].startswith("0"):
            split_ten = True
        else:
            return self._unsupported(f"{self.model_name} writes the value 10 as {echo.tokens[first]!r}...: unsupported tokenization")
        shift = _detect_shift(echo, starts, len(PROBE_TEXT))
        self._echo_format = EchoFormat(split_ten, shift)
        if shift:
            log.warning(
                "%s: the server's echoed logprobs are off by %+d token (a known llama-cpp-python server bug); correcting",
                self.model_name,
                shift,
            )
        return self._echo_format

    def _unsupported(self, reason: str):
        self._echo_unsupported = self._scrub(reason)
        raise PromptLogprobsUnsupported(self._echo_unsupported)

    async def _slot_tops(self, prompt: str, offsets: list[int], fmt: EchoFormat) -> tuple[list[dict[str, float]], int]:
        echo = await self._echo(prompt)
        if echo is None:
            raise PromptLogprobsUnsupported(f"{self.model_name} returned no prompt logprobs for a simulation prompt")
        starts = _token_starts(echo, prompt)
        tops = []
        for offset in offsets:
            index = starts.get(offset)
            if index is None:
                raise ValueError(f"no token starts at value slot offset {offset}: the prompt format broke tokenization")
            entry = index - fmt.shift
            top = echo.top[entry] if 0 <= entry < len(echo.top) else None
            if top is None:
                raise PromptLogprobsUnsupported(f"{self.model_name} returned no logprobs at prompt offset {offset}")
            tops.append(top)
        return tops, echo.prompt_tokens

    async def _value_distributions(self, prefix: str, suffixes: list[str], slots: list[list[int]]) -> list[SlotDistributions]:
        if not suffixes:
            return []
        await self._get_echo_format()
        outcomes = await asyncio.gather(
            *(self._one_distribution(prefix, s, sl) for s, sl in zip(suffixes, slots)), return_exceptions=True
        )
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
        return list(outcomes)

    async def _one_distribution(self, prefix: str, suffix: str, suffix_slots: list[int]) -> SlotDistributions:
        """One excerpt: its request, plus (when the tokenizer writes 10 as "1","0") the second
        pass with "1" in every slot; both go out at once."""
        fmt = await self._get_echo_format()
        base = len(prefix)
        jobs = [self._slot_tops(prefix + suffix, [base + x for x in suffix_slots], fmt)]
        if fmt.split_ten:  # p(next | "1") at every slot: the position right after the "1"
            refilled, new_slots = refill_slots(suffix, suffix_slots, "1")
            jobs.append(self._slot_tops(prefix + refilled, [base + x + 1 for x in new_slots], fmt))
        outcomes = await asyncio.gather(*jobs, return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
        tops, prompt_tokens = outcomes[0]
        probs = np.array([_value_probabilities(top) for top in tops], dtype=np.float64).reshape(len(tops), MAX_VALUE + 1)
        value_tokens = DIGIT_TOKENS if fmt.split_ten else VALUE_TOKENS
        mass = np.array([captured_value_mass(top, value_tokens) for top in tops], dtype=np.float64)
        if fmt.split_ten:
            after_one, _ = outcomes[1]
            shared = probs[:, 1].copy()
            for row, top in enumerate(after_one):
                p_long = sum(math.exp(lp) for tok, lp in top.items() if tok == "0")
                p_end = sum(math.exp(lp) for tok, lp in top.items() if tok.startswith(("\n", "\r\n")))
                ratio = p_long / (p_long + p_end) if p_long + p_end > 0 else 0.0
                probs[row, 1] = shared[row] * (1 - ratio)
                probs[row, MAX_VALUE] = shared[row] * ratio
        return SlotDistributions(probs, prompt_tokens, mass)



# --- helpers (module level: no access to the key) ------------------------------------------------


def _collect(futures: Sequence[concurrent.futures.Future]) -> list:
    """The futures' results in order, a failed one as its exception; all cancelled on interrupt."""
    results: list = []
    try:
        for future in futures:
            try:
                results.append(future.result())
            except Exception as exc:  # noqa: BLE001 - reported per request
                results.append(exc)
    except BaseException:
        for future in futures:
            future.cancel()
        raise
    return results


def _http_url(url: str) -> tuple[SplitResult, int]:
    """``url`` split, and its port; a one-line ``ConfigError`` unless it is an http(s) URL."""
    shown = _without_userinfo(url)
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"base_url {shown!r} is not an http(s) URL: use e.g. http://127.0.0.1:8000/v1")
    try:
        return parts, parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise ConfigError(f"base_url {shown!r} has an invalid port") from None


def _proxy_for(parts: SplitResult) -> str | None:
    """The proxy the environment sets for this URL (``HTTP(S)_PROXY``, ``ALL_PROXY``, ``NO_PROXY``)."""
    import urllib.request

    proxies = urllib.request.getproxies()
    proxy = proxies.get(parts.scheme) or proxies.get("all")
    if not proxy or urllib.request.proxy_bypass(parts.hostname or ""):
        return None
    return proxy


def _shutdown(loop: asyncio.AbstractEventLoop, thread: threading.Thread, client: openai.AsyncOpenAI) -> None:
    if loop.is_closed():
        return
    if threading.current_thread() is not thread and thread.is_alive():
        try:
            asyncio.run_coroutine_threadsafe(client.close(), loop).result(timeout=5)
        except Exception:  # noqa: BLE001 - closing is best effort
            pass
    loop.call_soon_threadsafe(loop.stop)
    if threading.current_thread() is not thread:
        thread.join(timeout=5)
        if not thread.is_alive():
            loop.close()


def _without_userinfo(url: str) -> str:
    parts = urlsplit(url)
    if parts.username or parts.password:
        host = parts.hostname or ""
        netloc = host + (f":{parts.port}" if parts.port else "")
        return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
    return url


def _json_object(content: bytes) -> dict:
    try:
        data = json.loads(content)
    except ValueError:
        raise _Malformed(f"the answer is not valid JSON ({len(content)} bytes)") from None
    if not isinstance(data, dict):
        raise _Malformed("the answer is not a JSON object")
    return data


def _error_body(content: bytes) -> Any:
    """An error answer's body: its JSON, else its text, else None."""
    text = content.decode("utf-8", "replace").strip()
    if not text:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return text


def _error_detail(content: bytes) -> tuple[str, str]:
    """(error code, message) from an OpenAI-style error body."""
    body = _error_body(content)
    error = body.get("error", body) if isinstance(body, dict) else None
    if isinstance(error, dict):
        return str(error.get("code") or error.get("type") or ""), str(error.get("message") or "")[:300]
    if isinstance(error, str):
        return "", error[:300]
    return "", str(body)[:300] if body is not None else ""


def _parse_chat_logprobs(logprobs: Any) -> tuple[TokenLogprobs, ...] | None:
    if not isinstance(logprobs, dict):
        return None
    content = logprobs.get("content")
    if not isinstance(content, list) or not content:
        return None
    steps = []
    # The alternatives' loop is inlined (a top_logprobs answer has hundreds of tokens, each with
    # up to 20 alternatives).
    for entry in content:
        token = entry.get("token") if isinstance(entry, dict) else None
        if not isinstance(token, str):
            raise _Malformed("a logprobs entry has no 'token'")
        top: dict[str, float] = {}
        for alternative in entry.get("top_logprobs") or ():
            if not isinstance(alternative, dict):
                continue
            name = alternative.get("token")
            if not isinstance(name, str):
                continue
            lp = _logprob(alternative.get("logprob"))
            top[name] = float(np.logaddexp(top[name], lp)) if name in top else lp
        steps.append(TokenLogprobs(token, _logprob(entry.get("logprob")), top))
    return tuple(steps)


def _logprob(value: Any) -> float:
    if type(value) is float and value == value:  # the common case: a finite float from the JSON
        return value
    try:
        result = float(value)
    except (TypeError, ValueError):
        return float("-inf")
    return result if not math.isnan(result) else float("-inf")


def _add_logprob(top: dict[str, float], token: str, value: Any) -> None:
    lp = _logprob(value)
    top[token] = float(np.logaddexp(top[token], lp)) if token in top else lp


def _parse_echo(data: dict) -> _Echo | None:
    """The echoed tokens of a completions answer; None when it carries no logprobs."""
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise _Malformed("the answer has no choices")
    logprobs = choices[0].get("logprobs")
    if logprobs is None:
        return None
    if not isinstance(logprobs, dict):
        raise _Malformed("'logprobs' is not an object")
    tokens = logprobs.get("tokens")
    tops = logprobs.get("top_logprobs")
    offsets = logprobs.get("text_offset")
    if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
        return None
    if not isinstance(tops, list) or len(tops) != len(tokens):
        return None
    parsed_tops: list[dict[str, float] | None] = []
    for entry in tops:
        if entry is None:
            parsed_tops.append(None)
            continue
        top: dict[str, float] = {}
        if isinstance(entry, dict):
            for token, value in entry.items():
                _add_logprob(top, str(token), value)
        elif isinstance(entry, list):  # [{"token": ..., "logprob": ...}] as some servers write it
            for item in entry:
                if isinstance(item, dict) and isinstance(item.get("token"), str):
                    _add_logprob(top, item["token"], item.get("logprob"))
        else:
            raise _Malformed("a 'top_logprobs' entry is neither an object nor a list")
        parsed_tops.append(top)
    if not (isinstance(offsets, list) and len(offsets) == len(tokens) and all(isinstance(o, int) for o in offsets)):
        offsets = None
    usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
    return _Echo(tokens, parsed_tops, offsets, int(usage.get("prompt_tokens") or 0))


def _token_starts(echo: _Echo, prompt: str) -> dict[int, int]:
    """Character offset in ``prompt`` -> index of the echoed token starting there.

    ``text_offset`` is used when the tokens it places match the prompt text; otherwise (a BOS
    token counted into the offsets, offsets missing) offsets are rebuilt from the token texts."""

    def mapping(offsets: Sequence[int]) -> dict[int, int]:
        starts: dict[int, int] = {}
        for index, (token, offset) in enumerate(zip(echo.tokens, offsets)):
            if token and 0 <= offset < len(prompt) and offset not in starts:
                starts[offset] = index
        return starts

    def agreement(starts: dict[int, int]) -> float:
        if not starts:
            return 0.0
        return sum(prompt.startswith(echo.tokens[i], offset) for offset, i in starts.items()) / len(starts)

    if echo.offsets is not None:
        starts = mapping(echo.offsets)
        if agreement(starts) >= 0.9 and len(starts) >= 2:
            return starts
    joined = "".join(echo.tokens)
    lead = joined.find(prompt)
    if lead < 0:
        if len(echo.tokens) <= 2:
            raise PromptLogprobsUnsupported("the server returns logprobs for generated tokens only, not for the prompt (echo)")
        raise PromptLogprobsUnsupported("the server's echoed tokens do not spell out the prompt: value slots cannot be located")
    offsets, running = [], -lead
    for token in echo.tokens:
        offsets.append(running)
        running += len(token)
    return mapping(offsets)


def _detect_shift(echo: _Echo, starts: dict[int, int], prompt_length: int) -> int:
    """0 when entry i is the distribution of token i; +1 / -1 when it is that of token i +/- 1."""
    prompt_entries = sorted(starts.values())
    matches = {}
    for shift in (-1, 0, 1):
        count = 0
        for i in prompt_entries:
            top = echo.top[i]
            j = i + shift
            if top and 0 <= j < len(echo.tokens):
                count += max(top, key=top.get) == echo.tokens[j]
        matches[shift] = count
    best = max(matches, key=lambda s: (matches[s], s == 0))
    if best != 0 and matches[best] >= 2 * matches[0] + 3:
        return best
    if matches[0] < 3:
        log.info("echo-logprob alignment could not be verified (an untrained model?): assuming it is correct")
    return 0


def _value_probabilities(top: dict[str, float]) -> list[float]:
    probs = [0.0] * (MAX_VALUE + 1)
    for token, lp in top.items():
        text = token.strip()
        if text.isdigit() and text == str(int(text)) and int(text) <= MAX_VALUE:
            probs[int(text)] += math.exp(lp)
    return probs
