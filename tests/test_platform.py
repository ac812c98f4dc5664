"""Operating the pipeline as a data platform: jobs, quality gates on stored tables, GPU pools and
Kubernetes placement, staleness from recipes and data versions, sensors, schedules, automation
conditions and the metadata the UI shows. Everything is evaluated through Dagster's own test
harness (sensor / schedule contexts, evaluate_automation_conditions), never by waiting."""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

import dagster as dg
import polars as pl
import pytest
import yaml

from neuron_pipeline.assets import automation, jobs
from neuron_pipeline.assets.checks import CHECK_NAME, UPSTREAM_CHECK_NAME
from neuron_pipeline.assets.deployment import GPU_STEPS, executor_for, gpu_op_tags, k8s_executor_config
from neuron_pipeline.assets.partitions import GPU_POOL, GPU_TAGS, K8S_CONFIG_TAG
from neuron_pipeline.assets.versions import prompts_dir, stale_status_resolver
from neuron_pipeline.definitions import build_definitions
from neuron_pipeline.lake import open_table, read_table, write_table

from conftest import small_settings

ROOT = Path(__file__).resolve().parents[1]
LAYER_ASSETS = [*jobs.CAPTURE_ASSETS, *jobs.EXPLAIN_ASSETS]
EXPLAIN_KEYS = set(jobs.keys(jobs.EXPLAIN_ASSETS))
RESCORE_KEYS = set(jobs.keys(jobs.RESCORE_ASSETS))
RANGE = {automation.RANGE_START_TAG: "0", automation.RANGE_END_TAG: "1"}
QUIET = {"loggers": {"console": {"config": {"log_level": "ERROR"}}}}
NO_TELEMETRY = {"telemetry": {"enabled": False}}


def _instance(home: Path) -> dg.DagsterInstance:
    home.mkdir(parents=True, exist_ok=True)
    return dg.DagsterInstance.local_temp(str(home), overrides=NO_TELEMETRY)


def _materialize(defs: dg.Definitions, keys, instance, **kwargs) -> dg.ExecuteInProcessResult:
    return dg.materialize(
        list(defs.assets),
        selection=[dg.AssetKey(k) for k in keys],
        resources=defs.resources,
        instance=instance,
        run_config=QUIET,
        **kwargs,
    )


def _statuses(instance, defs, partition="0") -> dict[str, str]:
    resolver = stale_status_resolver(instance, defs.resolve_asset_graph())
    out = {}
    for key in defs.resolve_asset_graph().get_all_asset_keys():
        partitioned = defs.resolve_asset_graph().get(key).is_partitioned
        out[key.to_user_string()] = resolver.get_status(key, partition if partitioned else None).value
    return out


@pytest.fixture(scope="module")
def materialized(tmp_path_factory):
    """Layers 0-1 of every layer asset in one range run (one forward pass), on a persistent
    instance; tests that change it work on a copy (``_clone``)."""
    root = tmp_path_factory.mktemp("platform")
    settings = small_settings(root / "lake", layers="0-1")
    defs = build_definitions(settings)
    with _instance(root / "home") as instance:
        assert _materialize(defs, ["corpus_tokens"], instance).success
        result = _materialize(defs, LAYER_ASSETS, instance, tags=RANGE)
        assert result.success
    return {"root": root, "settings": settings, "defs": defs, "result": result}


def _clone(materialized, tmp_path) -> tuple[Path, Path]:
    home, lake = tmp_path / "home", tmp_path / "lake"
    shutil.copytree(materialized["root"] / "home", home)
    shutil.copytree(materialized["root"] / "lake", lake)
    return home, lake


# --------------------------------------------------------------------------- definitions


