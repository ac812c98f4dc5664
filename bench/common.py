"""Shared bench plumbing: results, timing, memory sampling, machine description."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
import traceback
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

REPO = Path(__file__).resolve().parent.parent


# --- results ----------------------------------------------------------------------------------


@dataclass
class Row:
    """One measured figure. ``target`` is a human-readable goal; ``met`` is None when there is none."""

    metric: str
    value: str
    target: str = ""
    met: bool | None = None
    note: str = ""

    @property
    def status(self) -> str:
        if self.met is None:
            return ""
        return "met" if self.met else "**missed**"


@dataclass
class Section:
    key: str
    title: str
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    tables: list[str] = field(default_factory=list)  # extra markdown tables
    error: str | None = None
    seconds: float = 0.0
    data: dict[str, Any] = field(default_factory=dict)  # raw numbers, for the JSON dump

    def add(self, metric: str, value: str, target: str = "", met: bool | None = None, note: str = "") -> Row:
        row = Row(metric, value, target, met, note)
        self.rows.append(row)
        return row


def run_section(key: str, title: str, body: Callable[[Section], None]) -> Section:
    """Run one bench section; an exception is recorded in the section instead of aborting the run."""
    section = Section(key, title)
    start = time.perf_counter()
    print(f"[bench] {key}: {title} ...", flush=True)
    try:
        body(section)
    except BaseException as exc:  # noqa: BLE001 - a failing section must not lose the others
        if isinstance(exc, KeyboardInterrupt):
            raise
        section.error = f"{type(exc).__name__}: {exc}\n\n" + "".join(traceback.format_exc(limit=8))
        print(f"[bench] {key} FAILED: {type(exc).__name__}: {exc}", flush=True)
    section.seconds = time.perf_counter() - start
    print(f"[bench] {key}: done in {section.seconds:.0f} s", flush=True)
    return section


# --- timing -----------------------------------------------------------------------------------


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def interleaved(methods: dict[str, Callable[[], Any]], reps: int) -> dict[str, list[float]]:
    """Run every method ``reps`` times, alternating (the order rotates each repetition, so no
    method always runs first or right after another); returns wall seconds per method."""
    names = list(methods)
    times: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(reps):
        order = names[rep % len(names) :] + names[: rep % len(names)]
        for name in order:
            start = time.perf_counter()
            methods[name]()
            times[name].append(time.perf_counter() - start)
    return times


def fmt_s(seconds: float) -> str:
    if seconds != seconds:
        return "n/a"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f} µs"
    if seconds < 1:
        return f"{seconds * 1e3:.0f} ms"
    return f"{seconds:.1f} s"


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


# --- memory -----------------------------------------------------------------------------------


def rss_bytes(pid: int | None = None) -> int:
    """Resident set size from /proc (no psutil needed)."""
    path = f"/proc/{pid or 'self'}/statm"
    with open(path) as handle:
        resident_pages = int(handle.read().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE")


def tree_rss_bytes(pid: int) -> int:
    """RSS of a process and its children (0 when it is gone)."""
    try:
        import psutil

        proc = psutil.Process(pid)
        total = proc.memory_info().rss
        for child in proc.children(recursive=True):
            try:
                total += child.memory_info().rss
            except psutil.Error:
                pass
        return total
    except Exception:  # noqa: BLE001 - psutil missing or the process ended
        try:
            return rss_bytes(pid)
        except OSError:
            return 0


class RSSSampler:
    """Samples the RSS of a process (default: this one) every ``interval`` seconds in a thread.

    ``with sampler.phase(name):`` records, per phase, the RSS at its start and the highest RSS
    seen during it. torch's CPU allocations are invisible to tracemalloc; RSS sees them."""

    def __init__(self, pid: int | None = None, interval: float = 0.01, tree: bool = False):
        self.pid = pid or os.getpid()
        self.interval = interval
        self.tree = tree
        self.peak = 0
        self.samples: list[tuple[float, int]] = []
        self.keep_samples = False
        self._phase_peak = 0
        self.phases: dict[str, dict[str, int]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _read(self) -> int:
        return tree_rss_bytes(self.pid) if self.tree else rss_bytes(self.pid)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                value = self._read()
            except OSError:
                value = 0
            self.peak = max(self.peak, value)
            self._phase_peak = max(self._phase_peak, value)
            if self.keep_samples:
                self.samples.append((time.time(), value))
            self._stop.wait(self.interval)

    def __enter__(self) -> "RSSSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = self._read()
        self._phase_peak = start
        try:
            yield
        finally:
            end = self._read()
            peak = max(self._phase_peak, end)
            entry = self.phases.setdefault(name, {"start": start, "peak": peak, "end": end, "growth": 0, "transient": 0})
            entry["peak"] = max(entry["peak"], peak)
            entry["end"] = end
            entry["growth"] += end - start  # memory the phase kept
            entry["transient"] = max(entry["transient"], peak - end)  # memory it used and gave back


def max_rss_self() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# --- subprocesses -----------------------------------------------------------------------------


def run_json_subprocess(module: str, args: dict, timeout: float, threads: int) -> dict:
    """Run ``python -m module`` with a JSON argument; it prints one JSON object on its last line."""
    env = dict(os.environ)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env["OMP_NUM_THREADS"] = str(threads)
    proc = subprocess.run(
        [sys.executable, "-m", module, json.dumps(args)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-12:]
        raise RuntimeError(f"{module} failed (exit {proc.returncode}): " + " | ".join(tail))
    return json.loads(lines[-1])


# --- machine ----------------------------------------------------------------------------------


def _proc_field(path: str, key: str) -> str | None:
    try:
        with open(path) as handle:
            for line in handle:
                if line.lower().startswith(key.lower()):
                    return line.split(":", 1)[1].strip()
    except OSError:
        return None
    return None


def load_average() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def machine_info(threads: int) -> dict[str, str]:
    import torch

    versions = {}
    for name in ("torch", "transformers", "polars", "deltalake", "duckdb", "pyarrow", "openai", "dagster"):
        try:
            module = __import__(name)
            versions[name] = getattr(module, "__version__", "?")
        except Exception:  # noqa: BLE001
            versions[name] = "not installed"
    mem_kb = _proc_field("/proc/meminfo", "MemTotal")
    mem = f"{int(mem_kb.split()[0]) / 1024 ** 2:.1f} GiB" if mem_kb else "n/a"
    return {
        "cpu": _proc_field("/proc/cpuinfo", "model name") or platform.processor() or "n/a",
        "cores": str(os.cpu_count()),
        "ram": mem,
        "python": platform.python_version(),
        "torch_threads": str(threads),
        "cuda": str(torch.cuda.is_available()),
        **{f"v_{k}": v for k, v in versions.items()},
    }


def to_json(sections: list[Section]) -> str:
    return json.dumps([asdict(s) for s in sections], indent=1, default=str)
