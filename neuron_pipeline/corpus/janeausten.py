"""The offline default corpus: Jane Austen's six novels from Debian's ``r-cran-janeaustenr``.

The package stores the novels in R's lazy-load format (``Rdata.rdx`` index, ``Rdata.rdb``
database). Both are read in pure Python with the ``rdata`` package, so R is not needed:

* ``Rdata.rdx`` is a gzip-compressed R serialization of a list whose ``variables`` entry maps
  each object name to ``[offset, length]`` in ``Rdata.rdb``;
* each chunk of ``Rdata.rdb`` is a 4-byte big-endian length followed by a zlib stream that
  holds the R serialization of one character vector (the novel's lines).

Hard-wrapped lines are joined into paragraphs (a blank line ends a paragraph) and each novel
is written as one UTF-8 ``.txt`` file under ``cache_dir("corpora", "janeausten")``. The files
are written into a temporary folder that is renamed into place, so a killed fetch never leaves
a partial cache, and a later call reuses the cache without running apt.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import tempfile
import warnings
import zlib
from pathlib import Path
from typing import Sequence

from neuron_pipeline.config import cache_dir
from neuron_pipeline.corpus.errors import CorpusError

DEBIAN_PACKAGE = "r-cran-janeaustenr"
DATA_DIR = Path("usr/lib/R/site-library/janeaustenr/data")
# R object name -> title, in publication order.
NOVELS: dict[str, str] = {
    "sensesensibility": "Sense and Sensibility",
    "prideprejudice": "Pride and Prejudice",
    "mansfieldpark": "Mansfield Park",
    "emma": "Emma",
    "northangerabbey": "Northanger Abbey",
    "persuasion": "Persuasion",
}
MANIFEST = "MANIFEST.json"
_CACHE_NAME = "janeausten"
_COMMAND_TIMEOUT_S = 600


def _run(command: Sequence[str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run a command, capturing its output (a seam for tests)."""
    return subprocess.run(
        list(command), cwd=cwd, capture_output=True, text=True, timeout=_COMMAND_TIMEOUT_S, check=False
    )


def _last_line(text: str) -> str:
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    # apt prints a harmless sandbox warning ("W: Download is performed unsandboxed") as root.
    errors = [line for line in lines if line.startswith("E:")]
    return (errors or lines or ["no output"])[-1]


def _checked(command: Sequence[str], cwd: Path | None = None) -> tuple[bool, str]:
    """Run a command; return (succeeded, one-line reason when it did not)."""
    try:
        result = _run(command, cwd)
    except FileNotFoundError:
        return False, f"{command[0]} not found; this corpus needs a Debian or Ubuntu system"
    except (OSError, subprocess.SubprocessError) as exc:
        return False, (str(exc).splitlines() or [type(exc).__name__])[0]
    if result.returncode != 0:
        return False, _last_line(result.stderr or result.stdout)
    return True, ""


def _download_deb(workdir: Path) -> Path:
    """`apt-get download` the package into workdir; on failure `apt-get update` once and retry."""
    ok, problem = _checked(["apt-get", "download", DEBIAN_PACKAGE], workdir)
    if not ok:
        _checked(["apt-get", "update"])
        ok, problem = _checked(["apt-get", "download", DEBIAN_PACKAGE], workdir)
    debs = sorted(workdir.glob(f"{DEBIAN_PACKAGE}_*.deb"))
    if not ok or not debs:
        raise CorpusError(
            f"cannot download Debian package {DEBIAN_PACKAGE} ({problem or 'no .deb was written'}): "
            f"run `apt-get update && apt-get download {DEBIAN_PACKAGE}` to see why, or set corpus.source "
            "to a text file or folder"
        )
    return debs[-1]


def _extract_deb(deb: Path, target: Path) -> Path:
    ok, problem = _checked(["dpkg", "-x", str(deb), str(target)])
    data = target / DATA_DIR
    if not ok or not (data / "Rdata.rdx").is_file() or not (data / "Rdata.rdb").is_file():
        raise CorpusError(
            f"cannot unpack {deb.name} ({problem or 'Rdata.rdx/Rdata.rdb missing'}): check that dpkg works, "
            "or set corpus.source to a text file or folder"
        )
    return data


