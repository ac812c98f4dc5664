"""Run the benchmarks and write BENCHMARKS.md.

    python -m bench.run                 # full run (`make bench`), < 25 min on 2 CPU cores
    python -m bench.run --quick         # smoke test at toy sizes (writes to a temp folder)
    python -m bench.run --only lake,api # some sections

Every comparison is a ratio of methods measured side by side in the same process and run,
with repetitions alternated; a section that fails writes its error into the report and the
run goes on.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from bench.common import REPO, Section, load_average, machine_info, run_section, to_json

SECTIONS = {
    "capture": "1. Capture overhead vs a bare forward pass",
    "layers": "2. All layers in one pass vs one pass per layer",
    "simulator": "3. Simulator throughput (all-at-once, local model)",
    "api": "4. API throughput and explainer prompt size",
    "lake": "5. Queries at full scale (GPT-2 XL-shaped lake)",
    "e2e": "6. End to end: the demo pipeline",
    "gpu": "7. GPU",
    "outputs": "8. Output tokens and search by meaning",
    "scorers": "9. Scorers: cost and agreement (detection, fuzzing, embedding vs simulation)",
    "vllm": "10. API simulation faithfulness: vLLM (top k) vs local",
}
# Execution order: the end-to-end run goes last, with whatever time is left.
ORDER = ["capture", "layers", "simulator", "lake", "api", "outputs", "vllm", "e2e", "gpu", "scorers"]
SEPARATE = {"scorers"}  # too long for the budget: `python -m bench.run --only scorers`
# Sizes of the scorers section (bench/scorer_bench.py): the demo's LLM neurons.
SCORER_SIZES = {
    "full": {"sequences": 400, "layers": "0,15,29", "neurons": "0-31", "llm_neurons": "0", "llm": "qwen2.5-coder-1.5b-instruct"},
    "quick": {"sequences": 48, "layers": "0", "neurons": "0-3", "llm_neurons": "0", "llm": "smollm2-135m-instruct"},
}

FULL = {
    "budget_s": 23 * 60,
    "capture_runs": [
        # The capture-overhead target: bare vs the project's capture, on a corpus several times the
        # samples' sizes (with k close to the corpus size nearly every excerpt is copied in).
        {"model": "smollm2", "batch": 32, "sequences": 256, "methods": ["bare", "project"]},
        # The same per-layer work over 3x the corpus: layers 0-9 (bare stops at layer 9 too), so the
        # median batch is past the first batches, where most excerpts still enter the samples.
        {"model": "smollm2", "batch": 32, "sequences": 768, "layers": list(range(10)), "methods": ["bare", "project"]},
        # The common alternatives, on one batch (their memory grows with the corpus: see the notes).
        {"model": "smollm2", "batch": 32, "sequences": 32, "methods": ["bare", "project", "cache_all", "hidden_states"], "targets": False},
        {"model": "gpt2-small", "batch": 16, "sequences": 160, "methods": ["bare", "project"]},
        {"model": "gpt2-small", "batch": 16, "sequences": 16, "methods": ["bare", "project", "cache_all", "hidden_states"], "targets": False},
        # torch's default on this machine: 2 intra-op threads (see the header on shared cores).
        {"model": "smollm2", "batch": 32, "sequences": 64, "methods": ["bare", "project"], "threads": 2, "targets": False},
    ],
    "corpus_sequences": 768,
    "layers_sequences": 16,
    "layers_model": "smollm2",
    "sim_excerpts": 8,
    "sim_reference": 6,
    "sim_batch_sizes": [1, 4, 8],
    "api_requests": 640,
    "api_requests_256": 1280,
    "api_reps": 3,
    "prompt_sequences": 200,
    "lake": {"layers": 48, "neurons": 6400, "record_layers": 4, "reps": 5},
    # The end-to-end run is `make demo`'s pipeline as it is (demo profile, no overrides): about 3 min
    # on 2 quiet cores since the capture got cheaper.
    "e2e_config": None,
    "outputs": {
        "bundled_layers": "0-29",
        "xl": {"layers": 3, "neurons": 6400, "hidden": 1600, "vocab": 50257},
        "embed_texts": 2000,
        "search": {"layers": 48, "neurons": 6400, "reps": 5},
    },
    # Seconds kept for the sections after each one (a slow machine skips work rather than overrun).
    "reserve": {"capture": 780, "layers": 690, "simulator": 600, "lake": 560, "api": 520, "outputs": 300, "vllm": 200, "e2e": 5, "gpu": 0, "scorers": 0},
    "min_s": {"capture": 60, "layers": 40, "simulator": 40, "lake": 30, "api": 30, "outputs": 60, "vllm": 120, "e2e": 120, "gpu": 0, "scorers": 0},
    # Section 10 needs vLLM's CPU build in its own venv (NEURON_PIPELINE_VLLM_PYTHON); without it, a note.
    "vllm_excerpts": 6,
}

QUICK = {
    "budget_s": 10 * 60,
    "capture_runs": [
        {"model": "gpt2-tiny", "batch": 8, "sequences": 24, "methods": ["bare", "project", "cache_all", "hidden_states"],
         "records": {"top_k": 10, "random_k": 5, "quantile_bins": 2, "per_quantile_bin": 1, "quantile_sample_size": 10,
                     "explain_top": 1, "score_top": 1, "score_random": 1}},
    ],
    "corpus_sequences": 24,
    "layers_sequences": 8,
    "layers_model": "gpt2-tiny",
    "sim_excerpts": 2,
    "sim_reference": 1,
    "sim_batch_sizes": [1, 2],
    "api_requests": 128,
    "api_requests_256": 256,
    "api_reps": 1,
    "prompt_sequences": 32,
    "lake": {"layers": 3, "neurons": 64, "record_layers": 2, "reps": 2},
    "e2e_config": "corpus:\n  max_sequences: 48\nlayers: 0-1\nneurons: 0-7\nexplainers:\n  - backend: baseline\nsimulators:\n  - backend: baseline\n",
    "outputs": {
        "bundled_layers": "0-1",
        "xl": {"layers": 1, "neurons": 256, "hidden": 50, "vocab": 5000},
        "embed_texts": 64,
        "search": {"layers": 2, "neurons": 64, "reps": 2, "cli_reps": 1},
    },
    "reserve": {k: 0 for k in ("capture", "layers", "simulator", "lake", "api", "outputs", "vllm", "e2e", "gpu", "scorers")},
    "min_s": {k: 0 for k in ("capture", "layers", "simulator", "lake", "api", "outputs", "vllm", "e2e", "gpu", "scorers")},
    "vllm_excerpts": 1,
}


def _gpu(section: Section) -> None:
    import torch

    if torch.cuda.is_available():
        section.add("CUDA device", torch.cuda.get_device_name(0), note="GPU benches are not implemented in this run")
    else:
        section.add("GPU", "not available in this task (no CUDA device; the project's device tool is not lent to it)")
        section.notes.append(
            "Nothing was measured on a GPU. On one, the capture's per-batch work (statistics, key sorts, "
            "payload copies) runs on the device next to the forward pass; the same ratios (capture / bare, one pass "
            "/ per layer, batched / reference simulator) are the figures to take, with randomly initialised GPT-2 "
            "small/XL configs where the hub is unreachable."
        )


def render(sections: list[Section], info: dict, args, started: datetime, wall: float, load_start: str, load_end: str, quick: bool) -> str:
    header_path = Path(__file__).with_name("header.md")
    out = [header_path.read_text().rstrip() + "\n" if header_path.is_file() else "# Benchmarks\n"]
    if quick:
        out.append("> **Quick mode** (`--quick`): toy sizes for a smoke test; the figures mean nothing.\n")
    out.append("## Machine and run\n")
    out.append("| | |\n|---|---|")
    out.append(f"| CPU | {info['cpu']} |")
    out.append(f"| cores / RAM | {info['cores']} / {info['ram']} (from /proc) |")
    out.append(f"| GPU | {'CUDA available' if info['cuda'] == 'True' else 'none'} |")
    out.append(f"| torch threads used | {info['torch_threads']} (e2e: torch default) |")
    out.append(
        "| versions | python " + info["python"] + ", " + ", ".join(f"{k[2:]} {v}" for k, v in info.items() if k.startswith("v_")) + " |"
    )
    out.append(f"| date | {started.strftime('%Y-%m-%d %H:%M UTC')} |")
    out.append(f"| command | `{' '.join(['python -m bench.run', *sys.argv[1:]])}` (`make bench`) |")
    out.append(f"| bench wall time | {wall / 60:.1f} min |")
    out.append(f"| load average (1/5/15 min) at start / end | {load_start} / {load_end} |")
    out.append("")
    out.append("## Targets\n")
    out.append("| section | metric | measured | target | status |\n|---|---|---|---|---|")
    for section in sections:
        short = section.title.split(" ", 1)[0]
        if section.error:
            out.append(f"| {short} | section failed | {section.error.splitlines()[0][:160]} | | **error** |")
        for row in section.rows:
            if row.met is not None:
                out.append(f"| {short} | {row.metric} | {row.value} | {row.target} | {row.status} |")
    out.append("")
    if not quick:
        from bench.recommend import recommendations

        try:
            out.append(recommendations({s.key: s for s in sections}))
        except Exception as exc:  # noqa: BLE001 - the report must still be written
            out.append(f"## What is left to gain\n\n(could not be rendered: {type(exc).__name__}: {exc})\n")
    for section in sections:
        out.append(f"## {section.title}\n")
        out.append(f"_Section time: {section.seconds:.0f} s._\n")
        if section.error:
            out.append("**This section failed:**\n\n```\n" + section.error.strip() + "\n```\n")
        if section.rows:
            out.append("| metric | measured | target | status | note |\n|---|---|---|---|---|")
            for row in section.rows:
                out.append(f"| {row.metric} | {row.value} | {row.target} | {row.status} | {row.note} |")
            out.append("")
        for table in section.tables:
            out.append(table + "\n")
        for note in section.notes:
            out.append(f"- {note}")
        out.append("")
    return "\n".join(out).rstrip() + "\n" + _kept_scale_block()


def _section_block(text: str, title: str) -> tuple[int, int] | None:
    """Where section ``title``'s block starts and ends in a report (up to the next section)."""
    from bench.scale_report import BEGIN

    head = f"## {title}\n"
    if head not in text:
        return None
    start = text.index(head)
    next_head, scale = text.find("\n## ", start + len(head)), text.find(BEGIN, start)
    ends = ([next_head + 1] if next_head != -1 else []) + ([scale] if scale != -1 else [])
    return start, min(ends, default=len(text))


