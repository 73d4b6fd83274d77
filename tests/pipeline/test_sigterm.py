"""A stage ended by SIGTERM (a scheduler's timeout, `timeout`, a container stop) exits like Ctrl-C: clean-up runs.
Without it, every training left two empty folders in the temp directory: wandb, which trl and transformers import
whenever it is installed, makes `tmp*wandb-media` and `tmp*wandb-artifacts` at import and removes them only when
the interpreter exits normally."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.cli import main as cli

from conftest import make_project

ROOT = Path(__file__).resolve().parents[2]


def _wandb_dirs(tmp: Path) -> list[str]:
    return sorted(p.name for p in tmp.iterdir() if "wandb" in p.name)


def test_sigterm_during_training_leaves_no_temp_folders_and_exits_143(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    recipe = make_project(tmp_path, {"2026-11-23": 120}, train={"max_steps": 5000, "save_steps": 5000})
    monkeypatch.chdir(tmp_path)
    assert cli(["curate", str(recipe)]) == 0  # harvest and curate here; train in a process of its own
    tmp = tmp_path / "tmpdir"
    tmp.mkdir()
    env = {**os.environ, "TMPDIR": str(tmp), "PYTHONPATH": str(ROOT), "WANDB_MODE": "offline"}
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "train", str(recipe)], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 240
        while not _wandb_dirs(tmp) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        assert _wandb_dirs(tmp), "trl never imported wandb: nothing to test"
        time.sleep(3)  # into the training loop
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, out[-2000:]
    assert _wandb_dirs(tmp) == []
    assert not (tmp_path / "runs" / "t" / "train" / "manifest.json").exists()  # nothing looks complete


def test_a_second_sigterm_kills_a_process_whose_clean_up_hangs():
    """The handler is one-shot: the first TERM starts clean-up (SystemExit); when clean-up hangs, a second TERM
    ends the process by the default action (killed by signal 15), not by another SystemExit inside the finally."""
    code = ("import signal, sys, time; from pipeline.cli import _exit_on_sigterm; "
            "signal.signal(signal.SIGTERM, _exit_on_sigterm)\n"
            "try:\n    print('ready', flush=True); time.sleep(60)\n"
            "finally:\n    print('cleaning', flush=True)\n"
            "    while True:\n        try:\n            time.sleep(60)\n        except SystemExit:\n"
            "            print('swallowed', flush=True)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        proc.send_signal(signal.SIGTERM)
        assert proc.stdout.readline().strip() == "cleaning"
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGTERM
