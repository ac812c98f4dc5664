"""A persistent, content-addressed cache of LLM calls.

Every response is stored under sha256(model, kind, request) the moment it arrives, in SQLite
(WAL, safe for several processes). A re-run after a crash or a config change pays only for
requests it has never made; a result already paid for is never lost. Requests hold no secrets
(API keys live in the environment), so neither do cache files.

"The moment it arrives": with a backend that hands out one future per request
(``submit_chat`` / ``submit_value_distributions``, as the OpenAI-compatible backend does) each
answer is committed as soon as its future resolves, while the rest of the batch is still in
flight, so a process killed mid-batch loses only the calls on the wire. Backends without them
(the local model, which computes a batch at once) are stored batch by batch.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from neuron_pipeline.interp.llm_protocol import (
    ChatRequest,
    ChatResponse,
    SlotDistributions,
    TokenLogprobs,
    chat_all,
)


class LLMCache:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, timeout=60)
        self._db.execute("PRAGMA journal_mode=WAL")
        # A commit is in the WAL file (the OS's page cache) when it returns, so a killed process
        # loses nothing committed; only an OS crash or power loss before the next checkpoint could.
        # FULL would fsync every answer: ~1.7 ms each, serialised under the lock, which capped an
        # API stage near 200 answers/s however many requests were allowed in flight (issue 12).
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS calls (key TEXT PRIMARY KEY, model TEXT, kind TEXT, response TEXT, created REAL)"
        )
        # Batch API jobs (neuron_pipeline.llm.batch): which batch holds which request, so a run
        # killed while a batch is pending picks it up again instead of paying for it twice.
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS batches (batch_id TEXT PRIMARY KEY, model TEXT, endpoint TEXT, "
            "input_file_id TEXT, status TEXT, requests INTEGER, created REAL)"
        )
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS batch_requests (custom_id TEXT, batch_id TEXT, state TEXT, created REAL, "
            "PRIMARY KEY (custom_id, batch_id))"
        )
        self._db.commit()
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(model: str, kind: str, payload) -> str:
        text = json.dumps([model, kind, payload], sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()

    def get(self, key: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT response FROM calls WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def put(self, key: str, model: str, kind: str, response: str) -> None:
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO calls VALUES (?, ?, ?, ?, ?)", (key, model, kind, response, time.time())
            )
            self._db.commit()

    # --- Batch API bookkeeping ------------------------------------------------------------------

    def record_batch(self, batch_id: str, model: str, endpoint: str, input_file_id: str, custom_ids: Sequence[str]) -> None:
        """A submitted batch and the requests it holds (state ``pending``), in one transaction."""
        now = time.time()
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO batches VALUES (?, ?, ?, ?, ?, ?, ?)",
                (batch_id, model, endpoint, input_file_id, "submitted", len(custom_ids), now),
            )
            self._db.executemany(
                "INSERT OR REPLACE INTO batch_requests VALUES (?, ?, 'pending', ?)", [(c, batch_id, now) for c in custom_ids]
            )
            self._db.commit()

    def batch_holding(self, custom_id: str) -> str | None:
        """The newest batch that holds this request and has not given it up (failed, expired)."""
        with self._lock:
            row = self._db.execute(
                "SELECT batch_id FROM batch_requests WHERE custom_id = ? AND state != 'failed' ORDER BY created DESC LIMIT 1",
                (custom_id,),
            ).fetchone()
        return row[0] if row else None

    def settle_batch(self, batch_id: str, status: str, failed: Sequence[str]) -> None:
        """A batch that ended: its status, and the requests it did not answer (asked again later)."""
        with self._lock:
            self._db.execute("UPDATE batches SET status = ? WHERE batch_id = ?", (status, batch_id))
            self._db.executemany(
                "UPDATE batch_requests SET state = 'failed' WHERE custom_id = ? AND batch_id = ?", [(c, batch_id) for c in failed]
            )
            self._db.execute("UPDATE batch_requests SET state = 'done' WHERE batch_id = ? AND state = 'pending'", (batch_id,))
            self._db.commit()

    def batches(self) -> list[dict]:
        """Every batch recorded, newest first (``neuron-pipeline`` reports and tests)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT batch_id, model, endpoint, input_file_id, status, requests, created FROM batches ORDER BY created DESC"
            ).fetchall()
        keys = ("batch_id", "model", "endpoint", "input_file_id", "status", "requests", "created")
        return [dict(zip(keys, row)) for row in rows]

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT count(*) FROM calls").fetchone()[0]

    def stats(self) -> dict[str, int]:
        return {"cache_hits": self.hits, "cache_misses": self.misses, "cache_entries": len(self)}


