"""What ``cpl-eval``, ``cpl-restore`` and ``cpl-analyze`` share: the ``--ckpt`` / ``--model`` and
benchmark arguments, the config a checkpoint is evaluated under, loading its model, and their exit
statuses.

Each command has a module of its own; this one keeps the three from drifting apart in how they read a
checkpoint and its config. Only the standard library is imported at module level: ``--help`` must not
wait for torch.
"""
from __future__ import annotations

import argparse
import copy
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cpl_fast.cli.common import (
    UsageError,
    add_config_files,
    add_data,
    add_device,
    add_preset,
    add_set,
    errors,
    fail,
    layered_config,
)
from cpl_fast.inference.options import AMP_MODES, DEFAULT_OVERLAP

if TYPE_CHECKING:  # imported where used: --help must not wait for torch
    import torch

TILE_HELP = ("tile size for large images (a multiple of the model's size multiple), 'auto' (whole image, "
             "tiles of 512 when memory runs out; the default) or 'none'")


# ------------------------------------------------------------------------------------- arguments

def parse_tile(text: str) -> int | str | None:
    if text == "auto":
        return "auto"
    if text == "none":
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--tile must be an integer, 'auto' or 'none', "
                                         f"got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"--tile must be positive, got {value}")
    return value


def parse_overlap(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--tile-overlap must be an integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"--tile-overlap must be >= 0, got {value}")
    return value


def add_model_args(parser: argparse.ArgumentParser, several: bool) -> None:
    parser.add_argument("--ckpt", action="append" if several else None, required=True, metavar="PATH",
                        help="a cpl-train run folder, a checkpoint folder or a weights file (PromptIR "
                             "Lightning .ckpt, CPL BasicSR .pth, state dict, .safetensors)"
                             + ("; repeat to compare several" if several else ""))
    parser.add_argument("--model", metavar="PRESET",
                        help="model preset (tiny, tiny_dense, cpl, promptir); default: the run's, else the "
                             "checkpoint's, read from the weights (dense for Lightning checkpoints, top-1 "
                             "otherwise); a --preset's model never replaces the checkpoint's")
    add_set(parser, "override a setting as in cpl-train, e.g. --set model.top_k=2 --set data.test_split=x")
    add_device(parser)
    parser.add_argument("--tile", type=parse_tile, default="auto", help=TILE_HELP)
    parser.add_argument("--tile-overlap", type=parse_overlap, default=DEFAULT_OVERLAP, metavar="PX",
                        help=f"overlap of neighbouring tiles in pixels (default {DEFAULT_OVERLAP})")
    parser.add_argument("--amp", choices=AMP_MODES, default="auto",
                        help="autocast on CUDA: auto (bf16 where supported, else fp16), none, bf16, fp16; "
                             "never on the CPU")


def add_data_args(parser: argparse.ArgumentParser) -> None:
    add_preset(parser, "the benchmark (data layout, model, protocol)")
    add_config_files(parser, "YAML config(s) as for cpl-train, applied after the preset")
    add_data(parser, "data root (the test split is read)")
    parser.add_argument("--max-images", type=int, metavar="N", help="score only the first N test images")
    parser.add_argument("--name", action="append", default=[], metavar="NAME",
                        help="a name per --ckpt for the tables (default: the run folder's or file's name)")


# ------------------------------------------------------------------------------ config and models

def names_benchmark(args: argparse.Namespace) -> bool:
    """Whether a --preset or --config names the benchmark (cpl-restore takes neither)."""
    return bool(getattr(args, "preset", None) or getattr(args, "config", None))


