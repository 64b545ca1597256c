"""The trainer on the embedded data: a few steps per objective, checkpoints, TensorBoard, errors, the demo."""
from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

from cpl_fast.cli.train import main
from cpl_fast.config import ConfigError, load_config
from cpl_fast.data import EvalDataset, LayoutError, TrainDataset, embedded_pairs, write_png
from cpl_fast.data.sources import DataSourceError, data_sources
from cpl_fast.eval import entropy_bits, evaluate
from cpl_fast.models import build_model
from cpl_fast.runs import checkpoints as checkpointing
from cpl_fast.runs.checkpoints import CheckpointError, latest_checkpoint, read_checkpoint
from cpl_fast.train.trainer import STEPS, Trainer, l1_step, resolve_objective


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: these are tiny models, and a second thread mostly waits on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


SMALL = ["data.crop=32", "data.batch=2", "train.iterations=3", "checkpoint.every=2", "logging.progress=false",
         "eval.before_after=false", "report.enabled=false", "baselines={}", "train.log_every=1"]


def small_config(*overrides: str) -> dict:
    return load_config("demo", overrides=[*SMALL, *overrides])


@pytest.mark.parametrize("objective", ["l1", "loop"])
def test_few_steps_write_checkpoints_and_tensorboard(tmp_path, objective):
    trainer = Trainer(small_config(f"objective={objective}"), tmp_path, log=lambda message: None)
    start = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    history = trainer.fit()
    assert [h["step"] for h in history] == [1, 2, 3]
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in history)
    if objective == "loop":
        assert all(h["cpr"] != 0.0 for h in history)
    else:
        assert all(h["cpr"] == 0.0 and h["loss"] == h["l1"] for h in history)
    assert any(not torch.equal(start[k], v) for k, v in trainer.model.state_dict().items())
    folder = latest_checkpoint(tmp_path)
    assert folder.name == "step_00000003"
    assert (tmp_path / "checkpoints" / "step_00000002").is_dir()
    info = json.loads((folder / "state.json").read_text())
    assert info["step"] == 3 and info["objective"] == objective and info["sampler"]["start"] == 6
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    fresh = build_model("tiny", route_bias=True)     # the demo's router is bias-balanced
    read_checkpoint(folder, fresh)
    for key, value in trainer.model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value)


def test_fast_objective_takes_neg_chunk_and_fit_uses_the_caching_cpu_allocator(tmp_path, monkeypatch):
    from cpl_fast import memory

    histories, caching_during_steps = {}, []
    for chunk in ("null", "1"):
        config = small_config("objective=fast", "precision=float64", f"cpr.neg_chunk={chunk}",
                              "train.iterations=2", "checkpoint.every=10")
        trainer = Trainer(config, tmp_path / chunk, log=lambda message: None)
        assert trainer.context.neg_chunk == (None if chunk == "null" else 1)
        step = trainer.train_step

        def spying_step(step=step):
            caching_during_steps.append(memory.cpu_caching_enabled())
            return step()

        monkeypatch.setattr(trainer, "train_step", spying_step)
        histories[chunk] = trainer.fit()
    # Chunked negatives: the same loss (float64), the same steps.
    for whole, chunked in zip(histories["null"], histories["1"]):
        assert chunked["loss"] == pytest.approx(whole["loss"], rel=1e-10)
    assert caching_during_steps == [memory.cpu_caching_available()] * 4
    assert not memory.cpu_caching_enabled()  # the allocator before fit is back


def test_system_cpu_allocator_leaves_the_allocator_alone(tmp_path, monkeypatch):
    from cpl_fast import memory

    config = small_config("objective=l1", "train.iterations=1", "train.cpu_allocator=system")
    trainer = Trainer(config, tmp_path, log=lambda message: None)
    step, seen = trainer.train_step, []
    monkeypatch.setattr(trainer, "train_step", lambda: (seen.append(memory.cpu_caching_enabled()), step())[1])
    trainer.fit()
    assert seen == [False]


def test_accumulation_ema_and_clipping_run(tmp_path):
    trainer = Trainer(small_config("objective=l1", "optim.accumulate=2", "ema.enabled=true", "ema.decay=0.5",
                                   "optim.grad_clip=0.1", "train.iterations=2"), tmp_path, log=lambda m: None)
    trainer.fit()
    assert trainer.batches_in_epoch == 4 and trainer.step == 2
    folder = latest_checkpoint(tmp_path)
    assert (folder / "ema.safetensors").is_file()
    ema = build_model("tiny", route_bias=True)
    read_checkpoint(folder, build_model("tiny", route_bias=True), ema=ema)
    for key, value in trainer.ema.module.state_dict().items():
        assert torch.equal(ema.state_dict()[key], value)


