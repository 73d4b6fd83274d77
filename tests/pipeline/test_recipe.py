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
    bad = {k: v for k, v in BASE_RECIPE.items() if k != "evaluate"}
    with pytest.raises(RecipeError, match="evaluate: required field is missing"):
        parse_recipe(bad)
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
