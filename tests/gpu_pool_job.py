"""Two independent GPU-pool steps, loaded by the multiprocess executor's subprocesses (test_platform)."""

import time

import dagster as dg

from neuron_pipeline.assets.partitions import GPU_POOL, GPU_TAGS

STEP_SECONDS = 1.0


def _gpu_asset(name: str) -> dg.AssetsDefinition:
    @dg.asset(name=name, pool=GPU_POOL, op_tags=GPU_TAGS)
    def _asset() -> None:
        time.sleep(STEP_SECONDS)

    return _asset


def define_job() -> dg.JobDefinition:
    defs = dg.Definitions(
        assets=[_gpu_asset("gpu_step_a"), _gpu_asset("gpu_step_b")],
        jobs=[dg.define_asset_job("two_gpu_steps", executor_def=dg.multiprocess_executor)],
    )
    return defs.resolve_job_def("two_gpu_steps")
