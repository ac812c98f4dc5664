"""Scorers: what detection, fuzzing and embedding scoring cost next to the simulator, and how often
the scorers agree on which of two explanations of a neuron is better.

The pipeline runs through the CLI (`neuron-pipeline run`) on neuron 0 of layers 0, 15 and 29 with
the demo's LLM (Qwen2.5-Coder-1.5B-Instruct; SmolLM2-135M in the quick run) and three explainers (baseline, plain LLM, contrastive LLM), the
baseline and the local LLM simulator, and the default scorers (embedding everywhere; detection and
fuzzing with the simulator's model). Every figure is read back from the lake.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import time
from pathlib import Path

from bench.common import REPO, Section

CONFIG = """\
corpus:
  max_sequences: {sequences}
layers: "{layers}"
neurons: "{neurons}"
explainers:
  - backend: baseline
  - backend: local
    model: {llm}
    neurons: "{llm_neurons}"
  - backend: local
    model: {llm}
    contrastive: true
    neurons: "{llm_neurons}"
simulators:
  - backend: baseline
  - backend: local
    model: {llm}
    neurons: "{llm_neurons}"
"""

SCORERS = ["simulation (LLM)", "simulation (baseline)", "detection", "fuzzing", "embedding"]


def _side_by_side(lake: Path):
    """One row per (layer, neuron, explainer): both simulation scores and the three scorer scores."""
    from neuron_pipeline.lake.sql import connect

    con = connect(lake)
    return con.sql(
        """
        with sims as (
            select layer, neuron, explainer_id,
                   max(score) filter (where not simulator_id like 'baseline-%') as "simulation (LLM)",
                   max(score) filter (where simulator_id like 'baseline-%') as "simulation (baseline)"
            from scores group by all
        ), scorers as (
            select layer, neuron, explainer_id,
                   max(score) filter (where method = 'detection') as detection,
                   max(score) filter (where method = 'fuzzing') as fuzzing,
                   max(score) filter (where method = 'embedding') as embedding
            from scorer_results group by all
        )
        select * from sims full join scorers using (layer, neuron, explainer_id)
        """
    ).pl()


def agreement(frame) -> dict[tuple[str, str], tuple[int, int]]:
    """For each pair of scorers: (comparisons where both prefer one explanation, of those where they
    prefer the same), over every pair of explanations of the same neuron."""
    prefs: dict[str, dict[tuple, int]] = {s: {} for s in SCORERS}
    for (layer, neuron), group in frame.group_by("layer", "neuron"):
        rows = group.sort("explainer_id").to_dicts()
        for a, b in itertools.combinations(rows, 2):
            key = (layer, neuron, a["explainer_id"], b["explainer_id"])
            for scorer in SCORERS:
                x, y = a.get(scorer), b.get(scorer)
                if x is not None and y is not None and x != y:
                    prefs[scorer][key] = 1 if x > y else -1
    out = {}
    for s, t in itertools.combinations(SCORERS, 2):
        shared = set(prefs[s]) & set(prefs[t])
        out[(s, t)] = (len(shared), sum(prefs[s][k] == prefs[t][k] for k in shared))
    return out


def own_vs_decoy(lake: Path) -> tuple[int, int, float, int]:
    """Embedding scorer: neurons whose own (baseline) explanation gets a higher AUROC than another
    neuron's explanation of the same layer on the same excerpts, and neurons compared."""
    import polars as pl

    from neuron_pipeline.interp.classification import scoring_sample
    from neuron_pipeline.interp.embedding_scoring import EmbeddingScorer
    from neuron_pipeline.interp.records import neuron_records_from_rows, split_records
    from neuron_pipeline.lake import read_table
    from neuron_pipeline.llm.embeddings import load_embedder

    explanations = read_table(lake, "explanations").filter(pl.col("explainer_id").str.starts_with("baseline-"))
    records = neuron_records_from_rows(read_table(lake, "activation_records").iter_rows(named=True))
    scorer = EmbeddingScorer(load_embedder())
    won = compared = 0
    seconds, texts = 0.0, 0
    load_embedder().embed(["warm up"])
    for (layer,), group in explanations.group_by("layer"):
        rows = group.sort("neuron").to_dicts()
        items = []
        for i, row in enumerate(rows):
            decoy = rows[(i + 1) % len(rows)]["explanation"]
            key = next(k for k in records if k.layer == int(layer) and k.neuron == row["neuron"])
            splits = split_records(records[key], 5, 5, 5)
            sample = scoring_sample(records[key], splits.explain, 10, 10)
            items += [(row["explanation"], sample), (decoy, sample)]
        start = time.perf_counter()
        results = scorer.score_many(items)
        seconds += time.perf_counter() - start
        texts += len({scorer.text(r) for _, sample in items for r, _ in sample.labelled}) + len({e for e, _ in items})
        for own, other in zip(results[::2], results[1::2]):
            if own.metrics.auroc is not None and other.metrics.auroc is not None:
                compared += 1
                won += own.metrics.auroc > other.metrics.auroc
    return won, compared, seconds, texts