def test_jobs_sensors_schedule_and_what_the_ui_shows(tmp_path):
    settings = small_settings(tmp_path / "lake", platform={"schedule_cron": "30 2 * * *"})
    defs = build_definitions(settings)
    graph = defs.resolve_asset_graph()
    expected_jobs = {
        jobs.CAPTURE_JOB: set(jobs.keys(jobs.CAPTURE_ASSETS)),
        jobs.EXPLAIN_JOB: EXPLAIN_KEYS,
        jobs.RESCORE_JOB: RESCORE_KEYS,
        jobs.FULL_JOB: set(graph.get_all_asset_keys()),
    }
    for name, keys in expected_jobs.items():
        job = defs.resolve_job_def(name)
        assert job.asset_layer.selected_asset_keys == keys, name
        assert job.partitions_def.get_partition_keys() == [str(i) for i in range(30)]
        assert job.executor_def.name == "in_process"  # torch is imported once per run
    assert defs.resolve_job_def(jobs.EXPLAIN_JOB).asset_layer.asset_graph.asset_check_keys  # gates run in jobs

    sensors = {s.name: s for s in defs.sensors}
    assert set(sensors) == {automation.SENSOR_NAME, automation.AUTOMATION_SENSOR_NAME}
    assert {job.name for job in sensors[automation.SENSOR_NAME].jobs} == {jobs.EXPLAIN_JOB, jobs.RESCORE_JOB}
    [schedule] = defs.schedules
    assert schedule.name == automation.SCHEDULE_NAME and schedule.cron_schedule == "30 2 * * *"
    assert small_settings(tmp_path / "lake").platform.schedule_cron == "0 3 * * *"  # the default

    for key in graph.get_all_asset_keys():
        node = graph.get(key)
        name = key.to_user_string()
        assert node.description and node.owners == ["team:interpretability"] and node.group_name, name
        assert node.kinds, name
        # Code version = stage version + hash of the settings and prompts it depends on.
        assert node.code_version and "+" in node.code_version, name
        assert "recipe" in node.metadata, name
        if name != "neuron_viewer":
            assert node.metadata["dagster/column_schema"].columns, name
        checks = {check.name for check in graph.asset_check_keys if check.asset_key == key}
        if name != "neuron_viewer":
            assert CHECK_NAME in checks, name  # a blocking Great Expectations gate before every write
        if name in jobs.EXPLAIN_ASSETS:
            assert UPSTREAM_CHECK_NAME in checks, name  # and one on the stored table it reads
    for name in ("scores", "layer_summary"):
        assert graph.get(dg.AssetKey(name)).automation_condition is not None

    # GPU steps: the pool and the Kubernetes tags; other steps have neither.
    full = defs.resolve_job_def(jobs.FULL_JOB)
    for node in full.graph.nodes:
        tags = node.tags
        if node.name in GPU_STEPS:
            assert node.definition.pool == GPU_POOL, node.name
            assert json.loads(tags[K8S_CONFIG_TAG])["container_config"]["resources"]["limits"] == {"nvidia.com/gpu": "1"}
        else:
            assert not node.definition.pool and K8S_CONFIG_TAG not in tags, node.name


