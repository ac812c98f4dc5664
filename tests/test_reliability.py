"""Faults, crashes and bad input lose nothing (issue 6).

Each test injects a fault into the real pipeline and checks what survived:

1. API faults: a fake OpenAI-compatible server (tests/fake_openai.py, real sockets) answers 30% of
   the explainer's and simulator's requests with 429s (with and without Retry-After), 500/503,
   connection resets, timeouts, truncated JSON or valid JSON without usable content; a layer
   still completes through Dagster, every neuron is explained or carries its error, retries stay
   bounded, and the run's metadata counts every fault kind exactly. An API that fails for good
   ends the run in one line.
2. Crash and resume: `neuron-pipeline run` is killed with SIGKILL during capture, explanation,
   simulation and scoring, then re-run to completion: no duplicate or missing rows, no paid call
   made twice, every Delta version readable, and the result equals an uninterrupted run.
   A process killed in the middle of a Delta write leaves the previous slice whole.
3. Concurrent writers: two processes materialize the same layers at once while a reader polls:
   both finish, the reader never sees a half-written slice; commit conflicts are retried (bounded),
   and two writers creating a table at once leave one writer's slice, not both.
4. Bad input: a table of cases, each a one-line error with exit status 2 and nothing written.
5. Memory: capture's peak memory does not grow with the corpus; LLM answers are stored as they
   arrive, explanations requested in bounded chunks.

Figures go to artifacts/reliability.json; `python tests/reliability/report.py` renders
RELIABILITY.md from them.
"""

from __future__ import annotations

import collections
import json
import os
import random
import sqlite3
import sys
import threading
import time
from pathlib import Path

import dagster as dg
import polars as pl
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from conftest import small_settings  # noqa: E402
from fake_openai import FakeOpenAIServer  # noqa: E402
from reliability.lake_checks import (  # noqa: E402
    cache_integrity,
    cache_rows,
    check_all_versions,
    delta_version,
    duplicate_keys,
    final_content,
    incomplete_slices,
    record,
    settings_variables,
    tables_in,
    write_small_corpus,
)
from reliability.zygote import Zygote  # noqa: E402

from neuron_pipeline.lake import read_table, table_path  # noqa: E402
from neuron_pipeline.llm.openai_api import PROBE_TEXT  # noqa: E402

KEY_ENV = "NEURON_PIPELINE_RELIABILITY_KEY"
LAYER_ASSETS = ["neuron_activations", "activation_records", "explanations", "simulations", "scores", "layer_summary"]
NEURONS = set(range(8))


def _api(fake: FakeOpenAIServer, **extra) -> dict:
    return {"backend": "openai", "model": "fake", "base_url": fake.base_url, "api_key_env": KEY_ENV, **extra}


def _materialize(defs, keys, instance, **kwargs):
    result = dg.materialize(
        list(defs.assets), selection=[dg.AssetKey(k) for k in keys], resources=defs.resources, instance=instance, **kwargs
    )
    assert result.success
    return {
        e.asset_key.to_user_string(): {k: v.value for k, v in e.materialization.metadata.items()}
        for e in result.get_asset_materialization_events()
    }


def _is_probe(request) -> bool:
    return isinstance(request.body, dict) and request.body.get("prompt") == PROBE_TEXT


def _body_key(request) -> str:
    return json.dumps(request.body, sort_keys=True)


def _endpoint(request) -> str:
    return "chat" if request.path.rstrip("/").endswith("/chat/completions") else "completions"


def _endpoint_of(body_key: str) -> str:
    return "chat" if '"messages"' in body_key else "completions"


# --- 1. API faults ---------------------------------------------------------------------------------

# What the fake injects, per request, and the fault kind the client must count for it.
FAULT_MIX = ["429", "429:1", "500", "503", "reset", "slow:4", "truncated", "missing_choices", "no_choices", "empty_content"]
FAULT_RATE = 0.30
MAX_RETRIES = 4
TIMEOUT_S = 2.0


def expected_kind(endpoint: str, fault: str) -> str | None:
    name = fault.partition(":")[0]
    if name == "429":
        return "rate_limited"
    if name in ("500", "503"):
        return "server_error"
    if name == "reset":
        return "connection"
    if name == "slow":
        return "timeout"
    if name in ("truncated", "missing_choices"):
        return "malformed"
    if name == "no_choices":  # chat: an answer without text; completions: unreadable
        return "unusable_content" if endpoint == "chat" else "malformed"
    if name == "empty_content":  # the completions endpoint's text is not used (only its logprobs)
        return "unusable_content" if endpoint == "chat" else None
    raise AssertionError(fault)


def inject_random_faults(fake: FakeOpenAIServer, rate: float, kinds: list[str], seed: int) -> None:
    """One draw per request: with probability ``rate`` a fault chosen uniformly from ``kinds``."""
    rng = random.Random(seed)

    def next_fault():
        with fake._lock:
            return rng.choice(kinds) if rng.random() < rate else None

    fake._next_fault = next_fault


