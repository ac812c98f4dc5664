"""Search neurons by meaning: explanations embedded with all-MiniLM-L6-v2 (llm/embeddings.py),
stored in ``explanation_embeddings``, and ranked by cosine similarity to a query.

* ``embedding_rows`` makes a layer's rows incrementally: an explanation whose text is unchanged
  keeps its stored vector; only new or changed ones are embedded.
* ``search`` embeds the query and ranks every stored explanation (one matrix product), then joins
  the best ones to their explanation text and scores.
* ``nearest_neighbours`` gives, for every explanation, the most similar explanations of other
  neurons (the viewer's precomputed "similar neurons").
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import polars as pl

from neuron_pipeline.lake.io import LakeLike, open_table, read_table, table_exists, table_frame
from neuron_pipeline.lake.location import Lake

EMBEDDINGS_TABLE = "explanation_embeddings"
INDEX_FOLDER = "_search_index"
KEY = ["layer", "neuron", "explainer_id"]


class SearchError(ValueError):
    """A search that cannot run (empty query, no embeddings in the lake); one line with the fix."""


def text_hash(model_name: str, text: str) -> str:
    from neuron_pipeline.interp.prompts import content_hash

    return content_hash(model_name, text)


def embeddable(explanations: pl.DataFrame) -> pl.DataFrame:
    """Explanations that have a text to embed (failed or empty ones have none)."""
    return explanations.filter(
        pl.col("error").is_null() & pl.col("explanation").is_not_null() & (pl.col("explanation").str.strip_chars() != "")
    )


def embedding_rows(
    explanations: pl.DataFrame,
    existing: pl.DataFrame,
    embed: Callable[[Sequence[str]], np.ndarray],
    model_name: str,
) -> tuple[pl.DataFrame, int]:
    """explanation_embeddings rows for ``explanations`` (one layer or several): stored vectors are
    kept where the text is unchanged, the rest is embedded. Returns (rows, texts embedded)."""
    todo = embeddable(explanations).select("model", *KEY, "explanation")
    hashes = [text_hash(model_name, text) for text in todo["explanation"].to_list()]
    todo = todo.with_columns(pl.Series("text_hash", hashes, dtype=pl.String), embedding_model=pl.lit(model_name))
    kept = existing.filter(pl.col("embedding_model") == model_name).select(*KEY, "text_hash", "embedding")
    joined = todo.join(kept, on=[*KEY, "text_hash"], how="left")
    missing = joined.filter(pl.col("embedding").is_null())
    if missing.height:
        vectors = np.asarray(embed(missing["explanation"].to_list()), dtype=np.float32)
        fresh = missing.with_columns(pl.Series("embedding", vectors).cast(pl.List(pl.Float32)))
        joined = pl.concat([joined.filter(pl.col("embedding").is_not_null()), fresh])
    rows = joined.drop("explanation").sort("layer", "neuron", "explainer_id")
    return table_frame(EMBEDDINGS_TABLE, rows), missing.height


@dataclass(frozen=True)
class EmbeddingMatrix:
    """Stored embeddings as one [n, d] float32 matrix and the keys of its rows."""

    keys: pl.DataFrame  # model, layer, neuron, explainer_id
    vectors: np.ndarray


def vectors_of(column: pl.Series) -> np.ndarray:
    """A list column of equal-length float lists as a [n, d] float32 matrix (no per-row copies)."""
    if column.len() == 0:
        return np.zeros((0, 0), dtype=np.float32)
    values = column.explode().to_numpy()
    return np.ascontiguousarray(values, dtype=np.float32).reshape(column.len(), -1)


def index_dir(lake: LakeLike) -> Path:
    """Where the search index (a cache of the embeddings table as one matrix) is kept: inside a
    lake folder, or for an object-store lake in this machine's cache folder, one per lake URI."""
    lake = Lake.of(lake)
    if lake.folder is not None:
        return lake.folder / INDEX_FOLDER
    from neuron_pipeline.config import cache_dir

    name = re.sub(r"[^A-Za-z0-9._-]+", "_", lake.root)[:80] + "-" + hashlib.sha256(lake.root.encode()).hexdigest()[:8]
    return cache_dir("search_index", name)


