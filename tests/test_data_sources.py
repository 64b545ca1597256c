"""Training and cpl-eval read a config's data through one function, so they agree on every layout."""
from __future__ import annotations

import numpy as np
import pytest

from cpl_fast.cli.eval import UsageError, evaluation_set
from cpl_fast.config import load_config
from cpl_fast.data import write_png
from cpl_fast.data.sources import DataSourceError, data_sources, evaluation_pairs


def _write_images(folder, names, seed=0):
    rng = np.random.default_rng(seed)
    for name in names:
        write_png(folder / f"{name}.png", rng.integers(0, 256, (16, 24, 3), dtype=np.uint8))


def test_clean_layout_test_root_is_the_set_training_and_cpl_eval_score(tmp_path):
    _write_images(tmp_path / "clean", ["a", "b"])
    _write_images(tmp_path / "test", ["c", "d"], seed=1)
    config = load_config("seven_task", data_root=str(tmp_path / "clean"),
                         overrides=["data.tasks=[noise, blur]", f"data.test_root={tmp_path / 'test'}"])
    _, trained_on_test = data_sources(config["data"])
    scored = evaluation_set(config)
    assert list(scored.source.tasks) == list(trained_on_test.tasks) == ["noise", "noise", "blur", "blur"]
    assert list(scored.source.names) == list(trained_on_test.names)
    # The same degraded pixels: both synthesise with the config's seed.
    assert np.array_equal(scored[3]["input"].numpy(), evaluation_set(config)[3]["input"].numpy())

    without = load_config("seven_task", data_root=str(tmp_path / "clean"), overrides=["data.tasks=[noise]"])
    assert evaluation_pairs(without["data"]) is None
    with pytest.raises(UsageError, match="data.test_root"):
        evaluation_set(without)


def test_a_layout_without_splits_is_scored_from_its_root_only_by_a_scoring_command(tmp_path):
    for side in ("input", "target"):
        _write_images(tmp_path / "pairs" / side / "derain", ["x", "y"])
    data = load_config("demo", overrides=["data.layout=paired", f"data.root={tmp_path / 'pairs'}"])["data"]
    assert evaluation_pairs(data) is None                      # training: the root is the training set
    assert len(evaluation_pairs(data, root_is_test=True)) == 2  # cpl-eval --data ROOT: the root is the test set
    with pytest.raises(DataSourceError, match="does not exist"):
        evaluation_pairs({**data, "root": str(tmp_path / "none")}, root_is_test=True)
