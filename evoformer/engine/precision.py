"""Mixed precision: the compute dtype of each precision, FSDP2's policy, fp16 loss scaling.

``precision`` is one of

- ``fp32``: everything in fp32.
- ``bf16``: fp32 master weights and optimizer state; matmuls in bf16. One data-parallel rank
  and DDP run the forward under ``torch.autocast(bf16)``; FSDP2 casts the all-gathered
  parameters to bf16 (``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)``), so the
  all-gather moves half the bytes and gradients are reduced in fp32. No loss scaling: bf16 has
  fp32's exponent range.
- ``fp16``: the same with fp16, plus dynamic loss scaling (``LossScaler``): fp16's 5-bit
  exponent flushes small gradients to zero unless the loss is multiplied before backward.

What stays in fp32 whatever the precision is the model's business and holds under autocast and
under FSDP2's parameter cast alike: norms compute their statistic in fp32 (``model.norms``),
the loss takes its softmax in fp32 (``model.loss``), the MoE router scores in fp32 with autocast
off (``model.moe``), and the MoE load-balancing bias is an fp32 buffer (buffers are not cast).

Loss scaling is sharded-aware at no extra cost: overflow is read off the global gradient norm
that clipping computes anyway, which is already reduced over every data-parallel shard (DDP
averages the gradients, so one rank's inf reaches all; FSDP2's norm is a DTensor reduction over
the shards) and over the TP group for sharded parameters. Only the norm's replicated part is
local to a TP rank, so under tp > 1 the overflow flag is all-reduced over the TP group (one
scalar). Every rank therefore takes the same decision, and a skipped step is skipped everywhere.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.distributed as dist

from evoformer.config.schema import LossScaleConfig

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def compute_dtype(precision: str) -> torch.dtype:
    """The matmul dtype of a ``precision`` setting."""
    return DTYPES[precision]


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """``torch.autocast`` to the precision's dtype (a no-op context for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=compute_dtype(precision))


def fsdp_mp_policy(precision: str):
    """FSDP2's mixed-precision policy: parameters all-gathered and computed in the precision's
    dtype, gradients reduce-scattered in fp32 into the fp32 sharded master weights (``None``
    for fp32: FSDP2's default, everything fp32)."""
    if precision == "fp32":
        return None
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=compute_dtype(precision), reduce_dtype=torch.float32)


class LossScaler:
    """Dynamic loss scaling for fp16 (the scheme of Micikevicius et al. 2018, as torch's
    ``GradScaler`` and Megatron run it).

    Backward runs on ``loss * scale``; the gradients are unscaled (``unscale_``) before the
    norm is taken and clipping applied. ``update(overflow)`` then decides: on overflow (a
    non-finite norm) the step is skipped, the scale is multiplied by ``backoff_factor`` (never
    below ``min_scale``) and the clean-step count restarts; after ``growth_interval`` clean
    steps in a row the scale is multiplied by ``growth_factor``. The state (scale, clean steps
    since the last change, skipped steps) is plain Python numbers: ``state_dict`` is JSON and a
    resume continues exactly.
    """

    def __init__(
        self,
        initial_scale: float = 2.0**16,
        growth_interval: int = 1000,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        min_scale: float = 1.0,
    ) -> None:
        if not (initial_scale > 0 and growth_factor >= 1.0 and 0 < backoff_factor < 1.0):
            raise ValueError(
                "loss scale: initial_scale must be > 0, growth_factor >= 1 and backoff_factor "
                f"in (0, 1), got {initial_scale}, {growth_factor}, {backoff_factor}"
            )
        if growth_interval < 1 or min_scale <= 0:
            raise ValueError("loss scale: growth_interval must be >= 1 and min_scale > 0")
        self.scale = float(initial_scale)
        self.growth_interval = growth_interval
        self.growth_factor = growth_factor
        self.backoff_factor = backoff_factor
        self.min_scale = float(min_scale)
        self.clean_steps = 0  # consecutive steps without overflow since the last scale change
        self.skipped_steps = 0  # total over the run

    @classmethod
    def from_config(cls, cfg: LossScaleConfig) -> LossScaler:
        return cls(
            cfg.initial_scale,
            cfg.growth_interval,
            cfg.growth_factor,
            cfg.backoff_factor,
            cfg.min_scale,
        )

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.scale

    @torch.no_grad()
    def unscale_(self, parameters) -> None:
        """Divide the gradients of ``parameters`` by the scale in place (one fused multiply;
        works on DTensor shards too)."""
        grads = [p.grad for p in parameters if p.grad is not None]
        if grads:
            torch._foreach_mul_(grads, 1.0 / self.scale)

    def update(self, overflow: bool) -> None:
        """Account for one step: back off and count a skip on ``overflow``, else grow after
        ``growth_interval`` clean steps in a row."""
        if overflow:
            self.scale = max(self.scale * self.backoff_factor, self.min_scale)
            self.clean_steps = 0
            self.skipped_steps += 1
            return
        self.clean_steps += 1
        if self.clean_steps == self.growth_interval:
            self.scale *= self.growth_factor
            self.clean_steps = 0

    def state_dict(self) -> dict[str, Any]:
        return {
            "scale": self.scale,
            "clean_steps": self.clean_steps,
            "skipped_steps": self.skipped_steps,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scale = float(state["scale"])
        self.clean_steps = int(state["clean_steps"])
        self.skipped_steps = int(state["skipped_steps"])


def found_overflow(norm: torch.Tensor, tp_group: dist.ProcessGroup | None) -> bool:
    """Whether the global gradient ``norm`` (from clipping, reduced over the data-parallel
    shards) is non-finite on any rank of ``tp_group``; the same answer on every rank. Its
    replicated part is summed locally on each TP rank, hence the one-scalar MAX reduction."""
    flag = (~torch.isfinite(norm.detach().float())).float().reshape(1)
    if tp_group is not None and dist.get_world_size(tp_group) > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=tp_group)
    return bool(flag.item())
