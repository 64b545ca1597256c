"""cpl-convert: the Lightning file is PromptIR's layout key for key, both layouts read back identical,
EMA weights go where they belong, sparse models never go to PromptIR's layout, and writes are safe."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cpl_fast.cli import convert as convert_cli
from cpl_fast.cli.convert import main
from cpl_fast.config import dump_yaml, load_config
from cpl_fast.models import build_model, load_checkpoint
from cpl_fast.models.checkpoint import UNUSED_OFFICIAL_KEYS
from cpl_fast.models.convert import (
    ConversionError,
    basicsr_checkpoint,
    lightning_checkpoint,
    save_converted,
    unused_official_shapes,
)
from cpl_fast.runs.checkpoints import save_checkpoint
from cpl_fast.runs.loading import load_model

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "promptir_state_dict.txt"
X = torch.rand(1, 3, 16, 24)


def _reference() -> list[tuple[str, tuple[int, ...]]]:
    if not REFERENCE.is_file():
        pytest.skip(f"reference state-dict listing not found at {REFERENCE}")
    rows = []
    for line in REFERENCE.read_text().splitlines():
        if line and not line.startswith("#"):
            key, shape = line.split("\t")
            rows.append((key, tuple(int(v) for v in re.findall(r"\d+", shape))))
    return rows


def _perturbed(name: str, **kwargs) -> torch.nn.Module:
    model = build_model(name, **kwargs)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def _same_outputs(a: torch.nn.Module, b: torch.nn.Module) -> None:
    with torch.no_grad():
        assert torch.equal(a.eval()(X), b.eval()(X))


def _assert_same_state(model: torch.nn.Module, reference: torch.nn.Module) -> None:
    got, want = model.state_dict(), reference.state_dict()
    assert set(got) == set(want)
    for key in want:
        assert torch.equal(got[key], want[key]), key


@pytest.fixture(scope="module")
def promptir() -> torch.nn.Module:
    return build_model("promptir").eval()


def test_lightning_file_is_promptirs_layout_key_for_key(tmp_path, promptir):
    converted = lightning_checkpoint(promptir, {"preset": "promptir", "top_k": None, "num_prompts": None, "overrides": {}})
    path = save_converted(converted, tmp_path / "promptir.ckpt")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)   # plain types only
    rows = [(key.removeprefix("net."), tuple(value.shape)) for key, value in ckpt["state_dict"].items()]
    assert all(key.startswith("net.") for key in ckpt["state_dict"])
    assert rows == _reference()                                      # same keys, shapes and order
    assert converted.keys == 548 and converted.notes == []
    assert ckpt["pytorch-lightning_version"] == "2.0.1" and ckpt["hyper_parameters"] == {}
    assert (ckpt["epoch"], ckpt["global_step"]) == (0, 0)
    assert ckpt["cpl_fast"]["model"]["preset"] == "promptir"
    for key in UNUSED_OFFICIAL_KEYS:
        assert not ckpt["state_dict"][f"net.{key}"].any()           # never used: zeros
    fresh = build_model("promptir")
    report = load_checkpoint(fresh, path, strict=True)
    assert len(report.ignored_keys) == 6 and len(report.reshaped_keys) == 3
    _assert_same_state(fresh, promptir)


def test_basicsr_file_holds_cpls_542_keys(tmp_path, promptir):
    converted = basicsr_checkpoint(promptir, {"preset": "promptir"})
    expected = [(key, shape) for key, shape in _reference() if key not in UNUSED_OFFICIAL_KEYS]
    params = converted.checkpoint["params"]
    assert sorted((k, tuple(v.shape)) for k, v in params.items()) == sorted(expected)
    assert converted.checkpoint["params_ema"] is params
    assert converted.notes == ["no EMA weights: params_ema holds the same weights as params"]


def test_unused_convolution_shapes_follow_the_official_class():
    listed = dict(_reference())
    assert unused_official_shapes(48) == {key: listed[key] for key in UNUSED_OFFICIAL_KEYS}


def test_lightning_file_loads_with_promptirs_own_loader(tmp_path, promptir):
    # What PromptIR's test.py does: PromptIRModel().load_from_checkpoint(path), a strict load into
    # the module holding PromptIR(decoder=True) as `net` (stood in for by its exact parameters).
    pl = pytest.importorskip("lightning.pytorch")
    listing = _reference()

    class PromptIRStandIn(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            for key, shape in listing:
                module = self
                *path, leaf = key.split(".")
                for part in path:
                    if not hasattr(module, part):
                        module.add_module(part, torch.nn.Module())
                    module = getattr(module, part)
                module.register_parameter(leaf, torch.nn.Parameter(torch.zeros(shape)))

    class PromptIRModel(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = PromptIRStandIn()
            self.loss_fn = torch.nn.L1Loss()

    path = save_converted(lightning_checkpoint(promptir, {"preset": "promptir"}), tmp_path / "model.ckpt")
    # test.py calls it on an instance (Lightning 2.0); Lightning >= 2.1 wants the class: same load.
    net = PromptIRModel.load_from_checkpoint(path, map_location="cpu").net
    ours = promptir.state_dict()
    for key, value in net.state_dict().items():
        if key in UNUSED_OFFICIAL_KEYS:
            continue
        want = ours[key].unsqueeze(0) if key.endswith("prompt_param") else ours[key]
        assert torch.equal(value, want), key


def test_dense_tiny_model_round_trips_through_both_layouts(tmp_path, capsys):
    source = _perturbed("tiny_dense")
    torch.save({"state_dict": {f"net.{k}": v for k, v in source.state_dict().items()}}, tmp_path / "src.ckpt")
    assert main([str(tmp_path / "src.ckpt"), "-o", str(tmp_path / "a.pth")]) == 0
    out = capsys.readouterr().out
    assert "wrote" in out and "basicsr layout, 146 tensors" in out and "read back: identical" in out
    assert "params_ema holds the same weights" in out
    assert main([str(tmp_path / "a.pth"), "-o", str(tmp_path / "b.ckpt")]) == 0
    out = capsys.readouterr().out
    assert "lightning layout, 152 tensors" in out and "not PromptIR's default architecture" in out
    assert "EMA" not in out                             # a.pth's params_ema repeats params: no EMA weights
    for name in ("a.pth", "b.ckpt"):
        loaded = load_model(tmp_path / name)            # the model section the file records
        assert loaded.model.top_k is None and loaded.model_config["preset"] == "tiny_dense"
        _assert_same_state(loaded.model, source)
        _same_outputs(loaded.model, source)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pth", "b.ckpt", "src.ckpt"]   # no temp files


def test_sparse_model_goes_to_basicsr_and_is_refused_for_lightning(tmp_path, capsys):
    source = _perturbed("tiny", top_k=2)
    torch.save(source.state_dict(), tmp_path / "w.pth")
    assert main([str(tmp_path / "w.pth"), "-o", str(tmp_path / "x.ckpt"), "--set", "model.top_k=2"]) == 2
    err = capsys.readouterr().err
    assert "routes sparsely (top-2 of 5 prompts)" in err and "BasicSR layout" in err
    assert not (tmp_path / "x.ckpt").exists()
    assert main([str(tmp_path / "w.pth"), "-o", str(tmp_path / "x.pth"), "--set", "model.top_k=2"]) == 0
    loaded = load_model(tmp_path / "x.pth")
    assert loaded.model.top_k == 2                      # recorded: the weights alone would say top-1
    _same_outputs(loaded.model, source)
    with pytest.raises(ConversionError, match="a PromptNAFNet: write the BasicSR layout"):
        lightning_checkpoint(build_model("nafnet_tiny"), {"preset": "nafnet_tiny"})


def test_selection_biases_zero_are_dropped_others_kept():
    model = build_model("tiny", route_bias=True)
    converted = basicsr_checkpoint(model, {"preset": "tiny"})
    assert not any(key.endswith("route_bias") for key in converted.checkpoint["params"])
    model.prompt1.route_bias.fill_(0.5)
    converted = basicsr_checkpoint(model, {"preset": "tiny"})
    assert torch.equal(converted.checkpoint["params"]["prompt1.route_bias"], model.prompt1.route_bias)
    assert any("selection biases (route_bias) kept" in note for note in converted.notes)


def _run(tmp_path: Path, preset: str) -> tuple[Path, torch.nn.Module, torch.nn.Module]:
    run = tmp_path / "run"
    run.mkdir()
    dump_yaml(load_config("demo", overrides=[f"model.preset={preset}", "name=probe"]), run / "config.yaml")
    trained, ema = _perturbed(preset), _perturbed(preset)
    save_checkpoint(run, 7, trained, {}, {"step": 7, "epoch": 2, "batches_in_epoch": 7}, ema=ema)
    return run, trained, ema


def test_run_folder_with_ema(tmp_path, capsys):
    run, trained, ema = _run(tmp_path, "tiny_dense")
    assert main([str(run), "-o", str(tmp_path / "run.pth")]) == 0
    assert "trained weights as params, EMA as params_ema" in capsys.readouterr().out
    raw = torch.load(tmp_path / "run.pth", weights_only=True)
    for entry, model in (("params", trained), ("params_ema", ema)):
        fresh = build_model("tiny_dense")
        load_checkpoint(fresh, raw[entry])
        _assert_same_state(fresh, model)
    assert main([str(run), "-o", str(tmp_path / "run.ckpt")]) == 0
    assert "EMA weights (--no-ema for the trained ones)" in capsys.readouterr().out
    ckpt = torch.load(tmp_path / "run.ckpt", weights_only=True)
    assert (ckpt["epoch"], ckpt["global_step"]) == (2, 7)
    _assert_same_state(load_model(tmp_path / "run.ckpt").model, ema)
    assert main([str(run), "-o", str(tmp_path / "raw.ckpt"), "--no-ema"]) == 0
    _assert_same_state(load_model(tmp_path / "raw.ckpt").model, trained)


def test_basicsr_source_with_its_own_ema(tmp_path):
    trained, ema = _perturbed("tiny_dense"), _perturbed("tiny_dense")
    torch.save({"params": trained.state_dict(), "params_ema": ema.state_dict()}, tmp_path / "net_g.pth")
    # A BasicSR file without a record is read as CPL's (top-1): dense must be said to go to Lightning.
    dense = ["--set", "model.top_k=all"]
    assert main([str(tmp_path / "net_g.pth"), "-o", str(tmp_path / "ema.ckpt"), *dense]) == 0
    _assert_same_state(load_model(tmp_path / "ema.ckpt").model, ema)
    assert main([str(tmp_path / "net_g.pth"), "-o", str(tmp_path / "raw.ckpt"), "--no-ema", *dense]) == 0
    _assert_same_state(load_model(tmp_path / "raw.ckpt").model, trained)
    assert main([str(tmp_path / "net_g.pth"), "-o", str(tmp_path / "copy.pth")]) == 0
    raw = torch.load(tmp_path / "copy.pth", weights_only=True)
    for entry, model in (("params", trained), ("params_ema", ema)):
        fresh = build_model("tiny")
        load_checkpoint(fresh, raw[entry])
        _assert_same_state(fresh, model)


def test_outputs_are_kept_unless_forced_and_a_failed_check_writes_nothing(tmp_path, capsys, monkeypatch):
    torch.save(build_model("tiny").state_dict(), tmp_path / "w.pth")
    out = tmp_path / "out.pth"
    out.write_bytes(b"old")
    assert main([str(tmp_path / "w.pth"), "-o", str(out)]) == 2
    assert "exists; --force replaces it" in capsys.readouterr().err and out.read_bytes() == b"old"

    def broken(*args, **kwargs):
        raise ValueError("verification failed: [params] x differs")

    monkeypatch.setattr(convert_cli, "_verify", broken)
    assert main([str(tmp_path / "w.pth"), "-o", str(out), "--force"]) == 2
    assert "verification failed" in capsys.readouterr().err
    assert out.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["out.pth", "w.pth"]
    monkeypatch.undo()
    assert main([str(tmp_path / "w.pth"), "-o", str(out), "--force"]) == 0
    assert load_model(out).model_config["preset"] == "tiny"


@pytest.mark.parametrize("setup, argv, message", [
    (lambda d: (d / "bad.ckpt").write_bytes(b"\x80\x02 not a checkpoint"), ["bad.ckpt", "-o", "o.pth"],
     "cannot read bad.ckpt as a checkpoint"),
    (lambda d: None, ["nope.pth", "-o", "o.pth"], "checkpoint nope.pth does not exist"),
    (lambda d: torch.save({"epoch": 1}, d / "odd.pth"), ["odd.pth", "-o", "o.pth"],
     "not a recognised checkpoint"),
    (lambda d: torch.save({"conv.weight": torch.zeros(1)}, d / "other.pth"), ["other.pth", "-o", "o.pth"],
     "cannot tell the model from the weights"),
    (lambda d: torch.save(build_model("tiny").state_dict(), d / "w.pth"), ["w.pth", "-o", "o.bin"],
     "cannot tell the layout from the name 'o.bin'"),
    (lambda d: (d / "folder.pth").mkdir(), ["w.pth", "-o", "folder.pth"], "is a folder"),
    (lambda d: torch.save(build_model("tiny").state_dict(), d / "w.pth"), ["w.pth", "-o", "o.pth", "--set",
     "optim.lr=1"], "cpl-convert takes model settings only"),
    (lambda d: torch.save(build_model("tiny").state_dict(), d / "w.pth"), ["w.pth", "-o", "w.pth", "--force"],
     "is the source's weights file"),
    (lambda d: torch.save(build_model("tiny").state_dict(), d / "w.pth"), ["w.pth", "-o", "o.pth", "--model",
     "tiny_dense", "--set", "model.num_prompts=3"], "the weights have prompts 5; preset 'tiny_dense' has prompts 3"),
])
def test_bad_inputs_get_one_named_error(tmp_path, capsys, monkeypatch, setup, argv, message):
    monkeypatch.chdir(tmp_path)
    setup(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("cpl-convert: error: ") and message in err, err
    assert not (tmp_path / "o.pth").exists()


def test_help_does_not_import_torch():
    code = ("import sys\nfrom cpl_fast.cli.convert import main\ntry:\n    main(['--help'])\n"
            "except SystemExit:\n    pass\nprint('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip().endswith("False"), done.stderr
