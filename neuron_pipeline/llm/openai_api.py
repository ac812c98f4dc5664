"""An OpenAI-compatible HTTP backend: OpenAI itself, vLLM, llama.cpp's server, Ollama, any base URL.

``OpenAICompatible`` is a ``ChatModel`` (explainer, chat simulator) and, where the server returns
prompt logprobs, a ``ValueDistributionModel`` (the paper's all-at-once simulator).

How it works:

- The API key is read once, at construction, from the environment variable named by
  ``api_key_env``; it is never logged, shown in ``repr`` or put into an error message.
- Requests run on a private asyncio event loop in a daemon thread, as plain JSON POSTs to
  ``{base_url}/chat/completions`` and ``{base_url}/completions`` over one ``aiohttp.ClientSession``
  whose keep-alive pool holds ``concurrency`` connections; ``chat`` / ``chat_many`` /
  ``value_distributions`` are plain synchronous calls. A semaphore keeps at most ``concurrency``
  requests in flight (it is held only while a request is on the wire, not while a retry waits).
  A request costs about 0.3 ms of client CPU; through the openai SDK, used here before, it cost
  2-3 ms, too much to keep 64 requests of 200 ms in flight on a shared 2-core machine
  (BENCHMARKS.md, section 4).
- Redirects are not followed (the key goes to ``base_url`` only; a 3xx is a ``client_error``),
  proxies come from the environment (``HTTP(S)_PROXY``, ``ALL_PROXY``, ``NO_PROXY``), cookies are
  not kept, and ``timeout_s`` bounds each attempt from sending to the last byte of the answer.
  Credentials in ``base_url`` (``https://user:pass@host/v1``) are sent as HTTP Basic auth instead
  of the key, as the openai SDK's httpx did.
- Our own retry loop: 429 (``Retry-After`` honoured, in seconds or as an HTTP date; else
  exponential backoff with jitter, capped at ``backoff_max_s``), 5xx, timeouts, connection
  errors and malformed bodies (invalid JSON, missing fields) are retried up to ``max_retries``
  times; other 4xx, OpenAI's ``insufficient_quota`` 429 and a spent budget are not. Every fault
  is counted in ``faults`` (see ``FAULT_KINDS``); a request that keeps failing raises
  ``LLMRequestError`` (``chat_many`` returns it in the request's place).
- Budget: before each request, spent tokens >= ``budget_tokens`` or spent dollars >=
  ``budget_usd`` raises ``BudgetExceeded``. Spending is read from each response's ``usage``
  (estimated at 4 characters a token when a server omits it). Up to ``concurrency`` requests
  already in flight when the cap is reached still complete, so a budget can be overshot by that
  much.

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
shift (logged).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import email.utils
import json
import logging
import math
import os
import random
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Sequence
from urllib.parse import SplitResult, unquote, urlsplit, urlunsplit

import aiohttp
import numpy as np

from neuron_pipeline.config import ConfigError
from neuron_pipeline.interp.llm_protocol import ChatRequest, ChatResponse, SlotDistributions, TokenLogprobs, without_prefill
from neuron_pipeline.interp.prompts import MAX_VALUE
from neuron_pipeline.interp.simulator import refill_slots

log = logging.getLogger(__name__)

OPENAI_BASE_URL = "https://api.openai.com/v1"
# Sent to self-hosted servers when no key is set (vLLM, llama.cpp, Ollama accept anything).
PLACEHOLDER_KEY = "sk-no-key-required"
MAX_TOP_LOGPROBS = 20

FAULT_KINDS = {
    "rate_limited": "HTTP 429; retried after Retry-After or a backoff",
    "quota_exhausted": "HTTP 429 insufficient_quota (no credit left); not retried",
    "server_error": "HTTP 5xx; retried",
    "timeout": "no answer within timeout_s; retried",
    "connection": "connection refused, reset or dropped; retried",
    "malformed": "2xx with invalid JSON or missing fields; retried",
    "client_error": "HTTP 4xx other than 429; not retried",
    "unusable_content": "valid answer without usable text (empty completion, no choices); returned as is",
    "logprobs_missing": "logprobs asked for but not in the answer; returned without them",
    "logprobs_rejected": "the server refused chat logprobs; answered without them, and not asked for again",
    "usage_missing": "no usage field; tokens estimated from characters",
    "budget_exceeded": "token or dollar budget spent; request not sent",
}

# Text for the one-time echo-logprobs probe: a repeated alphabet (an LM predicts the second copy
# by copying, which reveals a shifted alignment) and one value line showing how "10" tokenizes.
_ALPHABET = " ".join("abcdefghijklmnopqrstuvwxyz")
PROBE_TEXT = f"{_ALPHABET}\n{_ALPHABET}\n{_ALPHABET}\nx\t10\n"


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
    ``GET /models``; any other answer, or none, passes: not every server has that route). The TCP
    check is skipped when a proxy is configured for the URL (the client goes through the proxy)."""
    import socket
    import urllib.error
    import urllib.request

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

        class _NoRedirect(urllib.request.HTTPRedirectHandler):
            def redirect_request(self, *args, **kwargs):  # the key never follows a redirect elsewhere
                return None

        request = urllib.request.Request(f"{url}/models", headers={"Authorization": f"Bearer {api_key}"})
        try:
            urllib.request.build_opener(_NoRedirect).open(request, timeout=timeout_s).close()
        except urllib.error.HTTPError as exc:
            exc.close()
            if exc.code in (401, 403):
                raise ConfigError(
                    f"the server at {shown} rejected the API key in {api_key_env} (HTTP {exc.code}): set a valid key"
                ) from None
        except (OSError, ValueError):
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


