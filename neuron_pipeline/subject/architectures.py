"""Where each decoder architecture keeps its MLP neurons.

An MLP neuron is one coordinate of the hidden vector between the MLP's up- and
down-projection: for GPT-2 and GPT-NeoX the output of ``mlp.act``; for gated MLPs
(Llama, Mistral, Qwen, Gemma) the input of ``down_proj``, i.e. act(gate(x)) * up(x).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch


class UnsupportedModelError(ValueError):
    """The model's architecture has no known MLP hook point."""


@dataclass(frozen=True)
class ArchitectureSpec:
    name: str
    layers_path: str  # attribute path from the *CausalLM to the list of decoder blocks
    neuron_module: str  # path from one block to the module whose input/output is the neuron vector
    capture: Literal["input", "output"]
    # Config attributes that give the number of neurons per layer, first present wins.
    width_attrs: tuple[str, ...] = ("intermediate_size",)


_GATED = dict(layers_path="model.layers", neuron_module="mlp.down_proj", capture="input")

ARCHITECTURES: dict[str, ArchitectureSpec] = {
    "gpt2": ArchitectureSpec("gpt2", "transformer.h", "mlp.act", "output", ("n_inner",)),
    "gpt_neox": ArchitectureSpec("gpt_neox", "gpt_neox.layers", "mlp.act", "output"),
    **{
        name: ArchitectureSpec(name, **_GATED)
        for name in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "olmo", "olmo2", "phi3")
    },
}


def architecture_for(config) -> ArchitectureSpec:
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        supported = ", ".join(sorted(ARCHITECTURES))
        raise UnsupportedModelError(
            f"model type {model_type!r} has no MLP hook support: supported types are {supported}"
        )
    return ARCHITECTURES[model_type]


def num_layers(config) -> int:
    for attr in ("num_hidden_layers", "n_layer"):
        value = getattr(config, attr, None)
        if value:
            return int(value)
    raise UnsupportedModelError(f"cannot tell the number of layers of model type {config.model_type!r}")


def num_neurons(config, spec: ArchitectureSpec | None = None) -> int:
    spec = spec or architecture_for(config)
    for attr in spec.width_attrs:
        value = getattr(config, attr, None)
        if value:
            return int(value)
    if spec.name == "gpt2":  # GPT-2 leaves n_inner unset and uses 4 * n_embd
        return 4 * int(config.n_embd)
    raise UnsupportedModelError(f"cannot tell the MLP width of model type {config.model_type!r}")


def _get_path(root: torch.nn.Module, path: str) -> torch.nn.Module:
    node = root
    for part in path.split("."):
        node = node[int(part)] if part.isdigit() else getattr(node, part)
    return node


def decoder_layers(model: torch.nn.Module, spec: ArchitectureSpec) -> torch.nn.ModuleList:
    return _get_path(model, spec.layers_path)


def neuron_module(model: torch.nn.Module, spec: ArchitectureSpec, layer: int) -> torch.nn.Module:
    return _get_path(decoder_layers(model, spec)[layer], spec.neuron_module)
