"""Build the static neuron viewer from the lake.

``build_viewer(lake, out_dir)`` writes a self-contained site: ``index.html`` (model, layers,
score distributions, score by layer), ``layer_<k>/index.html`` (a sortable, filterable table
of the layer's neurons) and ``layer_<k>/neuron.html#<n>`` (explanations, scores, excerpts
shaded by activation, simulated activations under the real ones). The neuron page is one file
per layer: it loads ``layer_<k>/neurons_<c>.js``, the data of 64 neurons, so a GPT-2 XL-sized
lake is ~5,000 files rather than 307,200 pages. It needs no server and makes no network
request: CSS, JavaScript and data are local files.

The layers are written one at a time: the records and simulations of one layer are read, and
Python objects exist for one chunk of neurons at a time.

Tables that are not in the lake yet are skipped: the pages just leave those parts out.
"""

from __future__ import annotations

import json
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
from neuron_pipeline.memory import release_memory
from neuron_pipeline.viewer import pages
from neuron_pipeline.viewer.charts import GOOD_SCORE, PALETTE, LayerStats, Series, histogram_counts
from neuron_pipeline.viewer.safe import finite, script_json

MARKER = ".neuron-viewer"  # marks a folder as written by build_viewer: stale pages may be removed from it
BASELINE_COLOR = "#6b7280"
KIND_ORDER = {"top": 0, "quantile": 1, "random": 2}


@dataclass(frozen=True)
class ViewerSummary:
    out_dir: Path
    index: Path
    layers: int
    neurons: int
    pages: int  # HTML: the index, and per layer its table and its one neuron page
    data_files: int = 0  # per layer, one per NEURON_CHUNK neurons


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


# Activations are stored as integers in thousandths of the neuron's maximum (the page multiplies
# back): a shade needs far less, a hover keeps 3 digits, and 50 excerpts x 64 values are the bulk
# of a neuron's bytes (~8 bytes a value as decimals, ~3 as per-mille integers).
ACTIVATION_STEPS = 1000


def _quantized(values: Iterable[float] | None, unit: float) -> list[int | None]:
    if values is None:
        return []
    array = np.asarray(list(values), dtype=np.float64) / unit
    finite_values = np.isfinite(array)
    steps = np.rint(np.where(finite_values, array, 0)).astype(np.int64).tolist()
    return steps if finite_values.all() else [v if ok else None for v, ok in zip(steps, finite_values.tolist())]


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


class _Similar:
    """The most similar other neurons by explanation embedding (same explainer, any layer), found
    one layer at a time: the matrix is memory-mapped and only a layer's neighbours are held."""

    def __init__(self, lake: _Lake):
        from neuron_pipeline.lake.search import EMBEDDINGS_TABLE, load_embeddings

        self.matrix = load_embeddings(lake.lake) if table_exists(lake.lake, EMBEDDINGS_TABLE) else None
        if self.matrix is None:
            return
        self.keys = self.matrix.keys.with_row_index("row").with_columns(pl.col("neuron").cast(pl.Int64))
        self.texts = lake.explanations.select(
            "layer", pl.col("neuron").cast(pl.Int64), "explainer_id", "explanation")
        self.explainer_codes = self.keys["explainer_id"].cast(pl.Categorical).to_physical().to_numpy()

    def of_layer(self, layer: str) -> dict[int, dict[str, list[dict[str, Any]]]]:
        from neuron_pipeline.lake.search import nearest_neighbours

        if self.matrix is None:
            return {}
        queries = self.keys.filter(pl.col("layer") == layer)
        found = []
        for (explainer_id,), group in queries.group_by(["explainer_id"], maintain_order=True):
            rows = group["row"].to_numpy()
            allowed = self.explainer_codes == self.explainer_codes[rows[0]]
            indices, similarities = nearest_neighbours(
                self.matrix.vectors, np.arange(self.keys.height), SIMILAR_NEURONS, queries=rows, allowed=allowed)
            found.append(pl.DataFrame({
                "query_neuron": np.repeat(group["neuron"].to_numpy(), SIMILAR_NEURONS),
                "explainer_id": [explainer_id] * indices.size,
                "position": np.tile(np.arange(SIMILAR_NEURONS), len(rows)),
                "row": indices.reshape(-1),
                "similarity": similarities.reshape(-1),
            }).filter(pl.col("row") >= 0))
        if not found:
            return {}
        neighbours = (
            pl.concat(found)
            .join(self.keys.select("row", "layer", "neuron"), on="row", how="left")
            .join(self.texts, on=["layer", "neuron", "explainer_id"], how="left")
            .sort("query_neuron", "explainer_id", "position")
        )
        out: dict[int, dict[str, list[dict[str, Any]]]] = {}
        for row in neighbours.iter_rows(named=True):
            out.setdefault(int(row["query_neuron"]), {}).setdefault(row["explainer_id"], []).append({
                "layer": row["layer"], "neuron": int(row["neuron"]), "similarity": float(row["similarity"]),
                "explanation": row["explanation"],
            })
        return out


