"""``cpl-data``: check dataset trees against their layout, write the embedded dataset to disk.

    cpl-data verify --layout promptir3 [--split test] [--quick] ROOT   # the report; exit 1 on problems

``verify`` checks what training will need: the folders and file lists of the layout (every listed file
exists, no entry leaves ROOT, none is listed twice, lists are UTF-8), inputs paired with targets, and
(unless ``--quick``) that every image decodes and each input has its target's size.
    cpl-data materialize ROOT [--seed 0]                      # the embedded set as a paired tree
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from cpl_fast.cli.common import USAGE, errors, fail, log, setup_logging
from cpl_fast.data.layouts import LAYOUTS, verify_layout


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cpl-data", description="cpl_fast dataset tools")
    sub = parser.add_subparsers(dest="command", required=True)
    verify = sub.add_parser("verify", help="check a dataset tree against a layout and print the report")
    verify.add_argument("--layout", required=True, choices=sorted(LAYOUTS),
                        help="; ".join(f"{k}: {v.description}" for k, v in LAYOUTS.items()))
    verify.add_argument("--split", default=None,
                        help="split to check for layouts with splits (default: train)")
    verify.add_argument("--quick", action="store_true",
                        help="check names and structure only, without decoding the images")
    verify.add_argument("--no-progress", action="store_true", help="no progress bar while decoding")
    verify.add_argument("root", help="root folder of the dataset")
    mat = sub.add_parser("materialize", help="write the embedded dataset as a paired-layout tree")
    mat.add_argument("root", help="output folder (root/{train,test}/{input,target}/<task>/)")
    mat.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 OK, 1 problems found, 2 bad arguments)."""
    args = _parser().parse_args(argv)
    setup_logging()
    if args.command == "verify":
        try:
            report = verify_layout(args.layout, args.root, args.split, decode=not args.quick,
                                   progress=not args.no_progress)
        except errors(usage=(ValueError,))[0] as exc:  # e.g. a split the layout does not have
            return fail("cpl-data", str(exc), USAGE)
        log.info(report)
        return 0 if report.ok else 1
    from cpl_fast.data.embedded import materialize  # needs scikit-image's sample images

    root = materialize(args.root, seed=args.seed)
    log.info(f"wrote the embedded dataset to {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
