"""A fake OpenAI-compatible HTTP server for tests and benchmarks (real sockets on 127.0.0.1).

It speaks just enough of the protocol for ``neuron_pipeline.llm.openai_api``:

- ``POST /v1/chat/completions``: deterministic content derived from the prompt (an explanation
  for explainer prompts, "token<TAB>value" lines for simulator prompts), ``usage``, and
  ``logprobs.content[].top_logprobs`` when asked.
- ``POST /v1/completions``: with ``echo`` + ``logprobs`` the prompt tokens come back with
  ``tokens``, ``token_logprobs``, ``top_logprobs`` and ``text_offset`` (vLLM style), from a simple
  regex tokenizer and a deterministic next-token distribution, :func:`distribution`, that a test
  can recompute by hand.
- ``GET /v1/models``.
- The Batch API: ``POST /v1/files`` (multipart upload), ``GET /v1/files/{id}/content``,
  ``POST /v1/batches``, ``GET /v1/batches/{id}``. A batch is run (every line through the same
  chat / completions code, no latency, no faults) when it has been looked at ``batch_polls``
  times; ``batch_outcome`` makes it ``"completed"``, ``"expired"`` (the window ran out after half
  of its requests: the rest get ``batch_expired`` error lines), ``"partial"`` (completed, but
  every third request failed with a 500 in the error file) or ``"failed"`` (rejected whole).

Faults are scripted (``server.script("429", "500", ...)``, one per request, in order) or drawn at
random per request (``server.fault_rates = {"503": 0.1}``); see :data:`FAULTS`. ``logprobs_mode``
makes it behave like different servers: ``"full"`` (vLLM: correct echo logprobs), ``"openai"``
(OpenAI's current API: chat top_logprobs yes, prompt logprobs no), ``"none"`` (no logprobs at
all: chat ``logprobs`` is rejected with 400, completion logprobs are null), ``"generated_only"``
(llama.cpp's own server: completion logprobs for the generated token only) and ``"shifted"``
(llama-cpp-python's server: each echoed token carries the distribution of the *next* position).

Every request is recorded (path, headers, JSON body, arrival and end times, fault), in-flight
requests are counted (``max_in_flight``), and ``latency_s`` adds a fixed delay to every answer.
The server serves many concurrent connections (one thread each) and stops itself after
``max_lifetime_s`` at the latest.

``redirecting_server()`` answers everything with a redirect to itself: tests that the API key never
follows one.
"""

from __future__ import annotations

import contextlib
import email.utils
import hashlib
import json
import math
import random
import re
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Iterator

# Fault kinds a script entry or a rate key can name; an optional argument follows a colon.
FAULTS = {
    "429": "rate limited, no Retry-After",
    "429:S": "rate limited with 'Retry-After: S' (seconds)",
    "429date:S": "rate limited with Retry-After as an HTTP date S seconds ahead",
    "quota": "429 insufficient_quota (OpenAI's 'no money left': not transient)",
    "500": "internal server error",
    "503": "service unavailable",
    "400": "bad request",
    "slow:S": "answer after S more seconds (beyond a client timeout)",
    "reset": "close the connection without answering (TCP reset)",
    "truncated": "200 with a cut-off JSON body",
    "missing_choices": "200 with valid JSON that has no 'choices' field",
    "no_choices": "200 with 'choices': []",
    "empty_content": "200 with an empty completion text",
    "no_logprobs": "200 without logprobs although they were asked for",
    "garbled": "200 with a yes/no judgement that skips an excerpt (malformed for detection / fuzzing)",
}

LOGPROBS_MODES = ("full", "openai", "none", "generated_only", "shifted")

EXPLAINER_STYLES = {
    "continue": 'continues the prompt\'s sentence: \' the word "X" and words like it.\'',
    "sentence": 'ignores the prefill, answers a full sentence: \'This neuron responds to the word "X" and words like it.\'',
    "echo": 'repeats the prefix first: \'The main thing neuron C does is find the word "X" and words like it.\'',
    "garbage": "continues the excerpt listing instead of explaining: '<start>\\nX\\t10\\n<end>'",
    "simulator_garbage": "explains like 'continue', but answers simulator prompts with prose (no token<TAB>value line)",
}

