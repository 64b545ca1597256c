"""Every setting of a run, with its default and meaning; the named CPR recipes; the choice lists.

This file is the one place a setting is declared: each section is a dataclass whose fields are the
settings, and the comment beside a field is its documentation (``python -m cpl_fast.config.doc``
renders ``docs/CONFIG.md`` from it). ``DEFAULTS`` is the same tree as plain mappings (what YAML files
and run folders hold); :func:`as_settings` gives a validated config as typed sections, so code reads
``settings.cpr.alpha`` and a misspelt name fails where it is written. The choice lists that the
registries of the lower layers own (models, losses, data layouts) are read from them when a config is
validated (:mod:`cpl_fast.config.validation`); the ones listed here belong to no registry below the
config (the training objectives, the optimiser and schedule names, the precisions).
"""
from __future__ import annotations

import dataclasses
import importlib.resources
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

OBJECTIVES = ("literal", "loop", "fast", "l1", "auto")
NEG_GRAD_MODES = ("all", "no_bank", "prompts", "none")
ROUTER_BALANCE = ("auto", "none", "aux_loss", "bias")
OPTIMIZERS = ("adam", "adamw")
SCHEDULES = ("warmup_cosine", "constant")
AMP_MODES = ("none", "bf16", "fp16")
PRECISIONS = ("float32", "float64")
CPU_ALLOCATORS = ("caching", "system")

# The settings, with the paper's recipe as default. ``None`` means "not set" where noted.

@dataclass(frozen=True)
class ModelSettings:
    preset: str = "cpl"            # a cpl_fast.models preset (tiny, tiny_dense, cpl, promptir)
    top_k: int | str | None = None  # experts each image uses; None keeps the preset's; "all" = dense
    num_prompts: int | None = None  # number of prompt experts; None keeps the preset's
    overrides: dict[str, Any] = field(default_factory=dict)  # any other constructor argument of the model


@dataclass(frozen=True)
class CprSettings:
    # A named bundle of the settings below (see RECIPES); settings given explicitly win over it.
    recipe: str = "stable"
    alpha: float = 0.01            # weight of the CPR term (fixed, or the start before calibration)
    alpha_relative: float | None = 0.1  # None: alpha fixed; r: alpha set at the first CPR step so that
                                        # alpha * L_pos = r * L1 there (the feature extractor's scale)
    m: int = 4                     # negatives per sample
    negative_sampler: str = "mismatched_experts"  # mismatched_experts (other experts of this image,
                                                  # the paper) | other_task (other tasks' routings)
    memory_size: int = 16          # other_task: routings remembered per task
    form: str = "hinge"            # difference (paper) | ratio | hinge | logistic
    distance: str = "l2"           # feature distance: l2 (mean squared, paper) | l1 (mean absolute)
    anchor_grad: bool = True       # L_neg also moves the positive I+ (paper: yes)
    neg_grad: str = "all"          # what the negatives' gradient trains: all | no_bank | prompts | none
    margin: float = 1.0            # hinge: negatives pushed until L_neg >= margin * L_pos
    tau: float | None = None       # logistic: temperature in L_pos units (None: L_pos of the first batch)
    warmup_steps: int = 0          # plain L1 for this many steps before CPR starts
    ramp_steps: int = 0            # then alpha rises linearly from 0 over this many steps
    features: str = "vgg19"        # frozen feature extractor
    feature_options: dict[str, Any] = field(default_factory=dict)  # keyword arguments of the extractor
                                                                   # (weights, layers)
    neg_chunk: int | None = None   # objective fast: negatives decoded per pass (None: all in one pass)
    negatives_per_step: int | None = 2  # decode r of the m negatives per step, drawn uniformly
                                        # (None: all m); the difference form's expectation is
                                        # unchanged; set by the recipe


@dataclass(frozen=True)
class RouterSettings:
    balance: str = "auto"          # auto (bias for sparse routing, none for dense) | none | aux_loss
                                   # (Switch-style load-balancing term) | bias (selection-only expert
                                   # biases nudged from usage, DeepSeek-V3 style); set by the recipe
    aux_weight: float = 0.01       # aux_loss: weight of n * sum_i f_i P_i per prompt level
    bias_rate: float = 0.001       # bias: step of each expert's bias per optimiser step


