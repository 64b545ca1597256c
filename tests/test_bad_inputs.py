"""Bad inputs get one error line and the documented exit status, before the expensive work where possible:
output names that collide, unwritable outputs, corrupt data trees, config values that break a run."""
from __future__ import annotations

import errno
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_runs import TINY_RUN, as_sets

from cpl_fast.cli.eval import eval_main
from cpl_fast.cli.restore import main as restore_main
from cpl_fast.cli.train import main as train_main
from cpl_fast.models import build_model, save_model_state

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


def _png(path: Path, seed: int = 0, size: tuple[int, int] = (16, 16)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture
def weights(tmp_path) -> Path:
    return save_model_state(build_model("tiny"), tmp_path / "w.safetensors")


def _one_error_line(err: str, prog: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith(f"{prog}: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# ------------------------------------------------------------------------------------ cpl-restore

@pytest.mark.parametrize("layout", ["two folders", "extension case"])
def test_restore_refuses_inputs_whose_outputs_collide(tmp_path, weights, capsys, layout):
    if layout == "two folders":
        inputs = [_png(tmp_path / "dirA" / "a.png", 1).parent, _png(tmp_path / "dirB" / "a.png", 2).parent]
    else:
        inputs = [_png(tmp_path / "in" / "x.png", 1), _png(tmp_path / "in" / "x.PNG", 2)]
    out = tmp_path / "out"
    code = restore_main([*map(str, inputs), "-o", str(out), "--ckpt", str(weights), "--model", "tiny",
                         "--force"])
    err = capsys.readouterr().err
    assert code == 2
    line = _one_error_line(err, "cpl-restore")
    assert "would be written by more than one input" in line
    for path in inputs:
        assert str(path) in err  # every colliding input is listed
    assert not out.exists()  # refused before anything was restored


def test_restore_counts_the_same_file_given_twice_once(tmp_path, weights, capsys):
    image = _png(tmp_path / "in" / "a.png")
    code = restore_main([str(image), str(image.parent), "-o", str(tmp_path / "out"), "--ckpt", str(weights),
                         "--model", "tiny"])
    assert code == 0 and "restored 1 image(s), skipped 0, failed 0" in capsys.readouterr().out
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["a.png"]


def test_restore_keeps_going_when_an_output_cannot_be_written(tmp_path, weights, capsys, monkeypatch):
    from cpl_fast.eval import restore

    for name in ("a", "b", "c"):
        _png(tmp_path / "in" / f"{name}.png")
    real = restore.write_png

    def disk_full_for_b(path, image):
        if Path(path).name == "b.png":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real(path, image)

    monkeypatch.setattr(restore, "write_png", disk_full_for_b)
    code = restore_main([str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--ckpt", str(weights),
                         "--model", "tiny"])
    captured = capsys.readouterr()
    assert code == 1
    assert "restored 2 image(s), skipped 0, failed 1" in captured.out
    assert "No space left on device" in captured.err and "b.png" in captured.err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.png", "c.png"]


@pytest.mark.parametrize("case", ["under a file", "read-only"])
def test_restore_checks_the_output_folder_before_loading_the_model(tmp_path, weights, capsys, case):
    image = _png(tmp_path / "in" / "a.png")
    if case == "under a file":
        (tmp_path / "file").write_text("x")
        out = tmp_path / "file" / "sub"
        expected = "is a file"
    else:
        if os.geteuid() == 0:
            pytest.skip("root writes into read-only folders")
        (tmp_path / "ro").mkdir()
        (tmp_path / "ro").chmod(0o555)
        out = tmp_path / "ro" / "out"
        expected = "is not writable"
    code = restore_main([str(image), "-o", str(out), "--ckpt", str(tmp_path / "missing.pth")])
    assert code == 2
    assert expected in _one_error_line(capsys.readouterr().err, "cpl-restore")  # not the missing checkpoint


def test_restore_of_a_run_without_checkpoints_does_not_talk_of_resuming(tmp_path, capsys):
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "config.yaml").write_text("name: x\n")
    code = restore_main([str(_png(tmp_path / "a.png")), "-o", str(tmp_path / "out"), "--ckpt",
                         str(tmp_path / "run")])
    line = _one_error_line(capsys.readouterr().err, "cpl-restore")
    assert code == 2 and "has no checkpoint" in line and "resume" not in line


def test_tiled_restore_says_that_it_tiles_and_shows_progress(tmp_path, weights, capsys):
    image = _png(tmp_path / "big.png", size=(80, 96))
    code = restore_main([str(image), "-o", str(tmp_path / "out"), "--ckpt", str(weights), "--model", "tiny",
                         "--tile", "32", "--tile-overlap", "8"])
    err = capsys.readouterr().err
    assert code == 0
    assert "96x80 restored in 12 tiles of 32x32" in err and str(image) in err
    assert "tiles:" in err  # the progress bar over the tiles


@pytest.mark.parametrize("value", ["-100", "x"])
def test_negative_tile_overlap_is_an_argument_error(tmp_path, weights, capsys, value):
    with pytest.raises(SystemExit) as exit_:
        restore_main(["a.png", "-o", str(tmp_path), "--ckpt", str(weights), "--tile-overlap", value])
    assert exit_.value.code == 2 and "--tile-overlap must be" in capsys.readouterr().err


# --------------------------------------------------------------------------- cpl-eval, cpl-export

def test_eval_checks_json_and_markdown_paths_before_evaluating(tmp_path, weights, capsys, monkeypatch):
    import importlib

    evaluate_module = importlib.import_module("cpl_fast.eval.scoring")
    monkeypatch.setattr(evaluate_module, "evaluate", lambda *a, **k: pytest.fail("evaluated first"))
    (tmp_path / "adir").mkdir()
    for option, path in (("--json", tmp_path / "adir"), ("--markdown", tmp_path / "adir")):
        code = eval_main(["--ckpt", str(weights), "--model", "tiny", "--preset", "demo", option, str(path)])
        assert code == 2
        assert f"{option} {path} is a folder" in _one_error_line(capsys.readouterr().err, "cpl-eval")


def test_corrupt_safetensors_get_no_architecture_hint(tmp_path, weights, capsys):
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 3])
    code = restore_main([str(_png(tmp_path / "a.png")), "-o", str(tmp_path / "out"), "--ckpt", str(weights)])
    err = capsys.readouterr().err
    assert code == 2 and f"cannot read {weights}" in _one_error_line(err, "cpl-restore")
    assert "architecture" not in err


