"""Sensors, schedules and declarative automation: the pipeline keeps itself up to date.

- ``prompt_settings_sensor``: watches the prompt templates (neuron_pipeline/interp/prompts/*.txt)
  and the explainer / simulator settings. Its cursor holds their hashes; when the explainer side
  changes it requests explanations -> simulations -> scores -> layer_summary for every layer whose
  explanations are materialized (one run per layer, run key = old and new hash + layer); when only the
  simulator side changes, simulations -> scores -> layer_summary. The first tick records the hashes.
- ``nightly_stale_layers``: on ``platform.schedule_cron`` re-materializes what Dagster reports
  stale, per layer (code version or dependency data version changed), one run per contiguous
  range of layers with the same stale assets (a range is one forward pass).
- Automation conditions: scores and layer_summary follow their upstream eagerly; the viewer is
  rebuilt after any layer summary changes. ``automation_sensor`` evaluates them.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import dagster as dg

from neuron_pipeline.assets import jobs
from neuron_pipeline.assets.versions import stale_assets, watched_hashes
from neuron_pipeline.config import ConfigError, Settings

SENSOR_NAME = "prompt_settings_sensor"
SCHEDULE_NAME = "nightly_stale_layers"
AUTOMATION_SENSOR_NAME = "automation_sensor"
TRIGGER_TAG = "neuron_pipeline/trigger"
RANGE_START_TAG = "dagster/asset_partition_range_start"
RANGE_END_TAG = "dagster/asset_partition_range_end"

# Scores and summaries are cheap and follow their inputs.
EAGER = dg.AutomationCondition.eager()
# The viewer covers every layer: rebuild when any layer summary changes (not blocked by layers
# that were never materialized, unlike eager()).
AFTER_ANY_UPDATE = (
    dg.AutomationCondition.any_deps_updated().since_last_handled()
    & ~dg.AutomationCondition.any_deps_in_progress()
    & ~dg.AutomationCondition.in_progress()
).with_label("after any layer summary update")
AUTOMATION_CONDITIONS = {
    dg.AssetKey("explanation_embeddings"): EAGER,
    dg.AssetKey("scores"): EAGER,
    dg.AssetKey("layer_summary"): EAGER,
    dg.AssetKey("neuron_viewer"): AFTER_ANY_UPDATE,
}


def _layer_order(keys) -> list[str]:
    return sorted(keys, key=lambda k: (len(k), k))


def prompt_settings_sensor(
    settings_loader: Callable[[], Settings],
    job_defs: list,
    templates: Path | None = None,
    interval_s: int = 60,
) -> dg.SensorDefinition:
    """``settings_loader`` is called on every tick (the module-level definitions re-read the
    config file and environment, so an edited config counts as a change). ``job_defs`` must hold
    the explain and rescore jobs."""
    targets = [job for job in job_defs if job.name in (jobs.EXPLAIN_JOB, jobs.RESCORE_JOB)]

    @dg.sensor(
        name=SENSOR_NAME,
        jobs=targets,
        minimum_interval_seconds=interval_s,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description="Re-explains every materialized layer when a prompt template or the explainer settings "
        "change (re-simulates and re-scores when only the simulator side changes). Cursor: the last hashes.",
    )
    def _sensor(context: dg.SensorEvaluationContext):
        try:
            current = watched_hashes(settings_loader(), templates)
        except (ConfigError, OSError) as exc:
            return dg.SkipReason(f"cannot read the settings or prompt templates: {exc}")
        previous = json.loads(context.cursor) if context.cursor else None
        cursor = json.dumps(current, sort_keys=True)
        if previous is None:
            return dg.SensorResult(skip_reason="recorded the current prompt / settings hashes", cursor=cursor)
        if previous == current:
            return dg.SkipReason("prompt templates and explainer / simulator settings unchanged")
        if previous.get("explanations") != current["explanations"]:
            job_name, assets, what = jobs.EXPLAIN_JOB, jobs.EXPLAIN_ASSETS, "explainer"
        else:
            job_name, assets, what = jobs.RESCORE_JOB, jobs.RESCORE_ASSETS, "simulator"
        layers = _layer_order(context.instance.get_materialized_partitions(dg.AssetKey("explanations")))
        if not layers:
            return dg.SensorResult(skip_reason=f"{what} side changed; no layer is explained yet", cursor=cursor)
        side = "explanations" if what == "explainer" else "simulations"
        # From which hash to which: a retried tick does not launch twice, a later change does.
        change = f"{previous.get(side, 'none')[:8]}-{current[side][:8]}"
        requests = [
            dg.RunRequest(
                run_key=f"{what}-{change}-layer-{layer}",
                job_name=job_name,
                partition_key=layer,
                asset_selection=jobs.keys(assets),
                tags={TRIGGER_TAG: f"{what} prompt or settings changed"},
            )
            for layer in layers
        ]
        context.log.info(f"{what} side changed: {len(requests)} layer(s) to redo with {job_name}")
        return dg.SensorResult(run_requests=requests, cursor=cursor)

    return _sensor


def _ranges(layers: list[str]) -> list[tuple[str, str]]:
    out: list[list[str]] = []
    for layer in sorted(layers, key=int):
        if out and int(out[-1][1]) == int(layer) - 1:
            out[-1][1] = layer
        else:
            out.append([layer, layer])
    return [(start, end) for start, end in out]


def stale_run_requests(instance: dg.DagsterInstance, asset_graph) -> list[dg.RunRequest]:
    """One RunRequest per contiguous range of layers sharing the same stale assets."""
    by_layer, unpartitioned, _ = stale_assets(instance, asset_graph)
    groups: dict[frozenset, list[str]] = {}
    for layer, keys in by_layer.items():
        groups.setdefault(frozenset(keys), []).append(layer)
    runs = [(sorted(keys, key=str), start, end) for keys, layers in groups.items() for start, end in _ranges(layers)]
    runs.sort(key=lambda run: int(run[1]))
    corpus = dg.AssetKey("corpus_tokens")
    requests = []
    for index, (keys, start, end) in enumerate(runs):
        selection = list(keys)
        # A stale corpus goes first in the run of the (only) range; with several ranges it runs
        # alone tonight and the layers follow on the next tick, once it has its new version.
        if corpus in unpartitioned and len(runs) == 1:
            selection = [corpus, *selection]
        tags = {TRIGGER_TAG: "stale"}
        if start != end:
            tags.update({RANGE_START_TAG: start, RANGE_END_TAG: end})
        requests.append(
            dg.RunRequest(
                job_name=jobs.FULL_JOB,
                asset_selection=selection,
                partition_key=start if start == end else None,
                tags=tags,
            )
        )
    if corpus in unpartitioned and len(runs) > 1:
        requests = [dg.RunRequest(job_name=jobs.FULL_JOB, asset_selection=[corpus], tags={TRIGGER_TAG: "stale"})]
    others = sorted(k for k in unpartitioned if k != corpus)
    if others and not requests:
        requests.append(dg.RunRequest(job_name=jobs.FULL_JOB, asset_selection=others, tags={TRIGGER_TAG: "stale"}))
    return requests


def nightly_stale_layers(asset_graph_loader: Callable[[], object], cron: str, timezone: str) -> dg.ScheduleDefinition:
    @dg.schedule(
        name=SCHEDULE_NAME,
        cron_schedule=cron,
        execution_timezone=timezone,
        job_name=jobs.FULL_JOB,
        default_status=dg.DefaultScheduleStatus.RUNNING,
        description="Re-materializes the stale assets of every materialized layer (new code version, prompt, "
        "settings, or upstream data), one run per contiguous range of layers.",
    )
    def _schedule(context: dg.ScheduleEvaluationContext):
        requests = stale_run_requests(context.instance, asset_graph_loader())
        return requests or dg.SkipReason("no materialized layer is stale")

    return _schedule


def automation_sensor() -> dg.AutomationConditionSensorDefinition:
    return dg.AutomationConditionSensorDefinition(
        AUTOMATION_SENSOR_NAME,
        target=dg.AssetSelection.all(),
        default_status=dg.DefaultSensorStatus.RUNNING,
        minimum_interval_seconds=30,
        description="Evaluates the assets' automation conditions (scores and layer_summary follow their "
        "upstream; the viewer follows any layer summary).",
    )