@dataclass(frozen=True)
class HealthSettings:
    grad_ratio_every: int = 50     # steps between measurements of |grad CPR| / |grad L1| (0: never)
    warn: bool = True              # warn when routing collapses or the prompt gap grows large


@dataclass(frozen=True)
class OptimSettings:
    name: str = "adam"             # adam | adamw
    lr: float = 2.0e-4             # base learning rate (the schedule multiplies it)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # Adam's moment decays
    weight_decay: float = 0.0      # L2 (adam) or decoupled (adamw) weight decay
    grad_clip: float | None = None  # max gradient norm; None = no clipping
    accumulate: int = 1            # micro-batches per optimiser step


@dataclass(frozen=True)
class ScheduleSettings:
    name: str = "warmup_cosine"    # PromptIR's linear warm-up then cosine decay to min_lr
    warmup_epochs: float = 15      # of schedule_epochs; converted to iterations
    schedule_epochs: float = 150   # the recipe's length the warm-up fraction refers to
    min_lr: float = 0.0            # the learning rate the cosine ends at


@dataclass(frozen=True)
class DataSettings:
    layout: str = "promptir3"      # embedded | clean | promptir3 | promptir5 | allweather | cdd11 |
                                   # weatherbench | paired (see cpl-data verify)
    root: str | None = None        # data root (--data ROOT); required for file layouts
    train_split: str | None = None  # None: the layout's training split
    test_split: str | None = None  # None: the layout's test split (where it has one)
    test_root: str | None = None   # clean / paired / weatherbench: a separate test folder
    tasks: list[str] = field(default_factory=lambda: ["sr", "blur", "noise", "jpeg", "rain", "haze",
                                                      "dark"])  # clean layout only
    crop: int = 128                # training crop side in pixels
    batch: int = 8                 # per process
    augment: bool = True           # flips and rotations
    balanced: bool = True          # same number of samples per task in each epoch
    samples_per_epoch: int | None = None  # None: the training set's size
    num_workers: int = 4           # DataLoader worker processes (0: load in the training process)
    skip_unreadable: bool = False  # true: a sample whose image cannot be read is skipped (warned, counted)


@dataclass(frozen=True)
class TrainSettings:
    epochs: int = 150              # passes over samples_per_epoch (unless iterations is set)
    iterations: int | None = None  # optimiser steps; overrides epochs when set
    log_every: int = 10            # steps between log lines (train.log; the console without a bar)
    cpu_allocator: str = "caching"  # CPU runs: caching (cpl_fast.memory) | system


@dataclass(frozen=True)
class CheckpointSettings:
    every: int = 1000              # optimiser steps between checkpoints (and one at the end)
    keep: int = 3                  # most recent checkpoints kept
    keep_best: bool = False        # with eval.every: the best average PSNR so far in checkpoints/best


@dataclass(frozen=True)
class EmaSettings:
    enabled: bool = False          # keep an exponential moving average of the weights (evaluated)
    decay: float = 0.999           # EMA decay per optimiser step


@dataclass(frozen=True)
class LoggingSettings:
    progress: bool = True          # tqdm bar on rank 0 when the output is a terminal
    tensorboard: bool = True       # TensorBoard event files in RUN/tensorboard
    wandb: bool = False            # Weights & Biases (pip install wandb)
    wandb_project: str = "cpl_fast"  # the W&B project of the run


@dataclass(frozen=True)
class EvalSettings:
    before_after: bool = False     # evaluate on the test split before and after training
    max_images: int | None = None  # cap per run (None: all)
    every: int = 0                 # validate on the test split every N steps and at the end (0: never)
    images_per_task: int | None = None  # validation: the first N test images of each task (None: all)
    sample_images: int = 3         # validation: restored images sent to TensorBoard / W&B (one per task)


@dataclass(frozen=True)
class ReportSettings:
    enabled: bool = False          # markdown + figures in the run folder


@dataclass(frozen=True)
class RunFolderSettings:
    dir: str | None = None         # None: runs/<name>-<timestamp>
    root: str = "runs"             # where new run folders are made


