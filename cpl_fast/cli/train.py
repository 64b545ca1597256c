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
from dataclasses import dataclass, field
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
from cpl_fast.runs.layout import BEFORE_FILE, CONFIG_FILE, RESULT_FILE

if TYPE_CHECKING:
    from cpl_fast.train.report import RunResult

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


def _has_checkpoint(folder: Path) -> bool:
    """Whether a run folder has a checkpoint to resume (``latest``, or a step folder to fall back to)."""
    from cpl_fast.runs.checkpoints import CHECKPOINT_DIR, LATEST, checkpoint_folders

    return (folder / CHECKPOINT_DIR / LATEST).is_file() or bool(checkpoint_folders(folder))


def _newest_run(config: Mapping[str, Any]) -> Path:
    from cpl_fast.runs.checkpoints import CHECKPOINT_DIR, LATEST, CheckpointError

    root = Path(config["run"]["root"])
    runs = (p for p in root.glob(f"{config['name']}-*") if (p / CHECKPOINT_DIR / LATEST).is_file())
    candidates = sorted(runs, key=lambda p: p.stat().st_mtime)
    if not candidates:
        raise CheckpointError(f"no run of {config['name']!r} with a checkpoint under {root}/ to resume")
    return candidates[-1]


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
    from cpl_fast.runs.folder import RunLock

    if args.resume is not None:
        if args.overwrite:
            raise RunFolderError("--overwrite starts a fresh run; it cannot be combined with --resume")
        if args.resume:
            run_dir = Path(args.resume)
        else:
            run_dir = _newest_run(layered_config(args.preset, args.config, args.data, args.overrides))
        if not (run_dir / CONFIG_FILE).is_file():
            raise CheckpointError(f"{run_dir} is not a run folder ({CONFIG_FILE} is missing): "
                                  f"nothing to resume")
        RunLock(run_dir).check_free()  # a running run first: it may not have checkpointed yet
        if not _has_checkpoint(run_dir) and not (run_dir / RESULT_FILE).is_file():
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


@dataclass
class _Claim:
    """A run folder this process holds: its lock, and the folders it created (removed if the start fails)."""

    folder: Path
    lock: Any  # cpl_fast.runs.folder.RunLock
    created: list[Path] = field(default_factory=list)

    def release(self, failed: bool) -> None:
        from cpl_fast.runs.folder import remove_if_unused

        self.lock.release()
        if failed:
            for folder in reversed(self.created):
                if folder == self.folder:
                    remove_if_unused(folder)
                else:
                    try:
                        folder.rmdir()  # only when empty
                    except OSError:
                        break


def _missing(path: Path) -> list[Path]:
    """``path`` and its ancestors that do not exist yet, outermost first."""
    out = []
    while not path.exists() and path != path.parent:
        out.append(path)
        path = path.parent
    return out[::-1]


