"""Stage 4: every simulator predicts the scored excerpts from each explanation alone."""


from typing import Callable, Iterable

import polars as pl

import dagster as dg

from neuron_pipeline.assets.explanations import select_neurons, select_subset
from data_quality import QualityParams
from neuron_pipeline.assets.checks import (
    QualityGateFailed,
    check_result,
    check_rows,
    gate,
    combine_reports,
    gate_upstream,
    quality_check_spec,
    upstream_check_spec,
)
from neuron_pipeline.assets.layered import RowBuffer, layer_neurons, llm_workers, record_chunks, run_by_layer
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
from neuron_pipeline.interp.reporting import error_text, is_baseline_id, pair_is_meaningful, simulator_label
from neuron_pipeline.interp.simulator import Simulator
from neuron_pipeline.lake import read_table, table_frame, table_path, write_table


def _scored(records_settings: RecordsSettings, simulator: Simulator, record: NeuronRecord) -> list[tuple[str, int, object]]:
    splits = split_records(record, records_settings.explain_top, records_settings.score_top, records_settings.score_random)
    scored = [("top", rank, r) for rank, r in enumerate(splits.score_top)] + [
        ("random", rank, r) for rank, r in enumerate(splits.score_random)
    ]
    if getattr(simulator, "calibrate", False):
        # Held-out excerpts on which the scorer fits the calibration line (never scored).
        held_out = splits.holdout_top + splits.holdout_random
        scored += [("calibration", rank, r) for rank, r in enumerate(held_out)]
    return scored


def simulate_layer(
    simulator: Simulator,
    explanations: pl.DataFrame,
    records_by_neuron: dict[int, NeuronRecord],
    existing: pl.DataFrame,
    records_settings: RecordsSettings,
    workers: int = 1,
) -> tuple[pl.DataFrame, int, list[tuple[int, str]]]:
    """Simulations of the scored top and random excerpts for one explainer id and simulator.
    Rows whose (explanation, excerpts) fingerprint is unchanged are kept, not recomputed.
    (The asset streams layers through ``simulate_layers``; this is the one-layer form.)"""
    out: dict = {}
    layer = int(explanations["layer"][0]) if explanations.height else 0

    def flush(layer, frame, failed):
        out["frame"], out["failed"] = frame, failed

    calls = simulate_layers(
        simulator, [layer], lambda _: (explanations, records_by_neuron, existing), records_settings, flush, workers
    )
    return out["frame"], calls, out["failed"]