def test_gpu_tags_and_k8s_executor_validate_against_dagster_k8s(tmp_path):
    from dagster._config import validate_config
    from dagster_k8s import k8s_job_executor
    from dagster_k8s.container_context import K8sContainerContext
    from dagster_k8s.job import (
        DagsterK8sJobConfig,
        UserDefinedDagsterK8sConfig,
        construct_dagster_k8s_job,
        get_user_defined_k8s_config,
    )

    # The defaults give exactly the documented tags; the deploy settings add a node selector.
    assert gpu_op_tags(small_settings(tmp_path / "lake")) == GPU_TAGS
    cluster = _cluster_settings()
    tags = {k: v if isinstance(v, str) else json.dumps(v) for k, v in gpu_op_tags(cluster).items()}
    step_config = get_user_defined_k8s_config(tags)  # validates against USER_DEFINED_K8S_JOB_CONFIG_SCHEMA

    executor_config = k8s_executor_config(cluster)
    checked = validate_config(k8s_job_executor.config_schema.config_type, executor_config)
    assert checked.success, checked.errors
    # The cluster's lake is in object storage: no volume, the credentials from a secret.
    assert "volumes" not in executor_config and "volume_mounts" not in executor_config
    assert "neuron-pipeline-lake-credentials" in executor_config["env_secrets"]

    # The pod a GPU step gets, as the k8s step handler builds it: executor config, then step tags.
    config = checked.value
    executor_context = K8sContainerContext(
        env_vars=config.get("env_vars"),
        env_secrets=config.get("env_secrets"),
        volumes=config.get("volumes"),
        volume_mounts=config.get("volume_mounts"),
        run_k8s_config=UserDefinedDagsterK8sConfig.from_dict(config["step_k8s_config"]),
    )
    context = executor_context.merge(K8sContainerContext(run_k8s_config=step_config))
    job_config = DagsterK8sJobConfig(
        job_image="registry.example.com/neuron-pipeline:0.1.0", dagster_home="/opt/dagster/dagster_home"
    )
    job = construct_dagster_k8s_job(
        job_config, ["dagster", "api", "execute_step"], "dagster-step-explanations", context.run_k8s_config, component="step_worker"
    )
    pod = job.spec.template.spec
    container = pod.containers[0]
    assert container.resources.limits == {"nvidia.com/gpu": "1"}
    assert container.resources.requests["nvidia.com/gpu"] == "1" and container.resources.requests["memory"] == "4Gi"
    assert pod.node_selector == {"nvidia.com/gpu.present": "true"}
    assert [(t.key, t.operator, t.effect) for t in pod.tolerations] == [("nvidia.com/gpu", "Exists", "NoSchedule")]
    assert not pod.volumes
    assert {e.secret_ref.name for e in container.env_from} == {"neuron-pipeline-llm-keys", "neuron-pipeline-lake-credentials"}

    # The alternative, a lake folder on a ReadWriteMany volume mounted at the lake in every step pod.
    k8s_settings = small_settings(tmp_path / "lake", platform={"executor": "k8s", "k8s": {"lake_volume_claim": "lake"}})
    volume_config = k8s_executor_config(k8s_settings)
    assert validate_config(k8s_job_executor.config_schema.config_type, volume_config).success
    assert volume_config["volumes"] == [{"name": "lake", "persistent_volume_claim": {"claim_name": "lake"}}]
    assert volume_config["volume_mounts"] == [{"name": "lake", "mount_path": str(tmp_path / "lake")}]

    # platform.executor: k8s puts the configured k8s_job_executor on every job.
    assert executor_for(k8s_settings).name == "k8s"
    defs = build_definitions(k8s_settings)
    assert defs.resolve_job_def(jobs.EXPLAIN_JOB).executor_def.name == "k8s"


def _cluster_settings():
    from neuron_pipeline.config import load_settings

    return load_settings(config_file=ROOT / "deploy" / "k8s" / "neuron-pipeline.yaml", environ={})


def test_deploy_files_are_valid_instance_and_helm_config(tmp_path):
    from dagster._config import validate_config
    from dagster._core.instance.config import dagster_instance_config
    from dagster_k8s import K8sRunLauncher

    for source in (ROOT / "deploy" / "dagster.yaml", ROOT / "deploy" / "k8s" / "dagster-instance.yaml"):
        folder = tmp_path / source.stem
        folder.mkdir()
        shutil.copy(source, folder / "dagster.yaml")
        config, _ = dagster_instance_config(str(folder))  # raises on any schema error
        assert config["concurrency"]["pools"]["granularity"] == "op"
    local = yaml.safe_load((ROOT / "deploy" / "dagster.yaml").read_text())
    assert local["concurrency"]["pools"]["default_limit"] == 1  # one GPU step at a time locally
    instance = yaml.safe_load((ROOT / "deploy" / "k8s" / "dagster-instance.yaml").read_text())
    launcher = validate_config(K8sRunLauncher.config_type(), instance["run_launcher"]["config"])
    assert launcher.success, launcher.errors

    values = yaml.safe_load((ROOT / "deploy" / "k8s" / "values.yaml").read_text())
    assert values["runLauncher"]["type"] == "K8sRunLauncher"
    assert values["concurrency"]["pools"]["defaultLimit"] >= 1
    [deployment] = values["dagster-user-deployments"]["deployments"]
    assert deployment["dagsterApiGrpcArgs"] == ["-m", "neuron_pipeline.definitions"]
    settings = _cluster_settings()
    # The lake is in object storage; the code location and run pods get its credentials from the
    # same secret as the step pods, and no lake volume.
    assert settings.lake_location.folder is None and settings.lake.startswith("s3://")
    assert not settings.platform.k8s.lake_volume_claim
    assert "lake" not in {v["name"] for v in deployment["volumes"]}
    secrets = {e["name"] for e in deployment["envSecrets"]}
    assert secrets == set(settings.platform.k8s.env_secrets) == set(instance["run_launcher"]["config"]["env_secrets"])
    assert "lake" not in {v["name"] for v in instance["run_launcher"]["config"]["volumes"]}
    pvc = yaml.safe_load((ROOT / "deploy" / "k8s" / "lake-pvc.yaml").read_text())  # the volume alternative
    assert pvc["kind"] == "PersistentVolumeClaim" and pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    assert settings.platform.executor == "k8s"


