"""Progress of the long stage loops: tqdm bars on a terminal, progress lines everywhere.

The stage loops (capture's forward pass, explanations, simulations) report through ``track``
where they used tqdm. On a terminal the bar is tqdm's, as before. In addition, when a loop starts
and ends and every ``platform.progress_interval_s`` seconds (default 30), one line such as

    progress explanations layer 3: 1,200/6,400 neurons (19%), 4.1 neurons/s, ETA 0:21:08, LLM 2,345,678 tokens $1.2345

goes to the Dagster run's log, so the UI shows where a run is, and, when the CLI asks for it
(``echo(True)``: no terminal and no ``--verbose``), to stdout: a file, a pod's log, a CI job.
Tokens and dollars are what this run's LLM clients have paid for so far (cached answers are free).

Every update is also a safe point to stop at (interrupts.checkpoint).
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from tqdm.auto import tqdm

from neuron_pipeline.assets import interrupts

DEFAULT_INTERVAL_S = 30.0

_echo = {"on": False}
_lock = threading.Lock()


def echo(on: bool) -> None:
    """Also print progress lines to stdout (the CLI without a terminal)."""
    _echo["on"] = bool(on)


@dataclass
class Position:
    """Where the latest loop stands: for the CLI's line when a run is stopped."""

    stage: str
    where: str
    done: int
    total: int
    unit: str

    def describe(self) -> str:
        return f"{self.stage} {self.where} ({self.done:,} of {self.total:,} {self.unit}s done)"


_last: dict[str, Position | None] = {"position": None}


def last_position() -> Position | None:
    return _last["position"]


def forget() -> None:
    _last["position"] = None


def describe_layers(layers: Any) -> str:
    """'layer 3', 'layers 0-4' or 'layers 0,2,5'."""
    if isinstance(layers, (list, tuple, range)):
        values = sorted(int(layer) for layer in layers)
        if len(values) == 1:
            return f"layer {values[0]}"
        if values == list(range(values[0], values[-1] + 1)):
            return f"layers {values[0]}-{values[-1]}"
        return "layers " + ",".join(map(str, values))
    return f"layer {layers}"


def _duration(seconds: float) -> str:
    return str(timedelta(seconds=int(round(seconds))))


def _rate(per_second: float) -> str:
    return f"{per_second:,.0f}" if per_second >= 100 else f"{per_second:.1f}" if per_second >= 1 else f"{per_second:.2f}"


class Progress:
    """A tqdm bar (on a terminal) plus progress lines; use like tqdm: as an iterable wrapper, or as
    a context manager with ``update(n)``."""

    def __init__(
        self,
        iterable: Iterable | None = None,
        *,
        total: int,
        stage: str,
        layer: Any = None,
        unit: str = "neuron",
        detail: str = "",
    ):
        self.iterable, self.total, self.stage, self.unit = iterable, int(total), stage, unit
        self.where = (describe_layers(layer) if layer is not None else "") + (f" {detail}" if detail else "")
        self.where = self.where.strip()
        self.done = 0
        interrupts.checkpoint()  # a stop asked for between loops ends the step before this one starts
        self.context = interrupts.current_context()
        self.interval_s = self._interval()
        self.started = self.last_line = time.monotonic()
        self.bar = tqdm(total=self.total, desc=f"{stage} {self.where}".strip(), unit=unit, disable=None)
        self._signals = interrupts.signals()
        self._signals.__enter__()
        self._closed = False
        self._record()
        self._emit("start")
        # Lines at a steady interval even while one unit of work (a chunk of 64 explanations)
        # takes longer than the interval: tokens and dollars still move.
        self._ticker_stop = threading.Event()
        self._ticker = threading.Thread(target=self._tick, name=f"progress-{stage}", daemon=True)
        self._ticker.start()

    def _interval(self) -> float:
        resources = getattr(self.context, "resources", None)
        pipeline = getattr(resources, "pipeline", None)
        try:
            return float(pipeline.settings.platform.progress_interval_s)
        except AttributeError:
            return DEFAULT_INTERVAL_S

    def _spend(self) -> str:
        llm = getattr(getattr(self.context, "resources", None), "llm", None)
        spend = getattr(llm, "spend", None)
        if spend is None:
            return ""
        tokens, usd = spend()
        return f", LLM {tokens:,} tokens ${usd:.4f}"

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        share = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        head = f"progress {self.stage} {self.where}".rstrip() + f": {self.done:,}/{self.total:,} {self.unit}s{share}"
        if self.done and elapsed > 0:
            rate = self.done / elapsed
            eta = _duration((self.total - self.done) / rate) if rate > 0 else "?"
            head += f", {_rate(rate)} {self.unit}s/s, ETA {eta}"
        else:
            head += ", ETA ?"
        return head + f", elapsed {_duration(elapsed)}" + self._spend()

    def _emit(self, note: str = "") -> None:
        self.last_line = time.monotonic()
        text = self.line() + (f" - {note}" if note else "")
        if self.context is not None:
            try:
                self.context.log.info(text)
            except Exception:  # noqa: BLE001 - progress never fails a stage
                pass
        if _echo["on"]:
            with _lock:
                print(text, file=sys.stdout, flush=True)

    def _tick(self) -> None:
        while not self._ticker_stop.wait(max(0.05, self.last_line + self.interval_s - time.monotonic())):
            if time.monotonic() - self.last_line >= self.interval_s and self.done < self.total:
                self._emit()

    def _record(self) -> None:
        _last["position"] = Position(self.stage, self.where, self.done, self.total, self.unit)

    def update(self, n: int = 1) -> None:
        self.done += int(n)
        self.bar.update(n)
        self._record()
        interrupts.checkpoint()

    def __iter__(self) -> Iterator:
        assert self.iterable is not None
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._ticker_stop.set()
        self.bar.close()
        self._signals.__exit__(None, None, None)
        if self.done >= self.total:
            self._emit("done")

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def track(iterable: Iterable | None = None, **kwargs) -> Progress:
    """``tqdm(...)`` for the stage loops; see ``Progress`` for the arguments."""
    return Progress(iterable, **kwargs)
