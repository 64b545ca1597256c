"""``cpl-train``: train from a preset or YAML config, resume a run, compare against baselines.

    cpl-train --preset demo                               # embedded data, CPU, a few minutes
    cpl-train --preset three_task --data /data/promptir   # the paper's three-task recipe
    cpl-train --config my.yaml --set optim.lr=1e-4 --set data.batch=4
    cpl-train --resume runs/three_task-20250101-120000    # continue exactly where it stopped
    cpl-train --print-config --preset demo --set eval.every=50          # the effective settings
    torchrun --nproc-per-node 4 -m cpl_fast.cli.train --preset three_task --data /data/promptir

A run folder (default ``runs/<name>-<timestamp>``, a new folder for every run) holds ``config.yaml``,
``checkpoints/``, ``train.log`` (the messages and a line every ``train.log_every`` steps),
``tensorboard/``, ``result.json`` (scores, history) and, when ``report.enabled``, ``report.md`` with its
figures. Each entry of ``baselines`` is trained the same way in a sub-folder of
the run. A run locks its folder for as long as it runs, and a fresh run refuses a folder that already
holds one unless ``--overwrite`` (see ``cpl_fast.runs.folder``).

Exit status: 0 OK; 2 bad arguments, configuration, data, checkpoint or run folder (nothing trained);
1 the run stopped while training (the loss or the weights became non-finite, an image could not be
read, a file could not be written: disk full, no permission).
"""
from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

# Only what the argument parser needs is imported here: ``--help`` must not wait for torch.
from cpl_fast.cli.common import (
    FAILED,
    USAGE,
    add_config_files,
    add_data,
    add_preset,
    add_set,
    errors,
    fail,
    layered_config,
    log,
    setup_logging,
)
from cpl_fast.runs.folder import RunFolderError
from cpl_fast.runs.layout import CONFIG_FILE, RESULT_FILE

if TYPE_CHECKING:
    from cpl_fast.runs.claim import RunClaim

PROG = "cpl-train"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Train CPL / PromptIR models (cpl_fast)")
    add_preset(parser, "a shipped recipe (cpl_fast/configs/<preset>.yaml)")
    add_config_files(parser, "YAML file(s) applied after the preset, in order")
    add_set(parser, "override a setting (dotted key, YAML value), e.g. --set optim.lr=1e-4")
    add_data(parser, "data root (same as --set data.root=ROOT)")
    parser.add_argument("--run-dir", metavar="DIR", help="run folder (default runs/<name>-<timestamp>)")
    parser.add_argument("--overwrite", action="store_true",
                        help="start afresh in a --run-dir that already holds a run, deleting that run first")
    parser.add_argument("--resume", nargs="?", const="", metavar="RUN_DIR",
                        help="continue a run from its newest checkpoint (default: the newest run of "
                             "this config's name); with a larger train.iterations a finished run trains "
                             "the extra steps, its schedule laid over the new length")
    parser.add_argument("--print-config", action="store_true",
                        help="print the effective config (defaults < preset < --config < --set) as YAML "
                             "and exit; every setting is described in docs/CONFIG.md")
    return parser


def _check_names(config: Mapping[str, Any]) -> None:
    """The run's name and its baselines' are folder names: no path may leave ``run.root`` or the run."""
    from cpl_fast.runs.folder import check_folder_name

    check_folder_name(config["name"], "name")
    for name in config["baselines"]:
        check_folder_name(name, "every name under baselines")


