"""Stage 3b: every explanation embedded (all-MiniLM-L6-v2) for search by meaning, one layer at a time.

Incremental: an explanation whose text is unchanged keeps its stored vector, so a changed
explanation re-embeds only itself.
"""

import dagster as dg

from data_quality import QualityParams
from neuron_pipeline.assets.checks import (
    CHECK_NAME,
    QualityGateFailed,
    UpstreamGate,
    check_result,
    check_rows,
    combine_reports,
    quality_check_spec,
    upstream_check_spec,
)
from neuron_pipeline.assets.metadata import lake_metadata, publish_layer
from neuron_pipeline.assets.partitions import layers_of
from neuron_pipeline.assets.progress import track
from neuron_pipeline.assets.resources import PipelineSettingsResource
from neuron_pipeline.lake import read_table, write_table
from neuron_pipeline.lake.search import EMBEDDINGS_TABLE, embedding_rows
from neuron_pipeline.llm.embeddings import EMBEDDING_MODEL
from neuron_pipeline.memory import release_memory


def build(partitions: dg.PartitionsDefinition) -> dg.AssetsDefinition:
    """The explanation_embeddings asset over the given layer partitions."""

    @dg.asset(
        name=EMBEDDINGS_TABLE,
        partitions_def=partitions,
        deps=["explanations"],
        group_name="explain",
        kinds={"pytorch", "delta"},
        owners=["team:interpretability"],
        description=f"One {EMBEDDING_MODEL} sentence embedding (unit length) per explanation, for "
        "`neuron-pipeline search` and the viewer's similar neurons. Only new or changed explanations are embedded.",
        check_specs=[quality_check_spec(EMBEDDINGS_TABLE), upstream_check_spec(EMBEDDINGS_TABLE, "explanations")],
        backfill_policy=dg.BackfillPolicy.single_run(),
        code_version="explanation_embeddings-v1",
    )
    def explanation_embeddings(context: dg.AssetExecutionContext, pipeline: PipelineSettingsResource):
        lake = pipeline.lake
        layers = layers_of(context)
        params = QualityParams.from_settings(pipeline.settings)
        upstream_gate = UpstreamGate(EMBEDDINGS_TABLE, "explanations", lake, pipeline.settings)

        def embed(texts):
            from neuron_pipeline.llm.embeddings import load_embedder

            return load_embedder().embed(texts)

        # One layer at a time (read, embed, validate, write, let go): memory holds one layer's
        # explanations and vectors, whatever the number of layers in the run.
        total = read_table(lake, "explanations", where={"layer": [str(layer) for layer in layers]}, columns=["layer"]).height
        if not total:
            raise ValueError(f"no explanations for layers {layers}: materialize explanations first")
        totals = {"rows": 0, "newly_embedded": 0}
        reports = []
        try:
            with track(total=total, stage="explanation embeddings", layer=layers, unit="explanation") as bar:
                for layer in layers:
                    upstream_gate.check(layer)
                    explanations = read_table(lake, "explanations", where={"layer": str(layer)})
                    existing = read_table(lake, EMBEDDINGS_TABLE, where={"layer": str(layer)})
                    rows, embedded = embedding_rows(explanations, existing, embed, EMBEDDING_MODEL)
                    done = explanations.height  # failed explanations included: they are done too
                    del explanations, existing
                    # An empty layer (every explanation failed) is written too: no stale vector is kept.
                    reports.append(check_rows(EMBEDDINGS_TABLE, rows, params, skip_empty=True))
                    write_table(lake, EMBEDDINGS_TABLE, rows, replace_where={"layer": str(layer)})
                    publish_layer(context, EMBEDDINGS_TABLE, layer, rows)
                    totals["rows"] += rows.height
                    totals["newly_embedded"] += embedded
                    del rows
                    bar.update(done)
                    release_memory()
            upstream = upstream_gate.result(layers)
        except QualityGateFailed as failed:
            yield failed.result
            raise failed.failure from None
        if any(reports):
            check = check_result(combine_reports(EMBEDDINGS_TABLE, reports))
        else:  # every explanation failed: nothing to search
            check = dg.AssetCheckResult(
                check_name=CHECK_NAME, passed=True, metadata={"summary": "no successful explanation to embed"}
            )
        context.log.info(f"embeddings: {totals['rows']} explanations, {totals['newly_embedded']} newly embedded")
        yield dg.MaterializeResult(
            check_results=[check, upstream],
            metadata={
                "rows": totals["rows"],
                "newly_embedded": totals["newly_embedded"],
                "embedding_model": EMBEDDING_MODEL,
                **lake_metadata(lake, EMBEDDINGS_TABLE),
            },
        )

    return explanation_embeddings
