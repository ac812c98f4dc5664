"""Know the bill first: what a configured run will ask of its LLMs, before anything is paid.

``make_plan(settings)`` counts, per explainer and per (explainer, simulator) pair:

- the neurons it covers (the run's layers x neurons, within the entry's own ``layers`` /
  ``neurons``);
- the calls: explainers one request per neuron (``best_of`` completions in it) plus one revision
  (``revise``), and the ranker's simulations of the candidates (approximate); simulators one
  request per scored excerpt (``score_top + score_random``, plus the held-out ones when
  calibrating), two per excerpt in prompt-logprob mode (the second pass for "10" written as "1",
  "0", as most tokenizers of served models do);
- prompt and completion tokens: real prompts are built, with the project's own prompt code, from
  a sample of neurons' activation records in the lake (or, when there is no lake for this model
  yet, from synthetic 64-token excerpts) and counted with the bundled SmolLM2 tokenizer (a 49k BPE
  close to GPT-2's and to OpenAI's; an approximation: the served model's own tokenizer is not
  available offline) plus 4 tokens per chat message for the chat format; the mean per call is
  extrapolated to every call. Explainer completions are counted at ``max_tokens`` (an upper
  bound: the answer usually stops earlier), a chat simulator's at its full "token<TAB>value"
  rewrite, a prompt-logprob simulation's at 1;
- dollars at the configured prices, online and with the Batch API (half price);
- wall time: calls / concurrency x latency (``latency_s``, assumed: 1 s unless given), or for
  the Batch API "within 24 h".

The same figures go to the explanations asset's metadata (``plan_metadata``).
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

from neuron_pipeline.config import ExplainerSettings, Settings, SimulatorSettings, baseline_selectors, parse_index_spec
from neuron_pipeline.interp.explainer import LLMExplainer
from neuron_pipeline.interp.outputs import OutputTokens
from neuron_pipeline.interp.prompts import escape_token
from neuron_pipeline.interp.records import ActivationRecord, NeuronRecord, split_records
from neuron_pipeline.interp.simulator import AllAtOnceSimulator, ChatSimulator, excerpt_suffix

# Layer and neuron counts of models whose weights (and config) are not available offline.
KNOWN_SHAPES = {"gpt2": (12, 3072), "gpt2-medium": (24, 4096), "gpt2-large": (36, 5120), "gpt2-xl": (48, 6400)}
DEFAULT_LATENCY_S = 1.0
SAMPLE_NEURONS = 16
MESSAGE_OVERHEAD_TOKENS = 4  # role and separators per chat message (OpenAI's chat format)
BATCH_PRICE_FACTOR = 0.5
EXCERPT_TOKENS = 64

TokenCounter = Callable[[str], int]


@dataclass
class StagePlan:
    stage: str  # "explain" | "simulate"
    role: str  # what runs it, e.g. "openai gpt-4o" / "baseline"
    explainer: str  # the explainer it serves (explain) or simulates (simulate)
    backend: str
    mode: str  # chat | prompt_logprobs | top_logprobs | integers | none
    neurons: int
    calls: int
    prompt_tokens: int
    completion_tokens: int
    usd_online: float
    usd_batch: float | None  # None where the Batch API does not apply
    batch: bool
    concurrency: int
    wall_s: float  # at the configured concurrency and the plan's latency (online)


@dataclass
class Plan:
    model: str
    layers: int
    neurons: int  # of the run (layers x neurons selected)
    latency_s: float
    token_counter: str
    sample: str
    stages: list[StagePlan] = field(default_factory=list)

    @property
    def usd_online(self) -> float:
        return sum(s.usd_online for s in self.stages)

    @property
    def usd_as_configured(self) -> float:
        return sum(s.usd_batch if s.batch and s.usd_batch is not None else s.usd_online for s in self.stages)

    @property
    def usd_all_batch(self) -> float:
        return sum(s.usd_batch if s.usd_batch is not None else s.usd_online for s in self.stages)

    @property
    def wall_s(self) -> float:
        return sum(s.wall_s for s in self.stages)

    def as_dict(self) -> dict[str, Any]:
        return {
            **{k: v for k, v in asdict(self).items() if k != "stages"},
            "usd_online": self.usd_online,
            "usd_as_configured": self.usd_as_configured,
            "usd_all_batch": self.usd_all_batch,
            "wall_s_online": self.wall_s,
            "stages": [asdict(s) for s in self.stages],
        }


# --- counting ---------------------------------------------------------------------------------------


def bundled_token_counter() -> tuple[TokenCounter, str]:
    """The bundled SmolLM2 tokenizer as a counter (an approximation of the served model's), or
    4 characters a token when it is not installed."""
    try:
        from transformers import AutoTokenizer

        from neuron_pipeline.subject.loading import resolve_model_path

        _, folder = resolve_model_path("smollm2-135m-instruct")
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except Exception:  # noqa: BLE001 - any failure: the character estimate
        return (lambda text: math.ceil(len(text) / 4)), "4 characters a token (no tokenizer installed)"
    return (lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])), (
        "the bundled SmolLM2 tokenizer (49k BPE; an approximation of the served model's)"
    )


def chat_tokens(messages: Sequence[tuple[str, str]], count: TokenCounter) -> int:
    return sum(count(content) + MESSAGE_OVERHEAD_TOKENS for _, content in messages)


def synthetic_records(n_neurons: int, settings: Settings, seed: int = 0) -> list[NeuronRecord]:
    """Stand-in neurons when no lake exists yet: 64-token excerpts of common English words with
    sparse activations, as many top and random excerpts as the records settings keep."""
    from neuron_pipeline.interp.records import NeuronId

    rng = random.Random(seed)
    words = [" the", " of", " and", " to", " a", " in", " was", " her", " she", " he", " it", " that", " had", " his",
             " with", " for", " as", " not", " be", " Elizabeth", " Darcy", " said", " very", " could", ",", ".", " Mr"]

    def excerpt() -> ActivationRecord:
        tokens = tuple(rng.choice(words) for _ in range(EXCERPT_TOKENS))
        return ActivationRecord(tokens, tuple(max(0.0, rng.gauss(0, 1)) if rng.random() < 0.3 else 0.0 for _ in tokens))

    records = settings.records
    return [
        NeuronRecord(NeuronId(0, j), top=[excerpt() for _ in range(records.top_k)], random=[excerpt() for _ in range(records.random_k)])
        for j in range(n_neurons)
    ]


def sample_records(settings: Settings, model_id: str, n_neurons: int = SAMPLE_NEURONS) -> tuple[list[NeuronRecord], str]:
    """Up to ``n_neurons`` neurons' records from the lake's first captured layer of this model, or
    synthetic ones."""
    try:
        import polars as pl

        from neuron_pipeline.interp.records import neuron_records_from_rows
        from neuron_pipeline.lake import read_table, table_exists

        lake = settings.lake_location
        if table_exists(lake, "activation_records"):
            layers = read_table(lake, "activation_records", columns=["layer", "model"]).unique()
            layers = layers.filter(pl.col("model") == model_id)
            if layers.height:
                layer = sorted(layers["layer"].to_list(), key=int)[0]
                neurons = read_table(lake, "activation_records", where={"layer": layer}, columns=["neuron"])["neuron"].unique().sort()
                chosen = neurons.head(n_neurons).to_list()
                rows = read_table(lake, "activation_records", where={"layer": layer, "neuron": chosen})
                records = list(neuron_records_from_rows(rows.iter_rows(named=True)).values())
                if records:
                    return records, f"{len(records)} neurons of layer {layer} in the lake"
    except Exception:  # noqa: BLE001 - no readable lake: synthetic excerpts
        pass
    return synthetic_records(n_neurons, settings), f"{n_neurons} synthetic neurons ({EXCERPT_TOKENS}-token excerpts; no lake for this model yet)"


# --- the plan --------------------------------------------------------------------------------------


def subject_shape(settings: Settings) -> tuple[str, int, int]:
    """(model id, layers, neurons per layer): from the model's config, or known shapes offline."""
    from pathlib import Path

    from neuron_pipeline.subject import describe_subject

    name = settings.subject.model.rsplit("/", 1)[-1]
    if name in KNOWN_SHAPES and not Path(settings.subject.model).exists():
        return settings.subject.model, *KNOWN_SHAPES[name]  # no hub needed (nor its retries offline)
    try:
        info = describe_subject(settings.subject)
        return info.model_id, info.num_layers, info.num_neurons
    except Exception:  # noqa: BLE001 - e.g. gpt2-xl without the hub
        name = settings.subject.model.rsplit("/", 1)[-1]
        if name in KNOWN_SHAPES:
            return settings.subject.model, *KNOWN_SHAPES[name]
        raise


class _Named:
    def __init__(self, name: str):
        self.model_name = name


_PLACEHOLDER_EXPLANATION = "words about a character's feelings, and the names of people in the story"
# An output-aware explainer's prompt also lists 10 promoted and 10 suppressed tokens.
_PLACEHOLDER_OUTPUTS = OutputTokens.of([" pounds", " sterling", " per", " a", " year"] * 2, [" the", " of", " and", " to", " in"] * 2)


def _simulation_mode(entry: SimulatorSettings) -> str:
    if entry.backend != "openai":
        return "none" if entry.backend == "baseline" else "prompt_logprobs"
    if entry.mode != "auto":
        return entry.mode
    if entry.batch or entry.base_url is None:  # OpenAI's API has no prompt logprobs
        return "top_logprobs"
    return "prompt_logprobs"  # a self-hosted server (vLLM) probed at run time; assumed to have them


def make_plan(
    settings: Settings,
    latency_s: float = DEFAULT_LATENCY_S,
    count: TokenCounter | None = None,
    counter_name: str = "",
    records: list[NeuronRecord] | None = None,
    sample_name: str = "",
    shape: tuple[str, int, int] | None = None,
) -> Plan:
    model_id, n_layers, n_neurons = shape or subject_shape(settings)
    layers = parse_index_spec(settings.layers, n_layers, "layer")
    neurons = parse_index_spec(settings.neurons, n_neurons, "neuron")
    if count is None:
        count, counter_name = bundled_token_counter()
    if records is None:
        records, sample_name = sample_records(settings, model_id)
    plan = Plan(model_id, len(layers), len(layers) * len(neurons), latency_s, counter_name, sample_name)
    rs = settings.records
    splits = [split_records(r, rs.explain_top, rs.score_top, rs.score_random) for r in records]

    def covered(entry) -> int:
        return len(_subset(entry.layers, layers)) * len(_subset(entry.neurons, neurons))

    llm_simulators = [s for s in settings.simulators if s.backend != "baseline"]
    ranker = (llm_simulators or settings.simulators or [SimulatorSettings()])[0]
    explainers = [e for e in settings.explainers]
    for explainer in explainers:
        label = _label(explainer)
        n = covered(explainer)
        if explainer.backend == "baseline":
            plan.stages.append(_stage("explain", label, label, explainer, "none", n, 0, 0, 0, latency_s))
        else:
            llm = LLMExplainer(_Named(label), explainer.prompt, max_tokens=explainer.max_tokens,
                               output_tokens=explainer.output_tokens)
            outputs = _PLACEHOLDER_OUTPUTS if explainer.output_tokens else None
            requests = [llm.request(s.explain, outputs=outputs) for s in splits]
            prompt = _mean([chat_tokens(r.messages, count) for r in requests])
            calls_per_neuron = 1 + (1 if explainer.revise else 0)
            completions = explainer.best_of + (1 if explainer.revise else 0)
            plan.stages.append(
                _stage("explain", label, label, explainer, "chat", n, n * calls_per_neuron,
                       round(n * calls_per_neuron * prompt), n * completions * explainer.max_tokens, latency_s)
            )
            if explainer.best_of > 1 or explainer.revise:
                validation = _mean([len(s.holdout_top) + len(s.holdout_random) or len(s.explain) for s in splits])
                simulations = (explainer.best_of if explainer.best_of > 1 else 0) + (3 if explainer.revise else 0)
                plan.stages.append(
                    _simulate_stage(ranker, f"ranking for {label}", n, simulations * validation, splits, count, latency_s,
                                    records_of=lambda s: (s.holdout_top + s.holdout_random) or s.explain)
                )
        for simulator in settings.simulators:
            if simulator.explanations == "llm" and explainer.backend == "baseline":
                continue
            sim_n = min(n, covered(simulator))
            scored = rs.score_top + rs.score_random
            if simulator.calibrate:
                scored += _mean([len(s.holdout_top) + len(s.holdout_random) for s in splits])
            plan.stages.append(
                _simulate_stage(simulator, label, sim_n, scored, splits, count, latency_s,
                                records_of=lambda s: s.score_top + s.score_random)
            )
    return plan


def _simulate_stage(entry: SimulatorSettings, explainer_label: str, neurons: int, excerpts_per_neuron: float,
                    splits, count: TokenCounter, latency_s: float, records_of) -> StagePlan:
    mode = _simulation_mode(entry)
    role = _label(entry)
    if mode == "none":
        return _stage("simulate", role, explainer_label, entry, mode, neurons, 0, 0, 0, latency_s)
    excerpts = [r for s in splits for r in records_of(s)]
    if mode == "prompt_logprobs":
        simulator = AllAtOnceSimulator(_Named(role), entry.template_for(mode))
        prefix = simulator.prefix(_PLACEHOLDER_EXPLANATION)
        prompt = _mean([count(prefix + excerpt_suffix(r.tokens)[0]) for r in excerpts])
        calls_per_excerpt, completion = 2, 1  # the refill pass for a "1","0" ten
    else:
        simulator = ChatSimulator(_Named(role), entry.template_for(mode), use_logprobs=mode == "top_logprobs")
        prompt = _mean([chat_tokens(simulator.request(_PLACEHOLDER_EXPLANATION, r.tokens).messages, count) for r in excerpts])
        answer = [f"<start>\n" + "\n".join(f"{escape_token(t)}\t0" for t in r.tokens) + "\n<end>" for r in excerpts]
        calls_per_excerpt, completion = 1, _mean([count(a) for a in answer])
    calls = round(neurons * excerpts_per_neuron * calls_per_excerpt)
    return _stage("simulate", role, explainer_label, entry, mode, neurons, calls, round(calls * prompt),
                  round(neurons * excerpts_per_neuron * completion), latency_s)


def _stage(stage, role, explainer, entry, mode, neurons, calls, prompt_tokens, completion_tokens, latency_s) -> StagePlan:
    usd = (prompt_tokens * entry.usd_per_million_prompt + completion_tokens * entry.usd_per_million_completion) / 1e6
    api = entry.backend == "openai"
    concurrency = entry.concurrency if api else 1
    return StagePlan(
        stage, role, explainer, entry.backend, mode, neurons, calls, int(prompt_tokens), int(completion_tokens),
        usd, usd * BATCH_PRICE_FACTOR if api else None, bool(getattr(entry, "batch", False)), concurrency,
        math.ceil(calls / concurrency) * latency_s if api else 0.0,
    )


def _subset(spec: str, candidates: list[int]) -> list[int]:
    picks = baseline_selectors(spec)
    if picks is not None:  # which neurons depends on the captured records; a plan needs the count
        return list(candidates)[: sum(picks)]
    if str(spec).strip().lower() in ("", "all"):
        return list(candidates)
    chosen = set(parse_index_spec(spec, 1 << 20, "index"))
    return [c for c in candidates if c in chosen]


def _label(entry: ExplainerSettings | SimulatorSettings) -> str:
    return entry.backend if entry.backend == "baseline" else f"{entry.backend} {entry.model_or_default}"


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


# --- output ----------------------------------------------------------------------------------------


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def render(plan: Plan) -> str:
    lines = [
        f"plan: {plan.model}, {plan.layers} layers, {plan.neurons:,} neurons",
        f"tokens counted on real prompts of {plan.sample}, with {plan.token_counter}; extrapolated to every call",
        "",
        f"{'stage':<9} {'runs on (explanations of)':<52} {'mode':<16} {'neurons':>9} {'calls':>12} {'prompt tok':>15} {'compl. tok':>14} "
        f"{'$ online':>11} {'$ batch':>11} {'wall (online)':>14}",
    ]
    for s in plan.stages:
        batch = "-" if s.usd_batch is None else f"{s.usd_batch:,.2f}"
        wall = "-" if s.calls == 0 else f"{_duration(s.wall_s)} @{s.concurrency}"
        who = s.role if s.stage == "explain" else f"{s.role} ({s.explainer})"
        lines.append(
            f"{s.stage:<9} {who[:52]:<52} {s.mode:<16} {s.neurons:>9,} {s.calls:>12,} {s.prompt_tokens:>15,} "
            f"{s.completion_tokens:>14,} {s.usd_online:>11,.2f} {batch:>11} {wall:>14}"
        )
    total_calls = sum(s.calls for s in plan.stages)
    total_prompt = sum(s.prompt_tokens for s in plan.stages)
    total_completion = sum(s.completion_tokens for s in plan.stages)
    lines += [
        "",
        f"total: {total_calls:,} calls, {total_prompt:,} prompt + {total_completion:,} completion tokens",
        f"dollars: ${plan.usd_online:,.2f} online, ${plan.usd_all_batch:,.2f} with the Batch API "
        f"(as configured: ${plan.usd_as_configured:,.2f})",
        f"wall time online: {_duration(plan.wall_s)} at the configured concurrency and {plan.latency_s:g} s per call "
        "(assumed; --latency to change); with the Batch API: within 24 h per batch",
        "completion tokens: explainers at max_tokens (an upper bound), chat simulators their full token<TAB>value "
        "rewrite, prompt-logprob simulations 1 token (2 calls per excerpt: the refill pass for a '1','0' ten)",
    ]
    if plan.usd_online == 0 and total_calls:
        lines.append("no prices configured: set usd_per_million_prompt / usd_per_million_completion on the explainers and simulators")
    return "\n".join(lines)


def plan_metadata(plan: Plan) -> dict[str, Any]:
    """The plan's headline figures for Dagster metadata."""
    return {
        "plan_neurons": plan.neurons,
        "plan_calls": sum(s.calls for s in plan.stages),
        "plan_prompt_tokens": sum(s.prompt_tokens for s in plan.stages),
        "plan_completion_tokens": sum(s.completion_tokens for s in plan.stages),
        "plan_usd_online": round(plan.usd_online, 4),
        "plan_usd_batch": round(plan.usd_all_batch, 4),
        "plan_wall_s_online": round(plan.wall_s, 1),
        "plan_latency_s_assumed": plan.latency_s,
        "plan_token_counter": plan.token_counter,
        "plan_sample": plan.sample,
    }


def run_plan(settings: Settings, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The plan's metadata for the explanations asset (logged in full through ``log``); empty,
    with a note, when it cannot be made (a plan never stops a run)."""
    try:
        plan = make_plan(settings)
    except Exception as exc:  # noqa: BLE001 - the plan is information only
        return {"plan_unavailable": f"{type(exc).__name__}: {str(exc)[:200]}"}
    if log is not None:
        log(render(plan))
    return plan_metadata(plan)
