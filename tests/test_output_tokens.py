"""neuron_output_tokens: each neuron's promoted / suppressed tokens from the weights alone.

On a tiny randomly initialised model of every supported architecture (the same configs as the
hook-point tests), the stored tokens and logit weights must equal a manual computation that
runs each neuron's unit activation through the block's own output module, the post-MLP norm
(where there is one), the final norm (its bias and its scale removed) and the unembedding.
"""

from __future__ import annotations

import dagster as dg
import huggingface_hub.constants
import numpy as np
import polars as pl
import pytest
import torch

from neuron_pipeline.config import SubjectSettings
from neuron_pipeline.definitions import build_definitions
from neuron_pipeline.lake import open_table, read_table
from neuron_pipeline.subject import load_subject
from neuron_pipeline.subject.output_tokens import (
    Unembedding,
    folded_output_vectors,
    layer_output_tokens,
    top_output_tokens,
)

from conftest import small_settings
from test_architectures import CONFIGS, LAYERS, save_tiny

K = 20
# Final norms that subtract the mean (LayerNorm); the others are RMSNorms.
CENTRED = {"gpt2", "gpt_neox", "olmo"}
OUTPUT_MODULE = {"gpt2": "c_proj", "gpt_neox": "dense_4h_to_h"}


@pytest.fixture(autouse=True)
def offline_hub(monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-output-models")
    return {name: save_tiny(name, root / f"tiny-{name}", seed=1) for name in CONFIGS}


def _through_norm(norm: torch.nn.Module, vectors: torch.Tensor, centred: bool) -> torch.Tensor:
    """The norm's linear part on each row: its output less its bias, times the row's own scale
    (the norm divides by it), i.e. gain * (centred) vector."""
    eps = getattr(norm, "variance_epsilon", None) or getattr(norm, "eps", None) or 1e-5
    base = vectors - vectors.mean(-1, keepdim=True) if centred else vectors
    scale = (base.pow(2).mean(-1, keepdim=True) + eps).sqrt()
    return (norm(vectors) - norm(torch.zeros_like(vectors[:1]))) * scale


def manual_logits(model_type: str, subject, layer: int) -> torch.Tensor:
    """[neurons, vocab] by hand: unit activation -> output module -> norms -> unembedding."""
    block = subject.layers()[layer]
    module = getattr(block.mlp, OUTPUT_MODULE.get(model_type, "down_proj"))
    width = subject.num_neurons
    with torch.inference_mode():
        unit = torch.eye(width)
        vectors = module(unit) - module(torch.zeros(1, width))  # what one unit of each neuron adds
        post = getattr(block, "post_feedforward_layernorm", None)
        if post is not None:
            vectors = _through_norm(post, vectors, centred=False)
        final = subject.model.base_model
        final_norm = next(getattr(final, n) for n in ("norm", "ln_f", "final_layer_norm") if hasattr(final, n))
        vectors = _through_norm(final_norm, vectors, centred=model_type in CENTRED)
        return vectors @ subject.model.lm_head.weight.T if hasattr(subject.model, "lm_head") else (
            vectors @ subject.model.get_output_embeddings().weight.T
        )


@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_output_tokens_equal_manual_computation(model_type, tiny_dirs):
    subject = load_subject(SubjectSettings(model=str(tiny_dirs[model_type]), device="cpu"))
    for layer in range(LAYERS):
        result = layer_output_tokens(subject, layer, K)
        logits = manual_logits(model_type, subject, layer)
        values, ids = logits.topk(K, dim=1)
        low_values, low_ids = logits.topk(K, dim=1, largest=False)
        assert result.promoted_ids.shape == (subject.num_neurons, K)
        np.testing.assert_array_equal(result.promoted_ids, ids.numpy(), err_msg=f"{model_type} layer {layer}")
        np.testing.assert_array_equal(result.suppressed_ids, low_ids.numpy(), err_msg=f"{model_type} layer {layer}")
        np.testing.assert_allclose(result.promoted_logits, values.numpy(), rtol=1e-3, atol=1e-4)
        np.testing.assert_allclose(result.suppressed_logits, low_values.numpy(), rtol=1e-3, atol=1e-4)
        # Not a degenerate case: the logits spread, and neurons differ from each other.
        assert values[:, 0].std() > 0 and (values[:, 0] - low_values[:, 0]).min() > 0


def test_bfloat16_candidates_give_the_float32_top_tokens():
    """The fast path (bf16 logits, exact re-ranking of candidates) against a plain float32 top-k
    on a vocabulary much larger than the candidates."""
    generator = torch.Generator().manual_seed(0)
    vectors = torch.randn(300, 64, generator=generator)
    unembed = torch.randn(20_000, 64, generator=generator)
    promoted_ids, promoted, suppressed_ids, suppressed = top_output_tokens(vectors, unembed, K, chunk=128)
    exact = vectors @ unembed.T
    values, ids = exact.topk(K, dim=1)
    low_values, low_ids = exact.topk(K, dim=1, largest=False)
    np.testing.assert_array_equal(promoted_ids, ids.numpy())
    np.testing.assert_array_equal(suppressed_ids, low_ids.numpy())
    np.testing.assert_allclose(promoted, values.numpy(), atol=1e-4)
    np.testing.assert_allclose(suppressed, low_values.numpy(), atol=1e-4)


def test_asset_fills_every_neuron_of_its_layers_once_per_model(tmp_path):
    settings = small_settings(tmp_path / "lake", layers="0-1")
    defs = build_definitions(settings)
    instance = dg.DagsterInstance.ephemeral()

    def materialize():
        return dg.materialize(
            list(defs.assets),
            selection=[dg.AssetKey("neuron_output_tokens")],
            resources=defs.resources,
            instance=instance,
            tags={"dagster/asset_partition_range_start": "0", "dagster/asset_partition_range_end": "1"},
        )

    assert materialize().success
    lake = settings.lake_location
    rows = read_table(lake, "neuron_output_tokens")
    assert sorted(rows["layer"].unique().to_list()) == ["0", "1"]
    assert rows.group_by("layer").len()["len"].to_list() == [1536, 1536]  # every neuron, not just the run's 0-7
    assert (rows["promoted_tokens"].list.len() == K).all() and (rows["suppressed_logits"].list.len() == K).all()
    # Token strings are the tokenizer's decoding of the stored ids.
    subject = load_subject(settings.subject)
    first = rows.filter((pl.col("layer") == "1") & (pl.col("neuron") == 3)).row(0, named=True)
    assert first["promoted_tokens"] == [subject.tokenizer.decode([i]) for i in first["promoted_token_ids"]]
    # And the logits are the float32 computation's, on the real bundled model.
    unembed = Unembedding.of(subject)
    exact = folded_output_vectors(subject, 1) @ unembed.weight.T
    layer1 = rows.filter(pl.col("layer") == "1").sort("neuron")
    chosen = np.take_along_axis(exact.numpy(), np.stack(layer1["promoted_token_ids"].to_numpy()).astype(np.int64), axis=1)
    np.testing.assert_allclose(chosen, exact.topk(K, dim=1).values.numpy(), atol=1e-4)

    version = open_table(lake, "neuron_output_tokens").version()
    second = materialize()
    assert second.success
    assert open_table(lake, "neuron_output_tokens").version() == version  # same weights: nothing recomputed or written
    events = second.get_asset_materialization_events()
    assert {e.partition for e in events} == {"0", "1"}
    assert all(e.materialization.metadata["layers_unchanged"].value == "[0, 1]" for e in events)


def test_the_subject_model_is_let_go_after_the_last_step_of_a_run_that_loads_it(tmp_path, monkeypatch):
    """Within a run the capture keeps the loaded model for the output tokens; the last of the two
    in the run lets it go, so the stages after them do not carry the weights (a whole-model run's
    memory after the capture is then flat in the number of layers; BENCHMARKS.md)."""
    from neuron_pipeline.assets import resources

    settings = small_settings(tmp_path / "lake", layers="0-1")
    defs = build_definitions(settings)
    instance = dg.DagsterInstance.ephemeral()
    tags = {"dagster/asset_partition_range_start": "0", "dagster/asset_partition_range_end": "1"}
    seen = {}
    real_release = resources.SubjectModelResource.release_unless_needed_by

    def spy(self, context, *later):
        seen.setdefault(context.op_def.name, []).append(bool(resources._LOADED_SUBJECTS))
        real_release(self, context, *later)
        seen[context.op_def.name].append(bool(resources._LOADED_SUBJECTS))

    def run(*keys):
        seen.clear()
        result = dg.materialize(
            list(defs.assets), selection=[dg.AssetKey(k) for k in keys], resources=defs.resources, instance=instance, tags=tags
        )
        assert result.success
        return dict(seen)

    monkeypatch.setattr(resources.SubjectModelResource, "release_unless_needed_by", spy)
    assert dg.materialize(list(defs.assets), selection=[dg.AssetKey("corpus_tokens")], resources=defs.resources, instance=instance).success
    # capture and output tokens in one run: the capture keeps the model, the output tokens let it go
    both = run("activation_records", "neuron_activations", "neuron_output_tokens")
    assert both == {"capture": [True, True], "neuron_output_tokens": [True, False]}, both
    # the capture alone is the run's last user of the model
    assert run("activation_records", "neuron_activations") == {"capture": [True, False]}
    assert not resources._LOADED_SUBJECTS
