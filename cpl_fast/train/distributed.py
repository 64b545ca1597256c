"""This process's place in a ``torchrun`` job, its device, and the negatives of the global batch.

Each process takes every ``world_size``-th sample of the same stream; negatives are drawn for the
global batch (routings and task ids are gathered) with the same generator on every rank, so ``N``
processes with batch ``b`` compute what one process with batch ``N b`` computes.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from cpl_fast import devices
from cpl_fast.config import ConfigError
from cpl_fast.losses.negatives import NegativeSampler
from cpl_fast.models import Routing


@dataclass(frozen=True)
class DistInfo:
    """This process's place in a ``torchrun`` job (rank 0 of 1 without one)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(use_cuda: bool) -> DistInfo:
    """Join the process group ``torchrun`` describes in the environment (NCCL on GPUs, gloo on CPU)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)  # before NCCL starts, so each rank talks from its own GPU
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return DistInfo(rank, world_size, local_rank)


def resolve_device(name: str, process: DistInfo) -> torch.device:
    """The config's ``device`` (``auto``: CUDA when available); ``cuda`` is this rank's GPU in a job."""
    try:
        return devices.resolve_device(name, process.local_rank if process.enabled else None)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


class GlobalBatchSampler:
    """Draws negatives for the global batch of a DDP job and returns this rank's rows.

    Routings (detached) and task ids of every rank are gathered and put in the order one process
    would see them (rank ``r``'s row ``i`` is global row ``i * world_size + r``, as the data sampler
    interleaves); every rank calls the wrapped sampler with the same generator state on the same
    global batch, so all ranks draw the same negatives, and the same as one process would.
    """

    def __init__(self, inner: NegativeSampler, process: DistInfo) -> None:
        self.inner, self.process = inner, process
        self.draws_by_level = inner.draws_by_level

    def _gather(self, tensor: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(tensor) for _ in range(self.process.world_size)]
        dist.all_gather(parts, tensor.detach().contiguous())
        # (W, b, ...) -> (b, W, ...) -> (b W, ...): interleaved like the data sampler's shards.
        return torch.stack(parts).transpose(0, 1).reshape(-1, *tensor.shape[1:])

    def _gather_routing(self, routing: Routing) -> Routing:
        probs = None if routing.probs is None else self._gather(routing.probs)
        return Routing(self._gather(routing.indices), self._gather(routing.weights), probs)

    def _mine(self, routing: Routing) -> Routing:
        r, w = self.process.rank, self.process.world_size
        probs = None if routing.probs is None else routing.probs[r::w]
        return Routing(routing.indices[r::w], routing.weights[r::w], probs)

    def __call__(self, routings: Sequence[Routing], m: int, task_ids: torch.Tensor | None = None,
                 generator: torch.Generator | None = None) -> list[list[Routing]]:
        tasks = None if task_ids is None else self._gather(task_ids)
        gathered = [self._gather_routing(r) for r in routings]
        negatives = self.inner(gathered, m, task_ids=tasks, generator=generator)
        return [[self._mine(r) for r in negative] for negative in negatives]

    def sample_level(self, level: int, routing: Routing, m: int, task_ids: torch.Tensor | None = None,
                     generator: torch.Generator | None = None) -> list[Routing]:
        tasks = None if task_ids is None else self._gather(task_ids)
        negatives = self.inner.sample_level(level, self._gather_routing(routing), m, task_ids=tasks,
                                            generator=generator)
        return [self._mine(r) for r in negatives]
