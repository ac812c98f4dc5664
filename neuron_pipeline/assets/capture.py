"""Stage 2: one streaming forward pass -> per-neuron statistics and activation records.

Both tables come out of the same pass, so they are one multi-asset. With a single-run
backfill policy, materializing a range of layers is one run and one forward pass.
"""


import hashlib

import numpy as np
import polars as pl
import dagster as dg

from data_quality import QualityParams
from neuron_pipeline.assets.checks import check_result, combine_reports, gate, quality_check_spec
from neuron_pipeline.assets.metadata import lake_metadata, publish_layer
from neuron_pipeline.assets.progress import track
from neuron_pipeline.assets.versions import capture_data_version
from neuron_pipeline.memory import release_memory
from neuron_pipeline.assets.partitions import GPU_POOL, GPU_TAGS, layers_of
from neuron_pipeline.assets.resources import PipelineSettingsResource, SubjectModelResource
from neuron_pipeline.config import parse_index_spec
from neuron_pipeline.lake import read_table, table_frame, table_path, write_table
from neuron_pipeline.subject import LayerCapture, iter_captures
from neuron_pipeline.subject.capture import plan_capture


def stats_frame(capture: LayerCapture, model_id: str, corpus_hash: str) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "model": model_id,
            "layer": str(capture.layer),
            "neuron": capture.neurons.astype(np.int32),
            "count": np.full(len(capture.neurons), capture.count, dtype=np.int64),
            "mean": capture.mean,
            "variance": capture.variance,
            "max": capture.max.astype(np.float32),
            "min": capture.min.astype(np.float32),
            "frac_positive": capture.frac_positive,
            "quantile_boundaries": [list(map(float, col)) for col in capture.quantile_boundaries.T]
            if capture.quantile_boundaries.size
            else [[] for _ in capture.neurons],
            "corpus_hash": corpus_hash,
        }
    )


def records_frame(capture: LayerCapture, model_id: str, sequence_tokens: pl.DataFrame) -> pl.DataFrame:
    """Rows of activation_records for one layer; ``sequence_tokens`` maps sequence_id -> tokens."""
    parts = []
    for kind, sample in capture.samples.items():
        ranks, positions = np.nonzero(sample["sequence_id"] >= 0)
        if len(ranks) == 0:
            continue
        activations = sample["activations"][ranks, :, positions]  # [rows, T]
        if kind == "quantile":
            per_bin = int(sample["bin_rank"].max()) + 1 if sample["bin_rank"].size else 1
            bins = sample["quantile_bin"][ranks, positions]
            rank = bins * per_bin + sample["bin_rank"][ranks, positions]
            quantile_bin = pl.Series(bins.astype(np.int32))
        else:
            rank = ranks
            quantile_bin = pl.Series([None] * len(ranks), dtype=pl.Int32)
        parts.append(
            pl.DataFrame(
                {
                    "neuron": capture.neurons[positions].astype(np.int32),
                    "kind": kind,
                    "rank": rank.astype(np.int32),
                    "quantile_bin": quantile_bin,
                    "sequence_id": sample["sequence_id"][ranks, positions].astype(np.int64),
                    "activations": pl.Series(activations.astype(np.float32)).cast(pl.List(pl.Float32)),
                    "max_activation": sample["max_activation"][ranks, positions].astype(np.float32),
                }
            )
        )
    if not parts:
        return table_frame("activation_records", [])
    frame = (
        pl.concat(parts)
        .join(sequence_tokens, on="sequence_id", how="left")
        .with_columns(model=pl.lit(model_id), layer=pl.lit(str(capture.layer)))
        .sort("neuron", "kind", "rank")
    )
    return table_frame("activation_records", frame)


