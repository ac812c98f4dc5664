"""What each MLP neuron writes to the output: the tokens it promotes and suppresses, from the
weights alone (no corpus pass).

A neuron's output vector ``w`` is what the MLP adds to the residual stream per unit of its
activation: row ``j`` of GPT-2's ``c_proj`` (a Conv1D, weight [neurons, hidden]), column ``j``
of ``down_proj`` (Llama family) or ``dense_4h_to_h`` (GPT-NeoX). It is read through the final
norm the way TransformerLens folds it into the unembedding (``fold_ln``) and Neuronpedia's logit
weights are computed:

    logits = W_U (g * w)             RMSNorm (Gemma's (1 + weight) included)
    logits = W_U (g * (w - mean w))  LayerNorm (it removes the mean of any direction)

``g`` is the norm's learned gain. The norm's division by the residual's scale is a positive
number that depends on the whole residual stream, not on the neuron, so it is left out (token
rankings do not change), and so is the norm's bias (the same for every neuron). Architectures
with a norm after the MLP (Gemma 2/3, OLMo 2) get that norm's gain applied as well.

The gain is read off the norm module itself by probing it (``norm_gain``), so every norm class
of every supported architecture is handled by one code path.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch

from neuron_pipeline.subject.architectures import ArchitectureSpec, _get_path

# Per architecture, the module of one decoder block whose weight holds the neurons' output
# vectors (default: the gated MLP's down_proj).
OUTPUT_MODULES = {"gpt2": "mlp.c_proj", "gpt_neox": "mlp.dense_4h_to_h"}
# A norm applied to the MLP's output inside the block, before the residual add.
POST_MLP_NORMS = ("post_feedforward_layernorm",)
# The final norm, as an attribute of the base model (GPT2Model.ln_f, LlamaModel.norm, ...).
FINAL_NORMS = ("norm", "ln_f", "final_layer_norm")
NORM_HANDLING = "final-norm gain folded in (TransformerLens fold_ln); LayerNorm centres; scale and bias left out"
# Tokens kept per neuron and direction (Neuronpedia shows 10; the output-aware explainer reads 10).
OUTPUT_TOKENS_K = 20
# Candidates per neuron taken from the bfloat16 logits before the exact float32 re-ranking.
MIN_CANDIDATES = 64


@dataclass(frozen=True)
class LayerOutputTokens:
    """Top promoted / suppressed token ids and their logit weights, one row per neuron."""

    layer: int
    neurons: np.ndarray  # [n]
    promoted_ids: np.ndarray  # [n, k] int64, highest logit first
    promoted_logits: np.ndarray  # [n, k] float32
    suppressed_ids: np.ndarray  # [n, k] int64, most negative logit first
    suppressed_logits: np.ndarray  # [n, k] float32
    weights_hash: str  # fingerprint of the weights these come from


def _output_module(block: torch.nn.Module, spec: ArchitectureSpec) -> torch.nn.Module:
    return _get_path(block, OUTPUT_MODULES.get(spec.name, "mlp.down_proj"))


def output_vectors(subject, layer: int) -> torch.Tensor:
    """[neurons, hidden] float32: what each neuron adds to the residual stream per unit activation."""
    module = _output_module(subject.layers()[layer], subject.spec)
    weight = module.weight.detach().float().cpu()
    # nn.Linear stores [out, in] = [hidden, neurons]; transformers' Conv1D stores [in, out].
    return weight.T if isinstance(module, torch.nn.Linear) else weight


def final_norm(model: torch.nn.Module) -> torch.nn.Module:
    base = model.base_model
    for name in FINAL_NORMS:
        module = getattr(base, name, None)
        if isinstance(module, torch.nn.Module):
            return module
    raise ValueError(f"{type(base).__name__} has no final norm among {FINAL_NORMS}")


def post_mlp_norm(block: torch.nn.Module) -> torch.nn.Module | None:
    for name in POST_MLP_NORMS:
        module = getattr(block, name, None)
        if isinstance(module, torch.nn.Module):
            return module
    return None


def _alternating(hidden: int, offset: int, **kwargs) -> torch.Tensor:
    """A zero-mean probe: +1, -1, +1, ... over an even run of coordinates starting at ``offset``."""
    probe = torch.zeros(hidden, **kwargs)
    span = hidden - hidden % 2
    probe[offset : offset + span] = torch.tensor([1.0, -1.0]).repeat(span // 2).to(probe)
    return probe


@torch.inference_mode()
def norm_gain(norm: torch.nn.Module, hidden: int) -> tuple[torch.Tensor, bool]:
    """(gain [hidden], centres) of a LayerNorm or RMSNorm module, read off the module by probing.

    The norm of the all-ones vector, less the bias (the norm of zeros), is the gain for an
    RMSNorm and zero for a LayerNorm (which centres it away): that tells them apart. The gain is
    the norm of a zero-mean +-1 probe (which both kinds leave at unit scale) less the bias, times
    the probe. An odd width takes a second probe shifted by one for the last coordinate."""
    param = next(norm.parameters(), None)
    kwargs = {"dtype": param.dtype, "device": param.device} if param is not None else {}

    def respond(x: torch.Tensor) -> torch.Tensor:
        return norm(x[None]).float()[0].cpu()

    bias = respond(torch.zeros(hidden, **kwargs))
    ones_response = respond(torch.ones(hidden, **kwargs)) - bias
    gain = torch.zeros(hidden)
    for offset in sorted({0, hidden % 2}, reverse=True):  # the unshifted probe wins where both cover
        probe = _alternating(hidden, offset, **kwargs)
        rms = float(probe.float().pow(2).mean().sqrt())
        covered = probe.float().cpu() != 0
        gain[covered] = ((respond(probe) - bias) * probe.float().cpu() * rms)[covered]
    centres = bool(ones_response.abs().max() <= 1e-3 * max(float(gain.abs().max()), 1e-12))
    return gain, centres


def _fold(vectors: torch.Tensor, gain: torch.Tensor, centres: bool) -> torch.Tensor:
    if centres:
        vectors = vectors - vectors.mean(dim=1, keepdim=True)
    return vectors * gain


def folded_output_vectors(subject, layer: int) -> torch.Tensor:
    """[neurons, hidden]: output vectors through the post-MLP norm (if any) and the final norm."""
    vectors = output_vectors(subject, layer)
    hidden = vectors.shape[1]
    post = post_mlp_norm(subject.layers()[layer])
    if post is not None:
        vectors = _fold(vectors, *norm_gain(post, hidden))
    return _fold(vectors, *norm_gain(final_norm(subject.model), hidden))


def _hash_tensors(*tensors: torch.Tensor) -> str:
    digest = hashlib.blake2b(digest_size=16)
    for tensor in tensors:
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def top_output_tokens(
    vectors: torch.Tensor, unembed: torch.Tensor, k: int, chunk: int = 1024, exact_chunk: int = 256
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Exact top-k promoted and suppressed tokens of ``unembed @ v`` for every row v of ``vectors``.

    The full [neurons, vocab] logits are computed in bfloat16 (AMX / tensor cores: several times
    faster than float32), and the top ``max(64, 4k)`` candidates per neuron are re-scored exactly
    in float32 and re-ranked. The bfloat16 error (about 2^-8 of a logit's scale) is far smaller
    than the gap between the k-th and the 4k-th logit, so the ids and values are the float32
    computation's (checked against it on every layer of the bundled model and on tiny models of
    every architecture in tests/test_output_tokens.py).
    Returns (promoted ids, promoted logits, suppressed ids, suppressed logits)."""
    vectors = vectors.float().cpu().contiguous()  # a transposed view makes the gathers below 10x slower
    unembed = unembed.float().cpu().contiguous()
    n, vocab = vectors.shape[0], unembed.shape[0]
    k = min(k, vocab)
    candidates = min(vocab, max(MIN_CANDIDATES, 4 * k))
    unembed_bf16 = unembed.to(torch.bfloat16)
    out = {sign: (np.zeros((n, k), dtype=np.int64), np.zeros((n, k), dtype=np.float32)) for sign in (1.0, -1.0)}
    for start in range(0, n, chunk):
        block = vectors[start : start + chunk]
        logits = block.to(torch.bfloat16) @ unembed_bf16.T  # [c, vocab]
        for sign, (ids_out, values_out) in out.items():
            _, cand_ids = logits.topk(candidates, dim=1, largest=sign > 0, sorted=False)  # [c, C]
            exact = torch.cat([
                torch.einsum("cd,ckd->ck", block[i : i + exact_chunk], unembed[cand_ids[i : i + exact_chunk]])
                for i in range(0, block.shape[0], exact_chunk)
            ]) * sign
            best, order = exact.topk(k, dim=1, sorted=True)
            best_ids = cand_ids.gather(1, order)
            ids_out[start : start + block.shape[0]] = best_ids.numpy()
            values_out[start : start + block.shape[0]] = (sign * best).numpy()
    return out[1.0][0], out[1.0][1], out[-1.0][0], out[-1.0][1]


