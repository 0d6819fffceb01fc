"""Training engine: trainer loop, optimizer and schedules, metrics."""

from evoformer.engine.trainer import Trainer, TrainResult

__all__ = ["TrainResult", "Trainer"]
