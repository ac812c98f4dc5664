"""Layer partitions, defined once: one partition per decoder layer of the subject model."""

import dagster as dg


def layer_partitions(num_layers: int) -> dg.StaticPartitionsDefinition:
    # String keys: they become the Delta partition column `layer` (see lake/schemas.py).
    return dg.StaticPartitionsDefinition([str(layer) for layer in range(num_layers)])


def layers_of(context: dg.AssetExecutionContext) -> list[int]:
    """The layers of this run: one partition, or a whole range in a single-run backfill."""
    return sorted(int(key) for key in context.partition_keys)


# Tags that place model-running steps on GPU nodes and in the `gpu` concurrency pool.
GPU_POOL = "gpu"
GPU_TAGS = {"neuron_pipeline/gpu": "true"}
