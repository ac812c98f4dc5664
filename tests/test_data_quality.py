"""Great Expectations suites of data_quality/: valid frames pass, each corruption is caught.

Frames are built from the lake schemas (neuron_pipeline.lake.schemas.SCHEMAS) so that the
dtypes match what the pipeline writes. One GX context serves the whole module.
"""

from __future__ import annotations

import json
import math
from datetime import datetime, timezone

import numpy as np
import polars as pl
import pyarrow as pa
import pytest

from data_quality import PREPARERS, SUITES, QualityParams, QualityReport, gx_context, validate_table
from neuron_pipeline.lake.schemas import SCHEMAS

L = 8  # tokens per excerpt (small, to keep the tests fast)
NEURONS = (0, 1, 2)
PARAMS = QualityParams(
    sequence_length=L,
    top_k=4,
    random_k=3,
    quantile_bins=3,
    per_quantile_bin=2,
    max_explanation_chars=100,
    expected_neurons=NEURONS,
    corpus_tokens=10 * L,
)
MODEL = "smollm2-135m-instruct"


def frame(table: str, rows: list[dict]) -> pl.DataFrame:
    return pl.from_arrow(pa.Table.from_pylist(rows, schema=SCHEMAS[table]))


def tokens(seq: int) -> list[str]:
    return [f"t{seq}_{i}" for i in range(L)]


def activations(peak: float, seed: int) -> list[float]:
    rng = np.random.default_rng(seed)
    values = rng.uniform(-0.2, peak * 0.9, L).astype(np.float32)
    values[seed % L] = np.float32(peak)
    return [float(v) for v in values]


# --------------------------------------------------------------------------- valid frames


def corpus_frame() -> pl.DataFrame:
    return frame(
        "corpus_tokens",
        [
            {
                "model": MODEL,
                "corpus": "janeausten",
                "sequence_id": seq,
                "token_ids": [seq * L + i for i in range(L)],
                "tokens": tokens(seq),
                "text": " ".join(tokens(seq)),
            }
            for seq in range(10)
        ],
    )


def activations_frame(layers: tuple[str, ...] = ("3",)) -> pl.DataFrame:
    rows = []
    for layer in layers:
        for neuron in NEURONS:
            rows.append(
                {
                    "model": MODEL,
                    "layer": layer,
                    "neuron": neuron,
                    "count": 10 * L,
                    "mean": 0.25 + neuron,
                    "variance": 0.5,
                    "max": 3.0 + neuron,
                    "min": -0.17,
                    "frac_positive": 0.4,
                    "quantile_boundaries": [0.5, 1.0],
                    "corpus_hash": "abc123",
                }
            )
    # A constant neuron whose float64 mean is a hair above its float32 max: still valid.
    rows[0].update(mean=0.1, max=0.1, min=0.1, variance=0.0, frac_positive=1.0)
    return frame("neuron_activations", rows)


def records_frame(layer: str = "3") -> pl.DataFrame:
    rows = []
    seed = 0
    for neuron in NEURONS:
        def add(kind: str, rank: int, seq: int, peak: float, quantile_bin: int | None = None) -> None:
            nonlocal seed
            seed += 1
            acts = activations(peak, seed)
            rows.append(
                {
                    "model": MODEL,
                    "layer": layer,
                    "neuron": neuron,
                    "kind": kind,
                    "rank": rank,
                    "quantile_bin": quantile_bin,
                    "sequence_id": seq,
                    "tokens": tokens(seq),
                    "activations": acts,
                    "max_activation": max(acts),
                }
            )

        for rank in range(PARAMS.top_k):
            add("top", rank, rank, 5.0 - rank)
        for rank in range(PARAMS.random_k):
            add("random", rank, 5 + rank, 1.0 + 0.1 * rank)
        for quantile_bin in range(PARAMS.quantile_bins):
            for i in range(PARAMS.per_quantile_bin):
                add("quantile", quantile_bin * PARAMS.per_quantile_bin + i, 20 + 2 * quantile_bin + i, 0.5 + quantile_bin, quantile_bin)
    return frame("activation_records", rows)


