"""The README's Python examples run, against a finished run laid out as the demo's (runs/demo, store/demo-student).

A block preceded by the line `<!-- not tested: REASON -->` is skipped (e.g. one that needs a GPU or a server).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

BLOCK = re.compile(r"(<!-- not tested: [^>]*-->\s*)?```python\n(.*?)```", re.S)


def python_blocks(path: Path) -> list[tuple[int, str]]:
    text = path.read_text()
    return [(text[: m.start()].count("\n") + 1, m.group(2)) for m in BLOCK.finditer(text) if not m.group(1)]


BLOCKS = python_blocks(ROOT / "README.md")


def test_the_readme_has_examples():
    assert len(BLOCKS) >= 2


@pytest.fixture(scope="module")
def demo_layout(e2e, tmp_path_factory) -> Path:
    """A folder where runs/demo and store/demo-student are the session's end-to-end run."""
    root = tmp_path_factory.mktemp("readme")
    (root / "runs").mkdir()
    (root / "store").mkdir()
    (root / "runs" / "demo").symlink_to(e2e / "runs" / "t")
    (root / "store" / "demo-student").symlink_to(e2e / "store" / "tiny-student")
    return root


@pytest.mark.parametrize("line,code", BLOCKS, ids=[f"README.md:{n}" for n, _ in BLOCKS])
def test_readme_python_example_runs(demo_layout, line, code):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code], cwd=demo_layout, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, f"README.md line {line} failed:\n{done.stderr[-3000:]}"


def test_readme_recipe_snippets_validate():
    """Each YAML block of the README is a valid part of a recipe."""
    import yaml

    from pipeline.recipe import parse_recipe

    from conftest import BASE_RECIPE, merge

    blocks = re.findall(r"```yaml\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert blocks
    for block in blocks:
        parse_recipe(merge(BASE_RECIPE, yaml.safe_load(block)), "README.md")
