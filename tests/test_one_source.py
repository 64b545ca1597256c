"""A name the package spells in one place is spelled nowhere else in it."""
from __future__ import annotations

import ast
from pathlib import Path

from cpl_fast.config import RENAMED
from cpl_fast.runs import layout

PACKAGE = Path(__file__).resolve().parents[1] / "cpl_fast"
RUN_FOLDER_NAMES = {value for name, value in vars(layout).items()
                    if name.isupper() and isinstance(value, str) and "." in value}


def _string_constants(path: Path):
    """(line, text) of every string literal that is not a docstring."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                docstrings.add(id(first.value))
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            yield node.lineno, node.value


def _offenders(names: set[str], allowed: set[Path], root: Path = PACKAGE) -> list[str]:
    return [f"{path.relative_to(root.parent)}:{line}: {text!r}"
            for path in sorted(root.rglob("*.py")) if path not in allowed
            for line, text in _string_constants(path) if text in names]


def test_run_folder_file_names_are_spelled_only_in_runs_layout():
    assert {"config.yaml", "result.json", "state.json"} <= RUN_FOLDER_NAMES
    found = _offenders(RUN_FOLDER_NAMES, {PACKAGE / "runs" / "layout.py"})
    assert not found, "run-folder names belong in cpl_fast/runs/layout.py:\n" + "\n".join(found)


def test_old_setting_names_are_spelled_only_in_the_renamed_table():
    found = _offenders(set(RENAMED), {PACKAGE / "config" / "schema.py"})
    assert not found, "old setting names are read through config.RENAMED only:\n" + "\n".join(found)


def test_the_scan_finds_a_planted_name(tmp_path):
    planted = tmp_path / "cpl_fast"
    planted.mkdir()
    (planted / "bad.py").write_text('"""Docstring naming config.yaml is fine."""\nNAME = "config.yaml"\n')
    assert _offenders(RUN_FOLDER_NAMES, set(), planted) == ["cpl_fast/bad.py:2: 'config.yaml'"]
