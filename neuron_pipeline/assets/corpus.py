"""Stage 1: the corpus, cut by the subject's tokenizer into fixed-length sequences."""

import dagster as dg

from data_quality import QualityParams
from neuron_pipeline.assets.checks import check_result, gate, quality_check_spec
from neuron_pipeline.assets.resources import PipelineSettingsResource, SubjectModelResource
from neuron_pipeline.corpus import corpus_frame, tokenize_corpus
from neuron_pipeline.lake import table_path, write_table


@dg.asset(
    group_name="capture",
    kinds={"delta", "polars"},
    owners=["team:interpretability"],
    description="Fixed-length token sequences (64 tokens, like the paper) from the configured corpus.",
    code_version="corpus_tokens-v1",
    check_specs=[quality_check_spec("corpus_tokens")],
)
def corpus_tokens(
    context: dg.AssetExecutionContext, pipeline: PipelineSettingsResource, subject_model: SubjectModelResource
):
    settings = pipeline.settings
    subject = subject_model.load()
    sequences = tokenize_corpus(settings.corpus, subject.tokenizer)
    frame = corpus_frame(sequences, subject.tokenizer, subject.model_id, settings.corpus.source)
    report = yield from gate("corpus_tokens", frame, QualityParams.from_settings(settings))
    version = write_table(pipeline.lake, "corpus_tokens", frame)
    context.log.info(f"{frame.height} sequences of {settings.corpus.sequence_length} tokens from {sequences.source}")
    yield dg.MaterializeResult(
        check_results=[check_result(report)],
        metadata={
            "sequences": frame.height,
            "dagster/row_count": frame.height,
            "dagster/uri": str(table_path(pipeline.lake, "corpus_tokens")),
            "tokens": frame.height * settings.corpus.sequence_length,
            "corpus_hash": sequences.corpus_hash,
            "path": dg.MetadataValue.path(str(table_path(pipeline.lake, "corpus_tokens"))),
            "delta_version": version,
        },
        # Downstream staleness follows the content, not the time it was written.
        data_version=dg.DataVersion(sequences.corpus_hash),
    )
