"""The six rooms and the rule between them: a room imports `pipeline` and the public modules of earlier rooms,
never a later room and never another room's stage.py; `pipeline` imports no room (the CLI, the top layer, aside).
Also: no function over 80 lines in the four packages."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from pipeline.stages import PIPELINE

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("pipeline", "curation", "training", "export")
ROOMS = [module.rsplit(".", 1)[0] for _, module in PIPELINE]  # curation.harvest, ..., export.export
TOP_LAYER = {"pipeline.cli", "pipeline.cli_serve"}  # the commands: may import any room's public modules (lazily)
SHIMS = {"export.router": "export.route.router"}  # earlier import paths, each re-exporting one public module
MAX_LINES = 80


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(tree: ast.AST, module: str, is_package: bool) -> list[tuple[int, str]]:
    """(line, imported module) for every import: `from a import b` gives a and a.b (b may be a module), relative
    imports are resolved against the module, and importlib.import_module / __import__ of a literal name count."""
    out = []
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - (node.level - 1)] if node.level else []
            target = ".".join([*base, *([node.module] if node.module else [])])
            out.append((node.lineno, target))
            out += [(node.lineno, f"{target}.{a.name}") for a in node.names]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
            if name in ("import_module", "__import__"):
                out.append((node.lineno, node.args[0].value))
    return out


def _room(module: str) -> int | None:
    for i, room in enumerate(ROOMS):
        if module == room or module.startswith(room + "."):
            return i
    return None


def violations(root: Path) -> list[str]:
    """Every import in the four packages under root that breaks the rule, as 'file:line: why'."""
    found: dict[tuple[Path, int], str] = {}  # one per import statement
    for pkg in PACKAGES:
        for path in sorted((root / pkg).rglob("*.py")):
            module = _module_name(path, root)
            mine = _room(module)
            for line, target in _imports(ast.parse(path.read_text()), module, path.name == "__init__.py"):
                theirs = _room(target)
                shim_ok = module in SHIMS and (target == SHIMS[module] or target.startswith(SHIMS[module] + "."))
                if theirs is None or theirs == mine or module in TOP_LAYER or shim_ok:
                    continue
                where = f"{path.relative_to(root)}:{line}: imports {target}"
                if mine is None:
                    found.setdefault((path, line), f"{where}, a room, from below the rooms")
                elif theirs > mine:
                    found.setdefault((path, line), f"{where}, a later room")
                elif target == f"{ROOMS[theirs]}.stage" or target.startswith(f"{ROOMS[theirs]}.stage."):
                    found.setdefault((path, line), f"{where}, another room's stage.py")
    return list(found.values())


def test_rooms_import_only_pipeline_and_earlier_public_modules():
    assert violations(ROOT) == []


@pytest.mark.parametrize(("file", "line", "why"), [
    ("training/train/bad.py", "from export.route.router import Router", "a later room"),
    ("export/route/bad.py", "from training.evaluate.stage import run", "another room's stage.py"),
    ("export/route/bad.py", "from training.evaluate import stage", "another room's stage.py"),
    ("pipeline/bad.py", "import curation.curate.dedup", "from below the rooms"),
    ("training/train/bad.py", "from ..evaluate import stage", "a later room"),
    ("curation/harvest/bad.py", "from ..curate.dedup import x", "a later room"),
    ("export/export/bad.py", "from ...training.evaluate.stage import run", "another room's stage.py"),
    ("training/train/bad.py", "importlib.import_module('export.route.router')", "a later room"),
    ("training/train/bad.py", "__import__('export.route.router')", "a later room"),
    ("export/router.py", "from training.evaluate.stage import run", "from below the rooms"),
])
def test_a_planted_violation_is_found(tmp_path, file, line, why):
    for pkg in PACKAGES:
        (tmp_path / pkg).mkdir()
    (tmp_path / file).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / file).write_text(line + "\n")
    (tmp_path / "export/route/ok.py").parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / "export/route/ok.py").write_text("from training.evaluate.engine import evaluate_model\n"
                                                 "from pipeline.store import publish\n")
    found = violations(tmp_path)
    assert len(found) == 1 and found[0].startswith(f"{file}:1: ") and why in found[0]


def long_functions(root: Path) -> list[str]:
    out = []
    for pkg in PACKAGES:
        for path in sorted((root / pkg).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    n = node.end_lineno - node.lineno + 1
                    if n > MAX_LINES:
                        out.append(f"{path.relative_to(root)}:{node.lineno} {node.name}: {n} lines")
    return out


def test_no_function_is_over_80_lines():
    assert long_functions(ROOT) == []


def test_every_room_has_a_stage_with_run_and_reads():
    import importlib

    for name, module in PIPELINE:
        m = importlib.import_module(module)
        assert callable(m.run) and isinstance(m.READS, tuple), name
        assert (ROOT / module.replace(".", "/")).with_suffix(".py").parent.name == name  # room named after it