def _response_to_json(response: ChatResponse) -> str:
    # The same JSON as dataclasses.asdict, written out by hand: asdict deep-copies every logprob
    # dict, 1.5 ms for one top_logprobs simulation answer (265 tokens), more than parsing it.
    return json.dumps(
        {
            "texts": list(response.texts),
            "prompt_tokens": response.prompt_tokens,
            "completion_tokens": response.completion_tokens,
            "logprobs": [[{"token": s.token, "logprob": s.logprob, "top": s.top} for s in steps] for steps in response.logprobs],
        }
    )


def _response_from_json(text: str) -> ChatResponse:
    data = json.loads(text)
    logprobs = tuple(tuple(TokenLogprobs(**step) for step in completion) for completion in data["logprobs"])
    return ChatResponse(tuple(data["texts"]), data["prompt_tokens"], data["completion_tokens"], logprobs)


class CachedChatModel:
    """A ChatModel whose calls go through the cache; only misses reach the backend.

    ``new_prompt_tokens`` / ``new_completion_tokens`` count what this process actually paid."""

    def __init__(self, model, cache: LLMCache):
        self.model = model
        self.cache = cache
        self.model_name = model.model_name
        self.new_prompt_tokens = 0
        self.new_completion_tokens = 0

    def _key(self, request: ChatRequest) -> str:
        return self.cache.key(self.model_name, "chat", dataclasses.asdict(request))

    def chat(self, request: ChatRequest) -> ChatResponse:
        result = self.chat_many([request])[0]
        if isinstance(result, Exception):
            raise result
        return result

    def chat_many(self, requests: Sequence[ChatRequest]) -> list[ChatResponse | Exception]:
        keys = [self._key(r) for r in requests]
        results: list[ChatResponse | Exception | None] = []
        missing = []
        for i, key in enumerate(keys):
            hit = self.cache.get(key)
            if hit is not None:
                self.cache.hits += 1
                results.append(_response_from_json(hit))
            else:
                self.cache.misses += 1
                results.append(None)
                missing.append(i)
        if missing:

            def store(i: int, response: ChatResponse | Exception) -> None:
                results[i] = response
                if not isinstance(response, Exception):
                    self.new_prompt_tokens += response.prompt_tokens
                    self.new_completion_tokens += response.completion_tokens
                    # From a server, an answer without any text (no choices, an empty completion) is
                    # a glitch, not the model's answer: kept out of the cache so a re-run asks again.
                    glitch = getattr(self.model, "empty_answers_are_glitches", False)
                    if not glitch or any(text.strip() for text in response.texts):
                        self.cache.put(keys[i], self.model_name, "chat", _response_to_json(response))

            submit = getattr(self.model, "submit_chat", None)
            if submit is not None:
                _as_they_arrive(submit([requests[i] for i in missing]), missing, store)
            else:
                for i, response in zip(missing, chat_all(self.model, [requests[i] for i in missing])):
                    store(i, response)
        return results  # type: ignore[return-value]