def explanations_frame() -> pl.DataFrame:
    created = datetime(2025, 1, 1, tzinfo=timezone.utc)
    rows = []
    for explainer in ("exp-a", "exp-b"):
        for neuron in NEURONS:
            rows.append(
                {
                    "model": MODEL,
                    "layer": "3",
                    "neuron": neuron,
                    "explainer_id": explainer,
                    "explainer_model": "baseline",
                    "prompt_hash": "p123",
                    "explanation": f"the word 'token{neuron}' and punctuation",
                    "prompt_tokens": 100,
                    "completion_tokens": 12,
                    "error": None,
                    "created_at": created,
                }
            )
    # A failed call: no explanation, but the error says why.
    rows[-1].update(explanation=None, error="timeout after 3 retries", completion_tokens=0)
    return frame("explanations", rows)


def simulations_frame() -> pl.DataFrame:
    rows = []
    for neuron in NEURONS:
        for kind, n in (("top", 2), ("random", 2)):
            for rank in range(n):
                seq = rank if kind == "top" else 5 + rank
                rows.append(
                    {
                        "model": MODEL,
                        "layer": "3",
                        "neuron": neuron,
                        "explainer_id": "exp-a",
                        "simulator_id": "sim-a",
                        "kind": kind,
                        "rank": rank,
                        "sequence_id": seq,
                        "tokens": tokens(seq),
                        "true_activations": activations(3.0, seq),
                        "expected_activations": [float(i % 11) for i in range(L)],
                        "mode": "top_logprobs",
                    }
                )
    return frame("simulations", rows)


def scores_frame() -> pl.DataFrame:
    rows = [
        {
            "model": MODEL,
            "layer": "3",
            "neuron": neuron,
            "explainer_id": "exp-a",
            "simulator_id": "sim-a",
            "score": 0.3 * neuron,
            "score_top": 0.2,
            "score_random": -0.1,
            "rsquared": -2.5,
            "absolute_dev_explained": 0.1,
            "n_tokens": 10 * L,
            "null_reason": None,
        }
        for neuron in NEURONS
    ]
    rows[2].update(score=1.0000000000000002)  # numpy's corrcoef can overshoot 1 by an ulp
    rows[1].update(score=None, score_top=None, score_random=None, rsquared=None, null_reason="constant simulation")
    return frame("scores", rows)


def summary_frame() -> pl.DataFrame:
    return frame(
        "layer_summary",
        [
            {
                "model": MODEL,
                "layer": "3",
                "explainer_id": explainer,
                "simulator_id": "sim-a",
                "explainer_model": "baseline",
                "neurons_scored": 2,
                "neurons_null": 1,
                "mean_score": 0.45,
                "median_score": 0.45,
                "p90_score": 0.9,
                "frac_score_ge_0_8": 0.5,
                "best_neuron": 2,
                "best_score": 1.0,
                "best_explanation": "commas",
            }
            for explainer in ("exp-a", "exp-b")
        ],
    )


VALID = {
    "corpus_tokens": corpus_frame,
    "neuron_activations": activations_frame,
    "activation_records": records_frame,
    "explanations": explanations_frame,
    "simulations": simulations_frame,
    "scores": scores_frame,
    "layer_summary": summary_frame,
    "neuron_output_tokens": lambda: output_tokens_frame(),
    "explanation_embeddings": lambda: embeddings_frame(),
}


def output_tokens_frame() -> pl.DataFrame:
    rows = []
    for neuron in NEURONS:
        rows.append({
            "model": MODEL, "layer": "3", "neuron": neuron,
            "promoted_tokens": [" money", " pounds", " sterling"], "promoted_token_ids": [5, 9, 2],
            "promoted_logits": [3.5, 2.0, 1.5],
            "suppressed_tokens": [" the", " of", " and"], "suppressed_token_ids": [1, 7, 3],
            "suppressed_logits": [-4.0, -2.5, -0.5],
            "weights_hash": "abc123",
        })
    return frame("neuron_output_tokens", rows)


