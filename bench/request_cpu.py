"""Where an API stage's CPU goes: the Python work of one explanation request, part by part.

    python -m bench.request_cpu [--lake LAKE]     # then `python -m bench.scale_report` renders it

The stage bench (`bench/stages_bench.py`) measures the CLI's CPU per request over a whole LLM
window; this one takes the parts the stage does per neuron apart, in one process, on the
activation records of a stage-bench lake (bundled SmolLM2, real tokens): reading and converting
the records (all kinds, as before, against the kinds the stage now reads), the prompt (with and
without the escaping fast path), the fingerprint, the cache, the rows; and the quality gate,
whose cost is per layer, not per neuron. Each pair is measured alternately, best of the
repetitions (CPU time of this process), so the ratios hold on a busy machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import re
import tempfile
import time
from pathlib import Path

STAGES_DIR = Path("/tmp/np-stages-bench")
NEURONS = 256  # one read chunk (assets/layered.py NEURON_CHUNK)


def _best(fn, reps: int) -> float:
    """Best CPU time of ``reps`` calls, the garbage collector paused (its full passes land on
    whichever call happens to cross a threshold)."""
    best = float("inf")
    for _ in range(reps):
        gc.collect()
        gc.disable()
        try:
            start = time.process_time()
            fn()
            best = min(best, time.process_time() - start)
        finally:
            gc.enable()
    return best


def measure(lake: Path, reps: int = 5) -> dict:
    import neuron_pipeline.interp.prompts as prompts
    from data_quality import QualityParams
    from neuron_pipeline.assets.checks import check_rows
    from neuron_pipeline.assets.explanations import _explanation_row, records_fingerprint
    from neuron_pipeline.assets.layered import layer_neurons, record_chunks
    from neuron_pipeline.interp.explainer import Explanation, LLMExplainer
    from neuron_pipeline.interp.records import split_records
    from neuron_pipeline.lake import table_frame
    from neuron_pipeline.llm.cache import LLMCache

    layer = 0
    neurons = layer_neurons(lake, layer)[:NEURONS]
    n = len(neurons)

    def read(kinds):
        return lambda: [chunk for chunk in record_chunks(lake, layer, neurons, chunk=n, kinds=kinds)]

    parts: dict[str, float] = {}
    kinds = {"all kinds (before)": ("top", "random", "quantile"), "top + random (simulations)": ("top", "random"),
             "top only (plain explainer)": ("top",)}  # fmt: skip
    for _ in range(reps):  # alternated: each kind once per round
        for label, k in kinds.items():
            parts[f"records: {label}"] = min(parts.get(f"records: {label}", float("inf")), _best(read(k), 1))
    records = next(record_chunks(lake, layer, neurons, chunk=n, kinds=("top",)))
    splits = [split_records(r, 5, 5, 5) for r in records.values()]

    class _Model:
        model_name = "bench"

    explainer = LLMExplainer(_Model())
    fast, slow = prompts._ESCAPED, re.compile("")  # "" matches every token: the escaping slow path
    fast_running = prompts._ESCAPED_RUNNING
    for _ in range(reps):
        for label, (pattern, running) in {"prompt (escaping fast path)": (fast, fast_running), "prompt (every token escaped, before)": (slow, slow)}.items():
            prompts._ESCAPED, prompts._ESCAPED_RUNNING = pattern, running
            parts[label] = min(parts.get(label, float("inf")), _best(lambda: [explainer.request(s.explain) for s in splits], 1))
    prompts._ESCAPED, prompts._ESCAPED_RUNNING = fast, fast_running
    parts["records fingerprint"] = _best(lambda: [records_fingerprint(s.explain) for s in splits], reps)
    requests = [explainer.request(s.explain) for s in splits]
    cache = LLMCache(Path(tempfile.mkdtemp()) / "cache.sqlite")
    keys = [LLMCache.key("bench", "chat", dataclasses.asdict(r)) for r in requests]
    parts["cache key + look-up"] = _best(
        lambda: [cache.get(LLMCache.key("bench", "chat", dataclasses.asdict(r))) for r in requests], reps
    )
    parts["cache write"] = _best(lambda: [cache.put(k, "bench", "chat", '{"texts": ["x"]}') for k in keys], 1)
    rows = [_explanation_row(explainer, "m", layer, nn, "f", Explanation("words about x")) for nn in neurons]
    parts["rows + typed frame"] = _best(lambda: table_frame("explanations", [
        _explanation_row(explainer, "m", layer, nn, "f", Explanation("words about x")) for nn in neurons]), reps)  # fmt: skip
    frame = table_frame("explanations", rows)
    check_rows("explanations", frame, QualityParams())  # Great Expectations' one-time set-up, not per layer
    gate_s = _best(lambda: check_rows("explanations", frame, QualityParams()), 3)
    return {
        "neurons": n,
        "ms_per_neuron": {k: 1000 * v / n for k, v in parts.items()},
        "gate_s_per_layer": gate_s,
        "lake": str(lake),
        "when": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
    }


def table(result: dict) -> str:
    ms = result["ms_per_neuron"]
    lines = ["| part of one explanation request | CPU per neuron |", "|---|---|"]
    lines += [f"| {k} | {v:.2f} ms |" for k, v in ms.items()]
    gate = result["gate_s_per_layer"]
    lines.append(
        f"| quality gate (Great Expectations), per layer | {1000 * gate:.0f} ms per layer: {1000 * gate / 426:.2f} ms per "
        f"neuron at the stage bench's 426 neurons per layer, {1000 * gate / 6400:.2f} ms at GPT-2 XL's 6,400 |"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.request_cpu", description=__doc__.splitlines()[0])
    parser.add_argument("--lake", type=Path, default=STAGES_DIR / "top_logprobs-c256" / "lake",
                        help="a lake with activation_records (default: the stage bench's)")  # fmt: skip
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args(argv)
    if not (args.lake / "activation_records").is_dir():
        print(f"no activation_records in {args.lake}: run the stage bench first (python -m bench.scale_report --stages) or give --lake")
        return 2
    result = measure(args.lake, args.reps)
    STAGES_DIR.mkdir(parents=True, exist_ok=True)
    (STAGES_DIR / "request_cpu.json").write_text(json.dumps(result, indent=1))
    print(table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
