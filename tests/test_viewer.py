"""The static neuron viewer: generated HTML, escaping, and behaviour in a real headless Chromium.

Browser tests drive Debian's ``chromium`` over the Chrome DevTools Protocol with a tiny client
(``websockets``, no Selenium). They are skipped, with the reason, when no Chromium is
installed (``apt-get install -y chromium``); the HTML-level tests run everywhere.
Screenshots land in ``artifacts/`` (gitignored).
"""

from __future__ import annotations

import base64
import html.parser
import itertools
import json
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import polars as pl
import pytest

from neuron_pipeline.cli import EXIT_USER_ERROR, main
from neuron_pipeline.lake import read_table, write_table
from neuron_pipeline.viewer import build_viewer, default_viewer_dir
from neuron_pipeline.viewer.build import read_neuron

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "artifacts"
SEQ = 64

XSS_SCRIPT = "<script>window.__pwned=1</script>"
XSS_IMG = '<img src=x onerror="window.__pwned=1">'
XSS_CLOSE = "</script><script>window.__pwned=1</script>"
XSS_TEXTS = [XSS_SCRIPT, XSS_IMG, XSS_CLOSE]


# --------------------------------------------------------------------------- helpers


class _Doc(html.parser.HTMLParser):
    """Every start tag with its attributes, the text outside <script>, and the JSON data block."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []
        self.data_blocks: list[str] = []
        self._in_script: dict[str, str | None] | None = None
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        self.tags.append((tag, attributes))
        if tag == "script":
            self._in_script = attributes

    def handle_endtag(self, tag):
        if tag == "script":
            self._in_script = None

    def handle_data(self, data):
        if self._in_script is not None:
            if self._in_script.get("id") == "viewer-data":
                self.data_blocks.append(data)
        else:
            self.text.append(data)

    def all(self, tag: str) -> list[dict[str, str | None]]:
        return [attributes for name, attributes in self.tags if name == tag]

    @property
    def data(self):
        assert len(self.data_blocks) == 1
        return json.loads(self.data_blocks[0])


def _parse(path: Path) -> _Doc:
    return _Doc(path.read_text(encoding="utf-8"))


def _external_urls(doc: _Doc) -> list[str]:
    urls = []
    for _, attributes in doc.tags:
        for name in ("src", "href", "action", "srcset", "poster", "data"):
            value = attributes.get(name)
            if value and re.match(r"^\s*([a-z][a-z0-9+.-]*:|//)", value, re.I) and not value.startswith("data:"):
                urls.append(value)
    return urls


def _hostile_lake(lake: Path) -> Path:
    """A hand-made lake whose corpus tokens, explanations and ids all try to inject markup."""
    model = "<b>evil-model</b>"
    layer = "0"
    hostile = [XSS_SCRIPT, XSS_IMG, "\n", "\u2028", 'quote " and \' ', "&amp; &lt;", XSS_CLOSE, "<!--", "\t", ""]
    tokens = list(itertools.islice(itertools.cycle(hostile + [" plain", " words"]), SEQ))
    activations = [float((i * 7) % 11) / 10.0 for i in range(SEQ)]
    explainer_id = 'llm-"><img src=x onerror=window.__pwned=1>'
    simulator_id = "sim-<script>window.__pwned=1</script>"
    explanation = f"fires on {XSS_SCRIPT} and {XSS_IMG} and {XSS_CLOSE}"
    records = []
    for neuron in (0, 1):
        for kind, count in (("top", 3), ("random", 2), ("quantile", 2)):
            for rank in range(count):
                records.append(dict(
                    model=model, layer=layer, neuron=neuron, kind=kind, rank=rank,
                    quantile_bin=rank if kind == "quantile" else None, sequence_id=rank + 10 * neuron,
                    tokens=tokens, activations=activations, max_activation=max(activations),
                ))
    write_table(lake, "activation_records", records)
    write_table(lake, "neuron_activations", [
        dict(model=model, layer=layer, neuron=n, count=640, mean=0.1, variance=0.04, max=1.0, min=-0.2,
             frac_positive=0.5, quantile_boundaries=[0.2, 0.4], corpus_hash="x") for n in (0, 1)
    ])
    write_table(lake, "explanations", [
        dict(model=model, layer=layer, neuron=n, explainer_id=explainer_id, explainer_model=f"gpt-{XSS_IMG}",
             prompt_hash="<i>hash</i>", explanation=explanation, prompt_tokens=1, completion_tokens=1,
             error=None, records_hash="h") for n in (0, 1)
    ])
    write_table(lake, "simulations", [
        dict(model=model, layer=layer, neuron=n, explainer_id=explainer_id, simulator_id=simulator_id, kind=kind,
             rank=0, sequence_id=1, tokens=tokens, true_activations=activations,
             expected_activations=[10.0 * a for a in activations], mode=XSS_SCRIPT, input_hash="h")
        for n in (0, 1) for kind in ("top", "random")
    ])
    write_table(lake, "scores", [
        dict(model=model, layer=layer, neuron=n, explainer_id=explainer_id, simulator_id=simulator_id,
             score=0.5 + 0.1 * n, score_top=0.4, score_random=0.3, rsquared=0.2, absolute_dev_explained=0.1,
             n_tokens=128, null_reason=None) for n in (0, 1)
    ])
    return lake


# --------------------------------------------------------------------------- HTML-level tests


@pytest.fixture(scope="module")
def small_viewer(small_lake, tmp_path_factory):
    out = tmp_path_factory.mktemp("viewer") / "viewer"
    return build_viewer(small_lake, out)


@pytest.fixture(scope="module")
def hostile_viewer(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    lake = _hostile_lake(root / "lake")
    return build_viewer(lake, root / "viewer")


def test_builds_index_layer_and_neuron_pages(small_lake, small_viewer):
    records = read_table(small_lake, "activation_records")
    layers = sorted(records["layer"].unique().to_list(), key=int)
    neurons = records.select("layer", "neuron").unique().height
    assert (small_viewer.layers, small_viewer.neurons, small_viewer.pages) == (len(layers), neurons, 1 + 2 * len(layers))
    assert small_viewer.index == small_viewer.out_dir / "index.html"
    for layer in layers:
        folder = small_viewer.out_dir / f"layer_{layer}"
        assert (folder / "index.html").is_file() and (folder / "neuron.html").is_file()
        layer_neurons = records.filter(pl.col("layer") == layer)["neuron"].unique().to_list()
        # One data file per 64 neurons, not one page per neuron.
        assert sorted(p.name for p in folder.glob("neurons_*.js")) == sorted(
            {f"neurons_{n // 64:05d}.js" for n in layer_neurons})
        for neuron in layer_neurons:
            entry = read_neuron(small_viewer.out_dir, layer, neuron)
            assert entry["data"]["neuron"] == neuron and f"neuron {neuron}" in entry["title"]
        assert read_neuron(small_viewer.out_dir, layer, 10_000) is None
    assert small_viewer.data_files == sum(1 for _ in small_viewer.out_dir.glob("layer_*/neurons_*.js"))
    assert (small_viewer.out_dir / "static" / "viewer.js").is_file()
    assert (small_viewer.out_dir / "static" / "viewer.css").is_file()


def test_index_has_model_layers_histograms_and_score_by_layer_plot(small_lake, small_viewer):
    doc = _parse(small_viewer.index)
    text = " ".join(doc.text)
    assert read_table(small_lake, "scores")["model"][0] in text
    svgs = doc.all("svg")
    classes = [s.get("class") or "" for s in svgs]
    assert any("by-layer" in c for c in classes), classes
    # One histogram per layer (single explainer / simulator pair) plus the all-layers one.
    assert sum("hist" in c for c in classes) == 2 + 1
    links = [a["href"] for a in doc.all("a")]
    assert "layer_0/index.html" in links and "layer_1/index.html" in links
    assert _external_urls(doc) == []


def test_layer_page_embeds_one_row_per_neuron_and_explainer(small_lake, small_viewer):
    doc = _parse(small_viewer.out_dir / "layer_1" / "index.html")
    data = doc.data
    explanations = read_table(small_lake, "explanations", where={"layer": "1"})
    scores = read_table(small_lake, "scores", where={"layer": "1"})
    assert len(data["rows"]) == scores.height == explanations.height
    by_neuron = {row[0]: row for row in data["rows"]}
    for row in scores.iter_rows(named=True):
        embedded = by_neuron[row["neuron"]]
        assert embedded[5] == pytest.approx(row["score"]) if row["score"] is not None else embedded[5] is None
    texts = {row[0]: row[3] for row in data["rows"]}
    assert texts == dict(explanations.select("neuron", "explanation").iter_rows())
    assert {th["data-key"] for th in doc.all("th") if th.get("data-key")} >= {"neuron", "explanation", "score", "score_top", "score_random"}
    assert any(i.get("id") == "search" for i in doc.all("input"))


def test_neuron_page_embeds_every_excerpt_and_simulation(small_lake, small_viewer):
    where = {"layer": "0", "neuron": 3}
    records = read_table(small_lake, "activation_records", where=where)
    sims = read_table(small_lake, "simulations", where=where)
    entry = read_neuron(small_viewer.out_dir, "0", 3)
    doc, data = _Doc(entry["html"]), entry["data"]
    for kind in ("top", "quantile", "random"):
        expected = records.filter(pl.col("kind") == kind).sort("rank")
        shown = data["records"][kind]
        assert [r["rank"] for r in shown] == expected["rank"].to_list()
        assert [r["t"] for r in shown] == expected["tokens"].to_list()
        for record, acts in zip(shown, expected["activations"].to_list()):
            # Stored in thousandths of the neuron's maximum, read back within half a step.
            assert record["a"] == pytest.approx(acts, abs=data["unit"] / 2 + 1e-9)
            assert data["unit"] == pytest.approx(data["scale"] / 1000)
    assert sum(len(p["excerpts"]) for p in data["simulations"]) == sims.height
    # On disk: integer steps and a sequence id per excerpt, the tokens once per sequence.
    chunk = (small_viewer.out_dir / "layer_0" / "neurons_00000.js").read_text(encoding="utf-8")
    stored = json.loads(chunk[len("neuronViewerChunk("):-len(");\n")])["neurons"]["3"]["data"]["records"]["top"][0]
    assert all(isinstance(v, int) for v in stored["a"]) and "t" not in stored
    explanation = read_table(small_lake, "explanations", where=where)["explanation"][0]
    assert explanation in " ".join(doc.text)


def test_hostile_text_is_escaped_everywhere(hostile_viewer):
    pages = [hostile_viewer.index, *sorted(hostile_viewer.out_dir.glob("layer_*/*.html"))]
    assert len(pages) == 1 + 1 + 1
    bodies = [read_neuron(hostile_viewer.out_dir, "0", n)["html"] for n in (0, 1)]
    for page in [*pages, *bodies]:
        raw = page if isinstance(page, str) else page.read_text(encoding="utf-8")
        doc = _Doc(raw)
        # Only our own elements: no injected <script>, <img> or event handler attributes.
        scripts = doc.all("script")
        assert all(s.get("src", "").endswith("static/viewer.js") or s.get("type") == "application/json" for s in scripts), scripts
        assert len(scripts) <= 2
        assert doc.all("img") == []
        assert not any(name.startswith("on") for _, attributes in doc.tags for name in attributes)
        for text in XSS_TEXTS:
            assert text not in raw, (page, text)
        assert "<!--" not in raw
        assert _external_urls(doc) == []
        # The embedded JSON cannot close its element, and it round-trips the raw text.
        for block in doc.data_blocks:
            assert "<" not in block and ">" not in block and "\u2028" not in block
        if doc.data_blocks:
            decoded = json.dumps(doc.data, ensure_ascii=False)
            assert "window.__pwned=1" in decoded
    entry = read_neuron(hostile_viewer.out_dir, "0", 0)
    assert entry["data"]["records"]["top"][0]["t"][:3] == [XSS_SCRIPT, XSS_IMG, "\n"]
    assert f"fires on {XSS_SCRIPT}" in " ".join(_Doc(entry["html"]).text)  # shown literally once unescaped by the parser
    # The data file is JavaScript: a single call whose JSON argument cannot end the script early.
    chunk = (hostile_viewer.out_dir / "layer_0" / "neurons_00000.js").read_text(encoding="utf-8")
    assert chunk.startswith("neuronViewerChunk({") and chunk.endswith("});\n")
    assert "<" not in chunk and ">" not in chunk and "\u2028" not in chunk


def test_missing_tables_are_left_out_not_fatal(tmp_path):
    lake = tmp_path / "lake"
    write_table(lake, "activation_records", [
        dict(model="m", layer="2", neuron=5, kind="top", rank=0, sequence_id=1, tokens=["a", "b"],
             activations=[0.5, 1.0], max_activation=1.0)
    ])
    summary = build_viewer(lake, tmp_path / "viewer")
    assert (summary.layers, summary.neurons) == (1, 1)
    index = _parse(summary.index)
    assert "explanations" in " ".join(index.text)  # listed as not in the lake yet
    entry = read_neuron(summary.out_dir, "2", 5)
    neuron = _Doc(entry["html"])
    assert "No explanation yet." in " ".join(neuron.text)
    assert not any(s.get("id") == "scored" for s in neuron.all("section"))
    assert entry["data"]["records"]["top"][0]["t"] == ["a", "b"]

    empty = build_viewer(tmp_path / "empty-lake", tmp_path / "viewer-empty")
    assert (empty.layers, empty.neurons, empty.pages, empty.data_files) == (0, 0, 1, 0)
    assert "no layers yet" in " ".join(_parse(empty.index).text)


def test_rebuild_removes_pages_of_neurons_no_longer_in_the_lake(tmp_path):
    lake = tmp_path / "lake"

    def records(neurons):
        return [dict(model="m", layer="0", neuron=n, kind="top", rank=0, sequence_id=1, tokens=["a"],
                     activations=[1.0], max_activation=1.0) for n in neurons]

    write_table(lake, "activation_records", records([0, 1, 2, 64]))
    out = tmp_path / "viewer"
    build_viewer(lake, out)
    assert read_neuron(out, "0", 64) is not None
    mine = out / "notes.txt"
    mine.write_text("not ours")
    (out / "layer_0" / "neuron_7.html").write_text("a page of the one-page-per-neuron viewer")
    write_table(lake, "activation_records", records([0, 1]))
    build_viewer(lake, out)
    assert sorted(p.name for p in (out / "layer_0").iterdir()) == ["index.html", "neuron.html", "neurons_00000.js"]
    assert read_neuron(out, "0", 2) is None and read_neuron(out, "0", 1) is not None
    assert mine.exists()


def test_cli_viewer_writes_next_to_the_lake_and_run_summary_mentions_it(small_lake, tmp_path, capsys):
    lake = tmp_path / "lake"
    shutil.copytree(small_lake, lake)
    assert main(["viewer", "--lake", str(lake)]) == 0
    out = capsys.readouterr().out
    index = default_viewer_dir(lake) / "index.html"
    assert index == tmp_path / "viewer" / "index.html"
    assert index.is_file()
    assert out.strip().splitlines()[-1] == f"viewer: {index}"

    assert main(["viewer", "--lake", str(lake), "--out", str(tmp_path / "elsewhere")]) == 0
    assert (tmp_path / "elsewhere" / "index.html").is_file()

    from neuron_pipeline.cli import _print_summary
    from conftest import small_settings

    _print_summary(small_settings(lake), [0, 1])
    assert f"viewer: {index}" in capsys.readouterr().out.replace("\n", "")


def test_cli_viewer_without_a_lake_is_a_user_error(tmp_path, capsys):
    assert main(["viewer", "--lake", str(tmp_path / "nothing")]) == EXIT_USER_ERROR
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no lake tables" in err[0]
    assert not (tmp_path / "viewer").exists()


# --------------------------------------------------------------------------- headless Chromium


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


class CDPError(RuntimeError):
    pass


class Browser:
    """Headless Chromium driven over the DevTools Protocol (one websocket, flattened sessions)."""

    FLAGS = [
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-default-apps", "--disable-extensions", "--mute-audio", "--hide-scrollbars",
    ]

    def __init__(self, binary: str):
        from websockets.sync.client import connect

        self.profile = Path(tempfile.mkdtemp(prefix="viewer-chromium-"))
        self.process = subprocess.Popen(
            [binary, *self.FLAGS, f"--user-data-dir={self.profile}", "--remote-debugging-port=0", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        port_file = self.profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not (port_file.exists() and len(port_file.read_text().splitlines()) >= 2):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise CDPError("chromium did not start (no DevToolsActivePort)")
            time.sleep(0.05)
        port, path = port_file.read_text().splitlines()[:2]
        self.ws = connect(f"ws://127.0.0.1:{port}{path}", max_size=None, open_timeout=20)
        self.ids = itertools.count(1)
        self.events: list[dict] = []

    def call(self, method: str, session: str | None = None, timeout: float = 30, **params):
        message_id = next(self.ids)
        message = {"id": message_id, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        self.ws.send(json.dumps(message))
        deadline = time.monotonic() + timeout
        while True:
            reply = json.loads(self.ws.recv(timeout=max(0.01, deadline - time.monotonic())))
            if reply.get("id") == message_id:
                if "error" in reply:
                    raise CDPError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def pump(self, seconds: float) -> None:
        """Collect events for a while (e.g. late console messages)."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                self.events.append(json.loads(self.ws.recv(timeout=max(0.01, deadline - time.monotonic()))))
            except TimeoutError:
                return

    def wait_for(self, method: str, session: str, since: int = 0, timeout: float = 30) -> dict:
        """The first ``method`` event of ``session`` at or after index ``since`` of the event log."""
        seen = since
        deadline = time.monotonic() + timeout
        while True:
            for event in self.events[seen:]:
                if event.get("method") == method and event.get("sessionId") == session:
                    return event
            seen = len(self.events)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise CDPError(f"timed out waiting for {method}")
            try:
                self.events.append(json.loads(self.ws.recv(timeout=remaining)))
            except TimeoutError:
                raise CDPError(f"timed out waiting for {method}") from None

    def new_page(self, width: int = 1280, height: int = 900) -> "Page":
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        page = Page(self, session, target)
        for domain in ("Page", "Runtime", "Network", "Log"):
            self.call(f"{domain}.enable", session)
        self.call("Emulation.setDeviceMetricsOverride", session, width=width, height=height, deviceScaleFactor=1, mobile=False)
        return page

    def close(self) -> None:
        try:
            if getattr(self, "ws", None):
                self.ws.close()
        finally:
            if self.process.poll() is None:
                self.process.terminate()
                try:
                    self.process.wait(10)
                except subprocess.TimeoutExpired:
                    self.process.kill()
            shutil.rmtree(self.profile, ignore_errors=True)


