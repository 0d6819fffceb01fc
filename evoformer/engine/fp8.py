"""FP8 training of the linear layers: torchao's ``Float8Linear`` or Transformer Engine's recipes.

``fp8.backend: torchao`` swaps the model's ``nn.Linear`` modules for ``torchao.float8``'s
``Float8Linear`` (``convert_to_float8_training``): each matmul casts its input, weight and output
gradient to FP8 (e4m3 forward, e5m2 gradients for ``tensorwise``; e4m3 with one scale per row for
``rowwise``) with scales computed on the fly, and keeps the master weights in their own dtype.
It runs on CPU too, so CI checks FP8 numerics. Our layers are plain ``nn.Linear`` at tp = 1 (the
parallel context only builds Column/RowParallelLinear at tp > 1), which is what torchao swaps;
tp > 1 is refused by validation (torchao's FP8 tensor parallelism expects DTensor-sharded
linears, and ours are not). With ``zero.backend: fsdp2`` the swap happens before sharding, and
``fp8.fsdp_float8_all_gather`` (tensorwise) makes FSDP2 all-gather the weights already cast to
FP8, their scales precomputed once per step after the optimizer (``after_optimizer_step``).

``fp8.backend: te`` (with ``model.backend: te``): our TE linear layers compute in FP8 inside
``fp8_autocast`` with the recipe ``fp8.recipe`` maps to (``TE_RECIPES``). TE needs CUDA; on a
machine without it the TE backend fails with one line before anything is built.

What stays in higher precision (the compute dtype of ``precision``), and why:

- embeddings and the LM head (the head's logits feed a softmax over the whole vocabulary, where
  FP8's 3-bit mantissa costs the most; both are table lookups / a weight used through
  ``F.linear``, not ``nn.Linear`` calls),
- MoE routers (expert choice is a discrete decision on small score differences) and the MTP
  modules (they sit next to the output like the last block),
- with ``fp8.keep_first_last`` (default true) the first and the last transformer block, where
  activations are least normalised and FP8 error does the most damage (as in DeepSeek-V3's and
  Nemotron's FP8 recipes),
- torchao only: linears whose in/out features are not multiples of 16 (FP8 GEMM kernels need
  it); the filter skips them (``FP8Training.converted`` lists what runs in FP8).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable
from typing import TYPE_CHECKING

from torch import nn

from evoformer.config.schema import FP8Config
from evoformer.errors import UserError

if TYPE_CHECKING:
    from evoformer.model import Transformer

# fp8.recipe -> the Transformer Engine recipe class (transformer_engine.common.recipe).
TE_RECIPES = {
    "delayed": "DelayedScaling",  # scale from an amax history of past steps
    "tensorwise": "Float8CurrentScaling",  # scale from this step's amax, one per tensor
    "mxfp8": "MXFP8BlockScaling",  # 1x32 blocks with e8m0 scales (Blackwell)
    "blockwise": "Float8BlockScaling",  # 1x128 / 128x128 blocks (DeepSeek-V3 style; Hopper)
}

# Modules never cast to FP8 (see the module docstring), by qualified name.
ALWAYS_HIGH_PRECISION = re.compile(r"(^|\.)(router|head|embed|pos_embed)$|(^|\.)mtp(\.|$)")


def kept_blocks(n_layers: int, keep_first_last: bool) -> set[int]:
    """Indices of the transformer blocks kept in higher precision."""
    return {0, n_layers - 1} if keep_first_last else set()


def keeps_high_precision(fqn: str, n_layers: int, keep_first_last: bool) -> bool:
    """Whether the module named ``fqn`` (``layers.3.mlp.up_proj``) stays out of FP8 by policy."""
    if ALWAYS_HIGH_PRECISION.search(fqn):
        return True
    m = re.match(r"layers\.(\d+)(\.|$)", fqn)
    return m is not None and int(m.group(1)) in kept_blocks(n_layers, keep_first_last)


def torchao_filter(n_layers: int, keep_first_last: bool) -> Callable[[nn.Module, str], bool]:
    """``module_filter_fn`` for ``convert_to_float8_training``: True = swap to FP8."""

    def swap(module: nn.Module, fqn: str) -> bool:
        if not isinstance(module, nn.Linear):
            return True  # torchao asks about containers too; their children are asked again
        if keeps_high_precision(fqn, n_layers, keep_first_last):
            return False
        return module.in_features % 16 == 0 and module.out_features % 16 == 0

    return swap


class FP8Training:
    """What the strategy needs from FP8 once the model is prepared: a forward context and a
    hook after each optimizer step. ``converted`` names the modules that compute in FP8."""

    def __init__(
        self,
        model: nn.Module,
        cfg: FP8Config,
        converted: list[str],
        te=None,
        recipe=None,
        fsdp_all_gather: bool = False,
    ) -> None:
        self.model = model
        self.cfg = cfg
        self.converted = converted
        self._te = te
        self._recipe = recipe
        self._fsdp_all_gather = fsdp_all_gather

    def autocast(self) -> contextlib.AbstractContextManager:
        """TE: ``fp8_autocast`` with the recipe (torchao's modules cast by themselves)."""
        if self._te is None:
            return contextlib.nullcontext()
        return _te_autocast(self._te)(enabled=True, fp8_recipe=self._recipe)

    def after_optimizer_step(self) -> None:
        """torchao + FSDP2 FP8 all-gather: compute every weight's FP8 scale in one batch."""
        if self._fsdp_all_gather:
            from torchao.float8 import precompute_float8_dynamic_scale_for_fsdp

            precompute_float8_dynamic_scale_for_fsdp(self.model)

    def describe(self) -> str:
        return f"fp8 {self.cfg.backend} {self.cfg.recipe}: {len(self.converted)} linears in FP8"


def setup_fp8(model: Transformer, cfg: FP8Config, fsdp: bool) -> FP8Training:
    """Prepare ``model`` (before any FSDP wrapping and before the optimizer) for FP8 training
    with ``cfg``; ``fsdp``: the model will be sharded by FSDP2."""
    n_layers = len(model.layers)
    if cfg.backend == "torchao":
        return _setup_torchao(model, cfg, fsdp, n_layers)
    return _setup_te(model, cfg, n_layers)


def _setup_torchao(model: Transformer, cfg: FP8Config, fsdp: bool, n_layers: int) -> FP8Training:
    try:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    except ImportError as e:
        raise UserError(f"fp8.backend=torchao needs torchao (pip install torchao): {e}") from e
    config = Float8LinearConfig.from_recipe_name(cfg.recipe)
    all_gather = fsdp and cfg.fsdp_float8_all_gather
    if all_gather:
        config = Float8LinearConfig(enable_fsdp_float8_all_gather=True)
    swap = torchao_filter(n_layers, cfg.keep_first_last)
    candidates = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and swap(m, n)]
    if not candidates:
        raise UserError(
            f"fp8.enabled: no linear layer can run in FP8 (model.n_layers={n_layers} with "
            f"fp8.keep_first_last={cfg.keep_first_last} keeps every block in higher precision, "
            "or no in/out features are multiples of 16)"
        )
    convert_to_float8_training(model, config=config, module_filter_fn=swap)
    return FP8Training(model, cfg, candidates, fsdp_all_gather=all_gather)


