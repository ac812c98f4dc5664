"""What each stage's output depends on, as hashes: code versions, data versions, staleness per layer.

Dagster marks an asset stale when its code version changed or when a dependency has a new data
version since it was materialized — but it does not pass staleness further down. So every
stage's code version here is ``<stage code version>+<recipe hash>`` where the recipe holds the
settings and prompt templates that determine the stage's output *and those of every stage
above it*:

- a new prompt template or explainer model changes the recipes of explanations, simulations,
  scores, layer_summary and the viewer (stale, "has a new code version"), not capture's;
- a new corpus or subject model changes every recipe: everything is stale.

Data versions come from content: ``corpus_tokens`` is versioned by the hash of its token ids,
the capture by that corpus hash together with its recipe; later stages get Dagster's lineage
version (a hash of code version and input data versions). None depends on the layer, so a layer
materialized alone and the same layer materialized in a range have the same version.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import dagster as dg

from neuron_pipeline.config import Settings
from neuron_pipeline.llm.embeddings import EMBEDDING_MODEL
from neuron_pipeline.subject.output_tokens import OUTPUT_TOKENS_K

# Runtime knobs of an LLM backend that do not change what it produces.
_RUNTIME_FIELDS = {
    "device",
    "batch_size",
    "concurrency",
    "max_retries",
    "timeout_s",
    "budget_tokens",
    "budget_usd",
    "usd_per_million_prompt",
    "usd_per_million_completion",
    "api_key_env",
    "base_url",
    "batch",
    "batch_poll_s",
}
SIMULATOR_TEMPLATE_PREFIX = "simulator"
# Templates of the detection / fuzzing scorers: neither explainer- nor simulator-side.
SCORER_TEMPLATE_PREFIXES = ("detection", "fuzzing")

# Stages in pipeline order, by asset key; each recipe includes the one before it.
STAGES = [
    ("corpus_tokens", ["corpus_tokens"]),
    ("neuron_output_tokens", ["neuron_output_tokens"]),
    ("capture", ["neuron_activations", "activation_records"]),
    ("explanations", ["explanations"]),
    ("explanation_embeddings", ["explanation_embeddings"]),
    ("simulations", ["simulations"]),
    ("scores", ["scores"]),
    ("scorer_results", ["scorer_results"]),
    ("layer_summary", ["layer_summary"]),
    ("neuron_viewer", ["neuron_viewer"]),
]


def prompts_dir() -> Path:
    """The packaged prompt templates (neuron_pipeline/interp/prompts/*.txt)."""
    return Path(str(resources.files("neuron_pipeline.interp") / "prompts"))


def digest(*parts: Any) -> str:
    text = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def template_hashes(folder: Path | None, simulator: bool, scorer: bool = False) -> dict[str, str]:
    """Content hashes of the explainer-side (or simulator-side, or scorer) prompt templates."""
    folder = Path(folder) if folder is not None else prompts_dir()
    out = {}
    for path in sorted(folder.glob("*.txt")):
        if path.stem.startswith(SCORER_TEMPLATE_PREFIXES):
            if scorer:
                out[path.stem] = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
            continue
        if not scorer and path.stem.startswith(SIMULATOR_TEMPLATE_PREFIX) == simulator:
            out[path.stem] = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    return out


def _llm_entries(entries: Iterable[Any]) -> list[dict]:
    return [entry.model_dump(exclude=_RUNTIME_FIELDS, mode="json") for entry in entries]


def own_recipes(settings: Settings, templates: Path | None = None) -> dict[str, dict]:
    """Per stage, the settings and templates that it alone adds to what it is computed from."""
    subject, records = settings.subject, settings.records
    explainers = _llm_entries(settings.explainers)
    simulators = _llm_entries(settings.simulators)
    llm_explainers = any(e.backend != "baseline" for e in settings.explainers)
    llm_simulators = any(s.backend != "baseline" for s in settings.simulators)
    explain: dict[str, Any] = {
        "explainers": explainers,
        "splits": [records.explain_top, records.score_top, records.score_random],
        "templates": template_hashes(templates, simulator=False) if llm_explainers else {},
    }
    # Explainers that pick or revise candidates rank them with a simulator.
    if any(getattr(e, "best_of", 1) > 1 or getattr(e, "revise", False) for e in settings.explainers):
        explain["ranking_simulators"] = simulators
        explain["ranking_templates"] = template_hashes(templates, simulator=True) if llm_simulators else {}
    return {
        "corpus_tokens": {
            "model": subject.model,
            "trust_remote_code": subject.trust_remote_code,
            "corpus": settings.corpus.model_dump(mode="json"),
        },
        # Output tokens depend on the model's weights alone (the model is in corpus_tokens' recipe).
        "neuron_output_tokens": {"dtype": subject.dtype, "top_k": OUTPUT_TOKENS_K},
        "capture": {
            "dtype": subject.dtype,
            "activation_dtype": settings.capture.activation_dtype,
            "neurons": settings.neurons,
            "records": records.model_dump(
                mode="json", include={"top_k", "random_k", "quantile_bins", "per_quantile_bin", "quantile_sample_size", "seed"}
            ),
        },
        "explanations": explain,
        "explanation_embeddings": {"embedding_model": EMBEDDING_MODEL},
        "simulations": {
            "simulators": simulators,
            "templates": template_hashes(templates, simulator=True) if llm_simulators else {},
        },
        "scores": {},
        "scorer_results": {
            "scorers": _llm_entries(settings.scorer_entries),
            "templates": template_hashes(templates, simulator=False, scorer=True)
            if any(e.method != "embedding" for e in settings.scorer_entries)
            else {},
        },
        "layer_summary": {},
        "neuron_viewer": {},
    }


def recipe_hashes(settings: Settings, templates: Path | None = None) -> dict[str, str]:
    """Per stage, the hash of its own recipe and of every stage above it."""
    own = own_recipes(settings, templates)
    out, previous = {}, ""
    for stage, _ in STAGES:
        previous = digest(previous, stage, own[stage])
        out[stage] = previous
    return out


def code_versions(settings: Settings, base: Mapping[dg.AssetKey, str | None], templates: Path | None = None) -> dict[dg.AssetKey, str]:
    """``<base code version>+<recipe hash>`` for every asset key of the pipeline."""
    hashes = recipe_hashes(settings, templates)
    out = {}
    for stage, keys in STAGES:
        for key in keys:
            asset_key = dg.AssetKey(key)
            stem = (base.get(asset_key) or f"{key}-v1").split("+", 1)[0]
            out[asset_key] = f"{stem}+{hashes[stage][:10]}"
    return out


def capture_data_version(settings: Settings, corpus_hash: str) -> dg.DataVersion:
    """The capture's output is fixed by the tokens it ran over and its recipe (not by the layer)."""
    return dg.DataVersion(digest("capture", corpus_hash, recipe_hashes(settings)["capture"]))


def watched_hashes(settings: Settings, templates: Path | None = None) -> dict[str, str]:
    """What the prompt / settings sensor watches: explainer side and simulator side."""
    own = own_recipes(settings, templates)
    return {"explanations": digest(own["explanations"]), "simulations": digest(own["simulations"])}


# --------------------------------------------------------------------------- staleness per layer


def stale_status_resolver(instance: dg.DagsterInstance, asset_graph):
    """Dagster's own stale-status resolver (the one the UI uses), for any partition."""
    from dagster._core.asset_graph_view.asset_graph_view import AssetGraphView, TemporalContext
    from dagster._core.definitions.data_version import CachingStaleStatusResolver
    from dagster._time import get_current_datetime

    view = AssetGraphView(
        temporal_context=TemporalContext(effective_dt=get_current_datetime(), last_event_id=None),
        instance=instance,
        asset_graph=asset_graph,
    )
    return CachingStaleStatusResolver(instance=instance, asset_graph=asset_graph, loading_context=view)


def stale_assets(instance: dg.DagsterInstance, asset_graph) -> tuple[dict[str, set[dg.AssetKey]], set[dg.AssetKey], dict]:
    """Stale materialized (asset, layer) pairs, closed downstream within each layer.

    Returns (layer -> stale partitioned keys, stale unpartitioned keys, layer -> reasons)."""
    from dagster._core.definitions.data_version import StaleStatus

    resolver = stale_status_resolver(instance, asset_graph)
    keys = sorted(asset_graph.get_all_asset_keys(), key=lambda k: k.to_user_string())
    partitioned = [k for k in keys if asset_graph.get(k).is_partitioned]
    unpartitioned = [k for k in keys if not asset_graph.get(k).is_partitioned]

    def downstream(roots: set[dg.AssetKey], among: list[dg.AssetKey]) -> set[dg.AssetKey]:
        out, todo = set(roots), list(roots)
        while todo:
            for child in asset_graph.get(todo.pop()).child_keys:
                if child in among and child not in out:
                    out.add(child)
                    todo.append(child)
        return out

    stale_unpartitioned = {k for k in unpartitioned if resolver.get_status(k) == StaleStatus.STALE}
    by_layer: dict[str, set[dg.AssetKey]] = {}
    reasons: dict[str, list[str]] = {}
    layers = asset_graph.get(partitioned[0]).partitions_def.get_partition_keys() if partitioned else []
    for layer in layers:
        stale = set()
        for key in partitioned:
            if resolver.get_status(key, layer) == StaleStatus.STALE:
                stale.add(key)
                reasons.setdefault(layer, []).extend(
                    f"{key.to_user_string()}: {cause.reason}" for cause in resolver.get_stale_root_causes(key, layer)
                )
        if stale:
            # Downstream assets that were materialized for the layer are redone with it.
            materialized = {k for k in partitioned if resolver.get_status(k, layer) != StaleStatus.MISSING}
            by_layer[layer] = downstream(stale, partitioned) & materialized | stale
    return by_layer, stale_unpartitioned, reasons