def run_scorers(
    section: Section, work: Path, sequences: int, layers: str, neurons: str, llm_neurons: str, threads: int, llm: str
) -> None:
    import polars as pl

    from neuron_pipeline.lake import read_table

    work.mkdir(parents=True, exist_ok=True)
    config = work / "scorers.yaml"
    config.write_text(CONFIG.format(sequences=sequences, layers=layers, neurons=neurons, llm_neurons=llm_neurons, llm=llm))
    lake = work / "lake"
    env = {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    env.pop("DAGSTER_HOME", None)
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "neuron_pipeline.cli", "run", "--config", str(config), "--lake", str(lake)],
        env=env, capture_output=True, text=True, cwd=work,
    )
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"neuron-pipeline run failed ({done.returncode}): {(done.stderr or done.stdout)[-600:]}")
    section.add("pipeline run through the CLI", f"{wall:.0f} s", note=f"layers {layers}, neurons {neurons}, LLM on neurons {llm_neurons}; {llm} local")

    results = read_table(lake, "scorer_results")
    simulations = read_table(lake, "simulations")
    explanations = read_table(lake, "explanations")
    llm_sims = simulations.filter(~pl.col("simulator_id").str.starts_with("baseline-"))
    per_explanation = llm_sims.group_by("layer", "neuron", "explainer_id").agg(
        prompt=pl.col("prompt_tokens").sum(), completion=pl.col("completion_tokens").sum(), excerpts=pl.len()
    )
    lines = [
        "| per explanation | explanations | requests (retries incl.) | prompt tokens | completion tokens | excerpts judged | failed groups | null scores |",
        "|---|---|---|---|---|---|---|---|",
    ]
    if per_explanation.height:
        lines.append(
            f"| simulator (local {llm_sims['simulator_id'][0].split('-')[0]}, LLM) | {per_explanation.height} | "
            f"{per_explanation['excerpts'].mean():.1f} excerpts "
            f"| {per_explanation['prompt'].mean():,.0f} | {per_explanation['completion'].mean():,.0f} | "
            f"{per_explanation['excerpts'].mean():.0f} excerpts simulated | – | – |"
        )
    for method in ("detection", "fuzzing", "embedding"):
        rows = results.filter(pl.col("method") == method)
        if rows.is_empty():
            continue
        lines.append(
            f"| {method} ({rows['scorer_model'][0]}) | {rows.height} | {rows['calls'].mean():.1f} | {rows['prompt_tokens'].mean():,.0f} "
            f"| {rows['completion_tokens'].mean():,.0f} | {rows['n_judged'].mean():.1f} | {int(rows['failed_groups'].sum())} "
            f"| {int(rows['score'].is_null().sum())} |"
        )
    section.tables.append("\n".join(lines))
    llm_expl = explanations.filter(~pl.col("explainer_id").str.starts_with("baseline-"))
    if llm_expl.height:
        section.add(
            "explainer tokens per explanation (plain / contrastive)",
            " / ".join(
                f"{llm_expl.filter(pl.col('explainer_id').str.starts_with(k))['prompt_tokens'].mean() or 0:,.0f}"
                for k in ("llm-", "contrastive-")
            ),
            note="prompt tokens; the contrastive prompt adds the quiet excerpts as plain text",
        )

    side = _side_by_side(lake)
    pairs = agreement(side)
    table = ["| scorer | " + " | ".join(SCORERS) + " |", "|---|" + "---|" * len(SCORERS)]
    for s in SCORERS:
        cells = []
        for t in SCORERS:
            if s == t:
                cells.append("–")
                continue
            n, same = pairs.get((s, t)) or pairs.get((t, s))
            cells.append(f"{same}/{n}" if n else "n/a")
        table.append(f"| {s} | " + " | ".join(cells) + " |")
    section.tables.append(
        "Agreement on which of two explanations of the same neuron is better (pairs among baseline, plain LLM and "
        "contrastive LLM explanations; same preference / comparisons where both scorers prefer one):\n\n" + "\n".join(table)
    )
    shown = side.select("layer", "neuron", "explainer_id", *SCORERS).sort("layer", "neuron", "explainer_id")
    shown = shown.filter(pl.col("detection").is_not_null() | pl.col("simulation (LLM)").is_not_null())
    if shown.height:
        head = "| layer | neuron | explainer | " + " | ".join(SCORERS) + " |\n|---|---|---|" + "---|" * len(SCORERS)
        body = "\n".join(
            f"| {r['layer']} | {r['neuron']} | {r['explainer_id']} | "
            + " | ".join("n/a" if r[s] is None else f"{r[s]:.2f}" for s in SCORERS)
            + " |"
            for r in shown.iter_rows(named=True)
        )
        section.tables.append("Scores of the LLM-explained neurons:\n\n" + head + "\n" + body)
    won, compared, seconds, texts = own_vs_decoy(lake)
    section.add(
        "embedding: own explanation beats another neuron's",
        f"{won}/{compared} neurons" if compared else "n/a",
        note="baseline explanations, same excerpts; 50% would be chance",
    )
    if texts:
        section.add(
            "embedding throughput (all-MiniLM-L6-v2, CPU)",
            f"{texts / seconds:.0f} texts/s",
            note=f"{texts} distinct texts (16-token windows and explanations) in {seconds:.1f} s, torch threads {threads}; "
            f"about 20 excerpts per explanation",
        )
    section.data.update({"wall_s": wall, "agreement": {f"{s} vs {t}": v for (s, t), v in pairs.items()}, "own_vs_decoy": [won, compared]})
    section.notes.append(
        "Cost per explanation is read from the lake (`scorer_results.calls`, `prompt_tokens`, `completion_tokens`; "
        "`simulations.prompt_tokens`). The local simulator reads its values from one forward pass per excerpt (no "
        "completion tokens); a chat-API simulator writes every token's value (about 8 completion tokens per excerpt token)."
    )
    section.notes.append(
        "Agreement counts are small (three LLM-explained neurons, three explanations each): they say whether the cheap "
        "scorers rank explanations like the simulator does here, not a general rate."
    )
