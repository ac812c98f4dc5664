"""Dagster resources: the run's settings, the subject model, and the explainer/simulator LLMs."""


from pathlib import Path

import dagster as dg
from pydantic import PrivateAttr

from neuron_pipeline.config import Settings
from neuron_pipeline.interp.explainer import Explainer
from neuron_pipeline.interp.simulator import Simulator
from neuron_pipeline.llm import make_explainer, make_simulator
from neuron_pipeline.subject import Subject, load_subject


class PipelineSettingsResource(dg.ConfigurableResource):
    """The validated settings (config.py) the definitions were built from, as JSON.

    They hold no secrets: API keys are named by environment variable, never stored."""

    settings_json: str
    _settings: Settings | None = PrivateAttr(default=None)

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            self._settings = Settings.model_validate_json(self.settings_json)
        return self._settings

    @property
    def lake(self) -> Path:
        return self.settings.lake_path

    @classmethod
    def from_settings(cls, settings: Settings) -> "PipelineSettingsResource":
        return cls(settings_json=settings.model_dump_json())


# Loaded models by their settings: the CLI runs several Dagster runs in one process and
# each run builds its resources anew, but the weights only need to be loaded once.
_LOADED_SUBJECTS: dict[str, Subject] = {}


class SubjectModelResource(dg.ConfigurableResource):
    """Loads the subject model once per process and hands it to the steps that need it."""

    pipeline: PipelineSettingsResource

    def load(self) -> Subject:
        subject_settings = self.pipeline.settings.subject
        key = subject_settings.model_dump_json()
        if key not in _LOADED_SUBJECTS:
            _LOADED_SUBJECTS.clear()  # keep at most one model in memory
            _LOADED_SUBJECTS[key] = load_subject(subject_settings)
        return _LOADED_SUBJECTS[key]

    def tokenizer(self):
        return self.load().tokenizer


class LLMResource(dg.ConfigurableResource):
    """Builds the configured explainers and simulators (baseline, local model, or API)."""

    pipeline: PipelineSettingsResource

    def explainers(self) -> list[Explainer]:
        return [make_explainer(e) for e in self.pipeline.settings.explainers]

    def simulators(self) -> list[Simulator]:
        return [make_simulator(s) for s in self.pipeline.settings.simulators]
