"""Render RELIABILITY.md from the figures the reliability and security tests wrote.

    .venv/bin/pytest tests/test_reliability.py tests/test_security.py
    .venv/bin/python tests/reliability/report.py            # writes RELIABILITY.md

The tests write artifacts/reliability.json (git-ignored); this turns it into the table of faults,
how each was injected, how many times, and what was lost.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ARTIFACT = ROOT / "artifacts" / "reliability.json"
OUT = ROOT / "RELIABILITY.md"

FAULT_LABELS = {
    "429": ("HTTP 429, no Retry-After", "retried after exponential backoff with jitter"),
    "429:1": ("HTTP 429 with `Retry-After: 1`", "retried after the server's delay"),
    "500": ("HTTP 500", "retried"),
    "503": ("HTTP 503", "retried"),
    "reset": ("connection reset (TCP RST, no answer)", "retried"),
    "slow:4": ("timeout (answer after 4 s; client timeout 2 s)", "retried"),
    "truncated": ("truncated JSON body (200)", "retried"),
    "missing_choices": ("valid JSON without `choices` (200)", "retried"),
    "no_choices": ("valid JSON with `choices: []` (200)",
                   "explainer: the neuron's error is recorded and it is explained on the next run; simulator: retried"),
    "empty_content": ("valid JSON with an empty completion (200)",
                      "explainer: the neuron's error is recorded and it is explained on the next run; simulator: text unused"),
}


def _cell(value) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _scrub(text: str) -> str:
    """Temporary paths and ports vary from run to run."""
    text = re.sub(r"/tmp/pytest-of-[^/]+/pytest-\d+/", "<tmp>/", text)
    return re.sub(r"127\.0\.0\.1:\d{5}", "127.0.0.1:<port>", text)


def render(data: dict) -> str:
    out = [
        "# Reliability: faults, crashes and bad input lose nothing",
        "",
        "Every figure below comes from a run of the tests that inject the fault "
        "(`tests/test_reliability.py`, `tests/test_security.py`); they write `artifacts/reliability.json` "
        "and `python tests/reliability/report.py` renders this file from it. Re-run both to refresh it:",
        "",
        "```bash",
        ".venv/bin/pytest tests/test_reliability.py tests/test_security.py",
        ".venv/bin/python tests/reliability/report.py",
        "```",
        "",
        "The LLM API is `tests/fake_openai.py`, a real OpenAI-compatible HTTP server on 127.0.0.1 with scripted "
        "and random fault injection; the pipeline is the real one (Dagster assets, Delta tables, the bundled "
        "SmolLM2 as the subject model, `neuron-pipeline run` as users run it). Processes that are killed are "
        "forked from a pre-imported parent (`tests/reliability/zygote.py`) so a dozen runs fit in a few minutes; "
        "each is its own process, killed with SIGKILL.",
        "",
        "## Summary",
        "",
    ]
    rows = []
    api = data.get("api_faults")
    if api:
        for fault, count in sorted(api["injected"].items(), key=lambda kv: list(FAULT_LABELS).index(kv[0]) if kv[0] in FAULT_LABELS else 99):
            label, handling = FAULT_LABELS.get(fault, (fault, ""))
            rows.append([label, f"fake API server: each request faulty with p = 0.3 ({api['fault_rate']:.1%} drawn)", count,
                         f"nothing ({handling})"])
    down = data.get("api_down")
    if down:
        rows.append(["API failing for good (every call HTTP 503)", "fake API server, fault rate 100%", down["requests"],
                     f"the run stops at the first call that runs out of retries, in one line (exit {down['exit']}): "
                     "`" + _scrub(down["line"])[:110] + "...`"])
    crash = data.get("crash_resume")
    if crash:
        stage_names = {"capture": "during capture (forward pass, quality gates)",
                       "explain": "during explanation (calls in flight)", "simulate": "during simulation (calls in flight)",
                       "score": "during scoring", "summary": "during the summary and viewer"}
        for stage, count in sorted(crash["kills_per_stage"].items(), key=lambda kv: list(stage_names).index(kv[0]) if kv[0] in stage_names else 99):
            rows.append([f"SIGKILL {stage_names.get(stage, stage)}", "`neuron-pipeline run` killed, then re-run", count,
                         "nothing: same tables as an uninterrupted run, no duplicate rows, every Delta version readable, "
                         f"{crash['repeated_answered_calls']} answered LLM calls paid twice"])
    stops = data.get("interrupts")
    if stops:
        rows.append(["SIGINT, SIGTERM, two SIGINTs, terminate from the UI",
                     "sent to `neuron-pipeline run` in capture, explanations and simulations, then re-run",
                     len(stops["stops"]), "nothing: exit 130 with one line, Dagster run canceled, no pool slot held; "
                     "same tables as an uninterrupted run after resuming"])
    mid = data.get("crash_mid_write")
    if mid:
        orphans = sum(k["data_files_left_behind"] for k in mid["kills"])
        uncommitted = sum(not k["committed"] for k in mid["kills"])
        rows.append(["SIGKILL in the middle of a Delta write", f"a process replacing a {mid['rows']:,}-row slice, killed "
                     "when its data file appears on disk (and once earlier)", len(mid["kills"]),
                     f"nothing: {uncommitted} writes never committed, readers saw the previous slice whole; "
                     f"{orphans} unreferenced data files left on disk; the next write succeeded"])
    concurrent = data.get("concurrent_writers")
    if concurrent:
        rows.append(["two processes materializing the same layers at once", "two `neuron-pipeline run` started together, "
                     "a reader polling every table", 1, f"nothing: both exit 0; {concurrent['reader_snapshots']} snapshots read, "
                     f"{concurrent['half_written_slices_seen']} half-written slices seen"])
    conflicts = data.get("commit_conflicts")
    if conflicts:
        rows.append(["Delta commit conflicts (optimistic concurrency)", f"{conflicts['writers']} threads replacing one "
                     f"partition, {conflicts['writes']} writes", conflicts["conflicts_retried"],
                     f"nothing: {conflicts['commits']} of {conflicts['writes']} commits landed; "
                     f"{conflicts['half_written_slices_seen']} half-written slices in {conflicts['reader_snapshots']} reads"])
    race = data.get("create_race")
    if race:
        rows.append(["two writers creating a table at once", "a big write to a missing table; a small one commits "
                     "version 0 while the big one's data file is being written", 1,
                     f"nothing: one writer's slice, whole ({race['rows_after']:,} rows, {race['mixed_slices']} mixed); "
                     "before the fix the slice held both writers' rows"])
    bad = data.get("bad_input")
    if bad:
        rows.append(["bad input (table of cases below)", "`neuron-pipeline run` with the bad config / flag / file", len(bad),
                     "nothing written; one error line, exit status 2"])
    memory = data.get("capture_memory")
    if memory:
        rows.append(["8x larger corpus (capture memory)", f"{memory['small']['sequences']} vs {memory['large']['sequences']} "
                     "sequences through capture", 1, f"peak grew {memory['growth_mib']:.1f} MiB (bound {memory['bound_mib']:.1f} MiB; "
                     f"a dense tokens x neurons matrix would be {memory['large']['dense_matrix_mib']:.0f} MiB)"])
    key = data.get("security_key")
    if key:
        rows.append(["API key leak", f"sentinel key; a server that echoes it in its errors ({key['401_answers_echoing_key']} HTTP 401s)",
                     key["requests_with_key"], f"found in {len(key['key_found_in'])} of {key['files_scanned']} files "
                     f"({key['bytes_scanned'] / 2**20:.1f} MiB: lake, Dagster instance, viewer, CLI output)"])
    prompts = data.get("security_prompts")
    if prompts:
        rows.append(["corpus text breaking the prompt format", f"tabs, newlines, markers, braces in {prompts['distinct_hostile_tokens']} "
                     "distinct tokens", prompts["explainer_excerpts"] + prompts["simulator_excerpts"],
                     "nothing: every excerpt in every request has exactly one line per token"])
    viewer = data.get("security_viewer")
    if viewer:
        rows.append(["markup / script in corpus and explanations", "HTML and `</script>` payloads through the pipeline into "
                     "the viewer", viewer["pages"], "shown as text: no inline script, no event handler, no injected element"])
    out.append(_table(["fault", "how injected", "times injected", "what was lost"], rows))

    if api:
        out += ["", "## 1. API faults during a whole layer", "",
                f"One layer (8 neurons) materialized through Dagster with the OpenAI-compatible backend as explainer and "
                f"simulator (prompt-logprob mode), `max_retries: {api['max_retries']}`, `timeout_s: 2`; each request drew a "
                f"fault with probability 30% ({api['requests']} requests, {api['fault_rate']:.1%} faulty).", ""]
        kinds = sorted(set(api["counted_by_client"]["explainer"]) | set(api["counted_by_client"]["simulator"]))
        out.append(_table(["fault kind counted (`llm_faults` metadata)", "explainer", "simulator"],
                          [[k, api["counted_by_client"]["explainer"].get(k, 0), api["counted_by_client"]["simulator"].get(k, 0)] for k in kinds]))
        out += ["", f"- First run: {api['explained_first_run']} of {api['neurons']} neurons explained; "
                f"{len(api['failed_with_error_first_run'])} recorded as failed with its error in `explanations.error` "
                f"(neurons {api['failed_with_error_first_run']}); {api['simulations_failed_first_run']} simulations failed.",
                f"- Every count the client reports equals what the server injected, kind by kind (timeouts: at least).",
                f"- Retries bounded: at most max_retries + 1 = {api['max_retries'] + 1} attempts per call; "
                f"{api['requests_by_endpoint']} requests in all.",
                f"- Re-run on a healthy server: {api['rerun_requests']} requests, only for what had failed; "
                f"{api['rerun_repeated_answered_calls']} calls already answered were sent again; "
                f"{api['explained_after_rerun']} of {api['neurons']} neurons explained."]
    if crash:
        out += ["", "## 2. SIGKILL and resume", "",
                f"`neuron-pipeline run` over 2 layers x 8 neurons, killed {len(crash['kills'])} times in a row at random "
                f"points (seed {crash['seed']}; `NEURON_PIPELINE_CRASH_SEED` picks others), then run to completion "
                f"({crash['seconds']:.0f} s in all).", ""]
        out.append(_table(["kill", "stage", "trigger", "s into the run", "tables committed before the kill",
                           "requests sent", "LLM answers stored"],
                          [[i + 1, k["stage"], k["parameter"], k["seconds_into_run"], ", ".join(k["tables_committed"]) or "-",
                            k["new_requests"], k["cache_rows_added"]] for i, k in enumerate(crash["kills"])]))
        out += ["", f"- After the final run: rows {crash['rows']}, equal to an uninterrupted run's; no duplicate key; "
                f"every version of every table read back with deltalake and polars ({crash['versions_checked']}), each "
                "with whole slices only; the SQLite LLM cache passes `PRAGMA integrity_check`.",
                f"- Calls answered before a kill and sent again: {crash['repeated_answered_calls']}. Calls on the wire at a "
                f"kill (answered to a dead process, or not at all) and sent again: {crash['repeated_calls_in_flight_at_kill']}. "
                f"An uninterrupted run makes {crash['reference_requests']} requests; the interrupted ones made "
                f"{crash['requests_total']} in all."]
    if stops:
        out += ["", "### Stopped on request (`tests/test_interrupts.py`)", "",
                "The same run stopped five times in a row by a signal or a terminate request, then resumed; each stop "
                "must exit with status 130 and one line on stderr (no traceback), leave no Dagster run active (the last "
                "one canceled) and no `gpu` pool slot claimed.", ""]
        out.append(_table(["stop", "s from the request to exit", "the line on stderr"],
                          [[k["stop"], k["seconds_to_exit"], "`" + _scrub(k["stderr"]) + "`"] for k in stops["stops"]]))
        out += ["", f"- After resuming: the lake equals an uninterrupted run's: {stops['resumed_identical']}."]
    if concurrent or conflicts:
        out += ["", "## 3. Concurrent writers", ""]
        if concurrent:
            out.append(f"Two `neuron-pipeline run` processes on the same lake and layers at once: exit codes "
                       f"{concurrent['exit_codes']}, {concurrent['seconds']:.0f} s; a reader read {concurrent['reader_snapshots']} "
                       f"snapshots meanwhile (versions seen per table {concurrent['versions_seen_by_reader']}) and never "
                       "saw a partial slice; the final tables equal an uninterrupted run's.")
        if conflicts:
            out.append("")
            out.append(f"`write_table` under contention: {conflicts['writers']} threads x 3 writes to one partition; deltalake "
                       f"rejected {conflicts['conflicts_retried']} commits (`CommitFailedError`), each retried on the new "
                       f"table state (bounded: `COMMIT_ATTEMPTS` = 8, jittered backoff); all {conflicts['commits']} landed.")
    if bad:
        out += ["", "## 4. Bad input", "", f"{len(bad)} cases (`tests/test_cli.py` has 11 more). Each exits with status 2, "
                "prints one line, and writes nothing (the float16 overflow case has tokenized the corpus when the "
                "forward pass overflows: only `corpus_tokens` exists, no table of any layer).", ""]
        out.append(_table(["case", "the one line (after `neuron-pipeline: error: `)"],
                          [[case, _scrub(result["error"])] for case, result in bad.items()]))
    if memory:
        small, large = memory["small"], memory["large"]
        out += ["", "## 5. Memory", "",
                f"Peak resident memory of `capture_layers` alone (VmHWM reset after loading; every neuron of a Llama "
                f"with {small['neurons']} neurons, random weights):", ""]
        out.append(_table(["sequences", "tokens", "peak growth during capture (MiB)", "dense tokens x neurons matrix (MiB)"],
                          [[r["sequences"], r["tokens"], f"{r['capture_growth_mib']:.1f}", f"{r['dense_matrix_mib']:.0f}"] for r in (small, large)]))
        chunks = data.get("explain_chunks")
        out += ["", f"8x the corpus: +{memory['growth_mib']:.1f} MiB (bound: 15% of the small run's growth + 24 MiB = "
                f"{memory['bound_mib']:.1f} MiB)."]
        if chunks:
            out.append(f"Explanations (and simulations) are requested in a sliding window of neurons across layers "
                       f"({chunks['neurons']} neurons with a window of {chunks['workers']}: at most "
                       f"{chunks['most_in_progress']} in progress at once), and every LLM answer is committed to the SQLite "
                       "cache as soon as it arrives, not at the end of its batch (tested: while a batch is in flight the "
                       "cache already holds every answer that came back).")
    if key or prompts or viewer:
        out += ["", "## 6. Security", ""]
        if key:
            out.append(f"- API key: the sentinel `sk-SENTINEL-9f8e7d` went out in {key['requests_with_key']} requests; "
                       f"the first run met {key['401_answers_echoing_key']} answers with HTTP 401 that quoted it (stored as "
                       "`explanations.error` with the key replaced by `***`; the run stopped with one line, exit "
                       f"{key['first_run_exit']}). A byte search (plain, hex, UTF-16) of {key['files_scanned']} files "
                       f"({', '.join(key['folders'])}) and of the CLI output found it {len(key['key_found_in'])} times.")
        if prompts:
            out.append(f"- Prompt format: {prompts['explainer_excerpts']} explainer and {prompts['simulator_excerpts']} "
                       f"simulator excerpts ({prompts['lines']} lines) in the requests the server received, over a corpus "
                       "with tabs, newlines, `<start>`/`<end>`, `{records}`-style placeholders and backslashes: each "
                       "excerpt has exactly one line per token, one tab per line, and reads back (unescaped) as the "
                       "excerpt's tokens.")
        if viewer:
            out.append(f"- Viewer: {viewer['pages']} pages parsed ({viewer['tags']} elements, {viewer['scripts']} scripts): "
                       "hostile corpus text and explanations appear only as escaped text or inside JSON with `<`/`>` "
                       "escaped; no inline script, no `on*` attribute, no `javascript:` URL, CSP on every page.")
        listen = data.get("security_listen")
        if listen:
            out.append(f"- Listening sockets while the pipeline ran ({listen['samples']} samples from /proc): only the fake "
                       f"API server on {_scrub(', '.join(listen['listening']))}. `make dev` binds Dagster's UI to "
                       f"127.0.0.1; no wildcard bind in {listen['files_checked']} source files.")
    out += ["", "## What changed to get here", "",
            "- `lake/io.py`: `write_table` redoes a write whose commit was lost to a concurrent writer (deltalake's "
            "`CommitFailedError`), at most `COMMIT_ATTEMPTS` times with jittered backoff; a write that creates a table "
            "runs without deltalake's own commit retry, which rebased a concurrent create into a plain append and "
            "left a slice with both writers' rows (found by the two-process test: duplicate keys in `simulations`); "
            "`check_table_schema` for the CLI's pre-flight.",
            "- `llm/cache.py` + `llm/openai_api.py`: each API answer is stored the moment it arrives "
            "(`submit_chat` / `submit_value_distributions` hand out one future per call) instead of after its whole "
            "batch, so a crash loses only the calls on the wire; an answer with no text at all from a server is not "
            "cached, so the next run asks again instead of replaying the glitch forever.",
            "- `cli.py` / `llm/__init__.py` (`check_llm_settings`) / `llm/openai_api.py` (`require_key`, "
            "`check_reachable`): before anything is written, `neuron-pipeline run` checks that the lake is a folder, "
            "that tables already there have our schema, every prompt template, API keys, that each API server "
            "accepts connections and does not reject the key (`GET /models` answering 401/403). A run that stops "
            "later (a quality gate after every call failed, an API failing for good, a spent budget) ends in one line "
            "and exit status 1 instead of a traceback; the summary ends with the API faults met.",
            "- `interp/prompts.py`: `prompt:` may be the path of one's own template file; templates with unknown "
            "placeholders or stray braces are refused up front (they used to fail mid-run).",
            "- `assets/resources.py`: `LLMResource.faults()`; `usage()` adds them as `llm_faults`, so the "
            "explanations and simulations metadata carry the fault counts per kind.",
            "- `assets/run_owner.py`: a run killed outright kept its `gpu` pool slot, so every later model step "
            "waited forever (seen when the crash tests shared one instance); CLI runs now carry host and pid tags, "
            "and `neuron-pipeline run` first fails this host's runs whose process is gone and frees their slots "
            "(`tests/test_run_owner.py` reproduces it with a SIGKILLed GPU step).", ""]
    return "\n".join(out)


def main() -> int:
    if not ARTIFACT.is_file():
        print(f"{ARTIFACT} not found: run the reliability and security tests first", file=sys.stderr)
        return 1
    OUT.write_text(render(json.loads(ARTIFACT.read_text())))
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
