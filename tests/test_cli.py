"""The `neuron-pipeline` command: bad input, `show`, `query`, and the console script itself."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

from neuron_pipeline.cli import EXIT_USER_ERROR, main


def _write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


BAD_INPUTS = {
    "unknown model": ("subject:\n  model: no-such-org/no-such-model-xyz\n", [], "unknown model"),
    "layer out of range": ("", ["--layers", "40"], "layer 40 is out of range"),
    "neuron out of range": ("", ["--neurons", "0-2000"], "neuron 1536 is out of range"),
    "malformed yaml": ("subject: [unclosed\n", [], "malformed YAML"),
    "unknown key": ("subjekt:\n  model: x\n", [], "unknown setting"),
    "bad value": ("subject:\n  batch_size: 0\n", [], "subject.batch_size"),
    "missing corpus path": ("corpus:\n  source: /nonexistent/corpus/folder\n", [], "/nonexistent/corpus/folder"),
    "empty corpus": ("corpus:\n  source: {empty}\n", [], "empty"),
    "binary corpus file": ("corpus:\n  source: {binary}\n", [], "binary"),
    "non-utf8 corpus file": ("corpus:\n  source: {latin1}\n", [], "UTF-8"),
    "unknown profile": ("", ["--profile", "nope"], "unknown profile"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_exits_nonzero_with_one_line_and_writes_nothing(case, tmp_path, capsys):
    config_text, extra_args, expected = BAD_INPUTS[case]
    empty = tmp_path / "empty"
    empty.mkdir()
    _write(empty / "blank.txt", "   \n\n")
    binary = _write(tmp_path / "corpus.bin", bytes(range(256)) * 64)
    latin1 = _write(tmp_path / "latin1.txt", "caf\xe9 cr\xe8me br\xfbl\xe9e " .encode("latin-1") * 200)
    config = _write(tmp_path / "config.yaml", config_text.format(empty=empty, binary=binary, latin1=latin1))
    lake = tmp_path / "lake"
    code = main(["run", "--config", str(config), "--lake", str(lake), "--layers", "0", "--neurons", "0-3", *extra_args])
    captured = capsys.readouterr()
    assert code == EXIT_USER_ERROR
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("neuron-pipeline: error: ")
    assert expected.lower() in lines[0].lower(), lines[0]
    assert not lake.exists(), f"{case} wrote to the lake"


def test_show_prints_explanation_scores_and_coloured_excerpts(small_lake, capsys):
    from neuron_pipeline.lake import read_table

    code = main(["show", "1", "3", "--lake", str(small_lake)])
    out = capsys.readouterr().out
    assert code == 0
    explanation = read_table(small_lake, "explanations", where={"layer": "1", "neuron": 3})["explanation"][0]
    assert explanation in out
    score = read_table(small_lake, "scores", where={"layer": "1", "neuron": 3})["score"][0]
    assert (f"{score:.3f}" if score is not None else "n/a") in out
    assert "top 5 excerpts" in out


def test_show_unknown_neuron_is_a_user_error(small_lake, capsys):
    assert main(["show", "1", "999", "--lake", str(small_lake)]) == EXIT_USER_ERROR
    assert "no records for layer 1 neuron 999" in capsys.readouterr().err


def test_query_runs_sql_over_every_table(small_lake, capsys, tmp_path):
    for table in ("corpus_tokens", "neuron_activations", "activation_records", "explanations", "simulations", "scores", "layer_summary"):
        assert main(["query", f"select count(*) as n from {table}", "--lake", str(small_lake)]) == 0
    capsys.readouterr()
    out_file = tmp_path / "top.csv"
    code = main(
        [
            "query",
            "select layer, neuron, score from scores where score is not null order by score desc limit 3",
            "--lake",
            str(small_lake),
            "--out",
            str(out_file),
        ]
    )
    assert code == 0
    top = pl.read_csv(out_file)
    expected = (
        pl.read_delta(str(small_lake / "scores")).drop_nulls("score").sort("score", descending=True).head(3)
    )
    assert top["score"].to_list() == pytest.approx(expected["score"].to_list())


def test_query_sql_error_is_one_line(small_lake, capsys):
    assert main(["query", "select * from no_such_table", "--lake", str(small_lake)]) == EXIT_USER_ERROR
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "SQL error" in err[0]


def test_console_script_reports_bad_layer_without_traceback(tmp_path):
    script = Path(sys.executable).parent / "neuron-pipeline"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [str(script), "run", "--layers", "99", "--lake", str(tmp_path / "lake")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == EXIT_USER_ERROR
    assert "Traceback" not in proc.stderr
    assert "layer 99 is out of range: the model has 30 layers" in proc.stderr
    assert not (tmp_path / "lake").exists()
