"""Sparse Prompt Module (SPM): a bank of prompt experts and a router that keeps the top-k.

``emb = mean_hw(x)``, ``probs = softmax(linear(emb))``, keep ``k`` experts, then
``prompt = conv3x3(bilinear(sum_j w_j E_{idx_j}, (H, W)))``. With ``top_k=None`` every expert is
kept with its probability: PromptIR's dense prompt block, the same function computed without
repeating the bank per sample.
"""
from __future__ import annotations

import warnings
from collections import OrderedDict
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from cpl_fast.ops import prompt_mix
from cpl_fast.ops._reference import routing_matrix


class Routing(NamedTuple):
    """Which experts each sample uses, and with what weight.

    ``indices (B, k)`` int64 and ``weights (B, k)``; ``probs (B, n)`` is the router's softmax
    (None when the routing was built by hand, e.g. a negative for contrastive regularisation).
    """

    indices: torch.Tensor
    weights: torch.Tensor
    probs: torch.Tensor | None = None


class SparsePromptModule(nn.Module):
    """Prompt experts + top-k router, with exact inference folding.

    Parameters keep the published names: ``prompt_param`` (the bank, ``(n, C, S, S)``; the published
    code stores it as ``(1, n, C, S, S)``, which ``load_checkpoint`` reshapes), ``linear_layer`` (the
    router) and ``conv3x3``.

    Folding: ``conv3x3(resize(sum_j w_j E_j)) = sum_j w_j conv3x3(resize(E_j))`` because both maps
    are linear. In eval mode under ``torch.no_grad`` (and ``fold=True``) the ``n`` folded maps are
    computed once per output size and the prompt becomes a weighted gather of ``k`` of them. The
    cache is keyed on the parameters' version counters and storage, so optimiser steps,
    ``load_state_dict`` and ``.to()`` invalidate it; writes through ``param.data`` bypass the
    version counter, so call ``clear_fold_cache()`` after those. At most ``fold_cache_size`` output
    sizes are kept (least recently used dropped first); set ``fold = False`` to turn folding off.

    Export: ``prompt_backend`` is the ``prompt_mix`` backend of the unfolded path (``"reference"``
    traces as plain PyTorch ops); ``use_export_prompts(folded)`` makes the prompt a gather of given
    folded maps (a fixed-size export's constants). See ``cpl_fast.export``.
    """

    def __init__(self, prompt_dim: int, prompt_len: int, prompt_size: int, lin_dim: int,
                 top_k: int | None = 1, renormalize: bool = False, fold_cache_size: int = 4,
                 route_bias: bool = False) -> None:
        super().__init__()
        if prompt_len < 1:
            raise ValueError("SparsePromptModule: prompt_len (the number of experts n) must be >= 1, "
                             f"got {prompt_len}")
        if top_k is not None and not (isinstance(top_k, int) and 1 <= top_k <= prompt_len):
            raise ValueError(f"SparsePromptModule: top_k must be None or an int with 1 <= k <= n; "
                             f"got k={top_k!r}, n={prompt_len}")
        if renormalize and top_k == 1:
            warnings.warn("SparsePromptModule: renormalize=True with top_k=1 makes every kept weight "
                          "exactly 1, so the router receives no gradient and cannot learn",
                          UserWarning, stacklevel=2)
        self.num_prompts = prompt_len
        self.top_k = top_k
        self.renormalize = renormalize
        self.fold = True
        self.fold_cache_size = fold_cache_size
        self.prompt_backend = "auto"
        self.prompt_param = nn.Parameter(torch.rand(prompt_len, prompt_dim, prompt_size, prompt_size))
        self.linear_layer = nn.Linear(lin_dim, prompt_len)
        self.conv3x3 = nn.Conv2d(prompt_dim, prompt_dim, kernel_size=3, stride=1, padding=1, bias=False)
        # Selection-only expert biases (auxiliary-loss-free load balancing): added to the softmax for
        # choosing the top-k, never to the gate weights, so they steer which expert serves a sample
        # without entering the loss. A buffer, moved by the trainer from recent usage, saved with the
        # weights; absent (None) unless asked for, so the published state dicts keep their keys.
        self.register_buffer("route_bias", torch.zeros(prompt_len) if route_bias else None)
        # Folded maps of one fixed output size, set only for export (not part of the state dict).
        self.register_buffer("export_folded", None, persistent=False)
        self._fold_cache: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self._fold_params_key: tuple | None = None

    def extra_repr(self) -> str:
        n, c, s, _ = self.prompt_param.shape
        bias = ", route_bias=True" if self.route_bias is not None else ""
        return f"n={n}, prompt_dim={c}, prompt_size={s}, top_k={self.top_k}, renormalize={self.renormalize}{bias}"

    def route(self, probs: torch.Tensor) -> Routing:
        """The router's own choice for softmax probabilities ``probs (B, n)``."""
        if self.top_k is None:
            indices = torch.arange(self.num_prompts, device=probs.device).repeat(probs.shape[0], 1)
            return Routing(indices, probs, probs)
        if self.route_bias is None:
            weights, indices = probs.topk(self.top_k, dim=1)
        else:
            indices = (probs + self.route_bias.to(probs.dtype)).topk(self.top_k, dim=1).indices
            weights = probs.gather(1, indices)
        if self.renormalize:
            weights = weights / weights.sum(dim=1, keepdim=True)
        return Routing(indices, weights, probs)

    def forward(self, x: torch.Tensor,
                routing: Routing | Callable[[Routing], Routing] | None = None) -> tuple[torch.Tensor, Routing]:
        """Prompt ``(B, C, H, W)`` for features ``x (B, lin_dim, H, W)``, and the routing used.

        A given ``routing`` (e.g. a forced negative) replaces the router's choice; the router's
        ``probs`` are still computed and returned with it. A callable ``routing(own) -> Routing``
        receives the router's own choice for every row and returns the routing to use: a batched
        contrastive step decodes positives and negatives together and derives the negatives' routing
        of this level from the positive rows' choice.
        """
        if x.dim() != 4:
            raise ValueError("SparsePromptModule: expected features (B, C, H, W), "
                             f"got shape {tuple(x.shape)}")
        batch, _, h, w = x.shape
        probs = F.softmax(self.linear_layer(x.mean(dim=(-2, -1))), dim=1)
        if routing is None:
            routing = self.route(probs)
        else:
            if callable(routing):
                routing = routing(self.route(probs))
                if not isinstance(routing, Routing):
                    raise TypeError("SparsePromptModule: a routing callable must return a Routing, "
                                    f"got {type(routing).__name__}")
            self._check_routing(routing, batch)
            routing = Routing(routing.indices, routing.weights, probs)
        return self._prompt(routing.indices, routing.weights, (h, w)), routing

    def _check_routing(self, routing: Routing, batch: int) -> None:
        indices, weights = routing.indices, routing.weights
        if indices.dtype != torch.int64:
            raise TypeError(f"SparsePromptModule: routing indices must be int64, got {indices.dtype}")
        if indices.dim() != 2 or indices.shape[0] != batch or not 1 <= indices.shape[1] <= self.num_prompts:
            raise ValueError(f"SparsePromptModule: routing indices must have shape (B={batch}, k) with "
                             f"1 <= k <= n={self.num_prompts}, got {tuple(indices.shape)}")
        if tuple(weights.shape) != tuple(indices.shape):
            raise ValueError(f"SparsePromptModule: routing weights shape {tuple(weights.shape)} differs from "
                             f"indices shape {tuple(indices.shape)}")
        # Reading the values would synchronise a GPU on every forced decode and break compiled graphs,
        # so (as in cpl_fast.ops.prompt_mix) the range is checked on the CPU, outside compilation.
        if indices.device.type == "cpu" and not torch.compiler.is_compiling():
            lo, hi = int(indices.min()), int(indices.max())
            if lo < 0 or hi >= self.num_prompts:
                raise ValueError("SparsePromptModule: routing indices must lie in "
                                 f"[0, n={self.num_prompts}), got values in [{lo}, {hi}]")

    def _prompt(self, indices: torch.Tensor, weights: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        if self.export_folded is not None:
            if tuple(self.export_folded.shape[-2:]) != tuple(size):
                raise ValueError(f"SparsePromptModule: the export's folded maps are "
                                 f"{tuple(self.export_folded.shape[-2:])}, the features {tuple(size)}")
            return _mix_folded(self.export_folded, indices, weights)
        if self._can_fold():
            return _mix_folded(self.folded_prompts(size), indices, weights)
        # The router may run in another precision (autocast) than the bank; mix in the bank's.
        weights = weights.to(self.prompt_param.dtype)
        return self.conv3x3(prompt_mix(self.prompt_param, indices, weights, size,
                                       backend=self.prompt_backend))

    def use_export_prompts(self, folded: torch.Tensor | None) -> None:
        """Serve the prompt from ``folded = folded_prompts(size)`` (``(n, C, H, W)``), or stop (None).

        For export only: the maps become constants of the traced graph and the prompt a gather of
        ``k`` of them, for features of exactly that size.
        """
        if folded is not None:
            n, c = self.prompt_param.shape[:2]
            if folded.dim() != 4 or tuple(folded.shape[:2]) != (n, c):
                raise ValueError(f"SparsePromptModule.use_export_prompts: expected folded maps "
                                 f"(n={n}, C={c}, H, W), got shape {tuple(folded.shape)}")
            folded = folded.detach()
        self.export_folded = folded

    def _can_fold(self) -> bool:
        # Folded maps are constants: only serve them where no gradient is wanted, and keep the
        # compiled/exported graph free of the Python-side cache.
        return (self.fold and not self.training and not torch.is_grad_enabled()
                and not torch.compiler.is_compiling())

    @torch.no_grad()
    def folded_prompts(self, size: tuple[int, int]) -> torch.Tensor:
        """``conv3x3(resize(E_i, size))`` for every expert: ``(n, C, H, W)``, cached and detached."""
        params = (self.prompt_param, self.conv3x3.weight)
        params_key = tuple((p._version, p.data_ptr(), p.dtype, p.device) for p in params)
        if params_key != self._fold_params_key:
            self._fold_cache.clear()
            self._fold_params_key = params_key
        device = self.prompt_param.device
        autocast = (torch.get_autocast_dtype(device.type)
                    if torch.amp.is_autocast_available(device.type) and torch.is_autocast_enabled(device.type)
                    else None)
        key = (int(size[0]), int(size[1]), autocast)
        cached = self._fold_cache.get(key)
        if cached is not None:
            self._fold_cache.move_to_end(key)
            return cached
        n = self.num_prompts
        # Each expert alone, weight 1: the same resize as the unfolded path.
        each = torch.arange(n, device=device).unsqueeze(1)
        ones = torch.ones(n, 1, dtype=self.prompt_param.dtype, device=device)
        folded = self.conv3x3(prompt_mix(self.prompt_param, each, ones, (key[0], key[1])))
        self._fold_cache[key] = folded
        while len(self._fold_cache) > self.fold_cache_size:
            self._fold_cache.popitem(last=False)
        return folded

    def clear_fold_cache(self) -> None:
        """Drop the folded maps (needed only after writing parameters through ``.data``)."""
        self._fold_cache.clear()
        self._fold_params_key = None

    def train(self, mode: bool = True) -> SparsePromptModule:
        self.clear_fold_cache()
        return super().train(mode)

    def _apply(self, fn, recurse: bool = True):
        # .to()/.double()/.cuda() move the parameters: the cached maps would only hold memory.
        self.clear_fold_cache()
        return super()._apply(fn, recurse)


def _mix_folded(folded: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``out[b] = sum_j weights[b, j] * folded[indices[b, j]]`` without a ``B x n x C x H x W`` tensor."""
    n = folded.shape[0]
    weights = weights.to(folded.dtype)
    if 2 * indices.shape[1] > n:
        # Many experts per sample (dense routing): a (B, n) weight matrix times the bank.
        return torch.einsum("bn,nchw->bchw", routing_matrix(indices, weights, n), folded)
    return torch.einsum("bk,bkchw->bchw", weights, folded[indices])
