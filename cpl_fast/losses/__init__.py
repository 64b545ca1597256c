"""cpl_fast.losses: the contrastive prompt regularisation, its perceptual features and its negative samplers."""
from cpl_fast.losses.cpr import CPR_DISTANCES, CPR_FORMS, CPRLoss, CPRTerms, cpl_loss, default_layer_weights
from cpl_fast.losses.negatives import (
    NEGATIVE_SAMPLERS,
    MismatchedExperts,
    NegativeSampler,
    OtherTask,
    build_negative_sampler,
)
from cpl_fast.losses.perceptual import FEATURES, PerceptualFeatures, build_features
from cpl_fast.losses.registry import LOSSES, build_loss
from cpl_fast.losses.task_similarity import negative_weights_from_similarity

__all__ = [
    "CPR_DISTANCES", "CPR_FORMS", "CPRLoss", "CPRTerms", "cpl_loss", "default_layer_weights",
    "FEATURES", "PerceptualFeatures", "build_features",
    "LOSSES", "build_loss", "negative_weights_from_similarity",
    "NEGATIVE_SAMPLERS", "NegativeSampler", "MismatchedExperts", "OtherTask", "build_negative_sampler",
]
