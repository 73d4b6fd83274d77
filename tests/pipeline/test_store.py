"""The store on a folder, a file:// URL and fsspec's memory filesystem: immutable versions, an atomic latest,
list, and pull that verifies every sha256."""

import json
import multiprocessing
import os
import uuid

import fsspec
import pytest

from pipeline.cli import main as cli
from pipeline.store import (
    ChecksumError,
    latest,
    latest_manifest,
    list_store,
    publish,
    pull,
    resolve,
    versions,
)


def _artefact(root, text="weights v1"):
    root.mkdir(parents=True)
    (root / "model.safetensors").write_text(text)
    (root / "README.md").write_text("---\nlicense: other\n---\n# card\n")
    (root / "gguf-q8_0").mkdir()
    (root / "gguf-q8_0" / "m-Q8_0.gguf").write_text("gguf " + text)
    return root


def test_memory_store_versions_latest_pull_and_tampering(tmp_path):
    store = f"memory://distill-{uuid.uuid4().hex}"
    a, b = _artefact(tmp_path / "a"), _artefact(tmp_path / "b", "weights v2")
    assert versions(store, "s") == [] and latest(store, "s") is None
    assert publish(store, "s", a, {"note": 1}) == "v1"
    assert publish(store, "s", a, {"note": 2}) == "v1"  # the same files: the version is reused
    assert publish(store, "s", b, {"note": 3}) == "v2"
    assert versions(store, "s") == ["v1", "v2"] and latest(store, "s") == "v2"
    assert latest_manifest(store, "s")["note"] == 3 and list_store(store) == [("s", ["v1", "v2"], "v2")]
    dest = pull(store, "s@v1", tmp_path / "pulled")
    assert (dest / "gguf-q8_0" / "m-Q8_0.gguf").read_text() == "gguf weights v1"
    assert json.loads((dest / "manifest.json").read_text())["version"] == "v1"
    fs, root = fsspec.core.url_to_fs(store)
    fs.pipe_file(f"{root}/s/v2/gguf-q8_0/m-Q8_0.gguf", b"tampered")
    with pytest.raises(ChecksumError, match="gguf-q8_0/m-Q8_0.gguf: sha256 differs"):
        pull(store, "s", tmp_path / "bad")
    assert not (tmp_path / "bad").exists()
    fs.pipe_file(f"{root}/s/v2/extra.bin", b"x")
    fs.rm_file(f"{root}/s/v2/README.md")
    with pytest.raises(ChecksumError, match="README.md: missing.*extra.bin: not in the manifest"):
        pull(store, "s@v2", tmp_path / "bad")
    # A half-uploaded version (no manifest yet) is neither listed nor pulled, and the next publish skips it.
    fs.pipe_file(f"{root}/s/v3/model.safetensors", b"partial")
    assert versions(store, "s") == ["v1", "v2"]
    with pytest.raises(FileNotFoundError, match="versions: v1, v2"):
        resolve(store, "s@v3")
    assert publish(store, "s", _artefact(tmp_path / "c", "weights v4"), {}) == "v4"
    assert latest(store, "s") == "v4"
    with pytest.raises(ValueError, match="invalid student name"):
        publish(store, "../x", a, {})


def test_file_url_store_through_the_cli(tmp_path, capsys):
    store = (tmp_path / "store").as_uri()
    assert store.startswith("file://")
    manifest = {"artefacts": [{"format": "master", "bytes": 10}, {"format": "gguf-q8_0", "bytes": 5,
                                                                  "points_vs_master": -0.4}],
                "scores": {"functions": {"faq": {"quality": 0.9}}}, "gate": {"passed": True},
                "lineage": {"recipe": "r", "base_model": "b", "teacher_models": ["t"], "data_sha256": "ab" * 32}}
    assert publish(store, "s", _artefact(tmp_path / "a"), manifest) == "v1"
    assert (tmp_path / "store" / "s" / "v1" / "manifest.json").is_file()  # a plain folder underneath
    assert not [p for p in (tmp_path / "store" / "s").iterdir() if p.name.startswith(".")]  # no temporaries
    capsys.readouterr()
    assert cli(["list", store]) == 0
    out = capsys.readouterr().out
    assert "s: v1  (latest: v1)" in out and "gguf-q8_0 (0.0 MB, -0.4 pts)" in out and "faq 90.0%" in out
    assert cli(["pull", store, "s", str(tmp_path / "d")]) == 0
    assert "every checksum verified" in capsys.readouterr().out
    (tmp_path / "store/s/v1/model.safetensors").write_text("tampered")
    assert cli(["pull", store, "s@v1", str(tmp_path / "e")]) == 4
    assert cli(["pull", store, "s@v7", str(tmp_path / "f")]) == 2
    assert cli(["list", str(tmp_path / "nowhere")]) == 2


def _publish_one(args):
    store, folder = args
    return publish(store, "s", folder, {"pid": os.getpid()})


def test_concurrent_publishers_get_distinct_immutable_versions(tmp_path):
    folders = [_artefact(tmp_path / f"a{i}", f"weights {i}") for i in range(4)]
    store = str(tmp_path / "store")
    with multiprocessing.get_context("fork").Pool(4) as pool:
        got = pool.map(_publish_one, [(store, f) for f in folders])
    assert sorted(got) == ["v1", "v2", "v3", "v4"]
    for v, f in zip(got, folders, strict=True):  # each version holds exactly the files of its publisher
        assert (tmp_path / "store/s" / v / "model.safetensors").read_text() == (f / "model.safetensors").read_text()
    assert latest(store, "s") in got
