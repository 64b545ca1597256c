"""``cpl-export``: ONNX export of the inference model and TensorRT engine builds.

    cpl-export onnx --ckpt C -o model.onnx [--height H --width W | --dynamic] [--opset 18] [--routing]
    cpl-export trt --onnx model.onnx -o model.engine [--fp16 | --bf16] [--min S --opt S --max S]

See docs/EXPORT.md. Exit status: 0 OK, 2 an error (one ``error:`` line naming it; arguments, the
opset and the output path are checked before the checkpoint is loaded).
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from cpl_fast.cli.common import USAGE, errors, fail, log, setup_logging
from cpl_fast.data.io import check_writable_file
from cpl_fast.export._deps import MissingDependency
from cpl_fast.export.onnx_format import DEFAULT_OPSET
from cpl_fast.export.trt import MODULES, OnnxParseError, Profile


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(part) for part in text.replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a shape B,C,H,W (e.g. 1,3,256,256), "
                                         f"got {text!r}") from None
    if len(shape) != 4:
        raise argparse.ArgumentTypeError(f"expected 4 dimensions B,C,H,W, got {text!r}")
    return shape


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _level(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= 5:
        raise argparse.ArgumentTypeError(f"expected an integer from 0 to 5, got {text!r}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cpl-export", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    onnx = sub.add_parser("onnx", help="export the inference model (sparse routing) to ONNX")
    onnx.add_argument("--ckpt", required=True, metavar="PATH",
                      help="a cpl-train run folder, a checkpoint folder or a weights file")
    onnx.add_argument("--model", metavar="PRESET",
                      help="the architecture (a preset name) when the checkpoint has no run config")
    onnx.add_argument("-o", "--output", required=True, metavar="FILE", help="the .onnx file to write")
    size = onnx.add_mutually_exclusive_group(required=True)
    size.add_argument("--height", type=int, help="fixed input height (a multiple of 8); needs --width")
    size.add_argument("--dynamic", action="store_true", help="dynamic height and width (multiples of 8)")
    onnx.add_argument("--width", type=int, help="fixed input width (a multiple of 8)")
    onnx.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (>= 18; {DEFAULT_OPSET})")
    onnx.add_argument("--routing", action="store_true",
                      help="add the selected experts and their weights of every prompt level as outputs")

    trt = sub.add_parser("trt", help="build a TensorRT engine from an exported ONNX model")
    trt.add_argument("--onnx", required=True, metavar="FILE", help="a model written by cpl-export onnx")
    trt.add_argument("-o", "--output", required=True, metavar="FILE", help="the engine file to write")
    precision = trt.add_mutually_exclusive_group()
    precision.add_argument("--fp16", action="store_true", help="allow float16 kernels (tensorrt module)")
    precision.add_argument("--bf16", action="store_true", help="allow bfloat16 kernels (tensorrt module)")
    for name in ("min", "opt", "max"):
        trt.add_argument(f"--{name}", type=_shape, metavar="B,C,H,W",
                         help=f"{name} input shape of the optimisation profile (needed for a --dynamic "
                              f"export; a fixed-size one builds for batch 1 without them)")
    trt.add_argument("--module", choices=("auto", *MODULES), default="auto",
                     help="TensorRT Python module (auto: tensorrt, else tensorrt_rtx)")
    trt.add_argument("--optimization-level", type=_level, metavar="0-5",
                     help="builder optimisation level (TensorRT's default: 3)")
    trt.add_argument("--workspace-mib", type=_positive, metavar="MIB", help="builder workspace limit (MiB)")
    return parser


def _export_onnx(args: argparse.Namespace) -> None:
    from cpl_fast.export.onnx_export import check_opset, export_onnx
    from cpl_fast.models.registry import preset_section
    from cpl_fast.runs.loading import load_model

    if args.dynamic and args.width is not None:
        raise ValueError("--width goes with --height (a fixed size), not with --dynamic")
    if args.height is not None and args.width is None:
        raise ValueError("--height needs --width")
    size = None if args.dynamic else (args.height, args.width)
    check_opset(args.opset)  # before the checkpoint is loaded and the graph traced
    check_writable_file(args.output, "-o")
    config = None if args.model is None else preset_section(args.model)
    loaded = load_model(args.ckpt, config)
    for note in loaded.notes:
        log.info(f"note: {note}")
    report = export_onnx(loaded.model, args.output, size, opset=args.opset, routing=args.routing)
    shape = "dynamic H, W" if size is None else f"{size[0]}x{size[1]}"
    log.info(f"wrote {report.path}: {loaded.description}, {shape}, opset {report.opset}, "
          f"{sum(report.op_types.values())} nodes, {report.seconds:.1f} s")
    log.info("ops: " + ", ".join(f"{op} {count}" for op, count in report.op_types.items()))
    log.info("outputs: " + ", ".join(report.outputs))


def _build_trt(args: argparse.Namespace) -> None:
    from cpl_fast.export.trt import build_engine

    given = [args.min, args.opt, args.max]
    if any(s is not None for s in given) and not all(s is not None for s in given):
        raise ValueError("give all three of --min, --opt and --max, or none")
    profile = Profile(args.min, args.opt, args.max) if args.min is not None else None
    check_writable_file(args.output, "-o")
    precision = "fp16" if args.fp16 else "bf16" if args.bf16 else "fp32"
    build = build_engine(args.onnx, args.output, precision=precision, profile=profile, module=args.module,
                         optimization_level=args.optimization_level, workspace_mib=args.workspace_mib)
    log.info(f"wrote {build.engine} ({build.engine_bytes / 2**20:.1f} MiB) with {build.module} "
          f"{build.tensorrt_version}, {precision}, {build.layers} layers, {build.build_seconds:.1f} s")
    for t in build.tensors:
        log.info(f"  {t.mode:6s} {t.name}: {t.dtype} {list(t.shape)}")
    if build.profile is not None:
        log.info(f"  profile: min {list(build.profile.min)}, opt {list(build.profile.opt)}, "
              f"max {list(build.profile.max)}")
        if profile is None:
            log.info("  the graph fixes C, H and W: built for batch 1 (--min/--opt/--max for larger batches)")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    setup_logging()
    try:
        if args.command == "onnx":
            _export_onnx(args)
        else:
            _build_trt(args)
    except errors(usage=(ValueError, TypeError, OSError, MissingDependency, OnnxParseError,
                         RuntimeError))[0] as err:
        return fail(f"cpl-export {args.command}", err, USAGE)
    return 0


if __name__ == "__main__":
    sys.exit(main())
