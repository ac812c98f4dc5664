"""Shared fixtures: small real runs of the pipeline on the bundled model and corpus."""

from __future__ import annotations

import os
import warnings

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore", category=DeprecationWarning)

# Small but real: the bundled SmolLM2 over Jane Austen, 48 sequences of 64 tokens.
SMALL_RUN = {
    "corpus": {"max_sequences": 48},
    "layers": "0-1",
    "neurons": "0-7",
    # The LLM backends have their own tests; most pipeline tests use the fast baseline.
    "explainers": [{"backend": "baseline"}],
    "simulators": [{"backend": "baseline"}],
}


def small_settings(lake, **overrides):
    from neuron_pipeline.config import load_settings

    values = {**SMALL_RUN, "lake": str(lake), **overrides}
    return load_settings(profile="demo", overrides=values, environ={})


@pytest.fixture(scope="session")
def small_lake(tmp_path_factory):
    """A lake with every table for layers 0-1, made once per session through the CLI."""
    from neuron_pipeline.cli import main

    lake = tmp_path_factory.mktemp("lake") / "lake"
    code = main(["run", "--profile", "demo", "--layers", "0-1", "--neurons", "0-7", "--lake", str(lake), "--config", str(_small_config(tmp_path_factory))])
    assert code == 0
    return lake


def _small_config(tmp_path_factory):
    path = tmp_path_factory.mktemp("config") / "small.yaml"
    path.write_text(
        "corpus:\n  max_sequences: 48\nexplainers:\n  - backend: baseline\nsimulators:\n  - backend: baseline\n"
    )
    return path