def _parse_r(raw: bytes):
    try:
        import rdata
    except ImportError:
        raise CorpusError("the janeausten corpus needs the rdata package: pip install rdata") from None
    with warnings.catch_warnings():
        # Lazy-load chunks carry no RDS header; rdata warns and assumes RDS, which is right.
        warnings.simplefilter("ignore", UserWarning)
        return rdata.conversion.convert(rdata.parser.parse_data(raw))


def read_novel_lines(data_dir: Path) -> dict[str, list[str]]:
    """Read every novel's lines from the R lazy-load database in ``data_dir``."""
    index = _parse_r(gzip.decompress((data_dir / "Rdata.rdx").read_bytes()))
    variables = {str(name): value for name, value in index["variables"].items()}
    missing = [name for name in NOVELS if name not in variables]
    if missing:
        raise CorpusError(
            f"{DEBIAN_PACKAGE} has no object {missing[0]!r} (found: {', '.join(sorted(variables))}): "
            "the package format changed; set corpus.source to a text file or folder"
        )
    database = (data_dir / "Rdata.rdb").read_bytes()
    novels: dict[str, list[str]] = {}
    for name in NOVELS:
        offset, length = (int(v) for v in variables[name])
        chunk = database[offset : offset + length]
        lines = _parse_r(zlib.decompress(chunk[4:]))
        novels[name] = ["" if line is None else str(line) for line in lines]
    return novels


def lines_to_paragraphs(lines: Sequence[str]) -> str:
    """Join hard-wrapped lines into paragraphs: one paragraph per block, blocks split by blank lines."""
    paragraphs: list[str] = []
    current: list[str] = []
    for line in lines:
        stripped = line.strip()
        if stripped:
            current.append(stripped)
        elif current:
            paragraphs.append(" ".join(current))
            current = []
    if current:
        paragraphs.append(" ".join(current))
    return "\n\n".join(paragraphs) + "\n"


def _is_complete(folder: Path) -> bool:
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return False
    try:
        files = json.loads(manifest.read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return all((folder / name).is_file() for name in files)


def janeausten_path() -> Path:
    """Where the corpus is (or would be) cached."""
    return cache_dir("corpora") / _CACHE_NAME


def fetch_janeausten(refresh: bool = False) -> Path:
    """Return the folder with the six novels as UTF-8 .txt files, fetching them once via apt."""
    target = janeausten_path()
    if _is_complete(target) and not refresh:
        return target
    parent = target.parent
    staging = Path(tempfile.mkdtemp(prefix=f".{_CACHE_NAME}-", dir=parent))
    staging.chmod(0o755)  # mkdtemp makes it private; the cache is ordinary shared data
    try:
        with tempfile.TemporaryDirectory(prefix="janeausten-deb-") as workdir:
            work = Path(workdir)
            deb = _download_deb(work)
            data_dir = _extract_deb(deb, work / "extracted")
            try:
                novels = read_novel_lines(data_dir)
            except CorpusError:
                raise
            except Exception as exc:  # zlib / rdata errors: the package's format changed
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                raise CorpusError(
                    f"cannot read the novels from {deb.name} ({first}): the package format changed; "
                    "set corpus.source to a text file or folder"
                ) from None
        files = []
        for name, lines in novels.items():
            text = lines_to_paragraphs(lines)
            (staging / f"{name}.txt").write_text(text, encoding="utf-8")
            files.append(f"{name}.txt")
        manifest = {"package": DEBIAN_PACKAGE, "source": deb.name, "files": files, "titles": NOVELS}
        # The manifest is written last: a folder without it is incomplete.
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2), encoding="utf-8")
        _install(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _install(staging: Path, target: Path) -> None:
    """Move the finished staging folder into place; an old or partial copy is moved aside first."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}-old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        try:
            os.replace(target, old)
        except FileNotFoundError:  # another process moved it first
            old = None
    try:
        os.replace(staging, target)
    except OSError:
        # Another process installed a complete copy in the meantime; keep it.
        if not _is_complete(target):
            raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
