"""Sharded, atomic checkpoints (torch.distributed.checkpoint) and model loading."""

from evoformer.checkpoint.io import (
    LATEST,
    WEIGHTS_ONLY,
    CheckpointWriteError,
    PendingSave,
    begin_save,
    list_checkpoints,
    load_checkpoint,
    read_trainer_state,
    resolve_checkpoint,
    save_checkpoint,
    write_text_atomic,
)
from evoformer.checkpoint.model_io import checkpoint_config, load_model

__all__ = [
    "LATEST",
    "WEIGHTS_ONLY",
    "CheckpointWriteError",
    "PendingSave",
    "begin_save",
    "checkpoint_config",
    "list_checkpoints",
    "load_checkpoint",
    "load_model",
    "read_trainer_state",
    "resolve_checkpoint",
    "save_checkpoint",
    "write_text_atomic",
]