def build(partitions: dg.PartitionsDefinition, op_tags: dict | None = None) -> dg.AssetsDefinition:
    """The capture asset over the given layer partitions."""

    @dg.multi_asset(
        partitions_def=partitions,
        specs=[
            dg.AssetSpec(
                "neuron_activations",
                deps=["corpus_tokens"],
                group_name="capture",
                kinds={"pytorch", "delta"},
                owners=["team:interpretability"],
                description="Per-neuron activation statistics over the corpus: count, mean, variance, max, min, "
                "fraction > 0, quantile boundaries of excerpt maxima.",
            ),
            dg.AssetSpec(
                "activation_records",
                deps=["corpus_tokens"],
                group_name="capture",
                kinds={"pytorch", "delta"},
                owners=["team:interpretability"],
                description="Per neuron: top-activating excerpts, a uniform random sample, and samples from "
                "quantile bins of excerpt max activation; tokens and activations per excerpt.",
            ),
        ],
        check_specs=[quality_check_spec("neuron_activations"), quality_check_spec("activation_records")],
        backfill_policy=dg.BackfillPolicy.single_run(),
        pool=GPU_POOL,
        op_tags=GPU_TAGS if op_tags is None else op_tags,
        code_version="capture-v1",
    )
    def capture(
        context: dg.AssetExecutionContext, pipeline: PipelineSettingsResource, subject_model: SubjectModelResource
    ):
        settings = pipeline.settings
        lake = pipeline.lake
        layers = layers_of(context)
        subject = subject_model.load()
        neurons = parse_index_spec(settings.neurons, subject.num_neurons, "neuron")
        corpus = read_table(lake, "corpus_tokens", columns=["sequence_id", "token_ids", "tokens", "model"])
        if corpus.is_empty():
            raise ValueError("corpus_tokens is empty: materialize corpus_tokens first")
        if corpus["model"][0] != subject.model_id:
            raise ValueError(
                f"corpus_tokens was tokenized for {corpus['model'][0]!r}, not {subject.model_id!r}: "
                "re-materialize corpus_tokens"
            )
        corpus = corpus.sort("sequence_id")
        token_ids = np.stack(corpus["token_ids"].to_numpy())
        # Fingerprint of exactly what was captured over, stored with the statistics.
        corpus_hash = hashlib.sha256(token_ids.astype(np.int32).tobytes()).hexdigest()[:16]

        context.log.info(
            f"capturing layers {layers} x {len(neurons)} neurons over {token_ids.size} tokens on {subject.device}"
        )
        plan = plan_capture(
            layers, len(neurons), token_ids.shape[1], len(token_ids), settings.records,
            settings.capture.activation_dtype, settings.capture.max_memory_gb,
        )
        context.log.info(plan.describe())
        sequence_tokens = corpus.select("sequence_id", "tokens")
        del corpus
        params = QualityParams.from_settings(
            settings, expected_neurons=neurons, corpus_tokens=int(token_ids.size), corpus_sequences=len(token_ids)
        )
        stats_reports, records_reports = [], []
        n_stats = n_records = 0
        with track(total=len(token_ids) * len(plan.passes), stage="capture", layer=layers, unit="sequence") as bar:
            captures = iter_captures(
                subject, token_ids, layers, neurons, settings.records, settings.subject.batch_size, progress=bar.update,
                passes=plan.passes, activation_dtype=settings.capture.activation_dtype,
            )
            # Each layer as soon as the pass is done: its two tables built, validated (both before
            # either is written: bad rows never land), written, and freed before the next layer.
            for layer, layer_capture in captures:
                stats = stats_frame(layer_capture, subject.model_id, corpus_hash)
                records = records_frame(layer_capture, subject.model_id, sequence_tokens)
                del layer_capture
                stats_reports.append((yield from gate("neuron_activations", stats, params)))
                records_reports.append((yield from gate("activation_records", records, params)))
                write_table(lake, "neuron_activations", stats, replace_where={"layer": str(layer)})
                write_table(lake, "activation_records", records, replace_where={"layer": str(layer)})
                publish_layer(context, "neuron_activations", layer, stats, expected_neurons=len(neurons))
                publish_layer(context, "activation_records", layer, records, expected_neurons=len(neurons))
                n_stats += stats.height
                n_records += records.height
                del stats, records
                release_memory()
        stats_report = combine_reports("neuron_activations", stats_reports)
        records_report = combine_reports("activation_records", records_reports)
        del subject, captures
        subject_model.release_unless_needed_by(context, "neuron_output_tokens")

        common = {
            "layers": str(layers),
            "neurons_per_layer": len(neurons),
            "tokens": int(token_ids.size),
            "corpus_hash": corpus_hash,
            "forward_passes": len(plan.passes),
            "capture_mib_per_layer": round(plan.bytes_per_layer / 2**20, 2),
            "capture_plan": plan.describe(),
        }
        # The same tokens and recipe give the same data: downstream is not made stale by a re-run.
        data_version = capture_data_version(settings, corpus_hash)
        yield dg.MaterializeResult(
            asset_key="neuron_activations",
            metadata={**common, "rows": n_stats, **lake_metadata(lake, "neuron_activations")},
            check_results=[check_result(stats_report)],
            data_version=data_version,
        )
        yield dg.MaterializeResult(
            asset_key="activation_records",
            metadata={**common, "records": n_records, **lake_metadata(lake, "activation_records")},
            check_results=[check_result(records_report)],
            data_version=data_version,
        )

    return capture
