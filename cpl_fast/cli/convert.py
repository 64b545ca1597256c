"""``cpl-convert``: a checkpoint cpl_fast reads, as PromptIR's Lightning ``.ckpt`` or CPL's BasicSR ``.pth``.

    cpl-convert runs/repro -o repro.pth                       # a cpl-train run: params + params_ema (EMA)
    cpl-convert promptir.ckpt -o promptir_basicsr.pth         # PromptIR's release to the BasicSR layout
    cpl-convert net_g.pth -o promptir.ckpt --model promptir   # a dense model to PromptIR's Lightning layout

The source is a run folder, a checkpoint folder or a weights file, read as ``cpl-eval --ckpt`` reads
it (its architecture from the run's config, else from the weights; ``--model`` / ``--set model.*``
choose it). The layout follows the output's suffix (``.ckpt`` Lightning, ``.pth`` / ``.pt`` BasicSR)
unless ``--to`` says. Only a dense model goes to the Lightning layout (PromptIR's code runs every
prompt; see ``cpl_fast.models.convert``). The file is written atomically, never over an existing one
without ``--force``, and read back with cpl_fast's loader and compared tensor for tensor before the
file is moved into place. Exit status: 0 written and verified, 2 an error (one ``error:`` line naming
it; nothing is written).
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cpl_fast.cli.common import USAGE, errors, fail, log, setup_logging


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cpl-convert", description="Write a checkpoint as PromptIR's Lightning .ckpt or CPL's BasicSR "
        ".pth (atomically; read back and compared before success is reported).")
    parser.add_argument("source", metavar="SRC",
                        help="a cpl-train run folder, a checkpoint folder or a weights file (Lightning "
                             ".ckpt, BasicSR .pth, state dict, .safetensors)")
    parser.add_argument("-o", "--output", required=True, metavar="FILE", help="the file to write")
    parser.add_argument("--to", choices=("lightning", "basicsr"),
                        help="output layout (default: from the suffix: .ckpt lightning, .pth/.pt basicsr)")
    parser.add_argument("--model", metavar="PRESET",
                        help="the source's model preset (default: the run's, else read from the weights)")
    parser.add_argument("--set", action="append", default=[], dest="overrides", metavar="model.KEY=VALUE",
                        help="a model setting, as in cpl-train (e.g. --set model.top_k=all: a dense model)")
    parser.add_argument("--no-ema", action="store_true",
                        help="write the trained weights, not the EMA weights (Lightning: the one state dict; "
                             "BasicSR: params and params_ema alike)")
    parser.add_argument("--force", action="store_true", help="replace an existing output file")
    return parser


def _model_section(args: argparse.Namespace, weights: Path, run_config: dict[str, Any] | None):
    """The model section to build (None: load_model's own choice), from --model and --set model.*."""
    if args.model is None and not args.overrides:
        return None
    from cpl_fast.config import parse_override, set_dotted
    from cpl_fast.models.registry import preset_section
    from cpl_fast.runs.loading import checkpoint_model

    if args.model is not None:
        section = preset_section(args.model)
    elif run_config is not None:
        section = dict(run_config["model"])
    else:
        section = checkpoint_model(weights)[0]
    holder = {"model": section}
    for text in args.overrides:
        key, value = parse_override(text)
        if not key.startswith("model."):
            raise ValueError(f"--set {text}: cpl-convert takes model settings only (model.top_k, "
                             f"model.num_prompts, model.overrides.*)")
        set_dotted(holder, key, value)
    return holder["model"]


def _companions(loaded, no_ema: bool):
    """``(trained model, EMA model or None)`` for the weights ``loaded`` came from.

    A run's checkpoint folder holds both (``model.safetensors``, ``ema.safetensors``); a BasicSR file
    both (``params``, ``params_ema``); anything else one set of weights, taken as the trained ones.
    """
    from cpl_fast.models import load_checkpoint
    from cpl_fast.models.checkpoint import read_checkpoint_file
    from cpl_fast.models.registry import model_from_config
    from cpl_fast.runs.layout import EMA_FILE, MODEL_FILE
    from cpl_fast.runs.loading import load_model

    weights = loaded.weights
    if weights.name == EMA_FILE and (weights.parent / MODEL_FILE).is_file():
        trained = load_model(weights.parent / MODEL_FILE, loaded.model_config).model
        ema = loaded.model
    elif loaded.report.layout == "basicsr:params_ema" and "params" in (raw := read_checkpoint_file(weights)):
        trained = model_from_config(loaded.model_config).eval()
        load_checkpoint(trained, raw["params"])
        ema = loaded.model
    else:
        trained, ema = loaded.model, None
    if ema is not None and _same_weights(trained, ema):
        ema = None  # e.g. a BasicSR file whose params_ema repeats params: there are no EMA weights
    return (trained, None) if no_ema else (trained, ema)


def _same_weights(a, b) -> bool:
    import torch

    sa, sb = a.state_dict(), b.state_dict()
    return set(sa) == set(sb) and all(torch.equal(sa[key], sb[key]) for key in sa)


def _progress(weights: Path) -> tuple[int, int]:
    """``(epoch, step)`` from a run checkpoint's ``state.json`` (0, 0 elsewhere)."""
    import json

    from cpl_fast.runs.layout import STATE_JSON

    path = weights.parent / STATE_JSON
    try:
        position = json.loads(path.read_text())
    except (OSError, ValueError):
        return 0, 0
    step, epoch = position.get("step", 0), position.get("epoch", 0)
    return (epoch if isinstance(epoch, int) else 0), (step if isinstance(step, int) else 0)


def _verify(path: Path, expected: dict[str, Any], model_config: dict[str, Any]) -> None:
    """Read ``path`` back and load every state dict it holds into a fresh model: each tensor must equal
    the source's (keys left out on purpose, selection biases that select nothing, come back as zeros)."""
    import torch

    from cpl_fast.models import load_checkpoint
    from cpl_fast.models.checkpoint import read_checkpoint_file
    from cpl_fast.models.registry import model_from_config

    raw = read_checkpoint_file(path)
    for entry, source in expected.items():
        fresh = model_from_config(model_config)
        load_checkpoint(fresh, {"state_dict": raw["state_dict"]} if entry == "state_dict" else raw[entry])
        got, want = fresh.state_dict(), source.state_dict()
        dense = getattr(fresh, "top_k", 1) is None
        for key, value in want.items():
            if key.endswith(".route_bias") and (dense or not value.any()):
                continue  # left out by design: no effect on what the model computes
            if not torch.equal(got[key], value):
                raise ValueError(f"verification failed: [{entry}] {key} differs from the source after "
                                 f"reading the file back; nothing was written")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    setup_logging()
    try:
        from cpl_fast.data.io import check_writable_file
        from cpl_fast.models.convert import (
            basicsr_checkpoint,
            lightning_checkpoint,
            output_format,
            refuse_existing,
            save_converted,
        )
        from cpl_fast.runs.loading import load_weights, resolve_weights, routing_text

        layout = output_format(args.output, args.to)
        refuse_existing(args.output, args.force)     # before the checkpoint is read
        check_writable_file(args.output, "-o")
        weights, run_config = resolve_weights(args.source)
        if weights.resolve() == Path(args.output).resolve():
            raise ValueError(f"the output {args.output} is the source's weights file; write another file")
        loaded = load_weights(weights, run_config, _model_section(args, weights, run_config))
        for note in loaded.notes:
            log.info(f"note: {note}")
        trained, ema = _companions(loaded, args.no_ema)
        if layout == "lightning":
            written = ema if ema is not None else trained
            epoch, step = _progress(weights)
            converted = lightning_checkpoint(written, loaded.model_config, epoch=epoch, global_step=step)
            expected = {"state_dict": written}
            which = "EMA weights (--no-ema for the trained ones)" if ema is not None else "weights"
        else:
            converted = basicsr_checkpoint(trained, loaded.model_config, ema)
            expected = {"params": trained, "params_ema": ema if ema is not None else trained}
            which = "trained weights as params, EMA as params_ema" if ema is not None else "weights"
        path = save_converted(converted, args.output, force=args.force,
                              check=lambda tmp: _verify(tmp, expected, loaded.model_config))
    except errors(usage=(ValueError, TypeError, OSError))[0] as err:
        return fail("cpl-convert", err, USAGE)
    for note in converted.notes:
        log.info(f"note: {note}")
    model = loaded.model
    log.info(f"wrote {path}: {layout} layout, {converted.keys} tensors, {which}; model "
          f"{loaded.model_config['preset']!r} ({routing_text(getattr(model, 'top_k', None))}, "
          f"{getattr(model, 'num_prompts', '?')} prompts) from {loaded.weights} [{loaded.report.layout}]; "
          f"read back: identical")
    return 0


if __name__ == "__main__":
    sys.exit(main())