@pytest.mark.timeout(240)
def test_two_gpu_steps_in_one_run_never_overlap_under_a_pool_limit_of_1(tmp_path):
    """A multiprocess run whose two GPU steps would otherwise run side by side (as they do with
    two slots): with deploy/dagster.yaml's pool limit of 1, one starts after the other ends."""
    # The executor's step processes load the job by module name from tests/.
    job = dg.build_reconstructable_job("gpu_pool_job", "define_job", reconstructor_working_directory=str(ROOT / "tests"))
    shutil.copy(ROOT / "deploy" / "dagster.yaml", tmp_path / "dagster.yaml")
    spans = {}
    for limit in (1, 2):
        with dg.DagsterInstance.from_config(str(tmp_path)) as instance:
            if limit == 2:
                instance.event_log_storage.set_concurrency_slots(GPU_POOL, 2)
            else:
                assert instance.event_log_storage.get_concurrency_info(GPU_POOL).slot_count in (0, 1)
            result = dg.execute_job(job, instance=instance, run_config=QUIET)
            assert result.success
            times: dict[str, dict[str, float]] = {}
            for entry in instance.all_logs(result.run_id):
                event = entry.dagster_event
                if event and event.event_type_value in ("STEP_START", "STEP_SUCCESS"):
                    times.setdefault(entry.step_key, {})[event.event_type_value] = entry.timestamp
            spans[limit] = sorted((t["STEP_START"], t["STEP_SUCCESS"]) for t in times.values())
    (first_start, first_end), (second_start, second_end) = spans[1]
    assert second_start >= first_end, spans[1]
    (a_start, a_end), (b_start, b_end) = spans[2]
    assert b_start < a_end, f"the control run should overlap: {spans[2]}"


# --------------------------------------------------------------------------- quality gates


def _corrupt_records(lake, layer: str) -> None:
    """Rewrite a layer's activation_records outside the pipeline (bypassing its gate) so that
    they fail their suite: negative maxima on the top excerpts."""
    records = read_table(lake, "activation_records", where={"layer": layer})
    bad = records.with_columns(
        max_activation=pl.when(pl.col("kind") == "top").then(-pl.col("max_activation")).otherwise(pl.col("max_activation"))
    )
    write_table(lake, "activation_records", bad, replace_where={"layer": layer})


