"""The one place that defines each lake table's schema.

Every table except ``corpus_tokens`` and the ``evaluations`` report is partitioned by ``layer``, a
*string* column: with an integer partition column the Dagster Delta IO manager silently rewrites
the whole table, and string partition values keep paths (``layer=3``) and predicates uniform across engines.
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
            # What a person reads next to the id: model, prompt version, variant (interp/labels.py).
            ("explainer_label", pa.string()),
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
            ("simulator_label", pa.string()),  # model, prompt version, mode, calibration
            # Null when the simulation succeeded. When the simulator failed (or answered nothing
            # usable) on a neuron, each of its scored excerpts gets a row with the error and null
            # expected_activations: failures are rows anyone can query, and are retried next run.
            ("error", pa.string()),
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
            ("null_reason", pa.string()),  # why score is null, when it is (e.g. "simulation failed: ...")
            ("explainer_label", pa.string()),
            ("simulator_label", pa.string()),
        ]
    ),
    # Detection, fuzzing and embedding scores of each explanation (interp/classification.py): one
    # row per (neuron, explainer id, scorer id), beside `scores` on (layer, neuron, explainer_id).
    "scorer_results": pa.schema(
        [
            ("model", pa.string()),
            ("layer", pa.string()),
            ("neuron", pa.int32()),
            ("explainer_id", pa.string()),
            ("scorer_id", pa.string()),
            ("method", pa.string()),  # detection | fuzzing | embedding
            ("scorer_model", pa.string()),
            # The headline: balanced accuracy (detection, fuzzing) or AUROC (embedding).
            ("score", pa.float64()),
            ("balanced_accuracy", pa.float64()),
            ("f1", pa.float64()),
            ("precision", pa.float64()),
            ("recall", pa.float64()),
            ("auroc", pa.float64()),  # from p(yes) (detection, fuzzing with logprobs) or similarity
            ("n_judged", pa.int64()),  # excerpts that got an answer
            ("n_activating", pa.int64()),  # of those, activating ones (correctly marked, for fuzzing)
            ("n_non_activating", pa.int64()),
            ("failed_groups", pa.int64()),  # groups whose replies stayed malformed or failed
            ("prompt_tokens", pa.int64()),
            ("completion_tokens", pa.int64()),
            ("calls", pa.int64()),  # chat requests, retries included
            ("null_reason", pa.string()),  # why score is null, when it is
            # Fingerprint of (scorer id, explanation, judged excerpts): unchanged inputs are not re-scored.
            ("input_hash", pa.string()),
            # Excerpt by excerpt: the corpus sequence, its label, the answer (null: not judged) and
            # p(yes) or the embedding similarity.
            ("sequence_ids", pa.list_(pa.int64())),
            ("labels", pa.list_(pa.bool_())),
            ("predictions", pa.list_(pa.bool_())),
            ("probabilities", _floats),
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
            ("explainer_label", pa.string()),
            ("simulator_label", pa.string()),
        ]
    ),
    # What each neuron writes to the output, from the weights alone (subject/output_tokens.py):
    # the tokens whose logits its output vector raises most / lowers most, highest first.
    "neuron_output_tokens": pa.schema(
        [
            ("model", pa.string()),
            ("layer", pa.string()),
            ("neuron", pa.int32()),
            ("promoted_tokens", _tokens),
            ("promoted_token_ids", pa.list_(pa.int32())),
            ("promoted_logits", _floats),  # descending
            ("suppressed_tokens", _tokens),
            ("suppressed_token_ids", pa.list_(pa.int32())),
            ("suppressed_logits", _floats),  # ascending (most negative first)
            ("weights_hash", pa.string()),  # fingerprint of the weights: unchanged model, nothing recomputed
        ]
    ),
    # Every explanation embedded for search by meaning (lake/search.py), unit length.
    "explanation_embeddings": pa.schema(
        [
            ("model", pa.string()),
            ("layer", pa.string()),
            ("neuron", pa.int32()),
            ("explainer_id", pa.string()),
            ("embedding_model", pa.string()),
            ("text_hash", pa.string()),  # hash of the embedded text: a changed explanation re-embeds only itself
            ("embedding", _floats),
        ]
    ),
    # The evaluation suite's results (neuron_pipeline/evaluation.py): not partitioned, one row per
    # (check, explainer model, simulator model, prompt) and run; earlier runs stay (created_at).
    "evaluations": pa.schema(
        [
            ("check", pa.string()),  # puzzle_discrimination | puzzle_explanations | planted_recovery | planted_named
            ("explainer_model", pa.string()),
            ("simulator_model", pa.string()),
            ("prompt", pa.string()),  # explainer / simulator prompt template names
            ("explainer_id", pa.string()),
            ("simulator_id", pa.string()),
            ("value", pa.float64()),  # the check's headline figure, a share or a mean score
            ("n", pa.int64()),  # pairs, puzzles or neurons it is over
            ("reference_value", pa.float64()),  # the true explanations' mean score
            ("baseline_value", pa.float64()),  # the no-LLM baseline's on the same items
            ("details", pa.string()),  # JSON: per kind, per puzzle, the explanations written
            ("puzzle_set", pa.string()),
            ("seconds", pa.float64()),
            ("machine", pa.string()),
            ("created_at", pa.timestamp("us", tz="UTC")),
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
    "scorer_results": ["layer", "neuron", "explainer_id", "scorer_id"],
    "layer_summary": ["layer", "explainer_id", "simulator_id"],
    "neuron_output_tokens": ["layer", "neuron"],
    "explanation_embeddings": ["layer", "neuron", "explainer_id"],
    "evaluations": ["created_at", "check", "explainer_model", "simulator_model", "prompt"],
}

# Parquet row groups of this many rows for the tables read one neuron at a time: their rows are
# written sorted by neuron, so a reader skips by the neuron column's min/max instead of decoding a
# whole partition (one neuron's records out of a GPT-2 XL-sized layer: ~0.5 s -> ~35 ms).
NEURON_ROW_GROUP_ROWS = {"activation_records": 16_384, "simulations": 16_384}
