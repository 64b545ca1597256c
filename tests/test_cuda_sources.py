"""Compile-only checks of every CUDA source under csrc/ (no GPU and no CUDA build of torch needed).

The ``.cu`` files include no torch header, so nvcc compiles each on its own in seconds; this
catches CUDA build errors on machines where setup.py does not build the CUDA kernels. nvcc is
looked up on PATH, under CUDA_HOME, and in PyPI's ``nvidia-cuda-nvcc`` package (the ``nvcc`` extra),
whose headers come from ``nvidia-cuda-cccl`` / ``nvidia-cuda-runtime``.
"""
from __future__ import annotations

import os
import re
import shutil
import site
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CU_SOURCES = sorted((ROOT / "csrc").rglob("*.cu"))
TORCH_INCLUDE = re.compile(r'^\s*#\s*include\s*[<"](torch|ATen|c10)/', re.MULTILINE)
# torch's CUDA extensions are built with these; the kernels must not rely on implicit half conversions.
TORCH_NVCC_DEFINES = ["-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                      "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__"]
ARCH_FLAGS = ["-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90"]


def find_nvcc() -> tuple[str, list[str]] | None:
    """``(nvcc, extra include flags)``, or None when no CUDA compiler is installed."""
    found = shutil.which("nvcc")
    if found:
        return found, []
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if cuda_home and (Path(cuda_home) / "bin" / "nvcc").exists():
        return str(Path(cuda_home) / "bin" / "nvcc"), []
    for packages in site.getsitepackages() + [site.getusersitepackages()]:
        nvidia = Path(packages) / "nvidia"
        nvcc = nvidia / "cuda_nvcc" / "bin" / "nvcc"
        if nvcc.exists():
            includes = [f"-I{d}" for d in (nvidia / "cuda_nvcc" / "include", nvidia / "cuda_cccl" / "include",
                                           nvidia / "cuda_runtime" / "include") if d.is_dir()]
            return str(nvcc), includes
    return None


def test_there_are_cuda_sources():
    assert CU_SOURCES, "csrc/ holds no .cu file"


@pytest.mark.parametrize("source", CU_SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_cu_file_includes_no_torch_header(source: Path):
    match = TORCH_INCLUDE.search(source.read_text())
    assert match is None, f"{source.name} includes a torch header: {match.group(0).strip()}"


@pytest.mark.parametrize("source", CU_SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_cu_file_compiles(source: Path, tmp_path: Path):
    found = find_nvcc()
    if found is None:
        pytest.skip("no nvcc on PATH, under CUDA_HOME, or from the nvidia-cuda-nvcc package (pip install .[nvcc])")
    nvcc, includes = found
    command = [nvcc, "-c", *ARCH_FLAGS, "-std=c++17", "-O3", "--expt-relaxed-constexpr", *TORCH_NVCC_DEFINES,
               *includes, f"-I{source.parent}", str(source), "-o", str(tmp_path / (source.stem + ".o"))]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{' '.join(command)}\n{result.stdout}\n{result.stderr}"
    assert (tmp_path / (source.stem + ".o")).stat().st_size > 0
