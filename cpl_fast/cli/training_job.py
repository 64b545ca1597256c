"""A ``cpl-train`` job: the main run and each of its baselines trained, evaluated before and after
when asked, with validation during training; then the report.

This is where training and evaluation meet (the training command is a user of both); the command
itself (:mod:`cpl_fast.cli.train`) parses arguments, takes the run folder and maps errors to exit codes.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cpl_fast.cli.common import log
from cpl_fast.runs.claim import has_checkpoint
from cpl_fast.runs.layout import BEFORE_FILE, CONFIG_FILE, RESULT_FILE

if TYPE_CHECKING:
    from cpl_fast.train.report import RunResult


def validation_callback(config: Mapping[str, Any], trainer: Any) -> Any:
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


def not_evaluated(config: Mapping[str, Any], trainer: Any) -> str:
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
    resume = resume and has_checkpoint(folder)
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
    history = trainer.fit(validate=validation_callback(config, trainer) if process.is_main else None)
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
                       before=before, after=after, not_evaluated=not_evaluated(config, trainer),
                       validations=list(trainer.validations), inputs=inputs)
    result.save(folder / RESULT_FILE)
    return result


def run_job(config: Mapping[str, Any], run_dir: Path, resume: bool, process: Any) -> list[Any]:
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