def _read_matrix(lake: LakeLike, version: int) -> EmbeddingMatrix:
    frame = read_table(lake, EMBEDDINGS_TABLE, columns=["model", *KEY, "embedding"], version=version)
    return EmbeddingMatrix(frame.drop("embedding"), vectors_of(frame["embedding"]))


def load_embeddings(lake: LakeLike, layers: Sequence[int] | None = None, explainer_id: str | None = None) -> EmbeddingMatrix:
    """Every stored embedding (optionally of some layers / one explainer), as a matrix.

    Decoding 307,200 list rows from Parquet takes seconds, so the whole table is cached once per
    Delta version as a plain float32 matrix (``index_dir``), memory-mapped by later reads: the
    Delta table stays the truth, the index is rebuilt whenever the table has a new version."""
    version = open_table(lake, EMBEDDINGS_TABLE).version()
    folder = index_dir(lake)
    vectors_path, keys_path = folder / f"v{version}.npy", folder / f"v{version}.keys.parquet"
    try:
        keys = pl.read_parquet(keys_path)
        vectors = np.load(vectors_path, mmap_mode="r")
        if vectors.shape[0] != keys.height:
            raise ValueError("index halves disagree")
    except (OSError, ValueError, pl.exceptions.PolarsError):
        matrix = _read_matrix(lake, version)
        keys, vectors = matrix.keys, matrix.vectors
        _write_index(folder, version, keys, vectors)
    mask = None
    if layers is not None:
        mask = keys["layer"].is_in([str(layer) for layer in layers])
    if explainer_id is not None:
        same = keys["explainer_id"] == explainer_id
        mask = same if mask is None else mask & same
    if mask is not None:
        rows = np.flatnonzero(mask.to_numpy())
        return EmbeddingMatrix(keys.filter(mask), np.asarray(vectors[rows]))
    return EmbeddingMatrix(keys, vectors)


