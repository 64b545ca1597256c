"""Triton kernels of cpl_fast (installed as cpl_fast.kernels, imported lazily)."""
