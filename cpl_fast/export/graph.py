"""The inference graph that is exported: the model's own encoder and decoder, traceable.

``InferenceGraph(model, size)`` holds an eval-mode copy of a ``SparsePromptIR`` set up for tracing:

* every layer norm computes through ``F.layer_norm`` (one ONNX ``LayerNormalization``, opset 17);
* ``size = (H, W)``: each prompt level serves its prompt from ``folded_prompts`` of its feature
  size, baked in as constants, so the prompt stage is ``TopK`` + ``Gather`` of ``k`` maps and a
  weighted sum (exact inference folding); ``size = None`` (any size): the prompt is ``conv3x3`` of
  the plain-PyTorch reference mix (``MatMul`` of the routing weights and the bank, bilinear
  ``Resize``, ``Conv``).

No padding happens inside: the input's height and width must be multiples of ``size_multiple``
(the runners pad and crop). The forward returns the restoration and, with ``return_routing``,
``(indices, weights)`` of every prompt level (prompt3, prompt2, prompt1), each ``(B, k)``.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from cpl_fast.models.promptir import SparsePromptIR
from cpl_fast.models.restormer import WithBiasLayerNorm

LEVEL_NAMES = ("prompt3", "prompt2", "prompt1")


def check_size(size: tuple[int, int], multiple: int) -> tuple[int, int]:
    """Validate a fixed export size ``(H, W)``: positive multiples of ``multiple``."""
    if len(size) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in size):
        raise ValueError(f"export size must be two ints (H, W), got {size!r}")
    height, width = size
    if height <= 0 or width <= 0:
        raise ValueError(f"export size must be positive, got {height}x{width}")
    if height % multiple or width % multiple:
        padded = f"{height + (-height) % multiple}x{width + (-width) % multiple}"
        raise ValueError(f"export size {height}x{width} is not a multiple of {multiple} (the model halves "
                         f"the resolution three times); pad the images to a multiple of {multiple} and "
                         f"export that size, e.g. {padded}")
    return height, width


class InferenceGraph(nn.Module):
    """An export-ready copy of ``model``: eval mode, fused layer norms, traceable prompts."""

    def __init__(self, model: SparsePromptIR, size: tuple[int, int] | None = None,
                 return_routing: bool = False) -> None:
        super().__init__()
        if not isinstance(model, SparsePromptIR):
            raise TypeError(f"InferenceGraph: expected a SparsePromptIR, got {type(model).__name__}")
        self.size_multiple = model.size_multiple
        self.size = None if size is None else check_size(tuple(size), self.size_multiple)
        self.return_routing = return_routing
        self.model = copy.deepcopy(model).eval()
        for module in self.model.modules():
            if isinstance(module, WithBiasLayerNorm):
                module.fused = True
        for spm in self.model.prompt_modules():
            spm.prompt_backend = "reference"      # plain PyTorch: no custom op in the traced graph
            # The copy's eager forward is the traced one: never the folded-map cache (fixed sizes
            # get their maps as constants below).
            spm.fold = False
        if self.size is not None:
            for spm, maps in zip(self.model.prompt_modules(), self._folded_maps(self.size)):
                spm.use_export_prompts(maps)
        self.eval()

    def train(self, mode: bool = True) -> InferenceGraph:
        """Always eval: the graph is the inference model."""
        return super().train(False)

    @torch.no_grad()
    def _folded_maps(self, size: tuple[int, int]) -> list[torch.Tensor]:
        """``folded_prompts`` of every level at the feature size it sees for an input of ``size``."""
        sizes: dict[int, tuple[int, int]] = {}
        hooks = [spm.register_forward_pre_hook(
            lambda module, args, i=i: sizes.__setitem__(i, tuple(args[0].shape[-2:])))
            for i, spm in enumerate(self.model.prompt_modules())]
        try:
            param = next(self.model.parameters())
            probe = torch.rand(1, self.model.inp_channels, *size, dtype=param.dtype, device=param.device)
            self.model(probe)
        finally:
            for hook in hooks:
                hook.remove()
        return [spm.folded_prompts(sizes[i]).clone() for i, spm in enumerate(self.model.prompt_modules())]

    @property
    def top_k(self) -> int | None:
        return self.model.top_k

    def output_names(self) -> list[str]:
        names = ["restored"]
        if self.return_routing:
            for level in LEVEL_NAMES:
                names += [f"{level}_indices", f"{level}_weights"]
        return names

    def forward(self, image: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        restored, routing = self.model(image, return_routing=True)
        if not self.return_routing:
            return restored
        flat = [restored]
        for level in routing:
            flat += [level.indices, level.weights]
        return tuple(flat)
