"""``cpl-eval``, ``cpl-restore`` and ``cpl-analyze``.

    cpl-eval --preset three_task --ckpt promptir.ckpt --data /data/promptir     # Table I's protocol
    cpl-eval --ckpt runs/repro --ckpt runs/repro/dense --protocol promptir      # runs of cpl-train
    cpl-restore photos/ noisy.png -o restored/ --ckpt cpl.pth [--force] [--tile 512]
    cpl-analyze --ckpt runs/repro --ckpt runs/repro/dense -o analysis/          # entropy, Fig. 4/5/11

The data and model come from a training preset or config (``--preset``, ``--config``, ``--set``,
``--data``, as for ``cpl-train``) or from the run folder a checkpoint belongs to. Exit status: 0 OK,
1 some inputs failed (``cpl-restore``: unreadable, or their output could not be written; the others
are restored), 2 bad arguments, data, checkpoint or output path (checked before the work starts where
possible) or a file that could not be read or written during it, 3 the scores were computed and printed
but an output file could not be written (``cpl-eval --json/--markdown``, ``cpl-analyze``'s
``summary.json``: disk full, no permission). Every error is one ``error:`` line naming the problem.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cpl_fast.cli.common import (
    USAGE,
    UsageError,
    add_config_files,
    add_data,
    add_device,
    add_preset,
    add_set,
    errors,
    fail,
    layered_config,
    log,
    markdown_table,
    setup_logging,
    torch_device,
)
from cpl_fast.data.io import check_writable_file
from cpl_fast.inference.options import AMP_MODES, DEFAULT_OVERLAP

if TYPE_CHECKING:  # imported where used: --help must not wait for torch
    import torch

TILE_HELP = ("tile size for large images (a multiple of the model's size multiple), 'auto' (whole image, "
             "tiles of 512 when memory runs out; the default) or 'none'")


# ------------------------------------------------------------------------------------- arguments

def _tile(text: str) -> int | str | None:
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


def _overlap(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--tile-overlap must be an integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"--tile-overlap must be >= 0, got {value}")
    return value


def _add_model_args(parser: argparse.ArgumentParser, several: bool) -> None:
    parser.add_argument("--ckpt", action="append" if several else None, required=True, metavar="PATH",
                        help="a cpl-train run folder, a checkpoint folder or a weights file (PromptIR "
                             "Lightning .ckpt, CPL BasicSR .pth, state dict, .safetensors)"
                             + ("; repeat to compare several" if several else ""))
    parser.add_argument("--model", metavar="PRESET",
                        help="model preset (tiny, tiny_dense, cpl, promptir); default: the run's, else the "
                             "checkpoint's, read from the weights (dense for Lightning checkpoints, top-1 "
                             "otherwise); a --preset's model never replaces the checkpoint's")
    add_set(parser, "override a setting as in cpl-train, e.g. --set model.k=2 --set data.test_split=x")
    add_device(parser)
    parser.add_argument("--tile", type=_tile, default="auto", help=TILE_HELP)
    parser.add_argument("--tile-overlap", type=_overlap, default=DEFAULT_OVERLAP, metavar="PX",
                        help=f"overlap of neighbouring tiles in pixels (default {DEFAULT_OVERLAP})")
    parser.add_argument("--amp", choices=AMP_MODES, default="auto",
                        help="autocast on CUDA: auto (bf16 where supported, else fp16), none, bf16, fp16; "
                             "never on the CPU")


def _add_data_args(parser: argparse.ArgumentParser) -> None:
    add_preset(parser, "the benchmark (data layout, model, protocol)")
    add_config_files(parser, "YAML config(s) as for cpl-train, applied after the preset")
    add_data(parser, "data root (the test split is read)")
    parser.add_argument("--max-images", type=int, metavar="N", help="score only the first N test images")
    parser.add_argument("--name", action="append", default=[], metavar="NAME",
                        help="a name per --ckpt for the tables (default: the run folder's or file's name)")


# ------------------------------------------------------------------------------ config and models

def _explicit(args: argparse.Namespace) -> bool:
    """Whether a --preset or --config names the benchmark (cpl-restore takes neither)."""
    return bool(getattr(args, "preset", None) or getattr(args, "config", None))


def _config(args: argparse.Namespace, run_config: dict[str, Any] | None, need_data: bool,
            weights_model: dict[str, Any] | None = None) -> tuple[dict[str, Any], list[str]]:
    """The effective config and notes: preset/config files, else the run's; the model from --model,
    the run, else the checkpoint (``weights_model``, read from the weights), --set model.* on top.

    A --preset / --config names a benchmark; its model section does not replace what a checkpoint
    says about its own model: the checkpoint's wins, with a note when the two differ.
    """
    from cpl_fast.config import DEFAULTS, parse_override, set_dotted

    explicit = _explicit(args)
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
        model = {"preset": args.model, "k": None, "n": None, "overrides": {}}
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


def _load(args: argparse.Namespace, ckpt: str, device: torch.device, need_data: bool):
    from cpl_fast.runs.loading import checkpoint_model, load_model, resolve_weights

    weights, run_config = resolve_weights(ckpt)
    weights_model, weights_notes = None, []
    # Read the weights for their model only where it is used (without data, _config stops first).
    if run_config is None and args.model is None and (_explicit(args) or not need_data):
        weights_model, weights_notes = checkpoint_model(weights)
    config, notes = _config(args, run_config, need_data, weights_model)
    loaded = load_model(ckpt, config["model"], device)
    # Where the model came from, and what --set changed in what the weights said.
    if weights_model is not None and config["model"] != weights_model:
        weights_notes.append(f"--set made the model {config['model']}")
    loaded.notes[:0] = weights_notes
    loaded.notes.extend(notes)
    return loaded, config


def _names(args: argparse.Namespace) -> list[str]:
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


def _default_protocol(args: argparse.Namespace, config: dict[str, Any]) -> str:
    from cpl_fast.metrics.protocols import DEFAULT_PROTOCOLS

    if args.protocol is not None:
        return args.protocol
    preset = getattr(args, "preset", None) or config.get("name")
    return DEFAULT_PROTOCOLS.get(preset, "promptir")


def _entropy_line(task: str, levels: Sequence[dict[str, Any]]) -> str:
    text = "  ".join(f"L{i}: {lv['selection_entropy']:.2f} ({lv['mean_softmax_entropy']:.2f})"
                     for i, lv in enumerate(levels))
    return f"   {task:<12} selection entropy, bits (mean softmax entropy): {text}"


def _errors() -> tuple[type[BaseException], ...]:
    """Every error is exit 2 here, a file that could not be read or written during the work included."""
    from cpl_fast.data import ImageReadError

    usage, _ = errors(usage=(ImageReadError, ValueError, MemoryError, OSError))
    return usage


def _check_output_file(path: str | None, option: str) -> None:
    """Before the work: ``option``'s file must not be a folder, and its folder must be creatable."""
    if path is None:
        return
    try:
        check_writable_file(path, option)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _write_output(path: str, data: bytes, prog: str) -> int:
    """Write an output file after the work: 0, or 3 with one error line."""
    from cpl_fast.data.io import atomic_write_bytes, error_text

    try:
        atomic_write_bytes(path, data)
    except OSError as exc:
        return fail(prog, f"cannot write {path}: {error_text(exc)}", 3)
    return 0


