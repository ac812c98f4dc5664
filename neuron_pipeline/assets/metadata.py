"""What each materialization tells the UI: rows, coverage per layer, score distributions, cost,
and where the Delta table is (path and version).

Run-level metadata goes on every partition's materialization of the run; per-layer metadata
(row count, coverage, a layer's score histogram and best neurons) goes on that layer's
partition only (``context.add_asset_metadata(..., partition_key=layer)``).
"""

from __future__ import annotations

import base64
import io
from typing import Any

import dagster as dg
import polars as pl

from neuron_pipeline.interp.reporting import label_or_id
from neuron_pipeline.lake import open_table, read_table, table_exists, table_path
from neuron_pipeline.lake.outcomes import failure_report

QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)
TOP_NEURONS = 10
# Attribute names under which explainer / simulator wrappers keep the object they wrap.
_WRAPPED = ("model", "chat_model", "value_model", "backend", "explainer", "simulator", "inner", "base")


def lake_metadata(lake, table: str) -> dict[str, Any]:
    """Where the table is and which Delta version this materialization wrote."""
    path = table_path(lake, table)
    metadata: dict[str, Any] = {"path": dg.MetadataValue.path(str(path)), "dagster/uri": str(path)}
    if table_exists(lake, table):
        metadata["delta_version"] = open_table(lake, table).version()
    return metadata


def publish_layers(context: dg.AssetExecutionContext, table: str, frame: pl.DataFrame, asset_key: str | None = None, **extra) -> None:
    """Per layer of the run: row count and coverage, on that layer's partition."""
    for layer in context.partition_keys:
        rows = frame.filter(pl.col("layer") == layer) if "layer" in frame.columns else frame
        publish_layer(context, table, layer, rows, asset_key, **extra)


def publish_layer(
    context: dg.AssetExecutionContext, table: str, layer: str | int, rows: pl.DataFrame, asset_key: str | None = None, **extra
) -> None:
    """Row count and coverage of one layer's rows, on that layer's partition (stages that work
    layer by layer publish each layer as it is written)."""
    metadata = {"dagster/row_count": rows.height, **layer_metadata(table, rows, **extra)}
    context.add_asset_metadata(metadata, asset_key=asset_key or table, partition_key=str(layer))


