"""Where the pipeline stands, per layer and stage: ``neuron-pipeline status``.

From the lake: which stages have rows for which layers, explanations that failed (their error is
stored with the row), and the LLM tokens stored with the rows (in dollars at the configured
prices). From the Dagster instance (``DAGSTER_HOME``, where `make demo`, `make dev` and the CLI
record their runs): what is stale (Dagster's own per-partition resolver, versions.stale_assets:
a prompt, the settings, the code or upstream data changed since the layer was materialized),
runs that failed or were stopped after a stage's last materialization and why, and the dollars
every run recorded. A layer's next `neuron-pipeline run` redoes exactly what is
missing, stale, failed or stopped; the rest is kept.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import dagster as dg
import polars as pl

from neuron_pipeline.assets.versions import STAGES
from neuron_pipeline.config import Settings
from neuron_pipeline.lake import SCHEMAS, read_table, table_exists

# Stages of a layer, in pipeline order (versions.STAGES without the corpus and the viewer, which
# are not per layer): (stage = Dagster step key, the tables it writes).
LAYER_STAGES = [(stage, keys) for stage, keys in STAGES if stage not in ("corpus_tokens", "neuron_viewer")]
_STAGE_OF_KEY = {key: stage for stage, keys in LAYER_STAGES for key in keys}
_RANGE_START, _RANGE_END = "dagster/asset_partition_range_start", "dagster/asset_partition_range_end"
_ENDED_BADLY = [dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED]


@dataclass
class StageStatus:
    state: str = "missing"  # complete | stale | failed | stopped | missing
    detail: str = ""  # e.g. "8 neurons"
    why: str = ""  # for stale / failed / stopped: the reason


@dataclass
class LayerStatus:
    layer: str
    stages: dict[str, StageStatus] = field(default_factory=lambda: {stage: StageStatus() for stage, _ in LAYER_STAGES})
    llm_tokens: int = 0
    llm_usd: float | None = 0.0

    def todo(self) -> list[str]:
        return [stage for stage, status in self.stages.items() if status.state != "complete"]


@dataclass
class PipelineStatus:
    layers: list[LayerStatus]
    instance_note: str  # where the run history came from, or why there is none
    runs_usd: float | None = None  # dollars recorded by runs (new calls), when there is a history
    runs_counted: int = 0
    notes: list[str] = field(default_factory=list)


def _layer_order(layers: Iterable[str]) -> list[str]:
    return sorted(set(layers), key=lambda layer: int(layer))


def _lake_rows(settings: Settings) -> dict[str, pl.DataFrame]:
    """The few columns status needs from each layer table (never the excerpts themselves)."""
    lake = settings.lake_location
    columns = {
        keys[0]: [name for name in ("layer", "neuron") if name in SCHEMAS[keys[0]].names]
        for _, keys in LAYER_STAGES
        if keys[0] in SCHEMAS
    }
    columns.update({
        "explanations": ["layer", "neuron", "explainer_model", "error", "prompt_tokens", "completion_tokens"],
        "simulations": ["layer", "neuron", "simulator_id", "prompt_tokens", "completion_tokens"],
        "scores": ["layer", "neuron", "score"],
    })
    for table, names in columns.items():  # failed rows kept with their error (explanations, simulations)
        if "error" in SCHEMAS[table].names and "error" not in names:
            names.append("error")
    if "scorer_results" in columns and {"prompt_tokens", "completion_tokens"} <= set(SCHEMAS["scorer_results"].names):
        columns["scorer_results"] = ["layer", "neuron", "prompt_tokens", "completion_tokens"]
    return {
        table: read_table(lake, table, columns=cols) if table_exists(lake, table) else pl.DataFrame()
        for table, cols in columns.items()
    }


def _usd(prompt: int, completion: int, entry) -> float:
    return (prompt * entry.usd_per_million_prompt + completion * entry.usd_per_million_completion) / 1e6


def _lake_spend(layer_rows: dict[str, pl.DataFrame], settings: Settings) -> tuple[int, float | None]:
    """Tokens stored with the layer's explanations, simulations and scorer results, and their dollars at the
    configured prices (None when a row's price cannot be told: a model no longer configured)."""
    tokens, usd = 0, 0.0
    explanations = layer_rows["explanations"]
    if explanations.height:
        by_model = explanations.group_by("explainer_model").agg(pl.col("prompt_tokens").sum(), pl.col("completion_tokens").sum())
        prices = {entry.model_or_default: entry for entry in settings.explainers if entry.backend != "baseline"}
        for model, prompt, completion in by_model.iter_rows():
            prompt, completion = int(prompt or 0), int(completion or 0)
            tokens += prompt + completion
            if prompt + completion:
                usd = None if usd is None or model not in prices else usd + _usd(prompt, completion, prices[model])
    for table, entries in (("simulations", settings.simulators), ("scorer_results", settings.scorer_entries)):
        frame = layer_rows.get(table, pl.DataFrame())
        if not frame.height or "prompt_tokens" not in frame.columns:
            continue
        prompt, completion = int(frame["prompt_tokens"].sum() or 0), int(frame["completion_tokens"].sum() or 0)
        tokens += prompt + completion
        priced = {(e.usd_per_million_prompt, e.usd_per_million_completion): e for e in entries if e.backend != "baseline"}
        if prompt + completion:
            # These rows name the simulator / scorer by id only: priced when the LLM entries share one price.
            usd = None if usd is None or len(priced) != 1 else usd + _usd(prompt, completion, next(iter(priced.values())))
    return tokens, usd


def _from_lake(settings: Settings) -> dict[str, LayerStatus]:
    rows = _lake_rows(settings)
    layers = _layer_order(layer for frame in rows.values() if frame.height for layer in frame["layer"].unique().to_list())
    out = {}
    for layer in layers:
        status = LayerStatus(layer)
        mine = {table: frame.filter(pl.col("layer") == layer) if frame.height else frame for table, frame in rows.items()}
        for stage, tables in LAYER_STAGES:
            frame = mine.get(tables[0], pl.DataFrame())
            if not frame.height:
                continue
            stage_status = status.stages[stage]
            stage_status.state = "complete"
            if "neuron" not in frame.columns:
                stage_status.detail = "done"
                continue
            stage_status.detail = f"{frame['neuron'].n_unique()} neurons"
            if "error" in frame.columns:
                failed = frame.filter(pl.col("error").is_not_null())
                if failed.height:
                    stage_status.state = "failed"
                    stage_status.detail += f", {failed['neuron'].n_unique()} failed"
                    stage_status.why = (
                        f"{failed['neuron'].n_unique()} of {frame['neuron'].n_unique()} neurons failed (the next run asks "
                        f"again); the first error: {_first_line(failed['error'][0])[:160]}"
                    )
            if stage == "scores":
                null = int(frame["score"].null_count())
                if null:
                    stage_status.detail += f", {null} without a score"
        status.llm_tokens, status.llm_usd = _lake_spend(mine, settings)
        out[layer] = status
    return out


def _run_layers(run: dg.DagsterRun) -> list[str]:
    if _RANGE_START in run.tags:
        return [str(layer) for layer in range(int(run.tags[_RANGE_START]), int(run.tags[_RANGE_END]) + 1)]
    partition = run.tags.get("dagster/partition")
    return [partition] if partition is not None else []


def _first_line(text: str) -> str:
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    return lines[0][:200] if lines else ""


def _failure_reason(error) -> str:
    """The user-code error behind Dagster's wrappers, as one line."""
    while error is not None and error.cause is not None:
        error = error.cause
    if error is None:
        return ""
    message = _first_line(error.message)
    return message.split(": ", 1)[1] if message.startswith(("dagster.", "neuron_pipeline.")) and ": " in message else message


def _last_materialized(instance: dg.DagsterInstance, key: str, layer: str) -> float:
    records = instance.fetch_materializations(dg.AssetRecordsFilter(asset_key=dg.AssetKey(key), asset_partitions=[layer]), limit=1).records
    return records[0].timestamp if records else 0.0


def _apply_failed_runs(instance: dg.DagsterInstance, layers: dict[str, LayerStatus]) -> None:
    """A run that failed or was stopped after a stage's last materialization of a layer marks that
    stage failed (with the error) or stopped; the latest such run counts."""
    records = instance.get_run_records(filters=dg.RunsFilter(statuses=_ENDED_BADLY), limit=500)
    for record in sorted(records, key=lambda r: r.create_timestamp.timestamp()):
        run = record.dagster_run
        failures = instance.all_logs(run.run_id, of_type=dg.DagsterEventType.STEP_FAILURE)
        for entry in failures:
            stage = entry.dagster_event.step_key
            if stage not in dict(LAYER_STAGES):
                continue
            keys = dict(LAYER_STAGES)[stage]
            reason = _failure_reason(entry.dagster_event.step_failure_data.error)
            interrupted = run.status == dg.DagsterRunStatus.CANCELED or "Interrupted" in (entry.dagster_event.step_failure_data.error.cls_name or "")
            for layer in _run_layers(run):
                if _last_materialized(instance, keys[0], layer) > entry.timestamp:
                    continue  # done again since
                status = layers.setdefault(layer, LayerStatus(layer))
                stage_status = status.stages[stage]
                when = f"run {run.run_id[:8]}"
                if interrupted:
                    stage_status.state, stage_status.why = "stopped", f"{when} was stopped (SIGINT / SIGTERM / terminated) during it"
                else:
                    stage_status.state, stage_status.why = "failed", f"{when} failed: {reason}"


def _apply_stale(instance: dg.DagsterInstance, settings: Settings, layers: dict[str, LayerStatus]) -> None:
    from neuron_pipeline.assets.versions import stale_assets
    from neuron_pipeline.definitions import build_definitions

    graph = build_definitions(settings).resolve_asset_graph()
    by_layer, _, reasons = stale_assets(instance, graph)
    for layer, keys in by_layer.items():
        if layer not in layers:
            continue
        causes = reasons.get(layer, [])
        for key in keys:
            stage = _STAGE_OF_KEY.get(key.to_user_string())
            stage_status = layers[layer].stages.get(stage) if stage else None
            if stage_status is None or stage_status.state != "complete":
                continue
            stage_status.state = "stale"
            own = [cause for cause in causes if cause.split(":", 1)[0] in dict(LAYER_STAGES)[stage]]
            stage_status.why = _stale_words(own[0]) if own else (f"follows: {_stale_words(causes[0])}" if causes else "upstream changed")


def _stale_words(cause: str) -> str:
    """'explanations: has a new code version' -> 'explanations has a new code version (prompt, ...)'."""
    return cause.replace(": ", " ", 1).replace("has a new code version", "has a new code version (prompt, settings or code changed)")


def _all_materializations(instance: dg.DagsterInstance, key: str):
    cursor = None
    while True:
        page = instance.fetch_materializations(dg.AssetRecordsFilter(asset_key=dg.AssetKey(key)), limit=1000, cursor=cursor)
        yield from page.records
        if not page.has_more:
            return
        cursor = page.cursor


def _runs_spend(instance: dg.DagsterInstance) -> tuple[float, int]:
    """Dollars every run recorded for its new (paid) LLM calls (``usd_new``: explainers on
    explanations, simulators on simulations, scorers on scorer_results; run-level metadata repeated
    on each layer's materialization of the run, so counted once per run and asset), and the runs."""
    usd, seen = 0.0, set()
    for key in ("explanations", "simulations", "scorer_results"):
        for record in _all_materializations(instance, key):
            if (record.run_id, key) in seen:
                continue
            seen.add((record.run_id, key))
            metadata = record.asset_materialization.metadata if record.asset_materialization else {}
            usd += float(getattr(metadata.get("usd_new"), "value", None) or 0.0)
    return usd, len({run for run, _ in seen})


def pipeline_status(settings: Settings, instance: dg.DagsterInstance | None) -> PipelineStatus:
    layers = _from_lake(settings)
    if instance is None:
        return PipelineStatus(
            _sorted(layers),
            "no Dagster instance (DAGSTER_HOME is not set): what is stale, failed runs and run costs are unknown; "
            "`make demo` and `make dev` set it, or export DAGSTER_HOME before `neuron-pipeline run`",
        )
    _apply_failed_runs(instance, layers)
    _apply_stale(instance, settings, layers)
    usd, runs = _runs_spend(instance)
    return PipelineStatus(_sorted(layers), f"Dagster instance {instance.root_directory}", usd, runs)


def _sorted(layers: dict[str, LayerStatus]) -> list[LayerStatus]:
    return [layers[layer] for layer in _layer_order(layers)]
