"""Stage 3: every configured explainer explains every selected neuron of the layer."""


import dataclasses
from datetime import datetime, timezone
from typing import Mapping

import polars as pl

import dagster as dg

from data_quality import QualityParams
from neuron_pipeline.assets.checks import check_result, gate, gate_upstream, quality_check_spec, upstream_check_spec
from neuron_pipeline.assets.metadata import cost_metadata, failure_metadata, lake_metadata, publish_layers
from neuron_pipeline.assets.progress import track
from neuron_pipeline.assets.partitions import GPU_POOL, GPU_TAGS, layers_of
from neuron_pipeline.assets.resources import LLMResource, PipelineSettingsResource
from neuron_pipeline.config import RecordsSettings, parse_index_spec
from neuron_pipeline.interp.explainer import Explainer
from neuron_pipeline.interp.outputs import OutputTokens
from neuron_pipeline.interp.prompts import content_hash
from neuron_pipeline.interp.records import NeuronRecord, neuron_records_from_rows, split_records
from neuron_pipeline.interp.reporting import explainer_label
from neuron_pipeline.plan import run_plan
from neuron_pipeline.lake import read_table, table_frame, table_path, write_table


def load_neuron_records(lake, layer: int, neurons: list[int] | None = None) -> dict[int, NeuronRecord]:
    where = {"layer": str(layer)}
    if neurons is not None:
        where["neuron"] = neurons
    rows = read_table(lake, "activation_records", where=where)
    return {key.neuron: record for key, record in neuron_records_from_rows(rows.iter_rows(named=True)).items()}


def records_fingerprint(records) -> str:
    return content_hash(*(f"{r.sequence_id}:{r.tokens}:{r.activations}" for r in records))


# Neurons explained per request batch: bounded memory, and a crash loses at most one chunk
# of work that is not in the LLM cache yet (cached calls are never paid twice).
EXPLAIN_CHUNK = 64


def select_subset(spec: str, candidates: list[int]) -> list[int]:
    """The candidates named by an "all" / "0-3" / "1,5" spec (indices not captured are ignored)."""
    if str(spec).strip().lower() in ("", "all"):
        return list(candidates)
    # The bound only stops absurd ranges; indices beyond what was captured simply match nothing.
    chosen = set(parse_index_spec(spec, 1 << 20, "index"))
    return [c for c in candidates if c in chosen]


def explain_layer(
    explainer: Explainer,
    records_by_neuron: dict[int, NeuronRecord],
    existing: pl.DataFrame,
    records_settings: RecordsSettings,
    model_id: str,
    layer: int,
    output_tokens: Mapping[int, OutputTokens] | None = None,
) -> tuple[pl.DataFrame, int]:
    """Explanations for the layer under one explainer id: kept where the inputs are unchanged and
    the earlier call succeeded, new otherwise. Returns (all rows for the slice, new explanations).
    ``output_tokens`` (neuron -> promoted / suppressed tokens) feeds output-aware explainers."""
    uses_outputs = getattr(explainer, "uses_output_tokens", False)
    done = {
        (row["neuron"], row["records_hash"]): row
        for row in existing.iter_rows(named=True)
        if row["error"] is None
    }
    rows, todo = [], []
    label = explainer_label(explainer)
    for neuron in sorted(records_by_neuron):
        splits = split_records(
            records_by_neuron[neuron],
            records_settings.explain_top,
            records_settings.score_top,
            records_settings.score_random,
        )
        # Explainers that choose among candidates also read the held-out records.
        seen = splits.explain + (splits.holdout_top + splits.holdout_random if hasattr(explainer, "explain_splits") else [])
        fingerprint = records_fingerprint(seen)
        if uses_outputs:
            splits = dataclasses.replace(splits, output_tokens=outputs_of(output_tokens, layer, neuron))
            fingerprint = content_hash(fingerprint, splits.output_tokens.fingerprint())
        if (neuron, fingerprint) in done:
            rows.append({**done[(neuron, fingerprint)], "explainer_label": label})
        else:
            todo.append((neuron, fingerprint, splits))
    if hasattr(explainer, "explain_splits"):
        explain_many = explainer.explain_splits
    elif uses_outputs:
        explain_many = lambda splits_list: explainer.explain_many(  # noqa: E731
            [s.explain for s in splits_list], [s.output_tokens for s in splits_list]
        )
    else:
        explain_many = getattr(explainer, "explain_many", None) or (lambda batches: [explainer.explain(b) for b in batches])
        explain_many = (lambda inner: lambda splits_list: inner([s.explain for s in splits_list]))(explain_many)
    with track(total=len(todo), stage="explanations", layer=layer, unit="neuron", detail=explainer.explainer_id) as bar:
        for start in range(0, len(todo), EXPLAIN_CHUNK):
            chunk = todo[start : start + EXPLAIN_CHUNK]
            for (neuron, fingerprint, _), result in zip(chunk, explain_many([splits for _, _, splits in chunk])):
                rows.append(
                    {
                        "model": model_id,
                        "layer": str(layer),
                        "neuron": neuron,
                        "explainer_id": explainer.explainer_id,
                        "explainer_model": explainer.model_name,
                        "prompt_hash": explainer.prompt_hash,
                        "explanation": result.text,
                        "prompt_tokens": result.prompt_tokens,
                        "completion_tokens": result.completion_tokens,
                        "error": result.error,
                        "records_hash": fingerprint,
                        "created_at": datetime.now(timezone.utc),
                        "explainer_label": label,
                    }
                )
            bar.update(len(chunk))
    return table_frame("explanations", sorted(rows, key=lambda r: r["neuron"])), len(todo)


