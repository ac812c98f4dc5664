"""LLM backends behind the explainer and simulator interfaces of ``interp``.

``make_explainer`` / ``make_simulator`` turn a settings section into an object with the
``Explainer`` / ``Simulator`` interface: the no-LLM baseline, a local transformers model, or
any OpenAI-compatible API. LLM calls go through the persistent cache when one is given.
"""

from __future__ import annotations

import os

from neuron_pipeline.config import ExplainerSettings, ScorerSettings, SimulatorSettings
from neuron_pipeline.interp.baseline import BaselineExplainer, BaselineSimulator
from neuron_pipeline.interp.explainer import Explainer, LLMExplainer
from neuron_pipeline.interp.simulator import AllAtOnceSimulator, ChatSimulator, Simulator
from neuron_pipeline.interp.variants import CalibratedSimulator, RefiningExplainer
from neuron_pipeline.llm.cache import CachedChatModel, CachedValueModel, LLMCache


def make_backend(settings: ExplainerSettings | SimulatorSettings | ScorerSettings):
    """The raw model client for an LLM backend (loaded / connected once per process)."""
    if settings.backend == "local":
        from neuron_pipeline.llm.local import LocalLLM

        return LocalLLM(settings.model_or_default, settings.device, settings.dtype, settings.batch_size)
    if settings.backend == "openai":
        from neuron_pipeline.llm.openai_api import OpenAICompatible, check_reachable

        # One clear error instead of a layer of failed calls.
        check_reachable(settings.base_url, api_key=os.environ.get(settings.api_key_env), api_key_env=settings.api_key_env)
        return OpenAICompatible(
            settings.model_or_default,
            base_url=settings.base_url,
            api_key_env=settings.api_key_env,
            concurrency=settings.concurrency,
            max_retries=settings.max_retries,
            timeout_s=settings.timeout_s,
            budget_tokens=settings.budget_tokens,
            budget_usd=settings.budget_usd,
            usd_per_million_prompt=settings.usd_per_million_prompt,
            usd_per_million_completion=settings.usd_per_million_completion,
            value_logprobs=settings.max_logprobs,
            extra_body=settings.extra_body,
        )
    raise ValueError(f"backend {settings.backend!r} has no LLM client")


def check_llm_settings(settings: ExplainerSettings | SimulatorSettings | ScorerSettings) -> None:
    """What can be checked before any model is loaded or anything is written: the prompt
    templates, the API key, and that the API server accepts connections. Raises a one-line
    ``ConfigError`` / ``PromptTemplateError``."""
    from neuron_pipeline.interp.explainer import explainer_placeholders
    from neuron_pipeline.interp.prompts import load_template

    if isinstance(settings, ScorerSettings) and settings.method == "embedding":
        from neuron_pipeline.config import ConfigError
        from neuron_pipeline.llm.embeddings import EmbeddingModelError, embedding_model_dir

        try:
            embedding_model_dir()  # installed, or one line saying how to install it
        except EmbeddingModelError as exc:
            raise ConfigError(f"{exc}; or drop the embedding scorer (scorers: [] or a list without it)") from None
        return
    if settings.backend == "baseline":
        return
    if isinstance(settings, ScorerSettings):
        load_template(settings.template, required=("explanation", "excerpts"))
    elif isinstance(settings, ExplainerSettings) and settings.contrastive:
        load_template(_contrastive_template(settings), required=("records", "negatives"))
    elif isinstance(settings, ExplainerSettings):
        load_template(settings.prompt, required=explainer_placeholders(settings.output_tokens))
        if settings.revise:
            load_template(RefiningExplainer.reviser_template, required=("explanation", "records"))
    else:
        load_template(settings.prompt, required=("explanation",))
    if settings.backend == "openai":
        from neuron_pipeline.llm.openai_api import check_reachable, require_key

        key = require_key(settings.base_url, settings.api_key_env)
        check_reachable(settings.base_url, api_key=key, api_key_env=settings.api_key_env)


def _chat_backend(settings: ExplainerSettings | SimulatorSettings | ScorerSettings, backend, cache: LLMCache | None):
    """The backend for chat requests: through the Batch API when ``batch`` is set."""
    if not settings.batch:
        return backend
    from neuron_pipeline.llm.batch import BatchChatModel

    return BatchChatModel(backend, cache, poll_s=settings.batch_poll_s)


