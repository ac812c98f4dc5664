"""Stage 7: the static HTML neuron viewer over the whole lake (unpartitioned)."""

import dagster as dg

from neuron_pipeline.assets.resources import PipelineSettingsResource
from neuron_pipeline.viewer import build_viewer, default_viewer_dir


@dg.asset(
    deps=["layer_summary"],
    group_name="report",
    kinds={"html"},
    owners=["team:interpretability"],
    description="Static HTML viewer (no server, no network): index with score distributions and score by layer, "
    "a sortable / filterable table per layer, and one neuron page per layer (neuron.html#<n>, data files of 64 "
    "neurons) with each neuron's explanations, scores and excerpts shaded by real and simulated activation. Written to a `viewer` folder next to the lake "
    "(in the current directory for a lake in object storage).",
    code_version="neuron_viewer-v1",
)
def neuron_viewer(context: dg.AssetExecutionContext, pipeline: PipelineSettingsResource) -> dg.MaterializeResult:
    # Reads the lake directly (deps, not an input): layer_summary is partitioned, this asset is not.
    summary = build_viewer(pipeline.lake, default_viewer_dir(pipeline.lake))
    context.log.info(f"neuron viewer: {summary.index}")
    return dg.MaterializeResult(
        metadata={
            "index": dg.MetadataValue.path(str(summary.index)),
            "url": dg.MetadataValue.url(summary.index.as_uri()),
            "layers": summary.layers,
            "neurons": summary.neurons,
            "pages": summary.pages,
            "data_files": summary.data_files,
        }
    )
