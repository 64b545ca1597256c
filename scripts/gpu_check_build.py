"""The build phase of scripts/gpu_check.py: check the toolchain, then (``--install``) build and install it.

``python scripts/gpu_check_build.py [--install] [--json FILE]``

Checks, without downloading anything: the installed torch satisfies every ``torch`` requirement of
pyproject.toml (build-system and project dependencies), setuptools (>= 64, for editable installs),
wheel and ninja are installed (and the ninja binary found), and a C++ compiler and nvcc are there
(nvcc is required with ``--install`` when torch is a CUDA build: the GPU check is about the CUDA
kernels). With ``--install`` it then runs
``pip install --no-build-isolation --no-deps --no-index -e .`` with ``TORCH_CUDA_ARCH_LIST`` (default
9.0, Hopper) and ``MAX_JOBS`` (default: the machine's cores) and reads back what setup.py recorded
(cpl_fast/_build_config.json); a torch CUDA build whose extension came out without CUDA kernels is
a failure. ``--json`` writes the findings. Exit status 0 when everything needed is there.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_ARCH = "9.0"
REQUIREMENT = re.compile(r"^\s*torch\s*>=\s*([0-9][0-9.]*)\s*$")


def version_tuple(text: str) -> tuple[int, ...]:
    """``"2.11.0+cu130"`` -> ``(2, 11, 0)``: release numbers only, enough for ``>=`` bounds."""
    return tuple(int(part) for part in re.findall(r"\d+", text.split("+")[0])[:3])


def torch_requirements(pyproject: Path) -> list[str]:
    """Every ``torch>=X`` lower bound written in pyproject.toml (build-system requires, dependencies)."""
    bounds = []
    for quoted in re.findall(r'"([^"]*)"', pyproject.read_text()):
        match = REQUIREMENT.match(quoted)
        if match:
            bounds.append(match.group(1))
        elif quoted.strip().startswith("torch") and re.match(r"^\s*torch\s*[<>=!~]", quoted):
            bounds.append(f"unparsed: {quoted}")
    return bounds


def find_nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "nvcc").exists():
            return str(Path(home) / "bin" / "nvcc")
    return None


def build_path() -> str:
    """PATH for the build: this Python's own bin folder first (ninja, as an activated environment has it)."""
    return os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])


def preflight(install: bool) -> tuple[dict, list[str]]:
    """``(findings, problems)``: what is installed, and why the build cannot go ahead (empty: it can)."""
    findings: dict = {"python": sys.version.split()[0], "executable": sys.executable}
    problems: list[str] = []
    try:
        import torch
    except ImportError as exc:
        return findings, [f"torch does not import: {exc}"]
    findings.update(torch=torch.__version__, torch_cuda=torch.version.cuda)
    for bound in torch_requirements(ROOT / "pyproject.toml"):
        if bound.startswith("unparsed"):
            problems.append(f"pyproject.toml: a torch requirement this check cannot read ({bound})")
        elif version_tuple(torch.__version__) < version_tuple(bound):
            problems.append(f"pyproject.toml asks for torch>={bound}, this is torch {torch.__version__}")
    findings["torch_requirements"] = torch_requirements(ROOT / "pyproject.toml")
    for package, minimum in (("setuptools", "64"), ("wheel", None), ("ninja", None), ("pip", None)):
        try:
            version = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            problems.append(f"{package} is not installed (the build runs without downloading anything)")
            continue
        findings[package] = version
        if minimum and version_tuple(version) < version_tuple(minimum):
            problems.append(f"{package} {version} is older than {minimum}")
    ninja = shutil.which("ninja", path=build_path())
    findings["ninja_binary"] = ninja
    if ninja is None:
        problems.append("no ninja binary on PATH or beside this Python (torch's extension build needs it)")
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    findings["cxx"] = cxx
    if cxx is None:
        problems.append("no C++ compiler (g++, c++ or $CXX)")
    nvcc = find_nvcc()
    findings["nvcc"] = nvcc
    if nvcc:
        done = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60)
        findings["nvcc_version"] = (done.stdout.strip().splitlines() or ["?"])[-1]
    elif install and torch.version.cuda:
        problems.append("torch is a CUDA build but no nvcc was found (PATH, CUDA_HOME, /usr/local/cuda): "
                        "the CUDA kernels would not be built")
    return findings, problems


def install(findings: dict) -> list[str]:
    """Build and install the working tree; problems found (empty: the CUDA extension was built)."""
    env = dict(os.environ, PATH=build_path())
    env.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCH)
    env.setdefault("MAX_JOBS", str(os.cpu_count() or 1))
    findings["build_env"] = {key: env[key] for key in ("TORCH_CUDA_ARCH_LIST", "MAX_JOBS")}
    command = [sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "--no-index",
               "--disable-pip-version-check", "-v", "-e", "."]
    print("$", " ".join(command), flush=True)
    done = subprocess.run(command, cwd=ROOT, env=env)
    if done.returncode != 0:
        return [f"pip install failed (exit {done.returncode}); the compiler's messages are above"]
    try:
        config = json.loads((ROOT / "cpl_fast" / "_build_config.json").read_text())
    except (OSError, ValueError) as exc:
        return [f"setup.py recorded no build configuration: {exc}"]
    findings["build_config"] = config
    if findings.get("torch_cuda") and not config.get("cuda"):
        return [f"the extension was built without CUDA kernels: {config.get('cuda_reason', config)}"]
    return []


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--install", action="store_true", help="build and install after the checks")
    parser.add_argument("--json", type=Path, help="write the findings here")
    args = parser.parse_args(argv)
    findings, problems = preflight(args.install)
    for key, value in findings.items():
        print(f"{key}: {value}", flush=True)
    if not problems and args.install:
        problems = install(findings)
    findings["problems"] = problems
    if args.json:
        args.json.write_text(json.dumps(findings, indent=2, default=str))
    for problem in problems:
        print(f"PROBLEM: {problem}", flush=True)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
