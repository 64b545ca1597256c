"""Whole-model inference on the CPU: CPL (top-1, folded prompts) vs dense PromptIR, eager vs onnxruntime.

The paper's model (``cpl`` preset, 35.38 M parameters; random weights: timing does not depend on
them) and the dense PromptIR (``promptir``, the same weights) restore one image of 256x256 and
512x512. Providers:

* ``eager-sparse``: ``cpl`` in eval mode under ``torch.no_grad`` (folded prompt maps cached: the
  prompt stage is a gather of one map per level);
* ``eager-dense``: ``promptir``, same (the folded maps are mixed with all ``n`` weights);
* ``ort-sparse`` / ``ort-dense``: the same models exported at that fixed size (folded maps as
  constants) and run by ``OnnxRunner`` (onnxruntime, CPU provider, as many intra-op threads as
  torch uses);
* ``trt-sparse`` / ``trt-dense``: fp16 TensorRT engines of those graphs run by ``TensorRTRunner``
  (only where a CUDA GPU and the ``tensorrt`` module exist; skipped otherwise).

MACs: ``FlopCounterMode`` FLOPs / 2 of the eager forward with the folded cache warm (convolutions and
matrix products; the graphs compute the same function). Export times are noted. Group
``inference-fwd``: results in ``bench/results/inference_<device>.md`` and ``.json``. Slow on a
small CPU: ``CPL_BENCH_ROUNDS`` (default 2) timed rounds after one warm-up round; set
``OMP_NUM_THREADS`` to pin the thread count. Run with ``pytest bench/test_inference.py``.
"""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch
from flops import flop_counter  # bench/flops.py, the benchmarks' one FLOP counter

from cpl_fast.export import OnnxRunner, Profile, TensorRTRunner, build_engine, export_onnx
from cpl_fast.models import build_model

pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install cpl_fast[export])")

SIZES = (256, 512)
CPU_PROVIDERS = ("eager-sparse", "eager-dense", "ort-sparse", "ort-dense")
PROVIDERS = (*CPU_PROVIDERS, "trt-sparse", "trt-dense")
HAS_GPU_TRT = torch.cuda.is_available() and importlib.util.find_spec("tensorrt") is not None
PRESET = {"sparse": "cpl", "dense": "promptir"}
ROUNDS = int(os.environ.get("CPL_BENCH_ROUNDS", "2"))

medians: dict[tuple[str, int], float] = {}
macs: dict[tuple[str, int], int] = {}
export_seconds: dict[tuple[str, int], float] = {}


@pytest.fixture(scope="module")
def models() -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    sparse = build_model("cpl").eval()
    dense = build_model("promptir").eval()
    dense.load_state_dict(sparse.state_dict())       # the same parameters; only the routing differs
    return {"sparse": sparse, "dense": dense}


@pytest.fixture(scope="module")
def onnx_files(tmp_path_factory):
    cache: dict[tuple[str, int], str] = {}
    return cache, tmp_path_factory.mktemp("inference_onnx")


def count_macs(routing: str, size: int) -> int:
    """MACs of one folded eager forward, on the meta device (shapes only; same counts as a real run)."""
    with torch.device("meta"):
        model = build_model(PRESET[routing]).eval()
        x = torch.rand(1, 3, size, size)
    with torch.no_grad():
        model(x)                                      # fills the folded-map cache
        counter = flop_counter()
        with counter:
            model(x)
    return counter.get_total_flops() // 2


@pytest.mark.parametrize("size", SIZES, ids=[f"{s}x{s}" for s in SIZES])
@pytest.mark.parametrize("provider", PROVIDERS)
def test_inference(benchmark, models, onnx_files, provider, size):
    benchmark.group = "inference-fwd"
    backend, routing = provider.split("-")
    if backend == "trt" and not HAS_GPU_TRT:
        pytest.skip("TensorRT engines need a CUDA GPU and the tensorrt module")
    model = models[routing]
    torch.manual_seed(size)
    image = torch.rand(1, 3, size, size)
    if backend == "eager":
        def run():
            with torch.no_grad():
                return model(image)
    else:
        cache, folder = onnx_files
        key = (routing, size)
        if key not in cache:
            report = export_onnx(model, folder / f"{routing}_{size}.onnx", (size, size))
            cache[key] = str(report.path)
            export_seconds[key] = report.seconds
        if backend == "ort":
            runner = OnnxRunner(cache[key], threads=torch.get_num_threads())
        else:
            engine = folder / f"{routing}_{size}.engine"
            shape = (1, 3, size, size)
            build_engine(cache[key], engine, precision="fp16", profile=Profile(shape, shape, shape),
                         module="tensorrt")
            runner = TensorRTRunner(engine)
            image = image.cuda()

        def run():
            return runner(image)          # TensorRTRunner waits for its stream
    if (routing, size) not in macs:
        macs[(routing, size)] = count_macs(routing, size)
    benchmark.extra_info.update(case=f"{size}x{size}", provider=provider, macs=macs[(routing, size)],
                                threads=torch.get_num_threads())
    benchmark.pedantic(run, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    medians[(provider, size)] = benchmark.stats.stats.median


def test_inference_summary(bench_notes):
    missing = [(p, s) for p in CPU_PROVIDERS for s in SIZES if (p, s) not in medians]
    if missing:
        pytest.skip(f"needs every test_inference case in the same run; missing {missing}")
    lines = ["### inference: ms per image, MACs, ratios", "",
             "| size | routing | MACs (G) | eager ms | onnxruntime ms | eager / onnxruntime | export s |",
             "|---|---|---|---|---|---|---|"]
    for size in SIZES:
        for routing in ("sparse", "dense"):
            eager, ort = medians[(f"eager-{routing}", size)], medians[(f"ort-{routing}", size)]
            lines.append(f"| {size}x{size} | {routing} ({PRESET[routing]}) | "
                         f"{macs[(routing, size)] / 1e9:.2f} | {eager * 1e3:.0f} | {ort * 1e3:.0f} | "
                         f"{eager / ort:.2f} | {export_seconds[(routing, size)]:.0f} |")
    lines += ["", "| size | dense / sparse MACs | dense / sparse time, eager "
              "| dense / sparse time, onnxruntime |", "|---|---|---|---|"]
    for size in SIZES:
        lines.append(f"| {size}x{size} | {macs[('dense', size)] / macs[('sparse', size)]:.4f} | "
                     f"{medians[('eager-dense', size)] / medians[('eager-sparse', size)]:.3f} | "
                     f"{medians[('ort-dense', size)] / medians[('ort-sparse', size)]:.3f} |")
    gpu = [(p, size) for p in PROVIDERS[len(CPU_PROVIDERS):] for size in SIZES if (p, size) in medians]
    if gpu:
        lines += ["", "| size | provider (fp16 TensorRT, GPU) | ms |", "|---|---|---|"]
        lines += [f"| {size}x{size} | {p} | {medians[(p, size)] * 1e3:.2f} |" for p, size in gpu]
    lines += ["", f"Batch 1, {ROUNDS} timed rounds after one warm-up per case; random weights (cpl and "
              "promptir share them). The machine was shared with other jobs: see the load average above.", ""]
    bench_notes["inference"].extend(lines)
