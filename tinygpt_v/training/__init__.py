"""Training: the accelerate-based trainer, optimiser and schedules, checkpoints, logging, and
chaining stages into a pipeline.

Importing this package registers the checkers of the config's `run:` and `pipeline:` sections
and the lr schedules (LR_SCHEDULES). The trainer itself (model, data, accelerate) is imported
only when a run starts.

    from tinygpt_v.config import load_config
    from tinygpt_v.training import train
    train(load_config("train_configs/stage1.yaml"))       # -> Path of checkpoint_final
"""
from . import schedules  # noqa: F401  (registers the lr schedules before the run checker reads them)
from . import preflight  # noqa: F401  (registers the checks across model / datasets / run)
from .checkpointing import ResumeError, latest_checkpoint, list_checkpoints, load_trainable, read_meta
from .pipeline import check_pipeline_section, is_pipeline_file, run_pipeline
from .settings import RunSettings, check_run_section, read_run_settings, run_schema

__all__ = ["train", "Trainer", "NonFiniteLossError", "run_pipeline", "is_pipeline_file", "run_schema",
           "check_run_section", "check_pipeline_section", "read_run_settings", "RunSettings",
           "ResumeError", "latest_checkpoint", "list_checkpoints", "load_trainable", "read_meta"]


def __getattr__(name: str):
    if name in ("train", "Trainer", "NonFiniteLossError"):
        from . import trainer
        return getattr(trainer, name)
    raise AttributeError(name)
