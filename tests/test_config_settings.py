"""Typed sections of a config, and settings read under the names they had before."""
from __future__ import annotations

import dataclasses
import warnings

import pytest

from cpl_fast.config import (
    DEFAULTS,
    RENAMED,
    ConfigError,
    Settings,
    apply_overrides,
    as_settings,
    dump_yaml,
    load_config,
    merge,
    read_run_config,
)
from cpl_fast.config.schema import CprSettings
from cpl_fast.models.registry import current_section, preset_section, section_kwargs, section_routing


def test_defaults_are_the_settings_dataclasses():
    assert DEFAULTS == dataclasses.asdict(Settings())
    assert as_settings(DEFAULTS) == Settings()


def test_as_settings_types_every_section_of_a_loaded_config():
    config = load_config("demo", overrides=["cpr.m=3", "optim.lr=1e-3", "model.top_k=2"])
    settings = as_settings(config)
    assert isinstance(settings.cpr, CprSettings)
    assert (settings.cpr.m, settings.optim.lr, settings.model.top_k) == (3, 1e-3, 2)
    assert settings.data.layout == config["data"]["layout"] == "embedded"
    with pytest.raises(AttributeError):
        settings.cpr.alpah  # noqa: B018 - a misspelt setting fails where it is read
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.cpr.m = 1  # the typed view is read-only: the config mapping is the one that is saved


def test_as_settings_names_a_missing_setting():
    config = merge(DEFAULTS, {})
    del config["cpr"]["m"]
    with pytest.raises(KeyError, match="'m'"):
        as_settings(config)


@pytest.mark.parametrize("old, value", [("model.k", 2), ("model.n", 6), ("cpr.sampler", "other_task")])
def test_old_names_are_read_as_the_new_ones_with_a_warning(old, value):
    new = RENAMED[old]
    with pytest.warns(DeprecationWarning, match=f"{old} is now called {new}"):
        config = load_config("demo", overrides=[f"{old}={value}"])
    section, key = new.split(".")
    assert config[section][key] == value
    assert key not in ("k", "n", "sampler") and old.split(".")[1] not in config[section]


def test_old_names_in_a_yaml_file_and_in_apply_overrides(tmp_path):
    path = tmp_path / "old.yaml"
    path.write_text("model:\n  k: 2\n  n: 6\ncpr:\n  sampler: other_task\n", encoding="utf-8")
    with pytest.warns(DeprecationWarning):
        config = load_config("demo", files=[path])
    assert (config["model"]["top_k"], config["model"]["num_prompts"]) == (2, 6)
    assert config["cpr"]["negative_sampler"] == "other_task"
    with pytest.warns(DeprecationWarning):
        assert apply_overrides(config, {"model.k": 1})["model"]["top_k"] == 1


def test_old_and_new_name_together_is_an_error(tmp_path):
    path = tmp_path / "both.yaml"
    path.write_text("model:\n  k: 2\n  top_k: 1\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="model.k and model.top_k are both set"), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        load_config("demo", files=[path])


def test_a_run_folder_config_of_an_earlier_version_is_read(tmp_path):
    old = merge(DEFAULTS, {})
    old["model"] = {"preset": "tiny", "k": 2, "n": 4, "overrides": {}}
    old["cpr"]["sampler"] = old["cpr"].pop("negative_sampler")
    path = tmp_path / "config.yaml"
    dump_yaml(old, path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        config = read_run_config(path)
    assert config["model"] == {"preset": "tiny", "top_k": 2, "num_prompts": 4, "overrides": {}}
    assert config["cpr"]["negative_sampler"] == "mismatched_experts"


def test_a_model_section_of_an_earlier_version_builds_the_same_model():
    old = {"preset": "tiny", "k": "all", "n": 3, "overrides": {}}
    assert current_section(old) == preset_section("tiny", "all", 3)
    assert section_routing(old) == section_routing(preset_section("tiny", "all", 3)) == (None, 3)
    assert section_kwargs(old) == {"top_k": None, "num_prompts": 3}
    with pytest.raises(ValueError, match="both k=2 and top_k=1"):
        current_section({"preset": "tiny", "k": 2, "top_k": 1})
