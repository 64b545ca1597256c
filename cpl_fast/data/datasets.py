"""Torch datasets and a task-balanced sampler, reproducible from ``(seed, epoch, position)``.

Every random choice for an item (the synthesised degradation, the crop, the flip/rotation) comes from
generators seeded by ``(seed, epoch, index)``, never from a global or per-worker generator. The
sampler's order comes from ``(seed, epoch)``. So the stream of batches depends only on those numbers:
the same on every run, with any number of workers, and resumable mid-epoch with
:meth:`TaskBalancedSampler.set_start` (what bit-for-bit training resumption needs).

The sampler yields ``(epoch, index)`` keys, which the datasets accept as well as plain ints: the
epoch travels with each key into the worker processes, so even persistent workers (which keep their
own copy of the dataset) use the right epoch.
"""
from __future__ import annotations

import itertools
import random
import re
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, Protocol

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from cpl_fast.data.degradations import DEGRADATIONS, make_rng
from cpl_fast.data.io import ImageReadError, hwc_to_tensor, read_image_array
from cpl_fast.data.layouts import Sample, load_layout

Key = int | tuple[int, int]

# Canonical order of the restoration task families (PromptIR/AdaIR's), so task ids are stable.
TASK_FAMILY_ORDER = ("denoise", "derain", "dehaze", "deblur", "enhance")


# ------------------------------------------------------------------------------------ pair sources

class SampleError(ImageReadError, ValueError):
    """A sample cannot be used: an image that does not decode or is missing, or an input whose size
    differs from its target's. The message names the files (``cpl-data verify`` finds these up front)."""


