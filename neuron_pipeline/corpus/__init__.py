"""Corpus stage: text sources -> fixed-length token sequences."""

from neuron_pipeline.corpus.errors import CorpusError
from neuron_pipeline.corpus.janeausten import NOVELS, fetch_janeausten, janeausten_path
from neuron_pipeline.corpus.sources import TEXT_SUFFIXES, describe_source, iter_documents, source_kind
from neuron_pipeline.corpus.tokenize import (
    CorpusSequences,
    corpus_frame,
    corpus_hash,
    eos_token_id,
    evenly_spaced,
    token_stream,
    token_strings,
    tokenize_corpus,
    windows_from_stream,
)

__all__ = [
    "NOVELS",
    "TEXT_SUFFIXES",
    "CorpusError",
    "CorpusSequences",
    "corpus_frame",
    "corpus_hash",
    "describe_source",
    "eos_token_id",
    "evenly_spaced",
    "fetch_janeausten",
    "iter_documents",
    "janeausten_path",
    "source_kind",
    "token_stream",
    "token_strings",
    "tokenize_corpus",
    "windows_from_stream",
]