def _resolve(args: argparse.Namespace) -> tuple[dict[str, Any], Path | None, bool]:
    """The config, the run folder (None: a new one under ``run.root``) and whether to resume."""
    from cpl_fast.config import read_run_config
    from cpl_fast.runs.checkpoints import CheckpointError
    from cpl_fast.runs.claim import has_checkpoint, newest_run
    from cpl_fast.runs.folder import RunLock

    if args.resume is not None:
        if args.overwrite:
            raise RunFolderError("--overwrite starts a fresh run; it cannot be combined with --resume")
        if args.resume:
            run_dir = Path(args.resume)
        else:
            run_dir = newest_run(layered_config(args.preset, args.config, args.data, args.overrides))
        if not (run_dir / CONFIG_FILE).is_file():
            raise CheckpointError(f"{run_dir} is not a run folder ({CONFIG_FILE} is missing): "
                                  f"nothing to resume")
        RunLock(run_dir).check_free()  # a running run first: it may not have checkpointed yet
        if not has_checkpoint(run_dir) and not (run_dir / RESULT_FILE).is_file():
            raise CheckpointError(f"run folder {run_dir} has no checkpoint yet: nothing to resume")
        stored = read_run_config(run_dir / CONFIG_FILE)
        config = layered_config(None, [], args.data, args.overrides, base=stored)
        _check_names(config)
        return config, run_dir, True
    config = layered_config(args.preset, args.config, args.data, args.overrides)
    _check_names(config)
    if args.run_dir is not None:
        return config, Path(args.run_dir), False
    if config["run"]["dir"] is not None:
        return config, Path(config["run"]["dir"]), False
    return config, None, False


def _broadcast(value: Any, process: Any) -> Any:
    if not process.enabled:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _errors() -> tuple[tuple[type[BaseException], ...], tuple[type[BaseException], ...]]:
    """Refused before training: exit 2. Stopped while training: exit 1 (OSError covers disk full,
    permissions and unreadable images; FloatingPointError a diverged run)."""
    from cpl_fast.train.memory_budget import MemoryBudgetError
    from cpl_fast.train.run_log import MissingLoggerError

    return errors(usage=(MemoryBudgetError, MissingLoggerError), failures=(FloatingPointError, OSError))


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (see the module docstring)."""
    args = _parser().parse_args(argv)
    setup_logging()
    started = time.perf_counter()
    from cpl_fast.data.io import error_text

    usage_errors, run_errors = _errors()
    claim: RunClaim | None = None
    failed = True
    dist = None
    try:
        config, run_dir, resume = _resolve(args)
        if args.print_config:
            import yaml

            print(yaml.safe_dump(dict(config), sort_keys=False), end="")
            return 0
        from cpl_fast.train.run_log import check_metric_backends

        check_metric_backends(config)  # before anything of the run is created
        import torch.distributed as dist

        from cpl_fast.config import cuda_requested
        from cpl_fast.runs.claim import claim_run
        from cpl_fast.train.trainer import init_distributed

        process = init_distributed(cuda_requested(config))
        refused = None
        if process.is_main:
            try:
                claim = claim_run(config, run_dir, resume, args.overwrite)
                run_dir = claim.folder
            except (RunFolderError, OSError) as exc:
                refused = error_text(exc)
        where, refused = _broadcast((str(run_dir), refused), process)
        if refused is not None:
            raise RunFolderError(refused)
        run_dir = Path(where)
        if process.is_main:
            log.info("run folder: %s", run_dir)
        from cpl_fast.cli.training_job import run_job

        results = run_job(config, run_dir, resume, process)
        failed = False
    except usage_errors as exc:
        return fail(PROG, exc, USAGE)
    except run_errors as exc:
        from cpl_fast.runs.checkpoints import NonFiniteWeightsError

        text = error_text(exc)
        if isinstance(exc, FloatingPointError) and not isinstance(exc, NonFiniteWeightsError):
            text += ("; the run diverged and stopped, its newest checkpoint holds the last saved finite "
                     "weights (lower optim.lr, set optim.grad_clip, or check the data)")
        return fail(PROG, text, FAILED)
    finally:
        if claim is not None:
            claim.release(failed)
        if dist is not None and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    if results:
        from cpl_fast.train.report import summary_text

        log.info(summary_text(results))
        log.info("total wall time: %.0f s", time.perf_counter() - started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
