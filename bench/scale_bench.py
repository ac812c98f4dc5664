"""A whole model on one machine: ``neuron-pipeline run`` over every neuron of many layers.

One CLI run per configuration (a subprocess with its own ``DAGSTER_HOME``), its resident memory
sampled every 0.25 s; the Dagster step windows split the samples by stage (peak memory per
stage) and give each stage's wall time. Reported with the lake's size on disk and, for the
GPT-2 XL shape, the extrapolation to all 48 layers and to the paper's corpus.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from bench.common import REPO, Section, fmt_bytes
from bench.stages_bench import _step_windows

STAGES = [
    "corpus_tokens", "capture", "neuron_output_tokens", "explanations", "explanation_embeddings", "scorer_results",
    "simulations", "scores", "layer_summary", "neuron_viewer",
]  # fmt: skip
# The embedding scorer is left out of the whole-model runs: on 2 CPU cores it embeds ~19 short
# texts per explanation at a few hundred texts/s (about 3 s per 32 neurons in the demo), over an
# hour for 46,080 neurons. Stated next to the results.
NO_SCORERS = "scorers: []\n"


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _folder_bytes(folder: Path, skip: tuple[str, ...] = ("_llm_cache",)) -> int:
    total = 0
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if d not in skip]
        total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
    return total


def gpt2_xl_model(folder: Path, layers: int = 48) -> Path:
    """A randomly initialised GPT-2 XL config (speed and memory do not depend on the weights),
    saved with a word-level tokenizer built from the corpus vocabulary of GPT-2's size."""
    import torch
    import transformers

    if (folder / "config.json").is_file():
        return folder
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=1600, n_layer=layers, n_head=25, n_positions=1024, vocab_size=50257)
    model = transformers.GPT2LMHeadModel(config)
    model.save_pretrained(folder)
    # GPT-2's own tokenizer files are not available offline: SmolLM2's BPE stands in (its ids fit
    # in GPT-2's vocabulary).
    from neuron_pipeline.subject import load_subject
    from neuron_pipeline.config import SubjectSettings

    load_subject(SubjectSettings()).tokenizer.save_pretrained(folder)
    return folder


# The given stages, over every layer of the config, as one Dagster range run and then
# the viewer: what a user does from the UI ("materialize selected" over a partition range) to
# finish a run whose earlier stages are stored. (`neuron-pipeline run` would redo the capture.)
_RESUME = """
import sys
import dagster as dg
from neuron_pipeline.config import load_settings, parse_index_spec
from neuron_pipeline.definitions import build_definitions
from neuron_pipeline.subject import describe_subject

config, lake, stages = sys.argv[1], sys.argv[2], sys.argv[3].split(",")
settings = load_settings(config_file=config, overrides={"lake": lake})
layers = parse_index_spec(settings.layers, describe_subject(settings.subject).num_layers, "layer")
defs = build_definitions(settings)
from neuron_pipeline.assets.run_owner import fail_dead_runs
instance = dg.DagsterInstance.get()  # the stopped run's DAGSTER_HOME: its step windows are read back
fail_dead_runs(instance)  # the stopped run's pool slot
layer_stages = [dg.AssetKey(s) for s in stages if s != "neuron_viewer"]
tags = {"dagster/asset_partition_range_start": str(min(layers)), "dagster/asset_partition_range_end": str(max(layers))}
if layer_stages:  # resuming from the viewer leaves no layer stage to run
    assert dg.materialize(list(defs.assets), selection=layer_stages, resources=defs.resources, tags=tags, instance=instance).success
if "neuron_viewer" in stages:
    assert dg.materialize(list(defs.assets), selection=[dg.AssetKey("neuron_viewer")], resources=defs.resources, instance=instance).success
"""