class PairSource(Protocol):
    """What the datasets read from: per item a task, a name, a test subset and an (input, target) pair."""

    tasks: Sequence[str]
    names: Sequence[str]
    subsets: Sequence[str]

    def __len__(self) -> int: ...

    def load(self, index: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """(input, target) as (H, W, 3) float32 arrays in [0, 1]; ``rng`` drives synthesised degradations."""
        ...


class FilePairs:
    """Pairs read from image files (the samples of a layout); synthesised inputs are made on load."""

    def __init__(self, samples: Sequence[Sample]) -> None:
        if not samples:
            raise ValueError("FilePairs needs at least one sample")
        for s in samples:
            if s.degradation is not None and s.degradation not in DEGRADATIONS:
                raise ValueError(f"sample {s.name}: unknown degradation {s.degradation!r}")
        self.samples = list(samples)
        self.tasks = [s.task for s in self.samples]
        self.names = [s.name for s in self.samples]
        self.subsets = [s.subset for s in self.samples]

    @classmethod
    def from_layout(cls, layout: str, root: str, split: str | None = None) -> FilePairs:
        """Validate and read a dataset tree (raises ``LayoutError`` listing every problem)."""
        return cls(load_layout(layout, root, split))

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        s = self.samples[index]
        try:
            target = read_image_array(s.target)
            inp = None if s.input is None else read_image_array(s.input)
        except (ImageReadError, FileNotFoundError) as exc:
            raise SampleError(str(exc)) from exc
        if inp is None:
            return DEGRADATIONS[s.degradation](target, rng, **dict(s.params)), target
        if inp.shape != target.shape:
            raise SampleError(f"input {s.input} is {inp.shape[1]}x{inp.shape[0]} but its target {s.target} "
                              f"is {target.shape[1]}x{target.shape[0]}")
        return inp, target


class ArrayPairs:
    """Pairs held in memory as (H, W, 3) uint8 arrays (the embedded dataset)."""

    def __init__(self, inputs: Sequence[np.ndarray], targets: Sequence[np.ndarray], tasks: Sequence[str],
                 names: Sequence[str], subsets: Sequence[str] | None = None) -> None:
        n = len(inputs)
        if not n or not len(targets) == len(tasks) == len(names) == n:
            raise ValueError(f"inputs, targets, tasks and names must be non-empty and equally long, got "
                             f"{n}, {len(targets)}, {len(tasks)}, {len(names)}")
        for i, (a, b) in enumerate(zip(inputs, targets, strict=True)):
            if a.dtype != np.uint8 or b.dtype != np.uint8 or a.ndim != 3 or a.shape[2] != 3 \
                    or a.shape != b.shape:
                raise ValueError(f"pair {i} ({names[i]}): expected equal (H, W, 3) uint8 arrays, got "
                                 f"{a.dtype}{a.shape} and {b.dtype}{b.shape}")
        self.inputs, self.targets = list(inputs), list(targets)
        self.tasks, self.names = list(tasks), list(names)
        self.subsets = list(subsets) if subsets is not None else [""] * n

    def __len__(self) -> int:
        return len(self.inputs)

    def load(self, index: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        return (self.inputs[index].astype(np.float32) / 255.0, self.targets[index].astype(np.float32) / 255.0)


# ----------------------------------------------------------------------------------------- task ids

def task_family(task: str) -> str:
    """The training task of a fine task name: ``"denoise_25"`` -> ``"denoise"``; others unchanged."""
    return re.sub(r"_\d+$", "", task)


def build_task_ids(tasks: Iterable[str]) -> dict[str, int]:
    """Map each fine task to the id of its family; families in PromptIR/AdaIR order, then sorted."""
    tasks = sorted(set(tasks))
    families = {task_family(t) for t in tasks}
    order = [f for f in TASK_FAMILY_ORDER if f in families] + sorted(families - set(TASK_FAMILY_ORDER))
    fid = {f: i for i, f in enumerate(order)}
    return {t: fid[task_family(t)] for t in tasks}


def _resolve_task_ids(source: PairSource, task_ids: Mapping[str, int] | None) -> dict[str, int]:
    ids = dict(task_ids) if task_ids is not None else build_task_ids(source.tasks)
    missing = sorted(set(source.tasks) - set(ids))
    if missing:
        raise ValueError(f"task_ids has no id for task(s) {missing}")
    return ids


# ------------------------------------------------------------------------------------ augmentation

def augment(arr: np.ndarray, mode: int) -> np.ndarray:
    """One of the 8 dihedral transforms of an (H, W, C) array: ``mode // 2`` quarter turns, flip if odd."""
    if not 0 <= mode < 8:
        raise ValueError(f"augmentation mode must be in [0, 8), got {mode}")
    out = np.rot90(arr, k=mode // 2, axes=(0, 1))
    return out[::-1] if mode % 2 else out


def sample_seed(seed: int, epoch: int, index: int) -> tuple[int, int, int]:
    """The seed tuple of one item; items with the same tuple are identical (see :func:`make_rng`)."""
    return (seed, epoch, index)


def _split_key(key: Key, default_epoch: int, n: int) -> tuple[int, int]:
    if isinstance(key, tuple):
        epoch, index = key
    else:
        epoch, index = default_epoch, key
    index, epoch = int(index), int(epoch)
    if not 0 <= index < n:
        raise IndexError(f"index {index} out of range for a dataset of {n} items")
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch}")
    return epoch, index


# ------------------------------------------------------------------------------------------ datasets

class TrainDataset(Dataset):
    """Random ``patch_size`` crops with the same flip/rotation on input and target, and task ids.

    Items are dicts ``{"input", "target"}`` (3, P, P) float32 tensors, ``"task_id"`` (int), ``"task"``,
    ``"name"``. Images smaller than the patch are reflect-padded (``pad_small=True``) or refused with
    a ValueError naming the item. Index with an int (uses :meth:`set_epoch`'s epoch) or with the
    sampler's ``(epoch, index)`` keys.

    A sample that cannot be used (:class:`SampleError`: an image that does not decode, a missing file,
    sizes that differ) raises naming its files; with ``skip_unreadable`` it is skipped instead: a warning
    names it, ``skipped`` counts it (in this process), and the next usable sample of the same task is
    served in its place (chosen from the index alone, so the stream stays reproducible).
    """

    def __init__(self, source: PairSource, patch_size: int = 128, seed: int = 0,
                 task_ids: Mapping[str, int] | None = None, augment: bool = True,
                 pad_small: bool = True, skip_unreadable: bool = False) -> None:
        if patch_size < 1:
            raise ValueError(f"patch_size must be positive, got {patch_size}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.source = source
        self.patch_size = patch_size
        self.seed = seed
        self.task_ids = _resolve_task_ids(source, task_ids)
        self.labels = [self.task_ids[t] for t in source.tasks]
        self.augment = augment
        self.pad_small = pad_small
        self.skip_unreadable = skip_unreadable
        self.skipped = 0
        self._bad: set[int] = set()
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Epoch used for plain int indices (sampler keys carry their own)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.source)

    def _pad(self, arr: np.ndarray, index: int) -> np.ndarray:
        h, w = arr.shape[:2]
        p = self.patch_size
        if h >= p and w >= p:
            return arr
        if not self.pad_small:
            raise ValueError(f"item {index} ({self.source.names[index]}) is {w}x{h}, smaller than the "
                             f"{p}x{p} patch (pass pad_small=True to reflect-pad it)")
        pad = ((0, max(p - h, 0)), (0, max(p - w, 0)), (0, 0))
        return np.pad(arr, pad, mode="reflect" if min(h, w) > 1 else "edge")

    def _load(self, epoch: int, index: int) -> tuple[int, np.ndarray, np.ndarray]:
        """``(index served, input, target)``: ``index``'s pair, or with ``skip_unreadable`` the next usable
        one of the same task."""
        label, n = self.labels[index], len(self)
        others = (j % n for j in range(index + 1, index + n) if self.labels[j % n] == label)
        first: SampleError | None = None
        for candidate in itertools.chain([index], others if self.skip_unreadable else []):
            if candidate in self._bad:
                continue
            try:
                # Separate streams: the crop does not depend on how many numbers the degradation drew.
                rng = make_rng(sample_seed(self.seed, epoch, candidate) + (0,))
                inp, tgt = self.source.load(candidate, rng)
                return candidate, inp, tgt
            except SampleError as exc:
                if not self.skip_unreadable:
                    raise SampleError(f"training sample {index} ({self.source.names[index]}) cannot be used: "
                                      f"{exc} (cpl-data verify checks every image before training; "
                                      f"data.skip_unreadable=true skips such samples)") from exc
                first = first or exc
                self._bad.add(candidate)
                self.skipped += 1
                warnings.warn(f"skipped unusable training sample {candidate} "
                              f"({self.source.names[candidate]}): {exc}; {self.skipped} skipped so far",
                              UserWarning, stacklevel=3)
        raise SampleError(f"no usable training sample of task {self.source.tasks[index]!r} is left "
                          f"(the first problem: {first})")

    def __getitem__(self, key: Key) -> dict[str, Any]:
        epoch, index = _split_key(key, self.epoch, len(self))
        index, inp, tgt = self._load(epoch, index)
        inp, tgt = self._pad(inp, index), self._pad(tgt, index)
        rng = make_rng(sample_seed(self.seed, epoch, index) + (1,))
        p = self.patch_size
        y = int(rng.integers(0, inp.shape[0] - p + 1))
        x = int(rng.integers(0, inp.shape[1] - p + 1))
        inp, tgt = inp[y:y + p, x:x + p], tgt[y:y + p, x:x + p]
        if self.augment:
            mode = int(rng.integers(0, 8))
            inp, tgt = augment(inp, mode), augment(tgt, mode)
        task = self.source.tasks[index]
        return {"input": hwc_to_tensor(inp), "target": hwc_to_tensor(tgt), "task_id": self.task_ids[task],
                "task": task, "name": self.source.names[index]}


def crop_to_multiple(arr: np.ndarray, base: int) -> np.ndarray:
    """Centre crop (H, W, C) to multiples of ``base``, as PromptIR's ``crop_img`` does before scoring."""
    if base < 1:
        raise ValueError(f"base must be positive, got {base}")
    h, w = arr.shape[:2]
    ch, cw = h % base, w % base
    if ch == h or cw == w:
        raise ValueError(f"image {w}x{h} is smaller than the crop base {base}")
    return arr[ch // 2:h - ch + ch // 2, cw // 2:w - cw + cw // 2]


class EvalDataset(Dataset):
    """Full images for evaluation: dicts with ``input``, ``target``, ``task``, ``task_id``, ``name``,
    ``subset``.

    Synthesised inputs use a per-item seed ``(seed, index)``, so a test set is the same in every run
    regardless of order (PromptIR's scripts draw from one global stream, so theirs depend on the
    order the sets are run). ``crop_multiple=16`` reproduces PromptIR's centre crop. Sizes vary: use
    batch size 1.
    """

    def __init__(self, source: PairSource, seed: int = 0, task_ids: Mapping[str, int] | None = None,
                 crop_multiple: int | None = None) -> None:
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.source = source
        self.seed = seed
        self.task_ids = _resolve_task_ids(source, task_ids)
        self.crop_multiple = crop_multiple

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        _, index = _split_key(index, 0, len(self))
        inp, tgt = self.source.load(index, make_rng((self.seed, index)))
        if self.crop_multiple is not None:
            inp, tgt = crop_to_multiple(inp, self.crop_multiple), crop_to_multiple(tgt, self.crop_multiple)
        task = self.source.tasks[index]
        return {"input": hwc_to_tensor(inp), "target": hwc_to_tensor(tgt), "task": task,
                "task_id": self.task_ids[task], "name": self.source.names[index],
                "subset": self.source.subsets[index]}


# ------------------------------------------------------------------------------------------ sampler

class TaskBalancedSampler(Sampler):
    """Yields ``(epoch, index)`` keys, the same number of items per task in each epoch.

    Per epoch ``num_samples`` items (default: the dataset's length) are split evenly across the task
    labels (the remainder goes to tasks chosen at random); each task cycles through its own shuffled
    items, then the whole epoch is shuffled. With ``balanced=False`` it is a plain shuffle. Under
    DDP each rank takes every ``world_size``-th item of the same stream (padded by wrapping so all ranks
    get the same count). The order is a function of ``(seed, epoch)`` only; :meth:`set_start` skips
    the first items of this rank's stream to resume mid-epoch.
    """

    def __init__(self, labels: Sequence[int | str], num_samples: int | None = None, seed: int = 0,
                 balanced: bool = True, rank: int = 0, world_size: int = 1) -> None:
        if not len(labels):
            raise ValueError("labels must not be empty")
        if num_samples is not None and num_samples < 1:
            raise ValueError(f"num_samples must be positive, got {num_samples}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.labels = list(labels)
        self.num_samples = num_samples if num_samples is not None else len(self.labels)
        self.seed, self.balanced = seed, balanced
        self.rank, self.world_size = rank, world_size
        self.epoch, self.start = 0, 0
        groups: dict[Any, list[int]] = {}
        for i, lab in enumerate(self.labels):
            groups.setdefault(lab, []).append(i)
        self._groups = [np.asarray(groups[k]) for k in sorted(groups, key=str)]

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's order; also rewinds to its beginning."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self.epoch, self.start = int(epoch), 0

    def set_start(self, position: int) -> None:
        """Skip the first ``position`` items of this rank's stream in the current epoch."""
        if not 0 <= position <= self.per_rank:
            raise ValueError(f"start position must be in [0, {self.per_rank}], got {position}")
        self.start = int(position)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "start": self.start, "seed": self.seed}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        if state["seed"] != self.seed:
            raise ValueError(f"sampler state has seed {state['seed']}, this sampler uses {self.seed}")
        self.set_epoch(state["epoch"])
        self.set_start(state["start"])

    @property
    def per_rank(self) -> int:
        return -(-self.num_samples // self.world_size)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The full (all-rank) index stream of an epoch, before padding and sharding."""
        rng = make_rng((self.seed, epoch))
        n = self.num_samples
        if not self.balanced:
            cycles = -(-n // len(self.labels))
            return np.concatenate([rng.permutation(len(self.labels)) for _ in range(cycles)])[:n]
        g = len(self._groups)
        quota = np.full(g, n // g)
        quota[rng.permutation(g)[: n % g]] += 1
        parts = []
        for group, q in zip(self._groups, quota, strict=True):
            reps = -(-int(q) // len(group))
            parts.append(np.concatenate([rng.permutation(group) for _ in range(reps)])[:q])
        return rng.permutation(np.concatenate(parts))

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order = self.epoch_order(self.epoch)
        total = self.per_rank * self.world_size
        order = np.resize(order, total)  # wraps around to pad
        mine = order[self.rank::self.world_size][self.start:]
        epoch = self.epoch
        return iter([(epoch, int(i)) for i in mine])

    def __len__(self) -> int:
        return self.per_rank - self.start


def worker_init_fn(worker_id: int) -> None:
    """Seed Python's and numpy's global generators in a DataLoader worker from torch's worker seed.

    The datasets here draw nothing from global generators; this keeps third-party transforms that
    do reproducible too (torch's worker seed follows the DataLoader's ``generator``).
    """
    seed = torch.initial_seed() % 2 ** 32
    random.seed(seed)
    np.random.seed(seed)