def embeddings_frame() -> pl.DataFrame:
    rng = np.random.default_rng(0)
    rows = []
    for neuron in NEURONS:
        vector = rng.standard_normal(8).astype(np.float32)
        rows.append({
            "model": MODEL, "layer": "3", "neuron": neuron, "explainer_id": "llm-1",
            "embedding_model": "all-MiniLM-L6-v2", "text_hash": f"h{neuron}",
            "embedding": [float(v) for v in vector / np.linalg.norm(vector)],
        })
    return frame("explanation_embeddings", rows)


# --------------------------------------------------------------------------- helpers


def failure(report: QualityReport, description: str) -> dict:
    found = [f for f in report.failures if f["description"] == description]
    assert found, f"expected failure {description!r}; got: {report.summary()}"
    return found[0]


def only_failure(report: QualityReport, description: str) -> dict:
    assert not report.success
    assert [f["description"] for f in report.failures] == [description], report.summary()
    assert report.failed == 1
    return report.failures[0]


def failing_row_indices(report: QualityReport) -> list[int]:
    if report.failing_rows.is_empty():
        return []
    return report.failing_rows.get_column("row").to_list()


def set_cell(df: pl.DataFrame, row: int, column: str, value) -> pl.DataFrame:
    dtype = df.schema[column]
    values = df.get_column(column).to_list()
    values[row] = value
    return df.with_columns(pl.Series(column, values, dtype=dtype))


# --------------------------------------------------------------------------- valid data passes


def test_every_table_has_a_suite():
    assert set(SUITES) == set(SCHEMAS) == set(PREPARERS)
    for table, build in SUITES.items():
        suite = build(PARAMS, ["3"])
        assert suite.expectations, table
        assert all(e.description for e in suite.expectations), table


@pytest.mark.parametrize("table", list(VALID))
def test_valid_frames_pass(table):
    report = validate_table(table, VALID[table](), PARAMS)
    assert report.success, report.summary()
    assert report.failed == 0 and report.failures == []
    assert report.failing_rows.is_empty()
    assert report.evaluated >= 5
    assert report.summary() == f"{table}: all {report.evaluated} expectations passed on {report.rows} rows"


def test_context_is_created_once():
    assert gx_context() is gx_context()


def test_report_is_json_metadata():
    df = set_cell(simulations_frame(), 0, "expected_activations", [11.0] + [0.0] * (L - 1))
    report = validate_table("simulations", df, PARAMS)
    metadata = report.to_metadata()
    json.dumps(metadata)
    assert metadata["failed"] == 1 and metadata["success"] is False
    assert "simulations: 1 of" in report.summary()
    assert "expected_activations <= 10 (1 rows, e.g. [11.0])" in report.summary()


# --------------------------------------------------------------------------- corpus_tokens


def test_corpus_wrong_list_length():
    df = set_cell(corpus_frame(), 2, "tokens", tokens(2)[:-1])
    report = validate_table("corpus_tokens", df, PARAMS)
    fail = only_failure(report, f"len(tokens) == {L}")
    assert fail["unexpected_count"] == 1
    assert fail["unexpected_values"] == [L - 1]
    assert failing_row_indices(report) == [2]
    assert report.failing_rows.get_column("failed_expectations").to_list() == [f"len(tokens) == {L}"]
    # The failing row is the caller's row, list columns included.
    assert report.failing_rows.get_column("sequence_id").to_list() == [2]


def test_corpus_null_list_and_duplicate_id():
    df = set_cell(corpus_frame(), 4, "token_ids", None)
    df = set_cell(df, 5, "sequence_id", 3)
    report = validate_table("corpus_tokens", df, PARAMS)
    assert failure(report, "len(token_ids) is not null")["unexpected_count"] == 1
    assert failure(report, "sequence_id is unique")["unexpected_count"] == 2
    assert failing_row_indices(report) == [3, 4, 5]


def test_corpus_empty_table():
    report = validate_table("corpus_tokens", corpus_frame().clear(), PARAMS)
    assert not report.success
    fail = failure(report, "corpus_tokens is not empty")
    assert fail["observed_value"] == 0


# --------------------------------------------------------------------------- neuron_activations


def test_activations_nan_mean():
    df = set_cell(activations_frame(), 1, "mean", float("nan"))
    report = validate_table("neuron_activations", df, PARAMS)
    fail = only_failure(report, "mean is not null/NaN")
    assert fail["unexpected_count"] == 1
    assert failing_row_indices(report) == [1]


