"""A small three-task dataset that needs no download: scikit-image's bundled photographs.

The photographs inside scikit-image's wheel (the ones that load offline) are cut into fixed-size
crops, split into train and test **by source photograph** (the test photographs never appear in
training), and degraded into PromptIR's three-task setting:

* ``denoise_15``, ``denoise_25``, ``denoise_50``: PromptIR's quantised Gaussian noise;
* ``derain``: synthetic rain streaks (MiOIR's renderer, in-distribution parameters);
* ``dehaze``: the scattering model on a synthetic smooth depth map.

Training uses three tasks (denoise at any sigma, derain, dehaze: ``TASK_IDS``); the test split keeps
one set per sigma. Everything is generated in memory from ``seed`` in about a second and nothing is
cached on disk; :func:`materialize` writes the set as a ``paired``-layout tree when files are wanted.
"""
from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np

from cpl_fast.data.datasets import ArrayPairs
from cpl_fast.data.degradations import haze, make_rng, noise_promptir, rain
from cpl_fast.data.io import write_png

# Natural photographs bundled in scikit-image's wheel (loaded offline). Synthetic images (colorwheel,
# logo, checkerboard...), binary ones (horse) and duplicates (cat == chelsea) are left out.
RGB_SOURCES = ("astronaut", "chelsea", "coffee", "rocket", "stereo_motorcycle", "hubble_deep_field", "retina",
               "immunohistochemistry")
GREY_SOURCES = ("camera", "coins", "moon", "page", "text", "grass", "gravel", "brick", "cell", "clock")
SOURCES = RGB_SOURCES + GREY_SOURCES
# Held-out photographs: two colour, two greyscale, different content from the rest.
TEST_SOURCES = ("chelsea", "rocket", "camera", "gravel")
TRAIN_SOURCES = tuple(s for s in SOURCES if s not in TEST_SOURCES)

EMBEDDED_TASKS = ("denoise_15", "denoise_25", "denoise_50", "derain", "dehaze")
TRAIN_TASKS = ("denoise", "derain", "dehaze")
TASK_IDS = {"denoise_15": 0, "denoise_25": 0, "denoise_50": 0, "derain": 1, "dehaze": 2}


def load_source(name: str) -> np.ndarray:
    """A bundled photograph as an (H, W, 3) uint8 RGB array (greyscale replicated to RGB)."""
    if name not in SOURCES:
        raise ValueError(f"unknown embedded source {name!r}; known: {SOURCES}")
    import skimage.data  # imported here: only this dataset needs scikit-image's sample images

    if name == "stereo_motorcycle":
        img = skimage.data.stereo_motorcycle()[0]  # the left view only: the right one is the same scene
    else:
        img = getattr(skimage.data, name)()
    img = np.asarray(img)
    if img.dtype != np.uint8:
        raise ValueError(f"embedded source {name!r} is {img.dtype}, expected uint8")
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    return np.ascontiguousarray(img[:, :, :3])


def _source_key(name: str) -> int:
    """A stable per-source number (independent of list order), for seeding."""
    return zlib.crc32(name.encode())


def source_crops(name: str, crop_size: int, crops_per_image: int, seed: int) -> list[np.ndarray]:
    """Up to ``crops_per_image`` non-overlapping ``crop_size`` crops of a source, from a centred grid."""
    img = load_source(name)
    h, w = img.shape[:2]
    ny, nx = h // crop_size, w // crop_size
    if ny == 0 or nx == 0:
        raise ValueError(f"source {name!r} ({w}x{h}) is smaller than crop_size {crop_size}")
    y0, x0 = (h - ny * crop_size) // 2, (w - nx * crop_size) // 2
    tiles = [(y0 + i * crop_size, x0 + j * crop_size) for i in range(ny) for j in range(nx)]
    pick = sorted(make_rng((seed, _source_key(name))).permutation(len(tiles))[:crops_per_image])
    return [img[y:y + crop_size, x:x + crop_size].copy() for y, x in (tiles[k] for k in pick)]


def _degrade(clean: np.ndarray, task: str, seed: tuple[int, ...]) -> np.ndarray:
    rng = make_rng(seed)
    x = clean.astype(np.float64) / 255.0
    if task.startswith("denoise_"):
        out = noise_promptir(x, rng, sigma=float(task.split("_")[1]))
    elif task == "derain":
        out = rain(x, rng)
    elif task == "dehaze":
        out = haze(x, rng)
    else:
        raise ValueError(f"unknown embedded task {task!r}; known: {EMBEDDED_TASKS}")
    return np.round(out * 255.0).astype(np.uint8)  # every output is already on 8-bit levels


def embedded_pairs(split: str = "train", seed: int = 0, crop_size: int = 160,
                   crops_per_image: int = 4) -> ArrayPairs:
    """The embedded set's pairs for ``split`` ("train" or "test"): every crop under every task.

    Names are ``<source>_<k>``; the same arguments always give identical arrays.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if crop_size < 16 or crops_per_image < 1:
        raise ValueError(f"need crop_size >= 16 and crops_per_image >= 1, got {crop_size}, {crops_per_image}")
    inputs, targets, tasks, names, subsets = [], [], [], [], []
    for source in TRAIN_SOURCES if split == "train" else TEST_SOURCES:
        for k, clean in enumerate(source_crops(source, crop_size, crops_per_image, seed)):
            for t, task in enumerate(EMBEDDED_TASKS):
                inputs.append(_degrade(clean, task, (seed, _source_key(source), k, t)))
                targets.append(clean)  # shared, read-only use
                tasks.append(task)
                names.append(f"{source}_{k}")
                subsets.append(f"embedded_{task}" if split == "test" else "")
    return ArrayPairs(inputs, targets, tasks, names, subsets)


def materialize(root: str | Path, seed: int = 0, crop_size: int = 160, crops_per_image: int = 4) -> Path:
    """Write the set as PNGs: ``root/{train,test}/{input,target}/<task>/<name>.png`` (``paired`` layout).

    Each of ``root/train`` and ``root/test`` then verifies with ``verify_layout("paired", ...)``.
    """
    root = Path(root)
    for split in ("train", "test"):
        pairs = embedded_pairs(split, seed, crop_size, crops_per_image)
        for inp, tgt, task, name in zip(pairs.inputs, pairs.targets, pairs.tasks, pairs.names, strict=True):
            write_png(root / split / "input" / task / f"{name}.png", inp)
            write_png(root / split / "target" / task / f"{name}.png", tgt)
    return root
