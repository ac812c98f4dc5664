/* neuron-pipeline viewer: the layer table (sort, filter, pages) and the neuron page.
 *
 * Plain JavaScript, no dependencies, no network. The layer table's data comes from the page's
 * <script type="application/json" id="viewer-data"> block. The neuron page (one per layer,
 * neuron.html#<n>) loads the local data file of n's chunk of neurons with a <script> element
 * (file:// refuses fetch()); the file calls neuronViewerChunk(payload).
 *
 * Lake data (tokens, activations, explanations in the excerpt panels) is inserted with
 * textContent and title only, never as markup. The one exception is the neuron's page body,
 * which is HTML rendered by the Python build with every value escaped (pages.py, esc) — the same
 * text a static page would carry — and placed through an inert <template>.
 */
(function () {
  "use strict";

  var CONTROL = { "\n": "\u21b5", "\r": "\u240d", "\t": "\u21e5", " ": " " };

  function readData() {
    var node = document.getElementById("viewer-data");
    return node ? JSON.parse(node.textContent) : null;
  }

  function el(tag, className, text) {
    var node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined && text !== null) node.textContent = text;
    return node;
  }

  /* A token as shown: control characters become visible symbols (a newline is "↵"). */
  function tokenText(token) {
    if (token === null || token === undefined || token === "") return "\u2205";
    return String(token).replace(/[\u0000-\u001f\u007f]/g, function (c) {
      if (CONTROL[c]) return CONTROL[c];
      return c === "\u007f" ? "\u2421" : String.fromCharCode(0x2400 + c.charCodeAt(0));
    });
  }

  function fmt(value, digits) {
    if (value === null || value === undefined) return "\u2014";
    return Number(value).toFixed(digits === undefined ? 3 : digits);
  }

  function fmtValue(value) {
    if (value === null || value === undefined) return "n/a";
    var abs = Math.abs(value);
    if (abs !== 0 && (abs < 0.001 || abs >= 10000)) return value.toExponential(3);
    return String(Number(value.toPrecision(4)));
  }

  function scoreClass(value) {
    if (value === null || value === undefined) return "na";
    if (value >= 0.8) return "good";
    if (value >= 0.4) return "mid";
    if (value >= 0.1) return "low";
    return "poor";
  }

  /* ------------------------------------------------------------------ layer table */

  function initLayer(data) {
    var table = document.getElementById("neurons");
    var tbody = table.tBodies[0];
    var search = document.getElementById("search");
    var count = document.getElementById("count");
    var pager = document.getElementById("pager");
    var explainerFilter = document.getElementById("explainer-filter");
    var simulatorFilter = document.getElementById("simulator-filter");
    var pageSize = document.getElementById("page-size");
    var columns = data.columns;

    var rows = data.rows.map(function (r) {
      return {
        neuron: r[0], e: r[1], s: r[2], explanation: r[3], error: r[4], score: r[5], score_top: r[6],
        score_random: r[7], baseline: r[8], reason: r[9],
        lc: ((r[3] || "") + (r[4] ? " " + r[4] : "")).toLowerCase()
      };
    });
    var getters = {
      neuron: function (r) { return r.neuron; },
      explainer: function (r) { return r.e < 0 ? null : data.explainers[r.e]; },
      simulator: function (r) { return r.s < 0 ? null : data.simulators[r.s]; },
      explanation: function (r) { return r.explanation ? r.explanation.toLowerCase() : null; },
      score: function (r) { return r.score; },
      score_top: function (r) { return r.score_top; },
      score_random: function (r) { return r.score_random; },
      baseline: function (r) { return r.baseline; }
    };
    var state = { terms: [], explainer: -1, simulator: -1, key: "neuron", dir: 1, page: 0, size: 100 };
    var view = rows.slice();

    function filter() {
      var terms = state.terms;
      view = rows.filter(function (r) {
        if (state.explainer >= 0 && r.e !== state.explainer) return false;
        if (state.simulator >= 0 && r.s !== state.simulator) return false;
        for (var i = 0; i < terms.length; i++) if (r.lc.indexOf(terms[i]) < 0) return false;
        return true;
      });
      sort();
    }

    function sort() {
      var get = getters[state.key];
      var dir = state.dir;
      view.sort(function (a, b) {
        var va = get(a), vb = get(b);
        var aNull = va === null || va === undefined, bNull = vb === null || vb === undefined;
        if (aNull !== bNull) return aNull ? 1 : -1; // nulls last in both directions
        if (!aNull && va !== vb) return va < vb ? -dir : dir;
        return a.neuron - b.neuron || a.e - b.e || a.s - b.s;
      });
    }

    function highlighted(text) {
      var cell = document.createDocumentFragment();
      if (!state.terms.length) { cell.appendChild(document.createTextNode(text)); return cell; }
      var lower = text.toLowerCase(), spans = [];
      state.terms.forEach(function (term) {
        var at = lower.indexOf(term);
        while (at >= 0 && term.length) { spans.push([at, at + term.length]); at = lower.indexOf(term, at + term.length); }
      });
      spans.sort(function (a, b) { return a[0] - b[0]; });
      var pos = 0;
      spans.forEach(function (span) {
        if (span[1] <= pos) return;
        var start = Math.max(span[0], pos);
        if (start > pos) cell.appendChild(document.createTextNode(text.slice(pos, start)));
        cell.appendChild(el("mark", null, text.slice(start, span[1])));
        pos = span[1];
      });
      if (pos < text.length) cell.appendChild(document.createTextNode(text.slice(pos)));
      return cell;
    }

    function numberCell(value, title) {
      var td = el("td", "num score " + scoreClass(value), fmt(value));
      if (title) td.title = title;
      return td;
    }

    function render() {
      var pages = Math.max(1, Math.ceil(view.length / state.size));
      if (state.page >= pages) state.page = pages - 1;
      var start = state.page * state.size, end = Math.min(view.length, start + state.size);
      var fragment = document.createDocumentFragment();
      for (var i = start; i < end; i++) {
        var r = view[i], tr = document.createElement("tr");
        for (var c = 0; c < columns.length; c++) {
          var key = columns[c], td;
          if (key === "neuron") {
            td = el("td", "num");
            var link = el("a", null, String(r.neuron));
            link.href = "neuron.html#" + r.neuron;
            td.appendChild(link);
          } else if (key === "explainer" || key === "simulator") {
            td = el("td", "id");
            var id = getters[key](r);
            if (id) { td.textContent = (data.labels && data.labels[id]) || id; td.title = id; } else { td.textContent = "\u2014"; }
          } else if (key === "explanation") {
            td = el("td", "explanation");
            if (r.explanation) td.appendChild(highlighted(r.explanation));
            else if (r.error) { td.className += " error"; td.textContent = "explainer failed: " + r.error; }
            else { td.className += " muted"; td.textContent = "not explained yet"; }
          } else {
            td = numberCell(r[key], key === "score" && r.reason ? r.reason : null);
          }
          tr.appendChild(td);
        }
        fragment.appendChild(tr);
      }
      tbody.replaceChildren(fragment);
      if (!view.length) {
        var empty = el("tr"), cell = el("td", "muted empty", "No row matches the filter.");
        cell.colSpan = columns.length;
        empty.appendChild(cell);
        tbody.appendChild(empty);
      }
      count.textContent = view.length
        ? "Showing " + (start + 1).toLocaleString() + "\u2013" + end.toLocaleString() + " of " +
          view.length.toLocaleString() + (view.length !== rows.length ? " matching (" + rows.length.toLocaleString() + " rows)" : " rows")
        : "0 of " + rows.length.toLocaleString() + " rows";
      renderPager(pages);
      var headers = table.tHead.rows[0].cells;
      for (var h = 0; h < headers.length; h++) {
        var th = headers[h], sorted = th.getAttribute("data-key") === state.key;
        th.setAttribute("aria-sort", sorted ? (state.dir > 0 ? "ascending" : "descending") : "none");
      }
    }

    function renderPager(pages) {
      pager.replaceChildren();
      if (pages <= 1) return;
      var prev = el("button", null, "\u2190 Previous"), next = el("button", null, "Next \u2192");
      prev.type = next.type = "button";
      prev.disabled = state.page === 0;
      next.disabled = state.page >= pages - 1;
      prev.addEventListener("click", function () { state.page--; render(); });
      next.addEventListener("click", function () { state.page++; render(); });
      pager.appendChild(prev);
      pager.appendChild(el("span", "page-of", "page " + (state.page + 1) + " of " + pages));
      pager.appendChild(next);
    }

    function setSort(key, type) {
      if (state.key === key) state.dir = -state.dir;
      else { state.key = key; state.dir = type === "num" && key !== "neuron" ? -1 : 1; }
      state.page = 0;
      sort();
      render();
    }

    var headers = table.tHead.rows[0].cells;
    for (var h = 0; h < headers.length; h++) {
      (function (th) {
        var go = function () { setSort(th.getAttribute("data-key"), th.getAttribute("data-type")); };
        th.addEventListener("click", go);
        th.addEventListener("keydown", function (event) {
          if (event.key === "Enter" || event.key === " ") { event.preventDefault(); go(); }
        });
      })(headers[h]);
    }
    search.addEventListener("input", function () {
      state.terms = search.value.toLowerCase().split(/\s+/).filter(Boolean);
      state.page = 0;
      filter();
      render();
    });
    if (explainerFilter) explainerFilter.addEventListener("change", function () {
      state.explainer = Number(explainerFilter.value); state.page = 0; filter(); render();
    });
    if (simulatorFilter) simulatorFilter.addEventListener("change", function () {
      state.simulator = Number(simulatorFilter.value); state.page = 0; filter(); render();
    });
    pageSize.addEventListener("change", function () { state.size = Number(pageSize.value); state.page = 0; render(); });
    state.size = Number(pageSize.value) || 100;
    if (search.value) state.terms = search.value.toLowerCase().split(/\s+/).filter(Boolean);
    filter();
    render();
  }

  /* ------------------------------------------------------------------ neuron page */

  var REAL = "22,163,74";   /* green: real activation */
  var SIM = "37,99,235";    /* blue: simulated activation */

  function shade(span, value, scale, rgb) {
    var strength = value === null || value === undefined || !(scale > 0) ? 0 : Math.max(0, Math.min(1, value / scale));
    if (strength > 0) span.style.backgroundColor = "rgba(" + rgb + "," + (strength * 0.85).toFixed(3) + ")";
    if (strength > 0.62) span.style.color = "#fff";
    return strength;
  }

  function tokenSpan(token, value, scale, kind) {
    var span = el("span", "tok " + kind, tokenText(token));
    shade(span, value, scale, kind === "sim" ? SIM : REAL);
    var quoted = JSON.stringify(token === null || token === undefined ? "" : String(token));
    if (kind === "sim") {
      span.title = quoted + "  simulated " + fmtValue(value) + " / 10";
    } else {
      var pct = value !== null && value !== undefined && scale > 0 ? "  (" + Math.round(100 * value / scale) + "% of max)" : "";
      span.title = quoted + "  activation " + fmtValue(value) + pct;
    }
    return span;
  }

  function excerptMeta(parts) {
    var meta = el("div", "excerpt-meta");
    parts.forEach(function (part) { if (part) meta.appendChild(el("span", null, part)); });
    return meta;
  }

  function renderRecords(container, records, scale) {
    var fragment = document.createDocumentFragment();
    records.forEach(function (record) {
      var box = el("div", "excerpt");
      box.appendChild(excerptMeta([
        "#" + record.rank,
        record.bin !== undefined && record.bin !== null ? "bin " + record.bin : null,
        "max " + fmtValue(record.max),
        "sequence " + record.seq
      ]));
      var tokens = el("div", "tokens");
      for (var i = 0; i < record.t.length; i++) tokens.appendChild(tokenSpan(record.t[i], record.a[i], scale, "real"));
      box.appendChild(tokens);
      fragment.appendChild(box);
    });
    container.replaceChildren(fragment);
  }

  function renderScored(container, pair, scale) {
    var fragment = document.createDocumentFragment();
    pair.excerpts.forEach(function (excerpt) {
      var box = el("div", "excerpt scored");
      box.appendChild(excerptMeta([excerpt.kind + " #" + excerpt.rank, "sequence " + excerpt.seq]));
      var tokens = el("div", "tokens paired");
      var labels = el("span", "tokpair labels");
      labels.setAttribute("aria-hidden", "true");
      labels.appendChild(el("span", "lbl", "real"));
      labels.appendChild(el("span", "lbl", "sim"));
      tokens.appendChild(labels);
      for (var i = 0; i < excerpt.t.length; i++) {
        var column = el("span", "tokpair");
        column.appendChild(tokenSpan(excerpt.t[i], excerpt.a[i], scale, "real"));
        column.appendChild(tokenSpan(excerpt.t[i], excerpt.s[i], 10, "sim"));
        tokens.appendChild(column);
      }
      box.appendChild(tokens);
      fragment.appendChild(box);
    });
    container.replaceChildren(fragment);
  }

  function renderNeuron(data) {
    var scale = data.scale;
    var containers = document.querySelectorAll(".excerpts[data-kind]");
    for (var i = 0; i < containers.length; i++) {
      var kind = containers[i].getAttribute("data-kind");
      renderRecords(containers[i], (data.records && data.records[kind]) || [], scale);
    }
    var select = document.getElementById("sim-pair");
    var scored = document.getElementById("scored-excerpts");
    var explanation = document.getElementById("sim-explanation");
    var pairs = data.simulations || [];
    if (select && scored && pairs.length) {
      pairs.forEach(function (pair, index) {
        var option = el("option", null, (pair.explainerLabel || pair.explainer) + " \u2192 " + (pair.simulatorLabel || pair.simulator) +
          "  \u00b7 score " + fmt(pair.score) +
          (pair.mode ? "  \u00b7 " + pair.mode : ""));
        option.value = String(index);
        select.appendChild(option);
      });
      var show = function () {
        var pair = pairs[Number(select.value) || 0];
        explanation.replaceChildren();
        if (pair.explanation) {
          explanation.appendChild(el("span", "muted", "Simulating: "));
          explanation.appendChild(el("q", null, pair.explanation));
        }
        renderScored(scored, pair, scale);
      };
      select.addEventListener("change", show);
      show();
    }
  }

  /* Tokens are stored once per corpus sequence in a chunk; excerpts name their sequence.
     Activations are integers in steps of data.unit (thousandths of the neuron's maximum). */
  function withTokens(excerpts, sequences, unit) {
    excerpts.forEach(function (excerpt) {
      if (!excerpt.t) excerpt.t = sequences[String(excerpt.seq)] || [];
      excerpt.a = (excerpt.a || []).map(function (v) { return v === null ? null : v * unit; });
    });
  }

  function initNeuronPage() {
    var main = document.querySelector("main");
    var layer = document.body.getAttribute("data-layer");
    var size = Number(document.body.getAttribute("data-chunk")) || 64;
    var chunks = {};
    var pending = {};

    function message(text) {
      main.replaceChildren(el("p", "notice", text));
      var back = el("p");
      var link = el("a", null, "\u2190 layer " + layer);
      link.href = "index.html";
      back.appendChild(link);
      main.appendChild(back);
    }

    function show() {
      var neuron = /^#\d+$/.test(window.location.hash) ? Number(window.location.hash.slice(1)) : null;
      if (neuron === null) { message("No neuron named: open one from the layer table (neuron.html#<number>)."); return; }
      var chunk = Math.floor(neuron / size);
      if (chunks[chunk]) { render(chunks[chunk], neuron); return; }
      if (pending[chunk]) return;
      pending[chunk] = true;
      var script = document.createElement("script");
      script.src = "neurons_" + String(chunk).padStart(5, "0") + ".js";
      script.onload = function () { delete pending[chunk]; show(); };
      script.onerror = function () { delete pending[chunk]; message("Neuron " + neuron + " is not in this layer's data."); };
      document.body.appendChild(script);
    }

    function render(payload, neuron) {
      var entry = payload.neurons[String(neuron)];
      if (!entry) { message("Neuron " + neuron + " is not in this layer's data."); return; }
      var data = entry.data;
      if (!entry.ready) {
        var unit = data.unit || 1;
        Object.keys(data.records || {}).forEach(function (kind) { withTokens(data.records[kind], payload.sequences, unit); });
        (data.simulations || []).forEach(function (pair) { withTokens(pair.excerpts, payload.sequences, unit); });
        entry.ready = true;
      }
      var body = document.createElement("template");
      body.innerHTML = entry.html;  /* escaped by the Python build, see the header */
      main.replaceChildren(body.content);
      document.title = entry.title;
      renderNeuron(data);
      window.scrollTo(0, 0);
    }

    window.neuronViewerChunk = function (payload) {
      if (payload && String(payload.layer) === String(layer)) chunks[payload.chunk] = payload;
    };
    window.addEventListener("hashchange", show);
    document.addEventListener("keydown", function (event) {
      var target = event.target;
      if (event.altKey || event.ctrlKey || event.metaKey || (target && /^(INPUT|SELECT|TEXTAREA)$/.test(target.tagName))) return;
      var rel = event.key === "ArrowLeft" ? "prev" : event.key === "ArrowRight" ? "next" : null;
      var link = rel && document.querySelector(".prevnext a[rel=" + rel + "]");
      if (link) window.location.href = link.href;
    });
    show();
  }

  var page = document.body.getAttribute("data-page");
  var data = readData();
  if (page === "layer" && data) initLayer(data);
  if (page === "neuron") initNeuronPage();
})();
