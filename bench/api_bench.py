"""Section 4: OpenAI-protocol throughput against a fixed-latency local server, and explainer
prompt size per neuron."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from bench.common import REPO, Section, median


def _cpu_seconds(pid: int | None = None) -> float:
    """User + system CPU seconds of this process (all threads) or of another one."""
    if pid is None:
        import resource

        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime
    import psutil

    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


class ServerProcess:
    def __init__(self, latency_s: float, minimal: bool = False):
        env = dict(os.environ)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.fake_server", str(latency_s), "minimal" if minimal else "project"],
            cwd=REPO,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        line = self.proc.stdout.readline().strip()
        if not line.startswith("URL "):
            self.close()
            raise RuntimeError(f"fake server did not start: {line!r} {self.proc.stderr.read()[-500:]}")
        _, self.url, self.implementation = line.split(" ", 2)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
                self.proc.wait(timeout=10)
            except Exception:  # noqa: BLE001
                self.proc.kill()
                self.proc.wait()


def explainer_requests(n: int):
    """n explainer requests like the pipeline sends (5 excerpts of 64 tokens each)."""
    from neuron_pipeline.interp.explainer import LLMExplainer
    from neuron_pipeline.interp.records import ActivationRecord

    class _Named:
        model_name = "fake-model"

    rng = np.random.default_rng(0)
    words = [" the", " of", " Elizabeth", " Darcy", " and", " to", ",", " said", " her", " was", " it", "."]
    explainer = LLMExplainer(_Named())
    requests = []
    for i in range(n):
        records = [
            ActivationRecord(
                tuple(words[j] for j in rng.integers(0, len(words), 64)),
                tuple(float(v) for v in np.maximum(rng.normal(0, 1, 64), 0)),
            )
            for _ in range(5)
        ]
        requests.append(explainer.request(records))
    return requests


def _http_module():
    try:  # openai 3.x ships its own fork of httpx
        import httpx2 as http
    except ImportError:
        import httpx as http
    return http


def _raw_openai(url: str, requests, concurrency: int, post: bool = False) -> float:
    """Plain ``openai.AsyncOpenAI`` + a semaphore: the floor any wrapper is compared with.

    ``post``: the prototype fix: ``client.post("/chat/completions", body=..., cast_to=Response)``
    sends the same JSON but skips the package's per-request params transform (a recursive walk
    over the TypedDicts of every message), about half of the client's CPU time per request."""
    import json

    import openai

    http = _http_module()

    async def main():
        client = openai.AsyncOpenAI(api_key="sk-bench", base_url=url, max_retries=0, timeout=60)
        semaphore = asyncio.Semaphore(concurrency)

        async def one(request):
            body = {
                "model": "fake-model",
                "messages": [{"role": r, "content": c} for r, c in request.messages],
                "max_tokens": request.max_tokens,
                "temperature": request.temperature,
            }
            async with semaphore:
                if post:
                    response = await client.post("/chat/completions", body=body, cast_to=http.Response)
                    return json.loads(response.content)
                return await client.chat.completions.create(**body)

        await asyncio.gather(*(one(r) for r in requests[:concurrency]))  # warm the connection pool
        start = time.perf_counter()
        await asyncio.gather(*(one(r) for r in requests))
        elapsed = time.perf_counter() - start
        await client.close()
        return elapsed

    return asyncio.run(main())


