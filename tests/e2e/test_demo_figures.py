"""One source for the demo's figures: bench/results/demo_seeds.json (written by bench/demo_seeds.py from real runs
of recipes/demo.yaml over seeds and thread counts). The README, docs/train.md and bench/RESULTS.md must quote its
ranges; the generated sections of the last two must be exactly what the file gives."""

from __future__ import annotations

import importlib.util
import json

import pytest

from conftest import ROOT

RESULTS = ROOT / "bench" / "results" / "demo_seeds.json"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("demo_seeds", ROOT / "bench" / "demo_seeds.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def result():
    if not RESULTS.is_file():
        pytest.skip("bench/results/demo_seeds.json is not there yet: run bench/demo_seeds.py")
    return json.loads(RESULTS.read_text())


def test_the_results_file_is_consistent(bench, result):
    runs = result["runs"]
    assert runs and result["ranges"] == bench.ranges(runs)
    assert len({(r["seed"], r["threads"]) for r in runs}) == len(runs)
    if result.get("complete"):
        assert len(runs) == len(result["seeds"]) * len(result["threads"])
    for r in runs:
        assert 0 <= r["ticket_triage_exact_match"] <= 100 and r["train_seconds"] > 0


@pytest.mark.parametrize("page", ["docs/train.md", "bench/RESULTS.md"])
def test_generated_sections_match_the_file(bench, result, page):
    text = (ROOT / page).read_text()
    assert text.count(bench.START) == 1 and text.count(bench.END) == 1, f"{page} lacks the generated section"
    assert bench.section(result) in text, f"{page} is out of date: run bench/demo_seeds.py --docs"


@pytest.mark.parametrize("page", ["README.md", "docs/train.md", "docs/route.md", "bench/RESULTS.md"])
def test_every_page_quotes_the_ranges(bench, result, page):
    text = (ROOT / page).read_text()
    missing = [f"{k}: {v}" for k, v in bench.headline(result).items() if v not in text]
    assert not missing, f"{page} does not quote {missing} from bench/results/demo_seeds.json"


def test_a_changed_figure_is_caught(bench, result):
    """The check is not vacuous: one run's figure changed gives other ranges and another section."""
    changed = json.loads(json.dumps(result))
    changed["runs"][0]["ticket_triage_exact_match"] = -1.0
    changed["ranges"] = bench.ranges(changed["runs"])
    assert bench.headline(changed) != bench.headline(result)
    assert bench.section(changed) not in (ROOT / "docs" / "train.md").read_text()
