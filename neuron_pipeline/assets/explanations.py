"""Stage 3: every configured explainer explains every selected neuron of the layer."""


import dataclasses
from datetime import datetime, timezone
from typing import Callable, Iterable, Mapping, Sequence

import polars as pl

import dagster as dg

from data_quality import QualityParams
from neuron_pipeline.assets.checks import (
    QualityGateFailed,
    check_result,
    check_rows,
    gate,
    combine_reports,
    UpstreamGate,
    quality_check_spec,
    upstream_check_spec,
)
from neuron_pipeline.assets.layered import layer_neurons, llm_workers, record_chunks, run_by_layer
from neuron_pipeline.assets.metadata import cost_metadata, failure_metadata, lake_metadata, publish_layers
from neuron_pipeline.assets.progress import track
from neuron_pipeline.assets.partitions import GPU_POOL, GPU_TAGS, layers_of
from neuron_pipeline.assets.resources import LLMResource, PipelineSettingsResource
from neuron_pipeline.config import RecordsSettings, Settings, parse_index_spec
from neuron_pipeline.interp.explainer import Explainer, Explanation
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




def select_subset(spec: str, candidates: list[int]) -> list[int]:
    """The candidates named by an "all" / "0-3" / "1,5" spec (indices not captured are ignored)."""
    if str(spec).strip().lower() in ("", "all"):
        return list(candidates)
    # The bound only stops absurd ranges; indices beyond what was captured simply match nothing.
    chosen = set(parse_index_spec(spec, 1 << 20, "index"))
    return [c for c in candidates if c in chosen]


def select_neurons(spec: str, candidates: list[int], lake, layer: int, settings: Settings) -> list[int]:
    """An LLM entry's neurons in one layer: an index spec (:func:`select_subset`), or ``best:N`` /
    ``worst:N`` (comma-joined): the neurons the no-LLM baseline explains best and worst here, where
    an LLM shows what it adds over the token list and where it is needed. Deterministic, so the
    explainer and simulator entries with the same spec pick the same neurons; ranked by the
    configured baseline (its `baseline_tokens`), as in the `scores` table."""
    from neuron_pipeline.config import baseline_selectors
    from neuron_pipeline.interp.baseline import baseline_score, best_and_worst

    picks = baseline_selectors(spec)
    if picks is None:
        return select_subset(spec, candidates)
    records_settings = settings.records
    records = load_neuron_records(lake, layer, list(candidates))
    scores = {}
    for neuron, record in records.items():
        splits = split_records(record, records_settings.explain_top, records_settings.score_top, records_settings.score_random)
        scores[neuron] = baseline_score(splits.explain, splits.score_top, splits.score_random, settings.baseline_tokens)
    return best_and_worst(scores, *picks)


def selections(spec: str, layers: Sequence[int], neurons_of: Mapping[int, list[int]], lake, settings: Settings, log) -> dict[int, list[int]]:
    """:func:`select_neurons` for each layer, computed once per step; a ``best:``/``worst:`` spec
    that picks nothing in a layer (no neuron there has a defined baseline score) is logged as a
    warning, not skipped silently."""
    from neuron_pipeline.config import baseline_selectors

    chosen = {layer: select_neurons(spec, neurons_of[layer], lake, layer, settings) for layer in layers}
    if baseline_selectors(spec) is not None:
        for layer in layers:
            if neurons_of[layer] and not chosen[layer]:
                log.warning(
                    f"layer {layer}: neurons {spec!r} picked none of {len(neurons_of[layer])} neurons: no baseline score "
                    "is defined there (flat held-out activations); list neurons by index to explain them anyway"
                )
    return chosen


def _explain_fn(explainer: Explainer):
    """Explain a list of splits with whatever the explainer offers."""
    if hasattr(explainer, "explain_splits"):
        return explainer.explain_splits
    if getattr(explainer, "uses_output_tokens", False):
        return lambda splits_list: explainer.explain_many([s.explain for s in splits_list], [s.output_tokens for s in splits_list])
    explain_many = getattr(explainer, "explain_many", None) or (lambda batches: [explainer.explain(b) for b in batches])
    return lambda splits_list: explain_many([s.explain for s in splits_list])


