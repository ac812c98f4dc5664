"""The lake on object storage, for real: an S3-protocol server (moto's) and every lake operation,
the pipeline run by the CLI, and the credentials never leaving the environment.

moto's server runs in its own process: in-process (``ThreadedMotoServer``) it would share the GIL
with deltalake, whose ``is_deltatable`` waits for the server without releasing it and so times out.
"""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import polars as pl
import pytest

from neuron_pipeline.cli import EXIT_USER_ERROR, main
from neuron_pipeline.config import ConfigError, load_settings
from neuron_pipeline.lake import Lake, LakeError, check_table_schema, open_table, read_table, table_exists, write_table
from neuron_pipeline.lake.sql import connect

from conftest import SMALL_RUN

ROOT = Path(__file__).resolve().parents[1]
# Never a real account: unique, so finding it anywhere means it leaked.
SECRET = "neuron-lake-secret-7f3c9a1e5b"
KEY_ID = "NEURONLAKETESTKEY"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def s3_server():
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1)
                break
            except OSError:
                if proc.poll() is not None:
                    pytest.fail("moto's S3 server exited at start")
                time.sleep(0.1)
        else:
            pytest.fail("moto's S3 server did not start")
        yield endpoint
    finally:
        proc.terminate()
        proc.wait(timeout=30)


_BUCKETS = iter(range(10_000))


@pytest.fixture
def bucket(s3_server, monkeypatch) -> str:
    """A fresh bucket, with credentials only in the environment (as deltalake reads them)."""
    import boto3

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    for name in ("AWS_CONDITIONAL_PUT", "AWS_S3_ALLOW_UNSAFE_RENAME", "AWS_COPY_IF_NOT_EXISTS", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    name = f"neuron-lake-{next(_BUCKETS)}"
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket=name)
    return name


@pytest.fixture
def options(s3_server) -> dict[str, str]:
    return {"aws_endpoint_url": s3_server, "aws_allow_http": "true"}


@pytest.fixture
def lake(bucket, options) -> Lake:
    return Lake.of(f"s3://{bucket}/lake", options)


def score_rows(layer: int, neurons, score: float = 0.5):
    return [
        {"model": "m", "layer": str(layer), "neuron": n, "explainer_id": "e", "simulator_id": "s", "score": score, "n_tokens": 64}
        for n in neurons
    ]