class CachedValueModel:
    """A ValueDistributionModel cached per excerpt: a batch sends only the excerpts not seen before."""

    def __init__(self, model, cache: LLMCache):
        self.model = model
        self.cache = cache
        self.model_name = model.model_name
        self.new_prompt_tokens = 0

    def _lookup(self, keys: Sequence[str]) -> tuple[list[SlotDistributions | None], list[int]]:
        """Cached answers (None where missing) and the indices still to compute."""
        results: list[SlotDistributions | None] = []
        missing = []
        for i, key in enumerate(keys):
            hit = self.cache.get(key)
            if hit is not None:
                self.cache.hits += 1
                data = json.loads(hit)
                mass = data.get("value_mass")  # absent from answers cached before it was recorded
                results.append(
                    SlotDistributions(
                        np.asarray(data["probabilities"], dtype=np.float64),
                        data["prompt_tokens"],
                        None if mass is None else np.asarray(mass, dtype=np.float64),
                    )
                )
            else:
                self.cache.misses += 1
                results.append(None)
                missing.append(i)
        return results, missing

    def _keep(self, key: str, kind: str, distribution: SlotDistributions) -> None:
        self.new_prompt_tokens += distribution.prompt_tokens
        payload = {"probabilities": distribution.probabilities.tolist(), "prompt_tokens": distribution.prompt_tokens}
        if distribution.value_mass is not None:
            payload["value_mass"] = np.asarray(distribution.value_mass).tolist()
        self.cache.put(key, self.model_name, kind, json.dumps(payload))

    def value_distributions(self, prefix: str, suffixes: Sequence[str], slots: Sequence[Sequence[int]]) -> list[SlotDistributions]:
        keys = [
            self.cache.key(self.model_name, "value_distributions", [prefix, suffix, list(s)])
            for suffix, s in zip(suffixes, slots)
        ]
        results, missing = self._lookup(keys)
        if missing:
            failures: list[Exception] = []

            def store(i: int, distribution: SlotDistributions | Exception) -> None:
                if isinstance(distribution, Exception):
                    failures.append(distribution)
                    return
                results[i] = distribution
                self._keep(keys[i], "value_distributions", distribution)

            submit = getattr(self.model, "submit_value_distributions", None)
            if submit is not None:
                # Every excerpt answered is kept even when another one of the batch fails.
                futures = submit(prefix, [suffixes[i] for i in missing], [slots[i] for i in missing])
                _as_they_arrive(futures, missing, store)
                if failures:
                    raise failures[0]
            else:
                fresh = self.model.value_distributions(prefix, [suffixes[i] for i in missing], [slots[i] for i in missing])
                for i, distribution in zip(missing, fresh):
                    store(i, distribution)
        return results  # type: ignore[return-value]

    def question_distributions(
        self, prefix: str, contexts: Sequence[str], questions: Sequence[Sequence[str]]
    ) -> list[SlotDistributions]:
        """The per-token simulator's calls, cached per excerpt like ``value_distributions``."""
        keys = [
            self.cache.key(self.model_name, "question_distributions", [prefix, context, list(q)])
            for context, q in zip(contexts, questions)
        ]
        results, missing = self._lookup(keys)
        if missing:
            fresh = self.model.question_distributions(prefix, [contexts[i] for i in missing], [questions[i] for i in missing])
            for i, distribution in zip(missing, fresh):
                results[i] = distribution
                self._keep(keys[i], "question_distributions", distribution)
        return results  # type: ignore[return-value]


def _as_they_arrive(futures: Sequence[concurrent.futures.Future], indices: Sequence[int], store) -> None:
    """Call ``store(index, result or exception)`` for each future as soon as it resolves."""
    where = {future: index for future, index in zip(futures, indices)}
    try:
        for future in concurrent.futures.as_completed(where):
            try:
                result = future.result()
            except Exception as exc:  # noqa: BLE001 - reported per request
                result = exc
            store(where[future], result)
    except BaseException:
        for future in futures:
            future.cancel()
        raise
