"""Stopping a run on request, at a safe point, losing nothing.

A stop is asked for by SIGINT / SIGTERM (Ctrl-C, `kill`, Kubernetes deleting the pod) or by
terminating the run from the Dagster UI (the run's status becomes CANCELING; a run the UI
launched also gets SIGINT from Dagster's cancellation thread). The stage loops reach
``checkpoint()`` between units of work (a batch of sequences, a chunk of explanations, one
neuron's simulations; see progress.py): there nothing is half-written, since Delta commits are
atomic and every LLM answer is in the cache the moment it arrives. At a checkpoint after a stop
was asked for, the run is marked CANCELING and Dagster's own interrupt is raised, so Dagster
ends the step and the run as CANCELED (not failed, not left STARTED).

Who catches the signals:

- ``neuron-pipeline run`` executes its Dagster runs in a worker thread (Dagster then installs no
  signal handlers of its own) and handles the signals in the main thread with ``StopOnSignal``:
  the first one asks for a stop, a second one stops at once.
- A run worker started by the Dagster UI executes in its main thread, where Dagster turns SIGINT
  into an immediate interrupt; ``signals()`` (held by each progress display) turns the first one
  into a stop at the next checkpoint instead, and a second one into Dagster's immediate interrupt.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Callable, Iterator

import dagster as dg

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
# How often a checkpoint asks the instance whether the run was terminated from the UI.
STATUS_POLL_S = 2.0
_STOPPING = (dg.DagsterRunStatus.CANCELING, dg.DagsterRunStatus.CANCELED)

_stop = threading.Event()
_last_poll: dict[str, float] = {}


def request_stop() -> None:
    _stop.set()


def stop_requested() -> bool:
    return _stop.is_set()


def clear() -> None:
    """Forget an earlier request (a new CLI command in the same process, e.g. in tests)."""
    _stop.clear()
    _last_poll.clear()


def current_context() -> dg.AssetExecutionContext | None:
    """The Dagster step being executed in this thread, if any."""
    try:
        return dg.AssetExecutionContext.get()
    except Exception:  # noqa: BLE001 - outside Dagster (a notebook, a unit test), or an asset check
        return None


def _terminated_from_ui(context: dg.AssetExecutionContext) -> bool:
    now = time.monotonic()
    if now - _last_poll.get(context.run_id, 0.0) < STATUS_POLL_S:
        return False
    _last_poll[context.run_id] = now
    run = context.instance.get_run_by_id(context.run_id)
    return run is not None and run.status in _STOPPING


def _mark_canceling(context: dg.AssetExecutionContext | None, message: str) -> None:
    """So that Dagster ends the interrupted run CANCELED rather than failed."""
    if context is None:
        return
    run = context.instance.get_run_by_id(context.run_id)
    if run is not None and run.status not in _STOPPING:
        context.instance.report_run_canceling(run, message=message)


def checkpoint() -> None:
    """A safe point: when a stop was asked for, end the step here (the run ends CANCELED)."""
    context = current_context()
    if not _stop.is_set() and context is not None and _terminated_from_ui(context):
        _stop.set()
    if not _stop.is_set():
        return
    _mark_canceling(context, "Stop requested (SIGINT / SIGTERM); stopping at a safe point.")
    raise dg.DagsterExecutionInterruptedError("stopped at a safe point on request")


@contextlib.contextmanager
def signals() -> Iterator[None]:
    """Around a stage loop in the main thread (a run worker started by the UI): the first SIGINT /
    SIGTERM asks for a stop at the next checkpoint, a second one interrupts at once. Elsewhere
    (the CLI's worker thread) the CLI's own handler is in charge and this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    context = current_context()

    def handler(signum, frame):  # noqa: ARG001
        if _stop.is_set():
            _mark_canceling(context, "Stopped at once by a second SIGINT / SIGTERM.")
            raise dg.DagsterExecutionInterruptedError("stopped at once on a second interrupt")
        _stop.set()

    previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    for sig in STOP_SIGNALS:
        signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


class StopOnSignal:
    """The CLI's handler, in the main thread while a worker thread executes the runs: the first
    SIGINT / SIGTERM asks for a stop (``on_first`` is told, e.g. to print that it is stopping);
    a second calls ``on_second``, which stops the process at once."""

    def __init__(self, on_first: Callable[[int], None], on_second: Callable[[int], None]):
        self.on_first, self.on_second = on_first, on_second
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:  # noqa: ARG002
        if _stop.is_set():
            self.on_second(signum)
            return
        _stop.set()
        self.on_first(signum)

    def __enter__(self) -> "StopOnSignal":
        self._previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._previous.items():
            signal.signal(sig, old)


def run_in_worker(function: Callable, *args, **kwargs):
    """``function(*args, **kwargs)`` in a worker thread, the main thread waiting in short joins so
    that its signal handlers run at once. Returns the result or raises what the function raised."""
    outcome: dict = {}

    def target():
        try:
            outcome["value"] = function(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            outcome["error"] = exc

    worker = threading.Thread(target=target, name="neuron-pipeline-run", daemon=True)
    worker.start()
    while worker.is_alive():
        worker.join(0.2)
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")
