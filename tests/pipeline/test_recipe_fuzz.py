"""Fuzzing recipe loading (issue 14, items 4 and 5): generated recipes, as Python mappings and as YAML text with
hostile values, bombs, deep nesting, duplicate keys and broken syntax. Every case must end in a valid Recipe or a
RecipeError whose message names the field or the line, never another exception, and within 10 seconds.

Seeded (derandomize=True), so CI sees the same cases on every run; at least 500 cases in all.
"""

from __future__ import annotations

import contextlib
import re
import signal
import tempfile
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from pipeline.recipe import MAX_RECIPE_BYTES, Recipe, RecipeError, load_recipe, parse_recipe

from conftest import BASE_RECIPE, merge

CASE_SECONDS = 10
CASES = {"n": 0}
SETTINGS = dict(derandomize=True, database=None, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


class CaseTimeout(Exception):
    pass


@contextlib.contextmanager
def bounded(seconds: float = CASE_SECONDS):
    """Fail the case (instead of hanging the suite) when it runs longer than `seconds`."""
    def _alarm(signum, frame):
        raise CaseTimeout(f"case ran over {seconds} s")

    old = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _models(ann: Any) -> list[type[BaseModel]]:
    out = []
    for a in (ann, *typing.get_args(ann)):
        if isinstance(a, type) and issubclass(a, BaseModel):
            out.append(a)
        out += [b for b in typing.get_args(a) if isinstance(b, type) and issubclass(b, BaseModel)]
    return out


def _leaves(model: type[BaseModel], prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every field path of the recipe schema, sections and leaves (a section gets arbitrary values too)."""
    out = []
    for name, field in model.model_fields.items():
        path = (*prefix, name)
        out.append(path)
        for sub in _models(field.annotation):
            out += _leaves(sub, path)
    return sorted(set(out))


PATHS = _leaves(Recipe)


def _nest(path: tuple[str, ...], value: Any) -> dict:
    out: Any = value
    for part in reversed(path):
        out = {part: out}
    return out


def _outcome_names_field(result: Recipe | RecipeError, path: tuple[str, ...]) -> None:
    if isinstance(result, Recipe):
        return
    msg = str(result)
    assert len(msg) < 20_000, "error messages stay bounded"
    prefixes = [".".join(path[:i]) for i in range(1, len(path) + 1)]
    assert any(re.search(rf"^  {re.escape(p)}[.:]", msg, re.M) for p in prefixes), msg[:2000]


def _run(fn, *args) -> Recipe | RecipeError:
    CASES["n"] += 1
    with bounded():
        try:
            return fn(*args)
        except RecipeError as err:
            return err


HUGE = [10**k for k in (6, 9, 12, 18, 30, 100)]
VALUES = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from(HUGE + [-x for x in HUGE] + [0, 1, -1, 2**31, 2**63, 2**64]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([float("nan"), float("inf"), float("-inf"), 1e308, -1e308, 5e-324, 0.5, 1.0]),
    st.text(max_size=40),
    st.sampled_from(["nan", "inf", "-inf", "NaN", "1e999", "demo\n", "x" * 100_000, "/dev/null", "memory://m",
                     "nosuch://x", "../escape", "\x00", "", " ", "auto", "full", "zero3", "s3://b/k"]),
    st.booleans(),
    st.none(),
    st.lists(st.one_of(st.integers(), st.text(max_size=8), st.floats()), max_size=5),
    st.dictionaries(st.text(max_size=8), st.one_of(st.integers(), st.text(max_size=8), st.floats()), max_size=4),
)


@settings(max_examples=320, **SETTINGS)
@given(path=st.sampled_from(PATHS), value=VALUES, path2=st.sampled_from(PATHS), value2=VALUES,
       two=st.booleans())
def test_fuzz_mapping_values(path, value, path2, value2, two):
    data = merge(BASE_RECIPE, _nest(path, value))
    if two and path2[: len(path)] != path and path[: len(path2)] != path2:
        data = merge(data, _nest(path2, value2))
    result = _run(parse_recipe, data)
    if isinstance(result, RecipeError) and two:
        msg = str(result)
        for p in (path, path2):
            prefixes = [".".join(p[:i]) for i in range(1, len(p) + 1)]
            if any(re.search(rf"^  {re.escape(x)}[.:]", msg, re.M) for x in prefixes):
                return
        raise AssertionError(msg[:2000])
    _outcome_names_field(result, path)


def _bomb(width: int, depth: int) -> str:
    lines = ["l0: &l0 [" + ", ".join(['"lol"'] * width) + "]"]
    for i in range(1, depth):
        lines.append(f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * width) + "]")
    return "\n".join(lines) + "\n"


SNIPPETS = st.one_of(
    st.integers(min_value=-(10**40), max_value=10**40).map(str),
    st.floats(allow_nan=False, allow_infinity=False).map(repr),
    st.sampled_from([
        ".nan", ".NaN", ".inf", "-.inf", "+.inf", "1e999", "-1e999", "9" * 5000, "0x" + "f" * 60, "0o777", "1_000",
        "1:20:30", "2026-13-45", "2026-01-01", "~", "null", "yes", "no", "on", "'demo\\n'", '"demo\\n"', "*nowhere",
        "&a x", "!!python/object/apply:os.system ['true']", "!!binary aGVsbG8=", "!custom x", "!!set {a, b}",
        "[1, 2", "{a: 1", "'unterminated", '"\\x"', "\t\tx", "- a\n- b", "|\n  block\n  text", "? [a]\n: b",
        "{[a]: b}", "[" * 40 + "]" * 40, "{a: " * 40 + "1" + "}" * 40, "[" * 3000, "x" * 100_000,
        "\"" + "y" * 50_000 + "\"", "!<" + "t" * 10_000 + "> v", "<<: {a: 1}", "\x07", "\ufeff1",
    ]),
    st.integers(min_value=1, max_value=200).map(lambda n: "[" * n + "1" + "]" * n),
    st.integers(min_value=1, max_value=200).map(lambda n: "{k: " * n + "1" + "}" * n),
    st.text(max_size=30).map(lambda t: yaml.safe_dump(t).strip().removesuffix("...").strip() or "''"),
)

MUTATIONS = ("value", "duplicate", "bomb", "recursive", "truncate", "garbage", "nest_block")


@settings(max_examples=260, **SETTINGS)
@given(path=st.sampled_from(PATHS), snippet=SNIPPETS, mutation=st.sampled_from(MUTATIONS),
       r=st.randoms(use_true_random=False), width=st.integers(1, 12), depth=st.integers(1, 12))
def test_fuzz_yaml_text(path, snippet, mutation, r, width, depth):
    text = yaml.safe_dump(merge(BASE_RECIPE, _nest(path, "__FUZZ__")), sort_keys=False)
    if mutation == "value":
        text = text.replace("__FUZZ__", snippet.replace("\n", "\n" + " " * 8))
    else:
        text = text.replace("__FUZZ__", "x")
    lines = text.splitlines()
    if mutation == "duplicate":
        i = r.randrange(len(lines))
        while not re.match(r"\s*[A-Za-z_]+:", lines[i]):
            i = (i + 1) % len(lines)
        key_line = lines[i]
        lines.insert(i + 1, re.match(r"(\s*[A-Za-z_]+:)", key_line).group(1) + " " + key_line.split(":", 1)[1].strip()
                     if key_line.split(":", 1)[1].strip() else key_line)
        # a duplicate of a block key ("train:") brings no value of its own: the next lines belong to the second one
    elif mutation == "bomb":
        lines = _bomb(width, depth).splitlines() + lines
        lines.append(f"route: {{gateway: {{student_model: *l{depth - 1}}}}}")
    elif mutation == "recursive":
        lines.append(r.choice(["loop: &x [*x]", "self: &m {k: *m}", "a: &a\n  b: *a"]))
    elif mutation == "truncate":
        cut = r.randrange(len(text))
        lines = text[:cut].splitlines()
    elif mutation == "garbage":
        i = r.randrange(len(lines) + 1)
        lines.insert(i, "".join(chr(r.randrange(1, 0x3000)) for _ in range(r.randrange(1, 30))))
    elif mutation == "nest_block":
        n = r.randrange(1, 120)
        lines += ["deep:"] + [" " * (2 * k) + f"k{k}:" for k in range(1, n)] + [" " * (2 * n) + "v: 1"]
    content = "\n".join(lines) + "\n"
    with tempfile.TemporaryDirectory() as tmp:
        p = Path(tmp) / "r.yaml"
        p.write_text(content, encoding="utf-8", errors="surrogatepass")
        result = _run(load_recipe, p)
    if isinstance(result, Recipe):
        return
    msg = str(result)
    assert len(msg) < 20_000, "error messages stay bounded"
    names_line = re.search(r"line \d+", msg) is not None
    names_field = re.search(r"^  \S+: ", msg, re.M) is not None or "the top level must be a mapping" in msg
    assert names_line or names_field, msg[:2000]
    if mutation == "duplicate":
        assert "duplicate key" in msg, msg[:2000]
    if mutation in ("bomb", "recursive"):
        assert "alias" in msg, msg[:2000]
    if mutation == "nest_block" and n > 31:
        assert "nested deeper than 32" in msg, msg[:2000]


@pytest.mark.parametrize("kind", ["comment", "value", "many_keys"])
def test_oversized_recipes_are_refused(tmp_path, kind):
    base = yaml.safe_dump(BASE_RECIPE)
    extra = {"comment": "# " + "x" * MAX_RECIPE_BYTES,
             "value": "license: " + "y" * MAX_RECIPE_BYTES,
             "many_keys": "".join(f"k{i}: {i}\n" for i in range(MAX_RECIPE_BYTES // 8))}[kind]
    p = tmp_path / "big.yaml"
    p.write_text(base + extra + "\n")
    CASES["n"] += 1
    with bounded(), pytest.raises(RecipeError, match="larger than 1 MiB"):
        load_recipe(p)


def test_enough_cases_ran():
    if CASES["n"] == 0:
        pytest.skip("run with the fuzz tests above")
    assert CASES["n"] >= 500, CASES