def test_activations_infinite_max_and_order():
    df = set_cell(activations_frame(), 2, "max", float("inf"))
    df = set_cell(df, 1, "mean", 10.0)  # above max 4.0
    report = validate_table("neuron_activations", df, PARAMS)
    assert failure(report, "max is finite")["unexpected_values"] == ["inf"]
    assert failure(report, "max >= mean")["unexpected_values"] == [-6.0]
    assert report.failed == 2
    assert failing_row_indices(report) == [1, 2]


@pytest.mark.parametrize(
    ("column", "value", "description"),
    [
        ("variance", -0.5, "variance >= 0"),
        ("frac_positive", 1.2, "frac_positive in [0, 1]"),
        ("count", 79, f"count == corpus tokens ({10 * L})"),
        ("min", 9.0, "mean >= min"),
        ("quantile_boundaries", [1.0, 0.5], "quantile_boundaries are non-decreasing"),
    ],
)
def test_activations_single_corruptions(column, value, description):
    df = set_cell(activations_frame(), 2, column, value)
    report = validate_table("neuron_activations", df, PARAMS)
    fail = only_failure(report, description)
    assert fail["unexpected_count"] == 1
    assert failing_row_indices(report) == [2]


def test_activations_duplicate_neuron():
    df = activations_frame()
    df = pl.concat([df, df.slice(0, 1)])
    report = validate_table("neuron_activations", df, PARAMS)
    fail = only_failure(report, "(layer, neuron) is unique")
    assert fail["unexpected_count"] == 2
    assert failing_row_indices(report) == [0, 3]


def test_activations_coverage_missing_neuron():
    df = activations_frame().filter(pl.col("neuron") != 2)
    report = validate_table("neuron_activations", df, PARAMS)
    fail = only_failure(report, "all 3 expected neurons present in layer 3")
    assert fail["missing_count"] == 1 and fail["missing_values"] == [2]
    assert "1 missing, e.g. [2]" in report.summary()
    assert report.failing_rows.is_empty()  # a missing row cannot be shown


def test_activations_coverage_per_layer():
    df = activations_frame(("3", "10"))
    assert validate_table("neuron_activations", df, PARAMS).success
    df = df.filter(~((pl.col("layer") == "10") & (pl.col("neuron") == 1)))
    report = validate_table("neuron_activations", df, PARAMS)
    fail = only_failure(report, "all 3 expected neurons present in each of 2 layers")
    assert fail["missing_values"] == ["10/1"]


def test_activations_without_expectations_of_count_or_coverage():
    df = activations_frame().filter(pl.col("neuron") != 2).with_columns(pl.lit(7, dtype=pl.Int64).alias("count"))
    assert validate_table("neuron_activations", df, QualityParams(sequence_length=L, quantile_bins=3)).success


def test_activations_missing_column():
    df = activations_frame().drop("frac_positive")
    report = validate_table("neuron_activations", df, PARAMS)
    fail = failure(report, "all neuron_activations columns of lake/schemas.py present")
    assert fail["missing_values"] == ["frac_positive"]
    assert failure(report, "frac_positive is not null")["unexpected_count"] == 3
    assert "frac_positive" not in report.failing_rows.columns  # rows are the caller's rows


# --------------------------------------------------------------------------- activation_records


def _row(df: pl.DataFrame, neuron: int, kind: str, rank: int) -> int:
    return (
        df.with_row_index("i")
        .filter((pl.col("neuron") == neuron) & (pl.col("kind") == kind) & (pl.col("rank") == rank))
        .get_column("i")
        .item()
    )