def effective_config(args: argparse.Namespace, run_config: dict[str, Any] | None, need_data: bool,
            weights_model: dict[str, Any] | None = None) -> tuple[dict[str, Any], list[str]]:
    """The effective config and notes: preset/config files, else the run's; the model from --model,
    the run, else the checkpoint (``weights_model``, read from the weights), --set model.* on top.

    A --preset / --config names a benchmark; its model section does not replace what a checkpoint
    says about its own model: the checkpoint's wins, with a note when the two differ.
    """
    from cpl_fast.config import DEFAULTS, parse_override, set_dotted

    explicit = names_benchmark(args)
    base, model = None, None
    if explicit:
        model = None if run_config is None else run_config["model"]
    elif run_config is not None:
        base = run_config
    elif need_data:
        raise UsageError("which data? give --preset (or --config) with --data ROOT, or a cpl-train run "
                         "folder as --ckpt")
    else:
        base = copy.deepcopy(DEFAULTS)
        base["data"]["layout"] = "embedded"
    if args.model is not None:
        from cpl_fast.models.registry import preset_section

        model = preset_section(args.model)
    from_weights = args.model is None and run_config is None and weights_model is not None
    config = layered_config(getattr(args, "preset", None), getattr(args, "config", []),
                            getattr(args, "data", None), args.overrides, base=base, model=model,
                            keep=lambda key: not (from_weights and key.startswith("model.")))
    notes: list[str] = []
    if not from_weights:
        return config, notes
    if explicit:
        from cpl_fast.runs.loading import preset_model_note

        where = f"--preset {args.preset}" if getattr(args, "preset", None) else "--config"
        note = preset_model_note(where, config["model"], weights_model)
        notes += [note] if note else []
    # The checkpoint's model with --set model.* applied. validate's checks that tie the model to
    # training (cpr.m against the number of prompts, ...) are the benchmark's, not this model's;
    # its own settings are checked when it is built.
    holder = {"model": copy.deepcopy(weights_model)}
    for key, value in map(parse_override, args.overrides):
        if key.startswith("model."):
            set_dotted(holder, key, value)
    config["model"] = holder["model"]
    return config, notes


def load_checkpoint(args: argparse.Namespace, ckpt: str, device: torch.device, need_data: bool):
    from cpl_fast.runs.loading import checkpoint_model, load_weights, resolve_weights

    weights, run_config = resolve_weights(ckpt)
    weights_model, weights_notes = None, []
    # Read the weights for their model only where it is used (without data, effective_config stops first).
    if run_config is None and args.model is None and (names_benchmark(args) or not need_data):
        weights_model, weights_notes = checkpoint_model(weights)
    config, notes = effective_config(args, run_config, need_data, weights_model)
    loaded = load_weights(weights, run_config, config["model"], device)
    # Where the model came from, and what --set changed in what the weights said.
    if weights_model is not None and config["model"] != weights_model:
        weights_notes.append(f"--set made the model {config['model']}")
    loaded.notes[:0] = weights_notes
    loaded.notes.extend(notes)
    return loaded, config


def run_names(args: argparse.Namespace) -> list[str]:
    if args.name and len(args.name) != len(args.ckpt):
        raise UsageError(f"give one --name per --ckpt ({len(args.ckpt)} checkpoints, {len(args.name)} names)")
    if args.name:
        return list(args.name)
    names = []
    for ckpt in args.ckpt:
        path = Path(ckpt)
        names.append(path.name if path.is_dir() else path.stem)
    return names


def evaluation_set(config: dict[str, Any]):
    """The evaluation set of a config's data section (only the test split is read)."""
    from cpl_fast.data import EvalDataset, build_task_ids
    from cpl_fast.data.sources import evaluation_pairs

    source = evaluation_pairs(config["data"], root_is_test=True)
    if source is None:
        raise UsageError("layout 'clean' has test images only with data.test_root "
                         "(--set data.test_root=DIR), or evaluate a 'paired' folder")
    return EvalDataset(source, seed=config["seed"], task_ids=build_task_ids(source.tasks))


def default_protocol(args: argparse.Namespace, config: dict[str, Any]) -> str:
    from cpl_fast.metrics.protocols import DEFAULT_PROTOCOLS

    if args.protocol is not None:
        return args.protocol
    preset = getattr(args, "preset", None) or config.get("name")
    return DEFAULT_PROTOCOLS.get(preset, "promptir")


def entropy_line(task: str, levels: Sequence[dict[str, Any]]) -> str:
    text = "  ".join(f"L{i}: {lv['selection_entropy']:.2f} ({lv['mean_softmax_entropy']:.2f})"
                     for i, lv in enumerate(levels))
    return f"   {task:<12} selection entropy, bits (mean softmax entropy): {text}"


def usage_errors() -> tuple[type[BaseException], ...]:
    """Every error is exit 2 here, a file that could not be read or written during the work included."""
    from cpl_fast.data import ImageReadError

    usage, _ = errors(usage=(ImageReadError, ValueError, MemoryError, OSError))
    return usage


def write_output(path: str, data: bytes, prog: str) -> int:
    """Write an output file after the work: 0, or 3 with one error line."""
    from cpl_fast.data.io import atomic_write_bytes, error_text

    try:
        atomic_write_bytes(path, data)
    except OSError as exc:
        return fail(prog, f"cannot write {path}: {error_text(exc)}", 3)
    return 0


def apply_threads(config: dict[str, Any]) -> None:
    """The config's ``threads``, as cpl-train applies it: set before the model runs, where not None."""
    if config["threads"] is not None:
        import torch

        torch.set_num_threads(config["threads"])