@pytest.mark.slow
def test_a_layer_completes_with_30_percent_of_api_calls_faulty(tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "sk-reliability-faults")
    from neuron_pipeline.definitions import build_definitions

    with FakeOpenAIServer(max_lifetime_s=600) as fake:
        api = _api(fake, max_retries=MAX_RETRIES, timeout_s=TIMEOUT_S)
        corpus = {"source": str(write_small_corpus(tmp_path / "corpus")), "max_sequences": 48}
        settings = small_settings(tmp_path / "lake", layers="0", corpus=corpus, explainers=[api], simulators=[api])
        lake = settings.lake_location.folder
        defs = build_definitions(settings)
        instance = dg.DagsterInstance.ephemeral()
        _materialize(defs, ["corpus_tokens"], instance)

        inject_random_faults(fake, FAULT_RATE, FAULT_MIX, seed=6)
        started = time.monotonic()
        first = _materialize(defs, LAYER_ASSETS, instance, partition_key="0")
        first_seconds = time.monotonic() - started
        faulty_posts = fake.posts()
        del fake._next_fault  # the server is healthy again

        # Every neuron: explained, or recorded as failed with its error.
        explanations = read_table(lake, "explanations", where={"layer": "0"})
        assert set(explanations["neuron"].to_list()) == NEURONS and explanations.height == 8
        for row in explanations.iter_rows(named=True):
            assert (row["error"] is None) == bool(row["explanation"]), row
            if row["error"] is not None:
                assert row["error"].strip() and "\n" not in row["error"]
        failed_first = sorted(explanations.filter(pl.col("error").is_not_null())["neuron"].to_list())
        explained_first = NEURONS - set(failed_first)
        simulations = read_table(lake, "simulations", where={"layer": "0"})
        # A failed simulation is recorded too: its excerpts' rows carry the error, no values.
        simulated_first = set(simulations.filter(pl.col("error").is_null())["neuron"].to_list())
        failed_simulations = first["simulations"]["failed_simulations"]
        assert simulated_first <= explained_first
        assert len(explained_first - simulated_first) == failed_simulations
        assert set(simulations["neuron"].to_list()) == explained_first
        assert (simulations.group_by("neuron").len()["len"] == 10).all()
        scores = read_table(lake, "scores", where={"layer": "0"})
        failed_scores = scores.filter(pl.col("null_reason").str.starts_with("simulation failed: ").fill_null(False))
        assert set(scores["neuron"].to_list()) == explained_first
        assert set(failed_scores["neuron"].to_list()) == explained_first - simulated_first

        # Retries are bounded: at most max_retries + 1 attempts per call.
        by_endpoint = collections.Counter(_endpoint(r) for r in faulty_posts)
        assert by_endpoint["chat"] <= len(NEURONS) * (MAX_RETRIES + 1)
        # Per neuron: 10 scored excerpts x 2 passes ("10" is two tokens), and at most one probe.
        assert by_endpoint["completions"] <= len(NEURONS) * (10 * 2 + 1) * (MAX_RETRIES + 1)
        # Per call: a chain of attempts ends with an answer the client accepts or after
        # max_retries + 1 attempts (identical requests for two neurons are two chains).
        chains: dict[str, list] = collections.defaultdict(list)
        for r in faulty_posts:
            if not _is_probe(r):
                chains[_body_key(r)].append(r.fault)
        for body, faults in chains.items():
            ends = sum(1 for f in faults if f is None or expected_kind(_endpoint_of(body), f) in (None, "unusable_content"))
            calls = ends + (0 if faults[-1] is None or expected_kind(_endpoint_of(body), faults[-1]) in (None, "unusable_content") else 1)
            assert len(faults) <= (MAX_RETRIES + 1) * max(1, calls), faults

        # The run's metadata counts every injected fault, by kind.
        injected = collections.Counter(r.fault for r in faulty_posts if r.fault)
        expected = {"chat": collections.Counter(), "completions": collections.Counter()}
        for r in faulty_posts:
            if r.fault and expected_kind(_endpoint(r), r.fault):
                expected[_endpoint(r)][expected_kind(_endpoint(r), r.fault)] += 1
        counted = {
            "chat": first["explanations"]["llm_faults"]["explainers"],
            "completions": first["simulations"]["llm_faults"]["simulators"],
        }
        for endpoint in ("chat", "completions"):
            got = collections.Counter({k: v for k, v in counted[endpoint].items() if k != "timeout"})
            want = collections.Counter({k: v for k, v in expected[endpoint].items() if k != "timeout"})
            assert got == want, (endpoint, got, want)
            # A slow machine can time out a healthy answer too: never fewer timeouts than injected.
            assert counted[endpoint].get("timeout", 0) >= expected[endpoint]["timeout"]
        assert sum(injected.values()) >= 0.2 * len(faulty_posts)  # the rate held (30% drawn)

        # Re-run on a healthy server: only the failed neurons are asked again, nothing else.
        answered = {_body_key(r) for r in faulty_posts if r.fault is None and r.status == 200}
        second = _materialize(defs, LAYER_ASSETS, instance, partition_key="0")
        healthy_posts = fake.posts()[len(faulty_posts):]
        repeated = [r for r in healthy_posts if _body_key(r) in answered and not _is_probe(r)]
        assert not repeated, f"{len(repeated)} calls already answered were sent again"
        assert sum(_endpoint(r) == "chat" for r in healthy_posts) == len(failed_first)
        final = read_table(lake, "explanations", where={"layer": "0"})
        assert final["error"].is_null().all() and final.height == 8
        assert read_table(lake, "simulations", where={"layer": "0"}).height == 80
        assert set(read_table(lake, "scores", where={"layer": "0"})["neuron"].to_list()) == NEURONS
        # Earlier versions may lack the neurons that failed then; capture's never do.
        check_all_versions(lake, NEURONS, complete=("neuron_activations", "activation_records"))

    record(
        "api_faults",
        {
            "requests": len(faulty_posts),
            "requests_by_endpoint": dict(by_endpoint),
            "fault_rate": round(sum(injected.values()) / len(faulty_posts), 3),
            "injected": dict(injected),
            "counted_by_client": {"explainer": counted["chat"], "simulator": counted["completions"]},
            "max_retries": MAX_RETRIES,
            "neurons": len(NEURONS),
            "explained_first_run": len(explained_first),
            "failed_with_error_first_run": failed_first,
            "simulations_failed_first_run": failed_simulations,
            "rerun_requests": len(healthy_posts),
            "rerun_repeated_answered_calls": len(repeated),
            "explained_after_rerun": int(final["error"].is_null().sum()),
            "first_run_seconds": round(first_seconds, 1),
            "new_calls_rerun": second["explanations"]["new_calls"],
        },
    )


