"""Compile-only checks of every CUDA source under csrc/ (no GPU and no CUDA build of torch needed).

The ``.cu`` files include no torch header, so nvcc compiles each on its own in seconds; this
catches CUDA build errors on machines where setup.py does not build the CUDA kernels. nvcc is
looked up on PATH, under CUDA_HOME, and in PyPI's ``nvidia-cuda-nvcc`` package (the ``nvcc`` extra),
whose headers come from ``nvidia-cuda-cccl`` / ``nvidia-cuda-runtime``.

The torch-facing CUDA registrations (``csrc/*/cuda/*_cuda.cpp``) are C++ that only a CUDA build
compiles. torch's CPU wheel ships the ``c10/cuda`` and ``ATen/cuda`` headers all the same, short of
one file CMake generates, ``c10/cuda/impl/cuda_cmake_macros.h`` (one ``#define`` in a shared-library
build): with a stand-in for it, written at test time, and the CUDA toolkit's headers (where nvcc
finds them), ``g++ -fsyntax-only`` checks these files against torch's real CUDA API.
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import site
import subprocess
from pathlib import Path

import pytest
import torch.utils.cpp_extension

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


# --- the CUDA registrations, syntax-checked against torch's CUDA headers ----------------------------

CUDA_REGISTRATIONS = sorted((ROOT / "csrc").glob("*/cuda/*_cuda.cpp"))
# What setup.py's CUDA build passes the C++ compiler for these files (its "cxx" flags and macros) and what
# torch's BuildExtension adds; -fsyntax-only stops after the front end, so optimisation flags do not matter.
CXX_FLAGS = ["-std=c++17", "-fopenmp", "-DCPL_FAST_WITH_CUDA=1", "-DTORCH_API_INCLUDE_EXTENSION_H",
             "-DTORCH_EXTENSION_NAME=_C"]
# The generated header's whole content in a shared-library build of torch (every wheel is one).
CMAKE_MACROS_STAND_IN = "#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n"
NVCC_INCLUDES = re.compile(r"^#\$ (?:SYSTEM_)?INCLUDES=(.*)$", re.MULTILINE)


def cuda_header_flags() -> list[str]:
    """Include flags of the CUDA toolkit's headers: where nvcc looks (its --dryrun says), then CUDA_HOME."""
    flags: list[str] = []
    found = find_nvcc()
    if found is not None:
        nvcc, extra = found
        dry = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
                             capture_output=True, text=True, timeout=60)
        for match in NVCC_INCLUDES.finditer(dry.stdout + dry.stderr):
            flags += shlex.split(match.group(1))
        flags += extra
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (Path(home) / "include").is_dir():
            flags.append(f"-I{Path(home) / 'include'}")
    return flags


def has_header(flags: list[str], name: str) -> bool:
    dirs = [f[2:] for f in flags if f.startswith("-I")]
    dirs += [b for a, b in zip(flags, flags[1:]) if a == "-isystem"]
    return any((Path(d) / name).is_file() for d in dirs)


def syntax_check_command(source: Path, include_root: Path) -> list[str]:
    """``g++ -fsyntax-only`` of ``source`` against torch's headers, the stand-in and the CUDA headers.

    Skips, saying which, when no C++ compiler, no CUDA header of torch or no CUDA toolkit header exists.
    """
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler (g++, c++ or $CXX)")
    torch_includes = [f"-I{d}" for d in torch.utils.cpp_extension.include_paths()]
    if not has_header(torch_includes, "c10/cuda/CUDAStream.h"):
        pytest.skip("this torch ships no c10/cuda headers")
    cuda = cuda_header_flags()
    if not has_header(cuda, "cuda_runtime_api.h"):
        pytest.skip("no CUDA toolkit headers (cuda_runtime_api.h) beside nvcc, in CUDA_HOME, /usr/local/cuda")
    stand_in = include_root / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
    stand_in.parent.mkdir(parents=True, exist_ok=True)
    stand_in.write_text(CMAKE_MACROS_STAND_IN)
    # torch's own directories come first: a CUDA build of torch has the real generated header.
    return [cxx, "-fsyntax-only", *CXX_FLAGS, *torch_includes, f"-I{include_root}", *cuda, str(source)]


def test_there_are_cuda_registrations():
    assert CUDA_REGISTRATIONS, "csrc/ holds no */cuda/*_cuda.cpp file"


@pytest.mark.parametrize("source", CUDA_REGISTRATIONS, ids=lambda p: str(p.relative_to(ROOT)))
def test_cuda_registration_compiles_against_torch_cuda_api(source: Path, tmp_path: Path):
    command = syntax_check_command(source, tmp_path / "include")
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{shlex.join(command)}\n{result.stdout}\n{result.stderr[-8000:]}"


def test_syntax_check_rejects_a_wrong_use_of_the_cuda_api(tmp_path: Path):
    """The check reads torch's real declarations: a call that does not exist there fails it."""
    source = tmp_path / "wrong_cuda.cpp"
    source.write_text("#include <c10/cuda/CUDAStream.h>\n"
                      "void f() { c10::cuda::getCurrentCUDAStream().no_such_member(); }\n")
    command = syntax_check_command(source, tmp_path / "include")
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode != 0 and "no_such_member" in result.stderr, result.stderr[-4000:]
