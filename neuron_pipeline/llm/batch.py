"""OpenAI's Batch API behind the chat interface: half the price, answers within 24 hours.

``BatchChatModel`` wraps an ``OpenAICompatible`` client and offers the same ``chat`` /
``chat_many`` / ``submit_chat``, so the explainer and the chat simulators use it unchanged
(``batch: true`` in their settings). Requests are not sent one by one: every request submitted
within ``collect_s`` of the last one (from any thread: the stages keep many neurons in progress
at once) goes into one batch, up to ``max_requests``:

1. the chat bodies are written as JSONL, one line per request with a ``custom_id`` that is the
   hash of its body (identical requests are sent once);
2. the file is uploaded (``POST /v1/files``, purpose ``batch``) and the batch created
   (``POST /v1/batches``, ``/v1/chat/completions``, window ``24h``), both through the SDK;
3. the batch id and its requests' custom ids are written to the LLM cache's SQLite
   (``LLMCache.record_batch``) *before* anything waits on it;
4. the batch is polled (``GET /v1/batches/{id}``) every ``poll_s`` until it ends; its output
   and error files are read and every answer is matched back to its request by ``custom_id``.

A run killed while a batch is pending loses nothing and pays nothing twice: the next run finds
each request's batch in the cache (``LLMCache.batch_holding``) and polls that batch instead of
submitting the request again. Requests a batch did not answer (a failed line, an expired
window, a failed batch) come back as ``LLMRequestError`` (kinds ``batch_failed`` /
``batch_expired``, counted in the client's ``faults``); the neuron's error is recorded as with
any failed call, and the next run sends them in a new batch. Tokens are accounted at half the
configured prices (the Batch API's discount).
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

from neuron_pipeline.interp.llm_protocol import ChatRequest, ChatResponse
from neuron_pipeline.llm.cache import LLMCache
from neuron_pipeline.llm.openai_api import LLMRequestError, OpenAICompatible, _collect

log = logging.getLogger(__name__)

# What the Batch API charges, as a share of the online price.
BATCH_PRICE_FACTOR = 0.5
CHAT_ENDPOINT = "/v1/chat/completions"
# OpenAI's limits: 50,000 requests and 200 MB per input file.
MAX_BATCH_REQUESTS = 50_000
MAX_BATCH_BYTES = 190_000_000
TERMINAL = {"completed", "failed", "expired", "cancelled"}


def custom_id(body: dict[str, Any]) -> str:
    """A request's id inside a batch: the hash of its JSON body (the same body, the same id)."""
    return "np-" + hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:40]


@dataclass
class _Job:
    """One distinct request and everyone waiting for its answer."""

    custom_id: str
    body: dict[str, Any]
    want_logprobs: bool
    futures: list[concurrent.futures.Future] = field(default_factory=list)


