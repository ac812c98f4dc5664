"""Stage 4: every simulator predicts the scored excerpts from each explanation alone."""


import polars as pl

import dagster as dg

from neuron_pipeline.assets.explanations import load_neuron_records, select_subset
from data_quality import QualityParams
from neuron_pipeline.assets.checks import check_result, gate, gate_upstream, quality_check_spec, upstream_check_spec
from neuron_pipeline.assets.metadata import (
    VALUE_MASS_WARNING,
    cost_metadata,
    failure_metadata,
    lake_metadata,
    low_value_mass,
    publish_layers,
    value_mass_metadata,
)
from neuron_pipeline.assets.progress import track
from neuron_pipeline.assets.partitions import GPU_POOL, GPU_TAGS, layers_of
from neuron_pipeline.assets.resources import LLMResource, PipelineSettingsResource
from neuron_pipeline.config import RecordsSettings
from neuron_pipeline.interp.prompts import content_hash
from neuron_pipeline.interp.records import NeuronRecord, split_records
from neuron_pipeline.interp.reporting import error_text, pair_is_meaningful, simulator_label
from neuron_pipeline.interp.simulator import Simulator
from neuron_pipeline.lake import read_table, table_frame, table_path, write_table


def simulate_layer(
    simulator: Simulator,
    explanations: pl.DataFrame,
    records_by_neuron: dict[int, NeuronRecord],
    existing: pl.DataFrame,
    records_settings: RecordsSettings,
) -> tuple[pl.DataFrame, int, list[tuple[int, str]]]:
    """Simulations of the scored top and random excerpts for one explainer id and simulator.
    Rows whose (explanation, excerpts) fingerprint is unchanged are kept, not recomputed."""
    label = simulator_label(simulator)
    kept = {}
    for row in existing.iter_rows(named=True):
        if row["error"] is None:  # failed simulations are retried
            kept.setdefault((row["neuron"], row["input_hash"]), []).append({**row, "simulator_label": label})
    rows, calls, failed = [], 0, []
    for explanation in track(
        explanations.sort("neuron").iter_rows(named=True),
        total=explanations.height,
        stage="simulations",
        layer=explanations["layer"][0] if explanations.height else None,
        unit="neuron",
        detail=simulator.simulator_id,
    ):
        neuron = explanation["neuron"]
        if explanation["error"] is not None or neuron not in records_by_neuron:
            continue
        splits = split_records(
            records_by_neuron[neuron], records_settings.explain_top, records_settings.score_top, records_settings.score_random
        )
        scored = [("top", rank, r) for rank, r in enumerate(splits.score_top)] + [
            ("random", rank, r) for rank, r in enumerate(splits.score_random)
        ]
        if getattr(simulator, "calibrate", False):
            # Held-out excerpts on which the scorer fits the calibration line (never scored).
            held_out = splits.holdout_top + splits.holdout_random
            scored += [("calibration", rank, r) for rank, r in enumerate(held_out)]
        input_hash = content_hash(simulator.simulator_id, explanation["explanation"], *(str(r.tokens) for _, _, r in scored))
        if (neuron, input_hash) in kept:
            rows.extend(kept[(neuron, input_hash)])
            continue
        try:
            simulated = simulator.simulate(explanation["explanation"], [r.tokens for _, _, r in scored])
            error = None
        except Exception as exc:  # noqa: BLE001 - one neuron's failed calls must not stop the layer
            error = error_text(exc)
            failed.append((neuron, error))
            simulated = [None] * len(scored)  # one row per excerpt, with the error (lake/schemas.py)
        calls += error is None
        for (kind, rank, record), simulation in zip(scored, simulated):
            rows.append(
                {
                    "model": explanation["model"],
                    "layer": explanation["layer"],
                    "neuron": neuron,
                    "explainer_id": explanation["explainer_id"],
                    "simulator_id": simulator.simulator_id,
                    "kind": kind,
                    "rank": rank,
                    "sequence_id": record.sequence_id,
                    "tokens": list(record.tokens),
                    "true_activations": list(record.activations),
                    "expected_activations": None if error else list(simulation.expected_activations),
                    "mode": None if error else simulation.mode,
                    "input_hash": input_hash,
                    "prompt_tokens": 0 if error else simulation.prompt_tokens,
                    "completion_tokens": 0 if error else simulation.completion_tokens,
                    "value_mass": None if error else simulation.value_mass,
                    "simulator_label": label,
                    "error": error,
                }
            )
    return table_frame("simulations", rows), calls, failed