_TOKEN_SPLIT_DIGITS = re.compile(r"\n|\t| ?[A-Za-z]+|\d| ?[^\sA-Za-z\d]+|\s")
_TOKEN_WHOLE_NUMBERS = re.compile(r"\n|\t| ?[A-Za-z]+|\d+| ?[^\sA-Za-z\d]+|\s")


def tokenize(text: str, split_digits: bool = True) -> list[str]:
    """Words (with their leading space), single digits (or whole numbers), tabs, newlines,
    runs of punctuation. The tokens always join back to ``text``."""
    pattern = _TOKEN_SPLIT_DIGITS if split_digits else _TOKEN_WHOLE_NUMBERS
    tokens = pattern.findall(text)
    assert "".join(tokens) == text, "fake tokenizer lost characters"
    return tokens


def distribution(context: str, actual: str | None, split_digits: bool = True) -> dict[str, float]:
    """The fake model's next-token log-probabilities after ``context``, where ``actual`` is the
    token that really follows (None at the end).

    Digits share 80% of the mass with weights from a hash of the context (so a misaligned
    position gives different numbers), "\\n" 5-14%, " the" 2%. Like a model that copies well,
    an alphabetic ``actual`` token gets half of all mass (the rest is halved); any other actual
    token not already listed gets 1%. Every value is a plain function of the arguments so a test
    can recompute it."""
    digest = hashlib.sha256(context.encode()).digest()
    values = [str(v) for v in range(10)] + ([] if split_digits else ["10"])
    weights = [1 + digest[i] % 16 for i in range(len(values))]
    total = sum(weights)
    probs = {value: 0.8 * w / total for value, w in zip(values, weights)}
    probs["\n"] = 0.05 + (digest[20] % 10) / 100
    probs[" the"] = 0.02
    if actual is not None and actual.strip().isalpha():
        probs = {k: p / 2 for k, p in probs.items()}
        probs[actual] = probs.get(actual, 0.0) + 0.5
    elif actual is not None and actual not in probs:
        probs[actual] = 0.01
    return {k: math.log(p) for k, p in probs.items()}


def fake_value(token: str, explanation: str) -> int:
    """The value the fake simulator writes for a token: 10 for a word of the explanation, else a
    small number from the characters."""
    word = token.strip().lower()
    words = set(re.findall(r"[a-z]+", explanation.lower()))
    if word and word in words:
        return 10
    return sum(map(ord, token)) % 4


def chat_value_logprobs(value: int) -> dict[str, float]:
    """Top logprobs the fake reports at a generated value token: 60% the value, 15% each neighbour."""
    probs = {str(value): 0.6}
    for neighbour in (value - 1, value + 1):
        if 0 <= neighbour <= 10:
            probs[str(neighbour)] = 0.15
    probs["x"] = 0.01
    return {k: math.log(p) for k, p in probs.items()}


@dataclass
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]
    body: Any  # parsed JSON, or the raw text when it was not JSON
    t_arrival: float  # time.monotonic() when the request was read
    t_end: float | None = None
    status: int | None = None
    fault: str | None = None