def _bucket_bytes(endpoint: str, bucket: str) -> bytes:
    """Everything stored in the bucket, concatenated."""
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    keys = [o["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket) for o in page.get("Contents", [])]
    return b"".join(client.get_object(Bucket=bucket, Key=key)["Body"].read() for key in keys)


# ------------------------------------------------------------------------------- locations


def test_lake_locations_and_the_s3_commit_default(tmp_path, monkeypatch):
    monkeypatch.delenv("AWS_S3_ALLOW_UNSAFE_RENAME", raising=False)
    monkeypatch.delenv("AWS_CONDITIONAL_PUT", raising=False)
    s3 = Lake.of("s3://bucket/some/prefix/", {"AWS_REGION": "eu-west-1", "aws_allow_http": True})
    assert s3.root == "s3://bucket/some/prefix" and s3.folder is None
    assert s3.table("scores") == "s3://bucket/some/prefix/scores"
    # Conditional put (AWS S3 conditional writes) unless the settings choose another commit mode.
    assert s3.storage_options == {"aws_conditional_put": "etag", "aws_region": "eu-west-1", "aws_allow_http": "true"}
    assert Lake.of("s3://b/l", {"aws_s3_allow_unsafe_rename": "true"}).storage_options == {"aws_s3_allow_unsafe_rename": "true"}
    monkeypatch.setenv("AWS_S3_ALLOW_UNSAFE_RENAME", "true")
    assert Lake.of("s3://b/l").storage_options == {}
    assert Lake.of("gs://b/l").storage_options == {} and Lake.of("az://container/l").table("x") == "az://container/l/x"
    assert Lake.of("abfss://container@account.dfs.core.windows.net/lake").folder is None
    local = Lake.of(tmp_path / "lake", {"aws_region": "eu-west-1"})  # a folder ignores storage options
    assert local.folder == tmp_path / "lake" and local.options() is None
    assert Lake.of(f"file://{tmp_path}/lake") == local
    assert str(s3) == "s3://bucket/some/prefix"


@pytest.mark.parametrize(
    "uri, expected",
    [
        ("hdfs://namenode/lake", "hdfs:// is not a supported store"),
        ("s3:///lake", "names no bucket"),
        ("s3://AKIAEXAMPLE:hunter2@bucket/lake", "carries credentials"),
        ("az://container/lake?sv=2024&sig=hunter2", "carries credentials or a query string"),
    ],
)
def test_bad_lake_uris_are_one_line_config_errors(uri, expected):
    with pytest.raises(ConfigError) as excinfo:
        load_settings(profile="demo", overrides={"lake": uri}, environ={})
    message = str(excinfo.value)
    assert "\n" not in message and expected in message and message.startswith("invalid config lake:")
    assert "hunter2" not in message


@pytest.mark.parametrize(
    "key, env",
    [
        ("aws_secret_access_key", "AWS_SECRET_ACCESS_KEY"),
        ("AWS_ACCESS_KEY_ID", "AWS_ACCESS_KEY_ID"),
        ("aws_session_token", "AWS_SESSION_TOKEN"),
        ("azure_storage_account_key", "AZURE_STORAGE_ACCOUNT_KEY"),
        ("azure_storage_sas_key", "AZURE_STORAGE_SAS_KEY"),
        ("google_service_account_key", "GOOGLE_SERVICE_ACCOUNT_KEY"),
        ("password", "the provider's environment variable (AWS_*, AZURE_*, GOOGLE_*)"),
    ],
)
def test_a_credential_in_lake_storage_options_is_refused(key, env, tmp_path):
    config = tmp_path / "settings.yaml"
    config.write_text(f"lake: s3://bucket/lake\nlake_storage_options:\n  {key}: hunter2\n")
    with pytest.raises(ConfigError) as excinfo:
        load_settings(config_file=config, environ={})
    message = str(excinfo.value)
    assert "\n" not in message and "hunter2" not in message
    assert message.startswith("invalid config lake_storage_options:") and "looks like a credential" in message
    assert (env if " " in env else f"the environment variable {env}") in message and str(config) in message
    # The same through the environment-variable route.
    environ = {f"NEURON_PIPELINE__LAKE_STORAGE_OPTIONS__{key.upper()}": "hunter2", "NEURON_PIPELINE__LAKE": "s3://b/l"}
    with pytest.raises(ConfigError, match="looks like a credential"):
        load_settings(profile="demo", environ=environ)


def test_non_secret_storage_options_are_kept_as_text(tmp_path):
    config = tmp_path / "settings.yaml"
    config.write_text(
        "lake: s3://bucket/lake\nlake_storage_options:\n  AWS_ENDPOINT_URL: http://minio:9000\n"
        "  aws_allow_http: true\n  aws_region: us-east-1\n  timeout: 30s\n"
    )
    settings = load_settings(config_file=config, environ={})
    assert settings.lake_storage_options == {
        "aws_endpoint_url": "http://minio:9000", "aws_allow_http": "true", "aws_region": "us-east-1", "timeout": "30s",
    }
    assert settings.lake_location.storage_options["aws_conditional_put"] == "etag"
    assert "aws_conditional_put" not in settings.model_dump_json()  # the default is applied, not stored


def test_a_lake_volume_is_for_a_lake_folder_only():
    with pytest.raises(ConfigError, match="remove lake_volume_claim"):
        load_settings(profile="demo", overrides={"lake": "s3://b/lake", "platform": {"k8s": {"lake_volume_claim": "pvc"}}}, environ={})


# ------------------------------------------------------------------------------- the lake io on S3


def test_write_read_replace_and_time_travel_on_s3(lake):
    assert not table_exists(lake, "scores")
    assert read_table(lake, "scores").is_empty()
    assert write_table(lake, "scores", score_rows(0, range(4)) + score_rows(1, range(4))) == 0
    assert table_exists(lake, "scores")
    # Replacing one layer is one atomic commit that leaves the other layer alone.
    assert write_table(lake, "scores", score_rows(1, range(2), score=0.9), replace_where={"layer": "1"}) == 1
    now = read_table(lake, "scores")
    assert sorted(now.filter(pl.col("layer") == "1")["neuron"].to_list()) == [0, 1]
    assert set(now.filter(pl.col("layer") == "1")["score"]) == {0.9}
    assert now.filter(pl.col("layer") == "0").height == 4
    assert read_table(lake, "scores", where={"layer": "1"}, columns=["neuron"]).columns == ["neuron"]
    # Time travel by version.
    first = read_table(lake, "scores", version=0)
    assert first.filter(pl.col("layer") == "1").height == 4 and set(first["score"]) == {0.5}
    assert open_table(lake, "scores").version() == 1
    assert open_table(lake, "scores", version=0).version() == 0
    history = open_table(lake, "scores").history()
    assert [h["version"] for h in history] == [1, 0] and "layer" in history[0]["operationParameters"]["predicate"]
    # Rows outside the slice are refused, as on a folder.
    with pytest.raises(LakeError, match="fall outside the slice"):
        write_table(lake, "scores", score_rows(0, [9]), replace_where={"layer": "1"})


def test_sql_views_over_an_s3_lake(lake):
    write_table(lake, "scores", score_rows(0, range(3)) + score_rows(1, range(5)))
    con = connect(lake)
    assert con.sql("select layer, count(*) from scores group by layer order by layer").fetchall() == [("0", 3), ("1", 5)]
    assert [row[0] for row in con.sql("show tables").fetchall()] == ["scores"]


def test_a_table_with_another_schema_on_s3_is_refused(lake, options):
    from deltalake import write_deltalake
    import pyarrow as pa

    foreign = pa.table({"layer": ["0"], "neuron": [1], "something_else": ["x"]})
    write_deltalake(lake.table("scores"), foreign, partition_by=["layer"], storage_options=lake.options())
    with pytest.raises(LakeError) as excinfo:
        check_table_schema(lake, "scores")
    assert "does not have the 'scores' schema" in str(excinfo.value) and lake.table("scores") in str(excinfo.value)
    with pytest.raises(LakeError, match="does not have the 'scores' schema"):
        write_table(lake, "scores", score_rows(0, range(2)), replace_where={"layer": "0"})
    assert open_table(lake, "scores").version() == 0  # nothing written


def test_concurrent_writers_of_one_s3_table_lose_nothing(lake):
    """Four writers, each replacing its own layer three times at once, the first ones racing to
    create the table: every commit lands (conditional put), and each layer holds its last write."""
    errors: list[BaseException] = []

    def writer(layer: int) -> None:
        try:
            for extra in range(3):
                write_table(lake, "scores", score_rows(layer, range(5 + extra)), replace_where={"layer": str(layer)})
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(layer,)) for layer in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    counts = dict(read_table(lake, "scores").group_by("layer").len().iter_rows())
    assert counts == {str(layer): 7 for layer in range(4)}
    assert open_table(lake, "scores").version() == 11  # 12 commits, none lost


def test_a_missing_bucket_is_one_line_naming_the_fix(s3_server, options, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    lake = Lake.of("s3://no-such-bucket-here/lake", options)
    with pytest.raises(LakeError) as excinfo:
        read_table(lake, "scores")
    message = str(excinfo.value)
    assert "\n" not in message and "NoSuchBucket" in message and "create the bucket" in message
    with pytest.raises(LakeError, match="NoSuchBucket"):
        write_table(lake, "scores", score_rows(0, range(2)))


# ------------------------------------------------------------------------------- the pipeline on S3


def _config(tmp_path: Path, lake: str, options: dict[str, str]) -> Path:
    import yaml

    values = {**SMALL_RUN, "lake": lake, "lake_storage_options": options}
    path = tmp_path / "settings-s3.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


@pytest.mark.slow
def test_the_pipeline_runs_on_an_s3_lake_and_keeps_the_secret_out(s3_server, bucket, options, tmp_path, monkeypatch, capsys):
    import dagster as dg

    home = tmp_path / "dagster_home"
    home.mkdir()
    monkeypatch.setenv("DAGSTER_HOME", str(home))  # the CLI's runs go to this instance, to be searched
    monkeypatch.chdir(tmp_path)  # the viewer of an object-store lake goes to ./viewer
    monkeypatch.setattr("neuron_pipeline.assets.resources.cache_dir", lambda *parts: tmp_path.joinpath("cache", *parts))
    uri = f"s3://{bucket}/neuron-lake"
    config = _config(tmp_path, uri, options)

    code = main(["run", "--config", str(config), "--layers", "0", "--neurons", "0-3"])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert f"lake:   {uri}" in out.out

    # A user reads the tables with polars alone.
    scores = pl.read_delta(f"{uri}/scores", storage_options=options)
    assert scores.height == 4 and set(scores["layer"]) == {"0"} and scores["score"].null_count() < 4
    for table in ("corpus_tokens", "neuron_activations", "activation_records", "explanations", "simulations", "layer_summary"):
        assert pl.read_delta(f"{uri}/{table}", storage_options=options).height > 0, table
    assert pl.scan_delta(f"{uri}/activation_records", storage_options=options).filter(pl.col("layer") == "0").collect().height > 0
    assert (tmp_path / "viewer" / "index.html").is_file()
    assert (tmp_path / "cache" / "llm_cache").is_dir()  # the LLM cache stays local
    assert not (tmp_path / "neuron-lake").exists()

    # The CLI's other commands read the same lake.
    assert main(["query", "select count(*) as n from scores", "--config", str(config)]) == 0
    assert main(["show", "0", "1", "--config", str(config)]) == 0
    capsys.readouterr()

    # The secret is nowhere: not in run config, tags, events, metadata, the instance's files,
    # the lake's objects, the viewer or the console.
    with dg.DagsterInstance.get() as instance:
        runs = instance.get_runs()
        assert runs
        for run in runs:
            assert SECRET not in repr(run.run_config) and SECRET not in repr(run.tags)
            for record in instance.all_logs(run.run_id):
                assert SECRET not in repr(record), record
        materializations = [
            e for run in runs for e in instance.all_logs(run.run_id) if e.dagster_event and e.dagster_event.is_step_materialization
        ]
        uris = [m.dagster_event.step_materialization_data.materialization.metadata.get("dagster/uri") for m in materializations]
        assert f"{uri}/scores" in {getattr(u, "value", u) for u in uris}  # the metadata shows the URI
    for path in home.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path
    assert SECRET.encode() not in _bucket_bytes(s3_server, bucket)
    for path in (tmp_path / "viewer").rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path
    assert SECRET not in out.out + out.err


def test_the_readme_recipe_for_an_s3_lake_runs(s3_server, lake, options, capsys):
    """README's "Lake on object storage" Python block, with its lake and options pointed here."""
    write_table(lake, "scores", score_rows(0, range(3)) + score_rows(1, range(2)))
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = re.split(r"^## ", text.split("## Lake on object storage", 1)[1], maxsplit=1, flags=re.M)[0]
    [block] = re.findall(r"^```python\n(.*?)^```", section, flags=re.S | re.M)
    block = re.sub(r"^LAKE = .*$", f"LAKE = {lake.root!r}", block, count=1, flags=re.M)
    block = re.sub(r"^OPTIONS = .*$", f"OPTIONS = {options!r}", block, count=1, flags=re.M)
    namespace: dict = {}
    exec(compile(block, "README.md object-storage recipe", "exec"), namespace)
    assert namespace["scores"].height == 5
    assert "0" in capsys.readouterr().out


# ------------------------------------------------------------------------------- CLI errors


def test_cli_bad_lake_uri_is_one_line(tmp_path, capsys):
    code = main(["query", "select 1", "--lake", "hdfs://namenode/lake"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == EXIT_USER_ERROR and len(err) == 1
    assert err[0].startswith("neuron-pipeline: error: invalid config lake:") and "s3://bucket/prefix" in err[0]


def test_cli_unreachable_endpoint_is_one_line_naming_the_fix(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    closed = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    config = _config(tmp_path, "s3://neuron-lake/lake", {"aws_endpoint_url": closed, "aws_allow_http": "true"})
    code = main(["run", "--config", str(config), "--layers", "0", "--neurons", "0-3"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == EXIT_USER_ERROR and len(err) == 1, err
    assert err[0].startswith("neuron-pipeline: error: cannot reach the lake at s3://neuron-lake/lake (")
    assert "Connection refused" in err[0] and "lake_storage_options (endpoint, region)" in err[0]
    assert "AWS_ACCESS_KEY_ID" in err[0] and SECRET not in err[0]
