"""Section 8: what neurons write (neuron_output_tokens) and search by meaning.

* Output tokens of every neuron of the bundled SmolLM2 (30 x 1,536 against 49,152 tokens), as
  the Dagster asset computes them (load, compute, validate, write), and again with nothing changed.
* The same computation on a randomly initialised GPT-2 XL config (6,400 neurons x 1,600 wide against
  50,257 tokens) with a few blocks, timed per layer and extrapolated to 48 layers (the speed does
  not depend on the weights; all 48 random blocks would need 6 GB here).
* Embedding throughput of all-MiniLM-L6-v2 on explanation-like texts, extrapolated to 307,200.
* Search over a lake of 307,200 embedded explanations (48 x 6,400): the `search()` call with the
  embedder loaded, and `neuron-pipeline search` end to end as a new process.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from bench.common import REPO, Section, fmt_s, median

QUERIES = ["money and prices", "names of people", "the end of a sentence", "days of the week", "brackets in code"]
SEARCH_TARGET_S = 1.0


def _output_tokens_bundled(section: Section, workdir: Path, layers: str) -> None:
    import dagster as dg

    from neuron_pipeline.config import load_settings
    from neuron_pipeline.definitions import build_definitions
    from neuron_pipeline.lake import read_table

    settings = load_settings(profile="demo", overrides={"lake": str(workdir / "lake"), "layers": layers}, environ={})
    defs = build_definitions(settings)
    first, last = layers.split("-")
    instance = dg.DagsterInstance.ephemeral()

    def materialize() -> float:
        start = time.perf_counter()
        result = dg.materialize(
            list(defs.assets),
            selection=[dg.AssetKey("neuron_output_tokens")],
            resources=defs.resources,
            instance=instance,
            tags={"dagster/asset_partition_range_start": first, "dagster/asset_partition_range_end": last},
            run_config={"loggers": {"console": {"config": {"log_level": "CRITICAL"}}}},
        )
        assert result.success
        return time.perf_counter() - start

    cold = materialize()
    rows = read_table(settings.lake_location, "neuron_output_tokens", columns=["layer"]).height
    warm = materialize()
    n_layers = int(last) - int(first) + 1
    section.add(
        f"output tokens, bundled SmolLM2, layers {layers} ({rows:,} neurons x 49,152 tokens)",
        fmt_s(cold),
        "seconds",
        None,
        f"the asset end to end (model load, bf16 logits + exact fp32 re-ranking, GX gate, Delta write); "
        f"{cold / n_layers:.2f} s per layer",
    )
    section.add("  again, weights unchanged (nothing recomputed)", fmt_s(warm), note="hashes the weights, re-validates, writes nothing")
    section.data["bundled"] = {"layers": layers, "rows": rows, "cold_s": cold, "warm_s": warm}


def _output_tokens_xl(section: Section, layers: int, neurons: int, hidden: int, vocab: int) -> None:
    """A randomly initialised GPT-2 XL-wide model with ``layers`` blocks, through the same code path
    as the asset (Subject, c_proj rows, ln_f gain probed, unembedding)."""
    import torch
    import transformers

    from neuron_pipeline.subject import Subject
    from neuron_pipeline.subject.output_tokens import OUTPUT_TOKENS_K, Unembedding, layer_output_tokens

    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=layers, n_embd=hidden, n_inner=neurons, n_head=25 if hidden % 25 == 0 else 1,
                                     vocab_size=vocab, n_positions=64, bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config).eval().requires_grad_(False)
    subject = Subject.from_model(model, "gpt2-xl-random")
    unembed = Unembedding.of(subject)
    times = []
    for layer in range(layers):
        start = time.perf_counter()
        layer_output_tokens(subject, layer, OUTPUT_TOKENS_K, unembed)
        times.append(time.perf_counter() - start)
    del model, subject
    per_layer = median(times)
    section.add(
        f"output tokens, random GPT-2 XL config ({neurons:,} neurons x {hidden:,} wide, {vocab:,} tokens), per layer",
        fmt_s(per_layer),
        note=f"median of {layers} layers of a randomly initialised {layers}-block model of GPT-2 XL's widths; compute only",
    )
    section.add(
        "  extrapolated to GPT-2 XL's 48 layers (307,200 neurons)",
        fmt_s(per_layer * 48),
        note="2 CPU cores (bf16 products on AMX); on a GPU the bf16 products go to the tensor cores",
    )
    section.data["xl"] = {"per_layer_s": per_layer, "layers_timed": layers, "extrapolated_48_s": per_layer * 48}


def _texts(n: int) -> list[str]:
    rng = np.random.default_rng(0)
    topics = ["money", "prices", "names of people", "days of the week", "quotation marks", "the word 'the'",
              "closing brackets", "verbs in the past tense", "places in England", "numbers", "family members",
              "letters and writing", "weather", "emotions", "titles like Mr and Mrs", "the end of a sentence"]
    frames = ["{a} and {b}", "the tokens \"{a}\" (10), \"{b}\" (6)", "{a}, especially after {b}", "words about {a}"]
    return [
        frames[i % len(frames)].format(a=topics[rng.integers(len(topics))], b=topics[rng.integers(len(topics))]) + f" {i}"
        for i in range(n)
    ]


def _embedding_throughput(section: Section, n: int) -> None:
    from neuron_pipeline.llm.embeddings import load_embedder

    embedder = load_embedder()
    embedder.embed(["warm up"])
    texts = _texts(n)
    start = time.perf_counter()
    embedder.embed(texts)
    seconds = time.perf_counter() - start
    rate = n / seconds
    section.add(f"embedding {n:,} explanations (all-MiniLM-L6-v2, CPU)", fmt_s(seconds), note=f"{rate:,.0f} per second")
    section.add(
        "  extrapolated to 307,200 explanations",
        fmt_s(307_200 / rate),
        note="once; afterwards only new or changed explanations are embedded",
    )
    section.data["embedding"] = {"texts": n, "seconds": seconds, "per_second": rate}


def _search_lake(root: Path, layers: int, neurons: int) -> Path:
    """explanations, scores and explanation_embeddings for layers x neurons (unit random vectors)."""
    import polars as pl

    from bench.lake_bench import _vocab, explanations_partition, scores_partition
    from neuron_pipeline.lake import write_table

    lake = root / "search_lake"
    rng = np.random.default_rng(3)
    vocab = _vocab()
    step = 8
    for first in range(0, layers, step):
        chunk = list(range(first, min(layers, first + step)))
        explanations = pl.concat([pl.from_arrow(explanations_partition(layer, neurons, rng, vocab)) for layer in chunk])
        scores = pl.concat([pl.from_arrow(scores_partition(layer, neurons, rng)) for layer in chunk])
        vectors = rng.standard_normal((len(chunk) * neurons, 384), dtype=np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        embeddings = explanations.select("model", "layer", "neuron", "explainer_id").with_columns(
            embedding_model=pl.lit("all-MiniLM-L6-v2"),
            text_hash=pl.lit("0123456789abcdef"),
            embedding=pl.Series(vectors).cast(pl.List(pl.Float32)),
        )
        where = {"layer": [str(layer) for layer in chunk]}
        write_table(lake, "explanations", explanations, replace_where=where)
        write_table(lake, "scores", scores, replace_where=where)
        write_table(lake, "explanation_embeddings", embeddings, replace_where=where)
        del vectors, embeddings
    return lake


def _search(section: Section, root: Path, layers: int, neurons: int, reps: int, cli_reps: int = 3) -> None:
    from neuron_pipeline.lake.search import search
    from neuron_pipeline.llm.embeddings import load_embedder

    total = layers * neurons
    start = time.perf_counter()
    lake = _search_lake(root, layers, neurons)
    section.add(f"writing a {total:,}-explanation search lake", fmt_s(time.perf_counter() - start), note="set-up, not a target")
    embed = load_embedder().embed
    embed(["warm up"])
    begin = time.perf_counter()
    search(lake, "warm up", top=10, embed=embed)  # decodes the table into the index, once per table version
    cold = time.perf_counter() - begin
    section.add(
        f"  first search after the table changed, {total:,} explanations",
        fmt_s(cold),
        note="decodes explanation_embeddings once into the memory-mapped index (per Delta version)",
    )
    times = []
    for rep in range(reps):
        query = QUERIES[rep % len(QUERIES)]
        begin = time.perf_counter()
        hits = search(lake, query, top=10, embed=embed)
        times.append(time.perf_counter() - begin)
        assert hits.height == 10 and hits["explanation"].is_not_null().all()
    in_process = median(times)
    section.add(
        f"search over {total:,} explanations, `search()` with the embedder loaded",
        fmt_s(in_process),
        f"< {SEARCH_TARGET_S:.0f} s",
        in_process < SEARCH_TARGET_S,
        f"median of {reps} queries: embed the query, read every vector, rank, join the top 10 to texts and scores",
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cli = []
    for query in QUERIES[:cli_reps]:
        begin = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-m", "neuron_pipeline.cli", "search", query, "--lake", str(lake), "--top", "10"],
            env=env, capture_output=True, text=True, timeout=300,
        )
        cli.append(time.perf_counter() - begin)
        assert done.returncode == 0, done.stderr
    section.add(
        f"  `neuron-pipeline search` end to end (new process), {total:,} explanations",
        fmt_s(median(cli)),
        note=f"median of {cli_reps}; includes Python start-up, importing torch / transformers and loading the embedder",
    )
    section.data["search"] = {"explanations": total, "first_s": cold, "in_process_s": times, "cli_s": cli}


def run_outputs(section: Section, workdir: Path, sizes: dict) -> None:
    import torch

    workdir.mkdir(parents=True, exist_ok=True)
    # Absolute times of a pipeline stage, not ratios: measured with torch's default threads, as
    # `make demo` runs it (the other timed sections use one thread, see the header).
    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)
    try:
        _output_tokens_bundled(section, workdir, sizes["bundled_layers"])
        _output_tokens_xl(section, **sizes["xl"])
    finally:
        torch.set_num_threads(threads)
    section.notes.append(f"Output tokens timed with {os.cpu_count()} torch threads (torch's default, as the pipeline runs).")
    _embedding_throughput(section, sizes["embed_texts"])
    _search(section, workdir, **sizes["search"])
    section.notes.append(
        "Output tokens are exact: the bf16 logits only choose max(64, 4k) candidates per neuron, which are "
        "re-scored in float32 (tests/test_output_tokens.py compares them with a float32 computation)."
    )
