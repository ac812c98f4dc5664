"""Stage 3b: every explanation embedded (all-MiniLM-L6-v2) for search by meaning.

Incremental: an explanation whose text is unchanged keeps its stored vector, so a changed
explanation re-embeds only itself.
"""

import polars as pl

import dagster as dg

from data_quality import QualityParams
from neuron_pipeline.assets.checks import CHECK_NAME, check_result, gate, gate_upstream, quality_check_spec, upstream_check_spec
from neuron_pipeline.assets.metadata import lake_metadata, publish_layers
from neuron_pipeline.assets.partitions import layers_of
from neuron_pipeline.assets.resources import PipelineSettingsResource
from neuron_pipeline.lake import read_table, write_table
from neuron_pipeline.lake.search import EMBEDDINGS_TABLE, embedding_rows
from neuron_pipeline.llm.embeddings import EMBEDDING_MODEL


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
        run_layers = [str(layer) for layer in layers]
        upstream = yield from gate_upstream(EMBEDDINGS_TABLE, "explanations", lake, layers, pipeline.settings)
        explanations = read_table(lake, "explanations", where={"layer": run_layers})
        existing = read_table(lake, EMBEDDINGS_TABLE, where={"layer": run_layers})

        def embed(texts):
            from neuron_pipeline.llm.embeddings import load_embedder

            return load_embedder().embed(texts)

        if explanations.is_empty():
            raise ValueError(f"no explanations for layers {layers}: materialize explanations first")
        rows, embedded = embedding_rows(explanations, existing, embed, EMBEDDING_MODEL)
        if rows.is_empty():  # every explanation failed: nothing to search, and no stale vector kept
            check = dg.AssetCheckResult(
                check_name=CHECK_NAME, passed=True, metadata={"summary": "no successful explanation to embed"}
            )
        else:
            check = check_result((yield from gate(EMBEDDINGS_TABLE, rows, QualityParams.from_settings(pipeline.settings))))
        write_table(lake, EMBEDDINGS_TABLE, rows, replace_where={"layer": run_layers})
        context.log.info(f"embeddings: {rows.height} explanations, {embedded} newly embedded")
        publish_layers(context, EMBEDDINGS_TABLE, rows)
        yield dg.MaterializeResult(
            check_results=[check, upstream],
            metadata={
                "rows": rows.height,
                "newly_embedded": embedded,
                "embedding_model": EMBEDDING_MODEL,
                **lake_metadata(lake, EMBEDDINGS_TABLE),
            },
        )

    return explanation_embeddings