def test_records_unsorted_top():
    df = records_frame()
    a, b = _row(df, 1, "top", 1), _row(df, 1, "top", 2)
    # Swap the excerpts of ranks 1 and 2: rank 2 now has the larger max activation.
    swapped = df.with_row_index("i").with_columns(
        pl.when(pl.col("i") == a).then(pl.lit(b)).when(pl.col("i") == b).then(pl.lit(a)).otherwise(pl.col("i")).alias("src")
    )
    moved = ["sequence_id", "tokens", "activations", "max_activation"]
    df = swapped.with_columns([pl.col(c).gather(pl.col("src")) for c in moved]).drop("i", "src")
    report = validate_table("activation_records", df, PARAMS)
    fail = only_failure(report, "top records sorted by max_activation descending within a neuron by rank")
    assert fail["unexpected_count"] == 1
    assert fail["unexpected_values"] == [pytest.approx(1.0)]
    assert failing_row_indices(report) == [b]


def test_records_wrong_activation_length_and_nan():
    df = records_frame()
    acts = df.get_column("activations").to_list()
    short = acts[4][:-1] if acts[4][-1] != max(acts[4]) else acts[4][1:]
    df = set_cell(df, 4, "activations", short)
    nan = list(acts[7])
    nan[(nan.index(max(nan)) + 1) % L] = float("nan")
    df = set_cell(df, 7, "activations", nan)
    report = validate_table("activation_records", df, PARAMS)
    assert failure(report, f"len(activations) == {L}")["unexpected_values"] == [L - 1]
    assert failure(report, "activations are finite")["unexpected_values"] == [1]
    assert report.failed == 2
    assert failing_row_indices(report) == [4, 7]


def test_records_max_activation_mismatch():
    df = records_frame()
    df = set_cell(df, 3, "max_activation", df.get_column("max_activation")[3] + 0.1)
    report = validate_table("activation_records", df, PARAMS)
    fail = failure(report, "max_activation == max(activations) (tolerance 1e-05)")
    assert fail["unexpected_count"] == 1 and fail["unexpected_values"] == [pytest.approx(0.1, abs=1e-6)]
    assert failing_row_indices(report) == [3]
    # A max within the tolerance passes.
    df = records_frame()
    df = set_cell(df, 3, "max_activation", df.get_column("max_activation")[3] + 1e-6)
    assert validate_table("activation_records", df, PARAMS).success


def test_records_missing_top_record_counts_neurons():
    df = records_frame()
    dropped = _row(df, 1, "top", PARAMS.top_k - 1)
    df = df.with_row_index("i").filter(pl.col("i") != dropped).drop("i")
    report = validate_table("activation_records", df, PARAMS)
    fail = only_failure(report, "exactly 4 top records per neuron")
    assert fail["unexpected_count"] == 1  # one neuron, not one row per record
    assert fail["unexpected_values"] == [3]
    first_of_neuron_1 = df.with_row_index("i").filter(pl.col("neuron") == 1).get_column("i").min()
    assert failing_row_indices(report) == [first_of_neuron_1]


def test_records_fewer_top_records_allowed_for_small_corpus():
    df = records_frame()
    df = df.filter(~((pl.col("kind") == "top") & (pl.col("rank") == PARAMS.top_k - 1)))
    params = QualityParams(**{**PARAMS.__dict__, "corpus_sequences": PARAMS.top_k - 1})
    # random_k (3) <= corpus_sequences (3): random counts stay exact.
    assert validate_table("activation_records", df, params).success


def test_records_too_many_per_quantile_bin():
    df = records_frame()
    source = _row(df, 2, "quantile", 0)
    extra = df.slice(source, 1).with_columns(pl.lit(99, dtype=pl.Int32).alias("rank"), pl.lit(99, dtype=pl.Int64).alias("sequence_id"))
    df = pl.concat([df, extra])
    report = validate_table("activation_records", df, PARAMS)
    fail = only_failure(report, "at most 2 records per (neuron, quantile_bin)")
    assert fail["unexpected_count"] == 1 and fail["unexpected_values"] == [3]
    assert failing_row_indices(report) == [source]


def test_records_bad_kind_and_quantile_bin():
    df = records_frame()
    q = _row(df, 0, "quantile", 1)
    df = set_cell(df, q, "kind", "bottom")
    t = _row(df, 0, "top", 0)
    df = set_cell(df, t, "quantile_bin", 1)
    report = validate_table("activation_records", df, PARAMS)
    fail = failure(report, "kind in {top, random, quantile}")
    assert fail["unexpected_count"] == 1 and fail["unexpected_values"] == ["bottom"]
    bins = failure(report, "quantile_bin is null for top/random records")
    assert bins["unexpected_count"] == 2  # the top record, and the former quantile record
    assert set(failing_row_indices(report)) == {q, t}


