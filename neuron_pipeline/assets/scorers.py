"""Stage 5b: detection, fuzzing and embedding scores of every explanation (interp/classification.py)."""

import polars as pl

import dagster as dg

from data_quality import QualityParams
from neuron_pipeline.assets.checks import (
    QualityGateFailed,
    check_result,
    check_rows,
    combine_reports,
    gate_upstream,
    quality_check_spec,
    upstream_check_spec,
)
from neuron_pipeline.assets.explanations import load_neuron_records, select_neurons, select_subset
from neuron_pipeline.assets.metadata import cost_metadata, lake_metadata, publish_layers
from neuron_pipeline.assets.partitions import GPU_POOL, GPU_TAGS, layers_of
from neuron_pipeline.assets.progress import track
from neuron_pipeline.assets.resources import LLMResource, PipelineSettingsResource
from neuron_pipeline.config import RecordsSettings, ScorerSettings
from neuron_pipeline.interp.classification import ScorerResult, ScoringSample, records_seen, scoring_sample
from neuron_pipeline.interp.prompts import content_hash
from neuron_pipeline.interp.records import NeuronRecord, split_records
from neuron_pipeline.interp.reporting import is_baseline_id
from neuron_pipeline.lake import read_table, table_frame, write_table

# Explanations scored per request batch (bounded memory; all of a chunk's requests go out together).
SCORE_CHUNK = 64


def input_hash(scorer, explanation: str, sample: ScoringSample) -> str:
    return content_hash(
        scorer.scorer_id, explanation, *(f"{r.sequence_id}:{label}:{r.tokens}:{r.activations}" for r, label in sample.labelled)
    )


def result_row(explanation: dict, scorer, result: ScorerResult, fingerprint: str) -> dict:
    m = result.metrics
    headline = m.auroc if scorer.method == "embedding" else m.balanced_accuracy
    reason = None
    if headline is None:
        reason = result.error or m.null_reason or ("no probabilities" if scorer.method == "embedding" else "undefined")
    return {
        "model": explanation["model"],
        "layer": explanation["layer"],
        "neuron": explanation["neuron"],
        "explainer_id": explanation["explainer_id"],
        "scorer_id": scorer.scorer_id,
        "method": scorer.method,
        "scorer_model": scorer.model_name,
        "score": headline,
        "balanced_accuracy": m.balanced_accuracy,
        "f1": m.f1,
        "precision": m.precision,
        "recall": m.recall,
        "auroc": m.auroc,
        "n_judged": m.n_judged,
        "n_activating": m.n_activating,
        "n_non_activating": m.n_quiet,
        "failed_groups": result.failed_groups,
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "calls": result.calls,
        "null_reason": reason,
        "input_hash": fingerprint,
        "sequence_ids": result.sequence_ids,
        "labels": result.labels,
        "predictions": result.predictions,
        "probabilities": result.probabilities,
    }


def score_layer(
    scorer,
    scorer_settings: ScorerSettings,
    explanations: pl.DataFrame,
    records_by_neuron: dict[int, NeuronRecord],
    explainers: list,
    records_settings: RecordsSettings,
    existing: pl.DataFrame | None = None,
) -> tuple[pl.DataFrame, int]:
    """One row per successful explanation of the layer. Every explanation of a neuron is judged on
    the same excerpts: none that any configured explainer saw. Rows of ``existing`` whose inputs are
    unchanged are kept. Returns the rows and how many explanations were scored anew."""
    kept = {
        (row["neuron"], row["explainer_id"], row["input_hash"]): row
        for row in (existing.iter_rows(named=True) if existing is not None else [])
    }
    items, owners, fingerprints, rows = [], [], [], []
    for row in explanations.sort("neuron", "explainer_id").iter_rows(named=True):
        record = records_by_neuron.get(row["neuron"])
        if row["error"] is not None or record is None:
            continue
        splits = split_records(record, records_settings.explain_top, records_settings.score_top, records_settings.score_random)
        seen = [r for explainer in explainers for r in records_seen(explainer, splits)]
        sample = scoring_sample(
            record,
            seen,
            scorer_settings.activating,
            scorer_settings.non_activating,
            scorer_settings.activating_min,
            scorer_settings.quiet_max,
        )
        fingerprint = input_hash(scorer, row["explanation"], sample)
        previous = kept.get((row["neuron"], row["explainer_id"], fingerprint))
        if previous is not None:
            rows.append(previous)
            continue
        items.append((row["explanation"], sample))
        owners.append(row)
        fingerprints.append(fingerprint)
    layer = owners[0]["layer"] if owners else "?"
    # Each chunk's answers are in the LLM cache when it ends: a safe point to stop at (progress.py).
    with track(total=len(items), stage="scorer_results", layer=layer, unit="explanation", detail=scorer.scorer_id) as bar:
        for start in range(0, len(items), SCORE_CHUNK):
            chunk = slice(start, start + SCORE_CHUNK)
            seeds = [(r["layer"], r["neuron"]) for r in owners[chunk]]
            results = scorer.score_many(items[chunk], seeds=seeds)
            for row, result, fingerprint in zip(owners[chunk], results, fingerprints[chunk]):
                rows.append(result_row(row, scorer, result, fingerprint))
            bar.update(len(results))
    rows.sort(key=lambda r: (r["neuron"], r["explainer_id"]))
    return table_frame("scorer_results", rows), len(items)


