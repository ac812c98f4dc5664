"""Section 5: a synthetic lake shaped like GPT-2 XL, written through the project's lake code,
and the three everyday queries through polars and DuckDB."""

from __future__ import annotations

import shutil
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa

from bench.common import Section, fmt_bytes, fmt_s, median

MODEL = "gpt2-xl"
EXPLAINER_ID = "llm-0123456789ab"
SIMULATOR_ID = "all_at_once-0123456789ab"


def _vocab(size: int = 8000) -> pa.Array:
    rng = np.random.default_rng(1)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    words = []
    for i in range(size):
        n = int(rng.integers(1, 9))
        word = "".join(rng.choice(letters, n))
        words.append((" " if i % 3 else "") + word)
    return pa.array(words, pa.string())


def scores_partition(layer: int, neurons: int, rng: np.random.Generator) -> pa.Table:
    # Scores fall with depth (as in the paper); ~1% of neurons have no score.
    score = np.clip(rng.normal(0.35 - 0.004 * layer, 0.18, neurons), -0.3, 0.98)
    null = rng.random(neurons) < 0.01
    score_arr = pa.array(np.where(null, np.nan, score), pa.float64(), mask=null)
    return pa.table(
        {
            "model": pa.array([MODEL] * neurons),
            "layer": pa.array([str(layer)] * neurons),
            "neuron": pa.array(np.arange(neurons, dtype=np.int32)),
            "explainer_id": pa.array([EXPLAINER_ID] * neurons),
            "simulator_id": pa.array([SIMULATOR_ID] * neurons),
            "score": score_arr,
            "score_top": pa.array(np.clip(score + rng.normal(0, 0.05, neurons), -1, 1)),
            "score_random": pa.array(np.clip(score - 0.1 + rng.normal(0, 0.05, neurons), -1, 1)),
            "rsquared": pa.array(score**2 - 0.05),
            "absolute_dev_explained": pa.array(score * 0.8),
            "n_tokens": pa.array(np.full(neurons, 640, dtype=np.int64)),
            "null_reason": pa.array(np.where(null, "constant_activations", None).tolist(), pa.string()),
        }
    )


def explanations_partition(layer: int, neurons: int, rng: np.random.Generator, vocab: pa.Array) -> pa.Table:
    words = vocab.take(pa.array(rng.integers(0, len(vocab), neurons * 8)))
    text = pa.ListArray.from_arrays(pa.array(np.arange(0, neurons * 8 + 1, 8, dtype=np.int32)), words)
    import pyarrow.compute as pc

    explanation = pc.binary_join(text, "")
    now = datetime.now(timezone.utc)
    return pa.table(
        {
            "model": pa.array([MODEL] * neurons),
            "layer": pa.array([str(layer)] * neurons),
            "neuron": pa.array(np.arange(neurons, dtype=np.int32)),
            "explainer_id": pa.array([EXPLAINER_ID] * neurons),
            "explainer_model": pa.array(["gpt-4"] * neurons),
            "prompt_hash": pa.array(["5f1c2a7e9b3d4c6a"] * neurons),
            "explanation": explanation,
            "prompt_tokens": pa.array(rng.integers(2000, 2800, neurons)),
            "completion_tokens": pa.array(rng.integers(5, 30, neurons)),
            "error": pa.nulls(neurons, pa.string()),
            "records_hash": pa.array([f"{i:016x}" for i in rng.integers(0, 2**62, neurons)]),
            "created_at": pa.array([now] * neurons, pa.timestamp("us", tz="UTC")),
        }
    )


