"""Model building blocks and the Transformer."""

from evoformer.model.attention import Attention, KVCache
from evoformer.model.loss import lm_loss
from evoformer.model.transformer import Block, Transformer, build_model

__all__ = ["Attention", "Block", "KVCache", "Transformer", "build_model", "lm_loss"]