def outputs_of(output_tokens: Mapping[int, OutputTokens] | None, layer: int, neuron: int) -> OutputTokens:
    if not output_tokens or neuron not in output_tokens:
        raise ValueError(
            f"no neuron_output_tokens for layer {layer} neuron {neuron} (an output-aware explainer reads them): "
            "materialize neuron_output_tokens for the layer first"
        )
    return output_tokens[neuron]


def load_output_tokens(lake, layer: int) -> dict[int, OutputTokens]:
    """neuron -> its promoted / suppressed tokens, from the neuron_output_tokens table."""
    rows = read_table(
        lake, "neuron_output_tokens", where={"layer": str(layer)}, columns=["neuron", "promoted_tokens", "suppressed_tokens"]
    )
    return {n: OutputTokens.of(p, s) for n, p, s in rows.iter_rows()}


def build(partitions: dg.PartitionsDefinition, op_tags: dict | None = None) -> dg.AssetsDefinition:
    """The explanations asset over the given layer partitions."""

    @dg.asset(
        partitions_def=partitions,
        # Output-aware explainers also read each neuron's promoted tokens.
        deps=["activation_records", "neuron_output_tokens"],
        group_name="explain",
        kinds={"delta"},
        owners=["team:interpretability"],
        description="One explanation per neuron and explainer id (hash of explainer model, prompt template and "
        "parameters). A new prompt adds rows under a new id; earlier ids stay queryable.",
        check_specs=[quality_check_spec("explanations"), upstream_check_spec("explanations", "activation_records")],
        backfill_policy=dg.BackfillPolicy.single_run(),
        pool=GPU_POOL,
        op_tags=GPU_TAGS if op_tags is None else op_tags,
        code_version="explanations-v1",
    )
    def explanations(
        context: dg.AssetExecutionContext, pipeline: PipelineSettingsResource, llm: LLMResource
    ):
        settings, lake = pipeline.settings, pipeline.lake
        layers = layers_of(context)
        totals = {"explained": 0, "new_calls": 0, "errors": 0, "prompt_tokens": 0, "completion_tokens": 0}
        run_layers = [str(layer) for layer in layers]
        upstream = yield from gate_upstream("explanations", "activation_records", lake, layers, settings)
        plan = run_plan(settings, context.log.info)  # the bill of the configured run, before anything is paid
        records = {layer: load_neuron_records(lake, layer) for layer in layers}
        missing = [layer for layer in layers if not records[layer]]
        if missing:
            raise ValueError(f"no activation_records for layers {missing}: materialize activation_records first")
        model_id = read_table(lake, "activation_records", where={"layer": run_layers}, columns=["model"])["model"][0]
        frames = {}
        for explainer_settings, explainer in llm.explainers():
            per_layer = []
            explainer_layers = select_subset(explainer_settings.layers, layers)
            for layer in explainer_layers:
                layer_records = records[layer]
                wanted = select_subset(explainer_settings.neurons, sorted(layer_records))
                where = {"layer": str(layer), "explainer_id": explainer.explainer_id}
                existing = read_table(lake, "explanations", where=where)
                outputs = load_output_tokens(lake, layer) if getattr(explainer, "uses_output_tokens", False) else None
                frame, calls = explain_layer(
                    explainer, {n: layer_records[n] for n in wanted}, existing, settings.records, model_id, layer, outputs
                )
                per_layer.append(frame)
                totals["new_calls"] += calls
                context.log.info(f"layer {layer} {explainer.explainer_id}: {frame.height} explanations, {calls} new")
            if per_layer:
                frames[explainer.explainer_id] = (pl.concat(per_layer), [str(layer) for layer in explainer_layers])
        combined = pl.concat([frame for frame, _ in frames.values()])
        report = yield from gate("explanations", combined, QualityParams.from_settings(settings))
        for explainer_id, (frame, explainer_layers) in frames.items():
            write_table(
                lake, "explanations", frame, replace_where={"layer": explainer_layers, "explainer_id": explainer_id}
            )
        totals["explained"] = combined.height
        totals["errors"] = int(combined["error"].is_not_null().sum())
        totals["prompt_tokens"] = int(combined["prompt_tokens"].sum() or 0)
        totals["completion_tokens"] = int(combined["completion_tokens"].sum() or 0)
        totals.update(llm.usage())
        totals["neurons_explained"] = combined.filter(pl.col("error").is_null()).select("layer", "neuron").n_unique()
        totals.update(cost_metadata(llm.explainers(), combined))
        totals.update(failure_metadata(combined, None))
        publish_layers(context, "explanations", combined)
        yield dg.MaterializeResult(
            check_results=[check_result(report), upstream],
            metadata={**totals, **lake_metadata(lake, "explanations"), **plan},
        )

    return explanations
