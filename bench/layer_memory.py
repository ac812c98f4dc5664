"""Trace a whole run's memory layer by layer: what grows with the number of layers, and where.

    python -m bench.layer_memory --config C --layers 0-11 --out DIR [--model-layers 12]

Runs ``neuron-pipeline run`` in this process (DAGSTER_HOME under DIR) and records the resident
memory (1) every 0.2 s and (2) around every ``release_memory`` call, which each stage makes
after a layer is written: the RSS before and after the release, with the stage that made it.
Printed per stage: RSS at the step's start, its peak, at its end, and the range of the per-layer
peaks. A stage whose per-layer peaks climb with the layer index holds something per layer; one
whose peaks are flat but start higher in a run of more layers carries something over from an
earlier stage. Without ``--config``, a randomly initialised Llama with 2,048 neurons per layer
(``tests/test_scale.py``'s model, 12 layers) over a 400-sequence random corpus.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
import threading
import time
from pathlib import Path

from bench.common import REPO

_STAGE_FUNCTIONS = {
    "capture": "capture", "explain_layers": "explanations", "explanation_embeddings": "explanation_embeddings",
    "simulate_layers": "simulations", "scores": "scores", "layer_summary": "layer_summary", "build_viewer": "neuron_viewer",
}  # fmt: skip


def _rss_mib() -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) // 1024
    return 0


def _default_setup(out: Path, layers: int) -> Path:
    import numpy as np

    sys.path.insert(0, str(REPO / "tests"))
    from test_scale import _tiny_model  # the structural test's model, at this bench's size

    model = out / "model"
    if not (model / "config.json").is_file():
        _tiny_model(model, layers, 2048)
    rng = np.random.default_rng(0)
    corpus = out / "corpus.txt"
    corpus.write_text("\n".join(" ".join(f"t{i}" for i in rng.integers(3, 128, 400)) for _ in range(200)))
    config = out / "config.yaml"
    config.write_text(
        f"subject:\n  model: {model}\n  threads: 1\ncorpus:\n  source: {corpus}\n  sequence_length: 64\n  max_sequences: 400\n"
        "neurons: all\nexplainers:\n  - backend: baseline\nsimulators:\n  - backend: baseline\nscorers: []\n"
    )
    return config


def trace(config: Path, layers: str, out: Path) -> dict:
    home = out / f"dagster-{layers}"
    home.mkdir(parents=True, exist_ok=True)
    os.environ.update({"DAGSTER_HOME": str(home), "HF_HUB_OFFLINE": "1"})
    import neuron_pipeline.memory as memory
    from neuron_pipeline.cli import main as cli_main

    events: list[dict] = []
    samples: list[tuple[float, int]] = []
    original = memory.release_memory

    def traced(collect: bool = True) -> None:
        before = _rss_mib()
        original(collect)
        names = [frame.function for frame in inspect.stack()[1:8]]
        stage = next((_STAGE_FUNCTIONS[n] for n in names if n in _STAGE_FUNCTIONS), "?")
        events.append({"t": time.time(), "stage": stage, "before": before, "after": _rss_mib()})

    for module in list(sys.modules.values()):  # every stage module imported the function by name
        if getattr(module, "__name__", "").startswith("neuron_pipeline") and getattr(module, "release_memory", None) is original:
            module.release_memory = traced
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.2):
            samples.append((time.time(), _rss_mib()))

    threading.Thread(target=sample, daemon=True).start()
    lake = out / f"lake-{layers}"
    code = cli_main(["run", "--config", str(config), "--layers", layers, "--lake", str(lake)])
    stop.set()
    from bench.scale_bench import stage_samples

    stages = {}
    for stage, (lo, _), inside in stage_samples(home, samples):
        mine = [e for e in events if e["stage"] == stage]
        # Per-layer peak: the sampled maximum between one release and the next.
        marks = [lo] + [e["t"] for e in mine]
        per_layer = [max((r for t, r in samples if a <= t <= b), default=0) for a, b in zip(marks, marks[1:])]
        stages[stage] = {
            "start": inside[0] if inside else 0, "peak": max(inside, default=0), "end": inside[-1] if inside else 0,
            "layer_peaks": per_layer, "after_release": [e["after"] for e in mine],
        }  # fmt: skip
    return {"code": code, "layers": layers, "stages": stages}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.layer_memory", description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, help="a run config (default: the tiny 2,048-neuron Llama)")
    parser.add_argument("--layers", required=True, help='the run\'s layers, e.g. "0-11"')
    parser.add_argument("--model-layers", type=int, default=12, help="layers of the default model")
    parser.add_argument("--out", type=Path, default=Path("/tmp/np-layer-memory"))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    config = args.config or _default_setup(args.out, args.model_layers)
    result = trace(config, args.layers, args.out)
    (args.out / f"trace-{args.layers}.json").write_text(json.dumps(result, indent=1))
    print(f"layers {args.layers} (exit {result['code']}): RSS in MiB")
    for stage, s in result["stages"].items():
        peaks = s["layer_peaks"]
        spread = f", per-layer peaks {min(peaks)}-{max(peaks)} over {len(peaks)} layers" if peaks else ""
        print(f"  {stage:24s} start {s['start']:5d}  peak {s['peak']:5d}  end {s['end']:5d}{spread}")
    return 0 if result["code"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
