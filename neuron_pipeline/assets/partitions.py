"""Layer partitions, defined once: one partition per decoder layer of the subject model."""

import dagster as dg


def layer_partitions(num_layers: int) -> dg.StaticPartitionsDefinition:
    # String keys: they become the Delta partition column `layer` (see lake/schemas.py).
    return dg.StaticPartitionsDefinition([str(layer) for layer in range(num_layers)])


def layers_of(context: dg.AssetExecutionContext) -> list[int]:
    """The layers of this run: one partition, or a whole range in a single-run backfill."""
    return sorted(int(key) for key in context.partition_keys)


# Steps that run a model share the `gpu` concurrency pool: at most `limit` of them at once
# across all runs (instance config: deploy/dagster.yaml `concurrency: pools:`, default 1).
GPU_POOL = "gpu"
GPU_TAG = "neuron_pipeline/gpu"
K8S_CONFIG_TAG = "dagster-k8s/config"
# On Kubernetes (dagster-k8s run launcher or k8s_job_executor) a GPU step's pod asks for one GPU
# and tolerates the usual taint of GPU nodes. The settings' `platform.k8s` section changes these
# (deployment.gpu_op_tags); this is what the defaults produce.
GPU_TAGS = {
    GPU_TAG: "true",
    K8S_CONFIG_TAG: {
        "container_config": {"resources": {"limits": {"nvidia.com/gpu": "1"}, "requests": {"nvidia.com/gpu": "1"}}},
        "pod_spec_config": {"tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]},
    },
}
