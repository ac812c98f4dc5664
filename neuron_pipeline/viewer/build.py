"""Build the static neuron viewer from the lake.

``build_viewer(lake, out_dir)`` writes a self-contained site: ``index.html`` (model, layers,
score distributions, score by layer), ``layer_<k>/index.html`` (a sortable, filterable table
of the layer's neurons) and ``layer_<k>/neuron_<n>.html`` (explanations, scores, excerpts
shaded by activation, simulated activations under the real ones). It needs no server and
makes no network request: CSS and JavaScript are local files under ``static/``.

Tables that are not in the lake yet are skipped: the pages just leave those parts out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import polars as pl

from neuron_pipeline.lake import Lake, read_table, table_exists
from neuron_pipeline.lake.io import LakeLike
from neuron_pipeline.lake.outcomes import failure_report, meaningful_pairs
from neuron_pipeline.viewer import pages
from neuron_pipeline.viewer.charts import GOOD_SCORE, PALETTE, LayerStats, Series, histogram_counts
from neuron_pipeline.viewer.safe import finite

MARKER = ".neuron-viewer"  # marks a folder as written by build_viewer: stale pages may be removed from it
BASELINE_COLOR = "#6b7280"
KIND_ORDER = {"top": 0, "quantile": 1, "random": 2}


@dataclass(frozen=True)
class ViewerSummary:
    out_dir: Path
    index: Path
    layers: int
    neurons: int
    pages: int


def default_viewer_dir(lake: LakeLike) -> Path:
    """Where the viewer goes by default: a ``viewer`` folder next to a local lake, or in the
    current directory for a lake in object storage (the site is local files)."""
    folder = Lake.of(lake).folder
    return (folder.parent if folder is not None else Path.cwd()) / "viewer"


def _layer_key(layer: str) -> tuple[int, int | str]:
    try:
        return (0, int(layer))
    except ValueError:
        return (1, layer)


def _pair_key(explainer_id: str, simulator_id: str) -> tuple:
    # LLM explainers first, the baseline floor last.
    return (pages.is_baseline(explainer_id), pages.is_baseline(simulator_id), explainer_id, simulator_id)


def _read(lake: Lake, table: str, where: dict | None = None, columns: list[str] | None = None) -> pl.DataFrame:
    return read_table(lake, table, where=where, columns=columns)


def _quantile(values: np.ndarray, q: float) -> float | None:
    return float(np.quantile(values, q)) if values.size else None


def _decimals(scale: float) -> int:
    """Decimals that keep four significant digits relative to the neuron's maximum."""
    if not scale or not math.isfinite(scale) or scale <= 0:
        return 4
    return max(0, min(8, 4 - math.ceil(math.log10(scale))))


def _values(values: Iterable[float] | None, decimals: int) -> list[float | None]:
    if values is None:
        return []
    array = np.asarray(list(values), dtype=np.float64)
    rounded = np.round(array, decimals)
    out = rounded.tolist()
    if not np.isfinite(array).all():
        out = [v if math.isfinite(v) else None for v in out]
    return out


def _tokens(tokens: Iterable[str] | None) -> list[str]:
    return ["" if t is None else str(t) for t in (tokens or [])]