def _todo(
    explainer: Explainer, records_by_neuron: dict[int, NeuronRecord], done: dict, records_settings: RecordsSettings,
    kept: list, layer: int, output_tokens: Mapping[int, OutputTokens] | None,
):
    """(neuron, fingerprint, splits) to explain; unchanged successful rows go to ``kept``."""
    uses_outputs = getattr(explainer, "uses_output_tokens", False)
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
            kept.append({**done[(neuron, fingerprint)], "explainer_label": explainer_label(explainer)})
        else:
            yield neuron, fingerprint, splits


def _explanation_row(explainer: Explainer, model_id: str, layer: int, neuron: int, fingerprint: str, result) -> dict:
    return {
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
        "explainer_label": explainer_label(explainer),
    }


def _failed(exc: Exception) -> Explanation:
    message = str(exc).splitlines()[0][:300] if str(exc) else ""
    return Explanation("", error=f"{type(exc).__name__}: {message}")


def explain_layer(
    explainer: Explainer,
    records_by_neuron: dict[int, NeuronRecord],
    existing: pl.DataFrame,
    records_settings: RecordsSettings,
    model_id: str,
    layer: int,
    output_tokens: Mapping[int, OutputTokens] | None = None,
    workers: int = 1,
) -> tuple[pl.DataFrame, int]:
    """Explanations for the layer under one explainer id: kept where the inputs are unchanged and
    the earlier call succeeded, new otherwise. Returns (all rows for the slice, new explanations).
    ``output_tokens`` (neuron -> promoted / suppressed tokens) feeds output-aware explainers.
    (The asset streams layers through ``explain_layers``; this is the one-layer form.)"""
    frames: dict[int, pl.DataFrame] = {}
    calls = explain_layers(
        explainer, [layer], lambda _: (records_by_neuron, existing, output_tokens), records_settings, model_id,
        lambda _, frame: frames.__setitem__(layer, frame), workers,
    )
    return frames[layer], calls


