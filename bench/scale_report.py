"""BENCHMARKS.md's whole-model section: whole-model runs and stage-level API utilization.

    python -m bench.scale_report --run          # run everything (hours on 2 cores), then write
    python -m bench.scale_report                # write the section from the saved results

The runs take 10+ minutes each, too long for ``bench.run``'s budget: this command writes its own
block between markers in BENCHMARKS.md, and ``bench.run`` carries that block over unchanged.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from bench.common import REPO, fmt_bytes, machine_info

BEGIN = "<!-- scale:begin (python -m bench.scale_report) -->"
END = "<!-- scale:end -->"
SCALE_DIR = Path("/tmp/np-scale-bench")
# Hand-written notes on the measured figures, kept across re-renders: the part before the
# STAGES_MARK line goes after the whole-model results, the rest after the stage-level ones.
NOTES = REPO / "bench" / "scale_notes.md"
STAGES_MARK = "<!-- stages -->"
STAGES_DIR = Path("/tmp/np-stages-bench")


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def _extrapolation(results: dict) -> list[str]:
    gpt2 = [(k, v) for k, v in results.items() if k.startswith("gpt2xl")]
    if not gpt2:
        return []
    name, run = gpt2[-1]
    _, layer_spec, sequences = name.split(":")
    lo, hi = (int(x) for x in layer_spec.split("-"))
    layers = hi - lo + 1
    neurons = layers * 6400
    from neuron_pipeline.config import RecordsSettings
    from neuron_pipeline.subject.capture import layer_state_bytes

    per_layer = sum(layer_state_bytes(6400, 64, int(sequences), RecordsSettings(), "float16").values())
    paper = sum(layer_state_bytes(6400, 64, 10**6, RecordsSettings(), "float16").values())
    weights = 1_557_611_200 * 4  # GPT-2 XL parameters, float32
    finished = [s for s in ("capture", "neuron_output_tokens", "explanations", "explanation_embeddings", "simulations",
                            "scores", "layer_summary", "neuron_viewer") if s in run["stages"]]
    rates = ", ".join(
        f"{stage} {neurons / run['stages'][stage]['wall_s']:,.0f} neurons/s"
        for stage in ("explanations", "explanation_embeddings", "simulations", "scores") if stage in run["stages"]
    )
    lines = [
        f"GPT-2 XL shape ({name}): a randomly initialised GPT-2 XL (1,600 hidden, 25 heads, 6,400 MLP neurons per "
        f"block), {layers} layers x 6,400 = {neurons:,} neurons over {int(sequences):,} sequences of 64 tokens. Peak RSS "
        f"{fmt_bytes(run['peak_rss'])} (inside 24 GB): weights {fmt_bytes(weights)} + the capture's kept state "
        f"{fmt_bytes(layers * per_layer)} ({fmt_bytes(per_layer)} per layer) + the forward pass's working set; "
        f"lake {fmt_bytes(run['lake_bytes'])}.",
    ]
    if run.get("viewer_partial"):  # its step ran, but was stopped part-way
        finished = [s for s in finished if s != "neuron_viewer"]
    if run.get("error"):
        partial = f"; the viewer {run['viewer_partial']}" if run.get("viewer_partial") else ""
        lines.append(
            f"This run was stopped before it finished (the session's time ran out): stages finished "
            f"{', '.join(finished)}{partial}; the rest are not measured at this size. Rates: {rates or 'none'}."
        )
    elif rates:
        lines.append(f"Rates on these 2 cores: {rates}.")
    if run.get("resumed_from"):
        lines.append(
            f"The first run was stopped at the start of {run['resumed_from']}; the stages from it on were continued by "
            "`python -m bench.scale_bench ... --resume-from` (one Dagster range run over the stored lake, as from the UI), "
            "so their peaks are a new process's own (the weights and the capture's state are not in them) and the wall "
            "column adds both runs (with any pause between them)."
        )
    lines.append(
        f"The paper's corpus (its records came from ~1M+ sequences): the capture's kept state does not grow with the "
        f"corpus past the quantile sample ({fmt_bytes(paper)} per layer at 1M sequences), the forward pass grows "
        f"linearly (the capture's wall time above x {10**6 // int(sequences):,} for 1M sequences on CPU: a GPU job), "
        "and every later stage is unchanged (it reads the same number of records per neuron)."
    )
    return lines


def _notes() -> tuple[str, str]:
    text = NOTES.read_text() if NOTES.is_file() else ""
    whole, _, stages = text.partition(STAGES_MARK)
    return whole.strip(), stages.strip()


def render(results: dict, stages: dict | None) -> str:
    info = machine_info(1)
    whole_notes, stage_notes = _notes()
    out = [BEGIN, "## A whole model on one machine\n"]
    load_file = SCALE_DIR / "load.json"
    load = json.loads(load_file.read_text()) if load_file.is_file() else {}
    when = f"run {load['started']} to {load.get('ended', '?')} UTC, " if load else ""
    loads = (f"load average (1/5/15 min) {load['start']} at start, {load.get('end', '?')} at end: other work shares "
             "these 2 cores, so wall times are pessimistic; memory figures are the process's own") if load else ""
    out.append(
        f"_Machine: {info['cpu']}, {info['cores']} cores, {info['ram']}" + (f"; {when}{loads}" if load else "") + ". "
        "Command: `python -m bench.scale_report --run`._\n"
    )
    if results:
        from bench.scale_bench import table

        out.append(
            "`neuron-pipeline run` end to end, every neuron of the layers, baseline explainer and simulator; RSS of the "
            "CLI process sampled every 0.25 s, split by the Dagster step windows (peak per stage):\n"
        )
        out.append(table(results) + "\n")
        out.append(
            "- The runs set `scorers: []`: the embedding scorer (on by default) embeds about 19 short texts per "
            "explanation with all-MiniLM-L6-v2, about 3 s per 32 neurons on these 2 cores in `make demo`'s run, so "
            "about an hour more for 46,080 neurons (a GPU job at that size; `scorers: [{method: embedding, layers: ...}]` "
            "limits it). Explanation embeddings (one text per explanation, for search) are in."
        )
        smol = {k: v for k, v in results.items() if k.startswith("smollm2")}
        if len(smol) >= 2:
            (a, ra), (b, rb) = sorted(smol.items(), key=lambda kv: kv[1]["peak_rss"])[:2]
            # The stages after the last one that holds the model and the capture's state: one
            # layer's working set each, what the target holds flat.
            later = [
                f"{stage} {100 * (rb['stages'][stage]['peak_rss'] / ra['stages'][stage]['peak_rss'] - 1):+.0f} %"
                for stage in ("explanations", "explanation_embeddings", "scorer_results", "simulations", "scores",
                              "layer_summary", "neuron_viewer")
                if ra["stages"].get(stage, {}).get("peak_rss") and rb["stages"].get(stage, {}).get("peak_rss")
            ]
            out.append(
                f"- Flat in the number of layers: the whole run's peak (the capture's: its kept state and the weights "
                f"its pass touches) {fmt_bytes(ra['peak_rss'])} ({a}) vs {fmt_bytes(rb['peak_rss'])} ({b}): "
                f"{100 * (rb['peak_rss'] / ra['peak_rss'] - 1):+.0f} %; each stage after the output tokens "
                f"(target: within 10 %): {', '.join(later)}. Before issue 16's change the 30-layer run peaked at 21.2 GB."
            )
        for line in _extrapolation(results):
            out.append(f"- {line}")
        out.append("")
    if whole_notes:
        out.append(whole_notes + "\n")
    if stages:
        out.append("### LLM stages against the fake OpenAI server\n")
        out.append("| metric | measured | target | status | note |\n|---|---|---|---|---|")
        for row in stages["rows"]:
            status = "" if row["met"] is None else ("met" if row["met"] else "**missed**")
            out.append(f"| {row['metric']} | {row['value']} | {row['target']} | {status} | {row['note']} |")
        out.append("")
        out.extend(t + "\n" for t in stages["tables"])
        out.extend(f"- {n}" for n in stages["notes"])
        out.append("")
    cpu_file = STAGES_DIR / "request_cpu.json"
    if cpu_file.is_file():
        from bench.request_cpu import table as cpu_table

        cpu = json.loads(cpu_file.read_text())
        out.append("### Where an API stage's CPU goes\n")
        out.append(
            f"`python -m bench.request_cpu` ({cpu['when']} UTC): the Python work of one explanation request, part by part, "
            f"on {cpu['neurons']} neurons of the stage bench's lake (bundled SmolLM2); CPU time of one process, best of "
            "alternated repetitions, the garbage collector paused:\n"
        )
        out.append(cpu_table(cpu) + "\n")
    if stage_notes and stages:
        out.append(stage_notes + "\n")
    out.append(END)
    return "\n".join(out) + "\n"


def write(block: str, path: Path = REPO / "BENCHMARKS.md") -> None:
    text = path.read_text() if path.is_file() else "# Benchmarks\n"
    if BEGIN in text and END in text:
        text = text[: text.index(BEGIN)] + block.rstrip("\n") + text[text.index(END) + len(END) :]
    else:
        text = text.rstrip("\n") + "\n\n" + block
    path.write_text(text)


def _run_stages(section, run_stages) -> None:
    """The stage-level API bench (`bench/stages_bench.py`) into ``STAGES_DIR/section.json``, with
    the machine's load before and after (the figures are only as good as the machine is quiet)."""
    started, start = time.strftime("%Y-%m-%d %H:%M", time.gmtime()), _load()
    run_stages(section, STAGES_DIR, concurrencies=(64, 256), latency_s=1.0, waves=15)
    section.notes.append(
        f"Stage bench run {started}-{time.strftime('%H:%M', time.gmtime())} UTC, load average (1/5/15 min) {start} at start, "
        f"{_load()} at end."
    )
    _write_stages(section)


