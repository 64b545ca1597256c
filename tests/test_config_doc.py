"""docs/CONFIG.md is generated from the defaults: every setting documented, the file never stale."""
from __future__ import annotations

from pathlib import Path

from cpl_fast.config import DEFAULTS, FREE_MAPPINGS
from cpl_fast.config.doc import descriptions, main, render

ROOT = Path(__file__).resolve().parents[1]


def _leaves(mapping, prefix=""):
    for key, value in mapping.items():
        name = prefix + key
        if isinstance(value, dict) and value and name not in FREE_MAPPINGS:
            yield from _leaves(value, name + ".")
        else:
            yield name


def test_every_setting_has_a_meaning():
    docs = descriptions()
    missing = [key for key in _leaves(DEFAULTS) if not docs.get(key)]
    assert not missing, f"settings without a comment in DEFAULTS (cpl_fast/config/schema.py): {missing}"


def test_config_md_is_current():
    text = (ROOT / "docs" / "CONFIG.md").read_text(encoding="utf-8")
    assert text == render(), "docs/CONFIG.md is stale: python -m cpl_fast.config.doc docs/CONFIG.md"
    for key in _leaves(DEFAULTS):
        assert f"| `{key}` |" in text


def test_check_mode(tmp_path, capsys):
    stale = tmp_path / "CONFIG.md"
    stale.write_text("old\n")
    assert main(["--check", str(stale)]) == 1
    assert "stale" in capsys.readouterr().err
    assert main([str(stale)]) == 0 and main(["--check", str(stale)]) == 0

