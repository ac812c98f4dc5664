"""Runs started by the CLI carry their process: a run whose process died is failed and its
concurrency slots are freed.

A run killed outright (SIGKILL, OOM killer, a closed laptop) never reports its end: it stays
STARTED in the instance and keeps its `gpu` pool slot, so with the default limit of 1 every later
model step waits forever. Dagster's daemon frees slots only of runs that *finished*, and its
default run launcher cannot tell a dead run worker from a live one; the CLI can, for the runs it
started on this host: it tags them with host and pid, and before starting new runs fails those
whose process is gone.
"""

from __future__ import annotations

import os
import socket

import dagster as dg

HOST_TAG = "neuron_pipeline/host"
PID_TAG = "neuron_pipeline/pid"
_ACTIVE = [dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.CANCELING]


def owner_tags() -> dict[str, str]:
    """Tags naming this process as the run's owner."""
    return {HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid())}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def fail_dead_runs(instance: dg.DagsterInstance) -> list[str]:
    """Fail this host's CLI runs whose process has exited and free their pool slots; returns
    their run ids."""
    host = socket.gethostname()
    records = instance.get_run_records(
        filters=dg.RunsFilter(statuses=_ACTIVE, tags={HOST_TAG: host}), limit=1000
    )
    failed = []
    for record in records:
        run = record.dagster_run
        pid = run.tags.get(PID_TAG, "")
        if not pid.isdigit() or int(pid) == os.getpid() or _alive(int(pid)):
            continue
        instance.report_run_failed(run, f"the process that ran it (pid {pid} on {host}) exited without ending the run")
        if instance.event_log_storage.supports_global_concurrency_limits:
            instance.event_log_storage.free_concurrency_slots_for_run(run.run_id)
        failed.append(run.run_id)
    return failed


def end_own_runs(instance: dg.DagsterInstance, message: str, recent: int = 5) -> list[str]:
    """After this process's run was stopped: its runs still active are marked canceled, and the
    pool slots of its latest runs are freed (Dagster frees a stopped step's slot itself, this
    makes sure). Returns the ids of the runs it marked canceled."""
    records = instance.get_run_records(
        filters=dg.RunsFilter(tags={HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid())}), limit=recent
    )
    canceled = []
    for record in records:
        run = record.dagster_run
        if run.status in _ACTIVE:
            instance.report_run_canceled(run, message)
            canceled.append(run.run_id)
        if instance.event_log_storage.supports_global_concurrency_limits:
            instance.event_log_storage.free_concurrency_slots_for_run(run.run_id)
    return canceled