def make_explainer(
    settings: ExplainerSettings, cache: LLMCache | None = None, ranker: Simulator | None = None
) -> Explainer:
    """``ranker`` simulates candidate explanations for best-of-n and revision."""
    if settings.backend == "baseline":
        return BaselineExplainer(max_tokens=settings.baseline_tokens)
    backend = _chat_backend(settings, make_backend(settings), cache)
    chat_model = CachedChatModel(backend, cache) if cache is not None else backend
    if settings.contrastive:
        from neuron_pipeline.interp.contrastive import ContrastiveExplainer

        return ContrastiveExplainer(
            chat_model,
            _contrastive_template(settings),
            max_tokens=settings.max_tokens,
            temperature=settings.temperature,
            negatives=settings.negatives,
        )
    explainer = LLMExplainer(
        chat_model,
        settings.prompt,
        max_tokens=settings.max_tokens,
        temperature=settings.temperature,
        output_tokens=settings.output_tokens,
    )
    if settings.best_of > 1 or settings.revise:
        return RefiningExplainer(explainer, ranker or BaselineSimulator(), n=settings.best_of, revise=settings.revise)
    return explainer


def make_simulator(settings: SimulatorSettings, cache: LLMCache | None = None) -> Simulator:
    simulator = _make_simulator(settings, cache)
    return CalibratedSimulator(simulator) if settings.calibrate else simulator


def _make_simulator(settings: SimulatorSettings, cache: LLMCache | None) -> Simulator:
    if settings.backend == "baseline":
        return BaselineSimulator()
    backend = make_backend(settings)
    mode = settings.mode
    if settings.batch:  # the Batch API answers chat requests: read top logprobs unless told otherwise
        backend = _chat_backend(settings, backend, cache)
        mode = "top_logprobs" if mode == "auto" else mode
    if mode == "auto":
        supports = getattr(backend, "supports_prompt_logprobs", None)
        mode = "prompt_logprobs" if supports is None or supports() else "top_logprobs"
    if mode == "prompt_logprobs":
        value_model = CachedValueModel(backend, cache) if cache is not None else backend
        return AllAtOnceSimulator(value_model, settings.prompt)
    chat_model = CachedChatModel(backend, cache) if cache is not None else backend
    return ChatSimulator(chat_model, settings.prompt, use_logprobs=mode == "top_logprobs")


def _contrastive_template(settings: ExplainerSettings) -> str:
    """A contrastive explainer left at the default prompt uses the contrastive one."""
    from neuron_pipeline.interp.contrastive import DEFAULT_TEMPLATE

    return DEFAULT_TEMPLATE if settings.prompt == ExplainerSettings.model_fields["prompt"].default else settings.prompt


def make_scorer(settings: ScorerSettings, cache: LLMCache | None = None):
    """A detection / fuzzing scorer on a chat backend (through the cache), or the embedding scorer."""
    sample_params = {
        "activating": settings.activating,
        "non_activating": settings.non_activating,
        "activating_min": settings.activating_min,
        "quiet_max": settings.quiet_max,
    }
    if settings.method == "embedding":
        from neuron_pipeline.interp.embedding_scoring import EmbeddingScorer
        from neuron_pipeline.llm.embeddings import load_embedder

        return EmbeddingScorer(load_embedder(), sample_params)
    from neuron_pipeline.interp.detection import DetectionScorer
    from neuron_pipeline.interp.fuzzing import FuzzingScorer

    backend = _chat_backend(settings, make_backend(settings), cache)  # the Batch API with `batch: true`
    chat_model = CachedChatModel(backend, cache) if cache is not None else backend
    kind = DetectionScorer if settings.method == "detection" else FuzzingScorer
    return kind(
        chat_model,
        settings.template,
        group_size=settings.group_size,
        max_retries=settings.answer_retries,
        use_logprobs=settings.logprobs,
        sample_params=sample_params,
    )


__all__ = ["LLMCache", "check_llm_settings", "make_backend", "make_explainer", "make_scorer", "make_simulator"]
