"""The README's Python examples run, against a finished run laid out as the demo's (runs/demo, store/demo-student).

A block preceded by the line `<!-- not tested: REASON -->` is skipped (e.g. one that needs a GPU or a server).
"""

from __future__ import annotations

import json
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


def _faq_record(run: Path) -> tuple[str, str, str]:
    """(function, last user turn, evaluate's prediction) of the first product_faq record evaluate answered."""
    import pyarrow.parquet as pq

    preds = {r["id"]: r for r in pq.read_table(run / "evaluate" / "predictions.parquet").to_pylist()}
    for rec in pq.read_table(run / "curate" / "test.parquet").to_pylist():
        if rec["id"] in preds and rec["function"] == "product_faq":
            user = [m["content"] for m in rec["messages"] if m["role"] == "user"]
            return rec["function"], user[-1], preds[rec["id"]]["prediction"]
    raise AssertionError("no product_faq record among evaluate's predictions")


def test_readme_transformers_example_prints_the_evaluated_answer(demo_layout):
    """Issue 15, item 5: the README's transformers snippet, asked a held-out request, prints exactly the answer
    evaluate scored for it (system prompt, greedy, evaluated max_new_tokens, only the new tokens decoded)."""
    code = next(c for _, c in BLOCKS if "question = " in c and "generate(" in c)
    function, question, want = _faq_record(demo_layout / "runs" / "demo")
    code, n = re.subn(r'^function, question = .*$', f"function, question = {function!r}, {question!r}", code,
                      flags=re.M)
    assert n == 1
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code], cwd=demo_layout, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert want and done.stdout.endswith(want + "\n"), (done.stdout[-500:], want)


def test_model_card_transformers_example_prints_the_evaluated_answer(demo_layout):
    """The same for the published model card's snippet, run in the published version's folder."""
    store = demo_layout / "store" / "demo-student"
    folder = store / (store / "latest").read_text().strip()
    card = (folder / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    function, question, want = _faq_record(demo_layout / "runs" / "demo")
    prompts = json.loads((folder / "generation_config.json").read_text())["distill_system_prompts"]
    assert prompts[function] in card  # the card shows every function's system prompt
    code = code.replace('path = "DEST"', f"path = {str(folder)!r}").replace('"YOUR REQUEST"', repr(question))
    code = re.sub(r'"content": (\'.*?\'|".*?")\},\n', lambda m: f'"content": {prompts[function]!r}}},\n', code,
                  count=1)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.endswith(want + "\n"), (done.stdout[-500:], want)
