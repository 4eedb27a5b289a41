"""Training: configuration, optimizer and schedule, checkpoints, metrics, the loop."""

from longctx.train.config import RunConfig, load_run_config, preset_names
from longctx.train.lm import TrainResult, train

__all__ = ["RunConfig", "TrainResult", "load_run_config", "preset_names", "train"]
