"""The "recommended fixes" part of the report, with this run's numbers filled in."""

from __future__ import annotations

from bench.common import Section, fmt_s, median


def _capture_numbers(capture: Section | None) -> str:
    from bench.capture_bench import _ratios

    if capture is None:
        return "(section 1 did not run)"
    parts = []
    for run in capture.data.get("runs", []):
        methods = run["methods"]
        if "project" in methods and "fast" in methods and run.get("threads", 1) == 1:
            project = _ratios(run, "project")
            fast = _ratios(run, "fast")
            parts.append(
                f"{run['model']}: capture / bare {project[0]:.2f} -> {fast[0]:.2f} "
                f"({project[2]:.2f} -> {fast[2]:.2f} without setup/finalize)"
            )
    return "; ".join(parts) if parts else "(no capture numbers in this run)"


def recommendations(results: dict[str, Section]) -> str:
    lines = ["## Recommended fixes to project code\n"]
    lines.append(
        "Prototyped in `bench/` (not project code) and measured side by side in this run; records stay "
        "bit-identical where noted.\n"
    )
    lines.append(
        "1. **`neuron_pipeline/subject/capture.py`, `_Reservoir.offer` / `LayerAccumulator.update` (capture "
        "overhead)** — measured: " + _capture_numbers(results.get("capture")) + ". Changes, all in "
        "`bench/fast_capture.py` (`FastLayerAccumulator`, a drop-in for `LayerAccumulator`):\n"
        "   - *Quantile-maxima sample* (`quantile_sample`, k = `quantile_sample_size` = 1,000): today a stable sort of "
        "[1,000 + B, N] int64 keys per layer per batch — in development profiling the largest single cost "
        "(23 of 42 s of update time on 192 SmolLM2 sequences). Append rows and sort down to k only when 2k "
        "are buffered, and once at finalize (`LazyKeyedSample`).\n"
        "   - *Excerpt payloads* (top / random / quantile candidates): `offer` concatenates and gathers the whole "
        "[k + m, T, N] activation payload whenever any neuron gains an excerpt — i.e. every batch. Merge only the "
        "keys ([N, k], neuron-major so sorts run along a contiguous axis: ~4x faster than along dim 0), keep a "
        "rank -> slot map, and copy just the entering excerpts (E x 64 floats) into the slots the evicted ones free "
        "(`SlotReservoir`); build the rank-ordered [k, T, N] arrays once in `finalize`.\n"
        "   - *Statistics*: batch mean / M2 in float32 (torch's cascaded sums; the cross-batch merge stays float64), "
        "`square_()` instead of `** 2` (a slow `pow` path on float64), `amax`/`amin` instead of `aminmax`, and "
        "`torch.sign(x).clamp_(min=0).sum(0)` instead of `(x > 0).sum(0)` (~8x faster on CPU). Statistics then "
        "agree to ~1e-7 relative; `fast_stats=False` keeps them bit-identical at ~10-15 ms more per layer-batch.\n"
        "   - What is left (~25 ms per SmolLM2 layer-batch of 2,048 tokens against ~175 ms of forward) is the stable "
        "key sorts, the payload copies while the samples fill, and a few passes over the [2,048 x 1,536] "
        "activations; it shrinks as the corpus grows (fewer excerpts enter). Next steps if 0.90 is required on "
        "CPU: `torch.topk` instead of a stable sort for the hash-keyed samples (keys are unique), a searchsorted "
        "merge instead of re-sorting [k + m] keys, and one fused pass for max/min/positives."
    )
    sim = results.get("simulator")
    if sim is not None and sim.data.get("fast_rates"):
        best = max(median(v) for v in sim.data["fast_rates"].values())
        lines.append(
            "2. **`neuron_pipeline/llm/local.py`, `LocalLLM.value_distributions` (simulator)** — measured "
            f"{best / sim.data['reference_rate']:.1f}x over the reference; FLOPs alone allow "
            f"{sim.data['flops_ratio']:.1f}x with two passes per excerpt, so the 5x target needs a change of method: "
            "(a) compute the prefix once per call — today each of the two `_slot_logits` calls runs the prefix "
            "forward again (a saving of one prefix pass per neuron, ~5-10% at 8-10 excerpts); (b) replace the "
            "refill pass by one branch token ('1') per slot appended to the excerpt, with its slot's position id and "
            "a 4-D attention mask that shows it only the prefix and the excerpt up to its slot (tree attention): "
            f"one pass of ~suffix + 64 tokens instead of 2 x suffix, predicted {sim.data['flops_ratio_single_pass']:.1f}x "
            "by FLOPs. (b) conditions p('0' | '1') on fillers rather than '1' in the earlier slots, so the reference "
            "must change with it. Batch size barely matters on CPU (compute-bound); keep the default."
        )
    api = results.get("api")
    if api is not None and api.data.get("cpu", {}).get("post"):
        cpu = api.data["cpu"]
        project = median(cpu["project"]) if cpu.get("project") else median(cpu["raw"])
        post = median(cpu["post"])
        lines.append(
            "3. **`neuron_pipeline/llm/openai_api.py`, `OpenAICompatible._call` (API throughput)** — "
            f"`chat.completions.with_raw_response.create(**params)` costs {project * 1000:.1f} ms of client CPU per "
            "request, about half of it in the openai package's params transform (a recursive walk over every "
            "message's TypedDict); one core then caps the client near "
            f"{1 / project:.0f} requests/s, just above the 320/s ideal of 64 requests in flight at 200 ms. Sending the "
            "same JSON with `await self._client.post('/chat/completions', body=params, cast_to=httpx.Response)` (the "
            "package's own `httpx` fork, `httpx2` in openai 3.x; errors still arrive as the same `openai.APIStatusError` "
            "subclasses, checked against the fake server, so `_classify` and the retry loop are unchanged) measured "
            f"{post * 1000:.1f} ms per request, a cap of {1 / post:.0f}/s. The completions endpoint "
            "(`value_distributions`) can do the same."
        )
    lake = results.get("lake")
    if lake is not None and lake.data.get("row_group_fix"):
        fix = lake.data["row_group_fix"]
        lines.append(
            "4. **`neuron_pipeline/lake/io.py`, `write_table` (per-neuron reads)** — a layer's activation_records "
            f"are written as {fix['row_groups_now']} parquet row group(s), so polars decodes the whole partition to "
            f"return one neuron's 40 rows ({fmt_s(median(fix['times']['now']))}; DuckDB filters first and is fast). "
            "Passing `writer_properties=WriterProperties(max_row_group_size=16_384)` to `write_deltalake` for "
            "`activation_records` (its rows are already sorted by neuron; sort `simulations` likewise) lets readers skip by the "
            f"neuron column's min/max: {fmt_s(median(fix['times']['fix']))}, for "
            f"{fix['size_fix'] / max(fix['size_now'], 1) - 1:+.0%} on disk."
        )
    lines.append(
        "5. **Threads (`neuron_pipeline/config.py` / `subject/loading.py`, documentation)** — torch uses one "
        "intra-op thread per core; on a shared machine every small op then waits for a descheduled thread "
        "(development measurement at load average ~5: a 49k-element int64 xor 10.9 ms with 2 threads vs 0.07 ms "
        "with 1; one capture update 2.2 s vs 0.45 s; a 2-thread data point is in section 1). A `subject.threads` "
        "setting (calling `torch.set_num_threads`) or a documented `OMP_NUM_THREADS` lets such users opt out."
    )
    return "\n".join(lines) + "\n"
