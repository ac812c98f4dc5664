"""The one place that wires assets, checks, jobs, sensors, schedules and resources into ``dg.Definitions``.

``dagster dev -w workspace.yaml`` loads ``defs`` below, built from the settings named by
``NEURON_PIPELINE_CONFIG`` / ``NEURON_PIPELINE_PROFILE`` (default: the offline demo profile).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import dagster as dg

from neuron_pipeline.assets import (
    automation,
    capture,
    corpus,
    embeddings,
    explanations,
    output_tokens,
    scorers,
    scores,
    simulations,
    summary,
    viewer,
)
from neuron_pipeline.assets.deployment import executor_for, gpu_op_tags
from neuron_pipeline.assets.jobs import build_jobs
from neuron_pipeline.assets.partitions import layer_partitions
from neuron_pipeline.assets.resources import LLMResource, PipelineSettingsResource, SubjectModelResource
from neuron_pipeline.assets.versions import code_versions, own_recipes, STAGES
from neuron_pipeline.config import Settings, load_settings
from neuron_pipeline.lake import SCHEMAS, table_path
from neuron_pipeline.subject import describe_subject


def _column_schema(table: str) -> dg.TableSchema:
    return dg.TableSchema(
        columns=[dg.TableColumn(field.name, str(field.type), description=None) for field in SCHEMAS[table]]
    )


def _with_platform_attributes(
    assets_def: dg.AssetsDefinition, settings: Settings, versions: dict, recipes: dict
) -> dg.AssetsDefinition:
    """Code versions that carry the settings' recipe hash, automation conditions, and what the UI
    shows about the table behind each asset (path, columns, recipe)."""
    stage_of = {key: stage for stage, keys in STAGES for key in keys}

    def update(spec: dg.AssetSpec) -> dg.AssetSpec:
        name = spec.key.to_user_string()
        metadata = dict(spec.metadata or {})
        if name in SCHEMAS:
            metadata["dagster/table_name"] = name
            metadata["dagster/column_schema"] = _column_schema(name)
            metadata["dagster/uri"] = table_path(settings.lake_location, name)
        metadata["recipe"] = dg.MetadataValue.json(recipes.get(stage_of.get(name, ""), {}))
        return spec.replace_attributes(
            code_version=versions.get(spec.key, spec.code_version),
            automation_condition=automation.AUTOMATION_CONDITIONS.get(spec.key, spec.automation_condition),
            metadata=metadata,
        )

    return assets_def.map_asset_specs(update)


def build_definitions(
    settings: Settings,
    *,
    reload_settings: Callable[[], Settings] | None = None,
    prompts_dir: Path | None = None,
) -> dg.Definitions:
    """Definitions for ``settings``. ``reload_settings`` is what the prompt / settings sensor reads
    on each tick (default: these settings); ``prompts_dir`` replaces the packaged prompt templates
    in code versions and the sensor (tests)."""
    info = describe_subject(settings.subject)
    partitions = layer_partitions(info.num_layers)
    gpu_tags = gpu_op_tags(settings)
    layer_assets = [
        capture.build(partitions, op_tags=gpu_tags),
        output_tokens.build(partitions, op_tags=gpu_tags),
        explanations.build(partitions, op_tags=gpu_tags),
        embeddings.build(partitions),
        simulations.build(partitions, op_tags=gpu_tags),
        scores.build(partitions),
        scorers.build(partitions, op_tags=gpu_tags),
        summary.build(partitions),
    ]
    assets = [corpus.corpus_tokens, *layer_assets, viewer.neuron_viewer]
    base = {key: a.code_versions_by_key.get(key) for a in assets for key in a.keys}
    versions = code_versions(settings, base, prompts_dir)
    recipes = own_recipes(settings, prompts_dir)
    assets = [_with_platform_attributes(a, settings, versions, recipes) for a in assets]

    job_defs = build_jobs(partitions)
    pipeline = PipelineSettingsResource.from_settings(settings)
    resources = {
        "pipeline": pipeline,
        "subject_model": SubjectModelResource(pipeline=pipeline),
        "llm": LLMResource(pipeline=pipeline),
    }
    graph_holder: dict = {}

    def asset_graph():
        # The schedule's view of the assets (code versions as loaded), built on first use.
        if "graph" not in graph_holder:
            graph_holder["graph"] = dg.Definitions(assets=assets, resources=resources).resolve_asset_graph()
        return graph_holder["graph"]

    return dg.Definitions(
        assets=assets,
        jobs=job_defs,
        sensors=[
            automation.prompt_settings_sensor(
                reload_settings or (lambda: settings), job_defs, prompts_dir, settings.platform.sensor_interval_s
            ),
            automation.automation_sensor(),
        ],
        schedules=[
            automation.nightly_stale_layers(
                asset_graph, settings.platform.schedule_cron, settings.platform.schedule_timezone
            )
        ],
        resources=resources,
        executor=executor_for(settings),
    )


def _reload_settings() -> Settings:
    return load_settings()


defs = build_definitions(load_settings(), reload_settings=_reload_settings)
