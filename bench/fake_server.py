"""Run an OpenAI-protocol fake server with a fixed latency in its own process (own GIL).

    python -m bench.fake_server 0.2        # prints "URL <base_url> <implementation>", serves until stdin closes

Uses the project's test server (``tests/fake_openai.py``) when it is there and starts; otherwise
a minimal stand-in below (``http.server.ThreadingHTTPServer`` + ``time.sleep``), enough for
chat completions.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class _MinimalHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    latency_s = 0.2

    def log_message(self, format, *args) -> None:  # noqa: A002
        pass

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length) or b"{}")
        time.sleep(self.latency_s)
        prompt = "".join(str(m.get("content", "")) for m in body.get("messages", []))
        payload = {
            "id": "chatcmpl-bench",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model", "bench"),
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": " words about tea."}, "finish_reason": "stop", "logprobs": None}
            ],
            "usage": {"prompt_tokens": len(prompt) // 4, "completion_tokens": 5, "total_tokens": len(prompt) // 4 + 5},
        }
        data = json.dumps(payload).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class _MinimalServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 512


def start_minimal(latency_s: float):
    handler = type("Handler", (_MinimalHandler,), {"latency_s": latency_s})
    server = _MinimalServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}/v1", server


def start(latency_s: float, prefer_project: bool = True):
    if prefer_project:
        try:
            from tests.fake_openai import FakeOpenAIServer  # the teammate's server, when present

            server = FakeOpenAIServer(latency_s=latency_s, max_lifetime_s=600).start()
            return server.base_url, server, "tests/fake_openai.py FakeOpenAIServer"
        except Exception as exc:  # noqa: BLE001 - fall back to the minimal one
            print(f"project fake server unavailable ({type(exc).__name__}: {exc}); using the minimal one", file=sys.stderr)
    url, server = start_minimal(latency_s)
    return url, server, "bench minimal ThreadingHTTPServer"


if __name__ == "__main__":
    latency = float(sys.argv[1]) if len(sys.argv) > 1 else 0.2
    prefer = not (len(sys.argv) > 2 and sys.argv[2] == "minimal")
    url, _server, impl = start(latency, prefer)
    print(f"URL {url} {impl}", flush=True)
    sys.stdin.read()  # serve until the parent closes our stdin
