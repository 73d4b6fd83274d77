"""Pulling trusts nothing it did not check: the manifest is covered by the store's index and, optionally, an
ed25519 signature; names and links cannot leave the version; a malformed manifest or latest is a clear error;
a killed publish leaves no temporary behind for good."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from pipeline.cli import main as cli
from pipeline.store import INDEX, SIGNATURE, ChecksumError, publish, pull, read_index


def _artefact(root, text="weights v1"):
    root.mkdir(parents=True)
    (root / "model.safetensors").write_text(text)
    (root / "README.md").write_text("# card\n")
    return root


def _keys():
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return private, public


def _retamper(store, name="s", version="v1", new=b"evil weights"):
    """Change a file and its sha256 in the manifest, as an attacker with write access to the version would."""
    folder = store / name / version
    (folder / "model.safetensors").write_bytes(new)
    meta = json.loads((folder / "manifest.json").read_text())
    meta["files"]["model.safetensors"] = hashlib.sha256(new).hexdigest()
    meta["gate"] = {"passed": True}
    (folder / "manifest.json").write_text(json.dumps(meta, indent=2) + "\n")
    return folder


def test_a_file_changed_with_its_manifest_entry_is_caught_by_the_index(tmp_path):
    store = tmp_path / "store"
    publish(store, "s", _artefact(tmp_path / "a"), {"gate": {"passed": False}})
    assert set(read_index(store, "s")) == {"v1"}
    _retamper(store)
    with pytest.raises(ChecksumError, match="manifest.json does not match its sha256 in the store's index"):
        pull(store, "s", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert cli(["pull", str(store), "s", str(tmp_path / "out2")]) == 4


def test_a_signed_version_verifies_and_a_rewritten_index_does_not_fool_the_signature(tmp_path):
    private, public = _keys()
    store = tmp_path / "store"
    publish(store, "s", _artefact(tmp_path / "a"), {}, signing_key=private)
    assert (store / "s" / "v1" / SIGNATURE).is_file()
    assert (pull(store, "s", tmp_path / "ok", public_key=public) / "model.safetensors").read_text() == "weights v1"
    folder = _retamper(store)
    (store / "s" / INDEX).write_text(json.dumps({"v1": hashlib.sha256((folder / "manifest.json").read_bytes())
                                                 .hexdigest()}))  # the attacker rewrites the index too
    pull(store, "s", tmp_path / "unsigned-check")  # without the key only the (rewritten) index is checked
    with pytest.raises(ChecksumError, match="not a valid signature"):
        pull(store, "s", tmp_path / "bad", public_key=public)
    other_private, other_public = _keys()
    publish(store, "u", _artefact(tmp_path / "b"), {})  # never signed
    with pytest.raises(ChecksumError, match="not signed"):
        pull(store, "u", tmp_path / "u", public_key=other_public)
    key_file = tmp_path / "pub.pem"
    key_file.write_bytes(public)
    assert cli(["pull", str(store), "s", str(tmp_path / "c1"), "--public-key", str(key_file)]) == 4
    assert cli(["pull", str(store), "u", str(tmp_path / "c2"), "--require-signature"]) == 2  # needs the key


@pytest.mark.parametrize("name", ["../outside.txt", "/etc/passwd", "a/../../x"])
def test_names_that_leave_the_version_are_refused(tmp_path, name):
    store = tmp_path / "store"
    publish(store, "s", _artefact(tmp_path / "a"), {})
    folder = store / "s" / "v1"
    meta = json.loads((folder / "manifest.json").read_text())
    meta["files"][name] = hashlib.sha256(b"x").hexdigest()
    data = (json.dumps(meta, indent=2) + "\n").encode()
    (folder / "manifest.json").write_bytes(data)
    (store / "s" / INDEX).write_text(json.dumps({"v1": hashlib.sha256(data).hexdigest()}))
    with pytest.raises(ChecksumError, match="leaves the version folder"):
        pull(store, "s", tmp_path / "out")


def test_links_out_of_the_store_are_refused(tmp_path):
    store = tmp_path / "store"
    publish(store, "s", _artefact(tmp_path / "a"), {})
    outside = tmp_path / "elsewhere"
    (store / "s" / "v1").rename(outside)
    (store / "s" / "v1").symlink_to(outside, target_is_directory=True)
    with pytest.raises(ChecksumError, match="link out of the store"):
        pull(store, "s", tmp_path / "out")
    (store / "s" / "v1").unlink()
    outside.rename(store / "s" / "v1")
    (store / "s" / "v1" / "extra").symlink_to("/etc/hostname")
    with pytest.raises(ChecksumError, match="links are not allowed"):
        pull(store, "s", tmp_path / "out2")


def test_a_malformed_manifest_and_a_linked_latest_are_clear_errors(tmp_path, capsys):
    store = tmp_path / "store"
    publish(store, "s", _artefact(tmp_path / "a"), {})
    (store / "s" / "v1" / "manifest.json").write_text("{not json")
    (store / "s" / INDEX).unlink()  # a store written before the index: the manifest itself is then read
    assert cli(["pull", str(store), "s@v1", str(tmp_path / "out")]) == 4
    captured = capsys.readouterr()
    assert "manifest.json is not valid JSON" in captured.out + captured.err
    secret = tmp_path / "secret.txt"
    secret.write_text("hunter2-password\n")
    (store / "s" / "latest").unlink()
    (store / "s" / "latest").symlink_to(secret)
    code = cli(["pull", str(store), "s", str(tmp_path / "out3")])
    captured = capsys.readouterr()
    assert code == 4 and "is a link" in captured.out + captured.err and "hunter2" not in captured.out + captured.err


def test_a_killed_publish_leaves_nothing_for_good(tmp_path):
    store = tmp_path / "store"
    (store / "s").mkdir(parents=True)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = store / "s" / f".v1.tmp-{int(dead.stdout)}"  # a pid that has exited: its publish was killed
    (stale / "model.safetensors").parent.mkdir(parents=True)
    (stale / "model.safetensors").write_text("half")
    live = store / "s" / f".v9.tmp-{os.getpid()}"  # a publisher still running keeps its temporary
    live.mkdir()
    assert publish(store, "s", _artefact(tmp_path / "a"), {}) == "v1"
    assert not stale.exists() and live.exists()
