"""Build of cpl_fast._C.

C++ sources (csrc/**/*.cpp) are always compiled; CUDA sources (csrc/**/*.cu plus the
``*_cuda.cpp`` registrations) only when torch is a CUDA build and nvcc is found, or when
``CPL_FAST_FORCE_CUDA=1``. ``CPL_FAST_NO_EXT=1`` installs the pure-Python package.

Environment switches: CPL_FAST_FORCE_CUDA, CPL_FAST_NO_EXT, TORCH_CUDA_ARCH_LIST (read by torch),
MAX_JOBS (read by torch's ninja build), NVCC_FLAGS (extra nvcc flags), DEBUG=1 (-O0 -g).
What was built is printed and recorded in cpl_fast/_build_config.json for ``cpl-info``.
"""
import glob
import json
import os
import shutil

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _record(config):
    path = os.path.join(ROOT, "cpl_fast", "_build_config.json")
    with open(path, "w") as f:
        json.dump(config, f, indent=2)
    print("cpl_fast build configuration:")
    for key, value in config.items():
        print(f"  {key}: {value}")


def _extensions():
    if _flag("CPL_FAST_NO_EXT"):
        _record({"extension": False, "reason": "CPL_FAST_NO_EXT=1"})
        return [], {}

    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    debug = _flag("DEBUG")
    cpp_sources = sorted(glob.glob("csrc/**/*.cpp", recursive=True))
    cuda_sources = sorted(glob.glob("csrc/**/*.cu", recursive=True))
    cuda_cpp = [s for s in cpp_sources if s.endswith("_cuda.cpp")]
    cpu_cpp = [s for s in cpp_sources if s not in cuda_cpp]

    nvcc = shutil.which("nvcc") or (os.path.join(CUDA_HOME, "bin", "nvcc") if CUDA_HOME else None)
    torch_has_cuda = torch.version.cuda is not None
    force_cuda = _flag("CPL_FAST_FORCE_CUDA")
    with_cuda = force_cuda or (torch_has_cuda and nvcc is not None and os.path.exists(nvcc))
    if with_cuda:
        why = "forced (CPL_FAST_FORCE_CUDA=1)" if force_cuda else f"torch {torch.__version__}, nvcc {nvcc}"
    elif not torch_has_cuda:
        why = f"torch {torch.__version__} is a CPU build"
    else:
        why = "nvcc not found"

    opt = ["-O0", "-g"] if debug else ["-O3"]
    cxx = opt + ["-std=c++17"]
    if os.name != "nt":
        cxx += ["-fopenmp"] if not debug else []
    define_macros = []
    sources = cpu_cpp
    kwargs = dict(extra_compile_args={"cxx": cxx}, define_macros=define_macros)
    if with_cuda:
        define_macros.append(("CPL_FAST_WITH_CUDA", "1"))
        nvcc_flags = opt + ["-std=c++17", "--expt-relaxed-constexpr"]
        nvcc_flags += os.environ.get("NVCC_FLAGS", "").split()
        kwargs["extra_compile_args"]["nvcc"] = nvcc_flags
        ext = CUDAExtension("cpl_fast._C", sources + cuda_cpp + cuda_sources, **kwargs)
    else:
        kwargs["extra_link_args"] = ["-fopenmp"] if (os.name != "nt" and not debug) else []
        ext = CppExtension("cpl_fast._C", sources, **kwargs)

    _record({
        "extension": True,
        "torch": torch.__version__,
        "cuda": bool(with_cuda),
        "cuda_reason": why,
        "torch_cuda_arch_list": os.environ.get("TORCH_CUDA_ARCH_LIST"),
        "debug": debug,
        "sources": ext.sources,
    })
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
