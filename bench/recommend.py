"""The "what is left to gain" part of the report, with this run's numbers filled in."""

from __future__ import annotations

from bench.common import Section, median


def recommendations(results: dict[str, Section]) -> str:
    lines = ["## What is left to gain\n"]
    lines.append("Changes not made yet, with this run's numbers.\n")
    sim = results.get("simulator")
    if sim is not None and sim.data.get("fast_rates"):
        best = max(median(v) for v in sim.data["fast_rates"].values())
        lines.append(
            "1. **`neuron_pipeline/llm/local.py`, `LocalLLM.value_distributions` (simulator)** — measured "
            f"{best / sim.data['reference_rate']:.1f}x over the reference; FLOPs alone allow "
            f"{sim.data['flops_ratio']:.1f}x with two passes per excerpt; on a CPU the forward pass is compute-bound, so "
            "no batching closes the gap to 5x. The largest change left: replace the refill pass by one branch token ('1') per slot appended to the excerpt, with its slot's position id and "
            "a 4-D attention mask that shows it only the prefix and the excerpt up to its slot (tree attention): "
            f"one pass of ~suffix + 64 tokens instead of 2 x suffix, predicted {sim.data['flops_ratio_single_pass']:.1f}x "
            "by FLOPs, still short of 5x. It conditions p('0' | '1') on fillers rather than '1' in the earlier slots, so "
            "the reference must change with it. On a GPU, where one 64-token excerpt leaves the device idle, batching "
            "is where the factor comes from (not measured here: no GPU was lent to this task)."
        )
    return "\n".join(lines) + "\n"