class _StatusError(Exception):
    """A non-2xx answer: its status, its body (parsed JSON, else text) and headers."""

    def __init__(self, status: int, body: Any, headers):
        super().__init__(f"HTTP {status}")
        self.status = status
        self.body = body
        self.headers = headers


@dataclass(frozen=True)
class _Failure:
    kind: str
    retryable: bool
    status_code: int | None
    message: str
    retry_after: float | None = None


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
        self.value_logprobs = max(1, min(MAX_TOP_LOGPROBS, value_logprobs))
        self.faults: collections.Counter[str] = collections.Counter()
        self.usage: dict[str, float] = {"calls": 0, "retries": 0, "prompt_tokens": 0, "completion_tokens": 0, "usd": 0.0}
        self._secret = key  # kept only to scrub it out of error messages
        self._chat_logprobs: bool | None = None  # False once the server refused them
        self._max_completion_tokens = False  # True once the server asked for that name instead of max_tokens
        self._echo_format: EchoFormat | None = None
        self._echo_unsupported: str | None = None
        self._probe_task: asyncio.Future | None = None
        self._random = random.Random()
        url, headers, self._proxy = _transport_settings(self.base_url, key)
        self._urls = {"chat": f"{url}/chat/completions", "completions": f"{url}/completions"}
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True, name=f"openai-compatible:{model}")
        self._thread.start()
        self._semaphore = asyncio.Semaphore(concurrency)
        try:
            self._session = asyncio.run_coroutine_threadsafe(_open_session(url, headers, concurrency), self._loop).result()
        except BaseException:
            self._loop.call_soon_threadsafe(self._loop.stop)
            raise
        self._finalizer = weakref.finalize(self, _shutdown, self._loop, self._thread, self._session)

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
        attempts = self.max_retries + 1
        for attempt in range(attempts):
            async with self._semaphore:
                self._check_budget()
                self.usage["calls"] += 1
                if attempt:
                    self.usage["retries"] += 1
                try:
                    data = await self._post(endpoint, params)
                    result = parse(data)
                    self._account(data, params, result)
                    return result
                except (aiohttp.ClientError, OSError, _StatusError, _Malformed) as exc:  # TimeoutError is an OSError
                    failure = _classify(exc)
            self.faults[failure.kind] += 1
            message = self._scrub(failure.message)
            if not failure.retryable or attempt == attempts - 1:
                tried = f" after {attempt + 1} attempts" if attempt else ""
                raise LLMRequestError(
                    f"{failure.kind}{tried} from {endpoint} endpoint of {self.model_name}: {message}",
                    failure.kind,
                    failure.status_code,
                    attempt + 1,
                ) from None
            delay = self._delay(attempt, failure.retry_after)
            log.info("%s: %s (attempt %d of %d), retrying in %.2fs", self.model_name, failure.kind, attempt + 1, attempts, delay)
            await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    async def _post(self, endpoint: str, params: dict[str, Any]) -> dict:
        """One attempt: the JSON answer of a 2xx, else ``_StatusError`` (redirects not followed)."""
        async with self._session.post(
            self._urls[endpoint],
            data=json.dumps(params).encode(),
            allow_redirects=False,
            proxy=self._proxy,
            timeout=self._timeout,
        ) as response:
            content = await response.read()
            status = response.status
            if not 200 <= status < 300:
                raise _StatusError(status, _error_body(content), response.headers)
        return _json_object(content)

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:  # the server knows best; a little jitter spreads the crowd
            return min(retry_after, max(self.backoff_max_s, 60.0)) * self._random.uniform(1.0, 1.1)
        return min(self.backoff_max_s, self.backoff_base_s * 2**attempt) * self._random.uniform(0.5, 1.0)

    def _check_budget(self) -> None:
        spent = self.usage["prompt_tokens"] + self.usage["completion_tokens"]
        if self.budget_tokens is not None and spent >= self.budget_tokens:
            self.faults["budget_exceeded"] += 1
            raise BudgetExceeded(f"token budget spent: {int(spent)} of {self.budget_tokens} tokens used by {self.model_name}")
        if self.budget_usd is not None and self.usage["usd"] >= self.budget_usd:
            self.faults["budget_exceeded"] += 1
            raise BudgetExceeded(f"dollar budget spent: ${self.usage['usd']:.4f} of ${self.budget_usd:.4f} used by {self.model_name}")

    def _account(self, data: dict, params: dict, result: Any) -> None:
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
        self.usage["usd"] += (
            prompt_tokens * self.usd_per_million_prompt + completion_tokens * self.usd_per_million_completion
        ) / 1e6

    # --- chat --------------------------------------------------------------------------------------

    async def _chat(self, request: ChatRequest) -> ChatResponse:
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
            params.update(logprobs=True, top_logprobs=min(MAX_TOP_LOGPROBS, request.top_logprobs))
        try:
            return await self._call("chat", params, lambda data: self._parse_chat(data, want_logprobs))
        except LLMRequestError as exc:
            if exc.status_code not in (400, 422):
                raise
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
        params = {
            "model": self.model_name,
            "prompt": prompt,
            "echo": True,
            "logprobs": self.value_logprobs,
            "max_tokens": 1,
            "temperature": 0.0,
        }
        return await self._call("completions", params, _parse_echo)

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
        if fmt.split_ten:
            after_one, _ = outcomes[1]
            shared = probs[:, 1].copy()
            for row, top in enumerate(after_one):
                p_long = sum(math.exp(lp) for tok, lp in top.items() if tok == "0")
                p_end = sum(math.exp(lp) for tok, lp in top.items() if tok.startswith(("\n", "\r\n")))
                ratio = p_long / (p_long + p_end) if p_long + p_end > 0 else 0.0
                probs[row, 1] = shared[row] * (1 - ratio)
                probs[row, MAX_VALUE] = shared[row] * ratio
        return SlotDistributions(probs, prompt_tokens)


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


