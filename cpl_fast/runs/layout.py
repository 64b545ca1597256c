"""The names of everything a run folder holds: the one place they are spelled.

    RUN/config.yaml                       the run's effective settings (what --resume reads back)
    RUN/result.json                       the evaluation after training
    RUN/eval_before.json                  the evaluation of the starting weights
    RUN/.lock                             held by the process writing the run
    RUN/checkpoints/latest                name of the newest complete checkpoint
    RUN/checkpoints/step_00000120/        one checkpoint: model.safetensors, ema.safetensors,
                                          trainer_state.pt, state.json
    RUN/checkpoints/best/                 the weights of the best validation so far, and best.json
"""
CONFIG_FILE = "config.yaml"
RESULT_FILE = "result.json"
BEFORE_FILE = "eval_before.json"
LOCK_FILE = ".lock"
CHECKPOINT_DIR = "checkpoints"
LATEST = "latest"
STATE_JSON = "state.json"
TRAINER_STATE = "trainer_state.pt"
MODEL_FILE = "model.safetensors"
EMA_FILE = "ema.safetensors"
BEST_DIR = "best"
BEST_JSON = "best.json"
# The entries that make a folder a run folder (a fresh run refuses to write over them).
RUN_MARKERS = (CONFIG_FILE, CHECKPOINT_DIR, RESULT_FILE)