def records_partition(layer: int, neurons: int, per_neuron: int, seq_len: int, rng: np.random.Generator, vocab: pa.Array) -> pa.Table:
    rows = neurons * per_neuron
    n_tokens = rows * seq_len
    offsets = pa.array(np.arange(0, n_tokens + 1, seq_len, dtype=np.int32))
    # Zipf-like token ids: a few tokens are very common, as in text.
    ids = np.minimum(rng.zipf(1.3, n_tokens) - 1, len(vocab) - 1)
    tokens = pa.ListArray.from_arrays(offsets, vocab.take(pa.array(ids)))
    # GELU-like activations: mostly small, a few large; float32 with full mantissas (as real ones).
    x = rng.standard_normal(n_tokens, dtype=np.float32)
    acts = (x * 0.5 * (1 + np.tanh(0.79788456 * (x + 0.044715 * x**3)))).astype(np.float32)
    activations = pa.ListArray.from_arrays(offsets, pa.array(acts))
    kinds = np.array(["top"] * (per_neuron // 2) + ["random"] * (per_neuron - per_neuron // 2))
    ranks = np.concatenate([np.arange(per_neuron // 2), np.arange(per_neuron - per_neuron // 2)]).astype(np.int32)
    return pa.table(
        {
            "model": pa.array([MODEL] * rows),
            "layer": pa.array([str(layer)] * rows),
            "neuron": pa.array(np.repeat(np.arange(neurons, dtype=np.int32), per_neuron)),
            "kind": pa.array(np.tile(kinds, neurons)),
            "rank": pa.array(np.tile(ranks, neurons)),
            "quantile_bin": pa.nulls(rows, pa.int32()),
            "sequence_id": pa.array(rng.integers(0, 10_000_000, rows)),
            "tokens": tokens,
            "activations": activations,
            "max_activation": pa.array(acts.reshape(rows, seq_len).max(1)),
        }
    )


def write_synthetic_lake(lake: Path, layers: int, neurons: int, record_layers: list[int], per_neuron: int = 40, seq_len: int = 64) -> dict:
    """Scores + explanations for every layer, activation_records for ``record_layers``, written
    one partition at a time through ``neuron_pipeline.lake.write_table``."""
    from neuron_pipeline.lake import write_table

    rng = np.random.default_rng(0)
    vocab = _vocab()
    times = {"scores": 0.0, "explanations": 0.0, "activation_records": 0.0, "generate": 0.0}
    for layer in range(layers):
        t = time.perf_counter()
        scores = scores_partition(layer, neurons, rng)
        explanations = explanations_partition(layer, neurons, rng, vocab)
        times["generate"] += time.perf_counter() - t
        t = time.perf_counter()
        write_table(lake, "scores", scores, replace_where={"layer": str(layer)})
        times["scores"] += time.perf_counter() - t
        t = time.perf_counter()
        write_table(lake, "explanations", explanations, replace_where={"layer": str(layer)})
        times["explanations"] += time.perf_counter() - t
    for layer in record_layers:
        t = time.perf_counter()
        records = records_partition(layer, neurons, per_neuron, seq_len, rng, vocab)
        times["generate"] += time.perf_counter() - t
        t = time.perf_counter()
        write_table(lake, "activation_records", records, replace_where={"layer": str(layer)})
        times["activation_records"] += time.perf_counter() - t
        del records
    return times


def dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _queries(lake: Path, layer: int, neuron: int):
    import polars as pl

    from neuron_pipeline.lake.sql import connect

    scores = str(lake / "scores")
    explanations = str(lake / "explanations")
    records = str(lake / "activation_records")

    def pl_top():
        top = pl.scan_delta(scores).select("layer", "neuron", "explainer_id", "simulator_id", "score").drop_nulls("score")
        top = top.sort("score", descending=True).head(100)
        expl = pl.scan_delta(explanations).select("layer", "neuron", "explainer_id", "explanation")
        return top.join(expl, on=["layer", "neuron", "explainer_id"], how="left").collect()

    def pl_neuron():
        return (
            pl.scan_delta(records)
            .filter((pl.col("layer") == str(layer)) & (pl.col("neuron") == neuron))
            .collect()
        )

    def pl_hist():
        return (
            pl.scan_delta(scores)
            .filter(pl.col("layer") == str(layer))
            .select(pl.col("score").drop_nulls())
            .collect()["score"]
            .hist(bin_count=20)
        )

    state = {}

    def con():
        if "con" not in state:
            state["con"] = connect(lake)
        return state["con"]

    def db_connect():
        state.pop("con", None)
        con()

    def db_top():
        return con().sql(
            "select s.layer, s.neuron, s.score, e.explanation from scores s left join explanations e "
            "using (layer, neuron, explainer_id) where s.score is not null order by s.score desc limit 100"
        ).fetchall()

    def db_neuron():
        return con().sql(f"select * from activation_records where layer = '{layer}' and neuron = {neuron}").fetchall()

    def db_hist():
        return con().sql(
            f"select floor(score * 20) / 20 as bin, count(*) from scores where layer = '{layer}' "
            "and score is not null group by 1 order by 1"
        ).fetchall()

    checks = {
        "top": (pl_top, db_top, lambda r: 0 < len(r) <= 100),
        "neuron": (pl_neuron, db_neuron, lambda r: len(r) == 40),
        "hist": (pl_hist, db_hist, lambda r: len(r) > 0),
    }
    return checks, db_connect


def run_lake(section: Section, root: Path, layers: int, neurons: int, record_layers: int, reps: int) -> None:
    lake = root / "lake"
    if lake.exists():
        shutil.rmtree(lake)
    lake.mkdir(parents=True)
    try:
        rec_layers = list(range(record_layers))
        start = time.perf_counter()
        times = write_synthetic_lake(lake, layers, neurons, rec_layers)
        write_s = time.perf_counter() - start
        sizes = {table: dir_size(lake / table) for table in ("scores", "explanations", "activation_records")}
        per_layer_records = sizes["activation_records"] / max(1, record_layers)
        section.data.update(write_times=times, sizes=sizes, write_s=write_s)
        n_neurons = layers * neurons
        section.add(
            "synthetic lake written through `write_table`, one partition at a time",
            f"{n_neurons:,} neurons ({layers} layers x {neurons:,}): scores {fmt_s(times['scores'])}, explanations "
            f"{fmt_s(times['explanations'])}, activation_records {record_layers} layers "
            f"({neurons * 40:,} rows each) {fmt_s(times['activation_records'])}",
        )
        section.add(
            "lake size on disk",
            f"scores {fmt_bytes(sizes['scores'])}, explanations {fmt_bytes(sizes['explanations'])}, "
            f"activation_records {fmt_bytes(sizes['activation_records'])} for {record_layers} layers "
            f"({fmt_bytes(per_layer_records)} per layer)",
        )
        section.add(
            f"activation_records extrapolated to all {layers} layers",
            f"{fmt_bytes(per_layer_records * layers)} ({layers * neurons * 40:,} records of 64 tokens)",
        )
        checks, db_connect = _queries(lake, layer=min(2, record_layers - 1), neuron=neurons // 2 + 1)
        t = time.perf_counter()
        db_connect()
        connect_s = time.perf_counter() - t
        results: dict[str, dict[str, list[float]]] = {}
        first: dict[str, dict[str, float]] = {}
        for name, (pl_fn, db_fn, ok) in checks.items():
            results[name] = {"polars": [], "duckdb": []}
            first[name] = {}
            for rep in range(reps + 1):  # the first run is reported separately (cold caches)
                for engine, fn in (("polars", pl_fn), ("duckdb", db_fn)) if rep % 2 == 0 else (("duckdb", db_fn), ("polars", pl_fn)):
                    t = time.perf_counter()
                    result = fn()
                    elapsed = time.perf_counter() - t
                    if not ok(result):
                        raise AssertionError(f"{engine} {name} query returned {len(result)} rows")
                    if rep == 0:
                        first[name][engine] = elapsed
                    else:
                        results[name][engine].append(elapsed)
        section.data.update(query_times=results, first=first, connect_s=connect_s)
        labels = {
            "top": f"top 100 neurons by score across all {layers} layers (joined with their explanations)",
            "neuron": "one neuron's 40 records (tokens + activations)",
            "hist": "one layer's score histogram (20 bins)",
        }
        for name, label in labels.items():
            for engine in ("polars", "duckdb"):
                value = median(results[name][engine])
                section.add(
                    f"{label} — {engine}",
                    f"{fmt_s(value)} (first run {fmt_s(first[name][engine])})",
                    "< 1 s",
                    value < 1.0,
                )
        section.add("DuckDB `connect(lake)` (views over every table)", fmt_s(connect_s))
        import pyarrow.parquet as pq

        files = list((lake / "activation_records" / "layer=0").glob("*.parquet"))
        section.add(
            "parquet row groups per activation_records partition (rows sorted by neuron, "
            "`NEURON_ROW_GROUP_ROWS` in lake/schemas.py)",
            f"{sum(pq.ParquetFile(f).metadata.num_row_groups for f in files)}",
        )
        section.notes.append(
            f"Medians of {reps} runs after a first (reported) run; polars re-scans the Delta log on every "
            "query (`pl.scan_delta`), DuckDB queries views made once by `neuron_pipeline.lake.sql.connect` "
            "(delta extension from `duckdb-ext-delta` when present, else deltalake -> Arrow)."
        )
    finally:
        shutil.rmtree(lake, ignore_errors=True)