@dataclass(frozen=True)
class Settings:
    name: str = "run"              # the run folder is runs/<name>-<timestamp> unless run.dir is set
    seed: int = 0                  # seeds torch, numpy, Python, the data order and the negatives
    device: str = "auto"           # auto (cuda when available) | cpu | cuda | cuda:N
    precision: str = "float32"     # parameter dtype: float32, or float64 for exactness checks
    amp: str = "none"              # none | bf16 | fp16 (GPU only)
    threads: int | None = None     # torch.set_num_threads; None leaves torch's default
    objective: str = "loop"        # literal | loop | fast | l1 | auto (fast if available, else loop)
    model: ModelSettings = field(default_factory=ModelSettings)
    cpr: CprSettings = field(default_factory=CprSettings)
    router: RouterSettings = field(default_factory=RouterSettings)
    health: HealthSettings = field(default_factory=HealthSettings)
    optim: OptimSettings = field(default_factory=OptimSettings)
    schedule: ScheduleSettings = field(default_factory=ScheduleSettings)
    data: DataSettings = field(default_factory=DataSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    checkpoint: CheckpointSettings = field(default_factory=CheckpointSettings)
    ema: EmaSettings = field(default_factory=EmaSettings)
    logging: LoggingSettings = field(default_factory=LoggingSettings)
    eval: EvalSettings = field(default_factory=EvalSettings)
    report: ReportSettings = field(default_factory=ReportSettings)
    # Variants trained the same way (same data, steps, seed) for comparison: name -> dotted overrides.
    baselines: dict[str, dict[str, Any]] = field(default_factory=dict)
    run: RunFolderSettings = field(default_factory=RunFolderSettings)


def _typed(settings_type: type, mapping: Mapping[str, Any]) -> Any:
    values = {}
    for item in dataclasses.fields(settings_type):
        # Annotations are strings here (postponed evaluation); a section's is the name of its class.
        section = globals().get(item.type) if isinstance(item.type, str) else item.type
        value = mapping[item.name]
        values[item.name] = _typed(section, value) if dataclasses.is_dataclass(section) else value
    return settings_type(**values)


def as_settings(config: Mapping[str, Any]) -> Settings:
    """A validated config (nested mappings) as typed sections; KeyError naming a missing setting."""
    return _typed(Settings, config)


# The same tree as plain mappings: what a YAML file or a run folder's config.yaml holds.
DEFAULTS: dict[str, Any] = dataclasses.asdict(Settings())

# Settings that had another name, read under the old name (with a DeprecationWarning) for one release.
RENAMED = {"model.k": "model.top_k", "model.n": "model.num_prompts", "cpr.sampler": "cpr.negative_sampler"}

# Named CPR settings. "paper": Algorithm 1 as published (the values of DEFAULTS).
# Named bundles of CPR (and router) settings; each names every setting it decides, so switching
# recipes never leaves one of the other recipe's values behind. Evidence: bench/results/cpr_study.md.
_PAPER = {"cpr.alpha": 0.01, "cpr.alpha_relative": None, "cpr.form": "difference", "cpr.distance": "l2",
          "cpr.anchor_grad": True, "cpr.neg_grad": "all", "cpr.margin": 1.0, "cpr.tau": None,
          "cpr.warmup_steps": 0, "cpr.ramp_steps": 0, "cpr.negatives_per_step": None,
          "router.balance": "none"}
RECIPES: dict[str, dict[str, Any]] = {
    # Algorithm 1 as published: unbounded difference, alpha 0.01, everything trained by L_neg, no
    # router balancing. On the CPR study it degrades the model (artefacts, collapse of quality).
    "paper": _PAPER,
    # The default: a hinge (negatives pushed only until L_neg >= margin * L_pos), alpha set from the
    # extractor's scale (alpha * L_pos = 0.1 * L1 at the first CPR step), selection-bias balancing
    # of sparse routers (no task information without it), and 2 of the m negatives decoded per step
    # (as good as all 4 on eight seeds, at about half the CPR step's cost:
    # bench/results/negatives_per_step_study.md).
    "stable": {**_PAPER, "cpr.alpha_relative": 0.1, "cpr.form": "hinge", "router.balance": "auto",
               "cpr.negatives_per_step": 2},
}

# Mappings whose keys are free (not checked against DEFAULTS).
FREE_MAPPINGS = {"model.overrides", "cpr.feature_options", "baselines"}

# The presets are the YAML files shipped in cpl_fast/configs.
PRESET_NAMES = tuple(sorted(entry.name[:-len(".yaml")]
                            for entry in importlib.resources.files("cpl_fast.configs").iterdir()
                            if entry.name.endswith(".yaml")))



class ConfigError(ValueError):
    """A configuration is invalid; the message names the setting."""

