"""LLM backends behind the explainer and simulator interfaces of ``interp``.

``make_explainer`` / ``make_simulator`` turn a settings section into an object with the
``Explainer`` / ``Simulator`` interface. The baseline needs no LLM.
"""

from __future__ import annotations

from neuron_pipeline.config import ConfigError, ExplainerSettings, SimulatorSettings
from neuron_pipeline.interp.baseline import BaselineExplainer, BaselineSimulator
from neuron_pipeline.interp.explainer import Explainer
from neuron_pipeline.interp.simulator import Simulator


def make_explainer(settings: ExplainerSettings) -> Explainer:
    if settings.backend == "baseline":
        return BaselineExplainer(max_tokens=settings.baseline_tokens)
    raise ConfigError(f"explainer backend {settings.backend!r} is not available in this build: use 'baseline'")


def make_simulator(settings: SimulatorSettings) -> Simulator:
    if settings.backend == "baseline":
        return BaselineSimulator()
    raise ConfigError(f"simulator backend {settings.backend!r} is not available in this build: use 'baseline'")
