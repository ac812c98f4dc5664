"""Section 4: OpenAI-protocol throughput against a fixed-latency local server, and explainer
prompt size per neuron."""

from __future__ import annotations

import asyncio
import gc
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


def _raw_openai(url: str, requests, concurrency: int) -> float:
    """Plain ``openai.AsyncOpenAI`` + a semaphore: what a user would write, the reference the
    project client is compared with (no retries, no accounting). Seconds for ``requests``."""
    import openai

    async def main():
        client = openai.AsyncOpenAI(api_key="sk-bench", base_url=url, max_retries=0, timeout=60)
        semaphore = asyncio.Semaphore(concurrency)

        async def one(request):
            async with semaphore:
                return await client.chat.completions.create(
                    model="fake-model",
                    messages=[{"role": r, "content": c} for r, c in request.messages],
                    max_tokens=request.max_tokens,
                    temperature=request.temperature,
                )

        await asyncio.gather(*(one(r) for r in requests[:concurrency]))  # warm the connection pool
        start = time.perf_counter()
        await asyncio.gather(*(one(r) for r in requests))
        elapsed = time.perf_counter() - start
        await client.close()
        return elapsed

    return asyncio.run(main())


CLIENTS = {
    "project": "project `OpenAICompatible.chat_many` (openai SDK `post`, aiohttp transport)",
    "raw": "plain `openai.AsyncOpenAI` `chat.completions.create` + semaphore",
}


def run_api(section: Section, concurrency: int, latency_s: float, n_requests: int, reps: int) -> None:
    """Both clients side by side at one concurrency and latency: requests/s against the ideal
    (concurrency / latency) and each one's CPU per request; the project client must not be the
    bottleneck: its CPU at the ideal rate under half of one core (the machine has 2, shared with
    the server and everything else)."""
    from neuron_pipeline.llm.openai_api import OpenAICompatible

    ideal = concurrency / latency_s
    requests = explainer_requests(n_requests)
    server = ServerProcess(latency_s)
    rates: dict[str, list[float]] = {name: [] for name in CLIENTS}
    cpu: dict[str, list[float]] = {name: [] for name in [*CLIENTS, "server"]}
    try:
        with OpenAICompatible("fake-model", base_url=server.url, concurrency=concurrency, max_retries=0, timeout_s=60) as client:
            warm = client.chat_many(requests[:concurrency])
            failed = [r for r in warm if isinstance(r, Exception)]
            if failed:
                raise RuntimeError(f"{len(failed)} warm-up requests failed: {failed[0]}")
            names = list(CLIENTS)
            for rep in range(reps):
                for name in names[rep % 2 :] + names[: rep % 2]:  # alternate which client goes first
                    gc.collect()  # neither client pays for the other's garbage
                    time.sleep(0.5)  # nor for the server still closing the other's connections
                    client_cpu, server_cpu = _cpu_seconds(), _cpu_seconds(server.proc.pid)
                    if name == "project":
                        start = time.perf_counter()
                        results = client.chat_many(requests)
                        elapsed = time.perf_counter() - start
                        errors = sum(isinstance(r, Exception) for r in results)
                        if errors:
                            raise RuntimeError(f"{errors} of {len(results)} requests failed")
                    else:
                        elapsed = _raw_openai(server.url, requests, concurrency)
                    rates[name].append(len(requests) / elapsed)
                    # Per request: the plain client's warm-up batch is counted too (concurrency more requests).
                    sent = len(requests) + (0 if name == "project" else concurrency)
                    cpu[name].append((_cpu_seconds() - client_cpu) / sent)
                    cpu["server"].append((_cpu_seconds(server.proc.pid) - server_cpu) / sent)
    finally:
        server.close()
    section.data.setdefault("runs", {})[f"c{concurrency}_l{latency_s}"] = dict(rates=rates, ideal=ideal, server=server.implementation, cpu=cpu)
    rows = [
        f"Concurrency {concurrency}, server latency {latency_s:.1f} s ({n_requests} requests per repetition):",
        "",
        "| client | requests/s | % of ideal | client CPU per request | one core's cap (1 / CPU per request) | cores used at the ideal rate |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, label in CLIENTS.items():
        per = median(cpu[name])
        rows.append(f"| {label} | {median(rates[name]):.0f} | {median(rates[name]) / ideal:.0%} | {per * 1000:.2f} ms | {1 / per:,.0f}/s | {per * ideal:.2f} |")
    server_per = median(cpu["server"])
    rows.append(f"| (server: {server.implementation}) | | | {server_per * 1000:.2f} ms | {1 / server_per:,.0f}/s | {server_per * ideal:.2f} |")
    section.tables.append("\n".join(rows))
    achieved, raw = median(rates["project"]), median(rates["raw"])
    section.add(
        f"requests/s, project client `OpenAICompatible.chat_many` (concurrency {concurrency})",
        f"{achieved:.0f}/s = **{achieved / ideal:.0%} of ideal** ({ideal:.0f}/s = {concurrency} / {latency_s:.1f} s)",
        ">= 90% of ideal",
        achieved / ideal >= 0.9,
    )
    project_cpu = median(cpu["project"])
    section.add(
        f"project client CPU per request (concurrency {concurrency}, {latency_s:.1f} s latency)",
        f"{project_cpu * 1000:.2f} ms = **{project_cpu * ideal:.2f} cores** at {ideal:.0f} requests/s "
        f"(plain SDK `create`: {median(cpu['raw']) * 1000:.2f} ms)",
        "< 0.5 cores (not the bottleneck on 2)",
        project_cpu * ideal < 0.5,
    )
    section.add(
        f"requests/s, plain `openai.AsyncOpenAI` + semaphore (concurrency {concurrency})",
        f"{raw:.0f}/s = {raw / ideal:.0%} of ideal (project client: {achieved / raw:.2f}x)",
        "reference",
    )
    section.notes.append(
        f"Server: {server.implementation} with a fixed {latency_s * 1000:.0f} ms latency, in its own process; "
        f"{n_requests} explainer-sized chat requests per repetition, {reps} repetitions alternating the two clients; "
        "medians. The project client keeps its retries, error classification, budget and token accounting; the "
        "plain client has none of these. Client and server are Python processes sharing 2 cores with everything "
        f"else on the machine: at {ideal:.0f} requests/s a client needs under {1000 / ideal:.1f} ms of CPU per request "
        "on a free core, and the server's CPU per request comes on top. The table's last column is what one idle "
        "core could sustain; the one before, the share of a core the client needs at the ideal rate."
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