class _Sequences:
    """Tokens of a chunk's excerpts, stored once per corpus sequence: a neuron's records and its
    simulations show the same sequences, and neighbouring neurons share many."""

    def __init__(self):
        self.tokens: dict[str, list[str]] = {}

    def item(self, sequence_id: Any, tokens: Iterable[str] | None) -> dict[str, Any]:
        shown = _tokens(tokens)
        if sequence_id is None:
            return {"seq": None, "t": shown}
        key = str(sequence_id)
        stored = self.tokens.setdefault(key, shown)
        # A hand-made lake may reuse an id for other tokens: those records keep their own.
        return {"seq": sequence_id} if stored == shown else {"seq": sequence_id, "t": shown}


def _chunk_of(frame: pl.DataFrame, first: int, last: int) -> pl.DataFrame:
    return frame.filter(pl.col("neuron").is_between(first, last)) if not frame.is_empty() else frame


def _neuron_chunks(lake: _Lake, layer: str, folder: Path, similar: dict | None = None) -> tuple[int, list[Path]]:
    """Write the layer's neuron data files (``pages.NEURON_CHUNK`` neurons each) and its one neuron
    page; return (neurons written, files written). Python objects exist for one chunk at a time."""
    neurons = lake.neurons.get(layer, [])
    where = {"layer": layer}
    records_frame = (_read(lake.lake, "activation_records", where=where)
                     if lake.present["activation_records"] else pl.DataFrame())
    simulations_frame = (meaningful_pairs(_read(lake.lake, "simulations", where=where).filter(pl.col("error").is_null()))
                         if lake.present["simulations"] else pl.DataFrame())
    activations_frame = lake.activations.filter(pl.col("layer") == layer)
    explanations_frame = lake.explanations.filter(pl.col("layer") == layer)
    scores_frame = lake.scores.filter(pl.col("layer") == layer).sort("neuron", "explainer_id", "simulator_id")
    modes_frame = lake.simulation_modes.filter(pl.col("layer") == layer)
    scorer_frame = lake.scorer_results.filter(pl.col("layer") == layer).sort("neuron", "explainer_id", "method")
    output_frame = _read(lake.lake, "neuron_output_tokens", where={"layer": layer, "neuron": neurons})
    similar = similar or {}
    folder.mkdir(parents=True, exist_ok=True)
    shell = folder / pages.NEURON_PAGE
    _write(shell, pages.neuron_shell(lake.models, layer))
    files = [shell]
    chunks: dict[int, list[int]] = {}
    for neuron in neurons:
        chunks.setdefault(neuron // pages.NEURON_CHUNK, []).append(neuron)
    previous_of = {n: neurons[i - 1] if i > 0 else None for i, n in enumerate(neurons)}
    next_of = {n: neurons[i + 1] if i + 1 < len(neurons) else None for i, n in enumerate(neurons)}
    for chunk, members in chunks.items():
        first, last = members[0], members[-1]
        records = _rows_by_neuron(_chunk_of(records_frame, first, last), ["kind", "rank"])
        simulations = _rows_by_neuron(_chunk_of(simulations_frame, first, last), ["kind", "rank"])
        activations = _rows_by_neuron(_chunk_of(activations_frame, first, last))
        explanations = _rows_by_neuron(_chunk_of(explanations_frame, first, last))
        scores = _rows_by_neuron(_chunk_of(scores_frame, first, last))
        modes = _rows_by_neuron(_chunk_of(modes_frame, first, last))
        scorer_rows = _rows_by_neuron(_chunk_of(scorer_frame, first, last))
        output_tokens = _rows_by_neuron(_chunk_of(output_frame, first, last))
        sequences = _Sequences()
        entries = {}
        for neuron in members:
            entries[str(neuron)] = _neuron_entry(
                lake, layer, neuron, previous_of[neuron], next_of[neuron], sequences,
                records.get(neuron, []), simulations.get(neuron, []), (activations.get(neuron) or [None])[0],
                explanations.get(neuron, []), scores.get(neuron, []), modes.get(neuron, []),
                scorer_rows.get(neuron, []), (output_tokens.get(neuron) or [None])[0], similar.get(neuron),
            )
        payload = {"layer": layer, "chunk": chunk, "sequences": sequences.tokens, "neurons": entries}
        path = folder / pages.chunk_file(chunk)
        # Many files: written in place; the index is written last, atomically.
        path.write_text(f"{pages.CHUNK_CALLBACK}({script_json(payload)});\n", encoding="utf-8", errors="replace")
        files.append(path)
    return len(neurons), files


def _neuron_entry(
    lake: _Lake, layer: str, neuron: int, previous: int | None, following: int | None, sequences: _Sequences,
    neuron_records: list[dict], neuron_sims: list[dict], activation_row: dict | None, explanation_rows: list[dict],
    neuron_scores: list[dict], mode_rows: list[dict], neuron_scorers: list[dict], output_tokens: dict | None,
    similar: dict | None,
) -> dict[str, Any]:
    """One neuron in its chunk: the page body (rendered and escaped here) and the excerpt data the
    page's script shades."""
    stats = _neuron_stats(activation_row)

    # Shade relative to the neuron's maximum over the corpus (or over what is shown).
    scale = stats["max"] if stats and stats["max"] and stats["max"] > 0 else None
    if scale is None:
        candidates = [finite(r["max_activation"]) for r in neuron_records]
        for sim in neuron_sims:
            candidates.extend(finite(a) for a in sim["true_activations"] or [] if a is not None)
        candidates = [c for c in candidates if c is not None]
        scale = max(candidates) if candidates and max(candidates) > 0 else 1.0
    unit = scale / ACTIVATION_STEPS

    record_data: dict[str, list[dict[str, Any]]] = {}
    for row in neuron_records:
        item = {
            "rank": row["rank"],
            **sequences.item(row["sequence_id"], row["tokens"]),
            "max": finite(row["max_activation"]),
            "a": _quantized(row["activations"], unit),
        }
        if row["quantile_bin"] is not None:
            item["bin"] = row["quantile_bin"]
        record_data.setdefault(str(row["kind"]), []).append(item)

    mode_of = {(r["explainer_id"], r["simulator_id"]): r["mode"] for r in mode_rows}
    text_of = {r["explainer_id"]: r for r in explanation_rows}
    score_of = {(r["explainer_id"], r["simulator_id"]): finite(r["score"]) for r in neuron_scores}

    by_pair: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in neuron_sims:
        by_pair.setdefault((row["explainer_id"], row["simulator_id"]), []).append({
            "kind": row["kind"],
            "rank": row["rank"],
            **sequences.item(row["sequence_id"], row["tokens"]),
            "a": _quantized(row["true_activations"], unit),
            "s": _values(row["expected_activations"], 2),
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

    data = {"layer": layer, "neuron": neuron, "scale": scale, "unit": unit, "records": record_data, "simulations": sim_data}
    html = pages.neuron_body(
        layer, neuron, previous, following, stats, cards, data,
        {kind: len(items) for kind, items in record_data.items()},
        sum(len(pair["excerpts"]) for pair in sim_data),
        output_tokens=output_tokens,
        similar=similar,
    )
    return {"title": pages.neuron_title(layer, neuron), "html": html, "data": data}


def read_neuron(viewer_dir: str | Path, layer: str, neuron: int) -> dict[str, Any] | None:
    """A neuron as its page shows it (``title``, ``html`` body, excerpt ``data`` with tokens
    resolved and activations multiplied back from steps of ``data["unit"]``), read back from the viewer's data files; None when it is not there."""
    path = Path(viewer_dir) / pages.layer_dir(layer) / pages.chunk_file(int(neuron) // pages.NEURON_CHUNK)
    if not path.is_file():
        return None
    text = path.read_text(encoding="utf-8")
    prefix, suffix = f"{pages.CHUNK_CALLBACK}(", ");\n"
    if not (text.startswith(prefix) and text.endswith(suffix)):
        raise ValueError(f"{path} is not a neuron viewer data file")
    payload = json.loads(text[len(prefix):-len(suffix)])
    entry = payload["neurons"].get(str(int(neuron)))
    if entry is None:
        return None
    excerpts = [*(r for rs in entry["data"]["records"].values() for r in rs),
                *(e for pair in entry["data"]["simulations"] for e in pair["excerpts"])]
    unit = entry["data"]["unit"]
    for excerpt in excerpts:
        if "t" not in excerpt:
            excerpt["t"] = payload["sequences"][str(excerpt["seq"])]
        excerpt["a"] = [None if v is None else v * unit for v in excerpt["a"]]
    return entry


def _remove_stale(out_dir: Path, written: set[Path]) -> None:
    """Drop files of layers or neurons that are no longer in the lake (only in our own folder),
    and the one-page-per-neuron files of earlier versions."""
    if not (out_dir / MARKER).exists():
        return
    for folder in out_dir.glob("layer_*"):
        if not folder.is_dir():
            continue
        stale = [*folder.glob("neuron_*.html"), *folder.glob("neurons_*.js"), folder / "index.html", folder / pages.NEURON_PAGE]
        for path in stale:
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

    similar = _Similar(data)
    neuron_count = 0
    data_files = 0
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
        count, files = _neuron_chunks(data, summary.layer, folder, similar.of_layer(summary.layer))
        written.update(files)
        neuron_count += count
        data_files += len(files) - 1
        release_memory()

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
        pages=1 + 2 * len(layer_summaries),
        data_files=data_files,
    )