def test_a_corrupted_upstream_table_stops_downstream_assets(materialized, tmp_path):
    """activation_records rewritten outside the pipeline (bypassing its gate): the explain job
    fails its upstream gate before computing anything, and nothing after it runs."""
    home, lake = _clone(materialized, tmp_path)
    settings = small_settings(lake, layers="0-1")
    defs = build_definitions(settings)
    _corrupt_records(lake, "0")
    versions_before = {t: open_table(lake, t).version() for t in jobs.EXPLAIN_ASSETS}

    with _instance(home) as instance:
        result = defs.resolve_job_def(jobs.EXPLAIN_JOB).execute_in_process(
            instance=instance, partition_key="0", raise_on_error=False, run_config=QUIET
        )
    assert not result.success
    evaluations = {(e.asset_key.to_user_string(), e.check_name): e for e in result.get_asset_check_evaluations()}
    gate = evaluations[("explanations", UPSTREAM_CHECK_NAME)]
    assert gate.passed is False
    assert gate.metadata["upstream"].value == "activation_records"
    assert gate.metadata["expectations_failed"].value >= 1
    assert gate.metadata["expectations_evaluated"].value > gate.metadata["expectations_failed"].value
    assert "|" in gate.metadata["failing_rows"].value  # a Markdown table of failing rows
    assert result.get_asset_materialization_events() == []
    started = {e.step_key for e in result.all_events if e.event_type_value == "STEP_START"}
    failed = {e.step_key for e in result.all_events if e.event_type_value == "STEP_FAILURE"}
    assert started == failed == {"explanations"}  # simulations, scores, layer_summary never ran
    assert {t: open_table(lake, t).version() for t in jobs.EXPLAIN_ASSETS} == versions_before  # nothing written


def test_the_upstream_gate_names_the_corrupt_layer_of_a_range(materialized, tmp_path):
    """Over layers 0-1 with layer 1 corrupt: the explanations step stops with the check naming
    layer 1, nothing of layer 1 is written, nothing downstream runs, and layer 0's rows stay."""
    home, lake = _clone(materialized, tmp_path)
    settings = small_settings(lake, layers="0-1")
    defs = build_definitions(settings)
    _corrupt_records(lake, "1")
    layer_1_before = read_table(lake, "explanations", where={"layer": "1"}).sort("neuron", "explainer_id")
    embeddings_before = open_table(lake, "explanation_embeddings").version()

    with _instance(home) as instance:
        result = defs.resolve_job_def(jobs.EXPLAIN_JOB).execute_in_process(
            instance=instance, tags=RANGE, raise_on_error=False, run_config=QUIET
        )
    assert not result.success
    evaluations = {(e.asset_key.to_user_string(), e.check_name): e for e in result.get_asset_check_evaluations()}
    gate = evaluations[("explanations", UPSTREAM_CHECK_NAME)]
    assert gate.passed is False
    assert gate.metadata["layer"].value == "1"
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    assert "layer 1" in failure.event_specific_data.error.message
    started = {e.step_key for e in result.all_events if e.event_type_value == "STEP_START"}
    assert started == {"explanations"}
    assert read_table(lake, "explanations", where={"layer": "1"}).sort("neuron", "explainer_id").equals(layer_1_before)
    assert read_table(lake, "explanations", where={"layer": "0"}).height > 0
    assert open_table(lake, "explanation_embeddings").version() == embeddings_before


def test_check_results_show_expectations_evaluated(materialized):
    evaluations = materialized["result"].get_asset_check_evaluations()

    assert {(e.asset_key.to_user_string(), e.check_name) for e in evaluations} >= {
        (name, CHECK_NAME) for name in LAYER_ASSETS
    } | {(name, UPSTREAM_CHECK_NAME) for name in jobs.EXPLAIN_ASSETS}
    for evaluation in evaluations:
        assert evaluation.passed, evaluation
        if evaluation.check_name == CHECK_NAME:
            assert evaluation.metadata["expectations_evaluated"].value > 0
            assert evaluation.metadata["expectations_failed"].value == 0


# --------------------------------------------------------------------------- metadata


