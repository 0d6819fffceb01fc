"""Loading a trained model for inference from any checkpoint folder."""

from __future__ import annotations

from pathlib import Path
from typing import cast

import torch
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from evoformer.checkpoint.io import load_checkpoint, resolve_checkpoint
from evoformer.config.schema import Config
from evoformer.errors import UserError
from evoformer.model import Transformer, build_model


def checkpoint_config(ckpt: Path) -> Config:
    """The resolved Config stored with a checkpoint."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.load(ckpt / "config.yaml"))
        # to_object of a structured Config node builds a Config; the stub cannot say so.
        return cast(Config, OmegaConf.to_object(merged))
    except (OmegaConfBaseException, ValueError, OSError) as err:
        raise UserError(
            f"checkpoint {ckpt}: bad config.yaml ({str(err).splitlines()[0]})"
        ) from None


def load_model(path: str | Path, device: str | torch.device = "cpu") -> Transformer:
    """A model in eval mode from a checkpoint (step folder, checkpoints folder or run folder);
    ``model(input_ids [B, T])`` returns logits [B, T, V]."""
    ckpt = resolve_checkpoint(path)
    cfg = checkpoint_config(ckpt)
    model = build_model(cfg.model, device=device, seed=None)
    load_checkpoint(ckpt, model, restore_rng=False)
    return model.eval()
