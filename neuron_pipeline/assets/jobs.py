"""The jobs a user launches, each partitioned by layer.

A range of layers launched from the UI (or a RunRequest with partition-range tags) is one run:
the layer assets have a single-run backfill policy, so the capture is one forward pass. Jobs use
the Definitions' executor (in-process unless ``platform.executor`` says otherwise).
"""

from __future__ import annotations

import dagster as dg

CAPTURE_ASSETS = ["neuron_activations", "activation_records", "neuron_output_tokens"]
EXPLAIN_ASSETS = ["explanations", "explanation_embeddings", "simulations", "scores", "scorer_results", "layer_summary"]
RESCORE_ASSETS = ["simulations", "scores", "scorer_results", "layer_summary"]

CAPTURE_JOB = "capture_layers"
EXPLAIN_JOB = "explain_layers"
RESCORE_JOB = "rescore_layers"
FULL_JOB = "full_pipeline"


def keys(names: list[str]) -> list[dg.AssetKey]:
    return [dg.AssetKey(name) for name in names]


def build_jobs(partitions: dg.PartitionsDefinition) -> list[dg.UnresolvedAssetJobDefinition]:
    def job(name: str, selection, description: str) -> dg.UnresolvedAssetJobDefinition:
        return dg.define_asset_job(
            name,
            selection=selection,
            partitions_def=partitions,
            description=description,
            tags={"neuron_pipeline/job": name},
        )

    return [
        job(
            CAPTURE_JOB,
            dg.AssetSelection.assets(*CAPTURE_ASSETS),
            "Capture only: per-neuron statistics and activation records of the chosen layers, one forward "
            "pass for a range (needs corpus_tokens), and each neuron's promoted / suppressed output tokens.",
        ),
        job(
            EXPLAIN_JOB,
            dg.AssetSelection.assets(*EXPLAIN_ASSETS),
            "Explain layers: explanations (+ their search embeddings) -> simulations -> scores -> layer_summary "
            "from the stored records. "
            "Only neurons without results under the current explainer / simulator ids are computed.",
        ),
        job(
            RESCORE_JOB,
            dg.AssetSelection.assets(*RESCORE_ASSETS),
            "Re-score with another simulator: add it to `simulators:` in the settings, then simulations -> "
            "scores -> layer_summary reuse the stored explanations.",
        ),
        job(
            FULL_JOB,
            dg.AssetSelection.all(),
            "Full refresh: corpus, capture, explain, simulate, score, summarize and the viewer for the chosen "
            "layers (a layer range runs as one forward pass).",
        ),
    ]
