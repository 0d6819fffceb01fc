"""The parallel layout: one ParallelDims object, built once, passed explicitly.

Data-parallel size is derived from the world size: dp = world / (tp * pp). Later parallelisms
(tensor, pipeline, expert) add their mesh dimensions here; nothing in evoformer keeps
process-group globals.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from evoformer.config.schema import ParallelConfig
from evoformer.errors import UserError


@dataclass
class ParallelDims:
    """Sizes of each parallel dimension and this process's place in them."""

    world_size: int
    rank: int
    local_rank: int
    tp: int = 1
    pp: int = 1
    dp: int = field(init=False)

    def __post_init__(self) -> None:
        model_parallel = self.tp * self.pp
        if self.world_size % model_parallel:
            raise UserError(
                f"world size {self.world_size} is not divisible by tp*pp = {self.tp}*{self.pp}"
            )
        self.dp = self.world_size // model_parallel

    @property
    def dp_rank(self) -> int:
        return self.rank // (self.tp * self.pp)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_env(cls, cfg: ParallelConfig) -> ParallelDims:
        """Sizes from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) and the config."""
        return cls(
            world_size=int(os.environ.get("WORLD_SIZE", 1)),
            rank=int(os.environ.get("RANK", 0)),
            local_rank=int(os.environ.get("LOCAL_RANK", 0)),
            tp=cfg.tp,
            pp=cfg.pp,
        )


def pick_device(choice: str, dims: ParallelDims) -> torch.device:
    """``auto`` takes this rank's GPU when CUDA is present, else the CPU."""
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise UserError("run.device=cuda but no CUDA device is available")
        torch.cuda.set_device(dims.local_rank)
        return torch.device("cuda", dims.local_rank)
    return torch.device("cpu")


def init_process_group(dims: ParallelDims, device: torch.device) -> None:
    """NCCL on GPU, gloo on CPU; a no-op for a single process."""
    if dims.distributed and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, rank=dims.rank, world_size=dims.world_size)


def destroy_process_group() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
