"""Corpus stage: sources, the offline Jane Austen corpus, tokenization into windows, the frame."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from neuron_pipeline.config import CACHE_ENV, CorpusSettings
from neuron_pipeline.corpus import (
    NOVELS,
    CorpusError,
    CorpusSequences,
    corpus_frame,
    evenly_spaced,
    fetch_janeausten,
    iter_documents,
    token_strings,
    tokenize_corpus,
)
from neuron_pipeline.corpus import janeausten as janeausten_module
from neuron_pipeline.lake.schemas import SCHEMAS

REPO = Path(__file__).resolve().parents[1]
PRIDE_OPENING = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, "
    "must be in want of a wife."
)


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from neuron_pipeline.subject.loading import resolve_model_path

    _, path = resolve_model_path("smollm2-135m-instruct")
    return AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def austen_cache(tmp_path_factory):
    """A private cache root holding one real fetch of the novels (apt-get download + rdata)."""
    root = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(CACHE_ENV, str(root))
        folder = fetch_janeausten()
    return root, folder


@pytest.fixture
def use_austen_cache(austen_cache, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(austen_cache[0]))
    return austen_cache[1]


def settings(source, **kwargs) -> CorpusSettings:
    return CorpusSettings(source=str(source), **kwargs)


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def one_line_error(exc_info) -> str:
    message = str(exc_info.value)
    assert isinstance(exc_info.value, ValueError)
    assert "\n" not in message and message.strip() == message and message
    return message


# --- the offline Jane Austen corpus -------------------------------------------------------


def test_fetch_janeausten_writes_six_novels_outside_the_repo(austen_cache):
    root, folder = austen_cache
    assert folder == root / "corpora" / "janeausten"
    assert REPO not in folder.parents
    names = sorted(p.name for p in folder.glob("*.txt"))
    assert names == sorted(f"{name}.txt" for name in NOVELS) and len(names) == 6
    pride = (folder / "prideprejudice.txt").read_text(encoding="utf-8")
    assert pride.startswith("PRIDE AND PREJUDICE\n\n")
    # Hard-wrapped lines were joined: the famous first sentence spans two lines in the package.
    assert f"\n\n{PRIDE_OPENING}\n\n" in pride
    assert "Mr. Darcy" in pride and "Elizabeth" in pride
    for name in NOVELS:
        text = (folder / f"{name}.txt").read_text(encoding="utf-8")
        assert len(text) > 300_000  # whole novels, not excerpts
        paragraphs = text.strip().split("\n\n")
        assert all(p and "\n" not in p for p in paragraphs)
    assert "Emma Woodhouse, handsome, clever, and rich" in (folder / "emma.txt").read_text(encoding="utf-8")
    manifest = json.loads((folder / "MANIFEST.json").read_text())
    assert sorted(manifest["files"]) == names


def test_fetch_janeausten_reuses_the_cache_without_apt(austen_cache, monkeypatch):
    root, folder = austen_cache
    monkeypatch.setenv(CACHE_ENV, str(root))
    before = {p.name: p.read_bytes() for p in folder.iterdir()}

    def no_commands(*args, **kwargs):
        raise AssertionError("apt/dpkg must not run when the cache is complete")

    monkeypatch.setattr(janeausten_module, "_run", no_commands)
    assert fetch_janeausten() == folder
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_fetch_janeausten_apt_failure_updates_once_then_raises_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    calls = []

    class Failed:
        returncode = 100
        stdout = ""
        stderr = "W: some warning\nE: Unable to locate package r-cran-janeaustenr"

    def failing(command, cwd=None):
        calls.append(list(command))
        return Failed()

    monkeypatch.setattr(janeausten_module, "_run", failing)
    with pytest.raises(CorpusError) as exc_info:
        fetch_janeausten()
    message = one_line_error(exc_info)
    assert "r-cran-janeaustenr" in message and "Unable to locate package" in message
    assert calls == [
        ["apt-get", "download", "r-cran-janeaustenr"],
        ["apt-get", "update"],
        ["apt-get", "download", "r-cran-janeaustenr"],
    ]
    # Nothing half-written is left behind.
    assert list((tmp_path / "corpora").iterdir()) == []


def test_fetch_janeausten_without_apt_get(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))

    def missing(command, cwd=None):
        raise FileNotFoundError(command[0])

    monkeypatch.setattr(janeausten_module, "_run", missing)
    with pytest.raises(CorpusError) as exc_info:
        fetch_janeausten()
    message = one_line_error(exc_info)
    assert "apt-get not found" in message and "corpus.source" in message


def test_fetch_janeausten_killed_midway_leaves_no_partial_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    real = janeausten_module.lines_to_paragraphs
    written = []

    def dies_on_third_novel(lines):
        written.append(1)
        if len(written) == 3:
            raise KeyboardInterrupt  # what a killed process looks like from inside
        return real(lines)

    monkeypatch.setattr(janeausten_module, "lines_to_paragraphs", dies_on_third_novel)
    with pytest.raises(KeyboardInterrupt):
        fetch_janeausten()
    assert list((tmp_path / "corpora").iterdir()) == []

    # A partial folder (e.g. from an older crash) is not taken for a cache: the next fetch replaces it.
    partial = tmp_path / "corpora" / "janeausten"
    partial.mkdir()
    (partial / "emma.txt").write_text("half", encoding="utf-8")
    monkeypatch.setattr(janeausten_module, "lines_to_paragraphs", real)
    folder = fetch_janeausten()
    assert folder == partial
    assert len(list(folder.glob("*.txt"))) == 6
    assert (folder / "emma.txt").read_text(encoding="utf-8").startswith("EMMA")
    assert sorted(p.name for p in (tmp_path / "corpora").iterdir()) == ["janeausten"]


def test_janeausten_source_yields_one_document_per_novel(use_austen_cache):
    documents = list(iter_documents(settings("janeausten")))
    assert len(documents) == 6
    assert sum(PRIDE_OPENING in d for d in documents) == 1
    assert [d.split("\n", 1)[0] for d in documents] == [
        "EMMA",
        "MANSFIELD PARK",
        "NORTHANGER ABBEY",
        "Persuasion",
        "PRIDE AND PREJUDICE",
        "SENSE AND SENSIBILITY",
    ]


# --- file sources ----------------------------------------------------------------------------


def test_text_folder_is_read_recursively_in_sorted_order(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "deep").mkdir()
    (tmp_path / "a.txt").write_text("first file", encoding="utf-8")
    (tmp_path / "b" / "notes.md").write_text("# markdown", encoding="utf-8")
    (tmp_path / "b" / "deep" / "doc.rst").write_text("restructured", encoding="utf-8")
    (tmp_path / "c.text").write_text("\ufefflast one", encoding="utf-8")  # BOM is dropped
    (tmp_path / "code.py").write_text("print('ignored')", encoding="utf-8")
    (tmp_path / "data.json").write_text('{"ignored": true}', encoding="utf-8")
    (tmp_path / "blank.txt").write_text("  \n\n", encoding="utf-8")  # empty documents are skipped
    (tmp_path / "bin.png").write_bytes(b"\x89PNG\x00\x00")  # not a text suffix: never opened
    # Sorted by path: a.txt, b/deep/doc.rst, b/notes.md, c.text.
    assert list(iter_documents(settings(tmp_path))) == ["first file", "restructured", "# markdown", "last one"]


def test_single_text_file(tmp_path):
    path = tmp_path / "book"  # any suffix (or none) is read as text
    path.write_text("Ünïcode text ✓\nsecond line", encoding="utf-8")
    assert list(iter_documents(settings(path))) == ["Ünïcode text ✓\nsecond line"]


def test_jsonl_reads_the_text_column(tmp_path):
    path = tmp_path / "data.jsonl"
    rows = [{"body": "one", "id": 1}, {"body": None, "id": 2}, {"body": "two", "id": 3}]
    path.write_text("\n".join(json.dumps(r) for r in rows[:2]) + "\n\n" + json.dumps(rows[2]) + "\n", encoding="utf-8")
    assert list(iter_documents(settings(path, text_column="body"))) == ["one", "two"]


def test_parquet_reads_the_text_column(tmp_path):
    path = tmp_path / "data.parquet"
    pl.DataFrame({"id": [1, 2, 3, 4], "content": ["alpha", None, "beta", "gamma"]}).write_parquet(path)
    assert list(iter_documents(settings(path, text_column="content"))) == ["alpha", "beta", "gamma"]


# --- errors: one line, naming the problem and the fix ----------------------------------------


def test_missing_path(tmp_path):
    with pytest.raises(CorpusError) as exc_info:
        list(iter_documents(settings(tmp_path / "nope.txt")))
    message = one_line_error(exc_info)
    assert "nope.txt" in message and "not found" in message


def test_unreadable_file(tmp_path):
    if sys.platform.startswith("linux"):
        path = Path("/proc/self/mem")  # a regular file whose read fails with EIO, even for root
    elif os.geteuid() != 0:
        path = tmp_path / "locked.txt"
        path.write_text("secret", encoding="utf-8")
        path.chmod(0)
    else:
        pytest.skip("no unreadable file available")
    with pytest.raises(CorpusError) as exc_info:
        list(iter_documents(settings(path)))
    message = one_line_error(exc_info)
    assert "cannot read" in message and str(path) in message


def test_binary_file_in_folder_is_named(tmp_path):
    (tmp_path / "good.txt").write_text("fine", encoding="utf-8")
    (tmp_path / "image.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    with pytest.raises(CorpusError) as exc_info:
        list(iter_documents(settings(tmp_path)))
    message = one_line_error(exc_info)
    assert "image.txt" in message and "binary" in message


def test_non_utf8_file_is_named(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("café au lait".encode("latin-1"))
    with pytest.raises(CorpusError) as exc_info:
        list(iter_documents(settings(path)))
    message = one_line_error(exc_info)
    assert "latin1.txt" in message and "UTF-8" in message


def test_jsonl_missing_text_column(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "ok"}\n{"content": "where is text"}\n', encoding="utf-8")
    with pytest.raises(CorpusError) as exc_info:
        list(iter_documents(settings(path)))
    message = one_line_error(exc_info)
    assert "line 2" in message and "'text'" in message and "content" in message and "corpus.text_column" in message


def test_jsonl_invalid_json(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "ok"}\n{not json}\n', encoding="utf-8")
    with pytest.raises(CorpusError) as exc_info:
        list(iter_documents(settings(path)))
    assert "line 2" in one_line_error(exc_info)


def test_parquet_missing_text_column(tmp_path):
    path = tmp_path / "data.parquet"
    pl.DataFrame({"body": ["a"], "id": [1]}).write_parquet(path)
    with pytest.raises(CorpusError) as exc_info:
        list(iter_documents(settings(path)))
    message = one_line_error(exc_info)
    assert "'text'" in message and "body" in message and "corpus.text_column" in message


def test_corrupt_parquet(tmp_path):
    path = tmp_path / "data.parquet"
    path.write_bytes(b"this is not parquet")
    with pytest.raises(CorpusError) as exc_info:
        list(iter_documents(settings(path)))
    assert "data.parquet" in one_line_error(exc_info)


@pytest.mark.parametrize("kind", ["empty_file", "blank_folder", "empty_jsonl", "null_parquet"])
def test_empty_corpus(tmp_path, kind):
    if kind == "empty_file":
        source = tmp_path / "empty.txt"
        source.write_text("", encoding="utf-8")
    elif kind == "blank_folder":
        source = tmp_path
        (tmp_path / "a.txt").write_text("  \n", encoding="utf-8")
        (tmp_path / "b.md").write_text("", encoding="utf-8")
    elif kind == "empty_jsonl":
        source = tmp_path / "data.jsonl"
        source.write_text('{"text": ""}\n{"text": null}\n', encoding="utf-8")
    else:
        source = tmp_path / "data.parquet"
        pl.DataFrame({"text": [None, "   "]}, schema={"text": pl.String}).write_parquet(source)
    with pytest.raises(CorpusError) as exc_info:
        list(iter_documents(settings(source)))
    assert "holds no text" in one_line_error(exc_info)


def test_folder_without_text_files(tmp_path):
    (tmp_path / "script.py").write_text("x = 1", encoding="utf-8")
    with pytest.raises(CorpusError) as exc_info:
        list(iter_documents(settings(tmp_path)))
    assert "no text files" in one_line_error(exc_info)


def test_hf_source_without_datasets_says_how_to_install():
    try:
        import datasets  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("datasets is installed here")
    with pytest.raises(CorpusError) as exc_info:
        list(iter_documents(settings("hf:wikitext:wikitext-2-raw-v1")))
    message = one_line_error(exc_info)
    assert "pip install datasets" in message


# --- tokenization --------------------------------------------------------------------------------


def test_windows_are_exact_and_documents_are_joined_by_eos(tmp_path, tokenizer):
    docs = ["The first document talks about apples and pears. " * 20, "A second one, about the sea. " * 25]
    for i, doc in enumerate(docs):
        (tmp_path / f"{i}.txt").write_text(doc, encoding="utf-8")
    eos = tokenizer.eos_token_id
    assert eos is not None
    expected_stream = encode(tokenizer, docs[0]) + [eos] + encode(tokenizer, docs[1])
    assert expected_stream.count(eos) == 1  # no EOS at the start or the end, one between documents

    result = tokenize_corpus(settings(tmp_path, sequence_length=16, max_sequences=None), tokenizer)
    assert isinstance(result, CorpusSequences)
    full = len(expected_stream) // 16
    assert result.token_ids.dtype == np.int32
    assert result.token_ids.shape == (full, 16)
    assert result.token_ids.ravel().tolist() == expected_stream[: full * 16]  # remainder dropped
    assert result.stream_tokens == len(expected_stream) and result.stream_windows == full
    assert result.source == str(tmp_path)


def test_no_separator_when_the_tokenizer_has_no_eos(tmp_path, tokenizer):
    class NoEos:
        eos_token_id = None

        def __call__(self, texts, **kwargs):
            return tokenizer(texts, **kwargs)

    docs = ["one two three four five six", "seven eight nine ten"]
    for i, doc in enumerate(docs):
        (tmp_path / f"{i}.txt").write_text(doc, encoding="utf-8")
    result = tokenize_corpus(settings(tmp_path, sequence_length=4, max_sequences=None), NoEos())
    stream = encode(tokenizer, docs[0]) + encode(tokenizer, docs[1])
    assert result.token_ids.ravel().tolist() == stream[: len(stream) // 4 * 4]


def test_evenly_spaced_indices():
    assert evenly_spaced(10, 20).tolist() == list(range(10))
    assert evenly_spaced(10, 10).tolist() == list(range(10))
    assert evenly_spaced(100, 1).tolist() == [0]
    assert evenly_spaced(100, 5).tolist() == [0, 25, 50, 74, 99]
    for total, count in [(7, 6), (1000, 999), (14490, 1200), (12345, 2)]:
        picked = evenly_spaced(total, count)
        assert len(picked) == count and picked[0] == 0 and picked[-1] == total - 1
        assert np.all(np.diff(picked) >= 1)  # distinct and in order
        gaps = np.diff(picked)
        assert gaps.max() - gaps.min() <= 1  # evenly spaced


def test_max_sequences_takes_evenly_spaced_windows_in_stream_order(tmp_path, tokenizer):
    (tmp_path / "a.txt").write_text(" ".join(f"word{i}" for i in range(3000)), encoding="utf-8")
    full = tokenize_corpus(settings(tmp_path, sequence_length=8, max_sequences=None), tokenizer)
    some = tokenize_corpus(settings(tmp_path, sequence_length=8, max_sequences=7), tokenizer)
    assert full.num_sequences > 100
    assert some.token_ids.shape == (7, 8)
    assert np.array_equal(some.token_ids, full.token_ids[evenly_spaced(full.num_sequences, 7)])
    assert np.array_equal(some.token_ids[0], full.token_ids[0])
    assert np.array_equal(some.token_ids[-1], full.token_ids[-1])
    assert some.stream_windows == full.num_sequences
    more = tokenize_corpus(settings(tmp_path, sequence_length=8, max_sequences=10**6), tokenizer)
    assert np.array_equal(more.token_ids, full.token_ids)


def test_janeausten_subsample_covers_every_novel(use_austen_cache, tokenizer):
    full = tokenize_corpus(settings("janeausten", sequence_length=64, max_sequences=None), tokenizer)
    some = tokenize_corpus(settings("janeausten", sequence_length=64, max_sequences=60), tokenizer)
    assert full.stream_tokens > 800_000 and full.num_sequences == full.stream_tokens // 64
    assert some.token_ids.shape == (60, 64)
    picked = evenly_spaced(full.num_sequences, 60)
    assert np.array_equal(some.token_ids, full.token_ids[picked])
    # Which novel each window starts in: the number of EOS separators before its first token.
    eos_before = np.cumsum(full.token_ids.ravel() == tokenizer.eos_token_id)
    novel_of_window = np.concatenate([[0], eos_before])[np.arange(full.num_sequences) * 64]
    assert set(novel_of_window[picked].tolist()) == set(range(6))
    assert int(eos_before[-1]) == 5


def test_too_few_tokens_for_one_sequence(tmp_path, tokenizer):
    path = tmp_path / "short.txt"
    path.write_text("Just a few words.", encoding="utf-8")
    n = len(encode(tokenizer, "Just a few words."))
    with pytest.raises(CorpusError) as exc_info:
        tokenize_corpus(settings(path, sequence_length=64), tokenizer)
    message = one_line_error(exc_info)
    assert f"has {n} tokens, fewer than one sequence of 64" in message
    assert "corpus.sequence_length" in message


def test_corpus_hash_is_deterministic_and_content_sensitive(tmp_path, tokenizer):
    path = tmp_path / "a.txt"
    path.write_text("Some words to hash, repeated. " * 50, encoding="utf-8")
    first = tokenize_corpus(settings(path, sequence_length=16), tokenizer)
    second = tokenize_corpus(settings(path, sequence_length=16), tokenizer)
    assert first.corpus_hash == second.corpus_hash
    assert len(first.corpus_hash) == 16 and int(first.corpus_hash, 16) >= 0
    shorter = tokenize_corpus(settings(path, sequence_length=8), tokenizer)
    fewer = tokenize_corpus(settings(path, sequence_length=16, max_sequences=2), tokenizer)
    path.write_text("Other words to hash, repeated. " * 50, encoding="utf-8")
    changed = tokenize_corpus(settings(path, sequence_length=16), tokenizer)
    hashes = {first.corpus_hash, shorter.corpus_hash, fewer.corpus_hash, changed.corpus_hash}
    assert len(hashes) == 4


# --- readable tokens and the corpus_tokens frame ---------------------------------------------------


def test_token_strings_decode_each_id_with_a_cache(tokenizer):
    text = "Mr. Darcy walked; Elizabeth laughed. Mr. Darcy walked again."
    ids = np.array([encode(tokenizer, text)[:12]] * 3, dtype=np.int32)
    strings = token_strings(tokenizer, ids)
    assert len(strings) == 3 and all(len(row) == 12 for row in strings)
    assert strings[0] == [tokenizer.decode([int(i)]) for i in ids[0]]
    assert "".join(strings[0]) == tokenizer.decode(ids[0].tolist())

    class Counting:
        calls = 0

        def decode(self, ids):
            Counting.calls += 1
            return tokenizer.decode(ids)

    counting = Counting()
    token_strings(counting, ids)
    assert Counting.calls == len(set(ids.ravel().tolist()))  # once per distinct id
    token_strings(counting, ids[:, ::-1])
    assert Counting.calls == len(set(ids.ravel().tolist()))  # cached across calls


def test_corpus_frame_matches_the_lake_schema(tmp_path, tokenizer):
    (tmp_path / "a.txt").write_text("Emma Woodhouse, handsome, clever, and rich. " * 30, encoding="utf-8")
    sequences = tokenize_corpus(settings(tmp_path, sequence_length=12, max_sequences=5), tokenizer)
    frame = corpus_frame(sequences, tokenizer, model_id="smollm2-135m-instruct", corpus_name="emma-sample")
    schema = SCHEMAS["corpus_tokens"]
    assert frame.columns == schema.names
    assert frame.schema == pl.from_arrow(schema.empty_table()).schema
    assert frame.to_arrow().cast(schema).schema == schema
    assert frame.height == 5
    assert frame["sequence_id"].to_list() == list(range(5))
    assert set(frame["model"]) == {"smollm2-135m-instruct"} and set(frame["corpus"]) == {"emma-sample"}
    assert frame["token_ids"].to_list() == sequences.token_ids.tolist()
    assert frame["tokens"].to_list() == token_strings(tokenizer, sequences.token_ids)
    for ids, text in zip(sequences.token_ids.tolist(), frame["text"]):
        assert text == tokenizer.decode(ids)
    assert all(len(t) == 12 for t in frame["tokens"].to_list())