def explain_layers(
    explainer: Explainer,
    layers: list[int],
    load: Callable[
        [int], tuple[dict[int, NeuronRecord] | Iterable[dict[int, NeuronRecord]], pl.DataFrame, Mapping[int, OutputTokens] | None]
    ],
    records_settings: RecordsSettings,
    model_id: str,
    flush: Callable[[int, pl.DataFrame], None],
    workers: int = 1,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Explain the layers' neurons, ``workers`` neurons in progress at once across layers.
    ``load(layer)`` gives the layer's records (a dict, or chunks of dicts read lazily), its
    existing rows under this explainer id and its output tokens (output-aware explainers, else None); ``flush(layer, frame)`` receives each layer's complete
    slice, sorted by neuron, as soon as it is done. Returns the number of new explanations."""
    explain = _explain_fn(explainer)
    calls = 0

    def plan(layer: int):
        records, existing, output_tokens = load(layer)
        done = {(row["neuron"], row["records_hash"]): row for row in existing.iter_rows(named=True) if row["error"] is None}
        state: dict = {"layer": layer, "kept": [], "rows": []}
        chunks = [records] if isinstance(records, dict) else records

        def tasks():
            for chunk in chunks:
                yield from _todo(explainer, chunk, done, records_settings, state["kept"], layer, output_tokens)

        return state, tasks()

    def work(task):
        _, _, splits = task
        return explain([splits])[0]

    def collect(state, task, result):
        nonlocal calls
        neuron, fingerprint, _ = task
        if isinstance(result, Exception):  # a failure of our own code path: recorded with the neuron
            result = _failed(result)
        state["rows"].append(_explanation_row(explainer, model_id, state["layer"], neuron, fingerprint, result))
        calls += 1
        if progress is not None:
            progress(1)

    def flush_layer(layer: int, state) -> None:
        if progress is not None and state["kept"]:
            progress(len(state["kept"]))  # unchanged explanations count as done
        rows = sorted(state["kept"] + state["rows"], key=lambda r: r["neuron"])
        flush(layer, table_frame("explanations", rows))

    run_by_layer(layers, plan, work, collect, flush_layer, workers)
    return calls


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
        # Each layer's stored records are validated when the layer is planned (on the prefetch
        # thread, while the previous layer's calls are in flight): a corrupt layer is never sent,
        # the layers planned before it finish, and the first request does not wait for the whole
        # run's records to be validated (seconds per layer at GPT-2 XL's 6,400 neurons).
        upstream_gate = UpstreamGate("explanations", "activation_records", lake, settings)
        plan = run_plan(settings, context.log.info)  # the bill of the configured run, before anything is paid
        neurons_of = {layer: layer_neurons(lake, layer) for layer in layers}
        missing = [layer for layer in layers if not neurons_of[layer]]
        if missing:
            raise ValueError(f"no activation_records for layers {missing}: materialize activation_records first")
        model_id = read_table(lake, "activation_records", where={"layer": str(layers[0])}, columns=["model"])["model"][0]
        params = QualityParams.from_settings(settings)
        reports = []
        usd_in_layers = 0.0
        explainer_ids = []
        try:
            for explainer_settings, explainer in llm.explainers():
                explainer_ids.append(explainer.explainer_id)
                explainer_layers = select_subset(explainer_settings.layers, layers)
                wanted_of = selections(explainer_settings.neurons, explainer_layers, neurons_of, lake, settings, context.log)

                def load(layer, explainer=explainer, wanted_of=wanted_of):
                    upstream_gate.check(layer)
                    wanted = wanted_of[layer]
                    existing = read_table(lake, "explanations", where={"layer": str(layer), "explainer_id": explainer.explainer_id})
                    outputs = load_output_tokens(lake, layer) if getattr(explainer, "uses_output_tokens", False) else None
                    # A plain explainer reads its top excerpts only; one that chooses among
                    # candidates or contrasts (explain_splits) also the random ones.
                    kinds = ("top", "random") if hasattr(explainer, "explain_splits") else ("top",)
                    return record_chunks(lake, layer, wanted, kinds=kinds), existing, outputs

                def flush(layer, frame, explainer=explainer):
                    nonlocal usd_in_layers
                    # Validated before it is written, one layer at a time: bad rows never land.
                    reports.append(check_rows("explanations", frame, params, skip_empty=True))
                    write_table(lake, "explanations", frame, replace_where={"layer": str(layer), "explainer_id": explainer.explainer_id})
                    totals["explained"] += frame.height
                    totals["errors"] += int(frame["error"].is_not_null().sum())
                    totals["prompt_tokens"] += int(frame["prompt_tokens"].sum() or 0)
                    totals["completion_tokens"] += int(frame["completion_tokens"].sum() or 0)
                    usd_in_layers += cost_metadata(llm.explainers(), frame).get("usd_in_layers", 0.0)
                    context.log.info(f"layer {layer} {explainer.explainer_id}: {frame.height} explanations written")

                total = sum(len(wanted_of[layer]) for layer in explainer_layers)
                with track(
                    total=total, stage="explanations", layer=explainer_layers, unit="neuron", detail=explainer.explainer_id
                ) as bar:
                    totals["new_calls"] += explain_layers(
                        explainer, explainer_layers, load, settings.records, model_id, flush,
                        workers=llm_workers(explainer_settings), progress=bar.update,
                    )
            upstream = upstream_gate.result(layers)  # (layers no explainer selected are checked here)
        except QualityGateFailed as failed:
            yield failed.result
            raise failed.failure from None
        if not any(reports):  # every layer empty: the run's empty rows face the gate, as before
            yield from gate("explanations", table_frame("explanations", []), params)
        report = combine_reports("explanations", reports)
        totals.update(llm.usage())
        # Per layer, from the lake (only the columns the metadata needs): coverage per partition.
        written = read_table(
            lake, "explanations", where={"layer": [str(layer) for layer in layers], "explainer_id": explainer_ids},
            columns=["layer", "neuron", "explainer_id", "explainer_label", "error"],
        )
        totals.update(failure_metadata(written, None))
        totals["neurons_explained"] = written.filter(pl.col("error").is_null()).select("layer", "neuron").n_unique()
        totals.update(cost_metadata(llm.explainers()))
        totals["usd_in_layers"] = round(usd_in_layers, 6)
        publish_layers(context, "explanations", written)
        yield dg.MaterializeResult(
            check_results=[check_result(report), upstream],
            metadata={**totals, **lake_metadata(lake, "explanations"), **plan},
        )

    return explanations
