"""What the commands share: the config arguments, the one order of precedence of a config's layers,
the one mapping of errors to exit statuses, and the ``cpl_fast`` logger's command-line handler.

Only the standard library is imported at module level: ``--help`` must not wait for torch.
"""
from __future__ import annotations

import argparse
import copy
import logging
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

# Kept importable from here: the table writer moved down to layer 0, where eval/ can use it too.
from cpl_fast.tables import markdown_table as markdown_table

LOGGER = "cpl_fast"
log = logging.getLogger(LOGGER)

USAGE = 2  # refused: bad arguments, configuration, data, checkpoint or output path
FAILED = 1  # the work started and stopped part-way


class UsageError(ValueError):
    """Bad arguments; the message says which."""


# ------------------------------------------------------------------------------------- arguments

def add_preset(parser: argparse.ArgumentParser, help: str) -> None:
    from cpl_fast.config import PRESET_NAMES

    parser.add_argument("--preset", choices=PRESET_NAMES, help=help)


def add_config_files(parser: argparse.ArgumentParser, help: str) -> None:
    parser.add_argument("--config", action="append", default=[], metavar="FILE", help=help)


def add_set(parser: argparse.ArgumentParser, help: str, metavar: str = "KEY=VALUE") -> None:
    parser.add_argument("--set", action="append", default=[], dest="overrides", metavar=metavar, help=help)


def add_data(parser: argparse.ArgumentParser, help: str) -> None:
    parser.add_argument("--data", metavar="ROOT", help=help)


def add_device(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda or cuda:N")


def torch_device(name: str) -> Any:
    """The ``torch.device`` a ``--device`` names; ValueError when it names CUDA on a machine without."""
    from cpl_fast.devices import resolve_device

    return resolve_device(name)


# ---------------------------------------------------------------------------------------- config

def layered_config(preset: str | None, files: Sequence[str], data: str | None, overrides: Sequence[str], *,
                   base: Mapping[str, Any] | None = None, model: Mapping[str, Any] | None = None,
                   keep: Callable[[str], bool] = lambda key: True) -> dict[str, Any]:
    """The effective config, validated, in the one order of precedence of every command:
    defaults <- ``--preset`` <- ``--config`` files (or instead of these three ``base``, a run's
    config.yaml) <- ``--data`` <- ``--set``.

    ``model``: a model section that replaces the layers' under ``--set`` (a run's or ``--model``'s:
    a benchmark never chooses the model of a checkpoint); ``keep``: which ``--set`` keys apply here.
    """
    from cpl_fast.config import load_config, parse_override, set_dotted, validate

    settings = [(text, *parse_override(text)) for text in overrides]
    settings = [(text, key, value) for text, key, value in settings if keep(key)]
    if base is None:
        # --set goes through load_config: a --set cpr.recipe=... brings its recipe's settings.
        config = load_config(preset, files, [text for text, _, _ in settings], data)
    else:
        config = copy.deepcopy(dict(base))
        if data is not None:
            config["data"]["root"] = data
        for _, key, value in settings:
            set_dotted(config, key, value)
    if model is not None:
        config["model"] = copy.deepcopy(dict(model))
        for _, key, value in settings:
            if key.startswith("model."):
                set_dotted(config, key, value)
    if base is not None or model is not None:  # load_config validated the rest
        validate(config)
    return config


# ---------------------------------------------------------------------------------------- errors

def errors(usage: tuple[type[BaseException], ...] = (),
           failures: tuple[type[BaseException], ...] = ()) -> tuple[tuple[type[BaseException], ...],
                                                                    tuple[type[BaseException], ...]]:
    """``(exit 2, exit 1)`` error classes: what every command refuses as bad input, with a command's own
    ``usage`` additions; and the ``failures`` that stop its work part-way. A command catches the first
    before the second, so a FileNotFoundError is a usage error even where OSError is a failure."""
    import yaml

    from cpl_fast.config import ConfigError
    from cpl_fast.data.layouts import LayoutError
    from cpl_fast.data.sources import DataSourceError
    from cpl_fast.runs.checkpoints import CheckpointError
    from cpl_fast.runs.folder import RunFolderError

    common = (UsageError, ConfigError, CheckpointError, LayoutError, DataSourceError, RunFolderError,
              FileNotFoundError, yaml.YAMLError, UnicodeDecodeError)
    return common + tuple(usage), tuple(failures)


def fail(prog: str, exc: BaseException | str, status: int) -> int:
    """Report ``exc`` as the one ``prog: error: ...`` line and return ``status``."""
    from cpl_fast.data.io import error_text

    log.error("%s: error: %s", prog, exc if isinstance(exc, str) else error_text(exc))
    return status


# --------------------------------------------------------------------------------------- logging

class _ConsoleHandler(logging.Handler):
    """Plain messages: warnings and errors to stderr, the rest to stdout. The streams are looked up at
    each message, so a replaced ``sys.stdout`` (a test's capture, a redirect) gets them."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            stream = sys.stderr if record.levelno >= logging.WARNING else sys.stdout
            stream.write(self.format(record) + "\n")
            stream.flush()
        except Exception:  # noqa: BLE001 - logging must never raise into the command
            self.handleError(record)


def setup_logging() -> logging.Logger:
    """Install the command line's handler on the ``cpl_fast`` logger once; returns the logger."""
    if not any(isinstance(h, _ConsoleHandler) for h in log.handlers):
        log.addHandler(_ConsoleHandler())
    log.setLevel(logging.INFO)
    log.propagate = False  # a root handler configured by a host program would print every line twice
    return log