def test_materialization_metadata_tells_the_story(materialized):
    lake = materialized["settings"].lake_location.folder
    events = {}
    for event in materialized["result"].get_asset_materialization_events():
        events[(event.asset_key.to_user_string(), event.materialization.partition)] = event.materialization.metadata

    for table in LAYER_ASSETS:
        for layer in ("0", "1"):
            metadata = events[(table, layer)]
            # Path and Delta version of the table as this run left it; rows of this layer.
            assert metadata["path"].value == str(lake / table)
            assert metadata["delta_version"].value == open_table(lake, table).version()
            rows = read_table(lake, table, where={"layer": layer}).height
            assert metadata["dagster/row_count"].value == rows, (table, layer)

    capture = events[("neuron_activations", "0")]
    assert capture["coverage"].value == 1.0 and capture["neurons"].value == 8

    explained = events[("explanations", "0")]
    assert explained["neurons_explained"].value == 8
    for key in ("prompt_tokens", "completion_tokens", "new_prompt_tokens", "new_completion_tokens", "usd_new", "usd_in_layers"):
        assert key in explained, key
    assert "explainer_id" in explained["coverage"].value

    for layer in ("0", "1"):
        scores = events[("scores", layer)]
        layer_scores = read_table(lake, "scores", where={"layer": layer})["score"].drop_nulls()
        assert scores["mean_score"].value == pytest.approx(layer_scores.mean())
        assert scores["p90_score"].value == pytest.approx(layer_scores.quantile(0.9, interpolation="linear"))
        image = scores["score_histogram"].value
        assert image.startswith("![score histogram](data:image/png;base64,")
        png = base64.b64decode(image.split("base64,", 1)[1].rstrip(")"))
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        top = scores["top_neurons"].value
        assert [r.data["layer"] for r in top.records] == [layer] * min(10, len(layer_scores))
        best = top.records[0].data
        assert best["score"] == pytest.approx(layer_scores.max(), abs=1e-4) and best["explanation"]


# --------------------------------------------------------------------------- staleness


def test_prompt_or_explainer_change_makes_explain_side_stale_not_capture(materialized, tmp_path):
    home = materialized["root"] / "home"
    lake = materialized["settings"].lake_location.folder
    with _instance(home) as instance:
        assert set(_statuses(instance, materialized["defs"]).values()) <= {"FRESH", "MISSING"}
        assert _statuses(instance, materialized["defs"])["neuron_viewer"] == "MISSING"

        # Another explainer setting (the baseline's token count)...
        changed = build_definitions(small_settings(lake, layers="0-1", explainers=[{"backend": "baseline", "baseline_tokens": 6}]))
        statuses = _statuses(instance, changed)
        assert {k for k, v in statuses.items() if v == "STALE"} == set(jobs.EXPLAIN_ASSETS)
        assert statuses["activation_records"] == statuses["neuron_activations"] == statuses["corpus_tokens"] == "FRESH"
        resolver = stale_status_resolver(instance, changed.resolve_asset_graph())
        assert [c.reason for c in resolver.get_stale_causes(dg.AssetKey("simulations"), "0")] == ["has a new code version"]

        # ... or a new prompt template for an LLM explainer.
        llm = [{"backend": "baseline"}, {"backend": "local", "layers": "0", "neurons": "0"}]
        prompts = tmp_path / "prompts"
        shutil.copytree(prompts_dir(), prompts)
        before = build_definitions(small_settings(lake, layers="0-1", explainers=llm), prompts_dir=prompts)
        (prompts / "explainer_v1.txt").write_text((prompts / "explainer_v1.txt").read_text() + "\nBe concise.\n")
        after = build_definitions(small_settings(lake, layers="0-1", explainers=llm), prompts_dir=prompts)
        graph_before, graph_after = before.resolve_asset_graph(), after.resolve_asset_graph()
        changed_versions = {
            k.to_user_string()
            for k in graph_after.get_all_asset_keys()
            if graph_before.get(k).code_version != graph_after.get(k).code_version
        }
        # The evaluation suite measures the explainers with their prompts: it changes too.
        assert changed_versions == set(jobs.EXPLAIN_ASSETS) | {"neuron_viewer", "evaluations"}

        # A simulator template only touches simulations and after.
        (prompts / "simulator_v1.txt").write_text((prompts / "simulator_v1.txt").read_text() + "\n")
        sim_llm = small_settings(lake, layers="0-1", explainers=llm, simulators=[{"backend": "local"}])
        a = build_definitions(sim_llm, prompts_dir=prompts).resolve_asset_graph()
        (prompts / "simulator_v1.txt").write_text((prompts / "simulator_v1.txt").read_text() + "\n")
        b = build_definitions(sim_llm, prompts_dir=prompts).resolve_asset_graph()
        assert {k.to_user_string() for k in a.get_all_asset_keys() if a.get(k).code_version != b.get(k).code_version} == set(
            jobs.RESCORE_ASSETS
        ) | {"neuron_viewer", "evaluations"}


