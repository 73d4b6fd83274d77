from pathlib import Path

import pytest
import yaml

from pipeline.cli import main as cli
from pipeline.recipe import RecipeError, load_recipe, parse_recipe

from conftest import BASE_RECIPE, ROOT, merge

SHIPPED = sorted((ROOT / "recipes").glob("*.yaml"))


def test_recipes_are_shipped():
    assert any(p.name == "demo.yaml" for p in SHIPPED)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_recipe_validates(path: Path):
    recipe = load_recipe(path)
    assert recipe.name
    first = path.read_text().splitlines()[0]
    assert first.startswith("#"), "each recipe starts with a header comment showing how to run it"


def test_bad_value_names_field_value_and_allowed():
    with pytest.raises(RecipeError) as err:
        parse_recipe(merge(BASE_RECIPE, {"train": {"method": "dpo"}}), "r.yaml")
    msg = str(err.value)
    assert "r.yaml" in msg and "train.method" in msg and "'dpo'" in msg
    assert "'full', 'lora' or 'qlora'" in msg


def test_unknown_field_suggests_the_right_one():
    bad = merge(BASE_RECIPE, {"train": {"learnin_rate": 0.1}})
    with pytest.raises(RecipeError) as err:
        parse_recipe(bad)
    assert "train.learnin_rate" in str(err.value) and "Did you mean 'learning_rate'" in str(err.value)


def test_missing_and_inconsistent_fields():
    bad = {k: v for k, v in BASE_RECIPE.items() if k != "harvest"}  # train/evaluate/export may be left out
    with pytest.raises(RecipeError, match="harvest: required field is missing"):
        parse_recipe(bad)
    with pytest.raises(RecipeError, match="teacher_price: required field is missing"):
        parse_recipe(merge(BASE_RECIPE, {"evaluate": {"teacher_price": None}}) | {"evaluate": {"max_new_tokens": 8}})
    both = merge(BASE_RECIPE, {"train": {"student": {"checkpoint": "some/model"}}})
    with pytest.raises(RecipeError, match="exactly one of 'checkpoint' or 'from_config'"):
        parse_recipe(both)
    with pytest.raises(RecipeError, match="num_heads"):
        parse_recipe(merge(BASE_RECIPE, {"train": {"student": {"from_config": {"num_heads": 5}}}}))
    with pytest.raises(RecipeError, match="val_fraction"):
        parse_recipe(merge(BASE_RECIPE, {"curate": {"split": {"val_fraction": 0.5, "test_fraction": 0.5}}}))


@pytest.mark.parametrize("name", ["../escape", "a/b", "", ".hidden"])
def test_names_used_as_paths_are_validated(name):
    with pytest.raises(RecipeError, match="name"):
        parse_recipe(merge(BASE_RECIPE, {"name": name}))
    with pytest.raises(RecipeError, match="export.model_name"):
        parse_recipe(merge(BASE_RECIPE, {"export": {"model_name": name}}))


def test_invalid_recipe_fails_before_any_work(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(merge(BASE_RECIPE, {"train": {"batch_size": 0}})))
    assert cli(["run", "r.yaml"]) == 2
    err = capsys.readouterr().err
    assert "train.batch_size" in err and "greater than 0" in err
    assert not (tmp_path / "runs").exists()
    (tmp_path / "broken.yaml").write_text("name: [unclosed\n")
    assert cli(["validate", "broken.yaml"]) == 2
    assert "not valid YAML" in capsys.readouterr().err
    assert cli(["validate", "missing.yaml"]) == 2
    assert "recipe not found" in capsys.readouterr().err


# --- hostile recipes (issue 14, items 4 and 5) ---------------------------------------------------------------

BOMB = """\
a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]
i: &i [*h,*h,*h,*h,*h,*h,*h,*h,*h]
"""


