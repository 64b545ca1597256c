"""``cpl-train``: train from a preset or YAML config, resume a run, compare against baselines.

    cpl-train --preset demo                               # embedded data, CPU, a few minutes
    cpl-train --preset three_task --data /data/promptir   # the paper's three-task recipe
    cpl-train --config my.yaml --set optim.lr=1e-4 --set data.batch=4
    cpl-train --resume runs/three_task-20250101-120000    # continue exactly where it stopped
    torchrun --nproc-per-node 4 -m cpl_fast.train.cli --preset three_task --data /data/promptir

A run folder (default ``runs/<name>-<timestamp>``) holds ``config.yaml``, ``checkpoints/``,
``tensorboard/``, ``result.json`` (scores, history) and, when ``report.enabled``, ``report.md`` with
its figures. Each entry of ``baselines`` is trained the same way in a sub-folder of the run.
"""
from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch.distributed as dist

from cpl_fast.data import LayoutError
from cpl_fast.train.checkpointing import CHECKPOINT_DIR, LATEST, CheckpointError
from cpl_fast.train.config import (
    PRESET_NAMES,
    ConfigError,
    apply_overrides,
    cuda_requested,
    dump_yaml,
    flat_dotted,
    load_config,
    model_k_n,
    parse_override,
    read_yaml,
    set_dotted,
    validate,
)
from cpl_fast.train.report import RunResult, summary_text, write_report

CONFIG_FILE = "config.yaml"
RESULT_FILE = "result.json"
BEFORE_FILE = "eval_before.json"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cpl-train", description="Train CPL / PromptIR models (cpl_fast)")
    parser.add_argument("--preset", choices=PRESET_NAMES,
                        help="a shipped recipe (cpl_fast/configs/<preset>.yaml)")
    parser.add_argument("--config", action="append", default=[], metavar="FILE",
                        help="YAML file(s) applied after the preset, in order")
    parser.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE",
                        help="override a setting (dotted key, YAML value), e.g. --set optim.lr=1e-4")
    parser.add_argument("--data", metavar="ROOT", help="data root (same as --set data.root=ROOT)")
    parser.add_argument("--run-dir", metavar="DIR", help="run folder (default runs/<name>-<timestamp>)")
    parser.add_argument("--resume", nargs="?", const="", metavar="RUN_DIR",
                        help="continue a run from its newest checkpoint (default: the newest run of "
                             "this config's name)")
    return parser


def _newest_run(config: Mapping[str, Any]) -> Path:
    root = Path(config["run"]["root"])
    runs = (p for p in root.glob(f"{config['name']}-*") if (p / CHECKPOINT_DIR / LATEST).is_file())
    candidates = sorted(runs, key=lambda p: p.stat().st_mtime)
    if not candidates:
        raise CheckpointError(f"no run of {config['name']!r} with a checkpoint under {root}/ to resume")
    return candidates[-1]


def _resolve(args: argparse.Namespace) -> tuple[dict[str, Any], Path, bool]:
    """The config, the run folder and whether to resume."""
    if args.resume is not None:
        if args.resume:
            run_dir = Path(args.resume)
        else:
            run_dir = _newest_run(load_config(args.preset, args.config, args.overrides, args.data))
        if not (run_dir / CONFIG_FILE).is_file():
            raise CheckpointError(f"{run_dir} is not a run folder ({CONFIG_FILE} is missing): "
                                  f"nothing to resume")
        if not (run_dir / CHECKPOINT_DIR / LATEST).is_file() and not (run_dir / RESULT_FILE).is_file():
            raise CheckpointError(f"run folder {run_dir} has no checkpoint yet: nothing to resume")
        config = read_yaml(run_dir / CONFIG_FILE)
        for text in args.overrides:
            set_dotted(config, *parse_override(text))
        if args.data is not None:
            config["data"]["root"] = args.data
        validate(config)
        return config, run_dir, True
    config = load_config(args.preset, args.config, args.overrides, args.data)
    if args.run_dir is not None:
        run_dir = Path(args.run_dir)
    elif config["run"]["dir"] is not None:
        run_dir = Path(config["run"]["dir"])
    else:
        run_dir = Path(config["run"]["root"]) / f"{config['name']}-{time.strftime('%Y%m%d-%H%M%S')}"
    return config, run_dir, False


