"""The README's commands run as written: each command below is quoted from the README (the test fails
when the README stops showing it) and run through the installed entry points, with the README's
placeholders filled in and tiny training settings appended."""
from __future__ import annotations

import importlib.util
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.tiny_runs import TINY_RUN, as_sets

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
BIN = Path(sys.executable).parent
TINY = as_sets(TINY_RUN)


def _documented(text: str) -> None:
    assert text in README, f"the README no longer shows {text!r}: update it and this test together"


def _tool(name: str) -> str:
    path = BIN / name
    if not path.exists():
        found = shutil.which(name)
        if found is None:
            pytest.skip(f"{name} is not installed (pip install -e . puts the commands next to python)")
        return found
    return str(path)


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            **extra}


def _run(args: list[str], cwd: Path, timeout: int = 600, **env: str) -> str:
    proc = subprocess.run(args, cwd=cwd, env=_env(**env), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n" \
                                 f"{proc.stderr[-3000:]}"
    return proc.stdout


def _free_port() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A folder with the quick start's run (``runs/demo-*``) and the materialised embedded data."""
    folder = tmp_path_factory.mktemp("readme")
    quick_start = "bash scripts/setup_env.sh && .venv/bin/cpl-train --preset demo"
    _documented(quick_start)
    # The setup half is what CI runs before the tests; the training half runs here as written.
    _run([_tool("cpl-train"), "--preset", "demo", *TINY], folder)
    runs = sorted((folder / "runs").glob("demo-*"))
    assert len(runs) == 1
    _documented("`cpl-data materialize ROOT`")
    _run([_tool("cpl-data"), "materialize", str(folder / "data")], folder)
    return folder, runs[0]


def test_quick_start_test_command_is_what_ci_runs():
    _documented("bash scripts/setup_env.sh && .venv/bin/python -m pytest -n 2")
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert "bash scripts/setup_env.sh" in ci and re.search(r"^\.venv/bin/python -m pytest -n 2$", ci, re.M)


def test_usage_snippet_runs():
    block = re.search(r"## Usage\n\n```python\n(.*?)```", README, re.S)
    assert block is not None
    exec(compile(block.group(1), "README.md (Usage)", "exec"), {})  # noqa: S102 - the project's own README


def test_torchrun_forms(work):
    folder, _ = work
    _documented("`torchrun --nproc-per-node N -m cpl_fast.cli.train ...`")
    _documented("`torchrun --nproc-per-node N --no-python cpl-train ...`")
    sets = TINY
    jobs = [
        subprocess.Popen([_tool("torchrun"), "--nproc-per-node", "2", "-m", "cpl_fast.cli.train", "--preset",
                          "demo", "--run-dir", str(folder / "ddp_module"), *sets], cwd=folder,
                         env=_env(PET_MASTER_PORT=_free_port()), stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True),
        subprocess.Popen([_tool("torchrun"), "--nproc-per-node", "2", "--no-python", "cpl-train", "--preset",
                          "demo", "--run-dir", str(folder / "ddp_script"), *sets], cwd=folder,
                         env=_env(PET_MASTER_PORT=_free_port()), stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True),
    ]
    for job in jobs:
        out, _ = job.communicate(timeout=600)
        assert job.returncode == 0, out[-4000:]
    for name in ("ddp_module", "ddp_script"):
        assert (folder / name / "checkpoints" / "latest").is_file()


def test_print_config_and_resume(work):
    folder, run = work
    _documented("`cpl-train --print-config --preset demo --set eval.every=50`")
    out = _run([_tool("cpl-train"), "--print-config", "--preset", "demo", "--set", "eval.every=50"], folder)
    assert "every: 50" in out
    _documented("[--resume RUN_DIR]")
    out = _run([_tool("cpl-train"), "--resume", str(run), "--set", "train.iterations=3"], folder)
    assert "is now 3" in out


def test_data_eval_restore_analyze(work):
    folder, run = work
    _documented("`cpl-data verify --layout promptir3|promptir5|allweather|cdd11|weatherbench|paired ROOT`")
    _run([_tool("cpl-data"), "verify", "--layout", "paired", str(folder / "data" / "test")], folder)
    _documented("`cpl-eval --preset three_task --ckpt C --data ROOT [--protocol")
    _documented("[--input-baseline] [--json F --markdown F]")
    out = _run([_tool("cpl-eval"), "--ckpt", str(run), "--protocol", "promptir", "--input-baseline",
                "--max-images", "2", "--json", "eval.json", "--markdown", "eval.md"], folder)
    assert "PSNR" in out and (folder / "eval.json").is_file() and (folder / "eval.md").is_file()
    _documented("`cpl-restore IMAGES... -o DIR --ckpt C [--force] [--tile auto|N]`")
    image = next((folder / "data" / "test" / "input").rglob("*.png"))
    _run([_tool("cpl-restore"), str(image), "-o", "restored", "--ckpt", str(run), "--tile", "auto"], folder)
    assert (folder / "restored" / image.name).is_file()
    _documented("`cpl-analyze --ckpt C [--ckpt C2 ...] -o DIR`")
    _run([_tool("cpl-analyze"), "--ckpt", str(run), "-o", "analysis", "--max-images", "3"], folder)
    assert (folder / "analysis" / "summary.json").is_file() and (folder / "analysis" / run.name).is_dir()


def test_export_and_info(work):
    folder, run = work
    _documented("`cpl-export onnx --ckpt C -o model.onnx (--height H --width W | --dynamic) [--routing]`")
    pytest.importorskip("onnx")
    _run([_tool("cpl-export"), "onnx", "--ckpt", str(run), "-o", "model.onnx", "--height", "32", "--width",
          "32"], folder)
    _documented("`cpl-export trt --onnx model.onnx -o model.engine [--fp16|--bf16] [--min/--opt/--max")
    if importlib.util.find_spec("tensorrt") or importlib.util.find_spec("tensorrt_rtx"):
        _run([_tool("cpl-export"), "trt", "--onnx", "model.onnx", "-o", "model.engine"], folder)
        assert (folder / "model.engine").is_file()
    _documented("`cpl-convert SRC -o OUT.pth|OUT.ckpt [--to basicsr|lightning] [--model PRESET] [--force]`")
    _run([_tool("cpl-convert"), str(run), "-o", "run.pth"], folder)
    out = _run([_tool("cpl-eval"), "--ckpt", "run.pth", "--preset", "demo", "--max-images", "1"], folder)
    assert "PSNR" in out
    _documented("`cpl-info`")
    assert "backends on cpu" in _run([_tool("cpl-info")], folder)


def test_backbone_ab_script_runs(tmp_path):
    _documented("(`python bench/backbone_ab.py`)")
    out = _run([sys.executable, str(ROOT / "bench" / "backbone_ab.py"), "--model", "tiny", "--size", "16",
                "--batch", "1", "--rounds", "1"], tmp_path)
    assert "reference / fused" in out