def test_corpus_or_model_change_makes_everything_stale(materialized):
    lake = materialized["settings"].lake_location.folder
    with _instance(materialized["root"] / "home") as instance:
        changed = build_definitions(small_settings(lake, layers="0-1", corpus={"max_sequences": 40}))
        statuses = _statuses(instance, changed)
    assert {k for k, v in statuses.items() if v == "STALE"} == {"corpus_tokens", *LAYER_ASSETS}


def test_nightly_schedule_rematerializes_stale_layers_and_then_rests(materialized, tmp_path):
    home, lake = _clone(materialized, tmp_path)
    unchanged = build_definitions(small_settings(lake, layers="0-1"))
    changed = build_definitions(small_settings(lake, layers="0-1", explainers=[{"backend": "baseline", "baseline_tokens": 6}]))
    with _instance(home) as instance:
        [schedule] = unchanged.schedules
        data = schedule.evaluate_tick(dg.build_schedule_context(instance=instance))
        assert not data.run_requests and "stale" in data.skip_message

        [schedule] = changed.schedules
        data = schedule.evaluate_tick(dg.build_schedule_context(instance=instance))
        # Both layers share the same stale assets: one run over the range 0-1 (one forward pass
        # if capture were stale), explanations and everything after, nothing upstream.
        [request] = data.run_requests
        assert request.job_name == jobs.FULL_JOB
        assert set(request.asset_selection) == EXPLAIN_KEYS
        assert request.tags[automation.RANGE_START_TAG] == "0" and request.tags[automation.RANGE_END_TAG] == "1"

        # What the daemon launches: the request's assets with its partition-range tags.
        result = _materialize(changed, [k.to_user_string() for k in request.asset_selection], instance, tags=request.tags)
        assert result.success
        assert {(e.asset_key.to_user_string(), e.materialization.partition) for e in result.get_asset_materialization_events()} == {
            (name, layer) for name in jobs.EXPLAIN_ASSETS for layer in ("0", "1")
        }
        assert {k for k, v in _statuses(instance, changed, "1").items() if v == "STALE"} == set()
        data = schedule.evaluate_tick(dg.build_schedule_context(instance=instance))
        assert not data.run_requests
    # The new explainer id's rows sit next to the old ones (a new id never overwrites).
    assert read_table(lake, "explanations")["explainer_id"].n_unique() == 2


def test_stale_layers_group_into_contiguous_ranges(tmp_path):
    assert automation._ranges(["0", "1", "2", "5", "7", "8"]) == [("0", "2"), ("5", "5"), ("7", "8")]


# --------------------------------------------------------------------------- sensor