def _transport_settings(base_url: str, key: str | None) -> tuple[str, dict[str, str], str | None]:
    """(base URL without credentials, default headers, proxy URL or None) for ``base_url``."""
    parts, _ = _http_url(base_url)
    headers = {"Content-Type": "application/json", "Accept": "application/json", "User-Agent": "neuron-pipeline"}
    if parts.username or parts.password:  # like httpx: credentials in the URL become Basic auth
        headers["Authorization"] = aiohttp.BasicAuth(unquote(parts.username or ""), unquote(parts.password or "")).encode()
    else:
        headers["Authorization"] = f"Bearer {key or PLACEHOLDER_KEY}"
    for variable, header in (("OPENAI_ORG_ID", "OpenAI-Organization"), ("OPENAI_PROJECT_ID", "OpenAI-Project")):
        if os.environ.get(variable):  # sent by the openai SDK too
            headers[header] = os.environ[variable]
    proxy = _proxy_for(parts)
    if proxy and urlsplit(proxy).scheme not in ("http", "https"):
        raise ConfigError(f"proxy {_without_userinfo(proxy)!r} for {parts.scheme} URLs is not supported: use an http(s) proxy")
    return _without_userinfo(base_url), headers, proxy


async def _open_session(base_url: str, headers: dict[str, str], concurrency: int) -> aiohttp.ClientSession:
    """One keep-alive pool for every request of a client (created on its loop, as aiohttp wants)."""
    ssl_context: Any = True
    if base_url.startswith("https:"):
        import ssl

        ssl_context = ssl.create_default_context()  # the system's CAs (and SSL_CERT_FILE)
        try:
            import certifi  # the CAs the openai SDK used
        except ImportError:
            pass
        else:
            ssl_context.load_verify_locations(certifi.where())
    connector = aiohttp.TCPConnector(limit=concurrency, ssl=ssl_context)
    return aiohttp.ClientSession(
        connector=connector,
        headers=headers,
        cookie_jar=aiohttp.DummyCookieJar(),
        trust_env=False,  # proxies are resolved once in _transport_settings; no .netrc look-up per request
    )