def test_an_api_failing_for_good_ends_the_run_in_one_line(tmp_path, capsys, monkeypatch):
    """The server accepts connections but every call fails (the simulator's first call, its
    prompt-logprob probe, runs out of retries): one line naming the failure, exit status 1."""
    from neuron_pipeline.cli import EXIT_RUN_FAILED, main

    for key in settings_variables():
        monkeypatch.delenv(key)
    monkeypatch.setenv(KEY_ENV, "sk-reliability-down")
    with FakeOpenAIServer(max_lifetime_s=300) as fake:
        fake.fault_rates = {"503": 1.0}
        corpus = write_small_corpus(tmp_path / "corpus", chars=12_000)
        config = tmp_path / "config.yaml"
        config.write_text(json.dumps({
            "corpus": {"source": str(corpus), "max_sequences": 24},
            "explainers": [{"backend": "baseline"}],
            "simulators": [_api(fake, max_retries=1, timeout_s=10)],
        }))
        code = main(["run", "--config", str(config), "--lake", str(tmp_path / "lake"), "--layers", "0", "--neurons", "0-3"])
        attempts = len(fake.posts())
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == EXIT_RUN_FAILED and len(err) == 1, err
    assert err[0].startswith("neuron-pipeline: run failed: server_error after 2 attempts"), err[0]
    assert attempts == 2
    record("api_down", {"requests": attempts, "exit": code, "line": err[0]})


# --- shared: a zygote that forks pipeline processes ------------------------------------------------

