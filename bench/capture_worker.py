"""Subprocess: load one model, run capture methods interleaved batch by batch, print JSON.

    python -m bench.capture_worker '{"model": "smollm2", "tokens": "/tmp/ids.npy", "batch": 32,
                                     "methods": ["bare", "project"], "threads": 1}'

Each batch of the corpus goes through every method in turn (the order rotates per batch), so
machine-load changes hit all methods alike; per-method RSS is sampled per phase. One process
per model keeps RSS readings free of the rest of the bench.
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np
import torch


def load_bench_subject(kind: str):
    """The real bundled SmolLM2-135M, or a randomly initialised GPT-2 small (no download)."""
    if kind == "smollm2":
        from neuron_pipeline.config import SubjectSettings
        from neuron_pipeline.subject.loading import load_subject

        return load_subject(SubjectSettings(device="cpu"))
    if kind in ("gpt2-small", "gpt2-tiny"):
        import transformers

        from neuron_pipeline.subject.loading import Subject

        torch.manual_seed(0)
        if kind == "gpt2-small":
            config = transformers.GPT2Config()  # 12 layers x 3072 neurons, 124M parameters
        else:  # for smoke tests
            config = transformers.GPT2Config(n_embd=32, n_layer=3, n_head=2, n_positions=128)
        model = transformers.GPT2LMHeadModel(config).eval().requires_grad_(False)
        return Subject.from_model(model, f"{kind}-random-init")
    raise ValueError(f"unknown bench model {kind!r}")


def make_methods(names, subject, layers, neurons, records, n_seq, seq_len):
    from bench.capture_methods import Bare, CacheAll, HiddenStates, Streaming

    args = (subject, layers, neurons, records, n_seq, seq_len)
    table = {
        "bare": lambda: Bare(*args),
        "project": lambda: Streaming(*args),
        "cache_all": lambda: CacheAll(*args),
        "hidden_states": lambda: HiddenStates(*args),
    }
    return {name: table[name]() for name in names}


def run(config: dict) -> dict:
    from bench.capture_methods import compare_captures
    from bench.common import RSSSampler, max_rss_self, rss_bytes
    from neuron_pipeline.config import RecordsSettings

    torch.set_num_threads(int(config.get("threads", 1)))
    t0 = time.perf_counter()
    subject = load_bench_subject(config["model"])
    load_s = time.perf_counter() - t0
    token_ids = np.load(config["tokens"])
    vocab = subject.model.get_input_embeddings().num_embeddings
    token_ids = token_ids % vocab
    batch_size = int(config.get("batch", 32))
    layers = list(range(subject.num_layers)) if config.get("layers", "all") == "all" else list(config["layers"])
    neurons = list(range(subject.num_neurons))
    records = RecordsSettings(**config.get("records", {}))
    n_seq, seq_len = token_ids.shape
    batches = [
        (start, torch.as_tensor(token_ids[start : start + batch_size], dtype=torch.long))
        for start in range(0, n_seq, batch_size)
    ]
    methods = make_methods(config["methods"], subject, layers, neurons, records, n_seq, seq_len)
    names = list(methods)
    out: dict = {
        "model": subject.model_id,
        "layers": len(layers),
        "neurons": len(neurons),
        "sequences": n_seq,
        "seq_len": seq_len,
        "batch": batch_size,
        "tokens": int(n_seq * seq_len),
        "load_s": load_s,
        "threads": torch.get_num_threads(),
        "methods": {},
    }
    with RSSSampler(interval=0.005) as sampler:
        # Warm-up (weights paged in, allocator primed): one bare batch, not timed.
        methods_bare = methods.get("bare") or make_methods(["bare"], subject, layers, neurons, records, n_seq, seq_len)["bare"]
        methods_bare.step(batches[0][1], 0)
        out["rss_base"] = rss_bytes()
        timing = {name: {"setup": 0.0, "steps": [], "finish": 0.0} for name in names}
        for name in names:
            with sampler.phase(name):
                start = time.perf_counter()
                methods[name].setup()
                timing[name]["setup"] = time.perf_counter() - start
        for i, (start_row, batch) in enumerate(batches):
            order = names[i % len(names) :] + names[: i % len(names)]
            for name in order:
                with sampler.phase(name):
                    t = time.perf_counter()
                    methods[name].step(batch, start_row)
                    timing[name]["steps"].append(time.perf_counter() - t)
        results = {}
        for name in names:
            with sampler.phase(name):
                t = time.perf_counter()
                results[name] = methods[name].finish()
                timing[name]["finish"] = time.perf_counter() - t
        for name in names:
            phase = sampler.phases[name]
            out["methods"][name] = {
                "label": methods[name].name,
                **timing[name],
                "state_bytes": methods[name].state_bytes(),
                "rss_growth": phase["growth"],
                "rss_transient": phase["transient"],
                "rss_peak_phase": phase["peak"],
            }
    out["ru_maxrss"] = max_rss_self()
    reference = "project" if "project" in results else None
    if reference and config.get("check", True):
        for name, result in results.items():
            if result is None or name == reference:
                continue
            out["methods"][name]["differences"] = compare_captures(results[reference], result)[:5]
    return out


def run_layers(config: dict) -> dict:
    """All requested layers in one pass vs one ``capture_layers`` call per layer, against bare
    full-depth forward passes interleaved between them."""
    from bench.capture_methods import Bare
    from neuron_pipeline.config import RecordsSettings
    from neuron_pipeline.subject.capture import capture_layers

    torch.set_num_threads(int(config.get("threads", 1)))
    subject = load_bench_subject(config["model"])
    token_ids = np.load(config["tokens"]) % subject.model.get_input_embeddings().num_embeddings
    batch_size = int(config.get("batch", 32))
    layers = list(range(subject.num_layers))
    neurons = list(range(subject.num_neurons))
    records = RecordsSettings(**config.get("records", {}))
    n_seq, seq_len = token_ids.shape
    bare = Bare(subject, layers, neurons, records, n_seq, seq_len)

    def bare_pass():
        for start in range(0, n_seq, batch_size):
            bare.step(torch.as_tensor(token_ids[start : start + batch_size], dtype=torch.long), start)

    def timed(fn):
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t

    bare_pass()  # warm-up
    out = {"model": subject.model_id, "layers": len(layers), "sequences": n_seq, "batch": batch_size, "bare": [], "per_layer": {}}
    chunks = [layers[i :: 3] for i in range(3)]  # each chunk spans shallow and deep layers
    out["bare"].append(timed(bare_pass))
    out["one_pass_project"] = timed(lambda: capture_layers(subject, token_ids, layers, neurons, records, batch_size))
    for index, chunk in enumerate(chunks):
        for layer in chunk:
            out["per_layer"][layer] = timed(lambda: capture_layers(subject, token_ids, [layer], neurons, records, batch_size))
        out["bare"].append(timed(bare_pass))
        if index == 0:  # a second one-pass measurement, between the per-layer chunks
            out["one_pass_project_2"] = timed(lambda: capture_layers(subject, token_ids, layers, neurons, records, batch_size))
    return out


if __name__ == "__main__":
    arguments = json.loads(sys.argv[1])
    if arguments.get("mode") == "layers":
        print(json.dumps(run_layers(arguments)))
    else:
        print(json.dumps(run(arguments)))