def _broadcast(value: Any, info: Any) -> Any:
    if not info.enabled:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def train_run(config: Mapping[str, Any], folder: Path, resume: bool, info: Any) -> RunResult | None:
    """Train one run (evaluating before/after when asked); rank 0 returns its result, others None."""
    import json

    from cpl_fast.data.io import atomic_write_bytes
    from cpl_fast.eval import evaluate
    from cpl_fast.train.trainer import Trainer

    if resume and (folder / RESULT_FILE).is_file():
        return RunResult.load(folder / RESULT_FILE) if info.is_main else None
    resume = resume and (folder / CHECKPOINT_DIR / LATEST).is_file()
    trainer = Trainer(config, folder, resume=resume, info=info)
    # Only now that the data and model are known to be valid: a failed start leaves no run folder behind.
    if info.is_main and not resume:
        folder.mkdir(parents=True, exist_ok=True)
        dump_yaml(config, folder / CONFIG_FILE)
    evaluate_now = config["eval"]["before_after"] and trainer.eval_set is not None and info.is_main

    def score() -> dict[str, Any]:
        return evaluate(trainer.eval_model(), trainer.eval_set, trainer.device, trainer.dtype,
                        max_images=config["eval"]["max_images"])

    before: dict[str, Any] = {}
    if evaluate_now:
        if (folder / BEFORE_FILE).is_file():
            before = json.loads((folder / BEFORE_FILE).read_text(encoding="utf-8"))
        else:
            print(f"evaluating {config['name']} before training ...", flush=True)
            before = score()
            atomic_write_bytes(folder / BEFORE_FILE, json.dumps(before).encode("utf-8"))
    if info.enabled:
        dist.barrier()
    history = trainer.fit()
    if not info.is_main:
        return None
    after = score() if config["eval"]["before_after"] and trainer.eval_set is not None else {}
    k, _ = model_k_n(config)
    result = RunResult(name=config["name"], model=config["model"]["preset"], k=k, objective=trainer.objective,
                       steps=trainer.step, wall_s=sum(h["seconds"] for h in history), history=history,
                       before=before, after=after)
    result.save(folder / RESULT_FILE)
    return result


def run(config: Mapping[str, Any], run_dir: Path, resume: bool, info: Any) -> list[RunResult]:
    """The main run and its baselines, then the report (rank 0)."""
    runs = [(config, run_dir)]
    base = {key: value for key, value in config.items() if key != "baselines"}
    base = {**base, "baselines": {}, "report": {"enabled": False}}
    for name, overrides in config["baselines"].items():
        variant = apply_overrides(base, {"name": name, "run.dir": None, **flat_dotted(overrides)})
        runs.append((variant, run_dir / name))
    results = []
    for cfg, folder in runs:
        result = train_run(cfg, folder, resume, info)
        if result is not None:
            results.append(result)
    if info.is_main and config["report"]["enabled"]:
        notes = [f"Preset `{config['name']}`; every run used the same data, crops, batches, steps and seed "
                 f"({config['seed']}). Scores are on full test images under the metric protocol `promptir` "
                 f"(RGB PSNR/SSIM, centre crop to a multiple of 16, padded to the model's multiple)."]
        path = write_report(results, run_dir, title=f"cpl-train report: {config['name']}", notes=notes)
        print(f"report: {path}")
    return results


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 OK, 2 bad configuration or arguments)."""
    args = _parser().parse_args(argv)
    started = time.perf_counter()
    try:
        config, run_dir, resume = _resolve(args)
        from cpl_fast.train.trainer import init_distributed

        info = init_distributed(cuda_requested(config))
        run_dir = Path(_broadcast(str(run_dir), info))
        if info.is_main:
            print(f"run folder: {run_dir}", flush=True)
        results = run(config, run_dir, resume, info)
    except (ConfigError, CheckpointError, LayoutError, FileNotFoundError) as exc:
        print(f"cpl-train: error: {exc}", file=sys.stderr)
        return 2
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    if results:
        print(summary_text(results))
        print(f"total wall time: {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
