"""A CLI run killed outright must not keep the `gpu` pool slot: later runs would wait forever.

Reproduces the failure for real: a separate process materializes a GPU-pool step in a persistent
instance (deploy/dagster.yaml: pool limit 1) and is SIGKILLed while it holds the slot."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import dagster as dg
import pytest

from neuron_pipeline.assets.partitions import GPU_POOL
from neuron_pipeline.assets.run_owner import HOST_TAG, PID_TAG, fail_dead_runs, owner_tags
from neuron_pipeline.cli import _instance

ROOT = Path(__file__).resolve().parents[1]

# A GPU-pool step, materialized with the CLI's owner tags; SLEEP_S long, so it is killed inside it.
STEP_SCRIPT = textwrap.dedent(
    """
    import os, sys, time
    import dagster as dg
    from neuron_pipeline.assets.partitions import GPU_POOL
    from neuron_pipeline.assets.run_owner import owner_tags

    @dg.asset(pool=GPU_POOL)
    def model_step() -> None:
        print("STEP", flush=True)
        time.sleep(float(os.environ["SLEEP_S"]))

    result = dg.materialize([model_step], instance=dg.DagsterInstance.get(), tags=owner_tags())
    print("DONE" if result.success else "FAILED", flush=True)
    """
)


@pytest.fixture()
def dagster_home(tmp_path, monkeypatch):
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(ROOT / "deploy" / "dagster.yaml", home / "dagster.yaml")
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    return home


def _start_step(home: Path, sleep_s: float) -> subprocess.Popen:
    env = {**os.environ, "DAGSTER_HOME": str(home), "SLEEP_S": str(sleep_s)}
    return subprocess.Popen([sys.executable, "-c", STEP_SCRIPT], env=env, stdout=subprocess.PIPE, text=True)


def _claimed(instance: dg.DagsterInstance) -> list[str]:
    return [slot.run_id for slot in instance.event_log_storage.get_concurrency_info(GPU_POOL).claimed_slots]


def test_a_killed_runs_slot_is_freed_and_later_runs_go_through(dagster_home, capsys):
    killed = _start_step(dagster_home, sleep_s=600)
    try:
        assert killed.stdout.readline().strip() == "STEP"  # inside the step: the slot is held
        os.kill(killed.pid, signal.SIGKILL)
        killed.wait(timeout=30)
    finally:
        killed.kill()
    with dg.DagsterInstance.get() as instance:
        [record] = instance.get_run_records()
        run = record.dagster_run
        assert run.status == dg.DagsterRunStatus.STARTED and run.tags[PID_TAG] == str(killed.pid)
        assert _claimed(instance) == [run.run_id]  # the stuck slot the bug was about

    # What `neuron-pipeline run` does before starting its runs.
    with _instance() as instance:
        assert f"run {run.run_id} had died without ending" in capsys.readouterr().out
        assert instance.get_run_by_id(run.run_id).status == dg.DagsterRunStatus.FAILURE
        assert _claimed(instance) == []
        assert fail_dead_runs(instance) == []  # idempotent

    # The pool is usable again: a new GPU step finishes (before the fix it waited forever).
    later = _start_step(dagster_home, sleep_s=0)
    try:
        out, _ = later.communicate(timeout=180)
    finally:
        later.kill()
    assert "DONE" in out


def test_live_and_foreign_runs_are_not_touched(dagster_home):
    with dg.DagsterInstance.get() as instance:
        ours = instance.create_run_for_job(
            dg.define_asset_job("j").resolve(asset_graph=dg.Definitions(assets=[_noop]).resolve_asset_graph()),
            tags=owner_tags(),
        )
        other_host = instance.create_run_for_job(
            dg.define_asset_job("k").resolve(asset_graph=dg.Definitions(assets=[_noop]).resolve_asset_graph()),
            tags={HOST_TAG: "elsewhere", PID_TAG: "999999"},
        )
        for run in (ours, other_host):
            instance.handle_new_event(dg.EventLogEntry(
                error_info=None, level="debug", user_message="", run_id=run.run_id, timestamp=time.time(),
                dagster_event=dg.DagsterEvent(dg.DagsterEventType.RUN_START.value, job_name=run.job_name),
            ))
        assert fail_dead_runs(instance) == []
        assert instance.get_run_by_id(ours.run_id).status == dg.DagsterRunStatus.STARTED
        assert instance.get_run_by_id(other_host.run_id).status == dg.DagsterRunStatus.STARTED


@dg.asset
def _noop() -> None:
    return None
