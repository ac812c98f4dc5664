"""Text sources: every ``corpus.source`` form yields plain-text documents, one string each.

Forms of ``corpus.source``:

* ``janeausten`` - the offline default, six novels fetched once from Debian (one document each);
* a text file, or a folder searched recursively for ``*.txt *.md *.rst *.text`` in sorted order
  (one document per file);
* a ``.jsonl`` file (one JSON object per line) or a ``.parquet`` file, with the text in the
  column ``corpus.text_column`` (one document per row);
* ``hf:<dataset>[:<config>]`` - a Hugging Face dataset split ``corpus.split`` (needs ``datasets``).

Every problem is a :class:`CorpusError` whose message is one line with the fix.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from neuron_pipeline.config import CorpusSettings
from neuron_pipeline.corpus.errors import CorpusError
from neuron_pipeline.corpus.janeausten import fetch_janeausten

JANEAUSTEN = "janeausten"
HF_PREFIX = "hf:"
TEXT_SUFFIXES = (".txt", ".md", ".rst", ".text")
# Bytes inspected for NUL characters when deciding whether a file is binary.
_BINARY_PROBE = 8192
_PARQUET_BATCH_ROWS = 10_000


def source_kind(source: str) -> str:
    """One of: janeausten, hf, jsonl, parquet, folder, file (the path's existence is not checked)."""
    if source == JANEAUSTEN:
        return "janeausten"
    if source.startswith(HF_PREFIX):
        return "hf"
    path = Path(source).expanduser()
    if path.is_dir():
        return "folder"
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return "jsonl"
    if suffix == ".parquet":
        return "parquet"
    return "file"


def describe_source(settings: CorpusSettings) -> str:
    """A stable one-line description of what is read (used in the corpus hash)."""
    kind = source_kind(settings.source)
    if kind in ("janeausten", "folder", "file"):
        return f"{kind}:{settings.source}"
    if kind == "hf":
        return f"{settings.source}[split={settings.split},column={settings.text_column}]"
    return f"{kind}:{settings.source}[column={settings.text_column}]"


def _read_text_file(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise CorpusError(
            f"cannot read corpus file {str(path)!r} ({reason}): check its permissions or remove it"
        ) from None
    if b"\x00" in raw[:_BINARY_PROBE]:
        raise CorpusError(
            f"corpus file {str(path)!r} looks binary (it contains NUL bytes): remove it or point corpus.source at text"
        )
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise CorpusError(
            f"corpus file {str(path)!r} is not UTF-8 (bad byte at offset {exc.start}): "
            "re-encode it as UTF-8 or remove it"
        ) from None


def _folder_files(folder: Path) -> list[Path]:
    files = sorted(
        p for p in folder.rglob("*") if p.suffix.lower() in TEXT_SUFFIXES and p.is_file()
    )
    if not files:
        raise CorpusError(
            f"corpus folder {str(folder)!r} has no text files ({', '.join('*' + s for s in TEXT_SUFFIXES)}): "
            "add some or point corpus.source elsewhere"
        )
    return files


def _iter_jsonl(path: Path, column: str) -> Iterator[str]:
    try:
        handle = path.open("rb")
    except OSError as exc:
        raise CorpusError(
            f"cannot read corpus file {str(path)!r} ({exc.strerror or type(exc).__name__}): check its permissions"
        ) from None
    with handle:
        for number, raw in enumerate(handle, start=1):
            if b"\x00" in raw:
                raise CorpusError(
                    f"corpus file {str(path)!r} looks binary (NUL byte on line {number}): use a JSON-lines text file"
                )
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8").strip()
            except UnicodeDecodeError:
                raise CorpusError(
                    f"corpus file {str(path)!r} is not UTF-8 (line {number}): re-encode it as UTF-8"
                ) from None
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise CorpusError(
                    f"{str(path)!r} line {number} is not valid JSON ({exc.msg}): write one JSON object per line"
                ) from None
            if not isinstance(record, dict):
                raise CorpusError(f"{str(path)!r} line {number} is not a JSON object: write one JSON object per line")
            if column not in record:
                fields = ", ".join(sorted(record)) or "none"
                raise CorpusError(
                    f"{str(path)!r} line {number} has no text column {column!r} (fields: {fields}): "
                    "set corpus.text_column to the field that holds the text"
                )
            value = record[column]
            if value is None:
                continue
            if not isinstance(value, str):
                raise CorpusError(
                    f"{str(path)!r} line {number}: column {column!r} holds {type(value).__name__}, not text: "
                    "set corpus.text_column to a text field"
                )
            yield value


def _iter_parquet(path: Path, column: str) -> Iterator[str]:
    import polars as pl

    try:
        schema = pl.read_parquet_schema(path)
    except Exception as exc:  # polars raises several error types for unreadable files
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CorpusError(
            f"cannot read parquet file {str(path)!r} ({first}): check that it is a valid Parquet file"
        ) from None
    if column not in schema:
        raise CorpusError(
            f"parquet file {str(path)!r} has no text column {column!r} (columns: {', '.join(schema) or 'none'}): "
            "set corpus.text_column to the column that holds the text"
        )
    if schema[column] != pl.String:
        raise CorpusError(
            f"column {column!r} of {str(path)!r} is {schema[column]}, not text: "
            "set corpus.text_column to a string column"
        )
    try:
        frame = pl.scan_parquet(path).select(column).collect()
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CorpusError(
            f"cannot read parquet file {str(path)!r} ({first}): check that it is a valid Parquet file"
        ) from None
    for start in range(0, frame.height, _PARQUET_BATCH_ROWS):
        for value in frame[column].slice(start, _PARQUET_BATCH_ROWS).to_list():
            if value is not None:
                yield value


def _iter_hf(settings: CorpusSettings) -> Iterator[str]:
    spec = settings.source[len(HF_PREFIX) :]
    name, _, config = spec.partition(":")
    if not name:
        raise CorpusError(f"corpus source {settings.source!r} names no dataset: use 'hf:<dataset>[:<config>]'")
    try:
        import datasets
    except ImportError:
        raise CorpusError(
            f"corpus source {settings.source!r} needs the Hugging Face datasets library: pip install datasets"
        ) from None
    try:
        dataset = datasets.load_dataset(name, config or None, split=settings.split)
    except Exception as exc:  # network, unknown dataset, unknown split, ...
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CorpusError(
            f"cannot load Hugging Face dataset {spec!r} split {settings.split!r} ({first}): "
            "check the name, config and corpus.split"
        ) from None
    columns = list(getattr(dataset, "column_names", None) or [])
    if settings.text_column not in columns:
        raise CorpusError(
            f"dataset {spec!r} has no text column {settings.text_column!r} (columns: {', '.join(columns) or 'none'}): "
            "set corpus.text_column"
        )
    for record in dataset.select_columns([settings.text_column]):
        value = record[settings.text_column]
        if isinstance(value, str):
            yield value


def _iter_raw(settings: CorpusSettings) -> Iterator[str]:
    kind = source_kind(settings.source)
    if kind == "janeausten":
        folder = fetch_janeausten()
        for path in sorted(folder.glob("*.txt")):
            yield _read_text_file(path)
        return
    if kind == "hf":
        yield from _iter_hf(settings)
        return
    path = Path(settings.source).expanduser()
    if not path.exists():
        raise CorpusError(
            f"corpus source {settings.source!r} not found: pass an existing text file or folder, a .jsonl or "
            f".parquet file, '{JANEAUSTEN}', or 'hf:<dataset>'"
        )
    if kind == "folder":
        for file in _folder_files(path):
            yield _read_text_file(file)
    elif kind == "jsonl":
        yield from _iter_jsonl(path, settings.text_column)
    elif kind == "parquet":
        yield from _iter_parquet(path, settings.text_column)
    else:
        if not path.is_file():
            raise CorpusError(
                f"corpus source {settings.source!r} is not a regular file or folder: pass a text file or folder"
            )
        yield _read_text_file(path)


def iter_documents(settings: CorpusSettings) -> Iterator[str]:
    """Yield the source's documents in a fixed order, skipping empty ones.

    Raises CorpusError (at the end) if the source holds no text at all.
    """
    found = False
    for document in _iter_raw(settings):
        if document.strip():
            found = True
            yield document
    if not found:
        raise CorpusError(f"corpus source {settings.source!r} holds no text: add text or point corpus.source elsewhere")
