"""Enforces the package dependency DAG of docs/architecture-and-dataflow.md by parsing every import in the source tree."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ["actor_service", "buffer", "reward", "learner", "deploy", "problems", "common"]
PUBLIC = {"client", "schema"}
OPEN = {"problems", "common"}  # small libraries: any of their modules may be imported
# package -> packages it may import (only through their client/schema modules, except the OPEN ones);
# `common` may be imported by every package and imports none of them.
ALLOWED = {
    "buffer": {"common"},
    "reward": {"common"},
    "actor_service": {"buffer", "reward", "problems", "common"},
    "learner": {"buffer", "actor_service", "common"},
    "deploy": set(PACKAGES),
    "problems": {"buffer", "common"},
    "common": set(),
}
LIGHT = ("common", "problems")  # every module of these is light
HEAVY = ("torch", "vllm", "deepspeed", "transformers")
LIGHT_MODULES = ("schema.py", "client.py", "settings.py")


def imports_of(path: Path) -> list[tuple[str, int]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.module, node.lineno))
            out += [(f"{node.module}.{a.name}", node.lineno) for a in node.names]
    return out


def check(root: Path) -> list[str]:
    errors = []
    for pkg in PACKAGES:
        for path in sorted((root / pkg).rglob("*.py")):
            for name, line in imports_of(path):
                parts = name.split(".")
                target = parts[0]
                if target not in PACKAGES or target == pkg:
                    continue
                where = f"{path.relative_to(root)}:{line}"
                if target not in ALLOWED[pkg]:
                    errors.append(f"{where}: {pkg} must not import {target}")
                elif pkg != "deploy" and target not in OPEN and (len(parts) < 2 or parts[1] not in PUBLIC):
                    if not (len(parts) == 2 and parts[1] in PUBLIC):
                        errors.append(f"{where}: {pkg} imports {name}; only {target}.client/schema allowed")
    return errors


def heavy_in_light_modules(root: Path) -> list[str]:
    errors = []
    for pkg in PACKAGES:
        light = sorted((root / pkg).rglob("*.py")) if pkg in LIGHT else [root / pkg / n for n in LIGHT_MODULES]
        for path in light:
            if path.exists():
                for mod, line in imports_of(path):
                    if mod.split(".")[0] in HEAVY:
                        errors.append(f"{path.relative_to(root)}:{line} imports heavy module {mod}")
    return errors


def test_package_dependency_direction() -> None:
    assert check(REPO) == []


def test_light_modules_import_no_heavy_stack() -> None:
    assert heavy_in_light_modules(REPO) == []


def test_checker_catches_a_violation(tmp_path: Path) -> None:
    for pkg in PACKAGES:
        (tmp_path / pkg).mkdir()
        (tmp_path / pkg / "__init__.py").write_text("")
    (tmp_path / "buffer" / "x.py").write_text("import reward.schema\n")
    (tmp_path / "actor_service" / "y.py").write_text("from buffer.table import ReplayTable\n")
    (tmp_path / "learner" / "z.py").write_text("from buffer.client import ReplayTable\n")
    (tmp_path / "reward" / "client.py").write_text("import torch\n")
    errors = check(tmp_path)
    assert any("buffer must not import reward" in e for e in errors)
    assert any("only buffer.client/schema allowed" in e for e in errors)
    assert not any("z.py" in e for e in errors)
    assert heavy_in_light_modules(tmp_path) == ["reward/client.py:1 imports heavy module torch"]


def test_common_is_imported_by_all_and_imports_none(tmp_path: Path) -> None:
    for pkg in PACKAGES:
        (tmp_path / pkg).mkdir()
    (tmp_path / "reward" / "a.py").write_text("from common.settings import RunTomlSettings\n")
    (tmp_path / "actor_service" / "b.py").write_text("from problems.toy import toy_splits\n")
    (tmp_path / "common" / "c.py").write_text("from buffer.schema import Prompt\nimport vllm\n")
    (tmp_path / "learner" / "d.py").write_text("from problems.files import load_dataset\n")
    assert sorted(set(check(tmp_path))) == [
        "common/c.py:1: common must not import buffer", "learner/d.py:1: learner must not import problems"
    ]
    assert heavy_in_light_modules(tmp_path) == ["common/c.py:2 imports heavy module vllm"]