# -------------------------------------------------------------------------------------- cpl-eval

def _eval_parser() -> argparse.ArgumentParser:
    from cpl_fast.metrics.protocols import PROTOCOLS

    parser = argparse.ArgumentParser(
        prog="cpl-eval", description="Per-task PSNR / SSIM of restoration checkpoints under a named metric "
        "protocol, with the prompt-selection entropy of every level.",
        epilog="protocols: " + "; ".join(p.description for p in PROTOCOLS.values()))
    _add_model_args(parser, several=True)
    _add_data_args(parser)
    parser.add_argument("--protocol", choices=list(PROTOCOLS),
                        help="metric protocol (default: the preset's benchmark; promptir otherwise)")
    parser.add_argument("--crop-border", type=int, metavar="PX", help="override the protocol's crop_border")
    parser.add_argument("--entropy", action="store_true", help="also print the selection entropy per level")
    parser.add_argument("--input-baseline", action="store_true",
                        help="add a row scoring the degraded inputs themselves (no restoration)")
    parser.add_argument("--json", metavar="FILE", help="write every score and routing statistic as JSON")
    parser.add_argument("--markdown", metavar="FILE", help="write the tables as markdown")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def comparison_table(results: dict[str, dict[str, Any]], protocol_label: str) -> str:
    """Markdown in the shape of the paper's tables: one row per model, PSNR/SSIM per task, average."""
    from cpl_fast.metrics.protocols import average

    tasks = list(next(iter(results.values()))["scores"])
    rows = []
    for name, result in results.items():
        scores = result["scores"]
        cells = [f"{scores[t]['psnr']:.2f}/{scores[t]['ssim']:.4f}" if t in scores else "-" for t in tasks]
        mean = average(scores)
        rows.append([name, *cells, f"{mean['psnr']:.2f}/{mean['ssim']:.4f}", protocol_label])
    return markdown_table(["model", *tasks, "average", "protocol"], rows)


