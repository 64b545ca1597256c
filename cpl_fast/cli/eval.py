"""``cpl-eval``: per-task PSNR / SSIM of checkpoints under a named metric protocol.

    cpl-eval --preset three_task --ckpt promptir.ckpt --data /data/promptir     # Table I's protocol
    cpl-eval --ckpt runs/repro --ckpt runs/repro/dense --protocol promptir      # runs of cpl-train

The data and model come from a training preset or config (``--preset``, ``--config``, ``--set``,
``--data``, as for ``cpl-train``) or from the run folder a checkpoint belongs to. Exit status: 0 OK,
2 bad arguments, data, checkpoint or output path (checked before the work starts where possible) or a
file that could not be read or written during it, 3 the scores were computed and printed but an output
file could not be written (``--json``/``--markdown``: disk full, no permission). Every error is one
``error:`` line naming the problem.

``cpl-restore`` and ``cpl-analyze`` have modules of their own (:mod:`cpl_fast.cli.restore`,
:mod:`cpl_fast.cli.analyze`); their old names here are kept for one release.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
import warnings
from collections.abc import Sequence
from typing import Any

from cpl_fast.cli.common import USAGE, UsageError, fail, log, markdown_table, setup_logging, torch_device
from cpl_fast.cli.model_args import (
    add_data_args,
    add_model_args,
    apply_threads,
    default_protocol,
    entropy_line,
    evaluation_set,
    load_checkpoint,
    run_names,
    usage_errors,
    write_output,
)
from cpl_fast.data.io import check_writable_file

# The commands that lived here: old name -> (module, function). Imported on first use only, so that
# cpl-eval does not load the other two.
_MOVED = {"restore_main": ("cpl_fast.cli.restore", "main"), "analyze_main": ("cpl_fast.cli.analyze", "main")}


def __getattr__(name: str) -> Any:
    if name not in _MOVED:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from cpl_fast._deprecated import REMOVED_IN

    module, function = _MOVED[name]
    warnings.warn(f"{__name__}.{name} has moved to {module}.{function}; the old name will be removed in "
                  f"cpl_fast {REMOVED_IN}", DeprecationWarning, stacklevel=2)
    return getattr(importlib.import_module(module), function)


def _check_output_file(path: str | None, option: str) -> None:
    """Before the work: ``option``'s file must not be a folder, and its folder must be creatable."""
    if path is None:
        return
    try:
        check_writable_file(path, option)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _eval_parser() -> argparse.ArgumentParser:
    from cpl_fast.metrics.protocols import PROTOCOLS

    parser = argparse.ArgumentParser(
        prog="cpl-eval", description="Per-task PSNR / SSIM of restoration checkpoints under a named metric "
        "protocol, with the prompt-selection entropy of every level.",
        epilog="protocols: " + "; ".join(p.description for p in PROTOCOLS.values()))
    add_model_args(parser, several=True)
    add_data_args(parser)
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
        names = run_names(args)
        results: dict[str, dict[str, Any]] = {}
        protocol = None
        for name, ckpt in zip(names, args.ckpt, strict=True):
            loaded, config = load_checkpoint(args, ckpt, device, need_data=True)
            apply_threads(config)
            if protocol is None:
                protocol = get_protocol(default_protocol(args, config), args.crop_border)
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
                    log.info(entropy_line(task, s["levels"]))
            results[name] = {"checkpoint": str(loaded.weights), "model": loaded.model_config,
                             "layout": loaded.report.layout, "seconds": seconds, "scores": scores}
    except usage_errors() as exc:
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
        status = max(status, write_output(args.json, data, "cpl-eval"))
    if args.markdown:
        text = [f"Protocol: {protocol.description}", "", comparison_table(results, protocol.label), "",
                "Selection entropy / mean softmax entropy (bits) per prompt level:", "",
                entropy_markdown(results), ""]
        status = max(status, write_output(args.markdown, "\n".join(text).encode("utf-8"), "cpl-eval"))
    return status


if __name__ == "__main__":
    sys.exit(eval_main())
