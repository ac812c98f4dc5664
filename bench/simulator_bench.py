"""Section 3: all-at-once simulator throughput, batched + prefix-reused vs the plain reference."""

from __future__ import annotations

import time

import numpy as np
import torch

from bench.common import Section, fmt_s, median

EXPLANATION = "names of people and the titles used with them"


def simulator_inputs(n_excerpts: int, tokenizer, llm):
    from neuron_pipeline.config import CorpusSettings
    from neuron_pipeline.corpus import token_strings, tokenize_corpus
    from neuron_pipeline.interp.simulator import AllAtOnceSimulator, excerpt_suffix

    ids = tokenize_corpus(CorpusSettings(max_sequences=max(n_excerpts, 2)), tokenizer).token_ids[:n_excerpts]
    excerpts = token_strings(tokenizer, ids)
    prefix = AllAtOnceSimulator(llm).prefix(EXPLANATION)
    suffixes, slots = zip(*(excerpt_suffix(tokens) for tokens in excerpts))
    return prefix, list(suffixes), list(slots)


def run_simulator(section: Section, n_excerpts: int, n_reference: int, batch_sizes: list[int], threads: int) -> None:
    from neuron_pipeline.interp.simulator import expected_values
    from neuron_pipeline.llm.local import LocalLLM

    torch.set_num_threads(threads)
    llm = LocalLLM(device="cpu")
    prefix, suffixes, slots = simulator_inputs(n_excerpts, llm.tokenizer, llm)
    n_prefix = len(llm.tokenizer(prefix)["input_ids"])
    n_suffix = [len(llm.tokenizer(s, add_special_tokens=False)["input_ids"]) for s in suffixes]
    llm.value_distributions(prefix, suffixes[:1], slots[:1])  # warm-up, not timed

    # The reference runs on the first n_reference excerpts, in chunks placed before, between and
    # after the batched runs, so both see the same machine load (rates are per excerpt).
    chunks = np.array_split(np.arange(n_reference), len(batch_sizes) + 1)
    ref_results: dict[int, object] = {}
    ref_times: list[float] = []

    def reference(indices):
        indices = [int(i) for i in indices]
        if not indices:
            return
        start = time.perf_counter()
        got = llm.reference_value_distributions(prefix, [suffixes[i] for i in indices], [slots[i] for i in indices])
        ref_times.append((time.perf_counter() - start) / len(indices))
        ref_results.update(zip(indices, got))

    fast_rates: dict[int, list[float]] = {bs: [] for bs in batch_sizes}
    fast_results = None
    for chunk, bs in zip(chunks, batch_sizes):
        reference(chunk)
        llm.batch_size = bs
        start = time.perf_counter()
        fast_results = llm.value_distributions(prefix, suffixes, slots)
        fast_rates[bs].append(len(suffixes) / (time.perf_counter() - start))
    reference(chunks[-1])
    ref_rate = 1 / median(ref_times)
    max_diff = max(
        float(np.abs(expected_values(ref_results[i].probabilities) - expected_values(fast_results[i].probabilities)).max())
        for i in ref_results
    )
    best_bs = max(batch_sizes, key=lambda bs: median(fast_rates[bs]))
    best = median(fast_rates[best_bs])
    speedup = best / ref_rate
    section.data.update(
        excerpts=n_excerpts, reference_excerpts=n_reference, prefix_tokens=n_prefix, suffix_tokens=n_suffix,
        reference_rate=ref_rate, fast_rates=fast_rates, max_diff=max_diff,
    )
    rows = ["| batch size | excerpts/s | vs reference |", "|---:|---:|---:|"]
    rows.append(f"| reference (1 plain forward per excerpt and per refill) | {ref_rate:.3f} | 1.00x |")
    for bs in batch_sizes:
        rate = median(fast_rates[bs])
        rows.append(f"| {bs} | {rate:.3f} | {rate / ref_rate:.2f}x |")
    section.tables.append("\n".join(rows))
    section.add(
        "simulated excerpts/s, batched + prefix KV reuse (best batch size)",
        f"{best:.3f}/s at batch {best_bs} vs {ref_rate:.3f}/s reference = **{speedup:.2f}x**",
        ">= 5x",
        speedup >= 5,
    )
    section.add(
        "max |expected value difference| vs reference",
        f"{max_diff:.2e} (over {len(ref_results)} excerpts x 64 slots)",
        "< 1e-4",
        max_diff < 1e-4,
    )
    mean_suffix = float(np.mean(n_suffix))
    # FLOP arithmetic: body ~212 MFLOP/token, lm_head (49,152 x 576) ~57 MFLOP/position.
    flops_ref = 2 * (n_prefix + mean_suffix) * (212 + 57)
    flops_fast = 2 * mean_suffix * 212 + 2 * 64 * 57 + n_prefix * 212 / n_excerpts
    flops_single = (mean_suffix + 64) * 212 + 2 * 64 * 57 + n_prefix * 212 / n_excerpts
    section.data.update(flops_ratio=flops_ref / flops_fast, flops_ratio_single_pass=flops_ref / flops_single)
    section.notes.append(
        f"Prompt shape: shared prefix (instructions, two worked examples, explanation) {n_prefix} tokens; each "
        f"64-token excerpt adds {mean_suffix:.0f} tokens (token, tab, filler, newline per line). SmolLM2 writes 10 as "
        "'1','0', so each excerpt takes two passes (values, then p('0' | '1') with '1' in every slot). The reference "
        "runs 2 x (prefix + suffix) tokens with the lm_head at every position; the fast path 2 x suffix tokens (plus "
        f"the prefix once per neuron) with the lm_head at the 64 slots: FLOPs alone predict "
        f"{flops_ref / flops_fast:.1f}x (measured {speedup:.1f}x; FLOPs leave out that the reference also writes "
        "full-vocabulary logits at every position), so >= 5x is out of reach on a CPU with two passes per excerpt, "
        "whatever the batching: the forward pass is compute-bound here and batching only saves per-call overhead. "
        f"One pass with a branch token per slot would predict {flops_ref / flops_single:.1f}x. On a GPU a single "
        "64-token excerpt leaves the device mostly idle, so batching is where the factor would come from there."
    )
    section.notes.append(
        f"{n_excerpts} excerpts of 64 real corpus tokens; reference timed on {n_reference} of them, in chunks run "
        "before, between and after the batched runs; rates are medians; torch threads = "
        f"{torch.get_num_threads()}."
    )
