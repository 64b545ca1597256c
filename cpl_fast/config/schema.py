"""Every setting of a run, with its default and meaning; the named CPR recipes; the choice lists.

This file is the one place a setting is declared: the comment beside each key of ``DEFAULTS`` is its
documentation (``python -m cpl_fast.config.doc`` renders ``docs/CONFIG.md`` from it). The choice lists
that the registries of the lower layers own (models, losses, data layouts) are read from them when a
config is validated (:mod:`cpl_fast.config.validation`); the ones listed here belong to no registry
below the config (the training objectives, the optimiser and schedule names, the precisions).
"""
from __future__ import annotations

import importlib.resources
from typing import Any

OBJECTIVES = ("literal", "loop", "fast", "l1", "auto")
NEG_GRAD_MODES = ("all", "no_bank", "prompts", "none")
ROUTER_BALANCE = ("auto", "none", "aux_loss", "bias")
OPTIMIZERS = ("adam", "adamw")
SCHEDULES = ("warmup_cosine", "constant")
AMP_MODES = ("none", "bf16", "fp16")
PRECISIONS = ("float32", "float64")
CPU_ALLOCATORS = ("caching", "system")

# Every setting, with the paper's recipe as default. ``None`` means "not set" where noted.
DEFAULTS: dict[str, Any] = {
    "name": "run",                 # the run folder is runs/<name>-<timestamp> unless run.dir is set
    "seed": 0,                     # seeds torch, numpy, Python, the data order and the negatives
    "device": "auto",              # auto (cuda when available) | cpu | cuda | cuda:N
    "precision": "float32",        # parameter dtype: float32, or float64 for exactness checks
    "amp": "none",                 # none | bf16 | fp16 (GPU only)
    "threads": None,               # torch.set_num_threads; None leaves torch's default
    "objective": "loop",           # literal | loop | fast | l1 | auto (fast if available, else loop)
    "model": {
        "preset": "cpl",           # a cpl_fast.models preset (tiny, tiny_dense, cpl, promptir)
        "k": None,                 # top-k experts; None keeps the preset's; "all" = dense
        "n": None,                 # number of prompt experts; None keeps the preset's
        "overrides": {},           # any other constructor argument of the model
    },
    "cpr": {
        # A named bundle of the settings below (see RECIPES); settings given explicitly win over it.
        "recipe": "stable",
        "alpha": 0.01,             # weight of the CPR term (fixed, or the start before calibration)
        "alpha_relative": 0.1,     # None: alpha fixed; r: alpha set at the first CPR step so that
                                   # alpha * L_pos = r * L1 there (the feature extractor's scale)
        "m": 4,                    # negatives per sample
        "sampler": "mismatched_experts",  # negatives: mismatched_experts (other experts of this
                                          # image, the paper) | other_task (other tasks' routings)
        "memory_size": 16,         # other_task: routings remembered per task
        "form": "hinge",           # difference (paper) | ratio | hinge | logistic
        "distance": "l2",          # feature distance: l2 (mean squared, paper) | l1 (mean absolute)
        "anchor_grad": True,       # L_neg also moves the positive I+ (paper: yes)
        "neg_grad": "all",         # what the negatives' gradient trains: all | no_bank | prompts | none
        "margin": 1.0,             # hinge: negatives pushed until L_neg >= margin * L_pos
        "tau": None,               # logistic: temperature in L_pos units (None: L_pos of the first batch)
        "warmup_steps": 0,         # plain L1 for this many steps before CPR starts
        "ramp_steps": 0,           # then alpha rises linearly from 0 over this many steps
        "features": "vgg19",       # frozen feature extractor
        "feature_options": {},     # keyword arguments of the extractor (weights, layers)
        "neg_chunk": None,         # objective fast: negatives decoded per pass (None: all in one pass)
        "negatives_per_step": None,  # objective fast: decode r of the m negatives per step, drawn
                                     # uniformly (None: all m); the difference form's expectation is unchanged
    },
    "router": {
        "balance": "auto",         # auto (bias for sparse routing, none for dense) | none | aux_loss
                                   # (Switch-style load-balancing term) | bias (selection-only expert
                                   # biases nudged from usage, DeepSeek-V3 style); set by the recipe
        "aux_weight": 0.01,        # aux_loss: weight of n * sum_i f_i P_i per prompt level
        "bias_rate": 0.001,        # bias: step of each expert's bias per optimiser step
    },
    "health": {
        "grad_ratio_every": 50,    # steps between measurements of |grad CPR| / |grad L1| (0: never)
        "warn": True,              # warn when routing collapses or the prompt gap grows large
    },
    "optim": {
        "name": "adam",            # adam | adamw
        "lr": 2.0e-4,              # base learning rate (the schedule multiplies it)
        "betas": [0.9, 0.999],     # Adam's moment decays
        "weight_decay": 0.0,       # L2 (adam) or decoupled (adamw) weight decay
        "grad_clip": None,         # max gradient norm; None = no clipping
        "accumulate": 1,           # micro-batches per optimiser step
    },
    "schedule": {
        "name": "warmup_cosine",   # PromptIR's linear warm-up then cosine decay to min_lr
        "warmup_epochs": 15,       # of schedule_epochs; converted to iterations
        "schedule_epochs": 150,    # the recipe's length the warm-up fraction refers to
        "min_lr": 0.0,             # the learning rate the cosine ends at
    },
    "data": {
        "layout": "promptir3",     # embedded | clean | promptir3 | promptir5 | allweather | cdd11 |
                                   # weatherbench | paired (see cpl-data verify)
        "root": None,              # data root (--data ROOT); required for file layouts
        "train_split": None,       # None: the layout's training split
        "test_split": None,        # None: the layout's test split (where it has one)
        "test_root": None,         # clean / paired / weatherbench: a separate test folder
        "tasks": ["sr", "blur", "noise", "jpeg", "rain", "haze", "dark"],  # clean layout only
        "crop": 128,               # training crop side in pixels
        "batch": 8,                # per process
        "augment": True,           # flips and rotations
        "balanced": True,          # same number of samples per task in each epoch
        "samples_per_epoch": None,  # None: the training set's size
        "num_workers": 4,          # DataLoader worker processes (0: load in the training process)
        "skip_unreadable": False,  # true: a sample whose image cannot be read is skipped (warned, counted)
    },
    "train": {
        "epochs": 150,             # passes over samples_per_epoch (unless iterations is set)
        "iterations": None,        # optimiser steps; overrides epochs when set
        "log_every": 10,           # steps between log lines (train.log; the console without a bar)
        "cpu_allocator": "caching",  # CPU runs: caching (cpl_fast.memory) | system
    },
    "checkpoint": {
        "every": 1000,             # optimiser steps between checkpoints (and one at the end)
        "keep": 3,                 # most recent checkpoints kept
        "keep_best": False,        # with eval.every: the best average PSNR so far in checkpoints/best
    },
    "ema": {
        "enabled": False,          # keep an exponential moving average of the weights (evaluated)
        "decay": 0.999,            # EMA decay per optimiser step
    },
    "logging": {
        "progress": True,          # tqdm bar on rank 0 when the output is a terminal
        "tensorboard": True,       # TensorBoard event files in RUN/tensorboard
        "wandb": False,            # Weights & Biases (pip install wandb)
        "wandb_project": "cpl_fast",  # the W&B project of the run
    },
    "eval": {
        "before_after": False,     # evaluate on the test split before and after training
        "max_images": None,        # cap per run (None: all)
        "every": 0,                # validate on the test split every N steps and at the end (0: never)
        "images_per_task": None,   # validation: the first N test images of each task (None: all)
        "sample_images": 3,        # validation: restored images sent to TensorBoard / W&B (one per task)
    },
    "report": {
        "enabled": False,          # markdown + figures in the run folder
    },
    # Variants trained the same way (same data, steps, seed) for comparison: name -> dotted overrides.
    "baselines": {},
    "run": {
        "dir": None,               # None: runs/<name>-<timestamp>
        "root": "runs",            # where new run folders are made
    },
}