@dataclass
class FakeOpenAIServer:
    """Start with ``start()`` (or use as a context manager); ``base_url`` ends in ``/v1``."""

    latency_s: float = 0.0
    logprobs_mode: str = "full"
    split_digits: bool = True  # completions tokenizer: "10" -> "1", "0" (like SmolLM2, Llama 2)
    bos: str | None = None  # a BOS token echoed first, its length counted in text_offset (vLLM)
    model: str = "fake-model"
    max_lifetime_s: float = 300.0
    seed: int = 0
    fault_rates: dict[str, float] = field(default_factory=dict)
    require_api_key: str | None = None
    reject_max_tokens: bool = False  # like OpenAI's reasoning models: only max_completion_tokens
    # How explanations are worded (:data:`EXPLAINER_STYLES`): real chat servers answer a new turn
    # after a trailing assistant message instead of continuing it.
    explainer_style: str = "continue"
    max_logprobs: int = 20  # like vLLM's --max-logprobs: more is refused with a 400 naming the cap
    batch_polls: int = 2  # GET /v1/batches/{id} answers "in_progress" this many times, then the batch ends
    batch_outcome: str = "completed"  # completed | expired | partial | failed

    def __post_init__(self) -> None:
        if self.logprobs_mode not in LOGPROBS_MODES:
            raise ValueError(f"logprobs_mode must be one of {LOGPROBS_MODES}")
        if self.explainer_style not in EXPLAINER_STYLES:
            raise ValueError(f"explainer_style must be one of {sorted(EXPLAINER_STYLES)}")
        self.requests: list[RecordedRequest] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self._script: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._rng = random.Random(self.seed)
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._timer: threading.Timer | None = None
        self.gets: list[str] = []  # paths of GET requests
        self.files: dict[str, dict] = {}  # Batch API: id -> {"purpose", "filename", "data"}
        self.batches: dict[str, dict] = {}  # id -> the batch object (plus "_polls")

    # --- control -----------------------------------------------------------------------------

    def start(self) -> "FakeOpenAIServer":
        server = self

        class Handler(_Handler):
            fake = server

        self._httpd = _Server(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True, name="fake-openai")
        self._thread.start()
        self._timer = threading.Timer(self.max_lifetime_s, self.stop)
        self._timer.daemon = True
        self._timer.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._timer is not None:
            self._timer.cancel()
        if self._httpd is not None:
            httpd, self._httpd = self._httpd, None
            httpd.shutdown()
            httpd.server_close()

    def __enter__(self) -> "FakeOpenAIServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._httpd is not None, "server not started"
        return self._httpd.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def script(self, *faults: str) -> None:
        """Queue faults, one per coming request ("ok" for a normal answer)."""
        for fault in faults:
            _check_fault(fault)
        with self._lock:
            self._script.extend(faults)

    def reset(self) -> None:
        with self._lock:
            self.requests.clear()
            self._script.clear()
            self.max_in_flight = 0
            self.fault_rates = {}

    def posts(self, path_suffix: str = "") -> list[RecordedRequest]:
        with self._lock:
            return [r for r in self.requests if r.method == "POST" and r.path.endswith(path_suffix)]

    # --- internals ---------------------------------------------------------------------------

    def _next_fault(self) -> str | None:
        with self._lock:
            if self._script:
                fault = self._script.pop(0)
                return None if fault == "ok" else fault
            for fault, rate in self.fault_rates.items():
                if self._rng.random() < rate:
                    return fault
        return None

    # --- the Batch API ---------------------------------------------------------------------------

    def _upload(self, form: Any) -> tuple[int, dict]:
        if not isinstance(form, dict) or "file" not in form:
            return 400, _error("a multipart upload with a 'file' part is required", "file")
        file_id = f"file-{len(self.files) + 1:04d}"
        filename, data = form["file"]
        self.files[file_id] = {"purpose": form.get("purpose", ""), "filename": filename, "data": data}
        return 200, {"id": file_id, "object": "file", "bytes": len(data), "created_at": int(time.time()),
                     "filename": filename, "purpose": form.get("purpose", ""), "status": "processed"}

    def _create_batch(self, body: dict) -> tuple[int, dict]:
        stored = self.files.get(body.get("input_file_id", ""))
        if stored is None or stored["purpose"] != "batch":
            return 400, _error("input_file_id must name an uploaded file with purpose 'batch'", "input_file_id")
        if body.get("endpoint") not in ("/v1/chat/completions", "/v1/completions") or body.get("completion_window") != "24h":
            return 400, _error("endpoint must be /v1/chat/completions or /v1/completions, window 24h", "endpoint")
        with self._lock:
            batch_id = f"batch_{len(self.batches) + 1:04d}"
            total = sum(1 for line in stored["data"].splitlines() if line.strip())
            self.batches[batch_id] = {
                "id": batch_id, "object": "batch", "endpoint": body["endpoint"], "errors": None,
                "input_file_id": body["input_file_id"], "completion_window": "24h", "status": "validating",
                "output_file_id": None, "error_file_id": None, "created_at": int(time.time()),
                "expires_at": int(time.time()) + 86400, "request_counts": {"total": total, "completed": 0, "failed": 0},
                "metadata": body.get("metadata") or {}, "_polls": 0,
            }
            return 200, self._public(self.batches[batch_id])

    def _poll_batch(self, batch_id: str) -> dict | None:
        with self._lock:
            batch = self.batches.get(batch_id)
            if batch is None:
                return None
            batch["_polls"] += 1
            if batch["status"] in ("validating", "in_progress") and batch["_polls"] > self.batch_polls:
                self._run_batch(batch)
            elif batch["status"] == "validating":
                batch["status"] = "in_progress"
            return self._public(batch)

    @staticmethod
    def _public(batch: dict) -> dict:
        return {k: v for k, v in batch.items() if not k.startswith("_")}

    def _run_batch(self, batch: dict) -> None:
        """Answer every line of the batch's input file (called with the lock held)."""
        if self.batch_outcome == "failed":
            batch["status"] = "failed"
            batch["errors"] = {"object": "list", "data": [{"code": "invalid_request", "message": "the batch was rejected (scripted)", "line": 1}]}
            return
        lines = [json.loads(line) for line in self.files[batch["input_file_id"]]["data"].splitlines() if line.strip()]
        outputs, errors = [], []
        for index, line in enumerate(lines):
            entry = {"id": f"batch_req_{index}", "custom_id": line["custom_id"], "response": None, "error": None}
            if self.batch_outcome == "expired" and index >= len(lines) // 2:
                entry["error"] = {"code": "batch_expired", "message": "This request could not be executed before the completion window expired."}
                errors.append(entry)
                continue
            if self.batch_outcome == "partial" and index % 3 == 2:
                entry["response"] = {"status_code": 500, "request_id": f"req_{index}", "body": _error("The server had an error.", kind="server_error")}
                errors.append(entry)
                continue
            run = self._chat if line["url"].endswith("/chat/completions") else self._completion
            status, payload = run(line["body"], None)
            entry["response"] = {"status_code": status, "request_id": f"req_{index}", "body": payload}
            (outputs if status == 200 else errors).append(entry)
        for name, entries in (("output_file_id", outputs), ("error_file_id", errors)):
            if entries:
                file_id = f"file-{len(self.files) + 1:04d}"
                data = ("\n".join(json.dumps(e) for e in entries) + "\n").encode()
                self.files[file_id] = {"purpose": "batch_output", "filename": f"{batch['id']}_{name}.jsonl", "data": data}
                batch[name] = file_id
        batch["status"] = "expired" if self.batch_outcome == "expired" else "completed"
        batch["request_counts"] = {"total": len(lines), "completed": len(outputs), "failed": len(errors)}

    def _chat(self, body: dict, fault: str | None) -> tuple[int, dict]:
        messages = body.get("messages") or []
        if not isinstance(messages, list) or not messages:
            return 400, _error("messages must be a non-empty list", "messages")
        if self.reject_max_tokens and "max_tokens" in body:
            return 400, _error("Unsupported parameter: 'max_tokens' is not supported with this model. Use 'max_completion_tokens' instead.", "max_tokens", "unsupported_parameter")
        wants_logprobs = bool(body.get("logprobs"))
        if wants_logprobs and self.logprobs_mode == "none":
            return 400, _error("logprobs are not supported by this server", "logprobs")
        top_k = int(body.get("top_logprobs") or 0)
        if top_k > self.max_logprobs:
            return 400, _error(f"top_logprobs must be at most {self.max_logprobs}", "top_logprobs")
        prompt = "\n".join(str(m.get("content", "")) for m in messages)
        # The default style through the one-argument call: tests replace chat_content with their own.
        content = chat_content(messages) if self.explainer_style == "continue" else chat_content(messages, self.explainer_style)
        if fault == "empty_content":
            content = ""
        if fault == "garbled":
            content = "1: yes\nI am not sure about the others."
        n = int(body.get("n") or 1)
        tokens = tokenize(content, split_digits=False)
        choices = []
        for index in range(n):
            choice: dict[str, Any] = {"index": index, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
            if wants_logprobs and fault != "no_logprobs":
                choice["logprobs"] = {"content": _chat_logprobs(tokens, top_k)}
            else:
                choice["logprobs"] = None
            choices.append(choice)
        usage = {"prompt_tokens": len(tokenize(prompt)), "completion_tokens": n * len(tokens)}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        return 200, {"id": "chatcmpl-fake", "object": "chat.completion", "created": int(time.time()), "model": body.get("model", self.model), "choices": choices, "usage": usage}

    def _completion(self, body: dict, fault: str | None) -> tuple[int, dict]:
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            return 400, _error("prompt must be a string", "prompt")
        echo = bool(body.get("echo"))
        k = body.get("logprobs")
        if k is not None and int(k) > self.max_logprobs:
            # vLLM's wording
            return 400, _error(f"Requested sample logprobs of {int(k)}, which is greater than max allowed: {self.max_logprobs}", "logprobs")
        if echo and k is not None and self.logprobs_mode == "openai":
            return 400, _error("Setting 'echo' and 'logprobs' at the same time is not supported for this model.", "logprobs")
        generated = "0"
        prompt_tokens = tokenize(prompt, self.split_digits)
        logprobs = None
        if k is not None and self.logprobs_mode != "none" and fault != "no_logprobs":
            if echo and self.logprobs_mode != "generated_only":
                logprobs = self._echo_logprobs(prompt, prompt_tokens, generated, int(k))
            else:
                top = _top(distribution(prompt, generated, self.split_digits), int(k), generated)
                logprobs = {"tokens": [generated], "token_logprobs": [top[generated]], "top_logprobs": [top], "text_offset": [len(prompt)]}
        text = (prompt + generated) if echo else generated
        if fault == "empty_content":
            text = ""
        choice = {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": "length"}
        usage = {"prompt_tokens": len(prompt_tokens) + (1 if self.bos else 0), "completion_tokens": 1}
        usage["total_tokens"] = usage["prompt_tokens"] + 1
        return 200, {"id": "cmpl-fake", "object": "text_completion", "created": int(time.time()), "model": body.get("model", self.model), "choices": [choice], "usage": usage}

    def _echo_logprobs(self, prompt: str, prompt_tokens: list[str], generated: str, k: int) -> dict:
        tokens = prompt_tokens + [generated]
        starts = []
        offset = 0
        for token in tokens:
            starts.append(offset)
            offset += len(token)
        # dists[i]: the distribution from which token i was drawn (None for the first token).
        dists: list[dict[str, float] | None] = [None]
        for i in range(1, len(tokens)):
            dists.append(distribution(prompt[: starts[i]] if i < len(prompt_tokens) else prompt, tokens[i], self.split_digits))
        out_tokens, out_lp, out_top, out_offset = [], [], [], []
        if self.bos is not None:
            out_tokens.append(self.bos)
            out_lp.append(None)
            out_top.append(None)
            # The first real token is predicted from the BOS alone: context "".
            dists[0] = distribution("", tokens[0], self.split_digits)
        for i, token in enumerate(tokens):
            if self.logprobs_mode == "shifted":
                # llama-cpp-python: entry i carries the distribution of position i + 1, with the
                # echoed token's logprob read from that (wrong) distribution.
                after = distribution(prompt[: starts[i] + len(token)], tokens[i + 1] if i + 1 < len(tokens) else None, self.split_digits)
                lp = after.get(token, math.log(0.01))
                top = _top(after, k, None)
                top[token] = lp
                out_tokens.append(token)
                out_lp.append(lp)
                out_top.append(top)
                continue
            dist = dists[i]
            if dist is None:
                out_tokens.append(token)
                out_lp.append(None)
                out_top.append(None)
            else:
                top = _top(dist, k, token)
                out_tokens.append(token)
                out_lp.append(top[token])
                out_top.append(top)
        running = 0
        for token in out_tokens:  # vLLM: cumulative lengths of the decoded tokens, BOS included
            out_offset.append(running)
            running += len(token)
        return {"tokens": out_tokens, "token_logprobs": out_lp, "top_logprobs": out_top, "text_offset": out_offset}


def _top(dist: dict[str, float], k: int, actual: str | None) -> dict[str, float]:
    """The k most likely entries, plus the actual token (vLLM always lists it)."""
    ranked = sorted(dist.items(), key=lambda kv: (-kv[1], kv[0]))[:k]
    top = dict(ranked)
    if actual is not None:
        top[actual] = dist.get(actual, math.log(0.01))
    return top


def _chat_logprobs(tokens: list[str], k: int) -> list[dict]:
    entries = []
    after_tab = False
    for token in tokens:
        if after_tab and token.isdigit() and int(token) <= 10:
            alternatives = chat_value_logprobs(int(token))
        elif token.strip() in ("yes", "no"):
            alternatives = judgement_logprobs(token)
        else:
            alternatives = {token: math.log(0.9), "?": math.log(0.05)}
        after_tab = token.endswith("\t")
        ranked = sorted(alternatives.items(), key=lambda kv: -kv[1])[:k]
        entries.append(
            {
                "token": token,
                "logprob": alternatives[token],
                "bytes": list(token.encode()),
                "top_logprobs": [{"token": t, "logprob": lp, "bytes": list(t.encode())} for t, lp in ranked],
            }
        )
    return entries


JUDGED_LINE = re.compile(r"^(\d+): (.*)$")
_MARKED = re.compile(r"<<(.*?)>>")


def judgement_logprobs(token: str) -> dict[str, float]:
    """Top logprobs at a generated yes/no: 80% the answer given, 20% the other one."""
    other = token.replace("yes", "no") if "yes" in token else token.replace("no", "yes")
    return {token: math.log(0.8), other: math.log(0.2)}


def explanation_keys(explanation: str) -> set[str]:
    """What the fake judge looks for: the quoted tokens of an explanation, else its longer words."""
    quoted = re.findall(r'"([^"]+)"', explanation)
    words = quoted or re.findall(r"[A-Za-z]{4,}", explanation)
    return {w.strip().lower() for w in words if w.strip()}


def judgement(prompt: str) -> str:
    """The fake detection / fuzzing judge: "N: yes" when an excerpt (for fuzzing: a marked span)
    holds a word the explanation names, else "N: no"."""
    explanation = re.findall(r"Explanation: the neuron fires on (.*)", prompt)[-1]
    keys = explanation_keys(explanation)
    listing = prompt.rsplit("Excerpts:\n", 1)[1]
    lines = []
    for line in listing.splitlines():
        match = JUDGED_LINE.match(line)
        if not match:
            continue
        marked = _MARKED.findall(match.group(2))
        text = " ".join(marked) if marked else match.group(2)
        words = {w.lower() for w in re.findall(r"[A-Za-z0-9']+", text)}
        lines.append(f"{match.group(1)}: {'yes' if words & keys else 'no'}")
    return "\n".join(lines)


def chat_content(messages: list[dict], explainer_style: str = "continue") -> str:
    """What the fake assistant answers: simulator prompts get "token<TAB>value" lines, detection
    and fuzzing prompts (also when re-asked) a yes/no line per excerpt, anything else an explanation
    naming the highest-valued token of the last excerpt listing, worded as ``explainer_style`` says
    (:data:`EXPLAINER_STYLES`)."""
    users = [str(m.get("content", "")) for m in messages if m.get("role") == "user"]
    judged = [u for u in users if "Explanation: the neuron fires on" in u and "\nExcerpts:\n" in u]
    if judged:
        return judgement(judged[-1])
    last = users[-1] if users else ""
    if "Rewrite the" in last and "<start>\n" in last:
        if explainer_style == "simulator_garbage":
            return "I think this neuron is about words."
        listing = last.rsplit("<start>\n", 1)[1].split("\n<end>", 1)[0]
        explanations = re.findall(r"Explanation: (.*)", last)
        explanation = explanations[-1] if explanations else ""
        lines = [f"{token}\t{fake_value(token, explanation)}" for token in listing.split("\n")]
        return "<start>\n" + "\n".join(lines) + "\n<end>"
    best, best_value = None, -1
    for line in last.splitlines():
        token, tab, value = line.rpartition("\t")
        if tab and value.strip().isdigit() and int(value) > best_value:
            best, best_value = token, int(value)
    # explainer_v2 marks tokens in running text and lists the strongest first: 'Strongest tokens: "cup" (10), ...'
    strongest = re.findall(r'^Strongest tokens: "((?:[^"\\]|\\.)*)" \((\d+)', last, flags=re.M)
    if best is None and strongest:
        best, best_value = strongest[-1][0], int(strongest[-1][1])
    # An output-aware prompt (explainer_outputs_v1) also lists the tokens the neuron promotes.
    promoted = re.findall(r'^Promotes: "((?:[^"\\]|\\.)*)"', last, flags=re.M)
    promotes = f', and it makes the model say "{promoted[-1].strip()}"' if promoted else ""
    if best is None:
        return f" things mentioned in the prompt{promotes}."
    phrase = f'the word "{best.strip()}" and words like it{promotes}.'
    if explainer_style == "sentence":
        return f"This neuron responds to {phrase}"
    if explainer_style == "echo":  # repeats the prompt's own sentence opening
        opening = "The main thing this neuron does is find" if "The main thing this neuron does is find" in last else "The main thing neuron C does is find"
        return f"{opening} {phrase}"
    if explainer_style == "garbage":
        return f"<start>\n{best.strip()}\t{best_value}\n<end>"
    return f" {phrase}"


def _multipart(content_type: str, data: bytes) -> dict[str, Any]:
    """A multipart/form-data body as {field: text} with files as {field: (filename, bytes)}."""
    import email.parser
    import email.policy

    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + data
    )
    form: dict[str, Any] = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        payload = part.get_payload(decode=True) or b""
        filename = part.get_filename()
        form[name] = (filename, payload) if filename else payload.decode()
    return form


def _error(message: str, param: str | None = None, code: str | None = None, kind: str = "invalid_request_error") -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _check_fault(fault: str) -> None:
    name, _, arg = fault.partition(":")
    known = {f.partition(":")[0] for f in FAULTS} | {"ok"}
    if name not in known:
        raise ValueError(f"unknown fault {fault!r}: one of {sorted(FAULTS)}")
    if arg:
        float(arg)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # a benchmark opens 64+ connections at once

    def handle_error(self, request, client_address) -> None:  # noqa: D401 - quiet: faults are on purpose
        pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like real servers
    disable_nagle_algorithm = True  # answers go out at once: no Nagle delay behind the delayed ACK of the headers
    fake: FakeOpenAIServer

    def log_message(self, format, *args) -> None:  # noqa: A002 - quiet
        pass

    def do_GET(self) -> None:
        fake = self.fake
        with fake._lock:
            fake.gets.append(self.path)
        path = self.path.split("?")[0].rstrip("/")
        if path.endswith("/models"):
            self._send(200, {"object": "list", "data": [{"id": self.fake.model, "object": "model", "owned_by": "fake"}]})
        elif match := re.search(r"/files/([^/]+)/content$", path):
            stored = fake.files.get(match[1])
            if stored is None:
                return self._send(404, _error(f"no file {match[1]}"))
            self._send_raw(200, stored["data"], content_type="application/octet-stream")
        elif match := re.search(r"/batches/([^/]+)$", path):
            batch = fake._poll_batch(match[1])
            if batch is None:
                return self._send(404, _error(f"no batch {match[1]}"))
            self._send(200, batch)
        else:
            self._send(404, _error(f"no route {self.path}"))

    def do_POST(self) -> None:
        fake = self.fake
        length = int(self.headers.get("Content-Length") or 0)
        data = self.rfile.read(length)
        raw = data.decode("utf-8", "replace")
        try:
            body: Any = json.loads(raw)
        except ValueError:
            body = raw
        if self.path.rstrip("/").endswith("/files") and "multipart/form-data" in (self.headers.get("Content-Type") or ""):
            body = _multipart(self.headers["Content-Type"], data)
        record = RecordedRequest("POST", self.path, {k.lower(): v for k, v in self.headers.items()}, body, time.monotonic())
        with fake._lock:
            fake.requests.append(record)
            fake.in_flight += 1
            fake.max_in_flight = max(fake.max_in_flight, fake.in_flight)
        try:
            fault = fake._next_fault()
            record.fault = fault
            if fake.latency_s and fake._stop.wait(fake.latency_s):
                return
            record.status = self._answer(body, fault)
        finally:
            record.t_end = time.monotonic()
            with fake._lock:
                fake.in_flight -= 1

    def _answer(self, body: Any, fault: str | None) -> int:
        fake = self.fake
        name, _, arg = (fault or "").partition(":")
        received = self.headers.get("Authorization") or ""
        if fake.require_api_key is not None and received != f"Bearer {fake.require_api_key}":
            # Echoes the key it got (OpenAI masks most of it): a test that the client scrubs it.
            key = received.removeprefix("Bearer ")
            return self._send(401, _error(f"Incorrect API key provided: {key}.", code="invalid_api_key"))
        if name == "slow":
            if fake._stop.wait(float(arg or 5.0)):
                return 0
        elif name == "reset":
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.close_connection = True
            self.connection.close()
            return 0
        elif name == "429":
            headers = {"Retry-After": arg} if arg else {}
            return self._send(429, _error("Rate limit reached, please try again later.", code="rate_limit_exceeded", kind="requests"), headers)
        elif name == "429date":
            when = email.utils.formatdate(time.time() + float(arg or 1.0), usegmt=True)
            return self._send(429, _error("Rate limit reached.", code="rate_limit_exceeded", kind="requests"), {"Retry-After": when})
        elif name == "quota":
            return self._send(429, _error("You exceeded your current quota.", code="insufficient_quota", kind="insufficient_quota"))
        elif name in ("500", "503"):
            return self._send(int(name), _error("The server had an error while processing your request.", kind="server_error"))
        elif name == "400":
            return self._send(400, _error("Invalid request (scripted).", "messages"))
        if not isinstance(body, dict):
            return self._send(400, _error("body is not JSON"))
        if self.path.rstrip("/").endswith("/files"):
            return self._send(*fake._upload(body))
        if self.path.rstrip("/").endswith("/batches"):
            return self._send(*fake._create_batch(body))
        if self.path.rstrip("/").endswith("/chat/completions"):
            status, payload = fake._chat(body, name or None)
        elif self.path.rstrip("/").endswith("/completions"):
            status, payload = fake._completion(body, name or None)
        else:
            return self._send(404, _error(f"no route {self.path}"))
        if status == 200 and name == "truncated":
            text = json.dumps(payload)
            return self._send_raw(200, text[: len(text) // 2].encode())
        if status == 200 and name == "missing_choices":
            payload.pop("choices")
        if status == 200 and name == "no_choices":
            payload["choices"] = []
        return self._send(status, payload)

    def _send(self, status: int, payload: dict, headers: dict[str, str] | None = None) -> int:
        return self._send_raw(status, json.dumps(payload).encode(), headers)

    def _send_raw(self, status: int, data: bytes, headers: dict[str, str] | None = None, content_type: str = "application/json") -> int:
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(data)
            self.wfile.flush()
        except OSError:  # the client gave up (timeout) or the server is stopping
            self.close_connection = True
        return status


@contextlib.contextmanager
def redirecting_server(status: int = 302) -> Iterator[tuple[str, list[tuple[str, str, str | None]]]]:
    """A server on 127.0.0.1 that answers every GET and POST with ``status`` and a ``Location`` on
    itself, recording (method, path, Authorization) of what reaches it: a client that follows the
    redirect shows up twice. Yields (its ``/v1`` base URL, the records)."""
    seen: list[tuple[str, str, str | None]] = []

    class Redirecting(BaseHTTPRequestHandler):
        def _redirect(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            seen.append((self.command, self.path, self.headers.get("Authorization")))
            self.send_response(status)
            self.send_header("Location", f"http://127.0.0.1:{server.server_address[1]}/collect")
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_GET = do_POST = _redirect

        def log_message(self, format, *args) -> None:  # noqa: A002 - quiet
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Redirecting)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1", seen
    finally:
        server.shutdown()
        server.server_close()