def test_lightning_checkpoint_with_a_non_tensor_value_is_refused_by_name(tmp_path, capsys):
    state = {f"net.{k}": v for k, v in build_model("tiny").state_dict().items()}
    state["net.extra"] = {"not": "a tensor"}
    torch.save({"state_dict": state}, tmp_path / "p.ckpt")
    code = restore_main([str(_png(tmp_path / "a.png")), "-o", str(tmp_path / "out"), "--ckpt",
                         str(tmp_path / "p.ckpt"), "--model", "tiny"])
    line = _one_error_line(capsys.readouterr().err, "cpl-restore")
    assert code == 2 and "entries that are not tensors: extra" in line


@pytest.mark.parametrize("argv, message", [
    (["--opset", "99"], "opset 99 is not supported"),
    (["-o", "{tmp}"], "is a folder"),
])
def test_export_checks_opset_and_output_before_exporting(tmp_path, weights, capsys, monkeypatch, argv,
                                                         message):
    pytest.importorskip("onnx")
    from cpl_fast.runs import loading

    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("loaded and exported first"))
    from cpl_fast.cli.export import main as export_main

    args = ["onnx", "--ckpt", str(weights), "--model", "tiny", "-o", str(tmp_path / "m.onnx"),
            "--height", "32", "--width", "32"]
    args += [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert export_main(args) == 2
    assert message in _one_error_line(capsys.readouterr().err, "cpl-export onnx")


def test_export_workspace_must_be_positive(tmp_path, capsys):
    from cpl_fast.cli.export import main as export_main

    with pytest.raises(SystemExit) as exit_:
        export_main(["trt", "--onnx", "m.onnx", "-o", str(tmp_path / "e"), "--workspace-mib", "-5"])
    assert exit_.value.code == 2 and "expected a positive integer, got -5" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ cpl-data

def _paired_tree(root: Path, corrupt: bool = False) -> Path:
    for i in range(4):
        _png(root / "input" / f"{i}.png", i, (40, 40))
        _png(root / "target" / f"{i}.png", 10 + i, (40, 40))
    if corrupt:
        (root / "input" / "2.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)  # a valid name only
    return root


def test_verify_decodes_every_image_unless_quick(tmp_path, capsys):
    from cpl_fast.cli.data import main as data_main

    root = _paired_tree(tmp_path / "pairs", corrupt=True)
    assert data_main(["verify", "--layout", "paired", str(root)]) == 1
    out = capsys.readouterr()
    assert "input/2.png cannot be decoded" in out.out and "decoding images" in out.err  # with a progress bar
    assert data_main(["verify", "--layout", "paired", "--quick", str(root)]) == 0
    assert "images not decoded" in capsys.readouterr().out
    _png(root / "target" / "2.png", size=(40, 48))
    _png(root / "input" / "2.png", size=(40, 40))
    assert data_main(["verify", "--layout", "paired", "--no-progress", str(root)]) == 1
    assert "input/2.png is 40x40 but its target target/2.png is 48x40" in capsys.readouterr().out


def test_verify_rejects_list_entries_outside_the_root_duplicates_and_non_utf8_lists(tmp_path):
    from cpl_fast.data import verify_layout

    base = tmp_path / "aw" / "train"
    for name in ("a", "b"):
        _png(base / "snow" / "input" / f"{name}.png")
        _png(base / "snow" / "gt" / f"{name}.png")
    _png(tmp_path / "secret" / "input" / "x.png")
    _png(tmp_path / "secret" / "gt" / "x.png")
    (base / "list.txt").write_text("snow/input/a.png\nsnow/input/a.png\n../../secret/input/x.png\n"
                                   f"{tmp_path / 'secret' / 'input' / 'x.png'}\nsnow/input/b.png\n")
    problems = "\n".join(verify_layout("allweather", tmp_path / "aw", decode=False).problems)
    assert "lists 1 entry more than once: snow/input/a.png" in problems
    assert "entry '../../secret/input/x.png' points outside the dataset root" in problems
    assert f"entry '{tmp_path / 'secret' / 'input' / 'x.png'}' points outside" in problems
    (base / "list.txt").write_bytes(b"snow/input/\xff.png\n")
    problems = "\n".join(verify_layout("allweather", tmp_path / "aw", decode=False).problems)
    assert "file list train/list.txt is not UTF-8 text" in problems


def test_training_on_a_corrupt_image_names_it_in_one_line(tmp_path, capsys):
    root = _paired_tree(tmp_path / "pairs", corrupt=True)
    settings = [*TINY_RUN, "data.layout=paired", f"data.root={root}", "data.samples_per_epoch=8",
                "train.iterations=4"]
    code = train_main(["--preset", "demo", "--run-dir", str(tmp_path / "run"), *as_sets(settings)])
    line = _one_error_line(capsys.readouterr().err, "cpl-train")
    assert code == 1
    assert str(root / "input" / "2.png") in line and "data.skip_unreadable=true" in line


def test_train_dataset_skips_unusable_samples_when_allowed(tmp_path):
    from cpl_fast.data import FilePairs, SampleError, TrainDataset, load_layout

    root = _paired_tree(tmp_path / "pairs", corrupt=True)
    source = FilePairs(load_layout("paired", root))
    strict = TrainDataset(source, patch_size=16)
    with pytest.raises(SampleError, match=r"input/2\.png"):
        strict[2]
    lenient = TrainDataset(source, patch_size=16, skip_unreadable=True)
    with pytest.warns(UserWarning, match=r"skipped unusable training sample 2 .*1 skipped so far"):
        item = lenient[2]
    assert item["name"] == "3" and lenient.skipped == 1
    again = TrainDataset(source, patch_size=16, skip_unreadable=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert torch.equal(again[2]["input"], item["input"])  # the same substitute every time
    assert torch.equal(lenient[1]["input"], strict[1]["input"])  # the others are untouched


# ------------------------------------------------------------------------------------ cpl-train

@pytest.mark.parametrize("setting, message", [
    ("optim.lr=.inf", "optim.lr must be a number"),
    ("cpr.alpha=.inf", "cpr.alpha must be a number"),
    ("seed=-1", "seed must be"),
    ("seed=18446744073709551616", "seed must be"),
])
def test_config_values_that_would_break_the_run_are_refused(tmp_path, capsys, setting, message):
    code = train_main(["--preset", "demo", "--run-dir", str(tmp_path / "run"),
                       *as_sets([*TINY_RUN, setting])])
    assert code == 2
    assert message in _one_error_line(capsys.readouterr().err, "cpl-train")
    assert not (tmp_path / "run").exists()


def test_a_crop_that_cannot_fit_is_refused_before_it_allocates(tmp_path):
    """A subprocess with a capped address space: without the estimate the first step dies of memory."""
    limit = 6 * 2 ** 30
    code = (f"import resource, sys; resource.setrlimit(resource.RLIMIT_AS, ({limit}, {limit})); "
            "from cpl_fast.cli.train import main; sys.exit(main(sys.argv[1:]))")
    settings = [*TINY_RUN, "data.crop=4096", "data.batch=8", "objective=loop", "cpr.m=4"]
    done = subprocess.run([sys.executable, "-c", code, "--preset", "demo", "--run-dir", str(tmp_path / "run"),
                           *as_sets(settings)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-4000:]
    line = _one_error_line(done.stderr, "cpl-train")
    assert "data.crop=4096" in line and "GiB" in line and "lower data.crop or data.batch" in line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("content, message", [(b"name: [unclosed\n", "config file"),
                                               (b"name: \xff\xfe\n", "config file")])
def test_malformed_or_non_utf8_yaml_is_one_line_naming_the_file(tmp_path, capsys, content, message):
    path = tmp_path / "bad.yaml"
    path.write_bytes(content)
    assert train_main(["--preset", "demo", "--config", str(path)]) == 2
    line = _one_error_line(capsys.readouterr().err, "cpl-train")
    assert str(path) in line


@pytest.mark.parametrize("where", ["under a file", "disk full"])
def test_unwritable_run_folders_are_one_line(tmp_path, capsys, monkeypatch, where):
    from cpl_fast.runs import checkpoints as checkpointing

    if where == "under a file":
        (tmp_path / "file").write_text("x")
        code = train_main(["--preset", "demo", "--run-dir", str(tmp_path / "file" / "run"),
                           *as_sets(TINY_RUN)])
        assert code == 2 and "file" in _one_error_line(capsys.readouterr().err, "cpl-train")
        return

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "run" / "x"))

    monkeypatch.setattr(checkpointing, "save_model_state", disk_full)
    code = train_main(["--preset", "demo", "--run-dir", str(tmp_path / "run"), *as_sets(TINY_RUN)])
    assert code == 1
    assert "No space left on device" in _one_error_line(capsys.readouterr().err, "cpl-train")


@pytest.mark.parametrize("what", ["weights", "loss"])
def test_a_diverged_run_stops_with_one_line_and_saves_no_non_finite_checkpoint(tmp_path, capsys, monkeypatch,
                                                                              what):
    from cpl_fast.train.trainer import Trainer

    step = Trainer.train_step

    def diverging(self):
        terms = step(self)
        if self.step == 2:
            with torch.no_grad():
                next(self.model.parameters()).fill_(float("nan"))
            if what == "loss":
                terms["loss"] = float("nan")
        return terms

    monkeypatch.setattr(Trainer, "train_step", diverging)
    code = train_main(["--preset", "demo", "--run-dir", str(tmp_path / "run"),
                       *as_sets([*TINY_RUN, "train.iterations=3"])])
    line = _one_error_line(capsys.readouterr().err, "cpl-train")
    assert code == 1
    assert ("not finite" in line) if what == "weights" else ("the loss is nan at step 2" in line)
    from cpl_fast.runs.checkpoints import latest_checkpoint

    assert latest_checkpoint(tmp_path / "run").name == "step_00000001"


def test_training_skips_unreadable_samples_when_told(tmp_path, capsys):
    root = _paired_tree(tmp_path / "pairs", corrupt=True)
    settings = [*TINY_RUN, "data.layout=paired", f"data.root={root}", "data.samples_per_epoch=8",
                "train.iterations=4", "data.skip_unreadable=true"]
    with pytest.warns(UserWarning, match=r"skipped unusable training sample 2 .*input/2\.png"):
        code = train_main(["--preset", "demo", "--run-dir", str(tmp_path / "run"), *as_sets(settings)])
    assert code == 0, capsys.readouterr().err
