"""neuron-pipeline: explain every MLP neuron of a language model, as a data platform."""

__version__ = "0.1.0"