class _Lake:
    """The small tables, read once; activation records and simulations are read per layer."""

    def __init__(self, lake: Lake):
        self.lake = lake
        self.present = {t: table_exists(lake, t) for t in
                        ("neuron_activations", "activation_records", "explanations", "simulations", "scores")}
        self.explanations = _read(lake, "explanations").with_columns(
            pl.col("created_at").dt.strftime("%Y-%m-%d %H:%M UTC"))
        # Pairs that mean nothing (prose through the token look-up) are never shown.
        self.scores = meaningful_pairs(_read(lake, "scores"))
        self.scorer_results = _read(lake, "scorer_results", columns=SCORER_VIEW_COLUMNS)
        self.activations = _read(lake, "neuron_activations")
        self.record_keys = _read(lake, "activation_records", columns=["model", "layer", "neuron"]).unique()
        simulation_keys = _read(
            lake, "simulations",
            columns=["layer", "neuron", "explainer_id", "simulator_id", "simulator_label", "mode", "error"],
        ).unique(subset=["layer", "neuron", "explainer_id", "simulator_id"], keep="first")
        self.simulation_modes = simulation_keys.filter(pl.col("error").is_null())
        self.failures = failure_report(self.explanations, simulation_keys)
        # Labels (interp/reporting.py) by id; rows written before labels existed fall back to the id.
        self.explainer_labels = _labels(self.explanations, self.scores, column="explainer")
        self.simulator_labels = _labels(simulation_keys, self.scores, column="simulator")

        models: set[str] = set()
        for frame in (self.record_keys, self.explanations, self.scores, self.activations):
            models.update(m for m in frame["model"].unique().to_list() if m)
        self.models = sorted(models)

        neurons: dict[str, set[int]] = {}
        for frame in (self.record_keys, self.activations, self.explanations, self.scores):
            for layer, neuron in frame.select("layer", "neuron").unique().iter_rows():
                if layer is not None and neuron is not None:
                    neurons.setdefault(str(layer), set()).add(int(neuron))
        self.layers = sorted(neurons, key=_layer_key)
        self.neurons = {layer: sorted(values) for layer, values in neurons.items()}

        self.explainer_models = {
            row[0]: row[1] for row in self.explanations.select("explainer_id", "explainer_model").unique("explainer_id").iter_rows()
        }
        pairs = self.scores.select("explainer_id", "simulator_id").unique().iter_rows()
        self.pairs = sorted(((e, s) for e, s in pairs if e is not None and s is not None), key=lambda p: _pair_key(*p))
        only_baseline = all(pages.is_baseline(e) for e, _ in self.pairs)
        self.colors = {}
        palette = iter(PALETTE)
        for explainer_id, simulator_id in self.pairs:
            if pages.is_baseline(explainer_id) and not only_baseline:
                self.colors[(explainer_id, simulator_id)] = BASELINE_COLOR
            else:
                self.colors[(explainer_id, simulator_id)] = next(palette, PALETTE[-1])

    def explainer_label(self, explainer_id: str) -> str:
        return self.explainer_labels.get(explainer_id) or explainer_id

    def simulator_label(self, simulator_id: str) -> str:
        return self.simulator_labels.get(simulator_id) or simulator_id

    def missing(self) -> list[str]:
        return [t for t, ok in self.present.items() if not ok]

    def explained(self, layer: str) -> int:
        frame = self.explanations.filter(
            (pl.col("layer") == layer) & pl.col("explanation").is_not_null() & (pl.col("explanation") != "")
        )
        return frame["neuron"].n_unique()


