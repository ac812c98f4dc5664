"""The evaluation suite, run on the configured explainers and simulators (``neuron-pipeline eval``
and the ``evaluations`` asset): puzzles with known answers and planted neurons.

Checks, one ``evaluations`` row per (check, explainer model, simulator model, prompt):

- ``puzzle_discrimination`` (per LLM simulator): share of (true, false) explanation pairs of the
  puzzles where the true explanation scores higher. Chance is 0.5.
- ``puzzle_explanations`` (per explainer): mean score of the explanations the explainer writes from
  the puzzles' sentences, scored by the reference simulator (the first LLM simulator, so every
  explainer is read on one scale), next to the true explanations' mean score (``reference_value``)
  and the no-LLM baseline explainer's (``baseline_value``); ``named`` in ``details``: the share of
  explanations that mention the puzzle's answer.
- ``planted_recovery``: the whole pipeline (capture, records) run on a copy of the subject model with
  neurons wired to known tokens (``subject/planting.py``): the share of each planted neuron's top
  excerpts whose strongest token is a planted one (worst neuron as the value).
- ``planted_named`` (per explainer): the share of planted neurons whose explanation names a planted
  token (or the concept, for the family-words neuron).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import platform
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Sequence

import polars as pl
import torch
import yaml

from neuron_pipeline.config import ExplainerSettings, Settings, SimulatorSettings, cache_dir
from neuron_pipeline.interp.baseline import BaselineExplainer
from neuron_pipeline.interp.evaluation import (
    discrimination,
    discrimination_rate,
    explainer_trials,
    explanation_score,
    mean,
    names_answer,
)
from neuron_pipeline.interp.puzzles import PUZZLE_SET_VERSION, PUZZLES, Puzzle

CHECKS = ("puzzle_discrimination", "puzzle_explanations", "planted_recovery", "planted_named")


@dataclass
class EvaluationRow:
    check: str
    explainer_model: str
    simulator_model: str
    prompt: str
    value: float | None
    n: int
    reference_value: float | None = None
    baseline_value: float | None = None
    explainer_id: str = ""
    simulator_id: str = ""
    details: dict = field(default_factory=dict)
    seconds: float = 0.0


def _prompt_label(explainer: ExplainerSettings | None, simulator: SimulatorSettings | None, simulator_obj=None) -> str:
    parts = []
    if explainer is not None:
        variant = (f" · best-of-{explainer.best_of}" if explainer.best_of > 1 else "") + (" · revised" if explainer.revise else "")
        parts.append("baseline" if explainer.backend == "baseline" else explainer.prompt + variant)
    if simulator is not None:
        template = getattr(getattr(simulator_obj, "template", None), "name", None)
        parts.append("token lookup" if simulator.backend == "baseline" else (template or simulator.prompt or "?"))
    return " / ".join(parts)


def _model_label(settings: ExplainerSettings | SimulatorSettings | None, obj=None) -> str:
    if settings is None:
        return ""
    if settings.backend == "baseline":
        return "baseline"
    mode = getattr(obj, "mode", None)
    return settings.model_or_default + (f" ({mode})" if mode else "")


def evaluate_puzzles(
    explainers: Sequence[tuple[ExplainerSettings, object]],
    simulators: Sequence[tuple[SimulatorSettings, object]],
    puzzles: Sequence[Puzzle] = PUZZLES,
    say: Callable[[str], None] = print,
) -> list[EvaluationRow]:
    rows: list[EvaluationRow] = []
    llm_simulators = [(s, sim) for s, sim in simulators if s.backend != "baseline"]
    true_scores: dict[str, list[float]] = {}
    for sim_settings, simulator in llm_simulators:
        started = time.time()
        results = discrimination(simulator, puzzles)
        true_scores[simulator.simulator_id] = [r.scores[0] for r in results]
        kinds = sorted({r.kind for r in results})
        rate = discrimination_rate(results)
        rows.append(
            EvaluationRow(
                "puzzle_discrimination", "", _model_label(sim_settings, simulator), _prompt_label(None, sim_settings, simulator),
                rate, sum(r.pairs for r in results),
                reference_value=mean([r.scores[0] for r in results]),
                simulator_id=simulator.simulator_id,
                details={
                    "by_kind": {k: discrimination_rate([r for r in results if r.kind == k]) for k in kinds},
                    "scores": {r.puzzle: [round(s, 4) for s in r.scores] for r in results},
                },
                seconds=time.time() - started,
            )
        )
        say(f"puzzle_discrimination {_model_label(sim_settings, simulator)}: {rate:.3f} of {rows[-1].n} pairs ({rows[-1].seconds:.0f} s)")
    if not llm_simulators:
        return rows
    reference_settings, reference = llm_simulators[0]
    reference_true = true_scores[reference.simulator_id]
    baseline_trials = explainer_trials(BaselineExplainer(), reference, puzzles, reference_true)
    for exp_settings, explainer in explainers:
        started = time.time()
        trials = baseline_trials if exp_settings.backend == "baseline" else explainer_trials(explainer, reference, puzzles, reference_true)
        failed = [t for t in trials if t.error]
        rows.append(
            EvaluationRow(
                "puzzle_explanations", _model_label(exp_settings), _model_label(reference_settings, reference),
                _prompt_label(exp_settings, reference_settings, reference),
                mean([t.score for t in trials]), len(trials),
                reference_value=mean(reference_true), baseline_value=mean([t.score for t in baseline_trials]),
                explainer_id=explainer.explainer_id, simulator_id=reference.simulator_id,
                details={
                    "named": mean([float(t.named) for t in trials]),
                    "failed": len(failed),
                    "first_error": failed[0].error if failed else None,
                    "explanations": {t.puzzle: [t.explanation, round(t.score, 4)] for t in trials},
                },
                seconds=time.time() - started,
            )
        )
        say(
            f"puzzle_explanations {_model_label(exp_settings)}: mean score {rows[-1].value:.3f} "
            f"(true {rows[-1].reference_value:.3f}, baseline {rows[-1].baseline_value:.3f}), "
            f"named {rows[-1].details['named']:.2f} ({rows[-1].seconds:.0f} s)"
        )
    return rows


def evaluate_planted(
    settings: Settings,
    explainers: Sequence[ExplainerSettings],
    work_dir: Path,
    say: Callable[[str], None] = print,
    max_sequences: int = 1200,
) -> list[EvaluationRow]:
    """Plant neurons into a copy of the subject model and run the real pipeline on it
    (``neuron-pipeline run``, one layer, the planted neurons, the configured explainers)."""
    from neuron_pipeline.cli import main as cli_main
    from neuron_pipeline.corpus.tokenize import tokenize_corpus
    from neuron_pipeline.lake import read_table
    from neuron_pipeline.subject import load_subject
    from neuron_pipeline.subject.planting import DEFAULT_PLANTS, plant, plants_fingerprint, save_planted, token_ids

    started = time.time()
    subject = load_subject(settings.subject)
    corpus = settings.corpus.model_copy(update={"max_sequences": max_sequences})
    sequences = tokenize_corpus(corpus, subject.tokenizer).token_ids
    folder = cache_dir("planted") / f"{subject.model_id}-{plants_fingerprint(subject.model_id, DEFAULT_PLANTS, sequences)}"
    if not (folder / "config.json").is_file():
        plant(subject, DEFAULT_PLANTS, sequences[: len(sequences) // 2])
        save_planted(subject, folder)
        from neuron_pipeline.assets.resources import _LOADED_SUBJECTS

        _LOADED_SUBJECTS.clear()  # the planting changed the loaded weights in place
    layers = sorted({p.layer for p in DEFAULT_PLANTS})
    ranking = _ranking_simulators(settings, explainers)
    run_settings = {
        "subject": {**settings.subject.model_dump(), "model": str(folder)},
        "corpus": corpus.model_dump(),
        "records": settings.records.model_dump(),
        "layers": ",".join(map(str, layers)),
        "neurons": ",".join(str(p.neuron) for p in DEFAULT_PLANTS),
        "explainers": [{**e.model_dump(), "layers": "all", "neurons": "all"} for e in explainers],
        # Best-of-n and revision rank their candidates with the run's first LLM simulator: the
        # evaluation's own, when an explainer needs one (the token look-up cannot judge prose).
        "simulators": [s.model_dump() for s in ranking] or [{"backend": "baseline"}],
        "scorers": [],  # the checks read records and explanations only; an LLM judge would add minutes
        "lake": str(work_dir / "planted_lake"),
    }
    config = work_dir / "planted.yaml"
    config.write_text(yaml.safe_dump(run_settings))
    log = io.StringIO()
    with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        status = cli_main(["run", "--config", str(config)])
    if status != 0:
        raise RuntimeError(f"the planted-neuron pipeline run failed (exit {status}): {log.getvalue().strip().splitlines()[-1:]}")
    records = read_table(run_settings["lake"], "activation_records", where={"kind": "top"})
    explanations = read_table(run_settings["lake"], "explanations")
    tokenizer = subject.tokenizer
    rows = []
    recovery = {}
    for p in DEFAULT_PLANTS:
        ids = set(token_ids(tokenizer, p.tokens))
        mine = records.filter((pl.col("layer") == str(p.layer)) & (pl.col("neuron") == p.neuron))
        hits = []
        for record in mine.iter_rows(named=True):
            activations = record["activations"]
            strongest = max(range(len(activations)), key=activations.__getitem__)
            hits.append(record["tokens"][strongest] in {tokenizer.decode([i]) for i in ids})
        recovery[p.name] = mean([float(h) for h in hits])
    rows.append(
        EvaluationRow(
            "planted_recovery", "", "", "", min(recovery.values()), len(DEFAULT_PLANTS),
            details={"by_neuron": recovery, "plants": {p.name: list(p.tokens) for p in DEFAULT_PLANTS}},
            seconds=time.time() - started,
        )
    )
    say(f"planted_recovery: {recovery}")
    from neuron_pipeline.llm import make_explainer, make_simulator

    # The ids the run gave its explainers (best-of-n and revision ids name their ranker).
    ranker = make_simulator(ranking[0]) if ranking else None
    for exp_settings in explainers:
        explainer_id = make_explainer(exp_settings, None, ranker).explainer_id
        named, texts = {}, {}
        for p in DEFAULT_PLANTS:
            row = explanations.filter(
                (pl.col("layer") == str(p.layer)) & (pl.col("neuron") == p.neuron) & (pl.col("explainer_id") == explainer_id)
            )
            text = row["explanation"][0] if row.height else ""
            texts[p.name] = text
            named[p.name] = bool(text) and names_answer(text, p.answer_words)
        rows.append(
            EvaluationRow(
                "planted_named", _model_label(exp_settings), "", _prompt_label(exp_settings, None),
                mean([float(v) for v in named.values()]), len(DEFAULT_PLANTS),
                details={"named": named, "explanations": texts},
            )
        )
        say(f"planted_named {_model_label(exp_settings)}: {named} {texts}")
    return rows


def _ranking_simulators(settings: Settings, explainers: Sequence[ExplainerSettings]) -> list[SimulatorSettings]:
    """The first configured LLM simulator when an explainer ranks candidates (best-of-n, revision)."""
    if not any(e.best_of > 1 or e.revise for e in explainers):
        return []
    return [s for s in settings.simulators if s.backend != "baseline"][:1]


def machine_description() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} with {torch.get_num_threads()} CPU threads"


def run_evaluation(
    settings: Settings,
    puzzles: Sequence[Puzzle] = PUZZLES,
    planted: bool = True,
    say: Callable[[str], None] = print,
) -> pl.DataFrame:
    """Every check for the settings' explainers and simulators; returns the ``evaluations`` rows."""
    from neuron_pipeline.assets.resources import llm_cache_path
    from neuron_pipeline.llm import LLMCache, make_explainer, make_simulator

    cache = LLMCache(llm_cache_path(settings.lake_location))
    simulators = [(s, make_simulator(s, cache)) for s in settings.simulators]
    # Best-of-n and revision rank candidates with the first LLM simulator, as in a pipeline run.
    ranker = next((sim for s, sim in simulators if s.backend != "baseline"), None)
    explainers = [(e, make_explainer(e, cache, ranker)) for e in settings.explainers]
    rows = evaluate_puzzles(explainers, simulators, puzzles, say)
    if planted:
        with tempfile.TemporaryDirectory(prefix="planted-") as work:
            rows += evaluate_planted(settings, [e for e, _ in explainers], Path(work), say)
    return evaluation_frame(rows, len(puzzles))


