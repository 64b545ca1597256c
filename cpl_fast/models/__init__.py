"""cpl_fast.models: PromptIR with Sparse Prompt Modules, its building blocks, registry and checkpoints."""
from cpl_fast.models.checkpoint import LoadReport, load_checkpoint, save_model_state
from cpl_fast.models.nafnet import NAFNetState, PromptNAFNet
from cpl_fast.models.promptir import PromptIRState, SparsePromptIR
from cpl_fast.models.protocol import EncodeDecodeModel, map_state
from cpl_fast.models.registry import MODELS, PRESETS, build_model, register_model
from cpl_fast.models.spm import Routing, SparsePromptModule

__all__ = [
    "SparsePromptIR", "PromptIRState", "SparsePromptModule", "Routing", "build_model", "PRESETS",
    "register_model", "MODELS", "load_checkpoint", "save_model_state", "LoadReport",
    "EncodeDecodeModel", "map_state", "PromptNAFNet", "NAFNetState",
]
