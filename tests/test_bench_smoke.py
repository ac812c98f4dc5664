"""Smoke tests of the bench's non-timing parts (no timing asserts): the capture methods it
compares return the same records, the synthetic lake writer and queries work at a tiny scale,
and a failing section lands in the report."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from neuron_pipeline.config import RecordsSettings
from neuron_pipeline.subject.capture import capture_layers

# `bench` is a top-level folder of the repository, not an installed package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TINY_RECORDS = dict(top_k=6, random_k=4, quantile_bins=3, per_quantile_bin=1, quantile_sample_size=10, explain_top=1, score_top=1, score_random=1)


def test_capture_methods_agree(tmp_path):
    """Every method the capture bench times returns the project's records (so the ratios compare
    equal work), and the bench's per-batch driver equals ``capture_layers``."""
    from bench.capture_methods import Streaming, compare_captures
    from bench.capture_worker import load_bench_subject, run

    ids = np.random.default_rng(1).integers(0, 1000, (20, 16))
    path = tmp_path / "ids.npy"
    np.save(path, ids)
    out = run(
        {
            "model": "gpt2-tiny",
            "tokens": str(path),
            "batch": 8,
            "methods": ["bare", "project", "cache_all", "hidden_states"],
            "records": TINY_RECORDS,
        }
    )
    for name in ("cache_all", "hidden_states"):
        assert out["methods"][name]["differences"] == [], name
    assert len(out["methods"]["bare"]["steps"]) == 3

    subject = load_bench_subject("gpt2-tiny")
    records = RecordsSettings(**TINY_RECORDS)
    neurons = list(range(subject.num_neurons))
    driver = Streaming(subject, [0, 2], neurons, records, len(ids), ids.shape[1])
    driver.setup()
    for start in range(0, len(ids), 8):
        driver.step(torch.as_tensor(ids[start : start + 8]), start)
    expected = capture_layers(subject, ids, [0, 2], neurons, records, batch_size=8)
    assert compare_captures(expected, driver.finish(), stats_rtol=0) == []


def test_synthetic_lake_tiny(tmp_path):
    from bench.common import Section
    from bench.lake_bench import run_lake

    section = Section("lake", "lake")
    run_lake(section, tmp_path, layers=2, neurons=16, record_layers=1, reps=1)
    assert section.error is None
    assert section.data["sizes"]["activation_records"] > 0
    assert set(section.data["query_times"]) == {"top", "neuron", "hist"}
    assert not (tmp_path / "lake").exists()  # deleted afterwards


def test_api_bench_tiny():
    """Both clients of the API section run against the fake server and land in its table."""
    from bench.api_bench import CLIENTS, run_api
    from bench.common import Section

    section = Section("api", "api")
    run_api(section, concurrency=4, latency_s=0.01, n_requests=16, reps=1)
    (run,) = section.data["runs"].values()
    assert set(run["rates"]) == set(CLIENTS) and all(run["rates"].values())
    assert all(per > 0 for per in run["cpu"]["project"])  # the client's CPU per request is measured
    assert [row.target for row in section.rows] == [">= 90% of ideal", "< 0.5 cores (not the bottleneck on 2)", "reference"]
    assert all(label in section.tables[0] for label in CLIENTS.values())


def test_failing_section_is_reported():
    from bench.common import run_section
    from bench.run import render

    def boom(section):
        section.add("before", "1")
        raise RuntimeError("no model here")

    section = run_section("x", "9. A failing section", boom)
    assert section.error.startswith("RuntimeError: no model here")
    report = render([section], {"cpu": "c", "cores": "2", "ram": "1", "cuda": "False", "torch_threads": "1", "python": "3"},
                    None, __import__("datetime").datetime.now(), 1.0, "0", "0", quick=True)
    assert "This section failed" in report and "no model here" in report


def test_output_tokens_and_search_bench_tiny(tmp_path):
    """The output-tokens section's random GPT-2 config and its synthetic search lake, at toy sizes:
    the search over the synthetic lake answers through `search()` and the CLI."""
    from bench.common import Section
    from bench.outputs_bench import _output_tokens_xl, _search

    section = Section("outputs", "outputs")
    _output_tokens_xl(section, layers=1, neurons=64, hidden=50, vocab=500)
    _search(section, tmp_path, layers=2, neurons=16, reps=1, cli_reps=1)
    metrics = [row.metric for row in section.rows]
    assert any("random GPT-2 XL config" in m for m in metrics)
    assert any("search over 32 explanations" in m for m in metrics)
    assert section.data["search"]["explanations"] == 32 and len(section.data["search"]["cli_s"]) == 1


def test_vllm_section_without_vllm_says_why(monkeypatch):
    """Section 9 needs vLLM in its own venv; without it the section is a note, not an error."""
    from bench.common import Section
    from bench.vllm_bench import run_vllm

    monkeypatch.delenv("NEURON_PIPELINE_VLLM_PYTHON", raising=False)
    section = Section("vllm", "vllm")
    run_vllm(section)
    assert section.error is None and not section.rows
    assert "NEURON_PIPELINE_VLLM_PYTHON" in section.notes[0]


def test_only_replaces_its_own_sections_and_target_rows():
    """`python -m bench.run --only X` rewrites section X and its target rows in the existing
    BENCHMARKS.md and keeps every other section and the whole-model block."""
    from bench.common import Section
    from bench.run import merge_sections
    from bench.scale_report import BEGIN, END

    existing = (
        "# Benchmarks\n\n## Targets\n\n| 1. | capture | 0.9 | >= 0.9 | met |\n| 2. | old | 1 | 2 | met |\n\n"
        "## 1. Capture\n\nold capture\n\n## 2. Layers\n\nold layers\n\n" + BEGIN + "\nwhole model\n" + END + "\n"
    )
    report = "# Benchmarks\n\n## Targets\n\n| 2. | new | 3 | 2 | **missed** |\n\n## 2. Layers\n\n_Section time: 5 s._\n\nnew layers\n\n"
    merged = merge_sections(existing, report, [Section("layers", "2. Layers")], "`cmd`")
    assert "old capture" in merged and "| 1. | capture |" in merged and "whole model" in merged
    assert "old layers" not in merged and "new layers" in merged and "_Measured in its own run, `cmd`. Section time: 5 s._" in merged
    assert "| 2. | new | 3 | 2 | **missed** |" in merged and "| 2. | old |" not in merged
    assert merged.index("## 2. Layers") < merged.index(BEGIN)


def test_the_whole_model_section_compares_each_stage_between_the_two_smollm2_runs():
    """The flatness line names each stage after the output tokens with its growth from the
    smaller run to the larger, computed from the runs' own per-stage peaks."""
    from bench.scale_report import render

    def run(peaks: dict[str, float]) -> dict:
        stages = {s: {"wall_s": 10.0, "peak_rss": int(gib * 2**30)} for s, gib in peaks.items()}
        return {"wall_s": 600.0, "peak_rss": max(v["peak_rss"] for v in stages.values()), "stages": stages,
                "lake_bytes": 2**20, "viewer_files": 3, "viewer_bytes": 2**20}  # fmt: skip

    results = {
        "smollm2:0-9": run({"capture": 2.0, "explanations": 1.0, "simulations": 1.2, "neuron_viewer": 1.5}),
        "smollm2:0-29": run({"capture": 2.6, "explanations": 1.05, "simulations": 1.5, "neuron_viewer": 1.5}),
    }
    text = render(results, None)
    assert "+30 %; each stage after the output tokens (target: within 10 %): explanations +5 %, simulations +25 %, neuron_viewer +0 %." in text
