"""cpl-restore: files and folders, grey/RGBA inputs, unreadable files, --force, official checkpoints."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from cpl_fast.cli.restore import main as restore_main
from cpl_fast.data import read_image
from cpl_fast.eval import restore_image
from cpl_fast.eval.restore import collect_inputs, restore_files
from cpl_fast.models import build_model, save_model_state
from cpl_fast.runs.loading import load_model, resolve_weights


def _write(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


@pytest.fixture
def images(tmp_path):
    rng = np.random.default_rng()
    folder = tmp_path / "in"
    _write(folder / "rgb.png", (rng.random((37, 29, 3)) * 255).astype(np.uint8))
    _write(folder / "sub" / "grey.png", (rng.random((20, 33)) * 255).astype(np.uint8))
    _write(folder / "alpha.png", (rng.random((18, 24, 4)) * 255).astype(np.uint8))
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a PNG")
    (folder / "notes.txt").write_text("not an image")
    return folder


@pytest.fixture
def model():
    return build_model("tiny").eval()


def test_restore_files_writes_pngs_reports_unreadable_and_keeps_outputs(tmp_path, images, model):
    out = tmp_path / "out"
    with pytest.warns(UserWarning, match="alpha channel dropped"):
        summary = restore_files(model, [images, tmp_path / "missing.jpg"], out, progress=False)
    assert sorted(p.relative_to(out).as_posix() for p in summary.written) == ["alpha.png", "rgb.png",
                                                                               "sub/grey.png"]
    failed = {p.name: why for p, why in summary.failed}
    assert set(failed) == {"broken.png", "missing.jpg"}
    assert "cannot read image" in failed["broken.png"] and "no such file" in failed["missing.jpg"]
    # Each output is the model's restoration of the input, as RGB at the input's size.
    for name in ("rgb.png", "sub/grey.png", "alpha.png"):
        source = read_image(images / name) if name != "alpha.png" else \
            torch.from_numpy(np.asarray(Image.open(images / name))[..., :3].copy()).permute(2, 0, 1) / 255.0
        written = read_image(out / name)
        assert written.shape == source.shape and written.shape[0] == 3
        expected = restore_image(model, source).image[0].clamp(0, 1)
        assert (written - expected).abs().max() <= 0.5 / 255 + 1e-6  # 8-bit rounding only
    # Nothing is overwritten without force.
    stamp = (out / "rgb.png").read_bytes()
    (out / "rgb.png").write_bytes(b"keep me")
    again = restore_files(model, [images / "rgb.png"], out, progress=False)
    assert not again.written and "exists (--force to overwrite)" in again.skipped[0][1]
    assert (out / "rgb.png").read_bytes() == b"keep me"
    forced = restore_files(model, [images / "rgb.png"], out, force=True, progress=False)
    assert forced.written == [out / "rgb.png"] and (out / "rgb.png").read_bytes() == stamp


def test_output_names_do_not_collide_and_inputs_are_never_overwritten(tmp_path, model):
    rng = np.random.default_rng()
    folder = tmp_path / "pics"
    _write(folder / "a.png", (rng.random((16, 16, 3)) * 255).astype(np.uint8))
    _write(folder / "a.jpg", (rng.random((16, 16, 3)) * 255).astype(np.uint8))
    items, problems = collect_inputs([folder])
    assert not problems and sorted(name.as_posix() for _, name in items) == ["a_jpg.png", "a_png.png"]
    original = (folder / "a.png").read_bytes()
    summary = restore_files(model, [folder / "a.png"], folder, force=True, progress=False)
    assert not summary.written and "is the input itself" in summary.skipped[0][1]
    assert (folder / "a.png").read_bytes() == original
    assert collect_inputs([tmp_path / "empty"])[1][0][1] == "no such file or folder"
    (tmp_path / "empty").mkdir()
    assert collect_inputs([tmp_path / "empty"])[1][0][1] == "folder holds no image files"


def _official_formats(tmp_path, state):
    return {
        "lightning": ({"state_dict": {f"net.{k}": v for k, v in state.items()}, "epoch": 3}, "promptir.ckpt"),
        "basicsr": ({"params": {k: v + 1 for k, v in state.items()}, "params_ema": state}, "cpl.pth"),
        "ddp": ({f"module.{k}": v for k, v in state.items()}, "ddp.pth"),
    }


@pytest.mark.parametrize("layout", ["lightning", "basicsr", "ddp", "safetensors"])
def test_cpl_restore_loads_official_checkpoint_formats(tmp_path, images, layout, capsys):
    reference = build_model("tiny")
    for p in reference.parameters():  # not the initialisation a fresh model would have
        p.data.add_(0.01 * torch.randn_like(p))
    state = reference.state_dict()
    if layout == "safetensors":
        ckpt = save_model_state(reference, tmp_path / "model.safetensors")
    else:
        obj, name = _official_formats(tmp_path, state)[layout]
        ckpt = tmp_path / name
        torch.save(obj, ckpt)
    out = tmp_path / "out"
    status = restore_main([str(images / "rgb.png"), "-o", str(out), "--ckpt", str(ckpt), "--model", "tiny"])
    assert status == 0, capsys.readouterr()
    expected = restore_image(reference.eval(), read_image(images / "rgb.png")).image[0].clamp(0, 1)
    assert (read_image(out / "rgb.png") - expected).abs().max() <= 0.5 / 255 + 1e-6
    loaded = load_model(ckpt, {"preset": "tiny"})
    for key, value in loaded.model.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_layout_default_model_and_run_folders(tmp_path):
    state = build_model("tiny").state_dict()
    torch.save({"state_dict": {f"net.{k}": v for k, v in state.items()}}, tmp_path / "p.ckpt")
    loaded = load_model(tmp_path / "p.ckpt")   # architecture read from the weights; Lightning: dense
    assert loaded.model_config["preset"] == "tiny_dense" and "dense routing assumed" in loaded.notes[0]
    with pytest.raises(ValueError, match=r"preset 'promptir' has dim 48(.|\n)*--model tiny_dense fits"):
        load_model(tmp_path / "p.ckpt", {"preset": "promptir"})
    with pytest.raises(FileNotFoundError, match="neither a run folder"):
        resolve_weights(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_weights(tmp_path / "nope.pth")


def test_cpl_restore_errors(tmp_path, images, capsys):
    ckpt = save_model_state(build_model("tiny"), tmp_path / "m.safetensors")
    (tmp_path / "file").write_text("x")
    assert restore_main([str(images), "-o", str(tmp_path / "file"), "--ckpt", str(ckpt)]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"PK\x03\x04 truncated")
    assert restore_main([str(images), "-o", str(tmp_path / "o"), "--ckpt", str(corrupt)]) == 2
    assert "cannot read" in capsys.readouterr().err and not (tmp_path / "o").exists()
    status = restore_main([str(images), "-o", str(tmp_path / "o"), "--ckpt", str(ckpt), "--model", "tiny",
                           "--tile", "60"])
    assert status == 2 and "not a multiple of the model's size multiple 8" in capsys.readouterr().err
    status = restore_main([str(images), "-o", str(tmp_path / "o"), "--ckpt", str(ckpt), "--model", "tiny",
                           "--tile", "32", "--tile-overlap", "16"])
    assert status == 1  # broken.png failed, the others were restored
    captured = capsys.readouterr()
    assert "broken.png" in captured.err and "alpha channel dropped" in captured.err
    assert "restored 3 image(s), skipped 0, failed 1" in captured.out
    with pytest.raises(SystemExit):
        restore_main(["x.png", "-o", str(tmp_path), "--ckpt", str(ckpt), "--tile", "big"])
