"""Tokenization: documents -> one token stream -> fixed-length, non-overlapping windows.

Each document is tokenized without special tokens; documents are joined with the tokenizer's
EOS token (when it has one) and the stream is cut into windows of exactly
``corpus.sequence_length`` tokens, the remainder dropped. With ``corpus.max_sequences`` set and
more windows available, that many windows are taken evenly spaced over the whole stream (first
and last included), in stream order, so every part of the corpus is represented.
"""

from __future__ import annotations

import hashlib
import weakref
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import numpy as np
import polars as pl

from neuron_pipeline.config import CorpusSettings
from neuron_pipeline.corpus.errors import CorpusError
from neuron_pipeline.corpus.sources import describe_source, iter_documents

# Documents per tokenizer call: large enough for the fast tokenizer's parallel batch encoding,
# small enough to bound memory on big corpora.
_BATCH_DOCUMENTS = 256
_HASH_CHARS = 16


@dataclass(frozen=True)
class CorpusSequences:
    """Fixed-length token windows cut from a corpus."""

    token_ids: np.ndarray  # int32 [S, sequence_length]
    corpus_hash: str  # short sha256 hex over the source description and the token ids
    source: str  # corpus.source as configured
    stream_tokens: int = 0  # tokens in the whole stream (EOS separators included)
    stream_windows: int = 0  # full windows in the stream before subsampling

    @property
    def num_sequences(self) -> int:
        return int(self.token_ids.shape[0])

    @property
    def sequence_length(self) -> int:
        return int(self.token_ids.shape[1])


def _batches(documents: Iterable[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for document in documents:
        batch.append(document)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def _encode_batch(tokenizer: Any, batch: list[str]) -> list[list[int]]:
    encoded = tokenizer(
        batch,
        add_special_tokens=False,
        return_attention_mask=False,
        verbose=False,  # documents are longer than model_max_length on purpose
    )
    return encoded["input_ids"]


def eos_token_id(tokenizer: Any) -> int | None:
    value = getattr(tokenizer, "eos_token_id", None)
    if isinstance(value, (list, tuple)):
        value = value[0] if value else None
    return int(value) if value is not None else None


def token_stream(documents: Iterable[str], tokenizer: Any) -> np.ndarray:
    """Tokenize documents and concatenate them, separated by the EOS token (if any), as int32."""
    eos = eos_token_id(tokenizer)
    separator = np.array([eos] if eos is not None else [], dtype=np.int32)
    pieces: list[np.ndarray] = []
    for batch in _batches(documents, _BATCH_DOCUMENTS):
        for ids in _encode_batch(tokenizer, batch):
            if not len(ids):
                continue
            if pieces and separator.size:
                pieces.append(separator)
            pieces.append(np.asarray(ids, dtype=np.int32))
    if not pieces:
        return np.zeros(0, dtype=np.int32)
    return np.concatenate(pieces)


def evenly_spaced(total: int, count: int) -> np.ndarray:
    """`count` distinct indices in [0, total), evenly spaced, first and last included, ascending."""
    if count >= total:
        return np.arange(total, dtype=np.int64)
    if count == 1:
        return np.zeros(1, dtype=np.int64)
    # The step (total-1)/(count-1) is > 1, so rounding never merges two indices.
    return np.rint(np.linspace(0, total - 1, count)).astype(np.int64)


def corpus_hash(description: str, token_ids: np.ndarray) -> str:
    digest = hashlib.sha256()
    digest.update(description.encode("utf-8"))
    digest.update(f"|{token_ids.shape}|".encode())
    digest.update(np.ascontiguousarray(token_ids, dtype="<i4").tobytes())
    return digest.hexdigest()[:_HASH_CHARS]


def windows_from_stream(stream: np.ndarray, sequence_length: int, max_sequences: int | None) -> np.ndarray:
    """Cut a token stream into [S, sequence_length] windows, subsampled evenly to max_sequences."""
    total_windows = len(stream) // sequence_length
    windows = stream[: total_windows * sequence_length].reshape(total_windows, sequence_length)
    if max_sequences is not None and total_windows > max_sequences:
        windows = windows[evenly_spaced(total_windows, max_sequences)]
    return np.ascontiguousarray(windows, dtype=np.int32)


def tokenize_corpus(settings: CorpusSettings, tokenizer: Any) -> CorpusSequences:
    """Read the configured source and cut it into fixed-length token windows."""
    stream = token_stream(iter_documents(settings), tokenizer)
    length = settings.sequence_length
    if len(stream) < length:
        raise CorpusError(
            f"corpus {settings.source!r} has {len(stream)} tokens, fewer than one sequence of {length}: "
            "add text or lower corpus.sequence_length"
        )
    windows = windows_from_stream(stream, length, settings.max_sequences)
    description = f"{describe_source(settings)}|length={length}|max={settings.max_sequences}"
    return CorpusSequences(
        token_ids=windows,
        corpus_hash=corpus_hash(description, windows),
        source=settings.source,
        stream_tokens=int(len(stream)),
        stream_windows=int(len(stream) // length),
    )


# tokenizer -> {token id: decoded string}; weak so that caches go away with their tokenizers.
_DECODE_CACHES: "weakref.WeakKeyDictionary[Any, dict[int, str]]" = weakref.WeakKeyDictionary()


def _decode_cache(tokenizer: Any) -> dict[int, str]:
    try:
        cache = _DECODE_CACHES.get(tokenizer)
        if cache is None:
            cache = _DECODE_CACHES[tokenizer] = {}
        return cache
    except TypeError:  # not weak-referenceable or not hashable: a cache for this call only
        return {}


def token_strings(tokenizer: Any, token_ids: np.ndarray) -> list[list[str]]:
    """Readable per-token strings: each id decoded on its own, [S][T] like token_ids."""
    ids = np.asarray(token_ids)
    squeeze = ids.ndim == 1
    if squeeze:
        ids = ids[None, :]
    if ids.size == 0:
        return [[] for _ in range(ids.shape[0])] if not squeeze else [[]]
    cache = _decode_cache(tokenizer)
    unique, inverse = np.unique(ids, return_inverse=True)
    strings = np.empty(len(unique), dtype=object)
    for position, token_id in enumerate(unique.tolist()):
        text = cache.get(token_id)
        if text is None:
            text = cache[token_id] = tokenizer.decode([token_id])
        strings[position] = text
    return strings[inverse.reshape(ids.shape)].tolist()


def corpus_frame(sequences: CorpusSequences, tokenizer: Any, model_id: str, corpus_name: str) -> pl.DataFrame:
    """The ``corpus_tokens`` table: one row per window with ids, per-token strings and text."""
    from neuron_pipeline.lake.schemas import SCHEMAS

    ids = sequences.token_ids
    count = int(ids.shape[0])
    texts = tokenizer.batch_decode(ids.tolist()) if count else []
    schema = pl.Schema(pl.from_arrow(SCHEMAS["corpus_tokens"].empty_table()).schema)
    return pl.DataFrame(
        {
            "model": [model_id] * count,
            "corpus": [corpus_name] * count,
            "sequence_id": np.arange(count, dtype=np.int64),
            "token_ids": ids.tolist(),
            "tokens": token_strings(tokenizer, ids),
            "text": texts,
        },
        schema=schema,
    )
