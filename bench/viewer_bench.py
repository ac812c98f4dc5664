"""The static viewer at scale: build it for a whole-model lake, count its files and bytes, and time
its pages opening in headless Chromium.

    python -m bench.viewer_bench <lake> [--out DIR]
    python -m bench.viewer_bench --built DIR     # only files, bytes and open times of a built site

The build runs in a subprocess (its peak resident memory is its own); the pages are opened with
the project's DevTools client (``tests/test_viewer.py``). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.common import REPO

_BUILD = (
    "import json, resource, sys, time\n"
    "from neuron_pipeline.viewer import build_viewer\n"
    "t = time.perf_counter(); s = build_viewer(sys.argv[1], sys.argv[2]); wall = time.perf_counter() - t\n"
    "print(json.dumps({'wall_s': wall, 'layers': s.layers, 'neurons': s.neurons, 'pages': s.pages,\n"
    "  'data_files': s.data_files, 'peak_rss': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))\n"
)


def build(lake: Path, out: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", _BUILD, str(lake), str(out)], capture_output=True, text=True, env=env,
                          check=True, timeout=7200)
    return json.loads(done.stdout.strip().splitlines()[-1])


def sizes(out: Path) -> dict:
    files = [p for p in out.rglob("*") if p.is_file()]
    chunks = sorted(p.stat().st_size for p in files if p.name.startswith("neurons_"))
    return {
        "files": len(files),
        "bytes": sum(p.stat().st_size for p in files),
        "chunk_files": len(chunks),
        "chunk_median_bytes": statistics.median(chunks) if chunks else 0,
        "chunk_max_bytes": max(chunks) if chunks else 0,
    }


def open_times(out: Path, layer: str, neurons: list[int], reps: int = 3) -> dict:
    """Milliseconds from navigation start to the end of the load event (which waits for the
    neuron page's data file and its rendering) for the index, a layer page and neuron pages."""
    sys.path.insert(0, str(REPO))
    from tests.test_viewer import Browser, _chromium

    binary = _chromium()
    if binary is None:
        return {"skipped": "no Chromium installed"}
    browser = Browser(binary)
    timing = "performance.getEntriesByType('navigation')[0].loadEventEnd"
    try:
        page = browser.new_page()
        results: dict[str, list[float]] = {}

        def measure(name: str, url: str, check: str) -> None:
            page.goto("about:blank")
            page.goto(url)
            assert page.eval(check), (name, url)
            results.setdefault(name, []).append(page.eval(timing))

        layer_dir = out / f"layer_{layer}"
        for _ in range(reps):
            if (out / "index.html").is_file():  # written last: a build still running has its layers only
                measure("index", (out / "index.html").as_uri(), "document.querySelectorAll('table').length > 0")
            measure("layer page", (layer_dir / "index.html").as_uri(), "document.querySelectorAll('#neurons tbody tr').length > 0")
            for neuron in neurons:
                measure("neuron page", (layer_dir / "neuron.html").as_uri() + f"#{neuron}",
                        "document.querySelectorAll('.excerpt .tok').length > 0")
        return {name: statistics.median(values) for name, values in results.items()}
    finally:
        browser.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.viewer_bench", description=__doc__.splitlines()[0])
    parser.add_argument("lake", nargs="?")
    parser.add_argument("--out", default="/tmp/np-viewer-bench")
    parser.add_argument("--built", help="a site already built: measure it, build nothing")
    parser.add_argument("--layer", default="0")
    args = parser.parse_args(argv)
    if not (args.lake or args.built):
        parser.error("give a lake to build the viewer of, or --built DIR")
    out = Path(args.built or args.out)
    started = time.time()
    result = {} if args.built else {"build": build(Path(args.lake), out)}
    result["sizes"] = sizes(out)
    neurons = max(int(p.stem.split("_")[1]) for p in (out / f"layer_{args.layer}").glob("neurons_*.js")) * 64 + 1
    result["open_ms"] = open_times(out, args.layer, [0, max(0, neurons // 2), max(0, neurons - 1)])
    result["wall_s"] = time.time() - started
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