def _write(tmp_path: Path, text: str, name: str = "r.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_billion_laughs_is_refused_fast_by_validate_and_run(tmp_path, monkeypatch, capsys):
    import time

    monkeypatch.chdir(tmp_path)
    text = yaml.safe_dump(BASE_RECIPE) + BOMB + "route: {gateway: {student_model: *i}}\n"
    _write(tmp_path, text)
    t0 = time.monotonic()
    with pytest.raises(RecipeError, match=r"alias.*line \d+"):
        load_recipe(tmp_path / "r.yaml")
    for cmd in ("validate", "run"):
        assert cli([cmd, "r.yaml"]) == 2
        assert "alias" in capsys.readouterr().err
    assert time.monotonic() - t0 < 5
    assert not (tmp_path / "runs").exists()


def test_recursive_alias_is_a_clear_error(tmp_path):
    p = _write(tmp_path, yaml.safe_dump(BASE_RECIPE) + "loop: &x [*x]\nself: &m {k: *m}\n")
    with pytest.raises(RecipeError, match="alias"):
        load_recipe(p)


@pytest.mark.parametrize("text, key, line", [
    ("name: a\nname: b\n", "name", 2),
    ("train:\n  batch_size: 1\n  method: full\n  batch_size: 2\n", "batch_size", 4),
    ("export: {model_name: x, model_name: y}\n", "model_name", 1),
])
def test_duplicate_keys_are_refused_with_key_and_line(tmp_path, text, key, line):
    p = _write(tmp_path, text + yaml.safe_dump({k: v for k, v in BASE_RECIPE.items() if k not in text}))
    with pytest.raises(RecipeError, match=rf"duplicate key '{key}'.*line {line}"):
        load_recipe(p)


def test_recipe_file_size_is_capped(tmp_path):
    import time

    big = yaml.safe_dump(BASE_RECIPE) + "# " + "x" * (2 * 1024 * 1024) + "\n"
    t0 = time.monotonic()
    with pytest.raises(RecipeError, match=r"larger than 1 MiB"):
        load_recipe(_write(tmp_path, big))
    assert time.monotonic() - t0 < 2


@pytest.mark.parametrize("text", ["[" * 5000, "a:\n" + "".join("  " * i + f"k{i}:\n" for i in range(1, 60)),
                                  "x: " + "{a: " * 3000])
def test_deep_nesting_is_a_clear_error(tmp_path, text):
    with pytest.raises(RecipeError, match=r"nested deeper than 32.*line \d+"):
        load_recipe(_write(tmp_path, text))


def test_deep_python_structure_is_a_clear_error():
    deep: dict = {}
    cur = deep
    for _ in range(2000):
        cur["k"] = {}
        cur = cur["k"]
    with pytest.raises(RecipeError, match="nested deeper than 32"):
        parse_recipe(merge(BASE_RECIPE, {"harvest": {"regenerate": {"endpoint": "http://x", "model": "m",
                                                                      "params": deep}}}))


def test_errors_never_echo_an_unbounded_value(tmp_path):
    huge = "x" * 200_000
    with pytest.raises(RecipeError) as err:
        parse_recipe(merge(BASE_RECIPE, {"name": huge, "train": {"method": huge}, "curate": {"pii": {"entities": [huge]}},
                                         "export": {huge: 1}}))
    msg = str(err.value)
    assert "name" in msg and "train.method" in msg and "curate.pii.entities" in msg
    assert len(msg) < 4000 and "..." in msg
    p = _write(tmp_path, "name: !<" + "t" * 100_000 + "> x\n")
    with pytest.raises(RecipeError) as err:
        load_recipe(p)
    assert len(str(err.value)) < 2000


def test_yaml_values_python_cannot_build_are_clear_errors(tmp_path):
    for text in ("seed: " + "9" * 6000 + "\n", "name: 2026-13-45\n"):
        with pytest.raises(RecipeError, match=r"line 1"):
            load_recipe(_write(tmp_path, text))


@pytest.mark.parametrize("over, field", [
    ({"train": {"student": {"from_config": {"num_layers": 10**30}}}}, "train.student.from_config.num_layers"),
    ({"train": {"student": {"from_config": {"hidden_size": 10**9, "num_heads": 4}}}}, "hidden_size"),
    ({"train": {"student": {"from_config": {"vocab_size": 10**12}}}}, "vocab_size"),
    ({"train": {"epochs": 1e12}}, "train.epochs"),
    ({"train": {"batch_size": 10**9}}, "train.batch_size"),
    ({"train": {"max_length": 10**12}}, "train.max_length"),
    ({"train": {"learning_rate": 1e6}}, "train.learning_rate"),
    ({"train": {"lora": {"r": 10**8}}}, "train.lora.r"),
    ({"evaluate": {"teacher_price": {"input_per_mtok": 1e30, "output_per_mtok": 1}}}, "input_per_mtok"),
    ({"evaluate": {"student_price": {"usd_per_hour": 1e300}}}, "usd_per_hour"),
    ({"evaluate": {"max_new_tokens": 10**12}}, "evaluate.max_new_tokens"),
    ({"evaluate": {"bootstrap": 10**12}}, "evaluate.bootstrap"),
    ({"curate": {"lengths": {"max_total_tokens": 10**15}}}, "curate.lengths.max_total_tokens"),
    ({"curate": {"balance": {"caps": {"f": 10**15}}}}, "curate.balance.caps"),
    ({"harvest": {"batch_size": 10**12}}, "harvest.batch_size"),
    ({"route": {"bootstrap": 10**12}}, "route.bootstrap"),
    ({"export": {"calibration_samples": 10**12}}, "export.calibration_samples"),
    ({"seed": 10**30}, "seed"),
])
def test_numbers_have_upper_bounds(over, field):
    with pytest.raises(RecipeError, match=field):
        parse_recipe(merge(BASE_RECIPE, over))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf"), "nan", "inf"])
@pytest.mark.parametrize("over, field", [
    ({"curate": {"near_dedup": {"threshold": "X"}}}, "curate.near_dedup.threshold"),
    ({"curate": {"feedback": {"metric": "m", "min_value": "X"}}}, "curate.feedback.min_value"),
    ({"evaluate": {"teacher_price": {"input_per_mtok": "X", "output_per_mtok": 1}}}, "input_per_mtok"),
    ({"evaluate": {"student_price": {"usd_per_hour": "X"}}}, "usd_per_hour"),
    ({"train": {"epochs": "X"}}, "train.epochs"),
    ({"train": {"weight_decay": "X"}}, "train.weight_decay"),
    ({"train": {"early_stopping_threshold": "X"}}, "train.early_stopping_threshold"),
    ({"export": {"format_points_lost": {"bnb-nf4": "X"}}}, "export"),
    ({"evaluate": {"gate": {"functions": {"faq": "X"}}}}, "evaluate.gate.functions"),
    ({"curate": {"balance": {"weights": {"faq": "X"}}}}, "curate.balance.weights"),
    ({"harvest": {"regenerate": {"endpoint": "http://x", "model": "m", "params": {"temperature": "X"}}}},
     "harvest.regenerate.params"),
])
def test_non_finite_numbers_are_refused(over, field, bad):
    import json

    if isinstance(bad, str) and field.endswith("params"):
        return  # free-form request parameters: the string "nan" is a string, sent as such

    over = json.loads(json.dumps(over).replace('"X"', json.dumps(bad) if isinstance(bad, str) else "NaN"))
    if not isinstance(bad, str):
        over = yaml.safe_load(yaml.safe_dump(over).replace(".nan", {"nan": ".nan", "inf": ".inf", "-inf": "-.inf"}[
            str(bad)]))
    with pytest.raises(RecipeError, match=field):
        parse_recipe(merge(BASE_RECIPE, over))


@pytest.mark.parametrize("name", ["demo\n", "demo\r", " demo", "demo "])
def test_names_refuse_trailing_newlines(name):
    with pytest.raises(RecipeError, match="name"):
        parse_recipe(merge(BASE_RECIPE, {"name": name}))
    with pytest.raises(RecipeError, match="export.model_name"):
        parse_recipe(merge(BASE_RECIPE, {"export": {"model_name": name}}))


def test_run_dir_must_be_a_directory(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("x")
    for bad in ("/dev/null", "afile", "afile/sub"):
        with pytest.raises(RecipeError, match="run_dir.*not a directory"):
            parse_recipe(merge(BASE_RECIPE, {"run_dir": bad}))
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "t").write_text("x")
    with pytest.raises(RecipeError, match="runs/t.*not a directory"):
        parse_recipe(BASE_RECIPE)
    _write(tmp_path, yaml.safe_dump(merge(BASE_RECIPE, {"run_dir": "/dev/null"})))
    assert cli(["validate", "r.yaml"]) == 2
    assert "run_dir" in capsys.readouterr().err


def test_store_url_is_checked_at_validate_time(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("x")
    for bad in ("nosuchproto://bucket/models", "afile", "/dev/null", "", "file:///dev/null"):
        with pytest.raises(RecipeError, match="export.store"):
            parse_recipe(merge(BASE_RECIPE, {"export": {"store": bad}}))
    for good in ("store", "memory://models", f"file://{tmp_path}/models", str(tmp_path / "new" / "store")):
        assert parse_recipe(merge(BASE_RECIPE, {"export": {"store": good}})).export.store == good
