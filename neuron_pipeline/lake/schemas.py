"""The one place that defines each lake table's schema.

Every table except ``corpus_tokens`` is partitioned by ``layer``, a *string* column: with an
integer partition column the Dagster Delta IO manager silently rewrites the whole table, and
string partition values keep paths (``layer=3``) and predicates uniform across engines.
"""

from __future__ import annotations

import pyarrow as pa

PARTITION_COLUMN = "layer"

_tokens = pa.list_(pa.string())
_floats = pa.list_(pa.float32())

SCHEMAS: dict[str, pa.Schema] = {
    "corpus_tokens": pa.schema(
        [
            ("model", pa.string()),  # whose tokenizer cut the sequences
            ("corpus", pa.string()),
            ("sequence_id", pa.int64()),
            ("token_ids", pa.list_(pa.int32())),
            ("tokens", _tokens),
            ("text", pa.string()),
        ]
    ),
    "neuron_activations": pa.schema(
        [
            ("model", pa.string()),
            ("layer", pa.string()),
            ("neuron", pa.int32()),
            ("count", pa.int64()),
            ("mean", pa.float64()),
            ("variance", pa.float64()),
            ("max", pa.float32()),
            ("min", pa.float32()),
            ("frac_positive", pa.float64()),
            # Boundaries between the quantile bins of per-excerpt max activation.
            ("quantile_boundaries", _floats),
            ("corpus_hash", pa.string()),
        ]
    ),
    "activation_records": pa.schema(
        [
            ("model", pa.string()),
            ("layer", pa.string()),
            ("neuron", pa.int32()),
            ("kind", pa.string()),  # top | random | quantile
            ("rank", pa.int32()),
            ("quantile_bin", pa.int32()),  # null unless kind == quantile
            ("sequence_id", pa.int64()),
            ("tokens", _tokens),
            ("activations", _floats),
            ("max_activation", pa.float32()),
        ]
    ),
    "explanations": pa.schema(
        [
            ("model", pa.string()),
            ("layer", pa.string()),
            ("neuron", pa.int32()),
            ("explainer_id", pa.string()),
            ("explainer_model", pa.string()),
            ("prompt_hash", pa.string()),
            ("explanation", pa.string()),
            ("prompt_tokens", pa.int64()),
            ("completion_tokens", pa.int64()),
            ("error", pa.string()),  # null when the explanation succeeded
            # Fingerprint of the excerpts the explainer saw: unchanged inputs are never re-paid.
            ("records_hash", pa.string()),
            ("created_at", pa.timestamp("us", tz="UTC")),
        ]
    ),
    "simulations": pa.schema(
        [
            ("model", pa.string()),
            ("layer", pa.string()),
            ("neuron", pa.int32()),
            ("explainer_id", pa.string()),
            ("simulator_id", pa.string()),
            ("kind", pa.string()),  # top | random
            ("rank", pa.int32()),
            ("sequence_id", pa.int64()),
            ("tokens", _tokens),
            ("true_activations", _floats),
            ("expected_activations", _floats),
            ("mode", pa.string()),  # how the simulator produced its values
            ("input_hash", pa.string()),  # fingerprint of (explanation, excerpt tokens)
            ("prompt_tokens", pa.int64()),  # cost of simulating this excerpt (0 for the baseline)
            ("completion_tokens", pa.int64()),
            # Share of the 0-10 value tokens' probability mass the simulator saw, mean over the
            # excerpt's slots: 1.0 locally, lower when a top-k API dropped values (a lower bound
            # there); null without logprobs (baseline, chat integers).
            ("value_mass", pa.float64()),
        ]
    ),
    "scores": pa.schema(
        [
            ("model", pa.string()),
            ("layer", pa.string()),
            ("neuron", pa.int32()),
            ("explainer_id", pa.string()),
            ("simulator_id", pa.string()),
            ("score", pa.float64()),  # pooled correlation over scored top + random excerpts
            ("score_top", pa.float64()),
            ("score_random", pa.float64()),
            ("rsquared", pa.float64()),
            ("absolute_dev_explained", pa.float64()),
            ("n_tokens", pa.int64()),
            ("null_reason", pa.string()),  # why score is null, when it is
        ]
    ),
    "layer_summary": pa.schema(
        [
            ("model", pa.string()),
            ("layer", pa.string()),
            ("explainer_id", pa.string()),
            ("simulator_id", pa.string()),
            ("explainer_model", pa.string()),
            ("neurons_scored", pa.int64()),
            ("neurons_null", pa.int64()),
            ("mean_score", pa.float64()),
            ("median_score", pa.float64()),
            ("p90_score", pa.float64()),
            ("frac_score_ge_0_8", pa.float64()),
            ("best_neuron", pa.int32()),
            ("best_score", pa.float64()),
            ("best_explanation", pa.string()),
            # Mean score of the no-LLM baseline (baseline explainer + simulator) on the same
            # neurons: the floor each explainer is read against.
            ("baseline_mean_score", pa.float64()),
            # LLM cost of this layer's explanations and their simulations under this pair.
            ("explainer_prompt_tokens", pa.int64()),
            ("explainer_completion_tokens", pa.int64()),
            ("simulator_prompt_tokens", pa.int64()),
            ("simulator_completion_tokens", pa.int64()),
        ]
    ),
}

PARTITIONED_TABLES = [name for name, schema in SCHEMAS.items() if PARTITION_COLUMN in schema.names]

# Rows are unique on these columns; writes replace whole slices keyed by a prefix of them.
KEYS: dict[str, list[str]] = {
    "corpus_tokens": ["sequence_id"],
    "neuron_activations": ["layer", "neuron"],
    "activation_records": ["layer", "neuron", "kind", "rank"],
    "explanations": ["layer", "neuron", "explainer_id"],
    "simulations": ["layer", "neuron", "explainer_id", "simulator_id", "kind", "rank"],
    "scores": ["layer", "neuron", "explainer_id", "simulator_id"],
    "layer_summary": ["layer", "explainer_id", "simulator_id"],
}

# Parquet row groups of this many rows for the tables read one neuron at a time: their rows are
# written sorted by neuron, so a reader skips by the neuron column's min/max instead of decoding a
# whole partition (one neuron's records out of a GPT-2 XL-sized layer: ~0.5 s -> ~35 ms).
NEURON_ROW_GROUP_ROWS = {"activation_records": 16_384, "simulations": 16_384}
