"""Stage-level API utilization: ``neuron-pipeline run`` end to end against the fake OpenAI server.

For each concurrency and simulator mode, one CLI run (bundled SmolLM2, a short corpus, several
layers) with an OpenAI-compatible explainer and simulator pointed at ``tests/fake_openai.py`` with a
fixed latency per answer. The Dagster instance (a temporary ``DAGSTER_HOME``) gives each stage's
step start and end; the fake server records every request's arrival and answer. Utilization of a
stage = requests in flight integrated over the step's wall time / (wall time x concurrency):
1.0 means the configured limit was full from the step's first to its last instant, including its
non-LLM work (reading records, quality gates, writes). The same figure over the stage's LLM window
(first request to last answer) is shown next to it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench.common import REPO, Section

# (name, fake server logprobs mode, simulator settings, explainer extra settings)
SCENARIOS = [
    ("prompt_logprobs", "full", {"mode": "prompt_logprobs"}, {}),
    ("top_logprobs", "openai", {"mode": "top_logprobs"}, {}),
    ("integers", "openai", {"mode": "integers"}, {}),
    ("best_of_2+revise", "openai", {"mode": "top_logprobs"}, {"best_of": 2, "revise": True}),
]


def _sizes(concurrency: int, scenario: str, waves: int) -> dict:
    """Layers and neurons so each stage has about ``waves`` rounds of ``concurrency`` requests
    (requests per neuron: explanation 1, or ~20 with best-of-2 and a revision; simulation 10
    excerpts, 20 requests in prompt-logprob mode where "10" is two tokens)."""
    requests = concurrency * waves
    explain_per_neuron = 20 if scenario.startswith("best_of") else 1
    simulate_per_neuron = 20 if scenario == "prompt_logprobs" else 10
    layers = 2 if concurrency <= 64 else 6
    return {
        "layers": f"0-{layers - 1}",
        "explain_neurons": max(1, min(1536, requests // explain_per_neuron // layers)),
        "simulate_neurons": max(1, requests // simulate_per_neuron // layers),
    }


def _config(path: Path, base_url: str, model: str, concurrency: int, scenario: tuple, sizes: dict) -> Path:
    name, _, simulator, explainer = scenario
    lines = [
        "corpus:\n  max_sequences: 64",
        f"layers: {sizes['layers']}",
        "neurons: all",
        "explainers:",
        f"  - backend: openai\n    model: {model}\n    base_url: {base_url}\n    concurrency: {concurrency}\n"
        f"    api_key_env: NP_BENCH_KEY\n    neurons: 0-{sizes['explain_neurons'] - 1}",
    ]
    lines += [f"    {k}: {str(v).lower() if isinstance(v, bool) else v}" for k, v in explainer.items()]
    lines += [
        "simulators:",
        f"  - backend: openai\n    model: {model}\n    base_url: {base_url}\n    concurrency: {concurrency}\n"
        f"    api_key_env: NP_BENCH_KEY\n    neurons: 0-{sizes['simulate_neurons'] - 1}",
    ]
    lines += [f"    {k}: {v}" for k, v in simulator.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def _step_windows(home: Path) -> dict[str, tuple[float, float]]:
    """Wall-clock (start, end) of every step of the runs stored under DAGSTER_HOME ``home``."""
    import dagster as dg

    os.environ["DAGSTER_HOME"] = str(home)
    instance = dg.DagsterInstance.get()
    windows: dict[str, tuple[float, float]] = {}
    try:
        for run in reversed(instance.get_runs()):  # oldest first: a later run's step wins
            starts: dict[str, float] = {}
            for record in instance.all_logs(run.run_id):
                event = record.dagster_event
                if event is None or not record.step_key:
                    continue
                if event.event_type_value == "STEP_START":
                    starts[record.step_key] = record.timestamp
                elif event.event_type_value in ("STEP_SUCCESS", "STEP_FAILURE") and record.step_key in starts:
                    windows[record.step_key] = (starts[record.step_key], record.timestamp)
    finally:
        instance.dispose()
        os.environ.pop("DAGSTER_HOME", None)
    return windows


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a running process (all its threads)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0


def _cpu_between(samples: list[tuple[float, float]], lo: float, hi: float) -> float:
    """CPU seconds spent between wall times ``lo`` and ``hi`` (from the nearest samples)."""
    inside = [cpu for t, cpu in samples if lo <= t <= hi]
    return max(inside) - min(inside) if len(inside) >= 2 else 0.0


def utilization(intervals: list[tuple[float, float]], window: tuple[float, float], concurrency: int) -> float:
    """Requests in flight integrated over ``window`` / (window length x concurrency)."""
    lo, hi = window
    busy = sum(max(0.0, min(end, hi) - max(start, lo)) for start, end in intervals)
    return busy / max(hi - lo, 1e-9) / concurrency


def run_one(tmp: Path, concurrency: int, scenario: tuple, latency_s: float, waves: int) -> dict:
    sys.path.insert(0, str(REPO))
    from tests.fake_openai import FakeOpenAIServer

    name, server_mode, _, _ = scenario
    sizes = _sizes(concurrency, name, waves)
    folder = tmp / f"{name}-c{concurrency}"
    # A fresh lake each time: an earlier run's LLM cache would answer the same prompts for free
    # and the stage would send nothing (as happened when the explainer prompt alone changed).
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    with FakeOpenAIServer(latency_s=latency_s, logprobs_mode=server_mode, max_lifetime_s=3600) as fake:
        offset = time.time() - time.monotonic()  # the server records monotonic times; Dagster wall times
        config = _config(folder / "config.yaml", fake.base_url, f"fake-{name}-c{concurrency}", concurrency, scenario, sizes)
        env = {**os.environ, "NP_BENCH_KEY": "sk-bench", "DAGSTER_HOME": str(folder / "dagster"), "PYTHONPATH": str(REPO)}
        (folder / "dagster").mkdir(exist_ok=True)
        started = time.perf_counter()
        log = open(folder / "cli.log", "w+")
        process = subprocess.Popen(
            [sys.executable, "-m", "neuron_pipeline.cli", "run", "--config", str(config), "--lake", str(folder / "lake")],
            stdout=log, stderr=subprocess.STDOUT, text=True, env=env, cwd=folder,
        )
        cpu_samples = []  # (wall time, CPU seconds of the CLI process): its CPU per request per stage
        while process.poll() is None:
            cpu_samples.append((time.time(), _cpu_seconds(process.pid)))
            time.sleep(0.25)
        wall = time.perf_counter() - started
        log.seek(0)
        if process.returncode != 0:
            raise RuntimeError(f"{name} c{concurrency}: exit {process.returncode}: {log.read().strip().splitlines()[-1:]}")
        log.close()
        intervals = [(r.t_arrival + offset, r.t_end + offset) for r in fake.requests if r.method == "POST" and r.t_end]
    windows = _step_windows(folder / "dagster")
    result = {"scenario": name, "concurrency": concurrency, "latency_s": latency_s, "cli_wall_s": wall, **sizes, "stages": {}}
    for stage in ("explanations", "simulations"):
        window = windows.get(stage)
        if window is None:
            continue
        inside = [(s, e) for s, e in intervals if s >= window[0] - 0.5 and e <= window[1] + 0.5]
        llm = (min(s for s, _ in inside), max(e for _, e in inside)) if inside else window
        cpu = _cpu_between(cpu_samples, *llm)
        result["stages"][stage] = {
            "wall_s": window[1] - window[0],
            "requests": len(inside),
            # The CLI process's CPU (all threads) over the LLM window, per request and in cores:
            # with one GIL, what one process can feed is about 1 / (GIL-held CPU per request).
            "cpu_ms_per_request": 1000 * cpu / max(len(inside), 1),
            "cpu_cores": cpu / max(llm[1] - llm[0], 1e-9),
            "utilization": utilization(inside, window, concurrency),
            "llm_window_s": llm[1] - llm[0],
            "llm_window_utilization": utilization(inside, llm, concurrency),
        }
    return result


def run_stages(section: Section, tmp: Path, concurrencies=(64, 256), latency_s: float = 1.0, waves: int = 30,
               scenarios=SCENARIOS) -> None:
    results = []
    for concurrency in concurrencies:
        for scenario in scenarios:
            print(f"[bench] stages: {scenario[0]} at concurrency {concurrency} ...", flush=True)
            result = run_one(tmp, concurrency, scenario, latency_s, waves)
            results.append(result)
            print(json.dumps(result), flush=True)
    stages_section(section, results, latency_s, waves)


def stages_section(section: Section, results: list[dict], latency_s: float, waves: int) -> None:
    """The stage bench's rows, table and notes from its runs' results (also from a stopped
    bench's printed results)."""
    rows = []
    for result in results:
        section.data.setdefault("runs", []).append(result)
        for stage, figures in result["stages"].items():
            rows.append((result["scenario"], result["concurrency"], stage, figures))
            section.add(
                f"{stage}, {result['scenario']}, concurrency {result['concurrency']}",
                f"{figures['utilization']:.2f}",
                ">= 0.90",
                figures["utilization"] >= 0.90,
                note=f"{figures['requests']} requests in {figures['wall_s']:.1f} s",
            )
    table = ["| mode | concurrency | stage | requests | step wall | in flight / concurrency (step) | LLM window | in flight / concurrency (LLM window) | CLI CPU per request (cores) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, concurrency, stage, f in rows:
        table.append(
            f"| {name} | {concurrency} | {stage} | {f['requests']:,} | {f['wall_s']:.1f} s | {f['utilization']:.2f} | "
            f"{f['llm_window_s']:.1f} s | {f['llm_window_utilization']:.2f} | {f['cpu_ms_per_request']:.1f} ms ({f['cpu_cores']:.2f}) |"
        )
    section.tables.append("\n".join(table))
    section.notes.append(
        f"Each run: `neuron-pipeline run` (bundled SmolLM2, 64 sequences, baseline-free: OpenAI-compatible explainer "
        f"and simulator) against `tests/fake_openai.py` answering after {latency_s:g} s; sizes chosen for about "
        f"{waves} rounds of `concurrency` requests per stage. 'step' is the Dagster step from start to end (reading "
        "records, quality gates and writes included); 'LLM window' is its first request to its last answer."
    )
