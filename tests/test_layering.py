"""The packages of cpl_fast form layers (docs/ARCHITECTURE.md): a module imports only from its own
package and from packages of lower layers, so training, evaluation and export never import each
other and nothing below them imports them. Imports inside functions and TYPE_CHECKING blocks count."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "cpl_fast"

# Package (first name under cpl_fast) -> layer. Same layer, different package: no imports either way.
LAYERS = {
    "_C": -1,  # the compiled extension: imports nothing of the package
    "_extension": 0, "_lazy": 0, "atomic_files": 0, "_deprecated": 0, "devices": 0, "tables": 0,
    "memory": 1, "kernels": 1,
    "ops": 2,
    "models": 3, "data": 3,
    "losses": 4,
    "config": 5, "configs": 5, "inference": 5, "metrics": 5, "figures": 5,
    "runs": 6,
    "train": 7, "eval": 7, "export": 7,
    "cli": 8,
}


def _package(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "cpl_fast" and len(parts) > 1 else None


def _imports(path: Path) -> list[tuple[int, str]]:
    module = ".".join(path.relative_to(ROOT.parent).with_suffix("").parts)
    package_parts = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package_parts[:len(package_parts) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            # ``from cpl_fast import figures`` imports the module cpl_fast.figures.
            names = [f"{target}.{a.name}" for a in node.names] if target == "cpl_fast" else [target]
            out += [(node.lineno, name) for name in names]
    return out


def _violations() -> list[str]:
    from cpl_fast._deprecated import MOVED

    found = []
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT)
        if ".".join(("cpl_fast", *rel.with_suffix("").parts)) in MOVED:
            continue  # an old name kept for one release: it forwards to the new module
        own = rel.parts[0] if len(rel.parts) > 1 else rel.stem
        if own == "__init__":
            continue
        if own not in LAYERS:
            found.append(f"{rel}: package {own!r} has no layer in LAYERS (add it here and to "
                         "docs/ARCHITECTURE.md)")
            continue
        for line, target in _imports(path):
            other = _package(target)
            if other is None or other == own or other == "__init__":
                continue
            if other not in LAYERS:
                found.append(f"{rel}:{line}: imports {target}, whose package has no layer")
            elif LAYERS[other] >= LAYERS[own]:
                kind = "a sibling" if LAYERS[other] == LAYERS[own] else "a higher layer"
                found.append(f"{rel}:{line}: {own} (layer {LAYERS[own]}) imports {target}, {kind} "
                             f"({other}, layer {LAYERS[other]})")
    return found


def test_no_module_imports_upward_or_sideways():
    violations = _violations()
    assert not violations, "layering broken:\n" + "\n".join(violations)


def test_the_check_sees_an_upward_import(tmp_path, monkeypatch):
    # The scan itself must catch an offender, including one hidden in a function body.
    fake = tmp_path / "cpl_fast"
    (fake / "models").mkdir(parents=True)
    (fake / "models" / "bad.py").write_text("def f():\n    from cpl_fast.train.trainer import Trainer\n")
    (fake / "train").mkdir()
    (fake / "train" / "ok.py").write_text("from cpl_fast.models import build_model\nfrom . import ok\n")
    (fake / "eval").mkdir()
    (fake / "eval" / "side.py").write_text("from cpl_fast import train\n")
    monkeypatch.setitem(globals(), "ROOT", fake)
    found = _violations()
    assert any("models/bad.py:2" in v and "higher layer" in v for v in found), found
    assert any("eval/side.py:1" in v and "sibling" in v for v in found), found
    assert not any("train/ok.py" in v for v in found), found


@pytest.mark.parametrize("old", sorted(__import__("cpl_fast._deprecated", fromlist=["MOVED"]).MOVED))
def test_moved_module_names_still_import_with_a_warning(old):
    import importlib
    import sys

    from cpl_fast._deprecated import MOVED

    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match="moved to"):
        module = importlib.import_module(old)
    assert module is importlib.import_module(MOVED[old])


def test_every_package_is_in_the_distribution():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT.parent / "pyproject.toml").read_text(encoding="utf-8"))
    listed = set(project["tool"]["setuptools"]["packages"])
    packages = {".".join(p.parent.relative_to(ROOT.parent).parts) for p in ROOT.rglob("__init__.py")}
    assert packages <= listed, f"missing from [tool.setuptools] packages: {sorted(packages - listed)}"


def test_the_commands_that_left_cli_eval_keep_their_old_names_with_a_warning():
    import importlib
    import subprocess
    import sys

    from cpl_fast.cli import analyze, restore

    with pytest.warns(DeprecationWarning, match=r"restore_main has moved to cpl_fast\.cli\.restore\.main"):
        from cpl_fast.cli.eval import restore_main
    with pytest.warns(DeprecationWarning, match=r"analyze_main has moved to cpl_fast\.cli\.analyze\.main"):
        from cpl_fast.cli.eval import analyze_main
    assert restore_main is restore.main and analyze_main is analyze.main
    sys.modules.pop("cpl_fast.eval.cli", None)
    with pytest.warns(DeprecationWarning, match="moved to"):
        old = importlib.import_module("cpl_fast.eval.cli")
    with pytest.warns(DeprecationWarning, match="has moved to"):
        assert old.restore_main is restore.main and old.analyze_main is analyze.main
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        old.nothing  # noqa: B018 - the attribute access is the test
    # cpl-eval itself does not load the other two commands.
    code = ("import sys, cpl_fast.cli.eval\n"
            "print(sorted(m for m in ('cpl_fast.cli.restore', 'cpl_fast.cli.analyze') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT.parent, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
