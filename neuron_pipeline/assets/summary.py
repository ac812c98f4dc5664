"""Stage 6: per-layer summary of scores for each (explainer id, simulator id)."""


import polars as pl

import dagster as dg

from data_quality import QualityParams
from neuron_pipeline.assets.checks import check_result, combine_reports, gate, gate_upstream, quality_check_spec, upstream_check_spec
from neuron_pipeline.assets.metadata import lake_metadata, publish_layers
from neuron_pipeline.assets.partitions import layers_of
from neuron_pipeline.assets.resources import PipelineSettingsResource
from neuron_pipeline.lake import read_table, table_frame, table_path, write_table
from neuron_pipeline.lake.outcomes import meaningful_pairs

# The paper's bar for a well-explained neuron.
GOOD_SCORE = 0.8


def summarize_layer(scores: pl.DataFrame, explanations: pl.DataFrame, simulations: pl.DataFrame) -> pl.DataFrame:
    scores = meaningful_pairs(scores)
    if scores.is_empty():
        return table_frame("layer_summary", [])
    texts = explanations.select("neuron", "explainer_id", "explanation", "explainer_model", _label="explainer_label")
    joined = scores.join(texts, on=["neuron", "explainer_id"], how="left").with_columns(
        explainer_label=pl.coalesce("explainer_label", "_label")
    )
    best = (
        joined.filter(pl.col("score").is_not_null())
        .sort("score", descending=True)
        .group_by("explainer_id", "simulator_id", maintain_order=True)
        .first()
        .select(
            "explainer_id",
            "simulator_id",
            best_neuron=pl.col("neuron"),
            best_score=pl.col("score"),
            best_explanation=pl.col("explanation"),
        )
    )
    stats = joined.group_by("model", "layer", "explainer_id", "simulator_id").agg(
        explainer_model=pl.col("explainer_model").first(),
        explainer_label=pl.col("explainer_label").drop_nulls().first(),
        simulator_label=pl.col("simulator_label").drop_nulls().first(),
        neurons_scored=pl.col("score").is_not_null().sum().cast(pl.Int64),
        neurons_null=pl.col("score").is_null().sum().cast(pl.Int64),
        mean_score=pl.col("score").mean(),
        median_score=pl.col("score").median(),
        p90_score=pl.col("score").quantile(0.9),
        frac_score_ge_0_8=(pl.col("score") >= GOOD_SCORE).sum() / pl.col("score").is_not_null().sum(),
    )
    summary = stats.join(best, on=["explainer_id", "simulator_id"], how="left").sort("explainer_id", "simulator_id")
    baseline = joined.filter(
        pl.col("explainer_id").str.starts_with("baseline-") & pl.col("simulator_id").str.starts_with("baseline-")
    ).select("neuron", baseline_score="score")
    floor = (
        joined.select("explainer_id", "simulator_id", "neuron")
        .join(baseline, on="neuron", how="inner")
        .group_by("explainer_id", "simulator_id")
        .agg(baseline_mean_score=pl.col("baseline_score").mean())
    )
    summary = summary.join(floor, on=["explainer_id", "simulator_id"], how="left")
    explainer_cost = explanations.group_by("explainer_id").agg(
        explainer_prompt_tokens=pl.col("prompt_tokens").sum(),
        explainer_completion_tokens=pl.col("completion_tokens").sum(),
    )
    simulator_cost = simulations.group_by("explainer_id", "simulator_id").agg(
        simulator_prompt_tokens=pl.col("prompt_tokens").sum(),
        simulator_completion_tokens=pl.col("completion_tokens").sum(),
    )
    summary = summary.join(explainer_cost, on="explainer_id", how="left").join(
        simulator_cost, on=["explainer_id", "simulator_id"], how="left"
    )
    return table_frame("layer_summary", summary)


def build(partitions: dg.PartitionsDefinition) -> dg.AssetsDefinition:
    """The layer_summary asset over the given layer partitions."""

    @dg.asset(
        partitions_def=partitions,
        deps=["scores"],
        group_name="report",
        kinds={"delta"},
        owners=["team:interpretability"],
        description="Per layer and (explainer id, simulator id): neurons scored, mean / median / p90 score, share "
        "of neurons scoring >= 0.8, and the best neuron with its explanation.",
        check_specs=[quality_check_spec("layer_summary"), upstream_check_spec("layer_summary", "scores")],
        backfill_policy=dg.BackfillPolicy.single_run(),
        code_version="layer_summary-v1",
    )
    def layer_summary(context: dg.AssetExecutionContext, pipeline: PipelineSettingsResource):
        lake = pipeline.lake
        layers = layers_of(context)
        upstream = yield from gate_upstream("layer_summary", "scores", lake, layers, pipeline.settings)
        params = QualityParams.from_settings(pipeline.settings)
        frames, reports = [], []
        for layer in layers:  # one layer read, summarized, validated and written at a time
            where = {"layer": str(layer)}
            frame = summarize_layer(
                read_table(lake, "scores", where=where),
                read_table(lake, "explanations", where=where),
                read_table(lake, "simulations", where=where, columns=["explainer_id", "simulator_id", "prompt_tokens", "completion_tokens"]),
            )
            reports.append((yield from gate("layer_summary", frame, params, skip_empty=True)))
            write_table(lake, "layer_summary", frame, replace_where=where)
            frames.append(frame)  # a few rows per layer
        summary = pl.concat(frames)
        if not any(reports):  # every layer empty: the run's empty rows face the gate, as before
            yield from gate("layer_summary", summary, params)
        report = combine_reports("layer_summary", reports)
        metadata = {**lake_metadata(lake, "layer_summary"), "rows": summary.height}
        if summary.height:
            table = summary.select(
                "layer", "explainer_label", "simulator_label", "explainer_id", "simulator_id", "neurons_scored", "mean_score", "best_neuron"
            )
            metadata["summary"] = dg.MetadataValue.md(_markdown(table))
        publish_layers(context, "layer_summary", summary)
        yield dg.MaterializeResult(metadata=metadata, check_results=[check_result(report), upstream])

    return layer_summary


def _markdown(frame: pl.DataFrame) -> str:
    header = "| " + " | ".join(frame.columns) + " |\n|" + "---|" * len(frame.columns) + "\n"
    body = "\n".join(
        "| " + " | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in row) + " |" for row in frame.iter_rows()
    )
    return header + body
