"""Settings: defaults, profiles, precedence, one-line errors, index specs, the cache folder."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from neuron_pipeline.config import (
    CACHE_ENV,
    CONFIG_FILE_ENV,
    PROFILE_ENV,
    ConfigError,
    CorpusSettings,
    ExplainerSettings,
    RecordsSettings,
    Settings,
    SimulatorSettings,
    SubjectSettings,
    available_profiles,
    cache_dir,
    load_settings,
    parse_index_spec,
)

PROFILES = Path(__file__).resolve().parents[1] / "neuron_pipeline" / "profiles"


def load(**kwargs):
    """load_settings isolated from the real environment unless a test passes its own."""
    kwargs.setdefault("environ", {})
    return load_settings(**kwargs)


def write_yaml(tmp_path: Path, text: str, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def one_line_error(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message, f"error is not one line: {message!r}"
    assert message.strip() == message and message
    return message


# --------------------------------------------------------------------------------- defaults


def test_section_defaults():
    subject = SubjectSettings()
    assert (subject.model, subject.device, subject.dtype, subject.batch_size) == (
        "smollm2-135m-instruct",
        "auto",
        "float32",
        32,
    )
    assert subject.trust_remote_code is False
    corpus = CorpusSettings()
    assert (corpus.source, corpus.sequence_length, corpus.max_sequences) == ("janeausten", 64, 2000)
    records = RecordsSettings()
    assert (records.top_k, records.random_k) == (20, 20)
    assert (records.explain_top, records.score_top, records.score_random) == (5, 5, 5)
    # 20 top records in interleaved splits of 5: split 0 explains, split 1 scores, 2 held out.
    assert records.top_splits == 4
    explainer = ExplainerSettings()
    assert explainer.backend == "baseline" and explainer.model is None
    assert explainer.api_key_env == "OPENAI_API_KEY"
    assert SimulatorSettings().mode == "auto"


def test_settings_defaults_without_profile():
    settings = Settings()
    assert settings.profile == "demo"
    assert settings.layers == "all" and settings.neurons == "all"
    assert len(settings.explainers) == 1 and settings.explainers[0].backend == "baseline"
    assert len(settings.simulators) == 1 and settings.simulators[0].backend == "baseline"
    assert settings.lake == "./lake"


def test_lake_folder_is_absolute_and_expands_home(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    settings = Settings(lake="~/my-lake")
    assert settings.lake_location.folder == (tmp_path / "my-lake").resolve()
    assert Settings(lake="relative/lake").lake_location.folder == (Path.cwd() / "relative" / "lake").resolve()
    assert str(settings.lake_location) == str((tmp_path / "my-lake").resolve())


def test_settings_are_frozen():
    settings = load()
    with pytest.raises(Exception):
        settings.subject.batch_size = 3  # type: ignore[misc]


# --------------------------------------------------------------------------------- profiles


def test_available_profiles_lists_the_yaml_files():
    expected = sorted(p.stem for p in PROFILES.glob("*.yaml"))
    assert available_profiles() == expected
    assert {"demo", "paper"} <= set(expected)


def test_demo_profile_is_the_default_and_matches_its_file():
    settings = load()
    raw = yaml.safe_load((PROFILES / "demo.yaml").read_text())
    assert settings.profile == "demo"
    assert settings.subject.model == raw["subject"]["model"] == "smollm2-135m-instruct"
    assert settings.corpus.max_sequences == raw["corpus"]["max_sequences"]
    assert settings.corpus.sequence_length == 64
    assert settings.layers == raw["layers"]
    assert settings.neurons == raw["neurons"]
    # The offline demo runs the no-LLM baseline and the bundled local model, no API.
    assert [e.backend for e in settings.explainers] == [e["backend"] for e in raw["explainers"]] == ["baseline", "local"]
    assert [s.backend for s in settings.simulators] == ["baseline", "local"]


def test_paper_profile_is_the_papers_setting():
    settings = load(profile="paper")
    assert settings.profile == "paper"
    assert settings.subject.model == "gpt2-xl"
    assert settings.corpus.sequence_length == 64
    assert settings.corpus.max_sequences is None  # the whole corpus
    assert settings.records.explain_top == 5
    assert settings.records.score_top == 5
    assert settings.records.score_random == 5
    assert settings.records.top_k >= settings.records.explain_top + settings.records.score_top
    assert settings.layers == "all" and settings.neurons == "all"
    # An LLM explainer, reported next to the baseline floor.
    backends = [e.backend for e in settings.explainers]
    assert "baseline" in backends and any(b != "baseline" for b in backends)


def test_profile_from_environment_and_from_config_file(tmp_path):
    assert load(environ={PROFILE_ENV: "paper"}).subject.model == "gpt2-xl"
    path = write_yaml(tmp_path, "profile: paper\n")
    assert load(config_file=path).subject.model == "gpt2-xl"
    # An explicit profile argument wins over the file's.
    assert load(config_file=path, profile="demo").subject.model == "smollm2-135m-instruct"


def test_unknown_profile_names_the_choices():
    with pytest.raises(ConfigError) as excinfo:
        load(profile="gpt5")
    message = one_line_error(excinfo)
    assert "'gpt5'" in message
    for name in available_profiles():
        assert name in message


# ------------------------------------------------------------------------------- precedence


def test_config_file_overrides_profile_and_keeps_other_profile_values(tmp_path):
    path = write_yaml(tmp_path, "subject:\n  batch_size: 4\ncorpus:\n  max_sequences: 10\n")
    settings = load(config_file=path, profile="paper")
    assert settings.subject.batch_size == 4  # file
    assert settings.corpus.max_sequences == 10  # file
    assert settings.subject.model == "gpt2-xl"  # profile, same section: deep merge
    assert settings.records.random_k == 50  # profile, untouched section


def test_environment_overrides_file(tmp_path):
    path = write_yaml(tmp_path, "subject:\n  batch_size: 4\n  device: cpu\n")
    environ = {
        "NEURON_PIPELINE__SUBJECT__BATCH_SIZE": "8",
        "NEURON_PIPELINE__CORPUS__MAX_SEQUENCES": "null",
        "NEURON_PIPELINE__SUBJECT__TRUST_REMOTE_CODE": "true",
        "NEURON_PIPELINE__LAKE": "/tmp/elsewhere",
        "UNRELATED": "ignored",
        "NEURON_PIPELINE_OTHER": "ignored too",
    }
    settings = load(config_file=path, environ=environ)
    assert settings.subject.batch_size == 8  # typed from the string "8"
    assert settings.subject.device == "cpu"  # file value for a sibling survives
    assert settings.corpus.max_sequences is None
    assert settings.subject.trust_remote_code is True
    assert settings.lake == "/tmp/elsewhere"


def test_environment_keys_are_case_insensitive():
    settings = load(environ={"NEURON_PIPELINE__subject__Batch_Size": "6"})
    assert settings.subject.batch_size == 6


def test_overrides_win_over_everything(tmp_path):
    path = write_yaml(tmp_path, "subject:\n  batch_size: 4\nlayers: '1'\n")
    environ = {"NEURON_PIPELINE__SUBJECT__BATCH_SIZE": "8", "NEURON_PIPELINE__LAYERS": "2"}
    settings = load(
        config_file=path,
        environ=environ,
        overrides={"subject": {"batch_size": 16}, "layers": "0-3"},
    )
    assert settings.subject.batch_size == 16
    assert settings.layers == "0-3"
    assert settings.subject.model == "smollm2-135m-instruct"  # deep merge keeps the rest


def test_full_precedence_chain_one_field_per_level(tmp_path):
    """profile < file < env < overrides, each level setting a field only it and lower levels set."""
    path = write_yaml(tmp_path, "subject:\n  batch_size: 4\n  device: cpu\n  dtype: bfloat16\n")
    environ = {"NEURON_PIPELINE__SUBJECT__DEVICE": "cuda:1", "NEURON_PIPELINE__SUBJECT__DTYPE": "float16"}
    settings = load(config_file=path, profile="paper", environ=environ, overrides={"subject": {"dtype": "float32"}})
    assert settings.subject.model == "gpt2-xl"  # only the profile
    assert settings.subject.batch_size == 4  # profile < file
    assert settings.subject.device == "cuda:1"  # file < env
    assert settings.subject.dtype == "float32"  # env < overrides


def test_config_file_from_environment_variable(tmp_path):
    path = write_yaml(tmp_path, "neurons: '0-9'\n")
    assert load(environ={CONFIG_FILE_ENV: str(path)}).neurons == "0-9"


def test_numbers_are_accepted_for_text_settings(tmp_path):
    # `layers: 3` in YAML or NEURON_PIPELINE__LAYERS=3 arrive as ints; they mean "3".
    path = write_yaml(tmp_path, "layers: 3\n")
    assert load(config_file=path).layers == "3"
    assert load(environ={"NEURON_PIPELINE__NEURONS": "7"}).neurons == "7"
    assert load(overrides={"layers": 5}).layers == "5"


def test_environment_text_that_is_not_yaml_is_kept_verbatim():
    settings = load(environ={"NEURON_PIPELINE__LAKE": "{odd: [name"})
    assert settings.lake == "{odd: [name"


def test_empty_config_file_means_no_settings(tmp_path):
    path = write_yaml(tmp_path, "# nothing here\n")
    assert load(config_file=path) == load()


def test_explainers_list_from_file(tmp_path):
    path = write_yaml(
        tmp_path,
        "explainers:\n  - backend: openai\n    model: gpt-4o\n    max_tokens: 100\n  - backend: baseline\n",
    )
    settings = load(config_file=path)
    assert [e.backend for e in settings.explainers] == ["openai", "baseline"]
    assert settings.explainers[0].max_tokens == 100
    assert settings.explainers[1].max_tokens == 60  # default


# ----------------------------------------------------------------------------------- errors


def test_unknown_top_level_key(tmp_path):
    path = write_yaml(tmp_path, "lakes: ./x\n")
    with pytest.raises(ConfigError) as excinfo:
        load(config_file=path)
    message = one_line_error(excinfo)
    assert "lakes" in message and "unknown setting" in message
    assert str(path) in message  # says where the bad value came from


def test_unknown_nested_key(tmp_path):
    path = write_yaml(tmp_path, "subject:\n  batchsize: 8\n")
    with pytest.raises(ConfigError) as excinfo:
        load(config_file=path)
    message = one_line_error(excinfo)
    assert "subject.batchsize" in message and "unknown setting" in message


def test_unknown_key_inside_a_list_entry(tmp_path):
    path = write_yaml(tmp_path, "explainers:\n  - backend: baseline\n    temprature: 0.5\n")
    with pytest.raises(ConfigError) as excinfo:
        load(config_file=path)
    assert "explainers.0.temprature" in one_line_error(excinfo)


def test_unknown_key_from_environment_names_the_variable():
    with pytest.raises(ConfigError) as excinfo:
        load(environ={"NEURON_PIPELINE__SUBJECT__BATCHSIZE": "8"})
    message = one_line_error(excinfo)
    assert "subject.batchsize" in message
    assert "NEURON_PIPELINE__SUBJECT__BATCHSIZE" in message


def test_wrong_type(tmp_path):
    path = write_yaml(tmp_path, "subject:\n  batch_size: lots\n")
    with pytest.raises(ConfigError) as excinfo:
        load(config_file=path)
    message = one_line_error(excinfo)
    assert "subject.batch_size" in message and "integer" in message


def test_wrong_type_for_a_section():
    with pytest.raises(ConfigError) as excinfo:
        load(overrides={"subject": 5})
    message = one_line_error(excinfo)
    assert message.startswith("invalid config subject:")
    assert "overrides" in message


def test_wrong_literal():
    with pytest.raises(ConfigError) as excinfo:
        load(overrides={"subject": {"dtype": "float8"}})
    message = one_line_error(excinfo)
    assert "subject.dtype" in message and "float32" in message


@pytest.mark.parametrize("value", ["0", "-4"])
def test_batch_size_must_be_positive(value):
    with pytest.raises(ConfigError) as excinfo:
        load(environ={"NEURON_PIPELINE__SUBJECT__BATCH_SIZE": value})
    message = one_line_error(excinfo)
    assert "subject.batch_size" in message
    assert "greater than or equal to 1" in message
    assert "NEURON_PIPELINE__SUBJECT__BATCH_SIZE" in message


def test_several_errors_are_still_one_line():
    with pytest.raises(ConfigError) as excinfo:
        load(overrides={"subject": {"batch_size": 0, "dtype": "x"}, "corpus": {"sequence_length": 1}})
    message = one_line_error(excinfo)
    assert "(and 2 more)" in message


def test_malformed_yaml_reports_the_line(tmp_path):
    path = write_yaml(tmp_path, "subject:\n  model: x\n  batch_size: : 8\n")
    with pytest.raises(ConfigError) as excinfo:
        load(config_file=path)
    message = one_line_error(excinfo)
    assert "malformed YAML" in message
    assert "line 3" in message
    assert str(path) in message


def test_malformed_yaml_unclosed_bracket(tmp_path):
    # The scanner reaches the end of the stream (line 4, after the trailing newline) unclosed.
    path = write_yaml(tmp_path, "layers: '0'\nneurons: '1'\nsubject: [1\n")
    with pytest.raises(ConfigError) as excinfo:
        load(config_file=path)
    assert "line 4" in one_line_error(excinfo)


def test_yaml_that_is_a_list(tmp_path):
    path = write_yaml(tmp_path, "- subject\n- corpus\n")
    with pytest.raises(ConfigError) as excinfo:
        load(config_file=path)
    message = one_line_error(excinfo)
    assert "mapping" in message and "list" in message and str(path) in message


def test_yaml_that_is_a_scalar(tmp_path):
    path = write_yaml(tmp_path, "42\n")
    with pytest.raises(ConfigError) as excinfo:
        load(config_file=path)
    assert "int" in one_line_error(excinfo)


def test_missing_config_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as excinfo:
        load(config_file=missing)
    message = one_line_error(excinfo)
    assert "not found" in message and str(missing) in message


def test_config_file_that_is_a_folder(tmp_path):
    with pytest.raises(ConfigError):
        load(config_file=tmp_path)


def test_top_k_smaller_than_explain_plus_score():
    with pytest.raises(ConfigError) as excinfo:
        load(overrides={"records": {"top_k": 9, "explain_top": 5, "score_top": 5}})
    message = one_line_error(excinfo)
    assert "records" in message and "top_k=9" in message and "10" in message


def test_top_k_exactly_explain_plus_score_is_fine():
    settings = load(overrides={"records": {"top_k": 10}})
    assert settings.records.top_k == 10
    assert settings.records.top_splits == 2


def test_random_k_smaller_than_score_random():
    with pytest.raises(ConfigError) as excinfo:
        load(overrides={"records": {"random_k": 3, "score_random": 5}})
    assert "random_k=3" in one_line_error(excinfo)


def test_records_settings_validator_directly():
    with pytest.raises(ValueError):
        RecordsSettings(top_k=6, explain_top=3, score_top=4)
    assert RecordsSettings(top_k=7, explain_top=3, score_top=4).top_splits == 2
    assert RecordsSettings(top_k=30, explain_top=5, score_top=5).top_splits == 6


def test_empty_explainer_list_is_refused():
    with pytest.raises(ConfigError) as excinfo:
        load(overrides={"explainers": []})
    assert "explainers" in one_line_error(excinfo)


def test_conflicting_environment_variables_are_a_config_error():
    environ = {"NEURON_PIPELINE__SUBJECT": "5", "NEURON_PIPELINE__SUBJECT__BATCH_SIZE": "8"}
    with pytest.raises(ConfigError):
        load(environ=environ)
    with pytest.raises(ConfigError):
        load(environ=dict(reversed(list(environ.items()))))


# -------------------------------------------------------------------------- index specs


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("all", list(range(6))),
        ("ALL", list(range(6))),
        ("", list(range(6))),
        (None, list(range(6))),
        ("3", [3]),
        (3, [3]),
        ("0,3", [0, 3]),
        ("0-5", [0, 1, 2, 3, 4, 5]),
        ("0-3,5", [0, 1, 2, 3, 5]),
        ("5,1,1,3", [1, 3, 5]),
        ("2-4,3-5,0", [0, 2, 3, 4, 5]),
        (" 1 , 2 - 3 ", [1, 2, 3]),
        ("4-4", [4]),
    ],
)
def test_parse_index_spec(spec, expected):
    assert parse_index_spec(spec, 6, "layer") == expected


def test_parse_index_spec_mixed_range_and_single():
    assert parse_index_spec("0-3,10", 12, "layer") == [0, 1, 2, 3, 10]


@pytest.mark.parametrize(("spec", "first_bad"), [("6", 6), ("0-6", 6), ("2,40,7", 7), ("9-12", 9)])
def test_parse_index_spec_out_of_range_mentions_model_size(spec, first_bad):
    with pytest.raises(ConfigError) as excinfo:
        parse_index_spec(spec, 6, "layer")
    message = one_line_error(excinfo)
    assert f"layer {first_bad} is out of range" in message
    assert "6 layers" in message and "0-5" in message


def test_parse_index_spec_huge_range_fails_fast():
    with pytest.raises(ConfigError) as excinfo:
        parse_index_spec("0-99999999999999", 1536, "neuron")
    assert "1536 neurons" in str(excinfo.value)


@pytest.mark.parametrize("spec", ["abc", "1,,2", "5-2", "-1", "1-", "1.5", "0-3-5", "three"])
def test_parse_index_spec_garbage(spec):
    with pytest.raises(ConfigError) as excinfo:
        parse_index_spec(spec, 10, "neuron")
    message = one_line_error(excinfo)
    assert "neuron selection" in message and repr(spec) in message


# ------------------------------------------------------------------------------ cache dir


def test_cache_dir_honours_environment(monkeypatch, tmp_path):
    root = tmp_path / "cache-root"
    monkeypatch.setenv(CACHE_ENV, str(root))
    path = cache_dir("models", "smollm2")
    assert path == root / "models" / "smollm2"
    assert path.is_dir()
    assert cache_dir() == root


def test_cache_dir_default_is_under_home(monkeypatch, tmp_path):
    monkeypatch.delenv(CACHE_ENV, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    path = cache_dir("corpora")
    assert path == tmp_path / ".cache" / "neuron-pipeline" / "corpora"
    assert path.is_dir()
