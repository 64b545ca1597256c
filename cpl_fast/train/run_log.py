"""Where a run reports: messages (console and ``train.log``) and metrics (TensorBoard, W&B).

* ``RunLog``: the one thing the trainer reports to. Every message goes to the console, by default
  through the ``cpl_fast.train`` logger (``log_message``; the commands install its handler), with any
  progress bar cleared and redrawn around it, never glued to it; and, once the run folder exists, to
  ``RUN/train.log`` with a timestamp. Messages from before the folder exists are kept and written
  first. Its ``scalars``, ``images`` and ``close`` forward to the metric sinks opened with the folder.
* ``MetricSinks``: scalars, text and images to TensorBoard and/or W&B behind one interface.
* ``check_metric_backends``: the optional packages the config asks for are importable; called before
  anything of the run is created, so a missing ``wandb`` leaves no half-made run folder.
"""
from __future__ import annotations

import importlib.util
import logging
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

LOG_FILE = "train.log"
TENSORBOARD_DIR = "tensorboard"
LOGGER = "cpl_fast.train"
logger = logging.getLogger(LOGGER)


class MissingLoggerError(ValueError):
    """A logger the config asks for cannot be imported (names the package and the setting)."""


def check_metric_backends(config: Mapping[str, Any]) -> None:
    """Raise ``MissingLoggerError`` when ``logging.tensorboard`` / ``logging.wandb`` is on but its package
    is not installed."""
    wanted = {"tensorboard": ("logging.tensorboard", "pip install tensorboard"),
              "wandb": ("logging.wandb", "pip install wandb")}
    for package, (setting, fix) in wanted.items():
        if config["logging"][package] and importlib.util.find_spec(package) is None:
            raise MissingLoggerError(f"{setting}=true but {package} is not installed: {fix}, or set "
                                     f"{setting}=false")


def console_echo(message: str) -> None:
    from tqdm.auto import tqdm

    tqdm.write(message, file=sys.stdout)


def log_message(message: str) -> None:
    """``message`` at INFO on the ``cpl_fast.train`` logger, with progress bars cleared around it."""
    from tqdm.auto import tqdm

    with tqdm.external_write_mode(file=sys.stdout):
        logger.info(message)


class RunLog:
    """A callable taking one message. ``echo``: the console (``None``: silent; a callable receives each
    message instead of the logger); ``file_only=True`` in a call writes the message to ``train.log``
    alone (the per-step lines while a bar shows progress)."""

    def __init__(self, echo: Callable[[str], None] | None = log_message) -> None:
        self.echo = echo
        self.path: Path | None = None
        self._pending: list[str] = []
        self.sinks: MetricSinks | None = None

    def __call__(self, message: str, file_only: bool = False) -> None:
        if self.echo is not None and not file_only:
            self.echo(message)
        line = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}\n"
        if self.path is None:
            self._pending.append(line)
            return
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(line)

    def open(self, run_dir: Path) -> None:
        """Start writing ``run_dir/train.log`` (appended to on resume), beginning with the kept messages."""
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        self.path = Path(run_dir) / LOG_FILE
        pending, self._pending = self._pending, []
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.writelines(pending)

    def open_metrics(self, config: Mapping[str, Any], run_dir: Path, step: int, enabled: bool = True) -> None:
        """Open the TensorBoard / W&B sinks the config enables (none where ``enabled`` is False)."""
        self.sinks = MetricSinks(config, Path(run_dir), step, enabled=enabled)

    def scalars(self, values: Mapping[str, float], step: int, group: Callable[[str], str]) -> None:
        if self.sinks is not None:
            self.sinks.scalars(values, step, group)

    def images(self, images: Mapping[str, Any], step: int) -> None:
        if self.sinks is not None:
            self.sinks.images(images, step)

    def close(self) -> None:
        """Close the metric sinks; messages still reach the console and ``train.log``."""
        if self.sinks is not None:
            self.sinks.close()
            self.sinks = None


class MetricSinks:
    """TensorBoard and W&B as one sink; each is opened only when the config enables it (rank 0)."""

    def __init__(self, config: Mapping[str, Any], run_dir: Path, step: int, enabled: bool = True) -> None:
        self.writer = None
        self.wandb_run = None
        if not enabled:
            return
        check_metric_backends(config)
        if config["logging"]["tensorboard"]:
            import json

            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(run_dir / TENSORBOARD_DIR), purge_step=step + 1)
            self.writer.add_text("config", "```\n" + json.dumps(config, indent=2) + "\n```", step)
        if config["logging"]["wandb"]:
            import wandb

            self.wandb_run = wandb.init(project=config["logging"]["wandb_project"], name=run_dir.name,
                                        dir=str(run_dir), config=dict(config), resume="allow")

    def scalars(self, values: Mapping[str, float], step: int, group: Callable[[str], str]) -> None:
        """``values`` under ``group(key)/key`` in TensorBoard and ``group(key)/key`` in W&B."""
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(f"{group(key)}/{key}", value, step)
        if self.wandb_run is not None:
            self.wandb_run.log({f"{group(key)}/{key}": value for key, value in values.items()}, step=step)

    def images(self, images: Mapping[str, Any], step: int) -> None:
        """``(3, H, W)`` float tensors in [0, 1] under their names."""
        if not images:
            return
        if self.writer is not None:
            for name, image in images.items():
                self.writer.add_image(name, image.clamp(0, 1), step)
        if self.wandb_run is not None:
            import wandb

            self.wandb_run.log({name: wandb.Image(image.clamp(0, 1).permute(1, 2, 0).numpy())
                                for name, image in images.items()}, step=step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
