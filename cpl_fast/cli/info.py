"""``python -m cpl_fast.cli.info`` / ``cpl-info``: versions, devices, and which backends of every op run."""
from __future__ import annotations

import argparse
import platform
import sys

import cpl_fast


def _cpu_allocator_state() -> str:
    from cpl_fast import memory

    if not memory.cpu_caching_available():
        return "unavailable (needs cpl_fast._C)"
    if memory.cpu_caching_enabled():
        return "installed"
    return "available (cpl_fast.memory; cpl-train uses it on the CPU)"


def collect() -> dict:
    import torch

    from cpl_fast import _extension, ops

    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "cpl_fast": cpl_fast.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton_version,
        "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "extension": _extension.load_error() or "loaded",
        "cpu_caching_allocator": _cpu_allocator_state(),
        "build": _extension.build_config(),
        "backends": {str(d): ops.available_backends(d) for d in devices},
    }


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(prog="cpl-info", description="What cpl_fast was built with and which backend of "
                            "every op runs on each device (and why not)").parse_args(argv)
    info = collect()
    print(f"cpl_fast {info['cpl_fast']}  python {info['python']}  torch {info['torch']}"
          f" (CUDA {info['torch_cuda'] or 'none'})  triton {info['triton'] or 'not installed'}")
    print(f"devices: cpu{''.join(', ' + n for n in info['cuda_devices']) or ' (no CUDA device)'}")
    print(f"extension cpl_fast._C: {info['extension']}")
    print(f"caching CPU allocator: {info['cpu_caching_allocator']}")
    build = info["build"]
    if build:
        print(f"built: CUDA kernels {'yes' if build.get('cuda') else 'no'}"
              f" ({build.get('cuda_reason', build.get('reason', ''))})")
    for device, ops_report in info["backends"].items():
        print(f"\nbackends on {device}:")
        for op, backends in ops_report.items():
            print(f"  {op}:")
            for name, reasons in backends.items():
                print(f"    {name:<10} {'available' if not reasons else 'no: ' + '; '.join(reasons)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