def entropy_markdown(results: dict[str, dict[str, Any]]) -> str:
    """Selection entropy (bits) per model, task and level: ``selection / mean softmax``."""
    tasks = list(next(iter(results.values()))["scores"])
    levels = max(len(s["levels"]) for r in results.values() for s in r["scores"].values())
    rows = []
    for name, result in results.items():
        scores = result["scores"]
        if not all(s["levels"] for s in scores.values()):
            continue  # the input row has no routing
        for lv in range(levels):
            sel = [scores[t]["levels"][lv]["selection_entropy"] for t in tasks]
            soft = [scores[t]["levels"][lv]["mean_softmax_entropy"] for t in tasks]
            cells = [f"{a:.2f} / {b:.2f}" for a, b in zip(sel, soft)]
            rows.append([name, lv, *cells, f"{sum(sel) / len(sel):.2f} / {sum(soft) / len(soft):.2f}"])
    return markdown_table(["model", "level", *tasks, "mean"], rows)


def eval_main(argv: Sequence[str] | None = None) -> int:
    """Run ``cpl-eval``; returns the exit status."""
    args = _eval_parser().parse_args(argv)
    setup_logging()
    from cpl_fast.eval.scoring import evaluate, scores_table
    from cpl_fast.metrics.protocols import get_protocol

    try:
        if args.max_images is not None and args.max_images < 1:
            raise UsageError(f"--max-images must be >= 1, got {args.max_images}")
        _check_output_file(args.json, "--json")
        _check_output_file(args.markdown, "--markdown")
        device = torch_device(args.device)
        names = _names(args)
        results: dict[str, dict[str, Any]] = {}
        protocol = None
        for name, ckpt in zip(names, args.ckpt, strict=True):
            loaded, config = _load(args, ckpt, device, need_data=True)
            if protocol is None:
                protocol = get_protocol(_default_protocol(args, config), args.crop_border)
                log.info(protocol.description)
            dataset = evaluation_set(config)
            for note in loaded.notes:
                log.info(f"note: {note}")
            log.info(f"== {name}: {loaded.description}; {len(dataset)} test images")
            started = time.perf_counter()
            scores = evaluate(loaded.model, dataset, protocol=protocol, max_images=args.max_images,
                              tile=args.tile, overlap=args.tile_overlap, amp=args.amp,
                              progress=not args.no_progress)
            seconds = time.perf_counter() - started
            log.info(scores_table(scores, protocol))
            if args.entropy:
                for task, s in scores.items():
                    log.info(_entropy_line(task, s["levels"]))
            results[name] = {"checkpoint": str(loaded.weights), "model": loaded.model_config,
                             "layout": loaded.report.layout, "seconds": seconds, "scores": scores}
    except _errors() as exc:
        return fail("cpl-eval", exc, USAGE)
    assert protocol is not None
    if args.input_baseline:
        from cpl_fast.eval.scoring import score_inputs

        baseline = score_inputs(dataset, protocol, args.max_images)
        results = {"input (no restoration)": {"checkpoint": None, "model": None, "layout": None,
                                              "seconds": 0.0, "scores": baseline}, **results}
    if len(results) > 1:
        log.info(comparison_table(results, protocol.label))
    status = 0
    if args.json:
        payload = {"protocol": protocol.name, "protocol_description": protocol.description, "runs": results}
        data = json.dumps(payload, indent=1).encode("utf-8")
        status = max(status, _write_output(args.json, data, "cpl-eval"))
    if args.markdown:
        text = [f"Protocol: {protocol.description}", "", comparison_table(results, protocol.label), "",
                "Selection entropy / mean softmax entropy (bits) per prompt level:", "",
                entropy_markdown(results), ""]
        status = max(status, _write_output(args.markdown, "\n".join(text).encode("utf-8"), "cpl-eval"))
    return status


# ----------------------------------------------------------------------------------- cpl-restore

def _restore_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cpl-restore", description="Restore image files or folders with any checkpoint; outputs are "
        "PNGs under DIR at the inputs' relative paths. Unreadable files are reported and skipped; existing "
        "outputs are kept unless --force.")
    parser.add_argument("images", nargs="+", metavar="IMAGE",
                        help="image files or folders (searched recursively)")
    parser.add_argument("-o", "--output", required=True, metavar="DIR",
                        help="output folder (created if missing)")
    parser.add_argument("--force", action="store_true", help="overwrite existing outputs")
    _add_model_args(parser, several=False)
    return parser