CHILD_ENV = {KEY_ENV: "sk-reliability-crash", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def zygote(tmp_path_factory):
    z = Zygote(tmp_path_factory.mktemp("zygote"), unset=settings_variables())
    yield z
    z.close()


def _config(path: Path, fake: FakeOpenAIServer) -> Path:
    """Two layers x 8 neurons over 48 sequences; 3 top + 3 random scored excerpts; the explainer
    sends 2 calls at a time."""
    corpus = write_small_corpus(path.parent / "corpus")
    path.write_text(
        json.dumps(
            {
                "corpus": {"source": str(corpus), "max_sequences": 48},
                "records": {"score_top": 3, "score_random": 3},
                "explainers": [_api(fake, concurrency=2, max_retries=2, timeout_s=30)],
                "simulators": [_api(fake, concurrency=8, max_retries=2, timeout_s=30)],
            }
        )
    )
    return path


PER_NEURON = {"simulations": 6}


def _argv(config: Path, lake: Path) -> list[str]:
    return ["run", "--config", str(config), "--layers", "0-1", "--neurons", "0-7", "--lake", str(lake), "--verbose"]


@pytest.fixture(scope="module")
def reference(zygote, tmp_path_factory):
    """An uninterrupted run: what every crashed-and-resumed or concurrent run must end up with.
    Two of its explainer calls meet a fault (retried); the CLI's summary names them."""
    root = tmp_path_factory.mktemp("reference")
    with FakeOpenAIServer(max_lifetime_s=600, latency_s=0.02) as fake:
        config = _config(root / "config.yaml", fake)
        fake.script("ok", "429", "503")  # the simulator's probe, then two explainer calls
        started = time.monotonic()
        pid = zygote.spawn(root / "run.log", argv=_argv(config, root / "lake"), env=CHILD_ENV, unset=settings_variables())
        code = zygote.wait(pid, 600)
        log = (root / "run.log").read_text()
        assert code == 0, log[-3000:]
        assert "API faults met (retried, or recorded with the neuron): explainers: rate_limited 1, server_error 1" in log
        seconds = time.monotonic() - started
        posts = len(fake.posts())
    return {"lake": root / "lake", "content": final_content(root / "lake"), "seconds": seconds, "requests": posts}


def _assert_same_content(lake: Path, reference_content: dict[str, pl.DataFrame]) -> None:
    content = final_content(lake)
    for table, want in reference_content.items():
        got = content[table]
        assert got.height == want.height, (table, got.height, want.height)
        assert got.equals(want), f"{table} differs from an uninterrupted run"


# --- 2. Crash and resume ---------------------------------------------------------------------------


class _Run:
    """One pipeline process, killed by SIGKILL when its trigger fires."""

    def __init__(self, zygote: Zygote, argv: list[str], log: Path):
        self.zygote, self.log = zygote, log
        self.started = time.monotonic()
        self.pid = zygote.spawn(log, argv=argv, env=CHILD_ENV, unset=settings_variables())

    def log_has(self, text: str) -> bool:
        try:
            return text in self.log.read_text(errors="replace")
        except OSError:
            return False

    def until(self, trigger, timeout: float = 300) -> tuple[int, float | None]:
        """Poll the trigger; SIGKILL when it fires. Returns (exit status, kill time or None)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            code = self.zygote.exit_code(self.pid)
            if code is not None:
                self.zygote.live.discard(self.pid)
                return code, None
            if trigger():
                self.zygote.kill(self.pid)
                killed = time.monotonic()
                return self.zygote.wait(self.pid, 60), killed
            time.sleep(0.01)
        self.zygote.kill(self.pid)
        raise TimeoutError(f"run did not reach its kill point: {self.log.read_text()[-2000:]}")


def _data_files(lake: Path, table: str) -> int:
    """Files under the table's partitions (data files, and the temporary files they are written to)."""
    folder = lake / table
    if not folder.is_dir():
        return 0
    return sum(1 for p in folder.rglob("*") if p.is_file() and "_delta_log" not in p.parts)


def _kill_points(rng: random.Random) -> list[tuple[str, float]]:
    """Two kill points in each stage: capture (a delay after the forward pass starts), explanation
    and simulation (after k requests of this run reached the server), scoring (a delay after the
    simulations were committed) and the summary (a delay after the scores were committed)."""
    return [
        ("capture", rng.uniform(0.0, 0.4)),
        ("capture", rng.uniform(0.4, 1.2)),
        ("explain", rng.randint(2, 5)),
        ("explain", rng.randint(2, 4)),
        ("simulate", rng.randint(5, 40)),
        ("simulate", rng.randint(5, 40)),
        ("score", rng.uniform(0.0, 0.3)),
        ("summary", rng.uniform(0.0, 0.2)),
    ]


@pytest.mark.slow
def test_sigkill_at_any_stage_then_resume_loses_nothing(zygote, reference, tmp_path):
    seed = int(os.environ.get("NEURON_PIPELINE_CRASH_SEED", "6"))
    rng = random.Random(seed)
    lake = tmp_path / "lake"
    started = time.monotonic()
    kills = []
    with FakeOpenAIServer(max_lifetime_s=900, latency_s=0.15) as fake:
        config = _config(tmp_path / "config.yaml", fake)
        argv = _argv(config, lake)
        for number, (stage, parameter) in enumerate(_kill_points(rng)):
            versions_before = {t: delta_version(lake, t) for t in LAYER_ASSETS}
            cache_before = cache_rows(lake)
            cached_chat = cache_rows(lake, "chat")
            posts_before = len(fake.posts())
            run = _Run(zygote, argv, tmp_path / f"run{number}.log")
            seen: dict[str, float] = {}

            def new_posts(endpoint: str) -> int:
                return sum(1 for r in fake.posts()[posts_before:] if _endpoint(r) == endpoint and not _is_probe(r))

            def after(event: str, happened: bool, delay: float) -> bool:
                if happened and event not in seen:
                    seen[event] = time.monotonic()
                return event in seen and time.monotonic() - seen[event] >= delay

            triggers = {
                "capture": lambda: after("capture", run.log_has("capturing layers"), parameter),
                # Explanations already stored are not asked again: kill before the last one is sent.
                "explain": lambda: new_posts("chat") >= min(parameter, max(1, 16 - cached_chat - 1)),
                "simulate": lambda: new_posts("completions") >= parameter,
                "score": lambda: after("score", delta_version(lake, "simulations") > versions_before["simulations"], parameter),
                "summary": lambda: after("summary", delta_version(lake, "scores") > versions_before["scores"], parameter),
            }
            code, killed_at = run.until(triggers[stage])
            versions_after = {t: delta_version(lake, t) for t in LAYER_ASSETS}
            kills.append(
                {
                    "stage": stage,
                    "parameter": round(parameter, 2),
                    "exit": code,
                    "killed": killed_at is not None,
                    "seconds_into_run": round((killed_at or time.monotonic()) - run.started, 2),
                    "killed_at": killed_at,
                    "posts_index": len(fake.posts()),
                    "tables_committed": [t for t in LAYER_ASSETS if versions_after[t] > versions_before[t]],
                    "new_requests": len(fake.posts()) - posts_before,
                    "cache_rows_added": cache_rows(lake) - cache_before,
                }
            )
            assert killed_at is not None and code == -9, f"kill point {stage} was not reached: {kills[-1]}"
            assert cache_integrity(lake) in ("ok", "absent")
        resume = _Run(zygote, argv, tmp_path / "resume.log")
        code, _ = resume.until(lambda: False, timeout=600)
        assert code == 0, (tmp_path / "resume.log").read_text()[-3000:]
        posts = fake.posts()
    total_seconds = time.monotonic() - started

    # No duplicate rows, no missing neurons, every Delta version readable with complete slices.
    versions = check_all_versions(lake, NEURONS, PER_NEURON)
    for table in tables_in(lake):
        frame = pl.read_delta(str(table_path(lake, table)))
        assert duplicate_keys(frame, table) == 0, table
    explanations = read_table(lake, "explanations")
    assert explanations.height == 16 and explanations["error"].is_null().all()
    _assert_same_content(lake, reference["content"])
    assert cache_integrity(lake) == "ok"

    # No call answered before a crash is paid again (the prompt-logprob probe, one tiny request
    # per process, is not a cached call). Answers that arrived in the last moments before the
    # kill may not have been stored yet: the margin.
    margin = 1.0
    keys = [_body_key(r) for r in posts]
    last_sent = {key: index for index, key in enumerate(keys)}
    repeated_after_margin, repeated_in_flight = [], []
    for index, request in enumerate(posts):
        if _is_probe(request) or request.status != 200:
            continue
        kill = next((k for k in kills if index < k["posts_index"]), None)
        if kill is None or last_sent[keys[index]] < kill["posts_index"]:
            continue  # answered in the final run, or never sent again after its run
        if request.t_end is not None and request.t_end < kill["killed_at"] - margin:
            repeated_after_margin.append(request.path)
        else:
            repeated_in_flight.append(request.path)
    assert not repeated_after_margin, f"{len(repeated_after_margin)} answered calls were sent again"
    successful = {_body_key(r) for r in posts if r.status == 200 and not _is_probe(r)}
    record(
        "crash_resume",
        {
            "seed": seed,
            "kills": [{k: v for k, v in kill.items() if k not in ("killed_at", "posts_index")} for kill in kills],
            "kills_per_stage": dict(collections.Counter(k["stage"] for k in kills)),
            "requests_total": len(posts),
            "distinct_calls_answered": len(successful),
            "reference_requests": reference["requests"],
            "repeated_answered_calls": len(repeated_after_margin),
            "repeated_calls_in_flight_at_kill": len(repeated_in_flight),
            "versions_checked": versions,
            "rows": {t: read_table(lake, t).height for t in LAYER_ASSETS},
            "seconds": round(total_seconds, 1),
            "reference_run_seconds": round(reference["seconds"], 1),
        },
    )


@pytest.mark.slow
def test_sigkill_in_the_middle_of_a_delta_write_leaves_the_old_slice_whole(zygote, tmp_path):
    """A process killed while it writes a big slice: its data files may be on disk, but no commit
    refers to them; readers see the previous slice, whole, and the next write succeeds."""
    from deltalake import DeltaTable

    lake = tmp_path / "lake"
    rows = 150_000
    path = str(table_path(lake, "activation_records"))

    def write(tag: int, log: str) -> int:
        return zygote.spawn(tmp_path / log, call="write_records_slice", kwargs={"lake": str(lake), "rows": rows, "tag": tag})

    started = time.monotonic()
    assert zygote.wait(write(1, "first.log"), 300) == 0, (tmp_path / "first.log").read_text()[-2000:]
    duration = time.monotonic() - started
    rng = random.Random(7)
    kills = []
    for attempt, when in enumerate(("data file appears", "data file appears", "while building the rows")):
        version_before = DeltaTable(path).version()
        files_before = _data_files(lake, "activation_records")
        pid = write(10 + attempt, f"killed{attempt}.log")
        # Kill the moment the new data file shows up on disk (it is being written; the commit comes
        # next), or at a random point before.
        deadline = time.monotonic() + (60 if when == "data file appears" else rng.uniform(0.1, 0.5) * duration)
        while time.monotonic() < deadline and _data_files(lake, "activation_records") == files_before:
            time.sleep(0.002)
        zygote.kill(pid)
        code = zygote.wait(pid, 60)
        version = DeltaTable(path).version()
        frame = pl.read_delta(path)
        assert frame.height == rows and frame["sequence_id"].n_unique() == 1, "a half-written slice is visible"
        kills.append({"when": when, "exit": code, "committed": version > version_before,
                      "data_files_left_behind": _data_files(lake, "activation_records") - files_before - (version > version_before)})
    assert zygote.wait(write(99, "last.log"), 300) == 0
    assert pl.read_delta(path)["sequence_id"].unique().to_list() == [99]
    for version in range(DeltaTable(path).version() + 1):
        frame = pl.read_delta(path, version=version)
        assert frame.height == rows and frame["sequence_id"].n_unique() == 1
    assert any(k["exit"] == -9 and not k["committed"] for k in kills), kills
    record("crash_mid_write", {"rows": rows, "write_seconds": round(duration, 2), "kills": kills,
                               "versions_checked": DeltaTable(path).version() + 1})


# --- 3. Concurrent writers -------------------------------------------------------------------------


class _Reader(threading.Thread):
    """Reads every layer table over and over; each read must show whole slices only."""

    def __init__(self, lake: Path):
        super().__init__(daemon=True)
        self.lake, self.stop, self.reads, self.problems = lake, threading.Event(), 0, []
        self.versions: dict[str, set[int]] = collections.defaultdict(set)

    def run(self) -> None:
        from deltalake import DeltaTable

        while not self.stop.is_set():
            for table in ("neuron_activations", "activation_records", "explanations", "simulations", "scores"):
                path = str(table_path(self.lake, table))
                if not DeltaTable.is_deltatable(path):
                    continue
                try:
                    snapshot = DeltaTable(path)
                    frame = pl.from_arrow(snapshot.to_pyarrow_table())
                except Exception as exc:  # noqa: BLE001 - any failed read is a finding
                    self.problems.append(f"{table}: read failed: {exc}")
                    continue
                self.reads += 1
                self.versions[table].add(snapshot.version())
                if duplicate_keys(frame, table):
                    self.problems.append(f"{table} v{snapshot.version()}: duplicate keys")
                self.problems.extend(incomplete_slices(frame, table, NEURONS, PER_NEURON))
            time.sleep(0.02)


@pytest.mark.slow
def test_two_processes_writing_the_same_layers_both_finish_and_readers_see_whole_slices(zygote, reference, tmp_path):
    lake = tmp_path / "lake"
    with FakeOpenAIServer(max_lifetime_s=600, latency_s=0.02) as fake:
        config = _config(tmp_path / "config.yaml", fake)
        reader = _Reader(lake)
        reader.start()
        started = time.monotonic()
        pids = [
            zygote.spawn(tmp_path / f"writer{i}.log", argv=_argv(config, lake), env=CHILD_ENV, unset=settings_variables())
            for i in range(2)
        ]
        codes = [zygote.wait(pid, 600) for pid in pids]
        seconds = time.monotonic() - started
        reader.stop.set()
        reader.join(30)
    logs = [(tmp_path / f"writer{i}.log").read_text() for i in range(2)]
    assert codes == [0, 0], [log[-2000:] for log in logs]
    assert not reader.problems, reader.problems[:5]
    assert reader.reads > 0
    versions = check_all_versions(lake, NEURONS, PER_NEURON)
    _assert_same_content(lake, reference["content"])
    record(
        "concurrent_writers",
        {
            "processes": 2,
            "exit_codes": codes,
            "reader_snapshots": reader.reads,
            "versions_seen_by_reader": {t: len(v) for t, v in reader.versions.items()},
            "half_written_slices_seen": len(reader.problems),
            "versions_checked": versions,
            "seconds": round(seconds, 1),
        },
    )


def test_write_table_retries_commit_conflicts_and_readers_see_whole_slices(tmp_path, monkeypatch):
    """Six threads replace the same partition at once (each with its own content) while a reader
    polls: deltalake's optimistic concurrency rejects all but one commit per version; the losers
    retry (bounded) and every write lands; every read shows one writer's slice, whole."""
    import neuron_pipeline.lake.io as io
    from deltalake.exceptions import CommitFailedError

    conflicts = collections.Counter()
    real_write = io.write_deltalake

    def counting_write(*args, **kwargs):
        try:
            return real_write(*args, **kwargs)
        except CommitFailedError:
            conflicts["commit_failed"] += 1
            raise

    monkeypatch.setattr(io, "write_deltalake", counting_write)
    lake = tmp_path / "lake"

    def rows(writer: int) -> list[dict]:
        return [
            {"model": "m", "layer": "0", "neuron": n, "count": writer, "mean": float(writer), "variance": 0.0,
             "max": 1.0, "min": 0.0, "frac_positive": 0.5, "quantile_boundaries": [0.1], "corpus_hash": f"w{writer}"}
            for n in range(64)
        ]

    io.write_table(lake, "neuron_activations", rows(99), replace_where={"layer": ["0"]})
    problems, reads, stop = [], [0], threading.Event()

    def reader():
        while not stop.is_set():
            frame = pl.read_delta(str(table_path(lake, "neuron_activations")))
            reads[0] += 1
            if frame.height != 64 or frame["count"].n_unique() != 1:
                problems.append((frame.height, frame["count"].unique().to_list()))

    errors = []

    def writer(index: int):
        for round_ in range(3):
            try:
                io.write_table(lake, "neuron_activations", rows(index * 10 + round_), replace_where={"layer": ["0"]})
            except Exception as exc:  # noqa: BLE001
                errors.append(exc)

    watcher = threading.Thread(target=reader)
    watcher.start()
    writers = [threading.Thread(target=writer, args=(i,)) for i in range(6)]
    for thread in writers:
        thread.start()
    for thread in writers:
        thread.join()
    stop.set()
    watcher.join()
    assert not errors, errors[:2]
    assert not problems, problems[:3]
    from deltalake import DeltaTable

    path = str(table_path(lake, "neuron_activations"))
    assert DeltaTable(path).version() == 18  # the first write, then 6 x 3 commits: none lost
    check_all_versions(lake, set(range(64)))
    final = pl.read_delta(path)
    assert final.height == 64 and final["count"].n_unique() == 1
    record(
        "commit_conflicts",
        {"writers": 6, "writes": 18, "commits": 18, "conflicts_retried": conflicts["commit_failed"],
         "reader_snapshots": reads[0], "half_written_slices_seen": len(problems)},
    )


def test_two_writers_creating_a_table_at_once_leave_one_whole_slice(tmp_path):
    """Writer B starts a big write to a table that does not exist yet; while B's data file is being
    written, writer A creates the table with a small slice. deltalake's own commit retry used to
    rebase B's create onto A's commit as a plain add: the slice then held both writers' rows (seen
    in the two-process test). Now B's commit fails, B redoes its write on the new table, and the
    slice is one writer's, whole."""
    from reliability.zygote import write_records_slice

    lake = tmp_path / "lake"
    folder = lake / "activation_records"
    big = threading.Thread(target=write_records_slice, args=(str(lake), 300_000, 1))
    big.start()
    deadline = time.monotonic() + 120
    while _data_files(lake, "activation_records") == 0 and time.monotonic() < deadline:
        time.sleep(0.001)
    write_records_slice(str(lake), 10, 2)  # A commits version 0 while B is still writing
    a_first = big.is_alive()
    big.join()
    frame = pl.read_delta(str(folder))
    # One writer's slice, whole: B's (it redid its write after A's commit) or, when B happened to
    # commit first after all, A's.
    assert dict(frame["sequence_id"].value_counts().iter_rows()) in ({1: 300_000}, {2: 10})
    record("create_race", {"a_committed_first": a_first, "rows_after": frame.height, "mixed_slices": 0})


def test_commit_conflict_retries_are_bounded(tmp_path, monkeypatch):
    import neuron_pipeline.lake.io as io
    from deltalake.exceptions import CommitFailedError

    calls = []

    def always_conflicts(*args, **kwargs):
        calls.append(1)
        raise CommitFailedError("Commit failed: a concurrent transaction deleted data this operation read.")

    monkeypatch.setattr(io, "write_deltalake", always_conflicts)
    monkeypatch.setattr(io, "_COMMIT_BACKOFF_S", 0.001)
    with pytest.raises(io.LakeError, match=f"after {io.COMMIT_ATTEMPTS} attempts"):
        io.write_table(tmp_path / "lake", "scores", [], replace_where={"layer": ["0"]})
    assert len(calls) == io.COMMIT_ATTEMPTS


# --- 5. Memory bounds ------------------------------------------------------------------------------

MEMORY_SIZES = (200, 1600)


@pytest.mark.slow
def test_capture_memory_does_not_grow_with_the_corpus(zygote, tmp_path):
    results = {}
    for sequences in MEMORY_SIZES:
        out = tmp_path / f"memory{sequences}.json"
        pid = zygote.spawn(tmp_path / f"memory{sequences}.log", call="capture_memory",
                           kwargs={"sequences": sequences, "out": str(out), "neurons": 256, "layers": 1})
        assert zygote.wait(pid, 600) == 0, (tmp_path / f"memory{sequences}.log").read_text()[-2000:]
        results[sequences] = json.loads(out.read_text())
    small, large = (results[s] for s in MEMORY_SIZES)
    assert large["count"] == 8 * small["count"]
    growth = large["capture_growth_mib"] - small["capture_growth_mib"]
    # 8x the corpus: the peak stays within 15% of the small run's working set (+ allocator slack),
    # far below what one tokens x neurons matrix of the larger corpus would take.
    bound = 0.15 * small["capture_growth_mib"] + 24
    assert growth < bound, (small, large)
    assert large["dense_matrix_mib"] > 2 * bound
    record("capture_memory", {"small": small, "large": large, "growth_mib": round(growth, 1), "bound_mib": round(bound, 1)})


def test_llm_answers_are_stored_the_moment_they_arrive(tmp_path, monkeypatch):
    """While a batch is still in flight, the cache already holds every answer that came back:
    a process killed mid-batch loses only the calls on the wire."""
    from neuron_pipeline.interp.llm_protocol import ChatRequest
    from neuron_pipeline.interp.simulator import excerpt_suffix
    from neuron_pipeline.llm.cache import CachedChatModel, CachedValueModel, LLMCache
    from neuron_pipeline.llm.openai_api import OpenAICompatible

    monkeypatch.setenv(KEY_ENV, "sk-x")
    cache_path = tmp_path / "calls.sqlite"
    cache = LLMCache(cache_path)
    with FakeOpenAIServer(max_lifetime_s=120, latency_s=0.05) as fake:
        seen_at_arrival = []
        real_next_fault = fake._next_fault

        def count_then_answer():
            with sqlite3.connect(str(cache_path), timeout=30) as db:
                seen_at_arrival.append(db.execute("SELECT count(*) FROM calls").fetchone()[0])
            return real_next_fault()

        fake._next_fault = count_then_answer
        with OpenAICompatible("fake", base_url=fake.base_url, api_key_env=KEY_ENV, concurrency=1) as client:
            chat = CachedChatModel(client, cache)
            requests = [ChatRequest(messages=(("user", f"Neuron C\n<start>\n w{i}\t9\n<end>"),)) for i in range(6)]
            results = chat.chat_many(requests)
            assert all(not isinstance(r, Exception) for r in results)
            # Request j goes out once answer j-1 is back; by then answers 0..j-2 at least are stored.
            assert all(count >= j - 1 for j, count in enumerate(seen_at_arrival)), seen_at_arrival
            assert len(cache) == 6

            seen_at_arrival.clear()
            client.supports_prompt_logprobs()
            values = CachedValueModel(client, cache)
            suffixes, slots = zip(*(excerpt_suffix([f" t{i}", " b"]) for i in range(4)))
            values.value_distributions("Neuron C\n<start>\n", suffixes, slots)
            # 2 requests per excerpt ("10" is two tokens): excerpt i is stored before excerpt i+2 starts.
            stored = [count - 6 for count in seen_at_arrival[1:]]
            assert all(count >= j // 2 - 1 for j, count in enumerate(stored)), stored
            assert len(cache) == 6 + 4

        # One excerpt that fails for good does not lose the others' answers.
        with OpenAICompatible("fake", base_url=fake.base_url, api_key_env=KEY_ENV, concurrency=1, max_retries=0) as client:
            client.supports_prompt_logprobs()
            values = CachedValueModel(client, cache)
            suffixes, slots = zip(*(excerpt_suffix([f" u{i}", " b"]) for i in range(3)))
            fake.script("ok", "ok", "ok", "ok", "400")
            with pytest.raises(Exception):
                values.value_distributions("Neuron C\n<start>\n", suffixes, slots)
            assert len(cache) == 10 + 2


def test_explanations_are_requested_in_a_bounded_window():
    """At most ``workers`` neurons are in progress at once (bounded memory), and the window fills."""
    import threading
    import time

    from neuron_pipeline.assets import explanations as stage
    from neuron_pipeline.config import RecordsSettings
    from neuron_pipeline.interp.explainer import Explanation
    from neuron_pipeline.interp.records import ActivationRecord, NeuronId, NeuronRecord
    from neuron_pipeline.lake import table_frame

    lock = threading.Lock()
    in_progress, most = 0, 0
    first_window = threading.Barrier(16, timeout=30)  # the first 16 neurons must all be in progress together

    class Recording:
        explainer_id, model_name, prompt_hash = "llm-test", "fake", "p"

        def explain_many(self, batch):
            nonlocal in_progress, most
            with lock:
                in_progress += 1
                most = max(most, in_progress)
            n = int(batch[0][0].tokens[0][2:])
            if n < 16:
                first_window.wait()
            time.sleep(0.01)
            with lock:
                in_progress -= 1
            return [Explanation("x") for _ in batch]

    def neuron(n):
        top = [ActivationRecord((f" a{n}", " b"), (float(20 - i), 0.0), i) for i in range(20)]
        return NeuronRecord(NeuronId(0, n), top=top, random=[ActivationRecord((" c", " d"), (0.0, 0.1), 30 + i) for i in range(20)])

    frame, new = stage.explain_layer(
        Recording(), {n: neuron(n) for n in range(70)}, table_frame("explanations", []), RecordsSettings(), "m", 0, workers=16
    )
    assert new == 70 and frame.height == 70
    assert frame["neuron"].to_list() == list(range(70))
    assert most == 16
    record("explain_chunks", {"neurons": 70, "workers": 16, "most_in_progress": most})


# --- 4. Bad input ----------------------------------------------------------------------------------

# (config YAML, extra CLI args, expected text in the one error line, environment). Placeholders in
# braces are files made by the `inputs` fixture. tests/test_cli.py covers 11 more cases.
BAD_INPUT = {
    "model without MLP hook support (a BERT)": ("subject:\n  model: {bert}\n", [], "has no MLP hook support", {}),
    "model folder without config.json": ("subject:\n  model: {empty_dir}\n", [], "has no config.json", {}),
    "GGUF file that does not exist": ("subject:\n  model: /nonexistent/model.gguf\n", [], "GGUF file", {}),
    "unreadable layer selection": ("", ["--layers", "1-x"], "cannot read layer selection", {}),
    "reversed layer range": ("", ["--layers", "3-1"], "cannot read layer selection", {}),
    "negative neuron": ("", ["--neurons", "-1"], "cannot read neuron selection", {}),
    "huge neuron range": ("", ["--neurons", "0-99999999999"], "neuron 1536 is out of range", {}),
    "corpus of blank JSON lines": ("corpus:\n  source: {blank_jsonl}\n", [], "holds no text", {}),
    "binary bytes in a JSON-lines corpus": ("corpus:\n  source: {binary_jsonl}\n", [], "looks binary", {}),
    "non-UTF-8 JSON-lines corpus": ("corpus:\n  source: {latin1_jsonl}\n", [], "not UTF-8", {}),
    "JSON-lines corpus without the text column": ("corpus:\n  source: {no_column_jsonl}\n", [], "has no text column", {}),
    "corpus folder without text files": ("corpus:\n  source: {no_text_dir}\n", [], "has no text files", {}),
    "sequences longer than the corpus": ("corpus:\n  source: {tiny_txt}\n  sequence_length: 4096\n", [], "fewer than one sequence of 4096", {}),
    "YAML indented with a tab": ("subject:\n\tmodel: x\n", [], "malformed YAML", {}),
    "YAML that is a list": ("- subject\n- corpus\n", [], "must hold a mapping", {}),
    "unknown nested key": ("records:\n  topk: 5\n", [], "invalid config records.topk: unknown setting", {}),
    "unknown key in an explainer": ("explainers:\n  - backend: baseline\n    temprature: 0\n", [], "unknown setting", {}),
    "unknown dtype": ("subject:\n  dtype: float8\n", [], "subject.dtype", {}),
    "records that cannot be split": ("records:\n  top_k: 6\n", [], "raise records.top_k", {}),
    "bad value from an environment variable": ("", [], "NEURON_PIPELINE__SUBJECT__BATCH_SIZE", {"NEURON_PIPELINE__SUBJECT__BATCH_SIZE": "many"}),
    "API backend without a model name": ("explainers:\n  - backend: openai\n", [], "needs `model`", {}),
    "API backend with its key variable unset": (
        "explainers:\n  - backend: openai\n    model: gpt-4o-mini\n    api_key_env: NP_RELIABILITY_UNSET_KEY\n",
        [], "set NP_RELIABILITY_UNSET_KEY", {}),
    "API server not listening": (
        "simulators:\n  - backend: openai\n    model: m\n    base_url: http://127.0.0.1:{dead_port}/v1\n", [], "cannot reach", {}),
    "API key rejected by the server": (
        "explainers:\n  - backend: openai\n    model: m\n    base_url: http://127.0.0.1:{rejecting_port}/v1\n"
        "    api_key_env: NP_RELIABILITY_REJECTED_KEY\n",
        [], "rejected the API key in NP_RELIABILITY_REJECTED_KEY (HTTP 401)", {"NP_RELIABILITY_REJECTED_KEY": "sk-revoked-0000"}),
    "API base URL that is not http": (
        "simulators:\n  - backend: openai\n    model: m\n    base_url: ftp://127.0.0.1/v1\n", [], "not an http(s) URL", {}),
    "prompt template without its placeholder": (
        "explainers:\n  - backend: local\n    prompt: {no_placeholder_template}\n", [], "shows no excerpts: add a {{records}} or {{highlighted}} placeholder", {}),
    "prompt template with an unknown placeholder": (
        "simulators:\n  - backend: local\n    prompt: {extra_placeholder_template}\n", [], "unknown placeholder(s) {{excerpt}}", {}),
    "prompt template that does not exist": ("explainers:\n  - backend: local\n    prompt: explainer_v9\n", [], "'explainer_v9' not found", {}),
    "NaN/inf activations (float16 overflow)": (
        "subject:\n  model: {fp16_model}\n  dtype: float16\ncorpus:\n  source: {small_txt}\n  max_sequences: 24\n",
        ["--neurons", "0-7"], "NaN/inf activations", {}),
    "Delta table of another schema at the lake path": ("", [], "does not have the 'scores' schema", {}),
    "lake path that is a file": ("", [], "is a file, not a folder", {}),
}
BASELINE_ONLY = "explainers:\n  - backend: baseline\nsimulators:\n  - backend: baseline\n"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    import http.server
    import socket

    from reliability.models import overflowing_fp16_llama, tiny_bert

    root = tmp_path_factory.mktemp("bad_inputs")

    def write(name: str, data: str | bytes) -> str:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data if isinstance(data, bytes) else data.encode())
        return str(path)

    (root / "empty_dir").mkdir()
    with socket.socket() as probe:  # a loopback port nobody listens on
        probe.bind(("127.0.0.1", 0))
        dead_port = probe.getsockname()[1]

    class Rejecting(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - like OpenAI's API with a revoked key
            body = b'{"error": {"message": "Incorrect API key provided.", "code": "invalid_api_key"}}'
            self.send_response(401)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    rejecting = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Rejecting)
    threading.Thread(target=rejecting.serve_forever, daemon=True).start()
    yield {
        "bert": str(tiny_bert(root / "bert")),
        "fp16_model": str(overflowing_fp16_llama(root / "fp16")),
        "empty_dir": str(root / "empty_dir"),
        "blank_jsonl": write("blank.jsonl", "\n\n  \n"),
        "binary_jsonl": write("binary.jsonl", b'{"text": "a"}\n' + bytes(range(256))),
        "latin1_jsonl": write("latin1.jsonl", '{"text": "caf\xe9 cr\xe8me"}\n'.encode("latin-1")),
        "no_column_jsonl": write("no_column.jsonl", '{"body": "some text"}\n'),
        "no_text_dir": str(Path(write("no_text/data.csv", "a,b\n1,2\n")).parent),
        "tiny_txt": write("tiny.txt", "It is a truth universally acknowledged.\n"),
        "small_txt": str(write_small_corpus(root / "small", chars=12_000)),
        "no_placeholder_template": write("templates/mine_v1.txt", "[user]\nExplain this neuron.\n"),
        "extra_placeholder_template": write("templates/sim_v1.txt", "Explanation: {explanation}\n{excerpt}\n"),
        "dead_port": str(dead_port),
        "rejecting_port": str(rejecting.server_address[1]),
    }
    rejecting.shutdown()
    rejecting.server_close()


def _snapshot(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in folder.rglob("*")} if folder.exists() else {}


@pytest.mark.parametrize("case", sorted(BAD_INPUT))
def test_bad_input_is_one_line_and_writes_nothing(case, inputs, tmp_path, capsys, monkeypatch):
    from neuron_pipeline.cli import EXIT_USER_ERROR, main

    config_text, extra_args, expected, env = BAD_INPUT[case]
    for key in settings_variables():
        monkeypatch.delenv(key)
    monkeypatch.delenv("NP_RELIABILITY_UNSET_KEY", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    config = tmp_path / "config.yaml"
    # Cases that get as far as the LLM settings use the baseline, unless they set their own LLMs or
    # their YAML is broken on purpose.
    own = any(part in config_text for part in ("explainers:", "simulators:", "\t")) or config_text.startswith("-")
    config.write_text(config_text.format(**inputs) + ("" if own else BASELINE_ONLY))
    lake = tmp_path / "lake"
    if case == "Delta table of another schema at the lake path":
        from deltalake import write_deltalake
        import pyarrow as pa

        write_deltalake(str(lake / "scores"), pa.table({"layer": ["0"], "score": ["high"]}), partition_by=["layer"])
    if case == "lake path that is a file":
        lake = tmp_path / "lake.txt"
        lake.write_text("not a lake")
    before = _snapshot(lake)
    started = time.monotonic()
    code = main(["run", "--config", str(config), "--lake", str(lake), "--layers", "0", "--neurons", "0-3", *extra_args])
    seconds = time.monotonic() - started
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert code == EXIT_USER_ERROR, captured.err[-2000:]
    assert len(lines) == 1, captured.err[-2000:]
    assert lines[0].startswith("neuron-pipeline: error: ")
    assert expected.format().lower() in lines[0].lower(), lines[0]
    after = _snapshot(lake)
    if case.startswith("NaN/inf"):
        # The corpus was tokenized (a valid table of its own) before the forward pass overflowed;
        # nothing of any layer is written.
        assert {p.split("/")[0] for p in after} <= {"corpus_tokens"}, sorted(after)
    else:
        assert after == before, f"{case} wrote to the lake"
    _BAD_INPUT_RESULTS[case] = {"error": lines[0].removeprefix("neuron-pipeline: error: "), "seconds": round(seconds, 2)}
    record("bad_input", dict(sorted(_BAD_INPUT_RESULTS.items())))


_BAD_INPUT_RESULTS: dict[str, dict] = {}