def _write_index(folder: Path, version: int, keys: pl.DataFrame, vectors: np.ndarray) -> None:
    """Both halves written atomically (a reader never sees half a file); older versions removed."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tag = f"{os.getpid()}-{threading.get_ident()}"
        tmp_vectors, tmp_keys = folder / f".v{version}.{tag}.npy", folder / f".v{version}.{tag}.keys.parquet"
        np.save(tmp_vectors, np.ascontiguousarray(vectors, dtype=np.float32))
        keys.write_parquet(tmp_keys)
        os.replace(tmp_keys, folder / f"v{version}.keys.parquet")
        os.replace(tmp_vectors, folder / f"v{version}.npy")
        for old in folder.glob("v*"):
            if not old.name.startswith(f"v{version}."):
                old.unlink(missing_ok=True)
    except OSError:
        pass  # a read-only lake: search still works, it just decodes the table every time


def _check_query(query: str) -> str:
    text = (query or "").strip()
    if not text:
        raise SearchError('empty search query: give some words, e.g. neuron-pipeline search "money and prices"')
    return text


def search(
    lake: LakeLike,
    query: str,
    layers: Sequence[int] | None = None,
    top: int = 10,
    embed: Callable[[Sequence[str]], np.ndarray] | None = None,
) -> pl.DataFrame:
    """The ``top`` explanations nearest to ``query`` by cosine similarity, best first, with their
    neuron, explainer, text and best score over simulators (null when not scored)."""
    text = _check_query(query)
    if top < 1:
        raise SearchError(f"--top {top}: ask for at least 1 result")
    if not table_exists(lake, EMBEDDINGS_TABLE):
        raise SearchError(
            f"the lake {lake} has no {EMBEDDINGS_TABLE} table: run `neuron-pipeline run` (it embeds every explanation) first"
        )
    matrix = load_embeddings(lake, layers)
    if matrix.vectors.shape[0] == 0:
        where = f" in layers {', '.join(map(str, layers))}" if layers is not None else ""
        raise SearchError(f"no embedded explanations{where} in {lake}: run `neuron-pipeline run` for those layers first")
    if embed is None:
        from neuron_pipeline.llm.embeddings import load_embedder

        embed = load_embedder().embed
    query_vector = np.asarray(embed([text]), dtype=np.float32)[0]
    similarity = matrix.vectors @ query_vector
    top = min(top, similarity.shape[0])
    best = np.argpartition(-similarity, top - 1)[:top]
    best = best[np.argsort(-similarity[best], kind="stable")]
    hits = matrix.keys[best].with_columns(
        pl.Series("similarity", similarity[best].astype(np.float64)), pl.Series("rank", np.arange(1, top + 1))
    )
    return _with_text_and_scores(lake, hits)


def _with_text_and_scores(lake: LakeLike, hits: pl.DataFrame) -> pl.DataFrame:
    where = {"layer": hits["layer"].unique().to_list(), "neuron": hits["neuron"].unique().to_list()}
    texts = read_table(lake, "explanations", where=where, columns=[*KEY, "explanation"])
    scores = read_table(lake, "scores", where=where, columns=[*KEY, "score"])
    best_scores = scores.group_by(KEY).agg(pl.col("score").fill_nan(None).max())
    return (
        hits.join(texts, on=KEY, how="left")
        .join(best_scores, on=KEY, how="left")
        .sort("rank")
        .select("rank", "similarity", "layer", "neuron", "explainer_id", "explanation", "score", "model")
    )


# Similarities held at once by nearest_neighbours (rows x all rows, float32): 32 MB, about 110 MB
# with the selection's temporaries (its int64 indices, the mask). At 256 MB the viewer's step grew
# with the number of layers until the block filled (+0.7 GiB from 3 to 12 layers of 2,048 neurons,
# BENCHMARKS.md); smaller blocks cost nothing measurable in the matrix product.
NEIGHBOUR_BLOCK_CELLS = 8 * 1024 * 1024


def nearest_neighbours(
    vectors: np.ndarray, groups: np.ndarray, k: int = 5, chunk: int | None = None, queries: np.ndarray | None = None,
    allowed: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """For each query row (default: every row), the ``k`` most similar other rows that are not in
    its group (its neuron) and are ``allowed`` (a boolean mask over rows; default all), as (indices [q, k], similarities [q, k]); -1 / nan where there are fewer
    candidates. Queries go in chunks sized so a chunk's similarities to all rows stay near 32 MB
    (307,200 rows: 27 a chunk)."""
    n = vectors.shape[0]
    queries = np.arange(n) if queries is None else np.asarray(queries, dtype=np.int64)
    q = queries.shape[0]
    chunk = chunk or max(1, NEIGHBOUR_BLOCK_CELLS // max(n, 1))
    indices = np.full((q, k), -1, dtype=np.int64)
    similarities = np.full((q, k), np.nan, dtype=np.float32)
    if n < 2 or k < 1:
        return indices, similarities
    for start in range(0, q, chunk):
        rows = queries[start : start + chunk]
        block = vectors[rows] @ vectors.T  # [c, n]
        same = groups[rows, None] == groups[None, :]
        block[same] = -np.inf
        if allowed is not None:
            block[:, ~allowed] = -np.inf
        take = min(k, n - 1)
        part = np.argpartition(block, n - take, axis=1)[:, n - take :]  # the largest, without a negated copy
        values = np.take_along_axis(block, part, axis=1)
        order = np.argsort(-values, axis=1, kind="stable")
        part, values = np.take_along_axis(part, order, axis=1), np.take_along_axis(values, order, axis=1)
        finite = np.isfinite(values)
        indices[start : start + chunk, :take] = np.where(finite, part, -1)
        similarities[start : start + chunk, :take] = np.where(finite, values, np.nan)
    return indices, similarities


__all__ = ["EmbeddingMatrix", "SearchError", "embedding_rows", "load_embeddings", "nearest_neighbours", "search"]
