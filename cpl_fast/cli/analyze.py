"""``cpl-analyze``: prompt-selection analysis of checkpoints (entropy, Fig. 4/5/11).

    cpl-analyze --ckpt runs/repro --ckpt runs/repro/dense -o analysis/

The data and model come from a training preset or config (``--preset``, ``--config``, ``--set``,
``--data``, as for ``cpl-train``) or from the run folder a checkpoint belongs to. Exit status: 0 OK,
2 bad arguments, data, checkpoint or output path (checked before the work starts where possible) or a
file that could not be read or written during it, 3 the analysis was written but ``summary.json``
could not be (disk full, no permission). Every error is one ``error:`` line naming the problem.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from cpl_fast.cli.common import USAGE, UsageError, fail, log, setup_logging, torch_device
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


def _parser() -> argparse.ArgumentParser:
    from cpl_fast.metrics.protocols import PROTOCOLS

    parser = argparse.ArgumentParser(
        prog="cpl-analyze", description="Prompt-selection analysis: entropy per task and level (Fig. 4), "
        "selection histograms and the per-image selection map (Fig. 11), residuals with matched and "
        "mismatched prompts (Fig. 5); PNG figures and analysis.json per checkpoint.")
    parser.add_argument("-o", "--output", required=True, metavar="DIR",
                        help="output folder (one sub-folder per checkpoint)")
    add_model_args(parser, several=True)
    add_data_args(parser)
    parser.add_argument("--protocol", choices=list(PROTOCOLS),
                        help="crop the test images as this protocol does (default: the preset's)")
    parser.add_argument("--no-residuals", action="store_true", help="skip the residual maps (Fig. 5)")
    # The default is cpl_fast.eval.analysis.DEFAULT_BATCH, applied in main: importing it here would
    # make --help load torch (a test holds the number in this help to it).
    parser.add_argument("--batch", type=int, metavar="N",
                        help="images of the same size decoded together (default 8; large images go fewer at "
                             "a time, and a batch that runs out of memory is split)")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bar (there is none either when stderr is not a terminal)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``cpl-analyze``; returns the exit status."""
    args = _parser().parse_args(argv)
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
        for name, ckpt in zip(run_names(args), args.ckpt, strict=True):
            loaded, config = load_checkpoint(args, ckpt, device, need_data=True)
            apply_threads(config)
            dataset = evaluation_set(config)
            log.info(f"== {name}: {loaded.description}")
            for note in loaded.notes:
                log.info(f"note: {note}")
            result = analyze(loaded.model, dataset, out_root / name, title=name, max_images=args.max_images,
                             residuals=not args.no_residuals, progress=not args.no_progress,
                             protocol=default_protocol(args, config), batch_size=batch)
            keys = ("selection_entropy", "mean_softmax_entropy")
            summary[name] = {"dense": result["dense"], "top_k": result["top_k"],
                             "uniform_bits": result["uniform_bits"],
                             "entropy": {task: [{k: lv[k] for k in keys} for lv in levels]
                                         for task, levels in result["entropy"].items()}}
            summary[name]["task_information"] = result["task_information"]
            for task, levels in result["entropy"].items():
                log.info(entropy_line(task, levels))
            info = "  ".join(f"L{i}: {lv['task_expert_information']:.2f}"
                             for i, lv in enumerate(result["task_information"]))
            log.info(f"   task-expert mutual information, bits: {info}")
            if "prompt_gap" in result:
                gap = result["prompt_gap"]["all"]
                log.info(f"   prompt gap: {gap['psnr_positive']:.2f} dB with its own prompts, "
                      f"{gap['psnr_negative']:.2f} dB with other experts ({gap['gap_db']:.2f} dB)")
            log.info(f"   figures: {', '.join(str(out_root / name / f) for f in result['figures'])}")
    except usage_errors() as exc:
        return fail("cpl-analyze", exc, USAGE)
    return write_output(str(out_root / "summary.json"), json.dumps(summary, indent=1).encode("utf-8"),
                         "cpl-analyze")


if __name__ == "__main__":
    sys.exit(main())
