"""ZeRO through DeepSpeed (``zero.backend: deepspeed``): DeepSpeed's engine, our model, optimizer,
schedule, tensor parallelism and checkpoint folder.

``DeepSpeedStrategy.setup`` builds our AdamW (``engine.optim.build_optimizer``: our parameter
groups) and hands it to ``deepspeed.initialize`` as the client optimizer, with a DeepSpeed config
generated from ours (``deepspeed_config``) and an ``mpu`` built from our ``ParallelGroups``
(``ModelParallelUnit``), so DeepSpeed reduces and partitions over the data-parallel group only and
counts tensor-parallel shards right in its gradient norm. DeepSpeed then owns the ZeRO partitioning
(stage 1: optimizer state; 2: + gradients; 3: + parameters), the gradient reduction, clipping,
fp16's dynamic loss scaler and CPU/NVMe offload. The learning rate stays ours: the trainer passes
it to ``step`` and it is written into the client optimizer's parameter groups, which DeepSpeed's
ZeRO optimizers share.

Gradient accumulation: the trainer divides each micro-batch loss by the micro-batch count, so
``backward`` calls ``engine.backward(loss, scale_wrt_gas=False)`` (no second division), and the
accumulation boundary is set explicitly per micro-batch (``set_gradient_accumulation_boundary``):
gradients are reduced on the last micro-batch (stage 1) or partitioned per micro-batch (stage 2/3,
DeepSpeed's design), and ``engine.step`` updates once per optimizer step.

Stage 0 (plain data parallelism through DeepSpeed's engine) clips with our ``engine.grad_norm``
after DeepSpeed's all-reduce; stages 1-3 clip inside DeepSpeed's ZeRO optimizer, whose norm is
checked against ours by the tests.

Checkpoints (see ``save_checkpoint``): one folder, committed atomically by ``checkpoint.io``,
holding DCP model weights (consolidated, what ``load_model`` / ``export-hf`` read) and DeepSpeed's
own ``save_checkpoint`` output under ``deepspeed/`` (its partitioned fp32 master weights and
optimizer state: what an exact resume reads).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import pickle
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import torch
import torch.distributed as dist

from evoformer.checkpoint import (
    WEIGHTS_ONLY,
    PendingSave,
    begin_save,
    load_checkpoint,
    read_trainer_state,
)
from evoformer.checkpoint.io import restore_rng_state
from evoformer.config import Config
from evoformer.config.validate import DEEPSPEED_ASYNC_REFUSED
from evoformer.distributed import ParallelDims
from evoformer.distributed.dims import ParallelGroups
from evoformer.engine.fp8 import FP8Training
from evoformer.engine.grad_norm import ClipScope, clip_grad_norm_
from evoformer.engine.optim import build_optimizer, set_lr
from evoformer.engine.strategy import StepResult, Strategy
from evoformer.errors import UserError
from evoformer.model import Transformer
from evoformer.parallel.layers import sequence_parallel_params
from evoformer.parallel.sharding import is_tp_sharded

# DeepSpeed's own checkpoint sits in this sub-folder of our checkpoint folder (its "tag").
DS_TAG = "deepspeed"


class ModelParallelUnit:
    """DeepSpeed's ``mpu`` protocol over our ``ParallelGroups``: the model-parallel group is the
    tensor-parallel group, the data-parallel group is ours (DeepSpeed reduces and partitions over
    it only). ``None`` groups (a size-1 dimension in one process) become the world group of size 1.
    """

    def __init__(self, groups: ParallelGroups) -> None:
        self.groups = groups

    @staticmethod
    def _group(group: dist.ProcessGroup | None) -> dist.ProcessGroup:
        return group if group is not None else cast(dist.ProcessGroup, dist.group.WORLD)

    def get_model_parallel_rank(self) -> int:
        return self.groups.tp_rank

    def get_model_parallel_world_size(self) -> int:
        return self.groups.tp

    def get_model_parallel_group(self) -> dist.ProcessGroup:
        return self._group(self.groups.tp_group)

    # The newer (post pipeline-parallelism) names DeepSpeed prefers; same groups.
    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_group = get_model_parallel_group

    def get_data_parallel_rank(self) -> int:
        return self.groups.dp_rank

    def get_data_parallel_world_size(self) -> int:
        return self.groups.dp

    def get_data_parallel_group(self) -> dist.ProcessGroup:
        return self._group(self.groups.dp_group)


def deepspeed_config(cfg: Config, dp: int) -> dict[str, Any]:
    """The DeepSpeed config for our ``cfg`` at data-parallel size ``dp``: batch arithmetic,
    clipping, ZeRO stage, precision, offload, quiet logging; then ``zero.deepspeed_config``
    deep-merged over it (a raw key may add or change anything except
    ``config.validate.DEEPSPEED_OWNED_KEYS``, which validation refuses)."""
    z, t = cfg.zero, cfg.train
    accum = t.global_batch_size // (dp * t.micro_batch_size)
    zero: dict[str, Any] = {"stage": z.stage}
    if z.offload_optimizer != "none":
        zero["offload_optimizer"] = {"device": z.offload_optimizer, "pin_memory": False}
    if z.offload_param != "none":
        zero["offload_param"] = {"device": z.offload_param, "pin_memory": False}
    for key in ("offload_optimizer", "offload_param"):
        if zero.get(key, {}).get("device") == "nvme":
            zero[key]["nvme_path"] = z.nvme_path
    generated: dict[str, Any] = {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": accum,
        # Stage 0 clips with our engine.grad_norm (DeepSpeed's plain path reports no norm).
        "gradient_clipping": cfg.optim.grad_clip if z.stage > 0 else 0.0,
        "zero_optimization": zero,
        "bf16": {"enabled": cfg.precision == "bf16"},
        # loss_scale 0 = DeepSpeed's dynamic loss scaler (skip + back off on overflow, grow
        # after loss_scale_window clean steps).
        "fp16": {"enabled": cfg.precision == "fp16", "loss_scale": 0, **_fp16_scaler(cfg)},
        # Our AdamW is the client optimizer; offload runs it on the CPU copy as a torch
        # optimizer (DeepSpeedCPUAdam would need compiled ops).
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    # validate_deepspeed refused raw keys that set what the generated part owns.
    return _deep_merge(generated, z.deepspeed_config or {})


def _fp16_scaler(cfg: Config) -> dict[str, Any]:
    """Our ``loss_scale`` settings in DeepSpeed's words. DeepSpeed's scaler always grows by 2 and
    backs off by 1/2 (validation refuses other factors with this backend); hysteresis 1 backs
    off on the first overflow, as ours does."""
    ls = cfg.loss_scale
    return {
        "initial_scale_power": int(round(math.log2(ls.initial_scale))),
        "loss_scale_window": ls.growth_interval,
        "min_loss_scale": ls.min_scale,
        "hysteresis": 1,
    }


def _deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _import_deepspeed(device: torch.device):
    """Import DeepSpeed quietly; on a CPU run pin its accelerator to the CPU (with CUDA present
    it would otherwise pick the GPU) and keep its INFO chatter out of our progress output."""
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        import deepspeed
    except ImportError as err:
        raise UserError(
            f"zero.backend=deepspeed needs the deepspeed package ({err}); pip install deepspeed"
        ) from None
    from deepspeed.utils import logger as ds_logger

    level = os.environ.get("EVOFORMER_DEEPSPEED_LOG", "WARNING").upper()
    ds_logger.setLevel(getattr(logging, level, logging.WARNING))
    if device.type == "cpu":
        import deepspeed.ops

        # On the CPU accelerator DeepSpeed would JIT-compile a shared-memory all-reduce (and a
        # oneCCL one) at initialize: minutes of C++ on a fresh machine, and collectives that
        # bypass gloo. Marking them unbuildable keeps every collective on torch.distributed.
        for op in ("deepspeed_shm_comm", "deepspeed_ccl_comm"):
            deepspeed.ops.__compatible_ops__[op] = False
    # DeepSpeed still calls torch's older collective names; the deprecation is not ours to fix.
    warnings.filterwarnings(
        "ignore",
        message=r".*(all_gather_into_tensor|reduce_scatter_tensor).*deprecated",
        category=FutureWarning,
    )
    return deepspeed


def _deepspeed_safe_globals() -> list:
    """The non-tensor types DeepSpeed's own checkpoint files hold (ZeRO 1-3 optimizer states:
    its loss scaler, the ZeRO stage enum, the fragment addresses of flat partitions): plain data
    classes, rebuilt without running code. Nothing else is admitted."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def safe_checkpoint_load(path: str, map_location: Any = None) -> Any:
    """``torch.load`` with ``weights_only=True`` and only DeepSpeed's record types allowed: what
    the engine's checkpoint engine loads with instead of ``weights_only=False``, so a shared
    DeepSpeed checkpoint cannot run code. A file needing anything else is refused in one line."""
    try:
        with torch.serialization.safe_globals(_deepspeed_safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL (\S+)", str(err))
        what = f"it names {found.group(1)}" if found else str(err).strip().splitlines()[0][:200]
        raise UserError(
            f"DeepSpeed checkpoint file {path} holds a pickled object outside the allow-list "
            f"({what}); refusing to load it, since unpickling it could run code"
        ) from None


def _sum_partial_grads_over_tp(params: list[torch.nn.Parameter], group) -> None:
    """Sequence parallelism: replicated parameters used on sequence shards (norm weights) get a
    partial gradient on each TP rank. DeepSpeed reduces and partitions gradients inside its own
    hooks, before our ``step`` could sum them, so each micro-batch's contribution is summed over
    TP by a tensor hook, which runs before the gradient is accumulated and handed to DeepSpeed.
    (Summing per micro-batch is the same sum; it costs one small all-reduce per such parameter
    and micro-batch instead of one coalesced all-reduce per step.)"""

    def tp_sum(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad, group=group)
        return grad

    for p in params:
        p.register_hook(tp_sum)


def _prepare_zero3(model: Transformer) -> None:
    """ZeRO-3 gathers a module's own parameters around its forward. Where our modules read a
    child's weight without calling the child (the LM head's matmul in the root's forward, the
    MoE router, row-sliced KV projections and sharded QK-norms in attention, MLA's absorbed
    kv_b_proj), tell DeepSpeed: the head/embedding weights are external parameters of the root,
    and those block kinds are ZeRO-3 leaves (their whole subtree is gathered on entry)."""
    from deepspeed.runtime.zero.partition_parameters import register_external_parameter
    from deepspeed.utils import set_z3_leaf_modules

    from evoformer.model.attention import Attention
    from evoformer.model.mla import MultiHeadLatentAttention
    from evoformer.model.moe import MoE

    for owner in (model.embed, getattr(model, "head", None)):
        if owner is not None:
            register_external_parameter(model, owner.weight)
    set_z3_leaf_modules(model, [Attention, MultiHeadLatentAttention, MoE], raise_if_not_found=False)


class DeepSpeedStrategy(Strategy):
    """ZeRO stages 0-3 through DeepSpeed's engine (used at any dp, e.g. dp = 1 for offload)."""

    name = "deepspeed"

    def __init__(
        self, cfg: Config, dims: ParallelDims, groups: ParallelGroups, device: torch.device
    ) -> None:
        super().__init__(cfg, dims, groups, device)
        # DeepSpeedEngine, set by setup(). Typed Any: its attributes (optimizer, its flat
        # buffers, skipped_steps) are dynamic and stage-dependent, which its own annotations
        # do not express.
        self.engine: Any = None
        self._skipped = 0

    # -- building ------------------------------------------------------------------------------

    def setup(
        self,
        model: Transformer,
        parts: list[torch.nn.Module] | None = None,
        fp8: FP8Training | None = None,
    ) -> None:
        if parts:  # validation refuses deepspeed with pp > 1
            raise ValueError("zero.backend=deepspeed does not run pipeline stages")
        if fp8 is not None:  # validation refuses fp8 with deepspeed
            raise ValueError("zero.backend=deepspeed does not train FP8 modules")
        if self.cfg.precision == "fp16" and self.device.type == "cpu":
            raise UserError(
                "precision=fp16 with zero.backend=deepspeed needs a GPU (DeepSpeed's CPU "
                "accelerator has no fp16); use precision=bf16 or fp32 on CPU"
            )
        deepspeed = _import_deepspeed(self.device)
        # DeepSpeed insists on a launcher's LOCAL_RANK; a plain single-process run has none.
        os.environ.setdefault("LOCAL_RANK", str(self.dims.local_rank))
        if not dist.is_initialized():
            # One process: DeepSpeed still talks through torch.distributed; an in-memory store
            # gives it a world of one without opening a port.
            dist.init_process_group(
                "gloo" if self.device.type == "cpu" else "nccl",
                store=dist.HashStore(),
                rank=0,
                world_size=1,
            )
        self.model = model
        self.partial_grad_params = sequence_parallel_params(model)
        for p in model.parameters():
            # DeepSpeed's ZeRO norm sums these over the model-parallel group and counts the
            # others on tp rank 0 only: exactly engine.grad_norm's rule.
            if is_tp_sharded(p):
                # DeepSpeed reads this name (its own protocol, not in torch's stubs).
                p.tensor_model_parallel = True  # pyright: ignore[reportAttributeAccessIssue]
        if self.dims.tp > 1:
            _sum_partial_grads_over_tp(self.partial_grad_params, self.groups.tp_group)
        if self.cfg.zero.stage == 3:
            _prepare_zero3(model)
        optimizer = build_optimizer(model, self.cfg.optim)
        self.engine, _, _, _ = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            config=deepspeed_config(self.cfg, self.dims.dp),
            mpu=ModelParallelUnit(self.groups),
            dist_init_required=False,
        )
        # DeepSpeed's checkpoint engines load with torch.load(weights_only=False): a shared
        # checkpoint could run code. Every file it reads goes through the safe load instead
        # (whatever engine its config chose: only the instance's load is replaced).
        if self.engine.checkpoint_engine is not None:  # None only without an optimizer
            self.engine.checkpoint_engine.load = safe_checkpoint_load
        # The client optimizer: ZeRO replaced its parameters by this rank's flat fp32 partitions,
        # so its groups carry our lr and its state is this rank's (sharded) AdamW state.
        self.optimizer = optimizer
        self.module = self.engine

    def describe(self) -> str:
        z = self.cfg.zero
        offload = [
            f"{k} {v}"
            for k, v in (("optimizer", z.offload_optimizer), ("params", z.offload_param))
            if v != "none"
        ]
        return f"deepspeed stage {z.stage}" + (f", offload {', '.join(offload)}" if offload else "")

    # -- one step ------------------------------------------------------------------------------

    def micro_batch(self, last: bool) -> contextlib.AbstractContextManager:
        # The trainer calls step() once per optimizer step, after all micro-batches: say where
        # the boundary is instead of letting DeepSpeed count micro-steps.
        self.engine.set_gradient_accumulation_boundary(last)
        return contextlib.nullcontext()

    def autocast(self) -> contextlib.AbstractContextManager:
        # DeepSpeed casts the model itself for bf16/fp16 (fp32 master weights in its optimizer).
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        # The trainer already divided by the micro-batch count: no second division.
        self.engine.backward(loss, scale_wrt_gas=False)

    def step(self, lr: float, max_norm: float, skip: bool = False) -> StepResult:
        """As ``Strategy.step``. ZeRO 1-3 skip a step whose gradient norm is not finite inside
        DeepSpeed (its overflow check, on in every precision), which we read back from its
        skipped-step count; stage 0 is checked here. ``skip`` (a non-finite loss: its gradients
        are non-finite too, so DeepSpeed skips it) is honoured by stage 0 directly."""
        set_lr(self.optimizer, lr)
        stage = self.cfg.zero.stage
        if stage == 0:
            # DeepSpeed all-reduced the gradients on the boundary backward; clip as one process.
            norm_t = clip_grad_norm_(
                self.model.parameters(),
                max_norm if max_norm > 0 else float("inf"),
                ClipScope(self.groups.tp_group),
            )
            norm = norm_t.item()
            if skip or (self.cfg.precision != "fp16" and not math.isfinite(norm)):
                self.engine.zero_grad()
                return StepResult(grad_norm=norm, skipped=True, nonfinite=True)
        elif max_norm != self.cfg.optim.grad_clip:
            raise ValueError(
                f"deepspeed clips at optim.grad_clip={self.cfg.optim.grad_clip} (fixed at setup), "
                f"step() was asked for {max_norm}"
            )
        self.engine.step()
        metrics: dict[str, float] = {}
        skipped = self.engine.skipped_steps > self._skipped
        self._skipped = self.engine.skipped_steps
        if self.cfg.precision == "fp16":
            metrics["loss_scale"] = float(self.engine.optimizer.cur_scale)
            metrics["skipped_steps"] = float(self._skipped)
        if stage > 0:
            ds_norm = self.engine.get_global_grad_norm()
            norm = float(ds_norm) if ds_norm is not None else float("nan")
        # fp16 overflows are the loss scaler's; in bf16/fp32 a skip means non-finite gradients
        nonfinite = skipped and (self.cfg.precision != "fp16" or skip)
        return StepResult(grad_norm=norm, skipped=skipped, metrics=metrics, nonfinite=nonfinite)

    # -- checkpoints ---------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"backend": "deepspeed", "stage": self.cfg.zero.stage, "dp": self.dims.dp}

    def begin_save(
        self,
        ckpt_root: Path,
        step: int,
        trainer_state: dict[str, Any],
        background: bool = False,
        **kwargs: Any,
    ) -> PendingSave:
        """One atomic checkpoint folder: DCP model weights (full, consolidated from the ZeRO-3
        partitions; what ``load_model`` and ``export-hf`` read, TP shards as global tensors)
        plus DeepSpeed's own checkpoint of its partitioned master weights and optimizer state
        in ``deepspeed/``, written into the same temporary folder before the rename. Always
        written in the foreground: DeepSpeed's own files have no background path (validation
        refuses ``checkpoint.async_save`` with this backend)."""
        if background:
            raise UserError(DEEPSPEED_ASYNC_REFUSED)
        trainer_state = {**trainer_state, "strategy": self.state_dict()}
        weights = self._consolidated_weights()

        def write_engine_state(tmp: Path) -> None:
            self.engine.save_checkpoint(str(tmp), tag=DS_TAG, save_latest=False)

        return begin_save(
            ckpt_root,
            step,
            self.model,
            None,
            trainer_state=trainer_state,
            tp_mesh=self.tp_mesh,
            model_state_dict=weights,
            write_extra=write_engine_state,
            **kwargs,
        )

    def _consolidated_weights(self) -> dict[str, torch.Tensor]:
        if self.cfg.zero.stage < 3:
            return self.model.state_dict()  # every dp rank holds the whole (TP-local) model
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(self.model.parameters())):
            return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def load_checkpoint(self, ckpt: Path, weights_only: bool = False) -> dict[str, Any]:
        """Restore DeepSpeed's engine (weights, master weights, optimizer state) from the
        checkpoint's ``deepspeed/`` folder, saved on the same dp layout, and the RNG states; a
        checkpoint of weights only (import-hf) loads its weights into the engine instead."""
        saved = read_trainer_state(ckpt)
        if weights_only or saved.get(WEIGHTS_ONLY):
            self._load_weights(ckpt)
            return saved
        if not (ckpt / DS_TAG).is_dir():
            raise UserError(
                f"checkpoint {ckpt} was not saved with zero.backend=deepspeed (no {DS_TAG}/ "
                "folder); resume it with the backend that saved it"
            )
        layout = saved.get("strategy", {})
        if layout.get("dp", self.dims.dp) != self.dims.dp:
            raise UserError(
                f"checkpoint {ckpt}: DeepSpeed state saved at dp={layout['dp']} cannot resume at "
                f"dp={self.dims.dp} (DeepSpeed checkpoints are per dp partition)"
            )
        path, _ = self.engine.load_checkpoint(
            str(ckpt),
            tag=DS_TAG,
            load_optimizer_states=True,
            load_lr_scheduler_states=False,
        )
        if path is None:
            raise UserError(f"checkpoint {ckpt}: DeepSpeed could not load {ckpt / DS_TAG}")
        restore_rng_state(ckpt, self.dims.rank - self.dims.tp_rank)
        return read_trainer_state(ckpt)

    def _load_weights(self, ckpt: Path) -> None:
        """DCP weights into the engine's model (gathered under ZeRO-3, every rank reading the
        whole tensors, then re-partitioned from rank 0), then into ZeRO's fp32 master copies,
        which the next step would otherwise write back over them."""
        gathered: contextlib.AbstractContextManager = contextlib.nullcontext()
        if self.cfg.zero.stage == 3:
            import deepspeed

            gathered = deepspeed.zero.GatheredParameters(
                list(self.model.parameters()), modifier_rank=0
            )
        with gathered:
            load_checkpoint(ckpt, self.model, None, restore_rng=False, tp_mesh=self.tp_mesh)
        refresh = getattr(self.engine.optimizer, "refresh_fp32_params", None)
        if refresh is not None:
            refresh()

    # -- memory --------------------------------------------------------------------------------

    def local_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """What this rank holds: ``param`` (the model's weights as this rank stores them: the
        whole TP-local model at stages 0-2, its ZeRO-3 partition at stage 3), ``master``
        (DeepSpeed's fp32 master partition, a separate copy at stages 1-3 even in fp32
        training), ``optim`` (AdamW moments of this rank's partition) and, between the last
        backward and the step, ``grad`` (full ``.grad`` at stages 0-1, this rank's reduced
        partition at stages 2-3). Views of one buffer share storage; callers count it once."""
        stage = self.cfg.zero.stage
        zero_opt = self.engine.optimizer
        for p in self.model.parameters():
            # ZeRO-3: the partition DeepSpeed hangs on each parameter.
            yield "param", (p.ds_tensor if stage == 3 else p)  # pyright: ignore[reportAttributeAccessIssue]
            if p.grad is not None and p.grad.numel():
                yield "grad", p.grad
        if stage in (1, 2):
            yield from (("master", t) for t in zero_opt.single_partition_of_fp32_groups)
            for grads in zero_opt.averaged_gradients.values():
                for g in [grads] if torch.is_tensor(grads) else grads or []:
                    yield "grad", g
        elif stage == 3:
            yield from (("master", t) for t in zero_opt.fp32_partitioned_groups_flat)
            if zero_opt.grad_partitions_flat_buffer is not None:
                yield "grad", zero_opt.grad_partitions_flat_buffer
        for state in self.optimizer.state.values():
            for v in state.values():
                if torch.is_tensor(v) and v.dim() > 0:
                    yield "optim", v