def restore_main(argv: Sequence[str] | None = None) -> int:
    """Run ``cpl-restore``; returns the exit status (1 when some inputs failed)."""
    args = _restore_parser().parse_args(argv)
    setup_logging()
    from cpl_fast.eval.restore import check_output_dir, collect_inputs, restore_files

    try:
        out_dir = check_output_dir(args.output)
        collect_inputs(args.images)  # colliding output names are refused before the model loads
        device = torch_device(args.device)
        loaded, _ = _load(args, args.ckpt, device, need_data=False)
        for note in loaded.notes:
            log.info(f"note: {note}")
        log.info(f"model: {loaded.description}")
        summary = restore_files(loaded.model, args.images, out_dir, force=args.force, tile=args.tile,
                                overlap=args.tile_overlap, amp=args.amp,
                                log=log.warning)
    except _errors() as exc:
        return fail("cpl-restore", exc, USAGE)
    lines = summary.lines()
    log.info(lines[0])
    for line in lines[1:]:
        log.warning(line)
    return 1 if summary.failed else 0


# ----------------------------------------------------------------------------------- cpl-analyze

def _analyze_parser() -> argparse.ArgumentParser:
    from cpl_fast.metrics.protocols import PROTOCOLS

    parser = argparse.ArgumentParser(
        prog="cpl-analyze", description="Prompt-selection analysis: entropy per task and level (Fig. 4), "
        "selection histograms and the per-image selection map (Fig. 11), residuals with matched and "
        "mismatched prompts (Fig. 5); PNG figures and analysis.json per checkpoint.")
    parser.add_argument("-o", "--output", required=True, metavar="DIR",
                        help="output folder (one sub-folder per checkpoint)")
    _add_model_args(parser, several=True)
    _add_data_args(parser)
    parser.add_argument("--protocol", choices=list(PROTOCOLS),
                        help="crop the test images as this protocol does (default: the preset's)")
    parser.add_argument("--no-residuals", action="store_true", help="skip the residual maps (Fig. 5)")
    # The default is cpl_fast.eval.analysis.DEFAULT_BATCH, applied in analyze_main: importing it here would
    # make --help load torch (a test holds the number in this help to it).
    parser.add_argument("--batch", type=int, metavar="N",
                        help="images of the same size decoded together (default 8; large images go fewer at "
                             "a time, and a batch that runs out of memory is split)")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bar (there is none either when stderr is not a terminal)")
    return parser


def analyze_main(argv: Sequence[str] | None = None) -> int:
    """Run ``cpl-analyze``; returns the exit status."""
    args = _analyze_parser().parse_args(argv)
    setup_logging()
    from cpl_fast.eval.analysis import DEFAULT_BATCH, analyze

    summary: dict[str, Any] = {}
    try:
        if args.max_images is not None and args.max_images < 1:
            raise UsageError(f"--max-images must be >= 1, got {args.max_images}")
        batch = DEFAULT_BATCH if args.batch is None else args.batch
        if batch < 1:
            raise UsageError(f"--batch must be >= 1, got {batch}")
        from cpl_fast.eval.restore import check_output_dir

        out_root = check_output_dir(args.output)
        device = torch_device(args.device)
        for name, ckpt in zip(_names(args), args.ckpt, strict=True):
            loaded, config = _load(args, ckpt, device, need_data=True)
            dataset = evaluation_set(config)
            log.info(f"== {name}: {loaded.description}")
            for note in loaded.notes:
                log.info(f"note: {note}")
            result = analyze(loaded.model, dataset, out_root / name, title=name, max_images=args.max_images,
                             residuals=not args.no_residuals, progress=not args.no_progress,
                             protocol=_default_protocol(args, config), batch_size=batch)
            keys = ("selection_entropy", "mean_softmax_entropy")
            summary[name] = {"dense": result["dense"], "top_k": result["top_k"],
                             "uniform_bits": result["uniform_bits"],
                             "entropy": {task: [{k: lv[k] for k in keys} for lv in levels]
                                         for task, levels in result["entropy"].items()}}
            summary[name]["task_information"] = result["task_information"]
            for task, levels in result["entropy"].items():
                log.info(_entropy_line(task, levels))
            info = "  ".join(f"L{i}: {lv['task_expert_information']:.2f}"
                             for i, lv in enumerate(result["task_information"]))
            log.info(f"   task-expert mutual information, bits: {info}")
            if "prompt_gap" in result:
                gap = result["prompt_gap"]["all"]
                log.info(f"   prompt gap: {gap['psnr_positive']:.2f} dB with its own prompts, "
                      f"{gap['psnr_negative']:.2f} dB with other experts ({gap['gap_db']:.2f} dB)")
            log.info(f"   figures: {', '.join(str(out_root / name / f) for f in result['figures'])}")
    except _errors() as exc:
        return fail("cpl-analyze", exc, USAGE)
    return _write_output(str(out_root / "summary.json"), json.dumps(summary, indent=1).encode("utf-8"),
                         "cpl-analyze")


if __name__ == "__main__":
    sys.exit(eval_main())
