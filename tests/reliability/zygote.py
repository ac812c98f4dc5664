"""Fork pipeline processes from one parent that has already imported everything.

The crash, concurrency and memory tests start many short-lived pipeline processes and kill some
of them with SIGKILL. A fresh ``neuron-pipeline`` process spends most of its first 10-15 s (on a
busy 2-core machine) importing torch, transformers and Dagster; here one parent, the *zygote*,
pays that once and forks a child per run. A child is an ordinary process: its own pid, its own
memory, killed for real by SIGKILL; it runs ``neuron_pipeline.cli.main(argv)`` (exactly what the
console script runs) or a function of this module, with stdout and stderr in a log file.

The zygote is single-threaded (forking a multi-threaded process is unsafe) and has run no
torch operation before forking, so every child starts torch's thread pools fresh.

Protocol (JSON lines): the test writes ``{"id", "argv" | "call", "kwargs", "env", "log"}`` on
the zygote's stdin; the zygote answers ``{"id", "pid"}`` when the child is forked and
``{"pid", "exit"}`` when it ends (exit -9: killed by SIGKILL).
"""

from __future__ import annotations

import json
import os
import queue
import select
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


# --- functions a child can run (``call``) ------------------------------------------------------------


def _vm_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def tiny_subject(neurons: int = 512, layers: int = 2, hidden: int = 64, vocab: int = 4096):
    """A randomly initialised Llama (the real architecture, tiny sizes): capture's memory does not
    depend on the weights, and it runs in seconds on a busy CPU."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from neuron_pipeline.subject.loading import Subject

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=neurons, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
    )
    model = LlamaForCausalLM(config).eval().requires_grad_(False)
    return Subject.from_model(model, "tiny-llama")


def capture_memory(sequences: int, out: str, neurons: int = 512, layers: int = 2, sequence_length: int = 64,
                   batch_size: int = 32) -> None:
    """Capture every neuron of every layer of a tiny Llama over ``sequences`` random sequences and
    write the peak resident memory of the capture alone (VmHWM reset before it starts) to ``out``."""
    import numpy as np

    from neuron_pipeline.config import RecordsSettings
    from neuron_pipeline.subject import capture_layers

    subject = tiny_subject(neurons=neurons, layers=layers)
    layers = list(range(subject.num_layers))
    neurons = list(range(subject.num_neurons))
    token_ids = np.random.default_rng(0).integers(0, 4000, size=(sequences, sequence_length), dtype=np.int64)
    # Warm-up on one batch: lazily allocated kernels and buffers are not corpus growth.
    capture_layers(subject, token_ids[:batch_size], layers, neurons, RecordsSettings(), batch_size)
    before = _vm_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    start = time.perf_counter()
    captures = capture_layers(subject, token_ids, layers, neurons, RecordsSettings(), batch_size)
    seconds = time.perf_counter() - start
    peak = _vm_kib("VmHWM")
    Path(out).write_text(
        json.dumps(
            {
                "sequences": sequences,
                "tokens": sequences * sequence_length,
                "neurons": len(neurons) * len(layers),
                "rss_before_mib": before / 1024,
                "peak_mib": peak / 1024,
                "capture_growth_mib": (peak - before) / 1024,
                # What a tokens x neurons matrix of the whole corpus would take, for scale.
                "dense_matrix_mib": sequences * sequence_length * len(neurons) * len(layers) * 4 / 2**20,
                "seconds": seconds,
                "count": int(captures[layers[0]].count),
            }
        )
    )


def write_records_slice(lake: str, rows: int, tag: int) -> None:
    """Replace layer 0 of activation_records with ``rows`` rows whose sequence_id is ``tag``: a
    write big enough (tens of MB) to be killed in the middle of."""
    import numpy as np
    import pyarrow as pa

    from neuron_pipeline.lake import write_table
    from neuron_pipeline.lake.schemas import SCHEMAS

    length = 64
    tokens = pa.array([[f" w{i}" for i in range(length)]] * rows, type=pa.list_(pa.string()))
    activations = pa.FixedSizeListArray.from_arrays(
        pa.array(np.random.default_rng(tag).random(rows * length, dtype=np.float32)), length
    ).cast(pa.list_(pa.float32()))
    columns = {
        "model": pa.array(["m"] * rows), "layer": pa.array(["0"] * rows),
        "neuron": pa.array(np.arange(rows, dtype=np.int32) // 50), "kind": pa.array(["top"] * rows),
        "rank": pa.array(np.arange(rows, dtype=np.int32) % 50), "quantile_bin": pa.nulls(rows, pa.int32()),
        "sequence_id": pa.array(np.full(rows, tag, dtype=np.int64)), "tokens": tokens, "activations": activations,
        "max_activation": pa.array(np.ones(rows, dtype=np.float32)),
    }
    table = pa.Table.from_pydict(columns).cast(SCHEMAS["activation_records"])
    write_table(lake, "activation_records", table, replace_where={"layer": ["0"]})


# --- the zygote ------------------------------------------------------------------------------------


def _child(command: dict) -> None:
    code = 1
    try:
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        log = os.open(command["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(log, 1)
        # stderr in its own file when the test asks for it (what a user's terminal shows apart).
        err = os.open(command["err"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644) if command.get("err") else log
        os.dup2(err, 2)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        for key in command.get("unset", []):
            os.environ.pop(key, None)
        os.environ.update(command.get("env", {}))
        os.chdir(command.get("cwd") or os.getcwd())
        if command.get("argv") is not None:
            from neuron_pipeline.cli import main

            code = main(command["argv"])
        else:
            globals()[command["call"]](**command.get("kwargs", {}))
            code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:  # noqa: BLE001 - reported in the child's log
        traceback.print_exc()
        code = 1
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code if isinstance(code, int) else 1)


def _send(message: dict) -> None:
    os.write(1, (json.dumps(message) + "\n").encode())


def serve() -> None:
    started = time.perf_counter()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import warnings

    warnings.filterwarnings("ignore")
    # Everything a pipeline run imports, without running any of it.
    import aiohttp  # noqa: F401 - the openai SDK's transport
    import openai  # noqa: F401
    import dagster  # noqa: F401
    import deltalake  # noqa: F401
    import great_expectations  # noqa: F401
    import polars  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: F401

    import neuron_pipeline.cli  # noqa: F401
    import neuron_pipeline.definitions  # noqa: F401 - builds the default definitions once
    import neuron_pipeline.viewer  # noqa: F401

    threads = len(os.listdir("/proc/self/task"))
    _send({"ready": True, "import_s": round(time.perf_counter() - started, 2), "threads": threads})
    buffer = b""
    while True:
        readable, _, _ = select.select([0], [], [], 0.05)
        if readable:
            chunk = os.read(0, 65536)
            if not chunk:
                break
            buffer += chunk
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                command = json.loads(line)
                pid = os.fork()
                if pid == 0:
                    _child(command)
                _send({"id": command["id"], "pid": pid})
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            _send({"pid": pid, "exit": os.waitstatus_to_exitcode(status)})


# --- the test side ---------------------------------------------------------------------------------


class Zygote:
    """Starts the zygote process; ``spawn`` forks a child and returns its pid."""

    def __init__(self, log_dir: Path, env: dict[str, str] | None = None, unset: list[str] | None = None,
                 ready_timeout_s: float = 300):
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._stderr = open(self.log_dir / "zygote.log", "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-u", __file__],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            cwd=str(REPO),
            env={**{k: v for k, v in os.environ.items() if k not in (unset or [])}, **(env or {})},
        )
        self._lock = threading.Lock()
        self._pids: dict[int, queue.Queue] = {}
        self._exits: dict[int, int] = {}
        self._exit_events: dict[int, threading.Event] = {}
        self._ready: queue.Queue = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self._next_id = 0
        self.live: set[int] = set()
        try:
            self.info = self._ready.get(timeout=ready_timeout_s)
        except queue.Empty:
            self.close()
            raise RuntimeError(f"the zygote did not start: {(self.log_dir / 'zygote.log').read_text()[-2000:]}") from None

    def _read(self) -> None:
        assert self.process.stdout is not None
        for raw in self.process.stdout:
            message = json.loads(raw)
            if message.get("ready"):
                self._ready.put(message)
            elif "exit" in message:
                with self._lock:
                    self._exits[message["pid"]] = message["exit"]
                    event = self._exit_events.setdefault(message["pid"], threading.Event())
                event.set()
            else:
                with self._lock:
                    self._pids.setdefault(message["id"], queue.Queue()).put(message["pid"])

    def spawn(self, log: Path, argv: list[str] | None = None, call: str | None = None, kwargs: dict | None = None,
              env: dict[str, str] | None = None, unset: list[str] | None = None, err: Path | None = None) -> int:
        with self._lock:
            self._next_id += 1
            ident = self._next_id
            answer = self._pids.setdefault(ident, queue.Queue())
        command = {"id": ident, "argv": argv, "call": call, "kwargs": kwargs or {}, "env": env or {},
                   "unset": unset or [], "log": str(log), "err": str(err) if err else None, "cwd": str(REPO)}
        assert self.process.stdin is not None
        self.process.stdin.write((json.dumps(command) + "\n").encode())
        self.process.stdin.flush()
        pid = answer.get(timeout=30)
        with self._lock:
            self._exit_events.setdefault(pid, threading.Event())
        self.live.add(pid)
        return pid

    def exit_code(self, pid: int) -> int | None:
        with self._lock:
            return self._exits.get(pid)

    def wait(self, pid: int, timeout: float) -> int:
        with self._lock:
            event = self._exit_events.setdefault(pid, threading.Event())
        if not event.wait(timeout):
            self.kill(pid)
            event.wait(10)
            raise TimeoutError(f"child {pid} did not finish in {timeout} s (killed)")
        self.live.discard(pid)
        return self._exits[pid]

    def signal(self, pid: int, signum: int) -> None:
        """Send ``signum`` to one child (our own, by pid) if it is still running."""
        if self.exit_code(pid) is None:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    def kill(self, pid: int) -> None:
        """SIGKILL one child (only our own children, by pid)."""
        if self.exit_code(pid) is None:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def close(self) -> None:
        for pid in list(self.live):
            self.kill(pid)
        if self.process.stdin is not None:
            try:
                self.process.stdin.close()
            except OSError:
                pass
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=20)
        self._stderr.close()


if __name__ == "__main__":
    serve()