def test_records_coverage():
    df = records_frame().filter(pl.col("neuron") != 0)
    report = validate_table("activation_records", df, PARAMS)
    assert only_failure(report, "all 3 expected neurons present in layer 3")["missing_values"] == [0]


# --------------------------------------------------------------------------- explanations


def test_explanations_duplicate():
    df = explanations_frame()
    df = pl.concat([df, df.slice(1, 1)])
    report = validate_table("explanations", df, PARAMS)
    fail = only_failure(report, "(layer, neuron, explainer_id) is unique")
    assert fail["unexpected_count"] == 2
    assert failing_row_indices(report) == [1, 6]


def test_explanations_empty_without_error():
    df = set_cell(explanations_frame(), 2, "explanation", "   ")
    df = set_cell(df, 3, "explanation", None)
    report = validate_table("explanations", df, PARAMS)
    fail = only_failure(report, "explanation non-empty when error is null")
    assert fail["unexpected_count"] == 2 and fail["unexpected_values"] == [0, 0]
    assert failing_row_indices(report) == [2, 3]


def test_explanations_too_long_and_null_ids():
    df = set_cell(explanations_frame(), 0, "explanation", "x" * 150)
    df = set_cell(df, 1, "prompt_hash", None)
    df = set_cell(df, 2, "explainer_id", None)
    report = validate_table("explanations", df, PARAMS)
    assert failure(report, "explanation at most 100 chars")["unexpected_values"] == [150]
    assert failure(report, "prompt_hash is not null")["unexpected_count"] == 1
    assert failure(report, "explainer_id is not null")["unexpected_count"] == 1
    assert report.failed == 3
    assert failing_row_indices(report) == [0, 1, 2]


# --------------------------------------------------------------------------- simulations


def test_simulations_expected_activation_eleven():
    df = set_cell(simulations_frame(), 5, "expected_activations", [0.0] * (L - 1) + [11.0])
    report = validate_table("simulations", df, PARAMS)
    fail = only_failure(report, "expected_activations <= 10")
    assert fail["unexpected_count"] == 1 and fail["unexpected_values"] == [11.0]
    assert failing_row_indices(report) == [5]


def test_simulations_negative_nan_and_inf():
    df = set_cell(simulations_frame(), 0, "expected_activations", [-0.5] + [1.0] * (L - 1))
    df = set_cell(df, 1, "expected_activations", [float("nan")] + [1.0] * (L - 1))
    df = set_cell(df, 2, "expected_activations", [float("inf")] + [1.0] * (L - 1))
    report = validate_table("simulations", df, PARAMS)
    assert failure(report, "expected_activations >= 0")["unexpected_values"] == [-0.5]
    assert failure(report, "expected_activations <= 10")["unexpected_values"] == ["inf"]
    assert failure(report, "expected_activations are finite")["unexpected_count"] == 2
    assert report.failed == 3
    assert failing_row_indices(report) == [0, 1, 2]


def test_simulations_length_mismatch_kind_and_mode():
    df = set_cell(simulations_frame(), 3, "expected_activations", [1.0] * (L + 2))
    df = set_cell(df, 4, "kind", "quantile")
    df = set_cell(df, 6, "mode", None)
    report = validate_table("simulations", df, PARAMS)
    fail = failure(report, "len(expected_activations) == len(tokens)")
    assert fail["unexpected_count"] == 1 and fail["unexpected_values"] == [[L + 2, L]]
    assert failure(report, "kind in {top, random, calibration}")["unexpected_values"] == ["quantile"]
    assert failure(report, "expected_activations and mode given when error is null")["unexpected_count"] == 1
    assert report.failed == 3
    assert failing_row_indices(report) == [3, 4, 6]


# --------------------------------------------------------------------------- scores


