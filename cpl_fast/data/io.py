"""Image reading and writing for the data pipeline.

Conventions used across ``cpl_fast.data``:

* numpy arrays are **HWC** float32 RGB in [0, 1] (what the degradations work on);
* torch tensors are **CHW** float32 RGB in [0, 1] (what the models eat).

Images are read with Pillow exactly as the PromptIR/AdaIR loaders do (``Image.open(...).convert('RGB')``
for ordinary 8-bit files, no EXIF rotation), so that metrics computed on our tensors match theirs.
"""
from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, UnidentifiedImageError

from cpl_fast.atomic_files import atomic_write_bytes

if TYPE_CHECKING:  # torch is imported where tensors are made: the layouts and --help do not need it
    import torch

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")

# Pillow modes whose integer values span 16 bits (16-bit PNG/TIFF greyscale).
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")


class ImageReadError(OSError):
    """An image file exists but cannot be decoded (corrupt, truncated, not an image, unsupported)."""


def is_image_file(path: str | os.PathLike) -> bool:
    """True for a non-hidden file name with a known image extension (case-insensitive)."""
    name = Path(path).name
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def _to_rgb_array(img: Image.Image, path: Path) -> np.ndarray:
    """Convert an opened Pillow image to HWC float32 RGB in [0, 1]."""
    mode = img.mode
    if mode in _SIXTEEN_BIT_MODES or mode == "I":
        # 16-bit greyscale: keep the full precision instead of Pillow's clipping convert('L').
        arr = np.asarray(img, dtype=np.float64)
        if arr.min() < 0 or arr.max() > 65535:
            raise ImageReadError(f"{path}: integer image with values outside [0, 65535] is not supported")
        grey = (arr / 65535.0).astype(np.float32)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if mode == "F":
        raise ImageReadError(f"{path}: floating-point images (Pillow mode 'F') are not supported")
    has_alpha = mode in ("RGBA", "LA", "La", "RGBa", "PA") or (mode == "P" and "transparency" in img.info)
    if has_alpha:
        warnings.warn(f"{path}: alpha channel dropped (image read as RGB)", UserWarning, stacklevel=3)
    rgb = np.asarray(img.convert("RGB"), dtype=np.uint8)
    return rgb.astype(np.float32) / 255.0


def read_image_array(path: str | os.PathLike) -> np.ndarray:
    """Read an image file as an (H, W, 3) float32 RGB array in [0, 1].

    Greyscale is replicated to three channels, an alpha channel is dropped with a warning,
    16-bit greyscale keeps its precision. Raises ``FileNotFoundError`` for a missing file and
    :class:`ImageReadError` (naming the file) for one that cannot be decoded.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    try:
        with Image.open(path) as img:
            img.load()  # decode now, so truncated files fail here with the file's name
            return _to_rgb_array(img, path)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        if isinstance(exc, ImageReadError):
            raise
        raise ImageReadError(f"cannot read image {path}: {exc}") from exc


def read_image(path: str | os.PathLike) -> torch.Tensor:
    """Read an image file as a (3, H, W) float32 RGB tensor in [0, 1] (see :func:`read_image_array`)."""
    return hwc_to_tensor(read_image_array(path))


def hwc_to_tensor(arr: np.ndarray) -> torch.Tensor:
    """(H, W, C) array (float in [0, 1] or uint8) to a contiguous (C, H, W) float32 tensor in [0, 1]."""
    if not isinstance(arr, np.ndarray) or arr.ndim != 3:
        raise ValueError(f"expected an (H, W, C) numpy array, got {type(arr).__name__} "
                         f"with shape {getattr(arr, 'shape', None)}")
    if arr.dtype == np.uint8:
        arr = arr.astype(np.float32) / 255.0
    import torch

    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1), dtype=np.float32))


def to_uint8(image: torch.Tensor | np.ndarray) -> np.ndarray:
    """Float image in [0, 1] to an (H, W, C) or (H, W) uint8 array: clipped, then rounded to nearest.

    Tensors are taken as (C, H, W) or (H, W); numpy arrays as (H, W, C) or (H, W).
    """
    import torch

    if isinstance(image, torch.Tensor):
        arr = image.detach().to("cpu", torch.float64).numpy()
        if arr.ndim == 3:
            arr = arr.transpose(1, 2, 0)
    elif isinstance(image, np.ndarray):
        if image.dtype == np.uint8:
            arr = image
        else:
            arr = image.astype(np.float64)
    else:
        raise TypeError(f"expected a torch.Tensor or numpy array, got {type(image).__name__}")
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (1, 3)):
        raise ValueError(f"expected a greyscale or RGB image, got array of shape {arr.shape} (HWC)")
    if arr.dtype == np.uint8:
        out = arr
    else:
        if not np.isfinite(arr).all():
            raise ValueError("image contains NaN or infinite values")
        out = np.round(np.clip(arr, 0.0, 1.0) * 255.0).astype(np.uint8)
    return out[:, :, 0] if out.ndim == 3 and out.shape[2] == 1 else out


def check_writable_file(path: str | os.PathLike, what: str = "output") -> Path:
    """``path`` when a file can be written there (checked before long work): ValueError when it is a
    folder, lies under a file, or its nearest existing folder is not writable."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{what} {path} is a folder; give a file name")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"{what} {path} cannot be written: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{what} {path} cannot be written: folder {parent} is not writable")
    return path


def write_png(path: str | os.PathLike, image: torch.Tensor | np.ndarray) -> None:
    """Write an image as an 8-bit PNG, atomically (see :func:`to_uint8` for shapes and rounding)."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"write_png writes PNG files; got a path ending in {path.suffix!r}: {path}")
    buf = io.BytesIO()
    Image.fromarray(to_uint8(image)).save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


def error_text(exc: BaseException) -> str:
    """One line for a command line's error message.

    ``OSError``: what failed and on which path (``No space left on device: runs/x/...``); an error re-raised
    from a DataLoader worker: the original error's last line rather than the worker's traceback.
    """
    if isinstance(exc, OSError) and exc.strerror and exc.filename is not None:
        where = f"{exc.filename}" + (f" -> {exc.filename2}" if exc.filename2 is not None else "")
        return f"{exc.strerror}: {where}"
    text = str(exc)
    if "Original Traceback" in text:
        lines = [line for line in text.splitlines() if line.strip()]
        text = lines[-1].split(": ", 1)[-1] if lines else text
    return text or type(exc).__name__
