"""The evaluation suite as an asset (group report): the configured explainers and simulators
measured on puzzles with known answers and planted neurons (``neuron_pipeline/evaluation.py``).

Unpartitioned and not part of `neuron-pipeline run` (it loads every configured model and takes
minutes to an hour on CPU): materialize it from the UI, or run `neuron-pipeline eval`."""

import json

import dagster as dg

from data_quality import QualityParams
from neuron_pipeline.assets.checks import check_result, gate, quality_check_spec
from neuron_pipeline.assets.metadata import lake_metadata
from neuron_pipeline.assets.resources import PipelineSettingsResource
from neuron_pipeline.lake import write_table


@dg.asset(
    group_name="report",
    kinds={"delta"},
    owners=["team:interpretability"],
    description="Ground-truth evaluation of the configured explainers and simulators: simulator discrimination "
    "on the project's puzzles (true vs false explanations), explainer quality on the same puzzles next to the "
    "true and baseline explanations, planted-neuron recovery and naming. One row per (check, explainer model, "
    "simulator model, prompt) and run.",
    check_specs=[quality_check_spec("evaluations")],
    code_version="evaluations-v1",
)
def evaluations(context: dg.AssetExecutionContext, pipeline: PipelineSettingsResource):
    from neuron_pipeline.evaluation import run_evaluation

    frame = run_evaluation(pipeline.settings, say=context.log.info)
    report = yield from gate("evaluations", frame, QualityParams.from_settings(pipeline.settings))
    write_table(pipeline.lake, "evaluations", frame)
    headline = {
        f"{row['check']}: {row['explainer_model'] or row['simulator_model'] or 'pipeline'}": row["value"]
        for row in frame.iter_rows(named=True)
    }
    yield dg.MaterializeResult(
        check_results=[check_result(report)],
        metadata={"rows": frame.height, "results": dg.MetadataValue.json(headline), **lake_metadata(pipeline.lake, "evaluations")},
    )
