"""The one place that wires assets, checks, jobs and resources into ``dg.Definitions``.

``dagster dev -w workspace.yaml`` loads ``defs`` below, built from the settings named by
``NEURON_PIPELINE_CONFIG`` / ``NEURON_PIPELINE_PROFILE`` (default: the offline demo profile).
"""

from __future__ import annotations

import dagster as dg

from neuron_pipeline.assets import capture, corpus, explanations, scores, simulations, summary, viewer
from neuron_pipeline.assets.partitions import layer_partitions
from neuron_pipeline.assets.resources import LLMResource, PipelineSettingsResource, SubjectModelResource
from neuron_pipeline.config import Settings, load_settings
from neuron_pipeline.subject import describe_subject


def build_definitions(settings: Settings) -> dg.Definitions:
    info = describe_subject(settings.subject)
    partitions = layer_partitions(info.num_layers)
    layer_assets = [
        capture.build(partitions),
        explanations.build(partitions),
        simulations.build(partitions),
        scores.build(partitions),
        summary.build(partitions),
    ]
    pipeline = PipelineSettingsResource.from_settings(settings)
    return dg.Definitions(
        assets=[corpus.corpus_tokens, *layer_assets, viewer.neuron_viewer],
        jobs=[
            dg.define_asset_job(
                "full_pipeline",
                selection=dg.AssetSelection.all(),
                partitions_def=partitions,
                description="Every stage for the chosen layers (a layer range runs as one forward pass).",
            )
        ],
        resources={
            "pipeline": pipeline,
            "subject_model": SubjectModelResource(pipeline=pipeline),
            "llm": LLMResource(pipeline=pipeline),
        },
        executor=dg.in_process_executor,
    )


defs = build_definitions(load_settings())
