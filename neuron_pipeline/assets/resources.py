"""Dagster resources: the run's settings, the subject model, and the explainer/simulator LLMs."""

import hashlib
import re
from pathlib import Path

import dagster as dg
from pydantic import PrivateAttr

from neuron_pipeline.config import ExplainerSettings, ScorerSettings, Settings, SimulatorSettings, cache_dir
from neuron_pipeline.interp.explainer import Explainer
from neuron_pipeline.interp.simulator import Simulator
from neuron_pipeline.lake import Lake
from neuron_pipeline.llm import LLMCache, make_explainer, make_scorer, make_simulator
from neuron_pipeline.memory import release_memory
from neuron_pipeline.subject import Subject, load_subject


class PipelineSettingsResource(dg.ConfigurableResource):
    """The validated settings (config.py) the definitions were built from, as JSON.

    They hold no secrets: API keys and object-store credentials are read from environment
    variables, never stored."""

    settings_json: str
    _settings: Settings | None = PrivateAttr(default=None)

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            self._settings = Settings.model_validate_json(self.settings_json)
        return self._settings

    @property
    def lake(self) -> Lake:
        return self.settings.lake_location

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

    def release_unless_needed_by(self, context: dg.AssetExecutionContext, *later: str) -> None:
        """Let the weights go when no asset of ``later`` (steps after this one that load the model)
        is in this run. In a whole-model run the capture pages in every layer's weights (its
        forward pass stops at the range's deepest layer), so the stages after it would otherwise
        carry the model, and more of it in a run of more layers (BENCHMARKS.md, "A whole model on
        one machine"). The caller drops its own references first; a later run loads it again."""
        # The assets this run executes (the run's own asset_selection is empty for an ad-hoc
        # selection; the job's asset layer holds it). Unknown: keep the model.
        selection = getattr(context.job_def.asset_layer, "selected_asset_keys", None)
        if later and (selection is None or any(dg.AssetKey(name) in selection for name in later)):
            return
        _LOADED_SUBJECTS.clear()
        release_memory()


class LLMResource(dg.ConfigurableResource):
    """Builds the configured explainers and simulators (baseline, local model, or API), with
    every LLM call going through the persistent cache (``llm_cache_path``)."""

    pipeline: PipelineSettingsResource
    _explainers: list | None = PrivateAttr(default=None)
    _simulators: list | None = PrivateAttr(default=None)
    _scorers: list | None = PrivateAttr(default=None)
    _cache: LLMCache | None = PrivateAttr(default=None)

    @property
    def cache(self) -> LLMCache:
        if self._cache is None:
            self._cache = LLMCache(llm_cache_path(self.pipeline.lake))
        return self._cache

    def explainers(self) -> list[tuple[ExplainerSettings, Explainer]]:
        if self._explainers is None:
            simulators = [sim for settings, sim in self.simulators()]
            # Candidate explanations are ranked by the first LLM simulator (else the baseline).
            llm_simulators = [sim for (settings, sim) in self.simulators() if settings.backend != "baseline"]
            ranker = (llm_simulators or simulators)[0]
            self._explainers = [(e, make_explainer(e, self.cache, ranker)) for e in self.pipeline.settings.explainers]
        return self._explainers

    def simulators(self) -> list[tuple[SimulatorSettings, Simulator]]:
        if self._simulators is None:
            self._simulators = [(s, make_simulator(s, self.cache)) for s in self.pipeline.settings.simulators]
        return self._simulators

    def scorers(self) -> list[tuple[ScorerSettings, object]]:
        """Detection / fuzzing / embedding scorers (``Settings.scorer_entries``)."""
        if self._scorers is None:
            self._scorers = [(s, make_scorer(s, self.cache)) for s in self.pipeline.settings.scorer_entries]
        return self._scorers

    def usage(self) -> dict[str, int]:
        """New (paid) tokens this run and cache statistics, for materialization metadata."""
        objects = [obj for _, obj in (self._explainers or []) + (self._simulators or []) + (self._scorers or [])]
        models = [getattr(obj, "model", None) for obj in objects]
        usage = {
            "new_prompt_tokens": sum(getattr(m, "new_prompt_tokens", 0) for m in models),
            "new_completion_tokens": sum(getattr(m, "new_completion_tokens", 0) for m in models),
        }
        if self._cache is not None:
            usage.update(self._cache.stats())
        faults = self.faults()
        if any(faults.values()):
            usage["llm_faults"] = dg.MetadataValue.json(faults)
        return usage

    def spend(self) -> tuple[int, float]:
        """New (paid) tokens and dollars so far of the explainers, simulators and scorers built in
        this run (for progress lines)."""
        from neuron_pipeline.assets.metadata import spend

        return spend((self._simulators or []) + (self._explainers or []) + (self._scorers or []))

    def faults(self) -> dict[str, dict[str, int]]:
        """Faults the API backends met this run, by kind (``openai_api.FAULT_KINDS``: rate_limited,
        server_error, timeout, connection, malformed, unusable_content, ...), summed over the
        explainers and over the simulators; retried faults count once per attempt."""
        out: dict[str, dict[str, int]] = {}
        roles = (("explainers", self._explainers or []), ("simulators", self._simulators or []), ("scorers", self._scorers or []))
        for role, entries in roles:
            total: dict[str, int] = {}
            for backend in _backends([obj for _, obj in entries]):
                for kind, count in backend.faults.items():
                    total[kind] = total.get(kind, 0) + int(count)
            out[role] = dict(sorted(total.items()))
        return out


def llm_cache_path(lake: Lake) -> Path:
    """The SQLite LLM cache: inside a local lake; for an object-store lake (SQLite cannot live
    there) in this machine's cache folder (``NEURON_PIPELINE_CACHE``), one per lake URI."""
    if lake.folder is not None:
        return lake.folder / "_llm_cache" / "calls.sqlite"
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", lake.root)[:80] + "-" + hashlib.sha256(lake.root.encode()).hexdigest()[:8]
    return cache_dir("llm_cache", name) / "calls.sqlite"


def _backends(objects: list) -> list:
    """The distinct LLM clients (objects with a ``faults`` counter) inside explainer / simulator
    wrappers (cache, best-of-n, calibration)."""
    found: dict[int, object] = {}
    stack, seen = list(objects), set()
    while stack:
        obj = stack.pop()
        if obj is None or id(obj) in seen:
            continue
        seen.add(id(obj))
        if hasattr(obj, "faults") and not callable(getattr(obj, "faults")):
            found[id(obj)] = obj
        stack.extend(getattr(obj, name, None) for name in ("model", "base", "backend", "inner", "explainer", "simulator"))
    return list(found.values())