def _write_stages(section) -> None:
    STAGES_DIR.mkdir(parents=True, exist_ok=True)
    (STAGES_DIR / "section.json").write_text(
        json.dumps({"rows": [r.__dict__ for r in section.rows], "tables": section.tables, "notes": section.notes, "data": section.data})
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.scale_report", description=__doc__.splitlines()[0])
    parser.add_argument("--run", action="store_true", help="run the whole-model and stage benches first")
    parser.add_argument("--stages", action="store_true", help="run only the stage-level API bench first (the whole-model results are kept)")
    parser.add_argument("--stages-log", type=Path, help="build the stage section from a stopped stage bench's output (its printed runs)")
    args = parser.parse_args(argv)
    if args.stages_log:
        from bench.common import Section
        from bench.stages_bench import stages_section

        runs = [json.loads(line) for line in args.stages_log.read_text().splitlines() if line.startswith('{"scenario"')]
        section = Section("stages", "stages")
        stages_section(section, runs, latency_s=1.0, waves=15)
        section.notes.append(f"The bench was stopped after {len(runs)} of its 8 runs (the session's time); the rest are not in this table.")
        _write_stages(section)
    if args.stages and not args.run:
        from bench.common import Section
        from bench.stages_bench import run_stages

        _run_stages(Section("stages", "stages"), run_stages)
    if args.run:
        from bench.common import Section
        from bench.scale_bench import main as scale_main
        from bench.stages_bench import run_stages

        SCALE_DIR.mkdir(parents=True, exist_ok=True)
        load = {"started": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "start": _load()}
        (SCALE_DIR / "load.json").write_text(json.dumps(load))
        scale_main(["smollm2:0-29", "smollm2:0-9", "--out", str(SCALE_DIR)])
        # Every GPT-2 XL neuron (48 x 6,400): hours on 2 cores; a stopped run keeps its finished stages.
        scale_main(["gpt2xl:0-47:128", "--out", str(SCALE_DIR)])
        _run_stages(Section("stages", "stages"), run_stages)
        load.update(ended=time.strftime("%H:%M", time.gmtime()), end=_load())
        (SCALE_DIR / "load.json").write_text(json.dumps(load))
    results_path, stages_path = SCALE_DIR / "results.json", STAGES_DIR / "section.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    stages = json.loads(stages_path.read_text()) if stages_path.is_file() else None
    write(render(results, stages))
    print(f"wrote the whole-model section of {REPO / 'BENCHMARKS.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