def merge_sections(existing: str, report: str, sections: list[Section], run_line: str) -> str:
    """``--only``: the sections just measured replace their own blocks (and target rows) in the
    existing BENCHMARKS.md, each saying it was measured in its own run; the rest is kept."""
    for section in sections:
        found = _section_block(report, section.title)
        if found is None:
            continue
        block = report[found[0] : found[1]].replace("_Section time:", f"_Measured in its own run, {run_line}. Section time:", 1)
        old = _section_block(existing, section.title)
        if old is not None:
            existing = existing[: old[0]] + block + existing[old[1] :]
        else:
            from bench.scale_report import BEGIN

            cut = existing.find(BEGIN) if BEGIN in existing else len(existing)
            existing = existing[:cut] + block + "\n" + existing[cut:]
        short = section.title.split(" ", 1)[0]
        rows = [line for line in report.splitlines() if line.startswith(f"| {short} |")]
        lines = existing.splitlines()
        kept = [i for i, line in enumerate(lines) if line.startswith(f"| {short} |")]
        if kept:
            lines[kept[0] : kept[-1] + 1] = rows
        existing = "\n".join(lines) + "\n"
    return existing


def _kept_scale_block() -> str:
    """The whole-model section (``python -m bench.scale_report``: runs of 10+ minutes each, too long
    for this bench's budget) is carried over from the existing BENCHMARKS.md unchanged."""
    from bench.scale_report import BEGIN, END

    path = REPO / "BENCHMARKS.md"
    text = path.read_text() if path.is_file() else ""
    if BEGIN in text and END in text:
        return "\n" + text[text.index(BEGIN) : text.index(END) + len(END)] + "\n"
    return ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="toy sizes: a smoke test")
    parser.add_argument("--out", help="report path (default: BENCHMARKS.md; --quick: a temp folder)")
    parser.add_argument("--only", help=f"comma-separated sections: {','.join(ORDER)}")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for the timed sections (default 1: see the header)")
    parser.add_argument("--json", help="also dump raw numbers to this JSON file")
    parser.add_argument("--keep", action="store_true", help="keep the temp folder")
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import warnings

    warnings.filterwarnings("ignore")
    import torch

    torch.set_num_threads(args.threads)
    sizes = QUICK if args.quick else FULL
    # The scorer section runs the 1.5B through the pipeline (about 37 min on 2 cores): only with
    # --only scorers (or --quick); a full run keeps its last measured block.
    wanted = [k for k in ORDER if args.quick or k not in SEPARATE] if not args.only else [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in wanted if s not in SECTIONS]
    if unknown:
        parser.error(f"unknown sections {unknown}: choose from {', '.join(ORDER)}")
    tmp = Path(tempfile.mkdtemp(prefix="np-bench-", dir="/tmp"))
    out_path = Path(args.out) if args.out else (tmp.parent / "np-bench-quick" / "BENCHMARKS.md" if args.quick else REPO / "BENCHMARKS.md")
    started = datetime.now(timezone.utc)
    load_start = load_average()
    start = time.perf_counter()
    info = machine_info(args.threads)
    ids_holder: dict = {}
    deadline = time.monotonic() + sizes["budget_s"]
    current: dict = {}

    def left() -> float:
        """Seconds the current section may still use, keeping the later sections' reserve."""
        return deadline - time.monotonic() - sizes["reserve"][current["key"]]

    def ids() -> Path:
        if "path" not in ids_holder:
            from bench.capture_bench import corpus_ids

            ids_holder["path"] = corpus_ids(tmp / "ids.npy", sizes["corpus_sequences"])
        return ids_holder["path"]

    def capture(section):
        from bench.capture_bench import run_capture

        run_capture(section, ids(), sizes["capture_runs"], args.threads, left, min_seconds=sizes["min_s"]["capture"])

    def layers(section):
        from bench.capture_bench import run_layers

        run_layers(section, ids(), sizes["layers_sequences"], args.threads, left, sizes["layers_model"], results.get("capture"))

    def simulator(section):
        from bench.simulator_bench import run_simulator

        run_simulator(section, sizes["sim_excerpts"], sizes["sim_reference"], sizes["sim_batch_sizes"], args.threads)

    def lake(section):
        from bench.lake_bench import run_lake

        run_lake(section, tmp / "lake_bench", **sizes["lake"])

    def e2e(section):
        from bench.e2e_bench import run_e2e

        run_e2e(section, tmp / "e2e", sizes["e2e_config"], left())

    def api(section):
        from bench.api_bench import prompt_tokens, run_api

        try:
            run_api(section, concurrency=64, latency_s=0.2, n_requests=sizes["api_requests"], reps=sizes["api_reps"])
            # The issue-12 scale: 256 in flight at a 1 s latency (5 waves per repetition).
            run_api(section, concurrency=256, latency_s=1.0, n_requests=sizes["api_requests_256"], reps=sizes["api_reps"])
        finally:
            prompt_tokens(section, sequences=sizes["prompt_sequences"])

    def outputs(section):
        from bench.outputs_bench import run_outputs

        run_outputs(section, tmp / "outputs", sizes["outputs"])

    def vllm(section):
        from bench.vllm_bench import run_vllm

        run_vllm(section, n_excerpts=sizes["vllm_excerpts"])

    def scorers(section):
        from bench.scorer_bench import run_scorers

        run_scorers(section, tmp / "scorers", threads=args.threads, **SCORER_SIZES["quick" if args.quick else "full"])

    bodies = {"capture": capture, "layers": layers, "simulator": simulator, "api": api, "lake": lake, "e2e": e2e, "gpu": _gpu,
              "outputs": outputs, "vllm": vllm, "scorers": scorers}
    results: dict[str, Section] = {}
    interrupted: list[str] = []

    def write_report(final: bool) -> None:
        sections = [results[k] for k in SECTIONS if k in results]
        wall = time.perf_counter() - start
        report = render(sections, info, args, started, wall, load_start, load_average(), args.quick)
        if not final or interrupted:
            state = f"interrupted ({interrupted[0]})" if interrupted else "in progress"
            done = ", ".join(s.key for s in sections) or "none"
            report = report.replace(
                "## Machine and run\n",
                f"> **Partial report: run {state}**; sections finished: {done}.\n\n## Machine and run\n",
                1,
            )
        if not args.only and not args.quick and out_path.is_file():
            existing = out_path.read_text()
            for key in SEPARATE:  # carried over, measured in their own runs
                found = _section_block(existing, SECTIONS[key])
                if found is not None and key not in results:
                    report = merge_sections(report, existing[found[0] : found[1]], [Section(key, SECTIONS[key])], "")
        if args.only and not args.quick and out_path.is_file():
            run_line = (
                f"`{' '.join(['python -m bench.run', *sys.argv[1:]])}` ({info['cpu']}, {info['cores']} cores, "
                f"{started.strftime('%Y-%m-%d %H:%M UTC')}, {wall / 60:.1f} min, load average {load_start} / "
                f"{load_average()} at start / end)"
            )
            report = merge_sections(out_path.read_text(), report, sections, run_line)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        partial = out_path.with_name(out_path.name + ".partial")
        partial.write_text(report)
        os.replace(partial, out_path)  # readers never see half a file
        if args.json:
            Path(args.json).write_text(to_json(sections))

    def on_signal(signum, frame):  # SIGTERM: stop, but still write what was measured
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second one must not stop the report being written
        raise KeyboardInterrupt(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, on_signal)
    try:
        for key in ORDER:
            if key not in wanted:
                continue
            current["key"] = key
            if left() < sizes["min_s"][key]:
                skipped = Section(key, SECTIONS[key])
                skipped.error = (
                    f"skipped: {left():.0f} s left in the {sizes['budget_s'] / 60:.0f}-minute budget after keeping "
                    f"{sizes['reserve'][key]} s for the sections after it (machine too slow or too busy)"
                )
                results[key] = skipped
                continue
            results[key] = run_section(key, SECTIONS[key], bodies[key])
            write_report(final=False)  # a run stopped later still leaves these figures
    except KeyboardInterrupt as exc:
        interrupted.append(str(exc) or "KeyboardInterrupt")
    finally:
        write_report(final=True)
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"[bench] wrote {out_path} ({(time.perf_counter() - start) / 60:.1f} min)" + (" — INTERRUPTED" if interrupted else ""))
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