def evaluation_frame(rows: Sequence[EvaluationRow], puzzle_count: int) -> pl.DataFrame:
    from neuron_pipeline.lake import table_frame

    now = datetime.now(timezone.utc)
    machine = machine_description()
    return table_frame(
        "evaluations",
        [
            {
                "check": r.check,
                "explainer_model": r.explainer_model,
                "simulator_model": r.simulator_model,
                "prompt": r.prompt,
                "explainer_id": r.explainer_id,
                "simulator_id": r.simulator_id,
                "value": r.value,
                "n": r.n,
                "reference_value": r.reference_value,
                "baseline_value": r.baseline_value,
                "details": json.dumps(r.details, ensure_ascii=False),
                "puzzle_set": f"{PUZZLE_SET_VERSION} ({puzzle_count} puzzles)",
                "seconds": r.seconds,
                "machine": machine,
                "created_at": now,
            }
            for r in rows
        ],
    )


def _fmt(value) -> str:
    return "–" if value is None or value != value else f"{value:.3f}"


def write_report(frame: pl.DataFrame, path: Path, command: str, notes: str = "") -> Path:
    """EVALUATION.md from one run's ``evaluations`` rows: what was run, where, and the numbers."""
    rows = frame.to_dicts()
    first = rows[0] if rows else {}
    lines = [
        "# Evaluation on ground truth",
        "",
        f"Written by `{command}` on {first.get('created_at', datetime.now(timezone.utc)):%Y-%m-%d %H:%M} UTC.",
        f"Machine: {first.get('machine', machine_description())}. Puzzle set: {first.get('puzzle_set', PUZZLE_SET_VERSION)}.",
        "The same rows are in the lake's `evaluations` table. What each check means: `neuron_pipeline/evaluation.py`.",
        "",
    ]
    discrimination_rows = [r for r in rows if r["check"] == "puzzle_discrimination"]
    if discrimination_rows:
        kinds = sorted({k for r in discrimination_rows for k in json.loads(r["details"])["by_kind"]})
        lines += [
            "## Simulators: do they prefer the true explanation?",
            "",
            "Share of (true, false) explanation pairs where the simulator's score of the true explanation is higher "
            "(chance 0.5), overall and per puzzle kind; `true score` is the mean score of the true explanations.",
            "",
            "| simulator | prompt | pairs won | pairs | true score | " + " | ".join(kinds) + " | seconds |",
            "|---|---|---|---|---|" + "---|" * len(kinds) + "---|",
        ]
        for r in discrimination_rows:
            by_kind = json.loads(r["details"])["by_kind"]
            lines.append(
                f"| {r['simulator_model']} | {r['prompt']} | **{_fmt(r['value'])}** | {r['n']} | {_fmt(r['reference_value'])} | "
                + " | ".join(_fmt(by_kind.get(k)) for k in kinds) + f" | {r['seconds']:.0f} |"
            )
        lines.append("")
    explanation_rows = [r for r in rows if r["check"] == "puzzle_explanations"]
    if explanation_rows:
        lines += [
            "## Explainers: how good are the explanations they write?",
            "",
            f"Each explainer sees a puzzle's sentences with their activations and writes an explanation; the reference "
            f"simulator ({explanation_rows[0]['simulator_model']}) scores it on the same sentences. Next to it: the mean "
            "score of the true explanations and of the no-LLM baseline's; `named`: share of explanations that mention "
            "the puzzle's answer.",
            "",
            "| explainer | prompt | mean score | true explanations | baseline | named | failed | seconds |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in explanation_rows:
            details = json.loads(r["details"])
            lines.append(
                f"| {r['explainer_model']} | {r['prompt']} | **{_fmt(r['value'])}** | {_fmt(r['reference_value'])} | "
                f"{_fmt(r['baseline_value'])} | {_fmt(details['named'])} | {details['failed']} | {r['seconds']:.0f} |"
            )
        lines += ["", "<details><summary>The explanations written, per puzzle</summary>", ""]
        for r in explanation_rows:
            lines.append(f"**{r['explainer_model']}**")
            lines.append("")
            for puzzle, (text, score) in json.loads(r["details"])["explanations"].items():
                lines.append(f"- {puzzle}: {text!r} ({score:.2f})")
            lines.append("")
        lines += ["</details>", ""]
    planted_rows = [r for r in rows if r["check"].startswith("planted")]
    if planted_rows:
        lines += ["## Planted neurons", ""]
        for r in planted_rows:
            details = json.loads(r["details"])
            if r["check"] == "planted_recovery":
                lines.append(
                    f"- **Recovery** (share of each planted neuron's top excerpts whose strongest token is planted; worst "
                    f"neuron {_fmt(r['value'])}): "
                    + ", ".join(f"{name} {details['plants'][name]}: {share:.2f}" for name, share in details["by_neuron"].items())
                )
            else:
                lines.append(
                    f"- **Named by {r['explainer_model']}**" + (f" ({r['prompt']})" if r["prompt"] else "") + f": {_fmt(r['value'])}; "
                    + "; ".join(f"{name}: {text!r}" for name, text in details["explanations"].items())
                )
        lines.append("")
    if notes:
        lines += [notes.strip(), ""]
    path.write_text("\n".join(lines))
    return path
