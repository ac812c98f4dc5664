"""Stage 2b: what each neuron writes to the output — its top promoted and suppressed tokens, from
the weights alone (no corpus pass; subject/output_tokens.py has the method).

They depend on the model alone: a layer whose stored rows carry the same weights fingerprint
is kept as it is, so they are computed once per model.
"""

import numpy as np
import polars as pl

import dagster as dg

from data_quality import QualityParams
from neuron_pipeline.assets.checks import check_result, gate, quality_check_spec
from neuron_pipeline.assets.metadata import lake_metadata, publish_layers
from neuron_pipeline.assets.partitions import GPU_POOL, GPU_TAGS, layers_of
from neuron_pipeline.assets.progress import track
from neuron_pipeline.assets.resources import PipelineSettingsResource, SubjectModelResource
from neuron_pipeline.corpus.tokenize import token_strings
from neuron_pipeline.lake import read_table, table_frame, write_table
from neuron_pipeline.subject.output_tokens import (
    OUTPUT_TOKENS_K,
    LayerOutputTokens,
    Unembedding,
    folded_output_vectors,
    layer_output_tokens,
    layer_weights_hash,
)

def output_token_frame(result: LayerOutputTokens, tokenizer, model_id: str) -> pl.DataFrame:
    """Rows of neuron_output_tokens for one layer."""
    promoted = token_strings(tokenizer, result.promoted_ids)
    suppressed = token_strings(tokenizer, result.suppressed_ids)
    return table_frame(
        "neuron_output_tokens",
        pl.DataFrame(
            {
                "model": model_id,
                "layer": str(result.layer),
                "neuron": result.neurons.astype(np.int32),
                "promoted_tokens": promoted,
                "promoted_token_ids": pl.Series(result.promoted_ids.astype(np.int32)).cast(pl.List(pl.Int32)),
                "promoted_logits": pl.Series(result.promoted_logits.astype(np.float32)).cast(pl.List(pl.Float32)),
                "suppressed_tokens": suppressed,
                "suppressed_token_ids": pl.Series(result.suppressed_ids.astype(np.int32)).cast(pl.List(pl.Int32)),
                "suppressed_logits": pl.Series(result.suppressed_logits.astype(np.float32)).cast(pl.List(pl.Float32)),
                "weights_hash": result.weights_hash,
            }
        ),
    )


def is_current(existing: pl.DataFrame, weights_hash: str, neurons: int, k: int) -> bool:
    """The stored rows of a layer already hold every neuron's tokens for these weights."""
    return (
        existing.height == neurons
        and existing["weights_hash"].unique().to_list() == [weights_hash]
        and existing["promoted_tokens"].list.len().unique().to_list() == [k]
    )


def build(partitions: dg.PartitionsDefinition, op_tags: dict | None = None) -> dg.AssetsDefinition:
    """The neuron_output_tokens asset over the given layer partitions."""

    @dg.asset(
        partitions_def=partitions,
        group_name="capture",
        kinds={"pytorch", "delta"},
        owners=["team:interpretability"],
        description="Per neuron: the tokens its output weights promote and suppress most, with their logit "
        "weights (output vector through the final norm's gain and the unembedding; no corpus pass). "
        "Computed once per model: layers whose weights fingerprint is unchanged are kept.",
        check_specs=[quality_check_spec("neuron_output_tokens")],
        backfill_policy=dg.BackfillPolicy.single_run(),
        pool=GPU_POOL,
        op_tags=GPU_TAGS if op_tags is None else op_tags,
        code_version="neuron_output_tokens-v1",
    )
    def neuron_output_tokens(
        context: dg.AssetExecutionContext, pipeline: PipelineSettingsResource, subject_model: SubjectModelResource
    ):
        lake = pipeline.lake
        layers = layers_of(context)
        subject = subject_model.load()
        k = min(OUTPUT_TOKENS_K, subject.model.get_output_embeddings().weight.shape[0])
        unembed = Unembedding.of(subject)
        frames, kept_frames, kept, computed = [], [], [], []
        for layer in track(layers, total=len(layers), stage="output tokens", layer=layers, unit="layer"):
            weights_hash = layer_weights_hash(folded_output_vectors(subject, layer), unembed)
            existing = read_table(lake, "neuron_output_tokens", where={"layer": str(layer)})
            if is_current(existing, weights_hash, subject.num_neurons, k):
                kept.append(layer)
                kept_frames.append(existing)
                continue
            result = layer_output_tokens(subject, layer, k, unembed)
            frames.append(output_token_frame(result, subject.tokenizer, subject.model_id))
            computed.append(layer)
        context.log.info(f"output tokens: computed layers {computed}, unchanged {kept}")
        new = pl.concat(frames) if frames else table_frame("neuron_output_tokens", [])
        # Kept layers are validated again with the new ones (cheap), so the check speaks for every layer.
        params = QualityParams.from_settings(pipeline.settings, expected_neurons=range(subject.num_neurons))
        report = yield from gate("neuron_output_tokens", pl.concat([new, *kept_frames]), params)
        if computed:
            write_table(lake, "neuron_output_tokens", new, replace_where={"layer": [str(layer) for layer in computed]})
        del subject, unembed
        subject_model.release_unless_needed_by(context)  # the last step of a run that uses the model
        publish_layers(context, "neuron_output_tokens", pl.concat([new, *kept_frames]))
        yield dg.MaterializeResult(
            check_results=[check_result(report)],
            metadata={
                "layers_computed": str(computed),
                "layers_unchanged": str(kept),
                "rows_written": new.height,
                "tokens_per_direction": k,
                **lake_metadata(lake, "neuron_output_tokens"),
            },
        )

    return neuron_output_tokens