@dataclass(frozen=True)
class Unembedding:
    """The unembedding matrix [vocab, hidden] (float32, CPU) and its fingerprint, read once per model."""

    weight: torch.Tensor
    hash: str

    @classmethod
    def of(cls, subject) -> "Unembedding":
        weight = subject.model.get_output_embeddings().weight.detach().float().cpu()
        return cls(weight, _hash_tensors(weight))


def layer_weights_hash(vectors: torch.Tensor, unembed: Unembedding) -> str:
    """Fingerprint of everything a layer's output tokens come from: the folded output vectors
    (output weights and norm gains) and the unembedding. The same model gives the same hash."""
    return _hash_tensors(vectors) + unembed.hash[:8]


def layer_output_tokens(subject, layer: int, k: int = OUTPUT_TOKENS_K, unembed: Unembedding | None = None) -> LayerOutputTokens:
    """Top ``k`` promoted and suppressed tokens of every neuron of ``layer``."""
    unembed = unembed or Unembedding.of(subject)
    vectors = folded_output_vectors(subject, layer)
    promoted_ids, promoted, suppressed_ids, suppressed = top_output_tokens(vectors, unembed.weight, k)
    return LayerOutputTokens(
        layer=layer,
        neurons=np.arange(vectors.shape[0]),
        promoted_ids=promoted_ids,
        promoted_logits=promoted,
        suppressed_ids=suppressed_ids,
        suppressed_logits=suppressed,
        weights_hash=layer_weights_hash(vectors, unembed),
    )