def test_scores_out_of_range():
    df = set_cell(scores_frame(), 0, "score", 1.5)
    report = validate_table("scores", df, PARAMS)
    fail = only_failure(report, "score in [-1, 1] or null")
    assert fail["unexpected_count"] == 1 and fail["unexpected_values"] == [1.5]
    assert failing_row_indices(report) == [0]


@pytest.mark.parametrize("missing_score", [None, float("nan")])
@pytest.mark.parametrize("reason", [None, ""])
def test_scores_null_without_reason(missing_score, reason):
    df = set_cell(scores_frame(), 2, "score", missing_score)
    df = set_cell(df, 2, "null_reason", reason)
    report = validate_table("scores", df, PARAMS)
    fail = only_failure(report, "null_reason given when score is null")
    assert fail["unexpected_count"] == 1
    assert failing_row_indices(report) == [2]


def test_scores_duplicate_and_coverage():
    df = scores_frame().filter(pl.col("neuron") != 0)
    df = pl.concat([df, df.slice(0, 1).with_columns(pl.lit(-1.2).alias("score_top"))])
    report = validate_table("scores", df, PARAMS)
    assert failure(report, "(layer, neuron, explainer_id, simulator_id) is unique")["unexpected_count"] == 2
    assert failure(report, "score_top in [-1, 1] or null")["unexpected_values"] == [-1.2]
    assert failure(report, "all 3 expected neurons present in layer 3")["missing_values"] == [0]
    assert report.failed == 3
    assert failing_row_indices(report) == [0, 2]
    assert report.failing_rows.get_column("failed_expectations").to_list() == [
        "(layer, neuron, explainer_id, simulator_id) is unique",
        "(layer, neuron, explainer_id, simulator_id) is unique; score_top in [-1, 1] or null",
    ]


# --------------------------------------------------------------------------- layer_summary


def test_layer_summary_corruptions():
    df = set_cell(summary_frame(), 0, "mean_score", 1.3)
    df = set_cell(df, 1, "neurons_scored", -1)
    report = validate_table("layer_summary", df, PARAMS)
    assert failure(report, "mean_score in [-1, 1] or null")["unexpected_values"] == [1.3]
    assert failure(report, "neurons_scored >= 0")["unexpected_values"] == [-1]
    assert report.failed == 2
    assert failing_row_indices(report) == [0, 1]
    # A layer where nothing could be scored: null statistics are fine.
    df = set_cell(summary_frame(), 0, "mean_score", None)
    assert validate_table("layer_summary", df, PARAMS).success


# --------------------------------------------------------------------------- scale


def test_failing_rows_are_capped_and_large_tables_are_quick():
    import time

    # 200 neurons x 50 records x 64 tokens, in the shape of the default settings.
    params = QualityParams(expected_neurons=tuple(range(200)))
    n_neurons, per_neuron, length = 200, 50, 64
    rng = np.random.default_rng(0)
    acts = rng.standard_normal((n_neurons * per_neuron, length)).astype(np.float32)
    kinds = (["top"] * 20 + ["random"] * 20 + ["quantile"] * 10) * n_neurons
    ranks = (list(range(20)) + list(range(20)) + list(range(10))) * n_neurons
    bins = ([None] * 40 + [b for b in range(5) for _ in range(2)]) * n_neurons
    neuron = np.repeat(np.arange(n_neurons, dtype=np.int32), per_neuron)
    maxes = acts.max(axis=1)
    # Make the top records sorted.
    order = np.argsort(-maxes.reshape(n_neurons, per_neuron)[:, :20], axis=1)
    for n in range(n_neurons):
        block = acts[n * per_neuron : n * per_neuron + 20]
        acts[n * per_neuron : n * per_neuron + 20] = block[order[n]]
    maxes = acts.max(axis=1)
    df = pl.DataFrame(
        {
            "model": MODEL,
            "layer": "0",
            "neuron": neuron,
            "kind": kinds,
            "rank": pl.Series(ranks, dtype=pl.Int32),
            "quantile_bin": pl.Series(bins, dtype=pl.Int32),
            "sequence_id": pl.Series(np.tile(np.arange(per_neuron), n_neurons), dtype=pl.Int64),
            "tokens": pl.Series([["a"] * length] * (n_neurons * per_neuron), dtype=pl.List(pl.String)),
            "activations": pl.Series(acts, dtype=pl.Array(pl.Float32, length)).cast(pl.List(pl.Float32)),
            "max_activation": maxes,
        }
    )
    start = time.perf_counter()
    report = validate_table("activation_records", df, params)
    elapsed = time.perf_counter() - start
    assert report.success, report.summary()
    assert elapsed < 20, elapsed
    broken = df.with_columns(pl.col("tokens").list.head(10))
    report = validate_table("activation_records", broken, params)
    fail = only_failure(report, "len(tokens) == 64")
    assert fail["unexpected_count"] == n_neurons * per_neuron
    assert len(fail["unexpected_values"]) <= 5
    assert report.failing_rows.height == 20
    assert math.isclose(fail["unexpected_percent"], 100.0)