def simulate_layers(
    simulator: Simulator,
    layers: list[int],
    load: Callable[[int], tuple[pl.DataFrame, dict[int, NeuronRecord] | Iterable[dict[int, NeuronRecord]], pl.DataFrame]],
    records_settings: RecordsSettings,
    flush: Callable[[int, pl.DataFrame, list[tuple[int, str]]], None],
    workers: int = 1,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Simulate the layers' explained neurons under one explainer id, ``workers`` neurons in
    progress at once across layers (so a concurrent backend stays full). ``load(layer)`` gives
    the layer's explanations, its records (a dict, or chunks of dicts read lazily, in neuron
    order) and its existing simulations; ``flush(layer, frame, failed)`` receives each layer's
    complete slice (sorted by neuron) and the neurons whose simulation failed. Returns the number
    of neurons simulated anew."""
    calls = 0
    label = simulator_label(simulator)

    def plan(layer: int):
        explanations, records, existing = load(layer)
        existing = existing.filter(pl.col("error").is_null())  # failed simulations are retried
        kept_keys = set(existing.select("neuron", "input_hash").unique().iter_rows()) if existing.height else set()
        state: dict = {"rows": RowBuffer("simulations"), "kept": [], "existing": existing, "failed": []}
        by_neuron = {
            row["neuron"]: row for row in explanations.sort("neuron").iter_rows(named=True) if row["error"] is None
        }
        chunks = [records] if isinstance(records, dict) else records

        def tasks():
            for chunk in chunks:
                for neuron in sorted(chunk):
                    explanation = by_neuron.get(neuron)
                    if explanation is None:
                        continue
                    scored = _scored(records_settings, simulator, chunk[neuron])
                    input_hash = content_hash(
                        simulator.simulator_id, explanation["explanation"], *(str(r.tokens) for _, _, r in scored)
                    )
                    if (neuron, input_hash) in kept_keys:
                        state["kept"].append((neuron, input_hash))
                        continue
                    yield explanation, scored, input_hash

        return state, tasks()

    def work(task):
        explanation, scored, _ = task
        return simulator.simulate(explanation["explanation"], [r.tokens for _, _, r in scored])

    def collect(state, task, simulated):
        nonlocal calls
        explanation, scored, input_hash = task
        neuron = explanation["neuron"]
        if progress is not None:
            progress(1)
        error = None
        if isinstance(simulated, Exception):  # one neuron's failed calls must not stop the layer
            error = error_text(simulated)
            state["failed"].append((neuron, error))
            simulated = [None] * len(scored)  # one row per excerpt, with the error (lake/schemas.py)
        calls += error is None
        for (kind, rank, record), simulation in zip(scored, simulated):
            state["rows"].add(
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

    def flush_layer(layer: int, state) -> None:
        if progress is not None and state["kept"]:
            progress(len(state["kept"]))  # unchanged simulations count as done
        rows: RowBuffer = state["rows"]
        if state["kept"]:
            kept = pl.DataFrame(state["kept"], schema={"neuron": pl.Int32, "input_hash": pl.String}, orient="row")
            existing = state["existing"]
            kept_rows = existing.join(kept.cast(existing.select("neuron", "input_hash").schema), on=["neuron", "input_hash"], how="semi")
            rows.add_frame(kept_rows.with_columns(simulator_label=pl.lit(label, dtype=pl.String)))
        frame = rows.frame()
        # Stable: a neuron's rows keep their kind / rank order (row groups by neuron, lake/schemas.py).
        flush(layer, frame.sort("neuron", maintain_order=True), state["failed"])

    run_by_layer(layers, plan, work, collect, flush_layer, workers)
    return calls


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
        # Every layer's stored explanations are validated before the first request. (Validating each
        # layer on the prefetch thread, ahead of the window, was tried: no clear gain in single runs,
        # because the stage is bound by its own CPU per request, not by the gate; BENCHMARKS.md.)
        upstream = yield from gate_upstream("simulations", "explanations", lake, layers, settings)
        explainer_ids = [explainer.explainer_id for _, explainer in llm.explainers()]
        neurons_of = {layer: layer_neurons(lake, layer) for layer in layers}
        params = QualityParams.from_settings(settings)
        totals = {"simulated_excerpts": 0, "new_simulations": 0, "failed_simulations": 0, "prompt_tokens": 0, "completion_tokens": 0}
        reports = []
        usd_in_layers = 0.0
        simulator_ids = []
        try:
            for explainer_id in explainer_ids:
                for simulator_settings, simulator in llm.simulators():
                    if not pair_is_meaningful(explainer_id, simulator.simulator_id):
                        continue  # e.g. a prose explanation through the token look-up (interp/reporting.py)
                    if simulator_settings.explanations == "llm" and is_baseline_id(explainer_id):
                        continue
                    simulator_ids.append(simulator.simulator_id)
                    simulator_layers = select_subset(simulator_settings.layers, layers)
                    wanted_of = {layer: select_neurons(simulator_settings.neurons, neurons_of[layer], lake, layer, settings)
                                 for layer in simulator_layers}  # fmt: skip

                    def load(layer, simulator=simulator, explainer_id=explainer_id, wanted_of=wanted_of):
                        wanted = wanted_of[layer]
                        explanations = read_table(lake, "explanations", where={"layer": str(layer), "explainer_id": explainer_id})
                        explanations = explanations.filter(pl.col("neuron").is_in(wanted))
                        explained = sorted(explanations.filter(pl.col("error").is_null())["neuron"].to_list())
                        where = {"layer": str(layer), "explainer_id": explainer_id, "simulator_id": simulator.simulator_id}
                        existing = read_table(lake, "simulations", where=where)
                        return explanations, record_chunks(lake, layer, explained), existing

                    def flush(layer, frame, failed, simulator=simulator, explainer_id=explainer_id):
                        nonlocal usd_in_layers
                        for neuron, error in failed:
                            context.log.warning(f"layer {layer} neuron {neuron}: simulation failed: {error}")
                        totals["failed_simulations"] += len(failed)
                        # Validated before it is written, one layer at a time: bad rows never land.
                        reports.append(check_rows("simulations", frame, params, skip_empty=True))
                        write_table(
                            lake,
                            "simulations",
                            frame,
                            replace_where={"layer": str(layer), "explainer_id": explainer_id, "simulator_id": simulator.simulator_id},
                        )
                        totals["simulated_excerpts"] += frame.height
                        totals["prompt_tokens"] += int(frame["prompt_tokens"].sum() or 0)
                        totals["completion_tokens"] += int(frame["completion_tokens"].sum() or 0)
                        usd_in_layers += cost_metadata(llm.simulators(), frame, id_attr="simulator_id").get("usd_in_layers", 0.0)

                    total = sum(len(wanted_of[layer]) for layer in simulator_layers)
                    with track(
                        total=total, stage="simulations", layer=simulator_layers, unit="neuron", detail=simulator.simulator_id
                    ) as bar:
                        totals["new_simulations"] += simulate_layers(
                            simulator, simulator_layers, load, settings.records, flush,
                            workers=llm_workers(simulator_settings), progress=bar.update,
                        )
        except QualityGateFailed as failed:
            yield failed.result
            raise failed.failure from None
        if not any(reports):
            # Nothing simulated (e.g. no (explainer, simulator) pair means anything): the gate says so.
            yield from gate("simulations", table_frame("simulations", []), params)
        report = combine_reports("simulations", reports)
        written = read_table(
            lake,
            "simulations",
            where={"layer": [str(layer) for layer in layers], "explainer_id": explainer_ids, "simulator_id": simulator_ids},
            columns=["layer", "neuron", "explainer_id", "simulator_id", "simulator_label", "error", "value_mass"],
        )
        low_mass = low_value_mass(written)
        if low_mass.height:
            context.log.warning(
                f"{low_mass.height} neuron(s) simulated from under {VALUE_MASS_WARNING:.0%} of the value tokens' "
                f"probability mass (lowest: layer {low_mass['layer'][0]} neuron {low_mass['neuron'][0]}, "
                f"{low_mass['value_mass'][0]:.2f}): a top-k API dropped the digits; see value_mass in simulations"
            )
        publish_layers(context, "simulations", written)
        yield dg.MaterializeResult(
            check_results=[check_result(report), upstream],
            metadata={
                "simulated_excerpts": totals["simulated_excerpts"],
                "new_simulations": totals["new_simulations"],
                "failed_simulations": totals["failed_simulations"],
                **failure_metadata(None, written),
                "neurons_simulated": written.filter(pl.col("error").is_null()).select("layer", "neuron").n_unique(),
                **llm.usage(),
                "prompt_tokens": totals["prompt_tokens"],
                "completion_tokens": totals["completion_tokens"],
                **cost_metadata(llm.simulators()),
                "usd_in_layers": round(usd_in_layers, 6),
                **value_mass_metadata(written),
                **lake_metadata(lake, "simulations"),
            },
        )

    return simulations