def _shutdown(loop: asyncio.AbstractEventLoop, thread: threading.Thread, session: aiohttp.ClientSession) -> None:
    if loop.is_closed():
        return
    if threading.current_thread() is not thread and thread.is_alive():
        try:
            asyncio.run_coroutine_threadsafe(session.close(), loop).result(timeout=5)
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


def _retry_after(headers) -> float | None:
    if headers is None:
        return None
    milliseconds = headers.get("retry-after-ms")
    if milliseconds:
        try:
            return max(0.0, float(milliseconds) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _error_body(content: bytes) -> Any:
    """An error answer's body: its JSON, else its text, else None."""
    text = content.decode("utf-8", "replace").strip()
    if not text:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return text


def _error_detail(exc: _StatusError) -> tuple[str, str]:
    """(error code, message) from an OpenAI-style error body."""
    body = exc.body
    error = body.get("error", body) if isinstance(body, dict) else None
    if isinstance(error, dict):
        return str(error.get("code") or error.get("type") or ""), str(error.get("message") or "")[:300]
    if isinstance(error, str):
        return "", error[:300]
    return "", str(body)[:300] if body is not None else ""


def _classify(exc: Exception) -> _Failure:
    if isinstance(exc, _Malformed):
        return _Failure("malformed", True, None, str(exc))
    if isinstance(exc, TimeoutError):  # before OSError, of which it is one (so are aiohttp's timeouts)
        return _Failure("timeout", True, None, "no answer in time")
    if isinstance(exc, (aiohttp.ClientError, OSError)):
        return _Failure("connection", True, None, f"connection failed ({type(exc).__name__})")
    if isinstance(exc, _StatusError):
        status = exc.status
        code, message = _error_detail(exc)
        text = f"HTTP {status}" + (f" {code}" if code else "") + (f": {message}" if message else "")
        if status == 429:
            if code == "insufficient_quota":
                return _Failure("quota_exhausted", False, status, text)
            return _Failure("rate_limited", True, status, text, _retry_after(exc.headers))
        if status >= 500:
            return _Failure("server_error", True, status, text)
        if 300 <= status < 400:
            text += " (redirects are not followed: the key goes to base_url only)"
        return _Failure("client_error", False, status, text)
    return _Failure("malformed", True, None, f"unreadable answer ({type(exc).__name__})")


def _parse_chat_logprobs(logprobs: Any) -> tuple[TokenLogprobs, ...] | None:
    if not isinstance(logprobs, dict):
        return None
    content = logprobs.get("content")
    if not isinstance(content, list) or not content:
        return None
    steps = []
    for entry in content:
        if not isinstance(entry, dict) or not isinstance(entry.get("token"), str):
            raise _Malformed("a logprobs entry has no 'token'")
        top: dict[str, float] = {}
        for alternative in entry.get("top_logprobs") or []:
            if isinstance(alternative, dict) and isinstance(alternative.get("token"), str):
                _add_logprob(top, alternative["token"], alternative.get("logprob"))
        steps.append(TokenLogprobs(entry["token"], _logprob(entry.get("logprob")), top))
    return tuple(steps)


def _logprob(value: Any) -> float:
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
