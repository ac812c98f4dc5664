"""The model being explained: loading, MLP-neuron hook points per architecture, capture."""

from neuron_pipeline.subject.architectures import ARCHITECTURES, ArchitectureSpec, UnsupportedModelError
from neuron_pipeline.subject.capture import LayerCapture, NonFiniteActivationsError, capture_layers, iter_captures
from neuron_pipeline.subject.loading import (
    BUNDLED_MODELS,
    Subject,
    SubjectInfo,
    SubjectLoadError,
    describe_subject,
    load_subject,
    resolve_device,
)

__all__ = [
    "ARCHITECTURES",
    "ArchitectureSpec",
    "BUNDLED_MODELS",
    "LayerCapture",
    "NonFiniteActivationsError",
    "Subject",
    "SubjectInfo",
    "SubjectLoadError",
    "UnsupportedModelError",
    "capture_layers",
    "describe_subject",
    "iter_captures",
    "load_subject",
    "resolve_device",
]