def te_recipe(name: str, recipe_module):
    """The Transformer Engine recipe object for ``fp8.recipe`` ``name``."""
    if name not in TE_RECIPES:
        raise UserError(
            f"config: fp8.recipe={name!r}: fp8.backend=te offers {', '.join(TE_RECIPES)}"
        )
    cls = getattr(recipe_module, TE_RECIPES[name], None)
    if cls is None:
        raise UserError(
            f"config: fp8.recipe={name!r}: this Transformer Engine has no {TE_RECIPES[name]}; "
            "upgrade transformer-engine"
        )
    return cls()


def _te_autocast(te):
    # TE 2.x: fp8_autocast; newer releases also call it autocast(recipe=...).
    return getattr(te, "fp8_autocast", None) or (
        lambda enabled, fp8_recipe: te.autocast(enabled=enabled, recipe=fp8_recipe)
    )


def _setup_te(model: Transformer, cfg: FP8Config, n_layers: int) -> FP8Training:
    import importlib

    from evoformer.parallel.te_backend import import_te

    te = import_te()
    recipe = te_recipe(cfg.recipe, importlib.import_module("transformer_engine.common.recipe"))
    kept = kept_blocks(n_layers, cfg.keep_first_last)
    for i in kept:
        _disable_fp8_in(model.layers[i], te)
    if model.mtp is not None:
        _disable_fp8_in(model.mtp, te)
    converted = [
        n
        for n, m in model.named_modules()
        if isinstance(m, te.Linear) and not keeps_high_precision(n, n_layers, cfg.keep_first_last)
    ]
    return FP8Training(model, cfg, converted, te=te, recipe=recipe)


def _disable_fp8_in(module: nn.Module, te) -> None:
    """Run ``module``'s forward (and its recomputation under activation checkpointing) inside
    ``fp8_autocast(enabled=False)``: TE's own way of keeping a region in higher precision."""
    stack: list[contextlib.AbstractContextManager] = []

    def enter(mod, args):
        ctx = _te_autocast(te)(enabled=False, fp8_recipe=None)
        ctx.__enter__()
        stack.append(ctx)

    def leave(mod, args, out):
        stack.pop().__exit__(None, None, None)

    module.register_forward_pre_hook(enter)
    module.register_forward_hook(leave)