def test_messages_go_to_the_train_logger_and_the_log_file(tmp_path):
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("cpl_fast.train")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        config = small_config("objective=l1", "train.iterations=1", "logging.tensorboard=false")
        Trainer(config, tmp_path).fit()
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    messages = [record.getMessage() for record in records]
    assert messages[0].startswith("step 1/1 loss") and messages[-1].startswith("checkpoint ")
    # train.log: the same messages, each after a "YYYY-MM-DD HH:MM:SS " timestamp.
    lines = (tmp_path / "train.log").read_text(encoding="utf-8").splitlines()
    assert [line[20:] for line in lines] == messages


def test_checkpoint_save_is_atomic(tmp_path, monkeypatch):
    trainer = Trainer(small_config("objective=l1", "train.iterations=2"), tmp_path, log=lambda m: None)
    trainer.fit()
    saved = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.train_step()  # step 3: weights move on

    def broken_save(obj, path, *args, **kwargs):
        with open(path, "wb") as fh:
            fh.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(checkpointing.torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        trainer.save()
    assert latest_checkpoint(tmp_path).name == "step_00000002"
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))
    model = build_model("tiny", route_bias=True)
    info, state = read_checkpoint(latest_checkpoint(tmp_path), model)
    assert info["step"] == 2 and "optimizer" in state
    for key, value in saved.items():
        assert torch.equal(model.state_dict()[key], value)
    # A kill mid-save leaves a temporary folder: ignored by loading, removed by the next save.
    (tmp_path / "checkpoints" / ".tmp-step_00000003-killed").mkdir()
    assert latest_checkpoint(tmp_path).name == "step_00000002"
    monkeypatch.undo()
    trainer.save()
    assert latest_checkpoint(tmp_path).name == "step_00000003"
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))


def test_latest_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        latest_checkpoint(tmp_path / "missing")
    with pytest.raises(CheckpointError, match="no checkpoint"):
        latest_checkpoint(tmp_path)
    (tmp_path / "checkpoints" / "step_00000001").mkdir(parents=True)
    (tmp_path / "checkpoints" / "latest").write_text("step_00000001")
    with pytest.raises(CheckpointError, match="incomplete"):
        latest_checkpoint(tmp_path)


def _write_images(folder, names, size=24, seed=0):
    rng = np.random.default_rng(seed)
    for name in names:
        write_png(folder / f"{name}.png", rng.integers(0, 256, (size, size + 8, 3), dtype=np.uint8))


def test_clean_layout_degrades_every_image_with_every_task(tmp_path):
    _write_images(tmp_path / "clean", ["a", "b"])
    _write_images(tmp_path / "test", ["c"], seed=1)
    data = load_config("seven_task", data_root=str(tmp_path / "clean"),
                       overrides=["data.tasks=[noise, blur]", f"data.test_root={tmp_path / 'test'}"])["data"]
    train, test = data_sources(data)
    expected = [("blur", "a"), ("blur", "b"), ("noise", "a"), ("noise", "b")]
    assert sorted(zip(train.tasks, train.names)) == expected
    assert list(test.tasks) == ["noise", "blur"] and len(test) == 2
    item = TrainDataset(train, patch_size=16)[0]
    assert item["input"].shape == (3, 16, 16) and not torch.equal(item["input"], item["target"])
    with pytest.raises(DataSourceError, match="unknown degradations"):
        data_sources({**data, "tasks": ["snowfall"]})
    with pytest.raises(DataSourceError, match="does not exist"):
        data_sources({**data, "root": str(tmp_path / "none")})


def test_paired_layout_and_layout_errors(tmp_path):
    for side in ("input", "target"):
        _write_images(tmp_path / "pairs" / side / "derain", ["x", "y"])
    data = load_config("demo", overrides=["data.layout=paired", f"data.root={tmp_path / 'pairs'}"])["data"]
    train, test = data_sources(data)
    assert list(train.tasks) == ["derain", "derain"] and test is None
    (tmp_path / "bad" / "input").mkdir(parents=True)
    with pytest.raises(LayoutError, match="missing folder target"):
        data_sources({**data, "root": str(tmp_path / "bad")})