class Page:
    def __init__(self, browser: Browser, session: str, target: str):
        self.browser, self.session, self.target = browser, session, target
        self.start = 0

    def call(self, method: str, **params):
        return self.browser.call(method, self.session, **params)

    def goto(self, url: str) -> None:
        self.start = len(self.browser.events)
        self.call("Page.navigate", url=url)
        self.browser.wait_for("Page.loadEventFired", self.session, since=self.start)
        self.browser.pump(0.2)

    def eval(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise CDPError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def _events(self) -> list[dict]:
        return [e for e in self.browser.events[self.start:] if e.get("sessionId") == self.session]

    def errors(self) -> list[str]:
        """Console errors, uncaught exceptions and browser log errors (CSP violations, failed loads)."""
        found = []
        for event in self._events():
            method, params = event.get("method"), event.get("params", {})
            if method == "Runtime.exceptionThrown":
                found.append(json.dumps(params.get("exceptionDetails", {}))[:500])
            elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert", "warning"):
                found.append(" ".join(str(a.get("value", a.get("description"))) for a in params.get("args", [])))
            elif method == "Log.entryAdded" and params.get("entry", {}).get("level") in ("error", "warning"):
                found.append(params["entry"].get("text", ""))
        return found

    def requests(self) -> list[str]:
        return [e["params"]["request"]["url"] for e in self._events() if e.get("method") == "Network.requestWillBeSent"]

    def click(self, selector: str) -> None:
        box = self.eval(
            f"(() => {{ const e = document.querySelector({json.dumps(selector)}); e.scrollIntoView({{block: 'center'}});"
            " const r = e.getBoundingClientRect(); return {x: r.left + r.width / 2, y: r.top + r.height / 2}; })()"
        )
        for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
            self.call("Input.dispatchMouseEvent", type=kind, x=box["x"], y=box["y"], button="left", clickCount=1)

    def type(self, selector: str, text: str) -> None:
        self.eval(f"document.querySelector({json.dumps(selector)}).focus()")
        self.call("Input.insertText", text=text)

    def screenshot(self, path: Path, max_height: int = 3200) -> Path:
        metrics = self.call("Page.getLayoutMetrics")
        size = metrics.get("cssContentSize") or metrics["contentSize"]
        clip = {"x": 0, "y": 0, "width": size["width"], "height": min(size["height"], max_height), "scale": 1}
        shot = self.call("Page.captureScreenshot", format="png", clip=clip, captureBeyondViewport=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(shot["data"]))
        return path


@pytest.fixture(scope="module")
def browser():
    binary = _chromium()
    if binary is None:
        pytest.skip("no Chromium installed (Debian: `apt-get install -y chromium`); browser tests skipped, HTML tests still run")
    instance = Browser(binary)
    try:
        yield instance
    finally:
        instance.close()


@pytest.fixture()
def page(browser):
    page = browser.new_page()
    yield page
    browser.call("Target.closeTarget", targetId=page.target)


def _url(path: Path | str) -> str:
    """A file URL; a ``#fragment`` after the path is kept (the neuron page's neuron)."""
    path, _, fragment = str(path).partition("#")
    return Path(path).resolve().as_uri() + (f"#{fragment}" if fragment else "")


def _open_neuron(page: Page, viewer: Path, layer: str, neuron: int) -> None:
    """Open ``neuron.html#<neuron>`` as a fresh load (a bare fragment change fires no load event)."""
    page.goto("about:blank")
    page.goto(_url(viewer / f"layer_{layer}" / "neuron.html") + f"#{neuron}")


def _assert_clean(page: Page) -> None:
    assert page.errors() == [], page.errors()
    outside = [url for url in page.requests() if not url.startswith(("file:", "data:"))]
    assert outside == [], outside


def test_every_page_loads_without_errors_or_network_requests(page, small_viewer):
    paths = [small_viewer.index, *sorted(small_viewer.out_dir.glob("layer_*/*.html"))]
    assert len(paths) == small_viewer.pages
    for path in paths:
        page.goto(_url(path))
        _assert_clean(page)
        assert page.eval("document.styleSheets.length") == 1
        assert page.eval("getComputedStyle(document.body).fontFamily").startswith("system-ui"), path
        assert page.requests(), path  # the page itself and its local CSS/JS, all file: URLs


def test_search_box_filters_the_layer_table(page, small_lake, small_viewer):
    page.goto(_url(small_viewer.out_dir / "layer_0" / "index.html"))
    explanations = read_table(small_lake, "explanations", where={"layer": "0"})
    assert page.eval("document.querySelectorAll('#neurons tbody tr').length") == explanations.height
    # A word that occurs in some explanations but not all.
    words = [w for text in explanations["explanation"] for w in re.findall(r'"([a-z]{3,})"', text)]
    word = next(w for w in words if 0 < sum(w in t for t in explanations["explanation"]) < explanations.height)
    expected = sorted(n for n, t in explanations.select("neuron", "explanation").iter_rows() if word in t.lower())
    page.type("#search", word.upper())
    shown = page.eval("[...document.querySelectorAll('#neurons tbody tr td:first-child')].map(td => +td.textContent)")
    assert sorted(shown) == expected
    assert page.eval("document.querySelectorAll('#neurons tbody mark').length") >= len(expected)
    assert "matching" in page.eval("document.getElementById('count').textContent")
    page.type("#search", "zzz-no-such-explanation")
    assert page.eval("document.querySelector('#neurons tbody td').textContent") == "No row matches the filter."
    page.eval("const s = document.getElementById('search'); s.value = ''; s.dispatchEvent(new Event('input'))")
    assert page.eval("document.querySelectorAll('#neurons tbody tr').length") == explanations.height
    _assert_clean(page)


def test_clicking_a_header_sorts_by_score(page, small_lake, small_viewer):
    page.goto(_url(small_viewer.out_dir / "layer_1" / "index.html"))
    scores = read_table(small_lake, "scores", where={"layer": "1"})
    column = page.eval("[...document.querySelectorAll('#neurons thead th')].findIndex(th => th.dataset.key === 'score')")
    read = f"[...document.querySelectorAll('#neurons tbody tr')].map(tr => tr.cells[{column}].textContent)"

    def values(cells):
        return [None if c == "\u2014" else float(c) for c in cells]

    page.click("#neurons th[data-key=score]")
    descending = values(page.eval(read))
    real = sorted((s for s in scores["score"] if s is not None), reverse=True)
    assert [v for v in descending if v is not None] == pytest.approx(real, abs=1e-3)
    assert descending[: len(real)] == [v for v in descending if v is not None]  # nulls last
    assert page.eval("document.querySelector('#neurons th[data-key=score]').getAttribute('aria-sort')") == "descending"
    page.click("#neurons th[data-key=score]")
    ascending = values(page.eval(read))
    assert [v for v in ascending if v is not None] == pytest.approx(sorted(real), abs=1e-3)
    page.click("#neurons th[data-key=neuron]")
    assert page.eval(read.replace(f"cells[{column}]", "cells[0]")) == [str(n) for n in sorted(scores["neuron"])]
    _assert_clean(page)


def test_neuron_page_shades_every_token_and_shows_simulations(page, small_lake, small_viewer):
    where = {"layer": "0", "neuron": 3}
    records = read_table(small_lake, "activation_records", where=where)
    sims = read_table(small_lake, "simulations", where=where)
    _open_neuron(page, small_viewer.out_dir, "0", 3)
    _assert_clean(page)
    assert page.eval("document.title").startswith("Layer 0 neuron 3")
    for kind in ("top", "quantile", "random"):
        n = records.filter(pl.col("kind") == kind).height
        assert page.eval(f"document.querySelectorAll('.excerpts[data-kind={kind}] .excerpt').length") == n
        assert page.eval(f"document.querySelectorAll('.excerpts[data-kind={kind}] .tok').length") == SEQ * n
    assert page.eval("document.querySelectorAll('section.records .tok.real').length") == SEQ * records.height
    pairs = sims.select("explainer_id", "simulator_id").unique().height
    shown = sims.height // pairs
    assert page.eval("document.querySelectorAll('#scored-excerpts .tok.real').length") == SEQ * shown
    assert page.eval("document.querySelectorAll('#scored-excerpts .tok.sim').length") == SEQ * shown
    # Shading is relative to the neuron's max: the strongest token of the top excerpt is the darkest.
    top = records.filter(pl.col("kind") == "top").sort("rank").row(0, named=True)
    alphas = page.eval(
        "[...document.querySelectorAll('.excerpts[data-kind=top] .excerpt:first-child .tok')]"
        ".map(s => { const m = getComputedStyle(s).backgroundColor.match(/rgba?\\(([^)]*)\\)/)[1].split(','); "
        "return m.length === 4 ? +m[3] : (s.style.backgroundColor ? 1 : 0); })"
    )
    assert len(alphas) == SEQ
    assert alphas.index(max(alphas)) == top["activations"].index(max(top["activations"]))
    title = page.eval("document.querySelector('.excerpts[data-kind=top] .tok').title")
    assert "activation" in title and json.dumps(top["tokens"][0]) in title
    newlines = sum(t.count("\n") for t in records["tokens"].explode())
    if newlines:
        assert page.eval("[...document.querySelectorAll('section.records .tok')].filter(s => s.textContent.includes('\u21b5')).length") > 0
    assert page.eval("document.body.innerText.includes('\\n\\n\\n\\n')") is False


def test_neuron_page_moves_between_neurons_and_says_when_one_is_missing(page, small_lake, small_viewer):
    neurons = sorted(read_table(small_lake, "activation_records", where={"layer": "0"})["neuron"].unique().to_list())
    first, second = neurons[0], neurons[1]
    page.goto(_url(small_viewer.out_dir / "layer_0" / "index.html"))
    href = page.eval("document.querySelector('#neurons tbody a').getAttribute('href')")
    assert href == f"neuron.html#{first}"
    _open_neuron(page, small_viewer.out_dir, "0", first)
    assert page.eval("document.querySelector('h1').textContent") == f"Layer 0 · neuron {first}"
    # The next-neuron link and the right arrow key change only the fragment: same page, new neuron.
    page.eval("document.querySelector('.prevnext a[rel=next]').click()")
    page.browser.pump(0.3)
    assert page.eval("document.querySelector('h1').textContent") == f"Layer 0 · neuron {second}"
    assert page.eval("document.querySelectorAll('.excerpts[data-kind=top] .excerpt').length") > 0
    page.eval("document.dispatchEvent(new KeyboardEvent('keydown', {key: 'ArrowLeft'}))")
    page.browser.pump(0.3)
    assert page.eval("document.title").startswith(f"Layer 0 neuron {first}")
    _open_neuron(page, small_viewer.out_dir, "0", 64 * 1000)
    assert "is not in this layer's data" in page.eval("document.querySelector('main').textContent")
    page.goto("about:blank")
    page.goto(_url(small_viewer.out_dir / "layer_0" / "neuron.html"))
    assert "No neuron named" in page.eval("document.querySelector('main').textContent")


def test_hostile_lake_runs_no_script_and_shows_text_literally(page, hostile_viewer):
    paths = [hostile_viewer.index, *sorted(hostile_viewer.out_dir.glob("layer_*/*.html"))]
    for path in paths:
        page.goto(_url(path))
        assert page.eval("typeof window.__pwned") == "undefined", path
        assert page.eval("document.querySelectorAll('img').length") == 0
        _assert_clean(page)
    for neuron in (0, 1):
        _open_neuron(page, hostile_viewer.out_dir, "0", neuron)
        assert page.eval("document.querySelectorAll('.excerpt').length") > 0
        assert page.eval("typeof window.__pwned") == "undefined"
        assert page.eval("document.querySelectorAll('img').length") == 0
        _assert_clean(page)
    _open_neuron(page, hostile_viewer.out_dir, "0", 0)
    tokens = page.eval("[...document.querySelectorAll('.excerpts[data-kind=top] .excerpt:first-child .tok')].map(s => s.textContent)")
    assert tokens[:4] == [XSS_SCRIPT, XSS_IMG, "\u21b5", "\u2028"]
    assert tokens[8] == "\u21e5" and tokens[9] == "\u2205"  # tab and empty token made visible
    text = page.eval("document.body.innerText")
    assert f"fires on {XSS_SCRIPT} and {XSS_IMG}" in text
    assert "gpt-" + XSS_IMG in text
    page.goto(_url(hostile_viewer.out_dir / "layer_0" / "index.html"))
    page.type("#search", "onerror")
    assert page.eval("document.querySelectorAll('#neurons tbody tr').length") == 2
    assert XSS_IMG in page.eval("document.querySelector('#neurons tbody').innerText")
    assert page.eval("typeof window.__pwned") == "undefined"
    _assert_clean(page)


def test_layer_table_stays_instant_with_tens_of_thousands_of_rows(page, tmp_path):
    """20,000 rows (5,000 neurons x 4 explainers): filtering and sorting take milliseconds."""
    lake = tmp_path / "lake"
    neurons, explainers = 5_000, ["llm-a", "llm-b", "llm-c", "baseline-x"]
    words = ["comma", "the letter e", "names of sisters", "plural nouns", "dialogue", "money", "weather", "dates"]

    def text(i, e):
        return f"{words[(i + e) % len(words)]} near {words[(i * 7 + e) % len(words)]} #{i}"

    write_table(lake, "explanations", [
        dict(model="m", layer="7", neuron=i, explainer_id=x, explainer_model="x", explanation=text(i, e))
        for i in range(neurons) for e, x in enumerate(explainers)
    ])
    write_table(lake, "scores", [
        dict(model="m", layer="7", neuron=i, explainer_id=x, simulator_id="sim", score=((i * 37 + e) % 200) / 100 - 1)
        for i in range(neurons) for e, x in enumerate(explainers)
    ])
    n = neurons * len(explainers)
    summary = build_viewer(lake, tmp_path / "viewer")
    page.goto(_url(summary.out_dir / "layer_7" / "index.html"))
    _assert_clean(page)
    assert page.eval("document.querySelectorAll('#neurons tbody tr').length") == 100
    timing = page.eval(
        "(() => { const s = document.getElementById('search'); const t0 = performance.now();"
        " s.value = 'sisters'; s.dispatchEvent(new Event('input')); const t1 = performance.now();"
        " const count = document.getElementById('count').textContent;"
        " document.querySelector('#neurons th[data-key=score]').click(); const t2 = performance.now();"
        " s.value = ''; s.dispatchEvent(new Event('input')); const t3 = performance.now();"
        " return {filter: t1 - t0, sort: t2 - t1, clear: t3 - t2, count: count}; })()"
    )
    matching = sum("sisters" in text(i, e) for i in range(neurons) for e in range(len(explainers)))
    assert n == 20_000 and page.eval("JSON.parse(document.getElementById('viewer-data').textContent).rows.length") == n
    assert f"of {matching:,} matching" in timing["count"], timing
    print(f"20,000-row layer table: {timing}")
    assert max(timing["filter"], timing["sort"], timing["clear"]) < 250, timing


def test_screenshots_of_index_layer_and_neuron_pages(browser, small_viewer):
    """Screenshots for a human look (artifacts/), at desktop and phone widths."""
    shots = {
        "viewer-index.png": small_viewer.index,
        "viewer-layer.png": small_viewer.out_dir / "layer_0" / "index.html",
        "viewer-neuron.png": str(small_viewer.out_dir / "layer_0" / "neuron.html") + "#3",
    }
    for name, path in shots.items():
        for width, suffix in ((1280, ""), (390, "-phone")):
            page = browser.new_page(width=width, height=900)
            page.goto(_url(path))
            _assert_clean(page)
            shot = page.screenshot(ARTIFACTS / name.replace(".png", f"{suffix}.png"))
            assert shot.stat().st_size > 10_000
            overflow = page.eval("document.documentElement.scrollWidth - document.documentElement.clientWidth")
            assert overflow <= 1, f"{name} overflows horizontally by {overflow}px at width {width}"
            browser.call("Target.closeTarget", targetId=page.target)
