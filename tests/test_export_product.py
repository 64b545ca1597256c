"""cpl-export for a user who has never read the docs: a fixed-size graph builds without profile flags, a
dynamic one's error gives shapes it accepts, and a plain onnxruntime session can read what to feed."""
from __future__ import annotations

import importlib.util
import re

import pytest
import torch

from cpl_fast.cli.export import main as cli_main
from cpl_fast.export.onnx_export import export_onnx
from cpl_fast.export.trt import Profile, check_profile, read_build
from cpl_fast.models import build_model

HAS_RTX = importlib.util.find_spec("tensorrt_rtx") is not None


def _tiny():
    torch.manual_seed(3)
    return build_model("tiny").eval()


def _flags(message: str) -> Profile:
    shapes = {name: tuple(int(v) for v in text.split(","))
              for name, text in re.findall(r"--(min|opt|max) ([\d,]+)", message)}
    return Profile(shapes["min"], shapes["opt"], shapes["max"])


@pytest.mark.parametrize("shape", [["batch", 3, "height", "width"], ["batch", 3, 48, "width"],
                                   [2, 3, "height", "width"]])
@pytest.mark.parametrize("multiple", [8, 16])
def test_the_error_for_a_missing_profile_gives_one_the_graph_accepts(shape, multiple):
    with pytest.raises(ValueError, match="give --min, --opt and --max") as err:
        check_profile(shape, None, multiple)
    example = _flags(str(err.value))
    assert check_profile(shape, example, multiple) is example


def test_a_fixed_size_graph_needs_no_profile():
    assert check_profile(["batch", 3, 32, 48], None, 8) == Profile((1, 3, 32, 48), (1, 3, 32, 48),
                                                                   (1, 3, 32, 48))
    assert check_profile([1, 3, 32, 48], None, 8) is None  # nothing dynamic: no profile at all


@pytest.mark.skipif(not HAS_RTX, reason="tensorrt_rtx is not installed (pip install cpl_fast[tensorrt-rtx])")
def test_cpl_export_trt_on_a_fixed_graph_without_profile_flags(tmp_path, capsys):
    onnx_path = tmp_path / "m.onnx"
    export_onnx(_tiny(), onnx_path, (32, 32))
    engine = tmp_path / "m.engine"
    assert cli_main(["trt", "--onnx", str(onnx_path), "-o", str(engine), "--module", "tensorrt_rtx",
                     "--optimization-level", "0"]) == 0
    assert "built for batch 1" in capsys.readouterr().out
    build = read_build(engine)
    assert build.profile.min == build.profile.max == (1, 3, 32, 32)


@pytest.mark.parametrize("size", [None, (32, 40)])
def test_onnxruntime_users_read_the_input_contract(tmp_path, size):
    ort = pytest.importorskip("onnxruntime")
    path = tmp_path / "m.onnx"
    export_onnx(_tiny(), path, size)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta()
    assert meta.custom_metadata_map["cpl_fast.size_multiple"] == "8"
    text = meta.description
    if size is None:
        assert "multiples of 8" in text and "OnnxRunner" in text
    else:
        assert "(B, 3, 32, 40)" in text and "exactly this size" in text
