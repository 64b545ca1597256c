"""ONNX export, onnxruntime parity, TensorRT-RTX parse/build and the runners' checks.

Exports are slow (about a minute each for the tiny model on a 2-core machine: ``torch.export`` and
its decompositions dominate; a dynamic-size graph takes up to twice as long as a fixed one), so every
graph is exported once per module: fixed k = 1 (with routing outputs, through the CLI), dynamic
k = 2, fixed k = 2, dynamic k = 1 and dense fixed, each checked against onnxruntime and built into a
TensorRT-RTX engine; dense dynamic, the slowest, runs with ``-m slow``. The traced module's maths is
checked for every variant cheaply in eager mode (``InferenceGraph`` vs the model).
"""
from __future__ import annotations

import importlib.util
import math
import sys

import pytest
import torch

from cpl_fast.cli.export import main as cli_main
from cpl_fast.export import (
    EngineIO,
    InferenceGraph,
    MissingDependency,
    OnnxRunner,
    Profile,
    TensorRTRunner,
    build_engine,
    export_onnx,
    import_tensorrt,
    read_build,
    read_metadata,
)
from cpl_fast.export.trt import check_profile
from cpl_fast.inference.restoration import pad_to_multiple
from cpl_fast.models import build_model, save_model_state

onnx = pytest.importorskip("onnx", reason="onnx is not installed (pip install cpl_fast[export])")
ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install cpl_fast[export])")
HAS_RTX = importlib.util.find_spec("tensorrt_rtx") is not None
needs_rtx = pytest.mark.skipif(not HAS_RTX,
                               reason="tensorrt_rtx is not installed (pip install cpl_fast[tensorrt-rtx])")
needs_no_gpu = pytest.mark.skipif(torch.cuda.is_available(),
                                  reason="checks the no-GPU error; a GPU is present")

FIXED = (32, 48)
ATOL = 1e-4          # float32 parity on [0, 1] images


