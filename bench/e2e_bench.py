"""Section 6: the demo pipeline end to end through the CLI, with per-step durations (from the
Dagster instance's event log) and per-step peak RSS (sampled from the process tree)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench.common import REPO, RSSSampler, Section, fmt_bytes, fmt_s


def _step_windows(home: Path) -> list[dict]:
    """Per run and step: start, end, status, from the instance's event log."""
    import dagster as dg

    previous = os.environ.get("DAGSTER_HOME")
    os.environ["DAGSTER_HOME"] = str(home)
    try:
        instance = dg.DagsterInstance.get()
    finally:
        if previous is None:
            os.environ.pop("DAGSTER_HOME", None)
        else:
            os.environ["DAGSTER_HOME"] = previous
    steps: list[dict] = []
    try:
        runs = sorted(instance.get_runs(), key=lambda r: instance.get_run_record_by_id(r.run_id).create_timestamp)
        for run_index, run in enumerate(runs):
            records = instance.get_records_for_run(run.run_id, limit=100_000).records
            starts: dict[str, float] = {}
            for record in records:
                entry = record.event_log_entry
                event = entry.dagster_event
                if event is None or not entry.step_key:
                    continue
                kind = event.event_type_value
                if kind == "STEP_START":
                    starts[entry.step_key] = entry.timestamp
                elif kind in ("STEP_SUCCESS", "STEP_FAILURE") and entry.step_key in starts:
                    steps.append(
                        {
                            "run": run_index,
                            "tags": dict(run.tags),
                            "step": entry.step_key,
                            "start": starts.pop(entry.step_key),
                            "end": entry.timestamp,
                            "status": "ok" if kind == "STEP_SUCCESS" else "failed",
                        }
                    )
    finally:
        instance.dispose()
    return sorted(steps, key=lambda s: s["start"])


def run_e2e(section: Section, root: Path, config_yaml: str | None, timeout_s: float) -> None:
    if root.exists():
        shutil.rmtree(root)
    home = root / "dagster_home"
    home.mkdir(parents=True)
    shutil.copy(REPO / "deploy" / "dagster.yaml", home / "dagster.yaml")
    lake = root / "lake"
    command = [str(Path(sys.executable).with_name("neuron-pipeline")), "run", "--profile", "demo", "--lake", str(lake), "--verbose"]
    if config_yaml:
        config = root / "bench.yaml"
        config.write_text(config_yaml)
        command += ["--config", str(config)]
    env = dict(os.environ, DAGSTER_HOME=str(home), TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    env.pop("OMP_NUM_THREADS", None)  # as `make demo` runs it: torch's default thread count
    log_path = root / "run.log"
    start = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
        with RSSSampler(pid=proc.pid, interval=0.1, tree=True) as sampler:
            sampler.keep_samples = True
            try:
                code = proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                code = "timeout"
    wall = time.time() - start
    if code != 0:
        tail = log_path.read_text().strip().splitlines()[-8:]
        raise RuntimeError(f"demo run exited with {code} after {wall:.0f} s: " + " | ".join(tail))
    steps = _step_windows(home)
    samples = sampler.samples
    section.data.update(wall_s=wall, peak_rss=sampler.peak, steps=steps, command=" ".join(command))
    section.add(
        "demo pipeline wall time (`neuron-pipeline run --profile demo`)",
        f"{fmt_s(wall)}" + (" (demo profile with overrides: " + config_yaml.strip().replace(chr(10), " ") + ")" if config_yaml else " (full demo profile)"),
    )
    section.add("peak RSS of the run (process tree)", fmt_bytes(sampler.peak))
    rows = ["| run | step | wall | share | peak RSS during step |", "|---|---|---:|---:|---:|"]
    total_steps = sum(s["end"] - s["start"] for s in steps) or 1.0
    for s in steps:
        during = [rss for t, rss in samples if s["start"] - 0.05 <= t <= s["end"] + 0.05]
        peak = max(during) if during else 0
        s["peak_rss"] = peak
        label = s["tags"].get("dagster/asset_partition_range_start")
        run_label = f"layers {label}-{s['tags'].get('dagster/asset_partition_range_end')}" if label else f"run {s['run']}"
        rows.append(
            f"| {run_label} | `{s['step']}`{'' if s['status'] == 'ok' else ' (failed)'} | {fmt_s(s['end'] - s['start'])} | "
            f"{(s['end'] - s['start']) / wall:.0%} | {fmt_bytes(peak) if peak else 'n/a'} |"
        )
    outside = wall - total_steps
    rows.append(f"| | outside steps (imports, definitions, run start/stop, summary) | {fmt_s(outside)} | {outside / wall:.0%} | |")
    section.tables.append("\n".join(rows))
    section.notes.append(
        "Step windows come from STEP_START / STEP_SUCCESS events in the run's Dagster instance (a fresh "
        "DAGSTER_HOME with deploy/dagster.yaml); RSS is sampled every 0.1 s over the CLI process and its children. "
        "The CLI runs every step in-process, so RSS during a step includes what earlier steps left allocated "
        "(e.g. the subject model stays loaded)."
    )
    section.data["lake"] = str(lake)
    try:
        from neuron_pipeline.lake import read_table, table_exists

        if table_exists(lake, "explanations"):
            explanations = read_table(lake, "explanations")
            llm = explanations.filter(explanations["explainer_id"].str.starts_with("llm"))
            if llm.height:
                section.add(
                    "explainer tokens per neuron, local SmolLM2 (from the run's explanations table)",
                    f"prompt median {llm['prompt_tokens'].median():,.0f}, completion median "
                    f"{llm['completion_tokens'].median():,.0f} ({llm.height} neuron(s); completions are capped at "
                    "`max_tokens` 60)",
                )
    except Exception as exc:  # noqa: BLE001 - a reporting extra
        section.notes.append(f"could not read the run's explanations: {exc}")
