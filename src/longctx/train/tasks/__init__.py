"""Small models trained on the synthetic long-context tasks: run configs (``config``),
training on the shared loop (``trainer``) and comparisons of architectures (``compare``)."""

from longctx.eval.tasks import EVAL_SEED_BASE
from longctx.train.tasks.compare import compare, evaluate_run
from longctx.train.tasks.config import (
    ARCHS,
    COMPARED_ARCHS,
    RUN_KIND,
    TASK_DEFAULTS,
    TASK_NAMES,
    TaskConfig,
    apply_overrides,
    parse_arch,
    read_task_config,
)
from longctx.train.tasks.trainer import TaskTrainResult, load_task_run, train_task

__all__ = [
    "ARCHS", "COMPARED_ARCHS", "EVAL_SEED_BASE", "RUN_KIND", "TASK_DEFAULTS", "TASK_NAMES", "TaskConfig",
    "TaskTrainResult", "apply_overrides", "compare", "evaluate_run", "load_task_run", "parse_arch",
    "read_task_config", "train_task",
]
