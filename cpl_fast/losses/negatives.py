"""Negative samplers for contrastive prompt regularisation.

A negative is the same image decoded with a mismatched prompt: a forced routing at every prompt
level. Every sampler is a callable

    sampler(routings, m, task_ids=None, generator=None) -> negatives

with ``routings`` the positive's per-level ``Routing`` (batched), and ``negatives`` a list of ``m``
negatives, each a per-level list of ``Routing(indices (B, k), weights (B, k), probs=None)``, all
detached (a negative's routing is a fixed input, not something the loss should move). Randomness
comes only from ``generator`` (a ``torch.Generator``; the global generator when None), so a seeded
generator reproduces the draw.

Every sampler also has ``sample_level(level, routing, m, task_ids=None, generator=None)``, the ``m``
negatives of one prompt level, and ``draws_by_level``: whether calling ``sample_level`` for levels
``0, 1, ...`` in turn draws what one full call draws. A step that routes level by level (the fast
step's one-pass decode) needs that; a sampler whose negatives tie the levels together (``OtherTask``
takes every level of one other sample) says False and is only called whole.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import Protocol

import torch

from cpl_fast.models.spm import Routing


class NegativeSampler(Protocol):
    draws_by_level: bool

    def __call__(self, routings: Sequence[Routing], m: int, task_ids: torch.Tensor | None = None,
                 generator: torch.Generator | None = None) -> list[list[Routing]]: ...

    def sample_level(self, level: int, routing: Routing, m: int, task_ids: torch.Tensor | None = None,
                     generator: torch.Generator | None = None) -> list[Routing]: ...


def _check_routings(routings: Sequence[Routing]) -> int:
    """Validate per-level routings of one batch; return the batch size."""
    if len(routings) == 0:
        raise ValueError("need the routing of at least one prompt level")
    batch = routings[0].indices.shape[0]
    for level, routing in enumerate(routings):
        indices, weights = routing.indices, routing.weights
        if indices.dtype != torch.int64:
            raise TypeError(f"level {level}: routing indices must be int64, got {indices.dtype}")
        if indices.dim() != 2 or indices.shape[0] != batch or tuple(weights.shape) != tuple(indices.shape):
            raise ValueError(f"level {level}: expected indices and weights (B={batch}, k), got "
                             f"{tuple(indices.shape)} and {tuple(weights.shape)}")
    return batch


def _check_m(m: int) -> None:
    if not isinstance(m, int) or m < 1:
        raise ValueError(f"the number of negatives m must be a positive int, got {m!r}")


def _draw_device(generator: torch.Generator | None) -> torch.device:
    return generator.device if generator is not None else torch.device("cpu")


class MismatchedExperts:
    """Each negative shifts the expert identities of the positive, keeping its gate weights.

    At each level, for each sample, ``m`` distinct shifts ``s_1 .. s_m`` are drawn without
    replacement from ``{1, ..., n-1}`` and negative ``t`` uses indices ``(idx + s_t) mod n`` with the
    positive's weights. So every slot of every negative differs from the positive's expert in that
    slot, the ``m`` negatives use ``m`` different experts in each slot (with ``k = 1`` and
    ``m = n - 1`` they cover every other expert exactly once), and the ``k`` experts of a negative
    stay distinct (a shift is a bijection), so a negative is itself a valid top-``k`` routing.
    Dense routings (``k = n``, PromptIR) are handled by the same rule: the negative is a cyclic
    relabelling of the experts, each expert receiving another's probability. Needs ``m <= n - 1``.
    Shifts are drawn independently per level and per sample.
    """

    draws_by_level = True

    def __init__(self, num_prompts: int) -> None:
        if not isinstance(num_prompts, int) or num_prompts < 2:
            raise ValueError(f"mismatched experts need at least 2 prompt experts, "
                             f"got num_prompts={num_prompts!r}")
        self.num_prompts = num_prompts

    def __call__(self, routings: Sequence[Routing], m: int, task_ids: torch.Tensor | None = None,
                 generator: torch.Generator | None = None) -> list[list[Routing]]:
        """``task_ids`` is ignored: this sampler needs no labels. The loop of ``sample_level`` over levels."""
        self._check_m(m)
        _check_routings(routings)
        for level, routing in enumerate(routings):
            self._check_level(level, routing)
        per_level = [self._draw_level(routing, m, generator) for routing in routings]
        return [[negatives[t] for negatives in per_level] for t in range(m)]

    def sample_level(self, level: int, routing: Routing, m: int, task_ids: torch.Tensor | None = None,
                     generator: torch.Generator | None = None) -> list[Routing]:
        """The ``m`` negatives of one prompt level, ``routing`` being the positive's at that level.

        Calling it for levels ``0, 1, ...`` in turn with one generator draws exactly what one full call
        draws, so a step can draw each level's negatives once that level's positive routing exists.
        """
        self._check_m(m)
        _check_routings([routing])
        self._check_level(level, routing)
        return self._draw_level(routing, m, generator)

    def _check_m(self, m: int) -> None:
        _check_m(m)
        if m >= self.num_prompts:
            raise ValueError(f"mismatched_experts draws m={m} different experts out of the "
                             f"n-1={self.num_prompts - 1} others; need m <= n-1 (n={self.num_prompts})")

    def _check_level(self, level: int, routing: Routing) -> None:
        n = self.num_prompts
        k = routing.indices.shape[1]
        if k > n:
            raise ValueError(f"level {level}: k={k} selected experts but only n={n} exist")
        indices = routing.indices
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= n):
            raise ValueError(f"level {level}: expert indices must lie in [0, n={n})")

    def _draw_level(self, routing: Routing, m: int, generator: torch.Generator | None) -> list[Routing]:
        n = self.num_prompts
        batch = routing.indices.shape[0]
        # (B, n-1) random keys -> a random permutation of {1..n-1} per sample; keep the first m.
        keys = torch.rand(batch, n - 1, generator=generator, device=_draw_device(generator))
        shifts = (keys.argsort(dim=-1)[:, :m] + 1).to(routing.indices.device)              # (B, m)
        indices = routing.indices.detach()
        weights = routing.weights.detach()
        return [Routing((indices + shifts[:, t:t + 1]) % n, weights, None) for t in range(m)]


class OtherTask:
    """Each negative takes the routing (indices and weights, every level) of a sample of another task.

    For sample ``b`` of task ``c``, the candidate tasks are all tasks ``!= c`` that are in the batch
    or in the memory. ``m`` of them are drawn without replacement (when fewer than ``m`` exist,
    every candidate is used as evenly as possible, in random order); for each drawn task the
    routing of a random sample of that task is taken from the batch if the batch has that task,
    else from the memory. The memory keeps, per task, the last ``memory_size`` routings seen
    (detached), and is updated after each call's draw with that call's routings.

    ``last_negative_tasks`` ``(B, m)`` holds the tasks of the last draw (for task-similarity
    weights, see ``cpl_fast.losses.negative_weights_from_similarity``).
    """

    # The sample a negative copies is chosen once for all levels, so no level can be drawn alone.
    draws_by_level = False

    def __init__(self, num_tasks: int, memory_size: int = 16) -> None:
        if not isinstance(num_tasks, int) or num_tasks < 2:
            raise ValueError(f"other_task negatives need at least 2 tasks, got num_tasks={num_tasks!r}")
        if not isinstance(memory_size, int) or memory_size < 1:
            raise ValueError(f"memory_size must be a positive int, got {memory_size!r}")
        self.num_tasks = num_tasks
        self.memory_size = memory_size
        # memory[c]: recent routings of task c, each a tuple over levels of (indices (k,), weights (k,)).
        self.memory: list[deque[tuple[tuple[torch.Tensor, torch.Tensor], ...]]] = [
            deque(maxlen=memory_size) for _ in range(num_tasks)]
        self.last_negative_tasks: torch.Tensor | None = None

    def __call__(self, routings: Sequence[Routing], m: int, task_ids: torch.Tensor | None = None,
                 generator: torch.Generator | None = None) -> list[list[Routing]]:
        _check_m(m)
        batch = _check_routings(routings)
        tasks = self._check_task_ids(task_ids, batch)
        levels = len(routings)
        for entries in self.memory:
            if entries and len(entries[0]) != levels:
                raise ValueError(f"the memory holds routings of {len(entries[0])} levels, "
                                 f"the batch has {levels}")

        in_batch = {c: [b for b in range(batch) if tasks[b] == c] for c in set(tasks)}
        # Pool of rows: the batch's rows first, then every memory entry.
        memory_rows: list[tuple[tuple[torch.Tensor, torch.Tensor], ...]] = []
        in_memory: dict[int, list[int]] = {}
        for c, entries in enumerate(self.memory):
            if entries and c not in in_batch:
                in_memory[c] = list(range(batch + len(memory_rows), batch + len(memory_rows) + len(entries)))
                memory_rows.extend(entries)

        device = _draw_device(generator)
        chosen = torch.empty(batch, m, dtype=torch.int64)
        chosen_tasks = torch.empty(batch, m, dtype=torch.int64)
        for b in range(batch):
            candidates = sorted(c for c in set(in_batch) | set(in_memory) if c != tasks[b])
            if not candidates:
                raise ValueError(f"sample {b} (task {tasks[b]}) has no negative: no other task is in the "
                                 f"batch or in the memory yet")
            order: list[int] = []
            while len(order) < m:    # every candidate once per round, rounds in random order
                perm = torch.randperm(len(candidates), generator=generator, device=device).tolist()
                order += [candidates[i] for i in perm]
            for t, c in enumerate(order[:m]):
                rows = in_batch.get(c) or in_memory[c]
                pick = int(torch.randint(len(rows), (1,), generator=generator, device=device))
                chosen[b, t] = rows[pick]
                chosen_tasks[b, t] = c

        negatives: list[list[Routing]] = [[] for _ in range(m)]
        for level, routing in enumerate(routings):
            indices = routing.indices.detach()
            weights = routing.weights.detach()
            if memory_rows:
                shapes = {tuple(row[level][0].shape) for row in memory_rows}
                if shapes != {tuple(indices.shape[1:])}:
                    raise ValueError(f"level {level}: the memory holds routings with k in "
                                     f"{sorted(s[0] for s in shapes)}, the batch has k={indices.shape[1]}")
                memory_indices = torch.stack([row[level][0] for row in memory_rows])
                memory_weights = torch.stack([row[level][1] for row in memory_rows])
                indices = torch.cat([indices, memory_indices.to(indices.device)])
                weights = torch.cat([weights, memory_weights.to(device=weights.device, dtype=weights.dtype)])
            for t in range(m):
                rows = chosen[:, t].to(indices.device)
                negatives[t].append(Routing(indices[rows], weights[rows], None))

        self.last_negative_tasks = chosen_tasks
        self._remember(routings, tasks)
        return negatives

    def sample_level(self, level: int, routing: Routing, m: int, task_ids: torch.Tensor | None = None,
                     generator: torch.Generator | None = None) -> list[Routing]:
        """Not available (``draws_by_level`` is False): a negative copies every level of one other
        sample, so call the sampler with all levels."""
        raise NotImplementedError("other_task negatives take every prompt level of one other sample; "
                                  "call the sampler with the routings of all levels")

    def _check_task_ids(self, task_ids: torch.Tensor | None, batch: int) -> list[int]:
        if task_ids is None:
            raise ValueError("other_task negatives need task_ids (B,) with each sample's task; got None "
                             "(use mismatched_experts when the data has no task labels)")
        if (not isinstance(task_ids, torch.Tensor) or task_ids.is_floating_point()
                or task_ids.dtype == torch.bool):
            kind = getattr(task_ids, "dtype", type(task_ids))
            raise TypeError(f"task_ids must be an integer tensor, got {kind}")
        if tuple(task_ids.shape) != (batch,):
            raise ValueError(f"task_ids must have shape (B,) = ({batch},), got {tuple(task_ids.shape)}")
        tasks = [int(c) for c in task_ids.tolist()]
        if any(c < 0 or c >= self.num_tasks for c in tasks):
            raise ValueError(f"task_ids must lie in [0, num_tasks={self.num_tasks}), "
                             f"got {sorted(set(tasks))}")
        return tasks

    def _remember(self, routings: Sequence[Routing], tasks: list[int]) -> None:
        # Only the last memory_size samples of each task would survive the ring buffer anyway.
        for c in set(tasks):
            rows = [b for b in range(len(tasks)) if tasks[b] == c][-self.memory_size:]
            for b in rows:
                self.memory[c].append(tuple((r.indices[b].detach().clone(), r.weights[b].detach().clone())
                                            for r in routings))


NEGATIVE_SAMPLERS: dict[str, type] = {"mismatched_experts": MismatchedExperts, "other_task": OtherTask}


def build_negative_sampler(name: str, **kwargs) -> NegativeSampler:
    """Build a negative sampler by config name (``mismatched_experts``, ``other_task``)."""
    if name not in NEGATIVE_SAMPLERS:
        raise ValueError(f"unknown negative sampler '{name}'; choose one of {sorted(NEGATIVE_SAMPLERS)}")
    return NEGATIVE_SAMPLERS[name](**kwargs)
