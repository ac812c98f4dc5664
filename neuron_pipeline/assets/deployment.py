"""Where steps run: the in-process executor by default, Kubernetes pods on GPU nodes in production.

``platform.executor: k8s`` puts every step of a run in its own pod (dagster-k8s's
``k8s_job_executor``). Steps that run a model (capture, explanations, simulations) carry
``dagster-k8s/config`` tags that ask for a GPU and tolerate GPU nodes' taint; with the
``K8sRunLauncher`` (deploy/k8s/) every layer partition is its own run, so layers run in parallel
on as many GPU nodes as the ``gpu`` concurrency pool allows (instance config, ``concurrency:
pools:``). The lake must be shared by all pods: object storage (``lake: s3://…``, ``gs://…``,
``az://…``; credentials from the pods' environment, e.g. ``env_secrets`` or workload identity),
or a ReadWriteMany volume mounted at a local lake folder (``platform.k8s.lake_volume_claim``).
"""

from __future__ import annotations

import os
from typing import Any

import dagster as dg

from neuron_pipeline.assets.partitions import GPU_TAG, K8S_CONFIG_TAG
from neuron_pipeline.config import Settings

# The ops (= step names) that hold a model on the accelerator.
GPU_STEPS = ("capture", "neuron_output_tokens", "explanations", "simulations", "scorer_results")
LAKE_VOLUME = "lake"
# Passed on to every step pod when set where the definitions load, so steps read the same settings
# (the Helm chart's includeConfigInLaunchedRuns passes the code location's whole env as well).
FORWARDED_ENV = ["NEURON_PIPELINE_CONFIG", "NEURON_PIPELINE_PROFILE"]


def gpu_k8s_config(settings: Settings) -> dict[str, Any]:
    """The ``dagster-k8s/config`` of a GPU step: resources, node selector, tolerations."""
    k8s = settings.platform.k8s
    gpus = str(k8s.gpus_per_step)
    pod_spec: dict[str, Any] = {"tolerations": [dict(t) for t in k8s.gpu_tolerations]}
    if k8s.gpu_node_selector:
        pod_spec["node_selector"] = dict(k8s.gpu_node_selector)
    return {
        "container_config": {"resources": {"limits": {k8s.gpu_resource: gpus}, "requests": {k8s.gpu_resource: gpus}}},
        "pod_spec_config": pod_spec,
    }


def gpu_op_tags(settings: Settings) -> dict[str, Any]:
    """Op tags of the GPU steps (together with ``pool="gpu"`` on the asset)."""
    return {GPU_TAG: "true", K8S_CONFIG_TAG: gpu_k8s_config(settings)}


def k8s_executor_config(settings: Settings) -> dict[str, Any]:
    """Config of dagster-k8s's ``k8s_job_executor``: one pod per step (the lake volume in each
    when the lake is a folder on a volume)."""
    k8s = settings.platform.k8s
    config: dict[str, Any] = {
        "max_concurrent": k8s.max_concurrent,
        "env_vars": [f"{name}={os.environ[name]}" for name in FORWARDED_ENV if os.environ.get(name)],
        # Steps without a GPU still need room for polars and Great Expectations.
        "step_k8s_config": {
            "container_config": {"resources": {"requests": {"cpu": "1", "memory": "4Gi"}}},
        },
    }
    if k8s.namespace:
        config["job_namespace"] = k8s.namespace
    if k8s.image:
        config["job_image"] = k8s.image
    if k8s.env_secrets:
        config["env_secrets"] = list(k8s.env_secrets)
    if k8s.lake_volume_claim:
        config["volumes"] = [{"name": LAKE_VOLUME, "persistent_volume_claim": {"claim_name": k8s.lake_volume_claim}}]
        config["volume_mounts"] = [{"name": LAKE_VOLUME, "mount_path": str(settings.lake_location.folder)}]
    return config


def k8s_executor(settings: Settings) -> dg.ExecutorDefinition:
    from dagster_k8s import k8s_job_executor

    return k8s_job_executor.configured(k8s_executor_config(settings), name="k8s")


def executor_for(settings: Settings) -> dg.ExecutorDefinition:
    """The executor the settings ask for; in-process unless told otherwise (torch loads once)."""
    kind = settings.platform.executor
    if kind == "k8s":
        return k8s_executor(settings)
    if kind == "multiprocess":
        return dg.multiprocess_executor
    return dg.in_process_executor
