"""Will one training step fit in memory? An estimate made before the first step allocates anything.

The activation memory of a convolutional / channel-attention network grows with the number of
pixels, so it is measured on two small probes (one image of ``PROBE`` and of ``2 PROBE`` pixels square:
the bytes of every activation autograd saves for the backward pass) and scaled to the configured
crop and batch. The CPR objectives decode every sample once more per negative (``m``) and run the frozen
feature extractor on the positive, the target and each negative, so those are added the same way.
Weights, gradients and the two Adam moments come on top; micro-batches (``optim.accumulate``) run
one after the other, so the peak is one micro-batch's. The estimate is compared with the memory
the device has free (``MemAvailable`` and the cgroup limit on the CPU, ``cudaMemGetInfo`` on a GPU):
above it, the run is refused with the numbers (:class:`MemoryBudgetError`); above half of it, a
warning. It is an estimate (allocator slack and the data loader are not counted), meant to stop
settings that cannot work, such as a 4096-pixel crop, before the operating system kills the run.

The probe runs on a copy of the model under a forked RNG, so training and its bit-for-bit resume are
untouched.
"""
from __future__ import annotations

import copy
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

PROBE = 32
GIB = 2 ** 30


class MemoryBudgetError(ValueError):
    """One training step of this configuration would need more memory than the device has free."""


def _saved_bytes(probe: nn.Module, size: int, channels: int, device: torch.device, dtype: torch.dtype) -> int:
    """Bytes of the activations autograd keeps for the backward of one ``size`` x ``size`` image
    (parameters and buffers, which autograd also saves, are not counted)."""
    own = {t.untyped_storage().data_ptr() for t in [*probe.parameters(), *probe.buffers()]}
    seen: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in own:
            seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        x = torch.rand(1, channels, size, size, device=device, dtype=dtype, requires_grad=True)
        out = probe(x)
        del out
    return sum(seen.values())


def activation_bytes(module: nn.Module, channels: int = 3, sizes: tuple[int, int] = (PROBE, 2 * PROBE),
                     device: torch.device | None = None,
                     dtype: torch.dtype | None = None) -> tuple[float, float]:
    """``(fixed bytes, bytes per pixel)`` of the activations one image keeps for the backward, from
    probes at two sizes (a copy of ``module`` in training mode, under a forked RNG)."""
    param = next(module.parameters(), None)
    device = device or (param.device if param is not None else torch.device("cpu"))
    dtype = dtype or (param.dtype if param is not None else torch.float32)
    probe = copy.deepcopy(module).train()
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        small, large = (_saved_bytes(probe, s, channels, device, dtype) for s in sizes)
    per_pixel = max(0.0, (large - small) / (sizes[1] ** 2 - sizes[0] ** 2))
    return max(0.0, small - per_pixel * sizes[0] ** 2), per_pixel


def free_bytes(device: torch.device) -> int | None:
    """Memory free for this process on ``device`` (None when unknown)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type != "cpu":
        return None
    free = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                free = int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    try:  # a container's limit (cgroup v2)
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
            free = min(free if free is not None else 2 ** 62, int(limit) - used)
    except (OSError, ValueError):
        pass
    return free


def estimate_step_bytes(model: nn.Module, crop: int, batch: int, negatives: int = 0,
                        features: nn.Module | None = None, device: torch.device | None = None,
                        dtype: torch.dtype | None = None) -> int:
    """Estimated peak bytes of one training step (see the module docstring)."""
    fixed, per_pixel = activation_bytes(model, device=device, dtype=dtype)
    total = (fixed + per_pixel * crop * crop) * batch * (1 + negatives)
    if features is not None and negatives:
        fixed, per_pixel = activation_bytes(features, device=device, dtype=dtype)
        total += (fixed + per_pixel * crop * crop) * batch * (2 + negatives)
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    return int(total + 4 * params)


def check_step_memory(model: nn.Module, config: Mapping[str, Any], device: torch.device,
                      dtype: torch.dtype, features: nn.Module | None = None,
                      warn: Callable[[str], None] = print, free: int | None = None) -> int | None:
    """Refuse (MemoryBudgetError) or warn when one step of ``config`` will not fit; returns the estimate."""
    if os.environ.get("CPL_FAST_SKIP_MEMORY_CHECK") == "1":
        return None
    data = config["data"]
    negatives = 0 if config.get("objective") == "l1" else int(config["cpr"]["m"])
    free = free_bytes(device) if free is None else free
    if free is None:
        return None
    estimate = estimate_step_bytes(model, data["crop"], data["batch"], negatives, features, device, dtype)
    text = (f"one training step with data.crop={data['crop']}, data.batch={data['batch']}"
            + (f", cpr.m={negatives}" if negatives else "")
            + f" needs about {estimate / GIB:.1f} GiB on {device}, which has {free / GIB:.1f} GiB free")
    if estimate > free:
        raise MemoryBudgetError(f"{text}: lower data.crop or data.batch (or cpr.m), or use a bigger device "
                                f"(CPL_FAST_SKIP_MEMORY_CHECK=1 skips this estimate)")
    if estimate > free / 2:
        warn(f"warning: {text}")
    return estimate