def run_api(section: Section, concurrency: int, latency_s: float, n_requests: int, reps: int) -> None:
    ideal = concurrency / latency_s
    requests = explainer_requests(n_requests)
    server = ServerProcess(latency_s)
    try:
        client = None
        client_error = None
        try:
            from neuron_pipeline.llm.openai_api import OpenAICompatible

            client = OpenAICompatible("fake-model", base_url=server.url, concurrency=concurrency, max_retries=0, timeout_s=60)
            warm = client.chat_many(requests[:concurrency])
            failed = [r for r in warm if isinstance(r, Exception)]
            if failed:
                raise RuntimeError(f"{len(failed)} warm-up requests failed: {failed[0]}")
        except Exception as exc:  # noqa: BLE001 - the teammate's client may not exist yet
            client_error = f"{type(exc).__name__}: {exc}"
            client = None
        rates = {"project": [], "raw": [], "post": []}
        cpu = {"project": [], "raw": [], "post": [], "server": []}
        for rep in range(reps):
            order = ["project", "raw", "post"][rep % 3 :] + ["project", "raw", "post"][: rep % 3]
            for name in order:
                if name == "project" and client is None:
                    continue
                client_cpu, server_cpu = _cpu_seconds(), _cpu_seconds(server.proc.pid)
                if name == "project" and client is not None:
                    start = time.perf_counter()
                    results = client.chat_many(requests)
                    elapsed = time.perf_counter() - start
                    errors = sum(isinstance(r, Exception) for r in results)
                    if errors:
                        raise RuntimeError(f"{errors} of {len(results)} requests failed")
                    rates["project"].append(len(requests) / elapsed)
                elif name == "raw":
                    rates["raw"].append(len(requests) / _raw_openai(server.url, requests, concurrency))
                elif name == "post":
                    rates["post"].append(len(requests) / _raw_openai(server.url, requests, concurrency, post=True))
                # Per request: the warm-up batch of the plain clients is counted too (concurrency more requests).
                sent = len(requests) + (0 if name == "project" else concurrency)
                cpu[name].append((_cpu_seconds() - client_cpu) / sent)
                cpu["server"].append((_cpu_seconds(server.proc.pid) - server_cpu) / sent)
        if client is not None:
            client.close()
    finally:
        server.close()
    section.data.update(rates=rates, ideal=ideal, server=server.implementation, cpu=cpu)
    cpu_rows = ["| client | requests/s | % of ideal | client CPU per request | one core's cap (1 / CPU per request) |", "|---|---:|---:|---:|---:|"]
    labels = {"project": "project `OpenAICompatible.chat_many`", "raw": "plain `AsyncOpenAI.chat.completions.create`", "post": "prototype: `AsyncOpenAI.post`, no params transform"}
    for name, label in labels.items():
        if rates[name]:
            per = median(cpu[name])
            cpu_rows.append(
                f"| {label} | {median(rates[name]):.0f} | {median(rates[name]) / ideal:.0%} | {per * 1000:.2f} ms | {1 / per:,.0f}/s |"
            )
    cpu_rows.append(f"| (server: {server.implementation}) | | | {median(cpu['server']) * 1000:.2f} ms | {1 / median(cpu['server']):,.0f}/s |")
    section.tables.append("\n".join(cpu_rows))
    if rates["project"]:
        achieved = median(rates["project"])
        section.add(
            f"requests/s, project client `OpenAICompatible.chat_many` (concurrency {concurrency})",
            f"{achieved:.0f}/s = **{achieved / ideal:.0%} of ideal** ({ideal:.0f}/s = {concurrency} / {latency_s:.1f} s)",
            ">= 90% of ideal",
            achieved / ideal >= 0.9,
        )
    else:
        section.add("requests/s, project client", "not measured", note=f"client unavailable: {client_error}")
    raw = median(rates["raw"])
    section.add(
        f"requests/s, plain `openai.AsyncOpenAI` + semaphore (concurrency {concurrency})",
        f"{raw:.0f}/s = {raw / ideal:.0%} of ideal",
        "reference",
    )
    post = median(rates["post"])
    section.add(
        "requests/s, prototype fix: `AsyncOpenAI.post` with the same JSON, no params transform",
        f"{post:.0f}/s = **{post / ideal:.0%} of ideal** ({post / raw:.1f}x the plain client)",
        ">= 90% of ideal",
        post / ideal >= 0.9,
        note="bench prototype, not project code",
    )
    section.notes.append(
        f"Server: {server.implementation} with a fixed {latency_s * 1000:.0f} ms latency, in its own process; "
        f"{n_requests} explainer-sized chat requests per repetition, {reps} repetitions rotating the three clients; "
        "medians. Client and server are Python processes sharing 2 cores with everything else on the machine: at "
        "320 requests/s a client needs under 3.1 ms of CPU per request on a free core, and the server's CPU per "
        "request comes on top. The table's last column is what one idle core could sustain."
    )


def prompt_tokens(section: Section, sequences: int = 200, n_neurons: int = 24) -> None:
    """Explainer prompt tokens per neuron for real neurons: SmolLM2 layer 0 captured over the real
    corpus, the 5 explain-split top excerpts of each neuron, the chat template applied, counted with
    the SmolLM2 tokenizer (what the local backend reports as prompt tokens)."""
    import torch

    from neuron_pipeline.config import CorpusSettings, RecordsSettings, SubjectSettings
    from neuron_pipeline.corpus import token_strings, tokenize_corpus
    from neuron_pipeline.interp.explainer import LLMExplainer
    from neuron_pipeline.interp.records import ActivationRecord, NeuronId, NeuronRecord, split_records
    from neuron_pipeline.subject import capture_layers, load_subject

    subject = load_subject(SubjectSettings(device="cpu"))
    tokenizer = subject.tokenizer
    ids = tokenize_corpus(CorpusSettings(max_sequences=sequences), tokenizer).token_ids
    records = RecordsSettings()
    with torch.inference_mode():
        capture = capture_layers(subject, ids, [0], list(range(n_neurons)), records, batch_size=32)[0]
    strings = token_strings(tokenizer, ids)

    class _Named:
        model_name = "smollm2-135m-instruct"

    explainer = LLMExplainer(_Named())
    top = capture.samples["top"]
    counts = []
    for j in range(n_neurons):
        excerpts = [
            ActivationRecord(tuple(strings[int(sid)]), tuple(float(a) for a in top["activations"][rank, :, j]), int(sid))
            for rank, sid in enumerate(top["sequence_id"][:, j])
            if sid >= 0
        ]
        splits = split_records(NeuronRecord(NeuronId(0, j), top=excerpts), records.explain_top, records.score_top, records.score_random)
        request = explainer.request(splits.explain)
        prefill = request.messages[-1][0] == "assistant"
        encoded = tokenizer.apply_chat_template(
            [{"role": r, "content": c} for r, c in request.messages],
            continue_final_message=prefill,
            add_generation_prompt=not prefill,
            tokenize=True,
        )
        if hasattr(encoded, "keys"):
            encoded = encoded["input_ids"]
        counts.append(len(encoded))
    paper = 2400
    med = float(np.median(counts))
    section.data["prompt_tokens"] = counts
    section.add(
        "explainer prompt tokens per neuron (SmolLM2 tokenizer, chat template applied)",
        f"median {med:,.0f} (min {min(counts):,}, max {max(counts):,}) vs paper ~{paper:,} = {med / paper:.0%}",
        note=f"{n_neurons} real neurons (SmolLM2 layer 0 over {sequences} corpus sequences), 5 top excerpts x 64 tokens each",
    )
    section.add(
        "explainer completion tokens per neuron",
        f"at most {explainer.max_tokens} (`max_tokens`); measured median in section 6 (local SmolLM2)",
    )
    section.notes.append(
        "GPT-2's tokenizer is not available offline, so tokens are counted with the SmolLM2 tokenizer (a 49k BPE, "
        "close to GPT-2's 50k; it splits numbers into digits, so a value of 10 is two tokens). The prompt is two worked "
        "examples plus the neuron's 5 excerpts as token<TAB>value lines (and the non-zero repeat for sparse neurons)."
    )