def build(partitions: dg.PartitionsDefinition, op_tags: dict | None = None) -> dg.AssetsDefinition:
    """The simulations asset over the given layer partitions."""

    @dg.asset(
        partitions_def=partitions,
        deps=["explanations"],
        group_name="explain",
        kinds={"delta"},
        owners=["team:interpretability"],
        description="Simulated activation per token of each scored excerpt (5 top excerpts the explainer did not "
        "see + 5 random ones), per explainer id and simulator id, with the simulation mode.",
        check_specs=[quality_check_spec("simulations"), upstream_check_spec("simulations", "explanations")],
        backfill_policy=dg.BackfillPolicy.single_run(),
        pool=GPU_POOL,
        op_tags=GPU_TAGS if op_tags is None else op_tags,
        code_version="simulations-v1",
    )
    def simulations(
        context: dg.AssetExecutionContext, pipeline: PipelineSettingsResource, llm: LLMResource
    ):
        settings, lake = pipeline.settings, pipeline.lake
        layers = layers_of(context)
        upstream = yield from gate_upstream("simulations", "explanations", lake, layers, settings)
        explainer_ids = [explainer.explainer_id for _, explainer in llm.explainers()]
        records = {layer: load_neuron_records(lake, layer) for layer in layers}
        total_calls = 0
        frames = {}
        failures = 0
        for explainer_id in explainer_ids:
            for simulator_settings, simulator in llm.simulators():
                if not pair_is_meaningful(explainer_id, simulator.simulator_id):
                    continue  # e.g. a prose explanation through the token look-up (interp/reporting.py)
                per_layer = []
                simulator_layers = select_subset(simulator_settings.layers, layers)
                for layer in simulator_layers:
                    layer_explanations = read_table(
                        lake, "explanations", where={"layer": str(layer), "explainer_id": explainer_id}
                    )
                    wanted = select_subset(simulator_settings.neurons, sorted(records[layer]))
                    layer_explanations = layer_explanations.filter(pl.col("neuron").is_in(wanted))
                    where = {"layer": str(layer), "explainer_id": explainer_id, "simulator_id": simulator.simulator_id}
                    existing = read_table(lake, "simulations", where=where)
                    frame, calls, failed = simulate_layer(
                        simulator, layer_explanations, records[layer], existing, settings.records
                    )
                    for neuron, error in failed:
                        context.log.warning(f"layer {layer} neuron {neuron}: simulation failed: {error}")
                    per_layer.append(frame)
                    total_calls += calls
                    failures += len(failed)
                if per_layer:
                    frames[(explainer_id, simulator.simulator_id)] = (
                        pl.concat(per_layer),
                        [str(layer) for layer in simulator_layers],
                    )
        # No frames: no (explainer, simulator) pair means anything (the gate then says the table is empty).
        combined = pl.concat([frame for frame, _ in frames.values()]) if frames else table_frame("simulations", [])
        report = yield from gate("simulations", combined, QualityParams.from_settings(settings))
        for (explainer_id, simulator_id), (frame, simulator_layers) in frames.items():
            write_table(
                lake,
                "simulations",
                frame.sort("layer", "neuron", maintain_order=True),  # row groups by neuron (lake/schemas.py)
                replace_where={"layer": simulator_layers, "explainer_id": explainer_id, "simulator_id": simulator_id},
            )
        total_rows = combined.height
        low_mass = low_value_mass(combined)
        if low_mass.height:
            context.log.warning(
                f"{low_mass.height} neuron(s) simulated from under {VALUE_MASS_WARNING:.0%} of the value tokens' "
                f"probability mass (lowest: layer {low_mass['layer'][0]} neuron {low_mass['neuron'][0]}, "
                f"{low_mass['value_mass'][0]:.2f}): a top-k API dropped the digits; see value_mass in simulations"
            )
        publish_layers(context, "simulations", combined)
        yield dg.MaterializeResult(
            check_results=[check_result(report), upstream],
            metadata={
                "simulated_excerpts": total_rows,
                "new_simulations": total_calls,
                "failed_simulations": failures,
                **failure_metadata(None, combined),
                "neurons_simulated": combined.filter(pl.col("error").is_null()).select("layer", "neuron").n_unique(),
                **llm.usage(),
                "prompt_tokens": int(combined["prompt_tokens"].sum() or 0),
                "completion_tokens": int(combined["completion_tokens"].sum() or 0),
                **cost_metadata(llm.simulators(), combined, id_attr="simulator_id"),
                **value_mass_metadata(combined),
                **lake_metadata(lake, "simulations"),
            },
        )

    return simulations