def run_whole(folder: Path, config_text: str, extra_args: list[str] | None = None, resume_from: str | None = None) -> dict:
    """One whole-model run; with ``resume_from`` (a stage), only that stage and the ones after it,
    over the lake a stopped run left in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "config.yaml"
    config.write_text(config_text)
    home = folder / "dagster"
    home.mkdir(exist_ok=True)
    env = {**os.environ, "DAGSTER_HOME": str(home), "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    lake = folder / "lake"
    log = open(folder / ("cli.log" if resume_from is None else f"resume-{resume_from}.log"), "w")
    started_wall = time.time()
    if resume_from is None:
        command = [sys.executable, "-m", "neuron_pipeline.cli", "run", "--config", str(config), "--lake", str(lake), *(extra_args or [])]
    else:
        stages = ",".join(STAGES[STAGES.index(resume_from):])
        command = [sys.executable, "-c", _RESUME, str(config), str(lake), stages]
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=folder)
    samples: list[tuple[float, int]] = []
    while process.poll() is None:
        samples.append((time.time(), _rss(process.pid)))
        time.sleep(0.25)
    wall = time.time() - started_wall
    log.close()
    # A run that failed or was stopped still reports the stages it finished (a 307,200-neuron run
    # can outlast a session): its result carries the error.
    error = None
    if process.returncode != 0:
        tail = Path(log.name).read_text().strip().splitlines()[-3:]
        error = f"neuron-pipeline run exited {process.returncode}: {tail}"
    stages = {
        stage: {"wall_s": hi - lo, "peak_rss": max(inside) if inside else 0}
        for stage, (lo, hi), inside in stage_samples(home, samples)
    }
    viewer = folder / "viewer"
    return {
        "wall_s": wall,
        "peak_rss": max(rss for _, rss in samples) if samples else 0,
        "stages": stages,
        "lake_bytes": _folder_bytes(lake),
        "viewer_bytes": _folder_bytes(viewer) if viewer.is_dir() else 0,
        "viewer_files": sum(len(files) for _, _, files in os.walk(viewer)) if viewer.is_dir() else 0,
        "progress_lines": sum(1 for line in Path(log.name).read_text().splitlines() if line.startswith("progress ")),
        **({"error": error} if error else {}),
    }


def stage_samples(home: Path, samples: list[tuple[float, int]]):
    """(stage, (start, end), the RSS samples inside its step window) for each stage that ran,
    in pipeline order, from the Dagster instance under ``home``."""
    windows = _step_windows(home)
    for stage in STAGES:
        if stage in windows:
            lo, hi = windows[stage]
            yield stage, (lo, hi), [rss for t, rss in samples if lo <= t <= hi]


def smollm2_config(layers: str, sequences: int = 2000) -> str:
    return (
        f"profile: demo\ncorpus:\n  max_sequences: {sequences}\nlayers: \"{layers}\"\nneurons: all\n"
        "explainers:\n  - backend: baseline\nsimulators:\n  - backend: baseline\n" + NO_SCORERS
    )


def gpt2_config(model: Path, layers: str, sequences: int) -> str:
    return (
        f"profile: demo\nsubject:\n  model: {model}\n  batch_size: 16\ncorpus:\n  max_sequences: {sequences}\n"
        f"layers: \"{layers}\"\nneurons: all\nexplainers:\n  - backend: baseline\nsimulators:\n  - backend: baseline\n"
        + NO_SCORERS
    )


def table(results: dict[str, dict]) -> str:
    head = "| run | wall | peak RSS | " + " | ".join(f"{s} (wall / peak)" for s in STAGES) + " | lake | viewer |"
    lines = [head, "|" + "---|" * (5 + len(STAGES))]
    for name, r in results.items():
        cells = [
            f"{r['stages'][s]['wall_s']:.0f} s / "
            + (fmt_bytes(r["stages"][s]["peak_rss"]) if r["stages"][s]["peak_rss"] else "not sampled")
            if s in r["stages"] else ("not run" if r.get("error") else "—")
            for s in STAGES
        ]
        lines.append(
            f"| {name} | {r['wall_s'] / 60:.1f} min | {fmt_bytes(r['peak_rss'])} | " + " | ".join(cells)
            + f" | {fmt_bytes(r['lake_bytes'])} | "
            + (f"{r['viewer_files']:,} files, {fmt_bytes(r['viewer_bytes'])}" if r["viewer_files"] else "not built")
            # A viewer build stopped part-way (a 307,200-neuron run outlasts a session): how far it got.
            + (f" ({r['viewer_partial']}) |" if r.get("viewer_partial") else " |")
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m bench.scale_bench")
    parser.add_argument("runs", nargs="+", help="smollm2:<layers> or gpt2xl:<layers>:<sequences>")
    parser.add_argument("--out", default="/tmp/np-scale-bench")
    parser.add_argument("--resume-from", choices=STAGES, help="finish a stopped run from this stage on (its earlier stages' figures are kept)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    saved = out / "results.json"
    results = json.loads(saved.read_text()) if saved.is_file() else {}
    for spec in args.runs:
        kind, *rest = spec.split(":")
        if kind == "smollm2":
            text = smollm2_config(rest[0], int(rest[1]) if len(rest) > 1 else 2000)
        else:
            model = gpt2_xl_model(out / "gpt2-xl-random")
            text = gpt2_config(model, rest[0], int(rest[1]))
        print(f"[scale] {spec} ...", flush=True)
        if args.resume_from and spec in results:
            earlier = results[spec]
            resumed = run_whole(out / spec.replace(":", "_"), text, resume_from=args.resume_from)
            kept = {k: v for k, v in earlier["stages"].items() if STAGES.index(k) < STAGES.index(args.resume_from)}
            results[spec] = {
                **resumed,
                "stages": {**kept, **{k: v for k, v in resumed["stages"].items() if k not in kept}},
                "wall_s": earlier["wall_s"] + resumed["wall_s"],
                "peak_rss": max(earlier["peak_rss"], resumed["peak_rss"]),
                "progress_lines": earlier.get("progress_lines", 0) + resumed["progress_lines"],
                "resumed_from": args.resume_from,
                **({"sampled_from": earlier["sampled_from"]} if "sampled_from" in earlier else {}),
            }
        else:
            results[spec] = run_whole(out / spec.replace(":", "_"), text)
        print(json.dumps({spec: results[spec]}), flush=True)
        (out / "results.json").write_text(json.dumps(results, indent=1))
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