def test_a_prompt_change_requests_exactly_the_explanation_and_later_assets_for_materialized_layers(tmp_path):
    prompts = tmp_path / "prompts"
    shutil.copytree(prompts_dir(), prompts)
    settings = small_settings(
        tmp_path / "lake",
        explainers=[{"backend": "baseline"}, {"backend": "local", "neurons": "0-1"}],
        simulators=[{"backend": "baseline"}, {"backend": "local", "neurons": "0-1"}],
    )
    defs = build_definitions(settings, prompts_dir=prompts)
    sensor = {s.name: s for s in defs.sensors}[automation.SENSOR_NAME]
    with dg.DagsterInstance.ephemeral() as instance:
        for layer in ("0", "3", "12"):
            for key in ("activation_records", "explanations"):
                instance.report_runless_asset_event(dg.AssetMaterialization(key, partition=layer))
        instance.report_runless_asset_event(dg.AssetMaterialization("activation_records", partition="5"))

        def tick(cursor):
            return sensor.evaluate_tick(dg.build_sensor_context(instance=instance, cursor=cursor, definitions=defs))

        first = tick(None)  # records the hashes, requests nothing
        assert not first.run_requests and first.cursor
        unchanged = tick(first.cursor)
        assert not unchanged.run_requests and "unchanged" in unchanged.skip_message

        (prompts / "explainer_v1.txt").write_text((prompts / "explainer_v1.txt").read_text() + "\nOne phrase.\n")
        explain = tick(first.cursor)
        assert sorted(r.partition_key for r in explain.run_requests) == ["0", "12", "3"]  # not 5: never explained
        for request in explain.run_requests:
            assert request.job_name == jobs.EXPLAIN_JOB
            assert set(request.asset_selection) == EXPLAIN_KEYS
            assert request.run_key.endswith(f"layer-{request.partition_key}")
        assert explain.cursor != first.cursor
        assert not tick(explain.cursor).run_requests  # the new hash is now the cursor

        (prompts / "simulator_v1.txt").write_text((prompts / "simulator_v1.txt").read_text() + "\n")
        rescore = tick(explain.cursor)
        assert len(rescore.run_requests) == 3
        for request in rescore.run_requests:
            assert request.job_name == jobs.RESCORE_JOB and set(request.asset_selection) == RESCORE_KEYS

    # A settings change counts too (the module-level definitions re-read settings every tick).
    current = {"settings": settings}
    reloading = build_definitions(settings, prompts_dir=prompts, reload_settings=lambda: current["settings"])
    sensor = {s.name: s for s in reloading.sensors}[automation.SENSOR_NAME]
    with dg.DagsterInstance.ephemeral() as instance:
        instance.report_runless_asset_event(dg.AssetMaterialization("explanations", partition="2"))
        first = sensor.evaluate_tick(dg.build_sensor_context(instance=instance, cursor=None, definitions=reloading))
        current["settings"] = small_settings(
            tmp_path / "lake", explainers=[{"backend": "baseline"}, {"backend": "local", "model": "other-model"}]
        )
        data = sensor.evaluate_tick(dg.build_sensor_context(instance=instance, cursor=first.cursor, definitions=reloading))
        assert [(r.partition_key, set(r.asset_selection)) for r in data.run_requests] == [("2", EXPLAIN_KEYS)]


# --------------------------------------------------------------------------- declarative automation


def test_scores_and_summary_follow_their_upstream_and_the_viewer_any_summary(tmp_path):
    defs = build_definitions(small_settings(tmp_path / "lake"))
    with dg.DagsterInstance.ephemeral() as instance:

        def report(key, partition=None):
            instance.report_runless_asset_event(dg.AssetMaterialization(key, partition=partition))

        report("corpus_tokens")
        for key in ("neuron_activations", "activation_records", "explanations", "simulations", "scores", "layer_summary"):
            report(key, "0")
        report("neuron_viewer")
        result = dg.evaluate_automation_conditions(defs=defs, instance=instance)
        assert result.total_requested == 0

        report("simulations", "0")  # e.g. a re-simulation of layer 0
        result = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=result.cursor)
        # Scores and the summary of that layer, requested together (one run), nothing else.
        assert result.get_requested_partitions(dg.AssetKey("scores")) == {"0"}
        assert result.get_requested_partitions(dg.AssetKey("layer_summary")) == {"0"}
        assert result.total_requested == 2

        report("scores", "0")
        report("layer_summary", "0")
        result = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=result.cursor)
        assert result.get_num_requested(dg.AssetKey("neuron_viewer")) == 1 and result.total_requested == 1

        # Nothing is requested for layers whose inputs were never materialized, and nothing twice.
        report("neuron_viewer")
        result = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=result.cursor)
        assert result.total_requested == 0