def _labels(*frames: pl.DataFrame, column: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for frame in frames:
        rows = frame.select(f"{column}_id", f"{column}_label").drop_nulls()
        for identifier, label in rows.unique(f"{column}_id", keep="first").iter_rows():
            out.setdefault(identifier, label)
    return out


def _pair_summary(lake: _Lake, scores: pl.DataFrame, explainer_id: str, simulator_id: str, layer: str | None) -> pages.PairSummary:
    frame = scores.filter((pl.col("explainer_id") == explainer_id) & (pl.col("simulator_id") == simulator_id))
    values = frame["score"].drop_nulls().drop_nans().to_numpy().astype(np.float64)
    summary = pages.PairSummary(
        explainer_id=explainer_id,
        simulator_id=simulator_id,
        explainer_model=lake.explainer_models.get(explainer_id),
        explainer_label=lake.explainer_label(explainer_id),
        simulator_label=lake.simulator_label(simulator_id),
        color=lake.colors[(explainer_id, simulator_id)],
        scored=int(values.size),
        null=frame.height - int(values.size),
        mean=float(values.mean()) if values.size else None,
        median=_quantile(values, 0.5),
        p90=_quantile(values, 0.9),
        good=int((values >= GOOD_SCORE).sum()),
        histogram=histogram_counts(values.tolist()),
    )
    if layer is not None and values.size:
        best = frame.filter(pl.col("score").is_not_null() & pl.col("score").is_not_nan()).sort(
            ["score", "neuron"], descending=[True, False]).row(0, named=True)
        explanation = lake.explanations.filter(
            (pl.col("layer") == layer) & (pl.col("neuron") == best["neuron"]) & (pl.col("explainer_id") == explainer_id)
        )
        summary.best_neuron = int(best["neuron"])
        summary.best_score = finite(best["score"])
        summary.best_explanation = explanation["explanation"][0] if explanation.height else None
    return summary


def _layer_stats(lake: _Lake) -> list[Series]:
    series = []
    for explainer_id, simulator_id in lake.pairs:
        frame = lake.scores.filter(
            (pl.col("explainer_id") == explainer_id) & (pl.col("simulator_id") == simulator_id)
            & pl.col("score").is_not_null() & pl.col("score").is_not_nan()
        )
        stats = []
        for layer in lake.layers:
            values = frame.filter(pl.col("layer") == layer)["score"].to_numpy().astype(np.float64)
            stats.append(LayerStats(
                layer=layer,
                n=int(values.size),
                mean=float(values.mean()) if values.size else None,
                p10=_quantile(values, 0.1),
                p25=_quantile(values, 0.25),
                median=_quantile(values, 0.5),
                p75=_quantile(values, 0.75),
                p90=_quantile(values, 0.9),
            ))
        label = f"{lake.explainer_label(explainer_id)} → {lake.simulator_label(simulator_id)}"
        series.append(Series(label=label, color=lake.colors[(explainer_id, simulator_id)], stats=stats))
    return series


def _layer_rows(lake: _Lake, layer: str) -> tuple[list[list[Any]], list[str], list[str], bool]:
    explanations = lake.explanations.filter(pl.col("layer") == layer).select(
        "neuron", "explainer_id", "explanation", "error")
    scores = lake.scores.filter(pl.col("layer") == layer).select(
        "neuron", "explainer_id", "simulator_id", "score", "score_top", "score_random", "null_reason")
    explainers = sorted(set(explanations["explainer_id"].to_list()) | set(scores["explainer_id"].to_list()),
                        key=lambda e: (pages.is_baseline(e), e))
    simulators = sorted(set(scores["simulator_id"].to_list()), key=lambda s: (pages.is_baseline(s), s))
    has_baseline_column = any(pages.is_baseline(e) for e in explainers) and any(not pages.is_baseline(e) for e in explainers)
    baseline: dict[int, float | None] = {}
    if has_baseline_column:
        floor = scores.filter(pl.col("explainer_id").str.starts_with("baseline-")).sort(
            pl.col("simulator_id").str.starts_with("baseline-"), "simulator_id", descending=[True, False])
        for neuron, score in floor.select("neuron", "score").iter_rows():
            baseline.setdefault(int(neuron), finite(score))
    joined = explanations.join(scores, on=["neuron", "explainer_id"], how="full", coalesce=True)
    explainer_index = {e: i for i, e in enumerate(explainers)}
    simulator_index = {s: i for i, s in enumerate(simulators)}
    rows: list[list[Any]] = []
    seen: set[int] = set()
    for row in joined.iter_rows(named=True):
        neuron = int(row["neuron"])
        seen.add(neuron)
        rows.append([
            neuron,
            explainer_index.get(row["explainer_id"], -1),
            simulator_index.get(row["simulator_id"], -1),
            row["explanation"],
            row["error"],
            finite(row["score"]),
            finite(row["score_top"]),
            finite(row["score_random"]),
            baseline.get(neuron),
            row["null_reason"],
        ])
    for neuron in lake.neurons.get(layer, []):
        if neuron not in seen:
            rows.append([neuron, -1, -1, None, None, None, None, None, baseline.get(neuron), None])
    rows.sort(key=lambda r: (r[0], r[1], r[2]))
    return rows, explainers, simulators, has_baseline_column


def _neuron_stats(row: dict[str, Any] | None) -> dict[str, Any] | None:
    if not row:
        return None
    variance = finite(row["variance"])
    return {
        "max": finite(row["max"]),
        "min": finite(row["min"]),
        "mean": finite(row["mean"]),
        "std": math.sqrt(variance) if variance is not None and variance >= 0 else None,
        "frac_positive": finite(row["frac_positive"]),
        "count": row["count"],
    }


def _rows_by_neuron(frame: pl.DataFrame, order: list[str] | None = None) -> dict[int, list[dict[str, Any]]]:
    """Rows as dicts grouped by neuron, in one pass (per-neuron polars calls cost ~1 ms each)."""
    if frame.is_empty():
        return {}
    if order:
        frame = frame.with_columns(
            _kind=pl.col("kind").replace_strict(KIND_ORDER, default=9, return_dtype=pl.Int32)
        ).sort(["neuron", "_kind", *order]).drop("_kind")
    grouped: dict[int, list[dict[str, Any]]] = {}
    for row in frame.iter_rows(named=True):
        grouped.setdefault(int(row["neuron"]), []).append(row)
    return grouped


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8", errors="replace")
    tmp.replace(path)


def _copy_static(out_dir: Path) -> None:
    target = out_dir / "static"
    target.mkdir(parents=True, exist_ok=True)
    source = resources.files("neuron_pipeline.viewer") / "static"
    for name in pages.STATIC_FILES:
        (target / name).write_bytes((source / name).read_bytes())


SCORER_VIEW_COLUMNS = [
    "layer", "neuron", "explainer_id", "scorer_id", "method", "scorer_model", "score", "balanced_accuracy", "f1",
    "auroc", "n_judged", "failed_groups", "prompt_tokens", "completion_tokens", "null_reason",
]


def _scorer_layer_rows(lake: _Lake, layer: str) -> list[dict[str, Any]]:
    """Per (explainer, scorer) of a layer: neurons, mean score, null scores, and the mean simulation
    score (first LLM simulator, else any) of the same explanations."""
    results = lake.scorer_results.filter(pl.col("layer") == layer)
    if results.is_empty():
        return []
    simulation = (
        lake.scores.filter(pl.col("layer") == layer)
        .sort(pl.col("simulator_id").str.starts_with("baseline-"), "simulator_id")
        .unique(["neuron", "explainer_id"], keep="first")
        .select("neuron", "explainer_id", simulation_score="score")
    )
    joined = results.join(simulation, on=["neuron", "explainer_id"], how="left")
    summary = joined.group_by("explainer_id", "method", "scorer_id").agg(
        neurons=pl.len(),
        mean_score=pl.col("score").mean(),
        null_scores=pl.col("score").is_null().sum(),
        mean_simulation_score=pl.col("simulation_score").mean(),
    )
    return [
        {**{k: (finite(v) if isinstance(v, float) else v) for k, v in row.items()},
         "explainer_label": lake.explainer_label(row["explainer_id"])}
        for row in summary.sort("explainer_id", "method").iter_rows(named=True)
    ]


# Similar neurons listed per explanation on a neuron page.
SIMILAR_NEURONS = 5


def _similar_neurons(lake: _Lake) -> dict[tuple[str, int], dict[str, list[dict[str, Any]]]]:
    """(layer, neuron) -> explainer id -> the most similar other neurons by explanation embedding
    (same explainer), precomputed here so the site stays static."""
    from neuron_pipeline.lake.search import EMBEDDINGS_TABLE, load_embeddings, nearest_neighbours

    if not table_exists(lake.lake, EMBEDDINGS_TABLE):
        return {}
    matrix = load_embeddings(lake.lake)
    texts = {
        (layer, int(neuron), explainer_id): text
        for layer, neuron, explainer_id, text in lake.explanations.select(
            "layer", "neuron", "explainer_id", "explanation").iter_rows()
    }
    out: dict[tuple[str, int], dict[str, list[dict[str, Any]]]] = {}
    keys = matrix.keys.with_row_index("row")
    for (explainer_id,), group in keys.group_by(["explainer_id"], maintain_order=True):
        rows = group["row"].to_numpy()
        layers, neurons = group["layer"].to_list(), group["neuron"].to_list()
        indices, similarities = nearest_neighbours(matrix.vectors[rows], np.arange(len(rows)), SIMILAR_NEURONS)
        for i, (layer, neuron) in enumerate(zip(layers, neurons)):
            listed = [
                {"layer": layers[j], "neuron": int(neurons[j]), "similarity": float(similarities[i, c]),
                 "explanation": texts.get((layers[j], int(neurons[j]), explainer_id))}
                for c, j in enumerate(indices[i]) if j >= 0
            ]
            if listed:
                out.setdefault((layer, int(neuron)), {})[explainer_id] = listed
    return out


def _neuron_pages(lake: _Lake, layer: str, folder: Path, similar: dict | None = None) -> int:
    neurons = lake.neurons.get(layer, [])
    where = {"layer": layer}
    records = (_rows_by_neuron(_read(lake.lake, "activation_records", where=where), ["kind", "rank"])
               if lake.present["activation_records"] else {})
    simulations = (_rows_by_neuron(meaningful_pairs(_read(lake.lake, "simulations", where=where).filter(
        pl.col("error").is_null())), ["kind", "rank"])
                   if lake.present["simulations"] else {})
    activations = _rows_by_neuron(lake.activations.filter(pl.col("layer") == layer))
    explanations = _rows_by_neuron(lake.explanations.filter(pl.col("layer") == layer))
    scores = _rows_by_neuron(lake.scores.filter(pl.col("layer") == layer).sort("neuron", "explainer_id", "simulator_id"))
    modes = _rows_by_neuron(lake.simulation_modes.filter(pl.col("layer") == layer))
    scorer_rows = _rows_by_neuron(lake.scorer_results.filter(pl.col("layer") == layer).sort("neuron", "explainer_id", "method"))
    output_tokens = _rows_by_neuron(_read(lake.lake, "neuron_output_tokens", where={"layer": layer, "neuron": neurons}))
    similar = similar or {}
    folder.mkdir(parents=True, exist_ok=True)
    written = 0
    for position, neuron in enumerate(neurons):
        neuron_records = records.get(neuron, [])
        neuron_sims = simulations.get(neuron, [])
        stats = _neuron_stats((activations.get(neuron) or [None])[0])

        # Shade relative to the neuron's maximum over the corpus (or over what is shown).
        scale = stats["max"] if stats and stats["max"] and stats["max"] > 0 else None
        if scale is None:
            candidates = [finite(r["max_activation"]) for r in neuron_records]
            for sim in neuron_sims:
                candidates.extend(finite(a) for a in sim["true_activations"] or [] if a is not None)
            candidates = [c for c in candidates if c is not None]
            scale = max(candidates) if candidates and max(candidates) > 0 else 1.0
        decimals = _decimals(scale)

        record_data: dict[str, list[dict[str, Any]]] = {}
        for row in neuron_records:
            item = {
                "rank": row["rank"],
                "seq": row["sequence_id"],
                "max": finite(row["max_activation"]),
                "t": _tokens(row["tokens"]),
                "a": _values(row["activations"], decimals),
            }
            if row["quantile_bin"] is not None:
                item["bin"] = row["quantile_bin"]
            record_data.setdefault(str(row["kind"]), []).append(item)

        neuron_scores = scores.get(neuron, [])
        mode_of = {(r["explainer_id"], r["simulator_id"]): r["mode"] for r in modes.get(neuron, [])}
        text_of = {r["explainer_id"]: r for r in explanations.get(neuron, [])}
        score_of = {(r["explainer_id"], r["simulator_id"]): finite(r["score"]) for r in neuron_scores}

        by_pair: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for row in neuron_sims:
            by_pair.setdefault((row["explainer_id"], row["simulator_id"]), []).append({
                "kind": row["kind"],
                "rank": row["rank"],
                "seq": row["sequence_id"],
                "t": _tokens(row["tokens"]),
                "a": _values(row["true_activations"], decimals),
                "s": _values(row["expected_activations"], 3),
            })
        sim_data = []
        for explainer_id, simulator_id in sorted(by_pair, key=lambda p: _pair_key(*p)):
            explanation = text_of.get(explainer_id)
            sim_data.append({
                "explainer": explainer_id,
                "simulator": simulator_id,
                "explainerLabel": lake.explainer_label(explainer_id),
                "simulatorLabel": lake.simulator_label(simulator_id),
                "mode": mode_of.get((explainer_id, simulator_id)),
                "score": score_of.get((explainer_id, simulator_id)),
                "explanation": explanation["explanation"] if explanation else None,
                "excerpts": by_pair[(explainer_id, simulator_id)],
            })

        cards = []
        neuron_scorers = scorer_rows.get(neuron, [])
        explainer_ids = set(text_of) | {r["explainer_id"] for r in neuron_scores}
        for explainer_id in sorted(explainer_ids, key=lambda e: (pages.is_baseline(e), e)):
            explanation = text_of.get(explainer_id, {})
            card_scores = [
                {**{k: (finite(v) if isinstance(v, float) else v) for k, v in row.items()},
                 "mode": mode_of.get((explainer_id, row["simulator_id"])),
                 "simulator_label": lake.simulator_label(row["simulator_id"])}
                for row in sorted((r for r in neuron_scores if r["explainer_id"] == explainer_id),
                                  key=lambda r: (pages.is_baseline(r["simulator_id"]), r["simulator_id"]))
            ]
            cards.append(pages.ExplanationCard(
                explainer_id=explainer_id,
                explainer_label=lake.explainer_label(explainer_id),
                explainer_model=explanation.get("explainer_model") or lake.explainer_models.get(explainer_id),
                prompt_hash=explanation.get("prompt_hash"),
                explanation=explanation.get("explanation"),
                error=explanation.get("error"),
                created_at=explanation.get("created_at"),
                scores=card_scores,
                scorer_scores=[
                    {k: (finite(v) if isinstance(v, float) else v) for k, v in r.items()}
                    for r in neuron_scorers if r["explainer_id"] == explainer_id
                ],
            ))

        data = {"layer": layer, "neuron": neuron, "scale": scale, "records": record_data, "simulations": sim_data}
        html = pages.neuron_page(
            lake.models,
            layer,
            neuron,
            neurons[position - 1] if position > 0 else None,
            neurons[position + 1] if position + 1 < len(neurons) else None,
            stats,
            cards,
            data,
            {kind: len(items) for kind, items in record_data.items()},
            sum(len(pair["excerpts"]) for pair in sim_data),
            output_tokens=(output_tokens.get(neuron) or [None])[0],
            similar=similar.get((layer, neuron)),
        )
        # Neuron pages are many: written in place; the index is written last, atomically.
        (folder / pages.neuron_file(neuron)).write_text(html, encoding="utf-8", errors="replace")
        written += 1
    return written


def _remove_stale(out_dir: Path, written: set[Path]) -> None:
    """Drop pages of layers or neurons that are no longer in the lake (only in our own folder)."""
    if not (out_dir / MARKER).exists():
        return
    for folder in out_dir.glob("layer_*"):
        if not folder.is_dir():
            continue
        for path in list(folder.glob("neuron_*.html")) + [folder / "index.html"]:
            if path.exists() and path not in written:
                path.unlink()
        if not any(folder.iterdir()):
            folder.rmdir()


def build_viewer(lake: LakeLike, out_dir: str | Path) -> ViewerSummary:
    """Write the static viewer for everything in ``lake`` (a folder or an object-store lake) to
    the local folder ``out_dir``; return what was written."""
    lake = Lake.of(lake)
    out_dir = Path(out_dir).expanduser().resolve()
    if lake.folder is not None and (out_dir == lake.folder or lake.folder in out_dir.parents):
        raise ValueError(f"the viewer folder {out_dir} must not be inside the lake {lake}: choose another --out")
    out_dir.mkdir(parents=True, exist_ok=True)
    data = _Lake(lake)
    _copy_static(out_dir)
    written: set[Path] = set()

    layer_summaries = []
    for layer in data.layers:
        layer_scores = data.scores.filter(pl.col("layer") == layer)
        layer_pairs = sorted({(e, s) for e, s in layer_scores.select("explainer_id", "simulator_id").iter_rows()
                              if e is not None and s is not None}, key=lambda p: _pair_key(*p))
        layer_summaries.append(pages.LayerSummary(
            layer=layer,
            neurons=len(data.neurons.get(layer, [])),
            explained=data.explained(layer),
            pairs=[_pair_summary(data, layer_scores, e, s, layer) for e, s in layer_pairs],
        ))

    similar = _similar_neurons(data)
    neuron_count = 0
    for summary in layer_summaries:
        folder = out_dir / pages.layer_dir(summary.layer)
        rows, explainers, simulators, has_baseline = _layer_rows(data, summary.layer)
        html = pages.layer_page(
            data.models, summary.layer, data.layers, rows, explainers, simulators,
            {e: data.explainer_label(e) for e in explainers} | {s: data.simulator_label(s) for s in simulators},
            has_baseline, summary.neurons, summary.explained, _scorer_layer_rows(data, summary.layer),
        )
        _write(folder / "index.html", html)
        written.add(folder / "index.html")
        count = _neuron_pages(data, summary.layer, folder, similar)
        written.update(folder / pages.neuron_file(n) for n in data.neurons.get(summary.layer, []))
        neuron_count += count

    overall = [_pair_summary(data, data.scores, e, s, None) for e, s in data.pairs]
    index = out_dir / "index.html"
    failures = data.failures.filter(pl.col("failed") + pl.col("unusable") > 0).to_dicts()
    _write(index, pages.index_page(data.models, layer_summaries, _layer_stats(data), overall, data.missing(), failures))
    _remove_stale(out_dir, written)
    (out_dir / MARKER).write_text("written by neuron-pipeline viewer; stale layer_*/ pages here are removed on rebuild\n")
    return ViewerSummary(
        out_dir=out_dir,
        index=index,
        layers=len(layer_summaries),
        neurons=neuron_count,
        pages=1 + len(layer_summaries) + neuron_count,
    )
