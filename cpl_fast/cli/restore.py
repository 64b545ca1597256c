"""``cpl-restore``: restore image files or folders with any checkpoint.

    cpl-restore photos/ noisy.png -o restored/ --ckpt cpl.pth [--force] [--tile 512]

The model comes from the run folder a checkpoint belongs to, ``--model`` or the weights themselves.
Exit status: 0 OK, 1 some inputs failed (unreadable, or their output could not be written; the others
are restored), 2 bad arguments, checkpoint or output path (checked before the work starts where
possible) or a file that could not be read or written during it. Every error is one ``error:`` line
naming the problem.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from cpl_fast.cli.common import USAGE, fail, log, setup_logging, torch_device
from cpl_fast.cli.model_args import add_model_args, load_checkpoint, usage_errors


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cpl-restore", description="Restore image files or folders with any checkpoint; outputs are "
        "PNGs under DIR at the inputs' relative paths. Unreadable files are reported and skipped; existing "
        "outputs are kept unless --force.")
    parser.add_argument("images", nargs="+", metavar="IMAGE",
                        help="image files or folders (searched recursively)")
    parser.add_argument("-o", "--output", required=True, metavar="DIR",
                        help="output folder (created if missing)")
    parser.add_argument("--force", action="store_true", help="overwrite existing outputs")
    add_model_args(parser, several=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``cpl-restore``; returns the exit status (1 when some inputs failed)."""
    args = _parser().parse_args(argv)
    setup_logging()
    from cpl_fast.eval.restore import check_output_dir, collect_inputs, restore_files

    try:
        out_dir = check_output_dir(args.output)
        collect_inputs(args.images)  # colliding output names are refused before the model loads
        device = torch_device(args.device)
        loaded, _ = load_checkpoint(args, args.ckpt, device, need_data=False)
        for note in loaded.notes:
            log.info(f"note: {note}")
        log.info(f"model: {loaded.description}")
        summary = restore_files(loaded.model, args.images, out_dir, force=args.force, tile=args.tile,
                                overlap=args.tile_overlap, amp=args.amp,
                                log=log.warning)
    except usage_errors() as exc:
        return fail("cpl-restore", exc, USAGE)
    lines = summary.lines()
    log.info(lines[0])
    for line in lines[1:]:
        log.warning(line)
    return 1 if summary.failed else 0


if __name__ == "__main__":
    sys.exit(main())
