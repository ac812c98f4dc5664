"""`make dev` for real: `dagster dev` serves the UI over a lake materialized on the same instance,
and its GraphQL API shows the asset graph, partitions, quality checks, jobs, sensors, the
schedule and the metadata of the latest materialization. Loopback only; bounded waits; the
server's whole process group is always stopped."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import dagster as dg
import pytest

from neuron_pipeline.assets import automation, jobs
from neuron_pipeline.assets.checks import CHECK_NAME, UPSTREAM_CHECK_NAME
from neuron_pipeline.config import load_settings
from neuron_pipeline.definitions import build_definitions

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"
STARTUP_TIMEOUT_S = 240
LAYER_ASSETS = [*jobs.CAPTURE_ASSETS, *jobs.EXPLAIN_ASSETS]
SMALL = "corpus:\n  max_sequences: 48\nlayers: '0-1'\nneurons: '0-7'\nexplainers:\n  - backend: baseline\nsimulators:\n  - backend: baseline\n"

ASSETS_QUERY = """
{
  assetNodes {
    assetKey { path }
    groupName
    kinds
    isPartitioned
    partitionKeys
    description
    assetChecksOrError { ... on AssetChecks { checks { name blocking } } }
  }
}
"""

MATERIALIZATION_QUERY = """
query ($path: [String!]!, $partition: String!) {
  assetNodeOrError(assetKey: {path: $path}) {
    ... on AssetNode {
      opVersion
      staleStatus(partition: $partition)
      assetMaterializations(partitions: [$partition], limit: 1) {
        partition
        metadataEntries {
          label
          __typename
          ... on FloatMetadataEntry { floatValue }
          ... on IntMetadataEntry { intValue }
          ... on MarkdownMetadataEntry { mdStr }
          ... on PathMetadataEntry { path }
          ... on TableMetadataEntry { table { records } }
        }
      }
    }
  }
}
"""

REPOSITORY_QUERY = """
{
  repositoriesOrError {
    ... on RepositoryConnection {
      nodes {
        jobs { name }
        sensors { name sensorState { status } }
        schedules { name cronSchedule scheduleState { status } }
      }
    }
  }
}
"""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def _graphql(port: int, query: str, variables: dict | None = None) -> dict:
    body = json.dumps({"query": query, "variables": variables or {}}).encode()
    request = urllib.request.Request(
        f"http://{HOST}:{port}/graphql", data=body, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            payload = json.loads(response.read())
    except urllib.error.HTTPError as exc:  # GraphQL validation errors come back as 400
        raise AssertionError(f"GraphQL {exc.code}: {exc.read().decode()[:2000]}") from None
    assert "errors" not in payload, payload["errors"]
    return payload["data"]


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM to the whole process group (webserver, daemon, code server, run workers), then
    SIGKILL to whatever of the group is still there."""
    for sig, grace in ((signal.SIGTERM, 30), (signal.SIGKILL, 30)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            break
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            continue
        if sig == signal.SIGTERM:
            time.sleep(1.0)  # let the children it signalled exit before the group is killed


def _wait_for_assets(process: subprocess.Popen, port: int, log: Path) -> list[dict]:
    """Until the webserver answers and the code location has loaded its assets (bounded)."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    last_error = None
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"dagster dev exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            nodes = _graphql(port, ASSETS_QUERY)["assetNodes"]
            if nodes:
                return nodes
        except (urllib.error.URLError, ConnectionError, TimeoutError, AssertionError) as exc:
            last_error = exc
        time.sleep(1.0)
    pytest.fail(f"no asset graph from dagster dev after {STARTUP_TIMEOUT_S}s ({last_error}):\n{log.read_text()[-3000:]}")


@pytest.mark.timeout(600)
def test_dagster_dev_serves_the_materialized_lake(tmp_path):
    home, lake, config = tmp_path / "dagster_home", tmp_path / "lake", tmp_path / "small.yaml"
    home.mkdir()
    shutil.copy(ROOT / "deploy" / "dagster.yaml", home / "dagster.yaml")  # as `make dev` does
    config.write_text(SMALL)
    env_settings = {"NEURON_PIPELINE_CONFIG": str(config), "NEURON_PIPELINE_PROFILE": "demo", "NEURON_PIPELINE__LAKE": str(lake)}

    # Materialize layer 0 on the instance the server will use (as `make demo` does before `make dev`).
    settings = load_settings(environ=env_settings)
    defs = build_definitions(settings)
    quiet = {"loggers": {"console": {"config": {"log_level": "ERROR"}}}}
    with dg.DagsterInstance.from_config(str(home)) as instance:
        common = dict(resources=defs.resources, instance=instance, run_config=quiet)
        assert dg.materialize(list(defs.assets), selection=[dg.AssetKey("corpus_tokens")], **common).success
        keys = [dg.AssetKey(k) for k in LAYER_ASSETS]
        assert dg.materialize(list(defs.assets), selection=keys, partition_key="0", **common).success

    port = _free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("NEURON_PIPELINE")},
        **env_settings,
        "DAGSTER_HOME": str(home),
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    log = tmp_path / "dagster_dev.log"
    dagster = Path(sys.executable).with_name("dagster")
    with log.open("w") as out:
        # Its own session and process group (like `set -m` in a shell), so one signal stops
        # the webserver, the daemon, the code server and any run they launched.
        process = subprocess.Popen(
            [str(dagster), "dev", "-w", "workspace.yaml", "-h", HOST, "-p", str(port)],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        nodes = _wait_for_assets(process, port, log)
        by_name = {"/".join(n["assetKey"]["path"]): n for n in nodes}
        assert set(by_name) == {"corpus_tokens", *LAYER_ASSETS, "neuron_viewer", "evaluations"}
        for name, node in by_name.items():
            assert node["description"] and node["groupName"] and node["kinds"], name
            checks = {c["name"]: c["blocking"] for c in node["assetChecksOrError"]["checks"]}
            if name in LAYER_ASSETS:
                assert node["isPartitioned"] and node["partitionKeys"] == [str(i) for i in range(30)], name
                assert checks[CHECK_NAME] is True, name
            if name in jobs.EXPLAIN_ASSETS:
                assert checks[UPSTREAM_CHECK_NAME] is True, name
        assert not by_name["corpus_tokens"]["isPartitioned"]

        [repository] = _graphql(port, REPOSITORY_QUERY)["repositoriesOrError"]["nodes"]
        assert {jobs.CAPTURE_JOB, jobs.EXPLAIN_JOB, jobs.RESCORE_JOB, jobs.FULL_JOB} <= {j["name"] for j in repository["jobs"]}
        sensors = {s["name"]: s["sensorState"]["status"] for s in repository["sensors"]}
        assert sensors[automation.SENSOR_NAME] == "RUNNING" and automation.AUTOMATION_SENSOR_NAME in sensors
        [schedule] = repository["schedules"]
        assert (schedule["name"], schedule["cronSchedule"]) == (automation.SCHEDULE_NAME, "0 3 * * *")

        node = _graphql(port, MATERIALIZATION_QUERY, {"path": ["scores"], "partition": "0"})["assetNodeOrError"]
        # Same settings, same code versions: what was materialized before is fresh in the UI.
        assert node["staleStatus"] == "FRESH" and "+" in node["opVersion"]
        [materialization] = node["assetMaterializations"]
        assert materialization["partition"] == "0"
        entries = {e["label"]: e for e in materialization["metadataEntries"]}
        assert entries["path"]["path"] == str(lake / "scores")
        assert entries["delta_version"]["intValue"] >= 0
        assert entries["dagster/row_count"]["intValue"] == 8
        assert -1 <= entries["mean_score"]["floatValue"] <= 1
        assert entries["score_histogram"]["mdStr"].startswith("![score histogram](data:image/png;base64,")
        top = [json.loads(record) for record in entries["top_neurons"]["table"]["records"]]
        assert top and all(row["layer"] == "0" for row in top)
        assert {"p10_score", "p90_score", "coverage"} <= set(entries)
    finally:
        _stop(process)
    assert process.returncode is not None