# --------------------------------------------------------------------------- edge cases


@pytest.mark.parametrize("table", list(VALID))
def test_empty_tables_fail_without_raising(table):
    report = validate_table(table, VALID[table]().clear(), PARAMS)
    assert not report.success
    assert failure(report, f"{table} is not empty")["observed_value"] == 0
    assert report.failing_rows.is_empty()


def test_quantile_boundaries_length():
    df = set_cell(activations_frame(), 0, "quantile_boundaries", [0.5, 1.0, 2.0])
    report = validate_table("neuron_activations", df, PARAMS)
    fail = only_failure(report, "quantile_boundaries has quantile_bins - 1 = 2 items")
    assert fail["unexpected_values"] == [3]


def test_untyped_null_column_is_cast_to_schema():
    df = explanations_frame().with_columns(pl.lit(None).alias("error"))
    assert df.schema["error"] == pl.Null
    assert validate_table("explanations", df.with_columns(pl.lit("ok").alias("explanation")), PARAMS).success


def test_failing_rows_markdown():
    df = set_cell(simulations_frame(), 5, "expected_activations", [0.0] * (L - 1) + [11.0])
    report = validate_table("simulations", df, PARAMS)
    markdown = report.failing_rows_markdown()
    lines = markdown.splitlines()
    assert lines[0].startswith("| row | model |") and len(lines) == 3
    assert f"({L} items)" in lines[2] and "expected_activations <= 10" in lines[2]
    assert validate_table("simulations", simulations_frame(), PARAMS).failing_rows_markdown() == "(no failing rows)"


# --------------------------------------------------------------------------- output tokens, embeddings


def test_output_tokens_unsorted_short_and_overlapping():
    df = set_cell(output_tokens_frame(), 0, "promoted_logits", [1.0, 2.0, 0.5])
    df = set_cell(df, 1, "suppressed_token_ids", [1, 7])
    df = set_cell(df, 2, "suppressed_logits", [-4.0, -2.5, 2.0])  # above a promoted logit
    report = validate_table("neuron_output_tokens", df, PARAMS)
    assert failing_row_indices(report) == [0, 1, 2]
    assert failure(report, "promoted_logits are highest first")["unexpected_count"] == 1
    assert failure(report, "suppressed_token_ids has as many items as promoted_tokens")["unexpected_count"] == 1
    assert failure(report, "every promoted logit >= every suppressed logit")["unexpected_count"] == 1


def test_output_tokens_coverage_and_nan():
    df = output_tokens_frame().filter(pl.col("neuron") != 1)
    df = set_cell(df, 0, "promoted_logits", [float("nan"), 2.0, 1.5])
    report = validate_table("neuron_output_tokens", df, PARAMS)
    assert failure(report, "promoted_logits are finite")["unexpected_count"] == 1
    assert failure(report, "all 3 expected neurons present in layer 3")


def test_embeddings_not_unit_length_or_mixed_widths():
    df = set_cell(embeddings_frame(), 0, "embedding", [1.0] * 8)
    report = validate_table("explanation_embeddings", df, PARAMS)
    assert only_failure(report, "embedding has unit length")["unexpected_count"] == 1
    mixed = set_cell(embeddings_frame(), 1, "embedding", [1.0, 0.0])
    report = validate_table("explanation_embeddings", mixed, PARAMS)
    assert failure(report, "every embedding has the same width")