def layer_metadata(table: str, rows: pl.DataFrame, expected_neurons: int | None = None, lake=None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if rows.is_empty() or "neuron" not in rows.columns:
        return out
    neurons = rows["neuron"].n_unique()
    if table in ("neuron_activations", "activation_records"):
        out["neurons"] = neurons
        if expected_neurons:
            out["coverage"] = dg.MetadataValue.float(neurons / expected_neurons)
        if table == "activation_records":
            counts = rows.group_by("kind").len().sort("kind")
            out["records_per_kind"] = dg.MetadataValue.json(dict(zip(counts["kind"].to_list(), counts["len"].to_list())))
    elif table == "explanations":
        ok = rows.filter(pl.col("error").is_null())
        out["neurons_explained"] = ok["neuron"].n_unique()
        out["coverage"] = dg.MetadataValue.md(_markdown(_coverage(rows, ["explainer_id"], ok=pl.col("error").is_null())))
    elif table == "simulations":
        ok = pl.col("error").is_null()
        out["neurons_simulated"] = rows.filter(ok)["neuron"].n_unique()
        out["coverage"] = dg.MetadataValue.md(_markdown(_coverage(rows, ["explainer_id", "simulator_id"], ok=ok)))
    elif table == "scores":
        out.update(score_metadata(rows, lake))
        out["coverage"] = dg.MetadataValue.md(
            _markdown(_coverage(rows, ["explainer_id", "simulator_id"], ok=pl.col("score").is_not_null()))
        )
    return out


def _coverage(rows: pl.DataFrame, by: list[str], ok: pl.Expr | None = None) -> pl.DataFrame:
    # Labels first: the ids are hashes (interp/reporting.py).
    labels = [c.replace("_id", "_label") for c in by if c.replace("_id", "_label") in rows.columns]
    aggs = [pl.col(label).drop_nulls().first() for label in labels] + [pl.col("neuron").n_unique().alias("neurons")]
    if ok is not None:
        aggs.append(pl.col("neuron").filter(ok).n_unique().alias("with_result"))
    frame = rows.group_by(by).agg(aggs).sort(by)
    return frame.select(*labels, *by, *[c for c in frame.columns if c not in labels and c not in by])


def score_metadata(scores: pl.DataFrame, lake=None) -> dict[str, Any]:
    """Mean, quantiles, a histogram image and the best neurons (with their explanations)."""
    valid = scores["score"].drop_nulls()
    out: dict[str, Any] = {"neurons_scored": int(valid.len()), "null_scores": int(scores["score"].null_count())}
    if valid.len() == 0:
        return out
    out["mean_score"] = float(valid.mean())
    out["median_score"] = float(valid.median())
    for q in QUANTILES:
        out[f"p{int(q * 100)}_score"] = float(valid.quantile(q, interpolation="linear"))
    out["frac_score_ge_0_8"] = float((valid >= 0.8).mean())
    out["scores_by_pair"] = dg.MetadataValue.md(_markdown(scores_by_pair(scores)))
    out["score_histogram"] = dg.MetadataValue.md(score_histogram_markdown(scores))
    out["top_neurons"] = top_neurons_table(scores, lake)
    return out


def scores_by_pair(scores: pl.DataFrame) -> pl.DataFrame:
    """The headline figures per (explainer, simulator) pair with its neuron count: the mean over
    all rows mixes pairs (an LLM's scores with the baseline's)."""
    labels = [c for c in ("explainer_label", "simulator_label") if c in scores.columns]
    return (
        scores.group_by("explainer_id", "simulator_id")
        .agg(
            *[pl.col(c).drop_nulls().first() for c in labels],
            pl.col("score").is_not_null().sum().alias("neurons_scored"),
            pl.col("score").is_null().sum().alias("neurons_null"),
            pl.col("score").mean().alias("mean_score"),
            (pl.col("score") >= 0.8).sum().alias("score_ge_0_8"),
        )
        .sort("explainer_id", "simulator_id")
        .select(*labels, "explainer_id", "simulator_id", "neurons_scored", "neurons_null", "mean_score", "score_ge_0_8")
    )


def score_histogram_markdown(scores: pl.DataFrame) -> str:
    """A PNG histogram of scores per (explainer, simulator), embedded as a data URI."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 2.6), dpi=80)
    bins = [i / 20 for i in range(-20, 21)]
    for (explainer_id, simulator_id), group in scores.filter(pl.col("score").is_not_null()).group_by(
        "explainer_id", "simulator_id", maintain_order=True
    ):
        baseline = explainer_id.startswith("baseline-") and simulator_id.startswith("baseline-")
        ax.hist(
            group["score"].to_list(),
            bins=bins,
            alpha=0.6,
            color="grey" if baseline else None,
            label=_pair_label(group, explainer_id, simulator_id),
        )
    ax.axvline(0.8, color="black", linestyle="--", linewidth=0.8)
    ax.set_xlabel("score (correlation)")
    ax.set_ylabel("neurons")
    ax.set_xlim(-1, 1)
    ax.legend(fontsize=6, loc="upper left")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    encoded = base64.b64encode(buffer.getvalue()).decode()
    return f"![score histogram](data:image/png;base64,{encoded})"


def _pair_label(rows: pl.DataFrame, explainer_id: str, simulator_id: str) -> str:
    """"explainer label → simulator label" from a frame's label columns (the ids when absent)."""
    def first(column: str, fallback: str) -> str:
        values = rows[column].drop_nulls() if column in rows.columns else None
        return values[0] if values is not None and values.len() else fallback

    return f"{first('explainer_label', explainer_id)} → {first('simulator_label', simulator_id)}"


def top_neurons_table(scores: pl.DataFrame, lake=None, n: int = TOP_NEURONS) -> dg.TableMetadataValue:
    best = scores.filter(pl.col("score").is_not_null()).sort("score", descending=True).head(n)
    texts = {}
    if lake is not None and best.height:
        explanations = read_table(
            lake,
            "explanations",
            where={"layer": best["layer"].unique().to_list()},
            columns=["layer", "neuron", "explainer_id", "explanation"],
        )
        texts = {(r["layer"], r["neuron"], r["explainer_id"]): r["explanation"] for r in explanations.iter_rows(named=True)}
    records = [
        dg.TableRecord(
            {
                "layer": row["layer"],
                "neuron": int(row["neuron"]),
                "score": round(float(row["score"]), 4),
                "explainer": label_or_id(row.get("explainer_label"), row["explainer_id"]),
                "simulator": label_or_id(row.get("simulator_label"), row["simulator_id"]),
                "explainer_id": row["explainer_id"],
                "simulator_id": row["simulator_id"],
                "explanation": (texts.get((row["layer"], row["neuron"], row["explainer_id"])) or "")[:200],
            }
        )
        for row in best.iter_rows(named=True)
    ]
    schema = dg.TableSchema(
        columns=[
            dg.TableColumn("layer", "string"),
            dg.TableColumn("neuron", "int"),
            dg.TableColumn("score", "float"),
            dg.TableColumn("explainer", "string"),
            dg.TableColumn("simulator", "string"),
            dg.TableColumn("explainer_id", "string"),
            dg.TableColumn("simulator_id", "string"),
            dg.TableColumn("explanation", "string"),
        ]
    )
    return dg.MetadataValue.table(records=records, schema=schema)


# --------------------------------------------------------------------------- failures


def failure_metadata(explanations: pl.DataFrame | None, simulations: pl.DataFrame | None) -> dict[str, Any]:
    """Per explainer / simulator of the run: neurons attempted, failed, unusable, first error —
    as a table for the UI and as JSON (``failure_report``) the CLI reads back (lake/outcomes.py)."""
    report = failure_report(explanations, simulations)
    if report.is_empty():
        return {}
    shown = report.with_columns(pl.col("first_error").fill_null("").str.slice(0, 160))
    return {
        "failures": dg.MetadataValue.md(_markdown(shown)),
        "neurons_failed": int(report["failed"].sum() + report["unusable"].sum()),
        "failure_report": dg.MetadataValue.json(report.to_dicts()),
    }


# --------------------------------------------------------------------------- cost


def _new_tokens(obj: Any, depth: int = 0, seen: set | None = None) -> tuple[int, int]:
    """New (paid) prompt and completion tokens counted by the LLM client inside ``obj``."""
    seen = set() if seen is None else seen
    if obj is None or id(obj) in seen or depth > 4:
        return 0, 0
    seen.add(id(obj))
    if hasattr(obj, "new_prompt_tokens"):
        return int(getattr(obj, "new_prompt_tokens", 0) or 0), int(getattr(obj, "new_completion_tokens", 0) or 0)
    prompt = completion = 0
    for name in _WRAPPED:
        p, c = _new_tokens(getattr(obj, name, None), depth + 1, seen)
        prompt, completion = prompt + p, completion + c
    return prompt, completion


def _usd(entry: Any, prompt: int, completion: int) -> float:
    # The Batch API charges half the online price.
    factor = 0.5 if getattr(entry, "batch", False) else 1.0
    return factor * (prompt * entry.usd_per_million_prompt + completion * entry.usd_per_million_completion) / 1e6


def cost_metadata(entries: list[tuple[Any, Any]], rows: pl.DataFrame | None = None, id_attr: str = "explainer_id") -> dict[str, Any]:
    """Tokens and dollars: new this run (from the clients), and for the rows of the run's layers
    (from the tokens recorded with each row, at the configured prices)."""
    new_usd, table_usd = 0.0, 0.0
    for entry, obj in entries:
        prompt, completion = _new_tokens(obj)
        new_usd += _usd(entry, prompt, completion)
        if rows is not None and {"prompt_tokens", "completion_tokens"} <= set(rows.columns):
            mine = rows.filter(pl.col(id_attr) == getattr(obj, id_attr, None))
            table_usd += _usd(entry, int(mine["prompt_tokens"].sum() or 0), int(mine["completion_tokens"].sum() or 0))
    out: dict[str, Any] = {"usd_new": round(new_usd, 6)}
    if rows is not None and {"prompt_tokens", "completion_tokens"} <= set(rows.columns):
        out["usd_in_layers"] = round(table_usd, 6)
    return out


def spend(entries: list[tuple[Any, Any]]) -> tuple[int, float]:
    """New (paid) tokens and dollars so far of the LLM clients inside ``entries`` ((settings,
    explainer or simulator) pairs); a client shared by several entries counts once."""
    seen: set = set()
    tokens, usd = 0, 0.0
    for entry, obj in entries:
        prompt, completion = _new_tokens(obj, seen=seen)
        tokens += prompt + completion
        usd += _usd(entry, prompt, completion)
    return tokens, usd


def _markdown(frame: pl.DataFrame) -> str:
    if frame.is_empty():
        return "(none)"
    header = "| " + " | ".join(frame.columns) + " |\n|" + "---|" * len(frame.columns) + "\n"
    body = "\n".join(
        "| " + " | ".join((f"{v:.3f}" if isinstance(v, float) else str(v)).replace("|", "\\|") for v in row) + " |"
        for row in frame.iter_rows()
    )
    return header + body


# --------------------------------------------------------------------------- simulation faithfulness

# A neuron whose simulations saw less than this share of the value tokens' mass, on average, is
# flagged: its expected values rest on the few digits a top-k API listed (DESIGN.md, measured facts).
VALUE_MASS_WARNING = 0.9


def low_value_mass(simulations: pl.DataFrame, threshold: float = VALUE_MASS_WARNING) -> pl.DataFrame:
    """Per (layer, neuron, simulator_id): the mean ``value_mass`` of its simulations, for those
    below ``threshold`` (rows without a value mass are left out), lowest first."""
    if "value_mass" not in simulations.columns:
        return pl.DataFrame(schema={"layer": pl.String, "neuron": pl.Int32, "simulator_id": pl.String, "value_mass": pl.Float64})
    return (
        simulations.filter(pl.col("value_mass").is_not_null())
        .group_by("layer", "neuron", "simulator_id")
        .agg(pl.col("value_mass").mean())
        .filter(pl.col("value_mass") < threshold)
        .sort("value_mass", "layer", "neuron")
    )


def value_mass_metadata(simulations: pl.DataFrame) -> dict[str, Any]:
    """The simulations' captured value mass: its mean, and the neurons under the warning line."""
    known = simulations["value_mass"].drop_nulls() if "value_mass" in simulations.columns else pl.Series([], dtype=pl.Float64)
    low = low_value_mass(simulations)
    out: dict[str, Any] = {
        "value_mass_mean": round(float(known.mean()), 4) if known.len() else None,
        f"neurons_value_mass_below_{VALUE_MASS_WARNING}": low.height,
    }
    if low.height:
        out["value_mass_warning"] = dg.MetadataValue.md(
            f"{low.height} neuron(s) saw under {VALUE_MASS_WARNING:.0%} of the value tokens' probability mass "
            "(a top-k API dropped the digits): their simulated values are unreliable.\n\n" + _markdown(low.head(20))
        )
    return out