def build(partitions: dg.PartitionsDefinition, op_tags: dict | None = None) -> dg.AssetsDefinition:
    """The scorer_results asset over the given layer partitions."""

    @dg.asset(
        partitions_def=partitions,
        deps=["explanations"],
        group_name="explain",
        kinds={"delta"},
        owners=["team:interpretability"],
        description="Detection, fuzzing (a chat model says yes/no per excerpt) and embedding (all-MiniLM-L6-v2 "
        "similarity) scores per (neuron, explainer id, scorer id), on activating and non-activating excerpts "
        "no explainer saw; join with `scores` on (layer, neuron, explainer_id).",
        check_specs=[quality_check_spec("scorer_results"), upstream_check_spec("scorer_results", "explanations")],
        backfill_policy=dg.BackfillPolicy.single_run(),
        pool=GPU_POOL,
        op_tags=GPU_TAGS if op_tags is None else op_tags,
        code_version="scorer_results-v1",
    )
    def scorer_results(context: dg.AssetExecutionContext, pipeline: PipelineSettingsResource, llm: LLMResource):
        settings, lake = pipeline.settings, pipeline.lake
        layers = layers_of(context)
        upstream = yield from gate_upstream("scorer_results", "explanations", lake, layers, settings)
        explainers = [explainer for _, explainer in llm.explainers()]
        explainer_ids = [explainer.explainer_id for explainer in explainers]
        scorers = llm.scorers()
        scorer_ids = [scorer.scorer_id for _, scorer in scorers]
        params = QualityParams.from_settings(settings)
        reports, scored_anew, usd_in_layers = [], 0, 0.0
        try:
            # Layer by layer: one layer's records and results in memory, validated and written
            # before the next layer is read (a whole model's records would not fit).
            for layer in layers:
                active = [(s, scorer) for s, scorer in scorers if select_subset(s.layers, [layer])]
                if not active:
                    continue
                records = load_neuron_records(lake, layer)
                frames, wanted_by_spec = [], {}
                for scorer_settings, scorer in active:
                    judged = [e for e in explainer_ids if scorer_settings.explanations == "all" or not is_baseline_id(e)]
                    explanations = read_table(lake, "explanations", where={"layer": str(layer), "explainer_id": judged})
                    spec = scorer_settings.neurons  # scorers derived from one entry share it: selected once
                    if spec not in wanted_by_spec:
                        wanted_by_spec[spec] = select_neurons(spec, sorted(records), lake, layer, settings)
                    wanted = wanted_by_spec[spec]
                    existing = read_table(lake, "scorer_results", where={"layer": str(layer), "scorer_id": scorer.scorer_id})
                    frame, new = score_layer(
                        scorer,
                        scorer_settings,
                        explanations.filter(pl.col("neuron").is_in(wanted)),
                        records,
                        explainers,
                        settings.records,
                        existing,
                    )
                    context.log.info(f"layer {layer} {scorer.scorer_id}: {frame.height} explanations, {new} scored anew")
                    frames.append(frame)
                    scored_anew += new
                del records
                layer_rows = pl.concat(frames)
                if layer_rows.is_empty():
                    continue
                reports.append(check_rows("scorer_results", layer_rows, params, skip_empty=True))
                # The layer's rows under the configured explainers and scorers are replaced; other
                # layers, and earlier explainer or scorer ids, stay queryable.
                write_table(
                    lake, "scorer_results", layer_rows,
                    replace_where={"layer": str(layer), "explainer_id": explainer_ids, "scorer_id": scorer_ids},
                )  # fmt: skip
                usd_in_layers += cost_metadata(scorers, layer_rows, id_attr="scorer_id").get("usd_in_layers", 0.0)
        except QualityGateFailed as failed:
            yield failed.result
            raise failed.failure from None
        metadata = {"scored_anew": scored_anew}
        if reports:
            # The run's rows, read back with the columns the metadata needs only.
            written = read_table(
                lake, "scorer_results",
                where={"layer": [str(layer) for layer in layers], "explainer_id": explainer_ids, "scorer_id": scorer_ids},
                columns=["layer", "neuron", "explainer_id", "scorer_id", "method", "score", "failed_groups",
                         "prompt_tokens", "completion_tokens"],
            )  # fmt: skip
            metadata["rows"] = written.height
            checks = [check_result(combine_reports("scorer_results", reports)), upstream]
            by_method = written.group_by("method").agg(
                pl.col("score").mean().alias("mean"), pl.col("score").is_null().sum().alias("null")
            )
            for row in by_method.iter_rows(named=True):
                metadata[f"mean_{row['method']}_score"] = None if row["mean"] is None else round(row["mean"], 4)
                metadata[f"null_{row['method']}_scores"] = int(row["null"])
            metadata["failed_groups"] = int(written["failed_groups"].sum() or 0)
            metadata["prompt_tokens"] = int(written["prompt_tokens"].sum() or 0)
            metadata["completion_tokens"] = int(written["completion_tokens"].sum() or 0)
            metadata.update(cost_metadata(scorers))
            metadata["usd_in_layers"] = round(usd_in_layers, 6)
            publish_layers(context, "scorer_results", written)
        else:
            metadata["rows"] = 0
            checks = [
                dg.AssetCheckResult(asset_key="scorer_results", check_name="great_expectations", passed=True,
                                    metadata={"summary": "no scorer configured for these layers: nothing written"}),
                upstream,
            ]
        metadata.update(llm.usage())
        metadata.update(lake_metadata(lake, "scorer_results"))
        yield dg.MaterializeResult(metadata=metadata, check_results=checks)

    return scorer_results