def test_l1_step_is_the_mean_absolute_error():
    model = build_model("tiny").double()
    x, y = torch.rand(2, 3, 16, 16, dtype=torch.float64), torch.rand(2, 3, 16, 16, dtype=torch.float64)
    out = l1_step(model, (x, y, torch.tensor([0, 1])))
    torch.testing.assert_close(out.loss, (model(x) - y).abs().mean())
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_step_registry_and_objective_resolution():
    assert set(STEPS) == {"literal", "loop", "fast", "l1"}
    assert resolve_objective("loop")[0] == "loop" and resolve_objective("l1")[1] is l1_step
    assert resolve_objective("auto") == ("fast", STEPS["fast"])
    with pytest.raises(ConfigError, match="unknown objective"):
        resolve_objective("l2")


def test_evaluate_reports_entropy_conventions():
    pairs = embedded_pairs("test")
    dataset = EvalDataset(pairs, task_ids={t: i for i, t in enumerate(sorted(set(pairs.tasks)))})
    for preset in ("tiny", "tiny_dense"):
        model = build_model(preset)
        scores = evaluate(model, dataset, torch.device("cpu"), max_images=10)
        assert sum(task["images"] for task in scores.values()) == 10
        for task in scores.values():
            assert 0 < task["psnr"] < 60 and 0 < task["ssim"] <= 1
            for level in task["levels"]:
                assert sum(level["counts"]) == task["images"] * (5 if preset == "tiny_dense" else 1)
                basis = level["mean_probs"] if preset == "tiny_dense" else level["counts"]
                assert level["selection_entropy"] == pytest.approx(entropy_bits(basis))
                assert 0 <= level["mean_softmax_entropy"] <= 2.33
                assert level["dense"] == (preset == "tiny_dense")
        assert model.training  # restored


@pytest.mark.parametrize("argv, message", [
    (["--preset", "three_task"], "needs a data root"),
    (["--preset", "three_task", "--data", "{tmp}/nope"], "does not exist"),
    (["--preset", "demo", "--set", "amp=fp16", "--set", "device=cpu"], "needs a CUDA GPU"),
    (["--preset", "demo", "--set", "optim.lr"], "bad override"),
    (["--resume", "{tmp}"], "not a run folder"),
])
def test_cli_errors(tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()  # a failed start leaves no run folder


def test_cli_resume_without_checkpoint(tmp_path, capsys):
    (tmp_path / "config.yaml").write_text("name: x\n")
    assert main(["--resume", str(tmp_path)]) == 2
    assert "no checkpoint" in capsys.readouterr().err


def test_cli_unknown_preset(capsys):
    with pytest.raises(SystemExit):
        main(["--preset", "four_task"])
    assert "invalid choice" in capsys.readouterr().err


def test_demo_end_to_end(tmp_path, capsys):
    run_dir = tmp_path / "demo"
    code = main(["--preset", "demo", "--run-dir", str(run_dir), "--set", "train.iterations=2", "--set",
                 "data.crop=32", "--set", "eval.max_images=5", "--set", "logging.progress=false"])
    assert code == 0
    out = capsys.readouterr().out
    assert "== demo: model tiny, sparse (top-1)" in out and "== dense: model tiny_dense, dense" in out
    for name in ("report.md", "loss_curves.png", "psnr_per_task.png", "selection_histograms.png",
                 "result.json", "config.yaml", "dense/result.json", "dense/checkpoints/latest"):
        assert (run_dir / name).is_file(), name
    report = (run_dir / "report.md").read_text()
    assert "Selection entropy" in report and "| dehaze |" in report
    result = json.loads((run_dir / "dense" / "result.json").read_text())
    assert result["objective"] == "l1" and result["steps"] == 2 and result["before"] and result["after"]
    # A finished run resumes to its stored result without training again.
    assert main(["--resume", str(run_dir)]) == 0
    assert "== dense" in capsys.readouterr().out


def test_the_old_names_of_process_and_position_still_work_and_warn(tmp_path):
    from cpl_fast.train.distributed import DistInfo

    with pytest.warns(DeprecationWarning, match=r"Trainer\(info=...\) is now Trainer\(process=...\)"):
        trainer = Trainer(small_config("objective=l1"), tmp_path, log=None, info=DistInfo())
    with pytest.warns(DeprecationWarning, match="Trainer.info is now Trainer.process"):
        assert trainer.info is trainer.process
    with pytest.warns(DeprecationWarning, match=r"Trainer.info_json\(\) is now Trainer.position\(\)"):
        assert trainer.info_json() == trainer.position()
