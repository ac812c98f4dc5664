"""Stage 5: score each explanation by the correlation of its simulation with the real activations."""


import numpy as np
import polars as pl

import dagster as dg

from data_quality import QualityParams
from neuron_pipeline.assets.checks import check_result, combine_reports, gate, gate_upstream, quality_check_spec, upstream_check_spec
from neuron_pipeline.assets.metadata import lake_metadata, publish_layers, score_metadata
from neuron_pipeline.assets.partitions import layers_of
from neuron_pipeline.assets.resources import PipelineSettingsResource
from neuron_pipeline.interp.prompts import MAX_VALUE
from neuron_pipeline.interp.scoring import ScoredSequence, score_simulation
from neuron_pipeline.interp.variants import fit_calibration
from neuron_pipeline.lake import read_table, table_frame, table_path, write_table
from neuron_pipeline.lake.outcomes import meaningful_pairs


# Neurons whose simulations are read and scored at once (the table is sorted by neuron).
SCORE_CHUNK = 1024
SCORED_COLUMNS = [
    "model", "layer", "neuron", "explainer_id", "simulator_id", "kind", "rank", "true_activations", "expected_activations",
    "simulator_label", "error",
]


def score_layer(
    simulations: pl.DataFrame, max_activation: dict[int, float], explainer_labels: dict[str, str] | None = None
) -> pl.DataFrame:
    """One score row per (neuron, explainer id, simulator id) of a layer's simulations; a failed
    simulation gets a null score whose reason is the error. Pairs that mean nothing are left out."""
    rows = []
    group_keys = ["model", "layer", "neuron", "explainer_id", "simulator_id"]
    simulations = meaningful_pairs(simulations)
    for key, group in simulations.sort("kind", "rank").group_by(group_keys, maintain_order=True):
        model, layer, neuron, explainer_id, simulator_id = key
        labels = {
            "explainer_label": (explainer_labels or {}).get(explainer_id),
            "simulator_label": next(iter(group["simulator_label"].drop_nulls()), None),
        }
        errors = group["error"].drop_nulls()
        if errors.len():
            rows.append(
                {
                    "model": model,
                    "layer": layer,
                    "neuron": neuron,
                    "explainer_id": explainer_id,
                    "simulator_id": simulator_id,
                    "n_tokens": 0,
                    "null_reason": f"simulation failed: {errors[0]}",
                    **labels,
                }
            )
            continue
        by_kind = {"top": [], "random": [], "calibration": []}
        for row in group.iter_rows(named=True):
            by_kind[row["kind"]].append(ScoredSequence(row["true_activations"], row["expected_activations"]))
        if by_kind["calibration"]:
            # Calibrated simulator: a line fitted on held-out excerpts maps values to activations.
            slope, intercept = fit_calibration(
                np.concatenate([s.true_activations for s in by_kind["calibration"]]),
                np.concatenate([s.expected_activations for s in by_kind["calibration"]]),
            )
            for kind in ("top", "random"):
                by_kind[kind] = [
                    ScoredSequence(s.true_activations, [slope * v + intercept for v in s.expected_activations])
                    for s in by_kind[kind]
                ]
            scale = 1.0
        else:
            # The explainer saw values as 0-10 of the neuron's top activation; map them back for rsquared.
            scale = max(max_activation.get(neuron, 0.0), 0.0) / MAX_VALUE
        score = score_simulation(by_kind["top"], by_kind["random"], value_scale=scale)
        rows.append(
            {
                "model": model,
                "layer": layer,
                "neuron": neuron,
                "explainer_id": explainer_id,
                "simulator_id": simulator_id,
                "score": score.score,
                "score_top": score.score_top,
                "score_random": score.score_random,
                "rsquared": score.rsquared,
                "absolute_dev_explained": score.absolute_dev_explained,
                "n_tokens": score.n_tokens,
                "null_reason": score.null_reason,
                **labels,
            }
        )
    return table_frame("scores", rows)


def build(partitions: dg.PartitionsDefinition) -> dg.AssetsDefinition:
    """The scores asset over the given layer partitions."""

    @dg.asset(
        partitions_def=partitions,
        deps=["simulations"],
        group_name="explain",
        kinds={"delta"},
        owners=["team:interpretability"],
        description="Per (neuron, explainer id, simulator id): correlation of simulated and real activations pooled "
        "over the scored top + random excerpts (the paper's score), top-only and random-only scores, "
        "rsquared and absolute deviation explained.",
        check_specs=[quality_check_spec("scores"), upstream_check_spec("scores", "simulations")],
        backfill_policy=dg.BackfillPolicy.single_run(),
        code_version="scores-v1",
    )
    def scores(context: dg.AssetExecutionContext, pipeline: PipelineSettingsResource):
        lake = pipeline.lake
        layers = layers_of(context)
        upstream = yield from gate_upstream("scores", "simulations", lake, layers, pipeline.settings)
        params = QualityParams.from_settings(pipeline.settings)
        frames, reports = [], []
        # One layer at a time: its simulations are read, scored, validated, written and freed
        # (the scores themselves, one row per neuron, are kept for the run's metadata).
        for layer in layers:
            stats = read_table(lake, "neuron_activations", where={"layer": str(layer)}, columns=["neuron", "max"])
            max_activation = dict(zip(stats["neuron"].to_list(), stats["max"].to_list()))
            labels = read_table(lake, "explanations", where={"layer": str(layer)}, columns=["explainer_id", "explainer_label"])
            explainer_labels = dict(labels.drop_nulls().unique("explainer_id").iter_rows())
            neurons = sorted(read_table(lake, "simulations", where={"layer": str(layer)}, columns=["neuron"])["neuron"].unique().to_list())
            parts = [
                score_layer(
                    read_table(lake, "simulations", where={"layer": str(layer), "neuron": neurons[i : i + SCORE_CHUNK]}, columns=SCORED_COLUMNS),
                    max_activation,
                    explainer_labels,
                )
                for i in range(0, len(neurons), SCORE_CHUNK)
            ]
            frame = pl.concat(parts) if parts else table_frame("scores", [])
            reports.append((yield from gate("scores", frame, params, skip_empty=True)))
            write_table(lake, "scores", frame, replace_where={"layer": str(layer)})
            frames.append(frame)
        combined = pl.concat(frames)
        if not any(reports):  # every layer empty: the run's empty rows face the gate, as before
            yield from gate("scores", combined, params)
        report = combine_reports("scores", reports)
        metadata = {**lake_metadata(lake, "scores"), "rows": combined.height}
        # Mean, quantiles, histogram and best neurons over the run's layers; per layer on each partition.
        metadata.update(score_metadata(combined, lake))
        publish_layers(context, "scores", combined, lake=lake)
        yield dg.MaterializeResult(metadata=metadata, check_results=[check_result(report), upstream])

    return scores