class BatchChatModel:
    """A ``ChatModel`` on the Batch API (see the module docstring)."""

    # An answer with no text at all is a glitch (the cache does not keep it; a re-run asks again).
    empty_answers_are_glitches = True

    def __init__(
        self,
        client: OpenAICompatible,
        store: LLMCache | None = None,
        poll_s: float = 30.0,
        collect_s: float = 1.0,
        max_requests: int = MAX_BATCH_REQUESTS,
    ):
        self.model = client
        self.model_name = client.model_name
        self.store = store if store is not None else LLMCache(":memory:")
        self.poll_s = poll_s
        self.collect_s = collect_s
        self.max_requests = max(1, min(MAX_BATCH_REQUESTS, max_requests))
        self._lock = threading.Lock()
        self._queue: dict[str, _Job] = {}  # waiting to be put in a batch
        self._watched: dict[str, dict[str, _Job]] = {}  # batch id -> its jobs being waited for
        self._settled: dict[str, dict[str, Any]] = {}  # batch id -> its lines, once it ended
        self._last_added = 0.0
        self._dispatcher: threading.Thread | None = None

    def __repr__(self) -> str:
        return f"BatchChatModel({self.model!r})"

    # --- the chat interface ----------------------------------------------------------------------

    def chat(self, request: ChatRequest) -> ChatResponse:
        result = self.chat_many([request])[0]
        if isinstance(result, Exception):
            raise result
        return result

    def chat_many(self, requests: Sequence[ChatRequest]) -> list[ChatResponse | Exception]:
        return _collect(self.submit_chat(requests))

    def submit_chat(self, requests: Sequence[ChatRequest]) -> list[concurrent.futures.Future]:
        """One future per request, resolved when the batch holding it ends. A request already in
        a pending (or finished) batch recorded in the store joins that batch: nothing is paid twice."""
        futures = []
        resume: dict[str, list[_Job]] = {}
        with self._lock:
            for request in requests:
                params, want_logprobs = self.model.chat_params(request)
                body = {**params, **self.model.extra_body}
                cid = custom_id(body)
                future: concurrent.futures.Future = concurrent.futures.Future()
                futures.append(future)
                job = self._queue.get(cid) or next((jobs[cid] for jobs in self._watched.values() if cid in jobs), None)
                if job is not None:
                    job.futures.append(future)
                    continue
                job = _Job(cid, body, want_logprobs, [future])
                batch_id = self.store.batch_holding(cid)
                if batch_id is None:
                    self._queue[cid] = job
                else:
                    resume.setdefault(batch_id, []).append(job)
            self._last_added = time.monotonic()
            if self._queue and (self._dispatcher is None or not self._dispatcher.is_alive()):
                self._dispatcher = threading.Thread(target=self._dispatch, daemon=True, name=f"batch-dispatch:{self.model_name}")
                self._dispatcher.start()
        for batch_id, jobs in resume.items():
            log.info("%s: resuming batch %s for %d request(s)", self.model_name, batch_id, len(jobs))
            self._watch(batch_id, jobs)
        return futures

    # --- submitting ----------------------------------------------------------------------------------

    def _dispatch(self) -> None:
        """Put the queue into batches: once ``collect_s`` passed without a new request, or when
        a batch is full. Ends when the queue is empty (``submit_chat`` starts a new one)."""
        while True:
            with self._lock:
                if not self._queue:
                    self._dispatcher = None
                    return
                quiet = time.monotonic() - self._last_added
                full = len(self._queue) >= self.max_requests
                if quiet >= self.collect_s or full:
                    cids = list(self._queue)[: self.max_requests]
                    jobs = [self._queue.pop(cid) for cid in cids]
                else:
                    jobs = None
            if jobs is None:
                time.sleep(min(0.05, max(0.0, self.collect_s - quiet)) or 0.01)
                continue
            for chunk in _by_size(jobs):
                try:
                    batch_id = self._submit_batch(chunk)
                except Exception as exc:  # noqa: BLE001 - every request of the chunk gets the error
                    _fail(chunk, exc)
                    continue
                self._watch(batch_id, chunk)

    def _submit_batch(self, jobs: list[_Job]) -> str:
        lines = [
            json.dumps({"custom_id": job.custom_id, "method": "POST", "url": CHAT_ENDPOINT, "body": job.body})
            for job in jobs
        ]
        data = ("\n".join(lines) + "\n").encode()
        sdk = self.model.sdk

        async def submit():
            upload = await sdk.files.create(file=("requests.jsonl", data, "application/jsonl"), purpose="batch")
            batch = await sdk.batches.create(
                input_file_id=upload.id,
                endpoint=CHAT_ENDPOINT,
                completion_window="24h",
                metadata={"source": "neuron-pipeline", "model": self.model_name[:500]},
            )
            return upload.id, batch.id

        file_id, batch_id = self.model.run_async(submit())
        self.store.record_batch(batch_id, self.model_name, CHAT_ENDPOINT, file_id, [job.custom_id for job in jobs])
        log.info("%s: submitted batch %s with %d request(s)", self.model_name, batch_id, len(jobs))
        return batch_id

    # --- waiting ---------------------------------------------------------------------------------------

    def _watch(self, batch_id: str, jobs: list[_Job]) -> None:
        """Wait for ``batch_id`` on a thread of its own (one per batch), then answer ``jobs``."""
        with self._lock:
            settled = self._settled.get(batch_id)
            if settled is None:
                watched = self._watched.get(batch_id)
                start = watched is None
                watched = self._watched.setdefault(batch_id, {})
                for job in jobs:
                    if job.custom_id in watched:
                        watched[job.custom_id].futures.extend(job.futures)
                    else:
                        watched[job.custom_id] = job
        if settled is not None:
            self._answer(batch_id, settled, jobs)
        elif start:
            threading.Thread(target=self._poll, args=(batch_id,), daemon=True, name=f"batch-poll:{batch_id}").start()

    def _poll(self, batch_id: str) -> None:
        sdk = self.model.sdk
        try:
            while True:
                batch = self.model.run_async(sdk.batches.retrieve(batch_id))
                if batch.status in TERMINAL:
                    break
                time.sleep(self.poll_s)
            lines: dict[str, Any] = {"_status": batch.status}
            if batch.status == "failed":
                errors = getattr(batch.errors, "data", None) or []
                lines["_reason"] = "; ".join(str(getattr(e, "message", e)) for e in errors)[:300] or "the batch failed"
            for file_id in (batch.output_file_id, batch.error_file_id):
                if file_id:
                    content = self.model.run_async(_read_file(sdk, file_id))
                    for line in content.splitlines():
                        if line.strip():
                            entry = json.loads(line)
                            lines[entry.get("custom_id")] = entry
        except Exception as exc:  # noqa: BLE001 - polling failed for good: the batch stays recorded for the next run
            with self._lock:
                jobs = list(self._watched.pop(batch_id, {}).values())
            _fail(jobs, exc)
            return
        with self._lock:
            self._settled[batch_id] = lines
            jobs = list(self._watched.pop(batch_id, {}).values())
        self._answer(batch_id, lines, jobs, settle=True)

    def _answer(self, batch_id: str, lines: dict[str, Any], jobs: list[_Job], settle: bool = False) -> None:
        """Resolve each job from its line of the batch's output (or error) file."""
        status = lines.get("_status", "completed")
        results: list[ChatResponse | Exception] = []
        for job in jobs:
            try:
                results.append(self._read_line(batch_id, status, lines, job))
            except LLMRequestError as exc:
                results.append(exc)
        failed = [job.custom_id for job, result in zip(jobs, results) if isinstance(result, Exception)]
        # Recorded before anyone is answered: what failed is asked again by the next run.
        if settle or failed:
            self.store.settle_batch(batch_id, status, failed)
        for job, result in zip(jobs, results):
            for future in job.futures:
                if not future.done():
                    if isinstance(result, Exception):
                        future.set_exception(result)
                    else:
                        future.set_result(result)
        if settle:
            log.info("%s: batch %s %s; %d of %d request(s) not answered", self.model_name, batch_id, status, len(failed), len(jobs))

    def _read_line(self, batch_id: str, status: str, lines: dict[str, Any], job: _Job) -> ChatResponse:
        entry = lines.get(job.custom_id)
        response = entry.get("response") if isinstance(entry, dict) else None
        if isinstance(response, dict) and response.get("status_code") == 200:
            return self.model.read_chat(response.get("body"), job.body, job.want_logprobs, BATCH_PRICE_FACTOR)
        error = entry.get("error") if isinstance(entry, dict) else None
        if isinstance(response, dict) and response.get("status_code"):
            body = response.get("body")
            detail = body.get("error", body) if isinstance(body, dict) else body
            message = detail.get("message") if isinstance(detail, dict) else detail
            reason = f"HTTP {response['status_code']}" + (f": {str(message)[:200]}" if message else "")
            kind = "batch_failed"
        elif isinstance(error, dict):
            kind = "batch_expired" if error.get("code") == "batch_expired" or status == "expired" else "batch_failed"
            reason = f"{error.get('code') or 'error'}: {str(error.get('message') or '')[:200]}"
        else:
            kind = "batch_expired" if status == "expired" else "batch_failed"
            reason = lines.get("_reason") or f"no answer in the batch's files (batch {status})"
        self.model.faults[kind] += 1
        raise LLMRequestError(f"{kind} in batch {batch_id} of {self.model_name}: {self.model._scrub(reason)}", kind)


async def _read_file(sdk, file_id: str) -> str:
    content = await sdk.files.content(file_id)
    return content.content.decode("utf-8", "replace")


def _by_size(jobs: list[_Job]) -> list[list[_Job]]:
    """Jobs split so that no input file exceeds the Batch API's size limit."""
    chunks, chunk, size = [], [], 0
    for job in jobs:
        line = len(json.dumps(job.body)) + 200
        if chunk and size + line > MAX_BATCH_BYTES:
            chunks.append(chunk)
            chunk, size = [], 0
        chunk.append(job)
        size += line
    if chunk:
        chunks.append(chunk)
    return chunks


def _fail(jobs: list[_Job], exc: BaseException) -> None:
    for job in jobs:
        for future in job.futures:
            if not future.done():
                future.set_exception(exc)
