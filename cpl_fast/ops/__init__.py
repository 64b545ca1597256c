"""cpl_fast's fused ops: one Python entry point each, several backends behind it."""
from cpl_fast.ops._reference import cpr_distances_reference, prompt_mix_reference


def prompt_mix(bank, indices, weights, size, backend="auto"):
    """Sparse prompt mix: ``out[b] = sum_j weights[b, j] * bilinear(bank[indices[b, j]], size)``."""
    return prompt_mix_reference(bank, indices, weights, size)


def cpr_distances(f_pos, f_gt, f_neg, neg_weights=None, backend="auto"):
    """Per-sample ``(L_pos, L_neg)`` of one feature layer (see ``cpr_distances_reference``)."""
    return cpr_distances_reference(f_pos, f_gt, f_neg, neg_weights)


__all__ = ["prompt_mix", "cpr_distances", "prompt_mix_reference", "cpr_distances_reference"]
