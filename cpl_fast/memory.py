"""A caching allocator for CPU tensors (compiled in ``cpl_fast._C``).

On Linux, glibc maps every allocation above 32 MiB (its largest mmap threshold) afresh and unmaps
it on free, so a training step whose activations exceed that size page-faults all of them again on
every step: the kernel zeroes and maps each 4 KiB page anew. The CPL step with one decoder pass
over ``B (1 + m)`` rows at 64x64 does that millions of times per step (seconds of system time; see
``bench/step_rusage.py``). The caching allocator keeps freed blocks of 1 MiB and more and hands
them out again, as PyTorch's CUDA allocator does, so from the second step on the step's working set
is reused. It changes where memory comes from, never a result.

    from cpl_fast import memory
    memory.enable_cpu_caching()          # every CPU tensor allocated from now on
    ...
    memory.cpu_cache_stats()             # hits, misses, live / cached / peak bytes
    memory.disable_cpu_caching()         # previous allocator back, cache freed

or ``with memory.cpu_caching(): ...``. ``cpl-train`` turns it on for CPU runs
(``train.cpu_caching_allocator``). The cache holds at most ``max_cached_bytes`` of free blocks
(default: a quarter of the machine's memory); a block freed beyond that goes back to the system,
and a failed fresh allocation empties the cache and retries once. Tensors allocated while it is
installed stay valid after ``disable_cpu_caching()``.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from cpl_fast._extension import load_error

__all__ = ["cpu_cache_stats", "cpu_caching", "cpu_caching_available", "cpu_caching_enabled",
           "default_max_cached_bytes", "disable_cpu_caching", "empty_cpu_cache", "enable_cpu_caching"]


def _module():
    error = load_error()
    if error is not None:
        raise RuntimeError(f"the caching CPU allocator is compiled in cpl_fast._C, which is unavailable: "
                           f"{error}")
    from cpl_fast import _C
    return _C


def cpu_caching_available() -> bool:
    """Whether the compiled extension (which holds the allocator) imports."""
    return load_error() is None


def default_max_cached_bytes() -> int:
    """A quarter of the machine's physical memory (1 GiB where it cannot be read)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4
    except (AttributeError, OSError, ValueError):
        return 1 << 30


def enable_cpu_caching(max_cached_bytes: int | None = None) -> None:
    """Install the caching allocator for CPU tensors (again: set a new limit).

    ``max_cached_bytes``: most bytes of free blocks kept (``None``: ``default_max_cached_bytes()``).
    Raises ``RuntimeError`` when the extension is missing or another CPU allocator of a higher
    priority is installed.
    """
    if max_cached_bytes is None:
        max_cached_bytes = default_max_cached_bytes()
    if not isinstance(max_cached_bytes, int) or isinstance(max_cached_bytes, bool) or max_cached_bytes < 0:
        raise ValueError(f"max_cached_bytes must be a non-negative int, got {max_cached_bytes!r}")
    if not _module()._cpu_cache_enable(max_cached_bytes):
        raise RuntimeError("could not install the caching CPU allocator: another CPU allocator "
                           "was registered with a higher priority")


def disable_cpu_caching() -> None:
    """Restore the CPU allocator found at ``enable_cpu_caching`` and free every cached block."""
    _module()._cpu_cache_disable()


def cpu_caching_enabled() -> bool:
    return cpu_caching_available() and bool(_module()._cpu_cache_enabled())


def empty_cpu_cache() -> None:
    """Give every cached free block back to the system (blocks in use are untouched)."""
    _module()._cpu_cache_empty()


def cpu_cache_stats(reset_peak: bool = False) -> dict[str, int]:
    """``hits``/``misses`` (requests of 1 MiB and more served from the cache / freshly), ``uncached``
    (smaller requests, left to the system allocator), ``released`` (blocks given back),
    ``live_bytes``/``cached_bytes`` (blocks in use / free, rounded sizes), ``peak_bytes`` (highest
    sum of the two since the last reset), ``max_cached_bytes``. ``reset_peak``: start a new peak
    after reading."""
    module = _module()
    stats = dict(module._cpu_cache_stats())
    if reset_peak:
        module._cpu_cache_reset_peak()
    return stats


@contextlib.contextmanager
def cpu_caching(max_cached_bytes: int | None = None) -> Iterator[None]:
    """``enable_cpu_caching`` for the block; on exit the state before it comes back."""
    was_enabled = cpu_caching_enabled()
    previous_limit = cpu_cache_stats()["max_cached_bytes"] if was_enabled else None
    enable_cpu_caching(max_cached_bytes)
    try:
        yield
    finally:
        if was_enabled:
            enable_cpu_caching(previous_limit)
        else:
            disable_cpu_caching()