def tiny(top_k: int | None = 1, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_model("tiny", top_k=top_k).eval()
    # Random (not identity) layer norms and prompts, so every part of the graph shows in the output.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("body.weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith("body.bias"):
                p.uniform_(-0.2, 0.2)
    return model


def reference(model, image: torch.Tensor):
    """The PyTorch model's restoration of ``image`` (padded to 8, cropped) and routing."""
    padded, (h, w) = pad_to_multiple(image, model.size_multiple)
    with torch.no_grad():
        out, routing = model(padded, return_routing=True)
    return out[..., :h, :w], routing


def check_parity(runner, model, shapes, routing: bool) -> None:
    for shape in shapes:
        image = torch.rand(*shape)
        expected, expected_routing = reference(model, image)
        if routing:
            got, got_routing = runner(image, return_routing=True)
            for level, (a, b) in enumerate(zip(got_routing, expected_routing)):
                assert torch.equal(a.indices, b.indices), f"level {level}, shape {shape}"
                torch.testing.assert_close(a.weights, b.weights, atol=1e-6, rtol=1e-5)
        else:
            got = runner(image)
        assert got.shape == image.shape
        err = (got - expected).abs().max().item()
        assert err < ATOL, f"shape {shape}: max abs error {err}"


def op_types(path) -> dict[str, int]:
    proto = onnx.load(str(path))
    counts: dict[str, int] = {}
    for node in proto.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    assert {node.domain for node in proto.graph.node} <= {"", "ai.onnx"}, "custom-domain nodes in the graph"
    assert {o.domain for o in proto.opset_import} <= {"", "ai.onnx"}
    return counts


def input_shape(path) -> list:
    dims = onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim
    return [d.dim_param or d.dim_value for d in dims]


# ---------------------------------------------------------------------------------------------- exports

@pytest.fixture(scope="module")
def fixed_k1(tmp_path_factory):
    """Tiny top-1 model exported at 32x48 with routing outputs, through ``cpl-export onnx``."""
    folder = tmp_path_factory.mktemp("fixed_k1")
    model = tiny(1, seed=1)
    ckpt = save_model_state(model, folder / "model.safetensors")
    path = folder / "model.onnx"
    code = cli_main(["onnx", "--ckpt", str(ckpt), "--model", "tiny", "-o", str(path),
                     "--height", str(FIXED[0]), "--width", str(FIXED[1]), "--routing"])
    assert code == 0
    return model, path


@pytest.fixture(scope="module")
def dynamic_k2(tmp_path_factory):
    path = tmp_path_factory.mktemp("dynamic_k2") / "model.onnx"
    model = tiny(2, seed=2)
    report = export_onnx(model, path, None)
    assert report.outputs == ["restored"]
    return model, path


def test_fixed_graph_is_standard_onnx(fixed_k1):
    _, path = fixed_k1
    onnx.checker.check_model(str(path), full_check=True)
    ops = op_types(path)
    assert ops["TopK"] == 3 and ops["LayerNormalization"] > 0 and "Conv" in ops
    assert ops.get("Gather", 0) + ops.get("GatherND", 0) >= 3       # the k folded maps per level
    assert "Resize" not in ops                  # fixed size: the folded prompt maps are constants
    meta = read_metadata(path)
    assert meta["size"] == "32x48" and meta["top_k"] == "1" and meta["size_multiple"] == "8"
    shape = input_shape(path)
    assert shape == ["batch", 3, 32, 48]


def test_fixed_parity_through_runner(fixed_k1):
    model, path = fixed_k1
    runner = OnnxRunner(path)
    assert runner.fixed_size == FIXED and runner.has_routing
    # Exact size, batch of 3, and odd sizes that pad to 32x48.
    check_parity(runner, model, [(1, 3, 32, 48), (3, 3, 32, 48), (2, 3, 27, 41), (1, 3, 25, 47)],
                 routing=True)


def test_fixed_graph_rejects_other_sizes(fixed_k1):
    _, path = fixed_k1
    runner = OnnxRunner(path)
    with pytest.raises(ValueError, match=r"exported for 32x48.*got 33x48, padded to 40x48"):
        runner(torch.rand(1, 3, 33, 48))


def test_dynamic_graph_and_parity(dynamic_k2):
    model, path = dynamic_k2
    ops = op_types(path)
    assert ops["TopK"] == 3 and ops["Resize"] == 3 and "Conv" in ops
    assert "ScatterElements" not in ops          # TensorRT rejects it (ops._reference.routing_matrix)
    shape = input_shape(path)
    assert shape == ["batch", 3, "height", "width"]
    runner = OnnxRunner(path)
    assert runner.fixed_size is None and not runner.has_routing
    check_parity(runner, model, [(2, 3, 16, 24), (1, 3, 13, 21), (1, 3, 33, 50), (1, 3, 64, 64)],
                 routing=False)
    with pytest.raises(ValueError, match="no routing outputs"):
        runner(torch.rand(1, 3, 16, 16), return_routing=True)


@pytest.mark.parametrize("top_k,size", [(2, FIXED), (1, None), (None, FIXED),
                                        pytest.param(None, None, marks=pytest.mark.slow)],
                         ids=["fixed-k2", "dynamic-k1", "dense-fixed", "dense-dynamic"])
def test_other_variants(tmp_path, top_k, size):
    model = tiny(top_k, seed=3)
    path = tmp_path / "model.onnx"
    export_onnx(model, path, size, routing=True)
    onnx.checker.check_model(str(path), full_check=True)
    ops = op_types(path)
    assert ("TopK" in ops) == (top_k is not None)
    assert ("Resize" in ops) == (size is None)
    shapes = [(2, 3, 32, 48), (1, 3, 29, 43)] + ([(1, 3, 19, 37), (1, 3, 56, 40)] if size is None else [])
    check_parity(OnnxRunner(path), model, shapes, routing=True)
    if HAS_RTX:
        profile = (Profile((1, 3, 32, 48), (1, 3, 32, 48), (2, 3, 32, 48)) if size is not None
                   else Profile((1, 3, 16, 16), (1, 3, 32, 48), (2, 3, 64, 64)))
        build = build_engine(path, tmp_path / "model.engine", profile=profile, module="tensorrt_rtx",
                             optimization_level=0)
        assert build.engine_bytes > 0


@pytest.mark.parametrize("top_k", [1, 2, None], ids=["k1", "k2", "dense"])
@pytest.mark.parametrize("size", [FIXED, None], ids=["fixed", "dynamic"])
def test_inference_graph_equals_model(top_k, size):
    """The module that is traced (fused norms, reference or folded prompts) is the model's function."""
    model = tiny(top_k, seed=4)
    graph = InferenceGraph(model, size, return_routing=True)
    image = torch.rand(2, 3, *(size or (24, 40)))
    with torch.no_grad():
        out, routing = model(image, return_routing=True)
        flat = graph(image)
    torch.testing.assert_close(flat[0], out, atol=1e-5, rtol=1e-5)
    for level, r in enumerate(routing):
        assert torch.equal(flat[1 + 2 * level], r.indices)
        torch.testing.assert_close(flat[2 + 2 * level], r.weights)
    # The copy is configured; the caller's model is untouched.
    assert all(spm.export_folded is None and spm.fold for spm in model.prompt_modules())
    assert all(spm.prompt_backend == "auto" for spm in model.prompt_modules())


# ---------------------------------------------------------------------------------------------- TensorRT

@pytest.fixture(scope="module")
def fixed_engine(fixed_k1, tmp_path_factory):
    """The fixed-size graph built by ``cpl-export trt`` with TensorRT-RTX, batch 1..4."""
    if not HAS_RTX:
        pytest.skip("tensorrt_rtx is not installed (pip install cpl_fast[tensorrt-rtx])")
    engine = tmp_path_factory.mktemp("fixed_engine") / "model.engine"
    code = cli_main(["trt", "--onnx", str(fixed_k1[1]), "-o", str(engine), "--module", "tensorrt_rtx",
                     "--min", "1,3,32,48", "--opt", "2,3,32,48", "--max", "4,3,32,48",
                     "--optimization-level", "0"])
    assert code == 0
    return engine


def test_tensorrt_rtx_builds_fixed_engine(fixed_engine):
    assert fixed_engine.stat().st_size > 0
    build = read_build(fixed_engine)
    assert build.module == "tensorrt_rtx" and build.size_multiple == 8 and build.layers > 100
    assert build.engine_bytes == fixed_engine.stat().st_size
    names = [t.name for t in build.tensors]
    assert names == ["image", "restored", "prompt3_indices", "prompt3_weights", "prompt2_indices",
                     "prompt2_weights", "prompt1_indices", "prompt1_weights"]
    io = EngineIO(build.tensors, build.profile, str(fixed_engine))
    assert io.fixed_size == FIXED and io.input.shape == (-1, 3, 32, 48)
    assert io.torch_dtype(next(t for t in io.outputs if t.name == "prompt3_indices")) == torch.int64
    io.check_shape((4, 3, 32, 48))
    with pytest.raises(ValueError, match="outside the engine's profile"):
        io.check_shape((5, 3, 32, 48))


@needs_rtx
def test_tensorrt_rtx_builds_dynamic_engine(dynamic_k2, tmp_path):
    _, path = dynamic_k2
    engine = tmp_path / "model.engine"
    build = build_engine(path, engine, profile=Profile((1, 3, 16, 16), (1, 3, 64, 64), (2, 3, 128, 128)),
                         module="tensorrt_rtx", optimization_level=0)
    assert build.engine_bytes == engine.stat().st_size > 0 and build.layers > 100
    io = EngineIO(read_build(engine).tensors, read_build(engine).profile, str(engine))
    assert io.fixed_size is None and io.input.shape == (-1, 3, -1, -1) and io.output_names == ["restored"]
    io.check_shape((2, 3, 128, 64))
    with pytest.raises(ValueError, match="dimension 2"):
        io.check_shape((1, 3, 136, 64))


@needs_no_gpu
def test_tensorrt_runner_says_it_needs_a_gpu(fixed_engine):
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        TensorRTRunner(fixed_engine)
    # Without its side file the engine cannot be run: the size multiple and I/O are recorded there.
    fixed_engine.with_name("copy.engine").write_bytes(fixed_engine.read_bytes())
    with pytest.raises(FileNotFoundError, match="copy.engine.json is missing"):
        TensorRTRunner(fixed_engine.with_name("copy.engine"))


needs_gpu_trt = pytest.mark.skipif(
    not torch.cuda.is_available() or importlib.util.find_spec("tensorrt") is None,
    reason="deserialising and running an engine needs a CUDA GPU and the TensorRT runtime (tensorrt)")


@needs_gpu_trt
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_tensorrt_engine_matches_pytorch_on_gpu(fixed_k1, tmp_path, precision):
    """fp32: the parity bound of onnxruntime; fp16: PSNR against the float32 model above 45 dB."""
    model, path = fixed_k1
    engine = tmp_path / "model.engine"
    build_engine(path, engine, precision=precision, module="tensorrt",
                 profile=Profile((1, 3, 32, 48), (2, 3, 32, 48), (2, 3, 32, 48)))
    runner = TensorRTRunner(engine)
    assert runner.fixed_size == FIXED and runner.has_routing
    image = torch.rand(2, 3, 30, 45)
    expected, expected_routing = reference(model, image)
    got, routing = runner(image.cuda(), return_routing=True)
    got = got.float().cpu()
    assert got.shape == image.shape
    if precision == "fp32":
        assert (got - expected).abs().max().item() < ATOL
        assert all(torch.equal(a.indices.cpu(), b.indices) for a, b in zip(routing, expected_routing))
    else:
        mse = (got.clamp(0, 1) - expected.clamp(0, 1)).pow(2).mean().item()
        assert 10 * math.log10(1 / max(mse, 1e-20)) > 45


# ---------------------------------------------------------------------------------------------- errors

def test_profile_checks():
    dynamic = ["batch", 3, "height", "width"]
    good = Profile((1, 3, 16, 16), (1, 3, 64, 64), (2, 3, 128, 128))
    assert check_profile(dynamic, good, 8) is good
    with pytest.raises(ValueError, match="give --min, --opt and --max"):
        check_profile(dynamic, None, 8)
    with pytest.raises(ValueError, match="min <= opt <= max"):
        check_profile(dynamic, Profile((1, 3, 64, 16), (1, 3, 32, 64), (2, 3, 128, 128)), 8)
    with pytest.raises(ValueError, match="multiples of 8"):
        check_profile(dynamic, Profile((1, 3, 12, 16), (1, 3, 64, 64), (2, 3, 128, 128)), 8)
    with pytest.raises(ValueError, match="fixed to 3"):
        check_profile(dynamic, Profile((1, 1, 16, 16), (1, 1, 64, 64), (2, 1, 128, 128)), 8)
    with pytest.raises(ValueError, match="has 3 dimensions, the input has 4"):
        check_profile(dynamic, Profile((1, 3, 16), (1, 3, 64), (2, 3, 128)), 8)
    with pytest.raises(ValueError, match="fixed to 32"):
        check_profile(["batch", 3, 32, 48], Profile((1, 3, 16, 48), (1, 3, 32, 48), (1, 3, 32, 48)), 8)
    assert check_profile([1, 3, 32, 48], None, 8) is None


@pytest.mark.parametrize("size,match", [((30, 48), "not a multiple of 8.*32x48"), ((0, 8), "positive"),
                                        ((-8, 8), "positive"), ((32,), "two ints")])
def test_export_rejects_bad_sizes(tmp_path, size, match):
    with pytest.raises(ValueError, match=match):
        export_onnx(tiny(), tmp_path / "m.onnx", size)


def test_export_rejects_old_opset(tmp_path):
    with pytest.raises(ValueError, match="opset 17 is not supported"):
        export_onnx(tiny(), tmp_path / "m.onnx", FIXED, opset=17)


def test_cli_errors(tmp_path, capsys):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint \x00\x01")
    assert cli_main(["onnx", "--ckpt", str(bad), "--model", "tiny", "-o", str(tmp_path / "m.onnx"),
                     "--dynamic"]) == 2
    assert "cannot read" in capsys.readouterr().err
    ckpt = save_model_state(tiny(), tmp_path / "m.safetensors")
    assert cli_main(["onnx", "--ckpt", str(ckpt), "--model", "tiny", "-o", str(tmp_path / "m.onnx"),
                     "--height", "30", "--width", "44"]) == 2
    assert "not a multiple of 8" in capsys.readouterr().err
    assert cli_main(["trt", "--onnx", str(tmp_path / "missing.onnx"), "-o", str(tmp_path / "m.engine")]) == 2
    assert "no such ONNX file" in capsys.readouterr().err
    assert cli_main(["trt", "--onnx", str(bad), "-o", str(tmp_path / "m.engine"), "--min", "1,3,8,8"]) == 2
    assert "--min, --opt and --max" in capsys.readouterr().err


def test_unreadable_onnx(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07garbage that is not a protobuf \xff\xfe")
    with pytest.raises(ValueError, match="bad.onnx"):
        read_metadata(bad)
    with pytest.raises(ValueError, match="bad.onnx"):
        OnnxRunner(bad)
    with pytest.raises(FileNotFoundError):
        OnnxRunner(tmp_path / "missing.onnx")
    with pytest.raises(ValueError, match="bad.onnx"):
        build_engine(bad, tmp_path / "m.engine", module="tensorrt_rtx")


def test_runner_rejects_bad_images(fixed_k1):
    runner = OnnxRunner(fixed_k1[1])
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        runner(torch.rand(1, 1, 16, 16))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        runner(torch.rand(3, 16, 16))
    with pytest.raises(ValueError, match=">= 1"):
        runner(torch.rand(1, 3, 0, 16))
    with pytest.raises(TypeError, match="floating-point"):
        runner(torch.randint(0, 255, (1, 3, 16, 16), dtype=torch.uint8))


def test_missing_dependencies(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)       # import fails as if not installed
    with pytest.raises(MissingDependency, match=r"pip install cpl_fast\[export\]"):
        OnnxRunner(tmp_path / "any.onnx")
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(MissingDependency, match=r"pip install cpl_fast\[tensorrt\]"):
        import_tensorrt("tensorrt")
    monkeypatch.setitem(sys.modules, "tensorrt_rtx", None)
    with pytest.raises(MissingDependency, match="no TensorRT Python module"):
        import_tensorrt("auto")


@needs_rtx
def test_rtx_has_no_weak_precision_flags(fixed_k1, tmp_path):
    with pytest.raises(ValueError, match="strongly typed"):
        build_engine(fixed_k1[1], tmp_path / "m.engine", precision="fp16", module="tensorrt_rtx",
                     profile=Profile((1, 3, 32, 48), (1, 3, 32, 48), (1, 3, 32, 48)))
