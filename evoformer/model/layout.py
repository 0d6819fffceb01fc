"""The per-layer plan: what each block of a ModelConfig is, decided in one place.

A config describes layer patterns compactly (a sliding window with every N-th layer global, the
first k layers dense, every N-th MoE); everything that builds, counts, converts or splits layers
reads the resolved answer from here instead of re-deriving it. A new per-layer choice (a layer
without RoPE, a linear-attention layer) is a new field of ``LayerSpec`` and its rule in
``layer_spec``; the block that acts on it reads the field.

Multi-token-prediction blocks continue the pattern: depth k's block is layer ``n_layers + k - 1``
(a DeepSeek-V3 MTP block is an MoE layer, as in the checkpoints).
"""

from __future__ import annotations

from dataclasses import dataclass

from evoformer.config.schema import ModelConfig


@dataclass(frozen=True)
class LayerSpec:
    """One block's resolved choices."""

    index: int
    window: int | None
    """Sliding window of this layer's attention (None: it attends to the whole prefix)."""
    rope: str
    """Which RoPE table the layer rotates q/k with: global | local (Gemma 3's local base) |
    none (no rotary positions in the model)."""
    mlp: str
    """Feed-forward kind: dense | moe."""

    @property
    def is_local(self) -> bool:
        return self.window is not None


def layer_spec(cfg: ModelConfig, index: int) -> LayerSpec:
    """The resolved choices of block ``index`` (``n_layers + k - 1`` for MTP depth k)."""
    a, moe = cfg.attention, cfg.moe
    local = a.sliding_window is not None and (
        a.global_every <= 0 or (index + 1) % a.global_every != 0
    )
    if cfg.position.kind != "rope":
        rope = "none"
    elif local and cfg.position.local_rope_theta is not None:
        rope = "local"
    else:
        rope = "global"
    is_moe = (
        moe.num_experts > 0
        and index >= moe.first_k_dense
        and (index - moe.first_k_dense) % moe.layer_freq == 0
    )
    return LayerSpec(
        index=index,
        window=a.sliding_window if local else None,
        rope=rope,
        mlp="moe" if is_moe else "dense",
    )


def layer_plan(cfg: ModelConfig, with_mtp: bool = False) -> tuple[LayerSpec, ...]:
    """Every block's spec, in order (``with_mtp``: followed by the MTP blocks')."""
    n = cfg.n_layers + (cfg.mtp.depth if with_mtp else 0)
    return tuple(layer_spec(cfg, i) for i in range(n))


def moe_layers(cfg: ModelConfig, with_mtp: bool = False) -> list[int]:
    """Indices of the MoE blocks (``with_mtp``: MTP blocks included)."""
    return [s.index for s in layer_plan(cfg, with_mtp) if s.mlp == "moe"]