def _claim(config: Mapping[str, Any], run_dir: Path | None, resume: bool, overwrite: bool) -> _Claim:
    """Create (exclusively) or open the run folder and lock it; refuse a fresh run on an existing one."""
    from cpl_fast.runs.folder import RunLock, clear_run, create_unique_folder, holds_run

    if run_dir is None:
        root = Path(config["run"]["root"])
        created = _missing(root)
        folder = create_unique_folder(root, config["name"])
        claim = _Claim(folder, RunLock(folder), created + [folder])
        claim.lock.acquire()
        return claim
    if run_dir.exists() and not run_dir.is_dir():
        raise RunFolderError(f"run folder {run_dir} is a file, not a folder")
    created = _missing(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    claim = _Claim(run_dir, RunLock(run_dir), created)
    try:
        claim.lock.acquire()
        existing = [] if resume else holds_run(run_dir)
        if existing and not overwrite:
            raise RunFolderError(f"run folder {run_dir} already holds a run ({', '.join(existing)}): "
                                 f"--resume {run_dir} continues it, --overwrite deletes it and starts "
                                 f"afresh; or choose another --run-dir")
        if existing:
            log.info("--overwrite: deleting the previous run in %s", run_dir)
            clear_run(run_dir)
    except BaseException:
        claim.release(failed=True)
        raise
    return claim


def _broadcast(value: Any, process: Any) -> Any:
    if not process.enabled:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _validation(config: Mapping[str, Any], trainer: Any) -> Any:
    """The ``validate`` callable of ``Trainer.fit`` for ``eval.every`` (None when off or no test split):
    the test split (the first ``eval.images_per_task`` of each task) scored with the run's protocol,
    and ``eval.sample_images`` restored images (input | restored | target) for TensorBoard / W&B."""
    cfg = config["eval"]
    if not cfg["every"] or trainer.eval_set is None:
        return None
    import torch
    from torch.utils.data import Subset

    from cpl_fast.eval.scoring import evaluate
    from cpl_fast.inference.restoration import restore_image

    full = trainer.eval_set
    tasks = list(full.source.tasks)
    chosen: list[int] = []
    counts: dict[str, int] = {}
    firsts: dict[str, int] = {}
    for index, task in enumerate(tasks):
        firsts.setdefault(task, index)
        if counts.get(task, 0) < (cfg["images_per_task"] or len(tasks)):
            chosen.append(index)
            counts[task] = counts.get(task, 0) + 1
    dataset = full if cfg["images_per_task"] is None else Subset(full, chosen)
    samples = list(firsts.items())[:cfg["sample_images"]]

    def validate(model: Any) -> dict[str, Any]:
        scores = evaluate(model, dataset, trainer.device, trainer.dtype, max_images=cfg["max_images"])
        images = {}
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                for task, index in samples:
                    item = full[index]
                    restored = restore_image(model, item["input"].to(trainer.device, trainer.dtype)).image
                    restored = restored.detach().float().cpu().clamp(0, 1).reshape(item["input"].shape)
                    row = [item["input"], restored, item["target"]]
                    images[f"samples/{task}"] = torch.cat([image.float().cpu() for image in row], dim=2)
        finally:
            model.train(was_training)
        return {"scores": scores, "images": images}

    return validate


def _not_evaluated(config: Mapping[str, Any], trainer: Any) -> str:
    if trainer.eval_set is None:
        return "no test split"
    if not config["eval"]["before_after"]:
        return "eval.before_after is false"
    return ""


def train_run(config: Mapping[str, Any], folder: Path, resume: bool, process: Any) -> RunResult | None:
    """Train one run (evaluating before/after when asked); rank 0 returns its result, others None.

    Resuming a finished run trains only when the config now asks for more steps (``train.iterations``);
    otherwise it says so and returns the stored result."""
    import json

    import torch.distributed as dist

    from cpl_fast.atomic_files import atomic_write_bytes
    from cpl_fast.config import dump_yaml, model_k_n
    from cpl_fast.eval import evaluate
    from cpl_fast.train.memory_budget import check_step_memory
    from cpl_fast.train.report import RunResult
    from cpl_fast.train.trainer import Trainer

    finished = resume and (folder / RESULT_FILE).is_file()
    resume = resume and _has_checkpoint(folder)
    if finished and not resume:
        return RunResult.load(folder / RESULT_FILE) if process.is_main else None
    trainer = Trainer(config, folder, resume=resume, process=process)
    if finished and trainer.step >= trainer.total_steps:
        trainer.log(f"{folder} finished at step {trainer.step} of {trainer.total_steps}: nothing to train "
                    f"(raise train.iterations, e.g. --set train.iterations={trainer.step * 2}, to extend it)")
        return RunResult.load(folder / RESULT_FILE) if process.is_main else None
    # Before the first step allocates: a crop or batch that cannot fit is refused here.
    check_step_memory(trainer.model, config, trainer.device, trainer.dtype,
                      features=getattr(trainer.context, "features", None), warn=trainer.log)
    # Only now that the data and model are known to be valid: a failed start leaves no run folder behind.
    if process.is_main:
        folder.mkdir(parents=True, exist_ok=True)
        dump_yaml(config, folder / CONFIG_FILE)  # on resume: with the overrides it was resumed with
    evaluate_now = config["eval"]["before_after"] and trainer.eval_set is not None and process.is_main

    def score() -> dict[str, Any]:
        return evaluate(trainer.eval_model(), trainer.eval_set, trainer.device, trainer.dtype,
                        max_images=config["eval"]["max_images"])

    before: dict[str, Any] = {}
    if evaluate_now:
        if (folder / BEFORE_FILE).is_file():
            before = json.loads((folder / BEFORE_FILE).read_text(encoding="utf-8"))
        else:
            trainer.log(f"evaluating {config['name']} before training ...")
            before = score()
            atomic_write_bytes(folder / BEFORE_FILE, json.dumps(before).encode("utf-8"))
    if process.enabled:
        dist.barrier()
    history = trainer.fit(validate=_validation(config, trainer) if process.is_main else None)
    if not process.is_main:
        return None
    if evaluate_now:
        trainer.log(f"evaluating {config['name']} after training ...")
    after = score() if evaluate_now else {}
    inputs = {}
    if evaluate_now:
        from cpl_fast.eval.scoring import score_inputs

        inputs = score_inputs(trainer.eval_set, "promptir", config["eval"]["max_images"])
    k, _ = model_k_n(config)
    result = RunResult(name=config["name"], model=config["model"]["preset"], k=k, objective=trainer.objective,
                       steps=trainer.step, wall_s=sum(h["seconds"] for h in history), history=history,
                       before=before, after=after, not_evaluated=_not_evaluated(config, trainer),
                       validations=list(trainer.validations), inputs=inputs)
    result.save(folder / RESULT_FILE)
    return result


def run(config: Mapping[str, Any], run_dir: Path, resume: bool, process: Any) -> list[Any]:
    """The main run and its baselines, then the report (rank 0); the runs' ``RunResult``."""
    from cpl_fast.config import apply_overrides, flat_dotted
    from cpl_fast.train.report import write_report

    runs = [(config, run_dir)]
    base = {key: value for key, value in config.items() if key != "baselines"}
    base = {**base, "baselines": {}, "report": {"enabled": False}}
    for name, overrides in config["baselines"].items():
        variant = apply_overrides(base, {"name": name, "run.dir": None, **flat_dotted(overrides)})
        runs.append((variant, run_dir / name))
    results = []
    for cfg, folder in runs:
        result = train_run(cfg, folder, resume, process)
        if result is not None:
            results.append(result)
    if process.is_main and config["report"]["enabled"]:
        notes = [f"Preset `{config['name']}`; every run used the same data, crops, batches, steps and seed "
                 f"({config['seed']}). Scores are on full test images under the metric protocol `promptir` "
                 f"(RGB PSNR/SSIM, centre crop to a multiple of 16, padded to the model's multiple)."]
        path = write_report(results, run_dir, title=f"cpl-train report: {config['name']}", notes=notes)
        log.info("report: %s", path)
    return results


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
    claim: _Claim | None = None
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
        from cpl_fast.train.trainer import init_distributed

        process = init_distributed(cuda_requested(config))
        refused = None
        if process.is_main:
            try:
                claim = _claim(config, run_dir, resume, args.overwrite)
                run_dir = claim.folder
            except (RunFolderError, OSError) as exc:
                refused = error_text(exc)
        where, refused = _broadcast((str(run_dir), refused), process)
        if refused is not None:
            raise RunFolderError(refused)
        run_dir = Path(where)
        if process.is_main:
            log.info("run folder: %s", run_dir)
        results = run(config, run_dir, resume, process)
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
