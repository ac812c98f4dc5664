"""LLM backends behind the explainer and simulator interfaces of ``interp``.

``make_explainer`` / ``make_simulator`` turn a settings section into an object with the
``Explainer`` / ``Simulator`` interface: the no-LLM baseline, a local transformers model, or
any OpenAI-compatible API. LLM calls go through the persistent cache when one is given.
"""

from __future__ import annotations

import os

from neuron_pipeline.config import ExplainerSettings, SimulatorSettings
from neuron_pipeline.interp.baseline import BaselineExplainer, BaselineSimulator
from neuron_pipeline.interp.explainer import Explainer, LLMExplainer
from neuron_pipeline.interp.simulator import AllAtOnceSimulator, ChatSimulator, Simulator
from neuron_pipeline.interp.variants import CalibratedSimulator, RefiningExplainer
from neuron_pipeline.llm.cache import CachedChatModel, CachedValueModel, LLMCache


def make_backend(settings: ExplainerSettings | SimulatorSettings):
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


def check_llm_settings(settings: ExplainerSettings | SimulatorSettings) -> None:
    """What can be checked before any model is loaded or anything is written: the prompt
    templates, the API key, and that the API server accepts connections. Raises a one-line
    ``ConfigError`` / ``PromptTemplateError``."""
    from neuron_pipeline.interp.prompts import load_template

    if settings.backend == "baseline":
        return
    if isinstance(settings, ExplainerSettings):
        load_template(settings.prompt, required=("records",))
        if settings.revise:
            load_template(RefiningExplainer.reviser_template, required=("explanation", "records"))
    else:
        load_template(settings.prompt, required=("explanation",))
    if settings.backend == "openai":
        from neuron_pipeline.llm.openai_api import check_reachable, require_key

        key = require_key(settings.base_url, settings.api_key_env)
        check_reachable(settings.base_url, api_key=key, api_key_env=settings.api_key_env)


def _chat_backend(settings: ExplainerSettings | SimulatorSettings, backend, cache: LLMCache | None):
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
    explainer = LLMExplainer(chat_model, settings.prompt, max_tokens=settings.max_tokens, temperature=settings.temperature)
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


__all__ = ["LLMCache", "check_llm_settings", "make_backend", "make_explainer", "make_simulator"]