# Named CPR settings. "paper": Algorithm 1 as published (the values of DEFAULTS).
# Named bundles of CPR (and router) settings; each names every setting it decides, so switching
# recipes never leaves one of the other recipe's values behind. Evidence: bench/results/cpr_study.md.
_PAPER = {"cpr.alpha": 0.01, "cpr.alpha_relative": None, "cpr.form": "difference", "cpr.distance": "l2",
          "cpr.anchor_grad": True, "cpr.neg_grad": "all", "cpr.margin": 1.0, "cpr.tau": None,
          "cpr.warmup_steps": 0, "cpr.ramp_steps": 0, "router.balance": "none"}
RECIPES: dict[str, dict[str, Any]] = {
    # Algorithm 1 as published: unbounded difference, alpha 0.01, everything trained by L_neg, no
    # router balancing. On the CPR study it degrades the model (artefacts, collapse of quality).
    "paper": _PAPER,
    # The default: a hinge (negatives pushed only until L_neg >= margin * L_pos), alpha set from the
    # extractor's scale (alpha * L_pos = 0.1 * L1 at the first CPR step) and selection-bias balancing
    # of sparse routers (no task information without it).
    "stable": {**_PAPER, "cpr.alpha_relative": 0.1, "cpr.form": "hinge", "router.balance": "auto"},
}

# Mappings whose keys are free (not checked against DEFAULTS).
FREE_MAPPINGS = {"model.overrides", "cpr.feature_options", "baselines"}

# The presets are the YAML files shipped in cpl_fast/configs.
PRESET_NAMES = tuple(sorted(entry.name[:-len(".yaml")]
                            for entry in importlib.resources.files("cpl_fast.configs").iterdir()
                            if entry.name.endswith(".yaml")))



class ConfigError(ValueError):
    """A configuration is invalid; the message names the setting."""

