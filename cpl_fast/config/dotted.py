"""Dotted setting names (``optim.lr``) over nested configs: parse, set, merge, flatten, all checked
against the schema so a misspelt setting is an error naming it, never a silent default."""
from __future__ import annotations

import copy
import warnings
from collections.abc import Mapping
from typing import Any

import yaml

from cpl_fast.config.files import yaml_load
from cpl_fast.config.schema import DEFAULTS, FREE_MAPPINGS, RENAMED, ConfigError


def current_name(key: str) -> str:
    """The setting's name today: an old name (``RENAMED``) warns and gives the new one."""
    new = RENAMED.get(key)
    if new is None:
        return key
    warnings.warn(f"setting {key} is now called {new}; the old name will be removed in a later release",
                  DeprecationWarning, stacklevel=3)
    return new


def parse_override(text: str) -> tuple[str, Any]:
    """``"optim.lr=1e-3"`` -> ``("optim.lr", 0.001)``; the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"bad override {text!r}: expected key=value (e.g. optim.lr=1e-3)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")) or any(c.isspace() for c in key):
        raise ConfigError(f"bad override {text!r}: the key must be dotted names like optim.lr")
    try:
        value = yaml_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"bad override {text!r}: the value is not valid YAML ({exc})") from exc
    return key, value


def set_dotted(config: dict[str, Any], key: str, value: Any) -> None:
    """``config["a"]["b"] = value`` for ``key = "a.b"`` (checked against ``DEFAULTS``; old names read)."""
    key = current_name(key)
    parts = key.split(".")
    node, schema, path = config, DEFAULTS, ""
    for i, part in enumerate(parts[:-1]):
        path = f"{path}.{part}" if path else part
        if path in FREE_MAPPINGS:
            node = node.setdefault(part, {})
            # Below a free mapping, nested names are created as needed (baselines.dense.model.preset).
            for sub in parts[i + 1:-1]:
                node = node.setdefault(sub, {})
                if not isinstance(node, dict):
                    raise ConfigError(f"cannot set {key}: {sub} is not a mapping")
            node[parts[-1]] = value
            return
        if not isinstance(schema, Mapping) or part not in schema or not isinstance(schema[part], Mapping):
            raise ConfigError(f"unknown setting {key!r}: {path!r} is not a section "
                              f"(sections: {_sections(schema)})")
        schema = schema[part]
        node = node.setdefault(part, {})
    last = parts[-1]
    full = f"{path}.{last}" if path else last
    if not isinstance(schema, Mapping) or last not in schema:
        raise ConfigError(f"unknown setting {full!r}{_suggest(last, schema)}")
    node[last] = value


def _sections(schema: Mapping[str, Any]) -> str:
    return ", ".join(k for k, v in schema.items() if isinstance(v, Mapping))


def _suggest(name: str, schema: Any) -> str:
    import difflib

    if not isinstance(schema, Mapping):
        return ""
    close = difflib.get_close_matches(name, list(schema), n=1)
    return f" (did you mean {close[0]!r}?)" if close else f"; known here: {', '.join(schema)}"


def merge(base: Mapping[str, Any], update: Mapping[str, Any], path: str = "") -> dict[str, Any]:
    """Deep merge ``update`` into a copy of ``base``; keys outside ``DEFAULTS`` raise ConfigError.

    An old name of a setting (``RENAMED``) is read as the new one; both in one mapping is an error.
    """
    out = copy.deepcopy(dict(base))
    schema = _schema_at(path)
    for key, value in update.items():
        full = f"{path}.{key}" if path else str(key)
        if path in FREE_MAPPINGS:
            out[key] = copy.deepcopy(value)
            continue
        if full in RENAMED:
            new = RENAMED[full]
            if new.rsplit(".", 1)[-1] in update:
                raise ConfigError(f"{full} and {new} are both set; {full} is the old name of {new}: keep one")
            full = current_name(full)
            key = full.rsplit(".", 1)[-1]
        if key not in schema:
            raise ConfigError(f"unknown setting {full!r}{_suggest(str(key), schema)}")
        if isinstance(schema[key], Mapping) or full in FREE_MAPPINGS:
            if not isinstance(value, Mapping):
                raise ConfigError(f"setting {full!r} must be a mapping, got {value!r}")
            out[key] = merge(out.get(key, {}), value, full)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _schema_at(path: str) -> Mapping[str, Any]:
    node: Any = DEFAULTS
    for part in path.split(".") if path else []:
        node = node[part] if isinstance(node, Mapping) and part in node else {}
    return node if isinstance(node, Mapping) else {}


def get(config: Mapping[str, Any], key: str) -> Any:
    """``config["a"]["b"]`` for ``"a.b"``."""
    node: Any = config
    for part in key.split("."):
        node = node[part]
    return node


def flat_dotted(dotted: Mapping[str, Any]) -> dict[str, Any]:
    """Flatten nested baseline settings: ``{"model": {"preset": "x"}}`` -> ``{"model.preset": "x"}``.

    Free mappings (``model.overrides``) are kept whole.
    """
    out: dict[str, Any] = {}

    def walk(node: Mapping[str, Any], prefix: str) -> None:
        for key, value in node.items():
            full = f"{prefix}.{key}" if prefix else str(key)
            if isinstance(value, Mapping) and full not in FREE_MAPPINGS and full in _mapping_keys():
                walk(value, full)
            else:
                out[full] = value

    walk(dotted, "")
    return out


def _mapping_keys() -> set[str]:
    keys: set[str] = set()

    def walk(node: Mapping[str, Any], prefix: str) -> None:
        for key, value in node.items():
            full = f"{prefix}.{key}" if prefix else key
            if isinstance(value, Mapping):
                keys.add(full)
                walk(value, full)

    walk(DEFAULTS, "")
    return keys

