"""Sharded, atomic checkpoints (torch.distributed.checkpoint) and model loading."""

from evoformer.checkpoint.io import (
    WEIGHTS_ONLY,
    list_checkpoints,
    load_checkpoint,
    read_trainer_state,
    resolve_checkpoint,
    save_checkpoint,
    write_text_atomic,
)
from evoformer.checkpoint.model_io import checkpoint_config, load_model

__all__ = [
    "WEIGHTS_ONLY",
    "checkpoint_config",
    "list_checkpoints",
    "load_checkpoint",
    "load_model",
    "read_trainer_state",
    "resolve_checkpoint",
    "save_checkpoint",
    "write_text_atomic",
]
