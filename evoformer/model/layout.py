"""The per-layer plan: what each block of a ModelConfig is, decided in one place.

A config describes layer patterns compactly (a sliding window with every N-th layer global, the
first k layers dense, every N-th MoE); everything that builds, counts, converts or splits layers
reads the resolved answer from here instead of re-deriving it. A new per-layer choice (a layer
without RoPE, a linear-attention layer) is a new field of ``LayerSpec`` and its rule in
``layer_spec``; the block that acts on it reads the field.

Multi-token-prediction blocks continue the pattern: depth k's block is layer ``n_layers + k - 1``
(a DeepSeek-V3 MTP block is an MoE layer, as in the checkpoints).

Each sub-layer receives its own resolved sub-config (``AttentionSpec``, ``LatentAttentionSpec``,
``MoESpec``) rather than the whole ``ModelConfig``: the defaults (``qkv_bias`` null = ``bias``,
``head_dim`` null = ``d_model / n_heads``, the YaRN softmax gain, the aux-loss share of one MoE
layer) are applied here, once.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from evoformer.config.schema import MLPConfig, ModelConfig
from evoformer.model.positions import yarn_mscale


@dataclass(frozen=True)
class LayerSpec:
    """One block's resolved choices."""

    index: int
    window: int | None
    """Sliding window of this layer's attention (None: it attends to the whole prefix)."""
    rope: str
    """Which RoPE table the layer rotates q/k with: global | local (Gemma 3's local base) |
    none (no rotary positions in the model, or a NoPE layer: ``position.nope_layers``)."""
    mlp: str
    """Feed-forward kind: dense | moe | none (a mixer-only block, Nemotron-H's M and *)."""
    mixer: str = "attention"
    """Token mixer: attention (``model.attention``, MHA or MLA) | deltanet (Gated DeltaNet) |
    mamba2 | none (an MLP-only block); from ``model.mixer_pattern``."""

    @property
    def is_local(self) -> bool:
        return self.window is not None


@dataclass(frozen=True)
class AttentionSpec:
    """What one multi-head (MHA/GQA/MQA) attention layer needs, resolved."""

    d_model: int
    n_heads: int
    kv_heads: int
    head_dim: int
    bias: bool
    """Bias on the output projection."""
    qkv_bias: bool
    qk_norm: str
    """none | head | full (see ``AttentionConfig.qk_norm``)."""
    norm_eps: float
    norm_unit_offset: bool
    """The QK-norm's RMSNorm follows ``model.norm`` (Gemma's unit offset)."""
    scale: float | None
    dropout: float
    window: int | None
    alibi: bool
    sinks: bool = False
    """A learned per-head logit in the softmax denominator (gpt-oss)."""
    sdpa_kernel: str = "auto"
    """``attention.sdpa_kernel``: the SDPA kernel preference (``model.sdpa``)."""
    output_gate: bool = False
    """Qwen3-Next: q_proj also projects a sigmoid gate per head on the attention output."""


@dataclass(frozen=True)
class LatentAttentionSpec:
    """What one multi-head latent attention (MLA) layer needs, resolved."""

    d_model: int
    n_heads: int
    q_lora_rank: int
    kv_lora_rank: int
    nope_dim: int
    rope_dim: int
    v_dim: int
    bias: bool
    scale: float
    """The softmax scale: ``attention.scale``, else ``1/sqrt(qk dim)`` times DeepSeek's YaRN
    gain ``mscale(factor, mscale_all_dim)^2``."""
    dropout: float


@dataclass(frozen=True)
class MoESpec:
    """What one MoE layer needs, resolved (see ``MoEConfig`` for the routing fields)."""

    d_model: int
    num_experts: int
    top_k: int
    score: str
    norm_topk_prob: bool
    routed_scaling: float
    n_groups: int
    topk_groups: int
    group_score: str
    """top2 | max: how a group scores in group-limited routing."""
    aux_loss_coef: float
    """This layer's share: ``moe.aux_loss_coef`` over the number of MoE layers (MTP included)."""
    bias_update_rate: float
    capacity_factor: float
    expert_width: int
    expert_mlp: MLPConfig
    """One routed expert's MLP kind, width and activation (experts carry no biases)."""
    shared_mlp: MLPConfig | None
    """The always-on shared experts as one MLP (None: no shared experts)."""
    router_bias: bool = False
    expert_bias: bool = False
    """Biases on the routed experts' gate/up/down projections (gpt-oss)."""
    shared_gate: bool = False
    """Scale the shared experts' output by a per-token sigmoid gate (Qwen3-Next)."""


def attention_spec(cfg: ModelConfig, layer: LayerSpec) -> AttentionSpec | LatentAttentionSpec:
    """The attention sub-config of block ``layer`` (MLA models: a ``LatentAttentionSpec``)."""
    a = cfg.attention
    if a.kind == "mla":
        if a.qk_norm != "none" or layer.window is not None or cfg.position.kind == "alibi":
            raise ValueError(
                "MLA supports none of attention.qk_norm, attention.sliding_window, ALiBi"
            )
        if cfg.position.kind == "rope" and a.qk_rope_head_dim % 2:
            raise ValueError(f"attention.qk_rope_head_dim={a.qk_rope_head_dim} must be even")
        s = cfg.position.rope_scaling
        gain = 1.0
        if cfg.position.kind == "rope" and s.kind != "none" and s.mscale_all_dim:
            gain = yarn_mscale(s.factor, s.mscale_all_dim) ** 2
        qk_dim = a.qk_nope_head_dim + a.qk_rope_head_dim
        return LatentAttentionSpec(
            d_model=cfg.d_model,
            n_heads=a.n_heads,
            q_lora_rank=a.q_lora_rank,
            kv_lora_rank=a.kv_lora_rank,
            nope_dim=a.qk_nope_head_dim,
            rope_dim=a.qk_rope_head_dim,
            v_dim=a.v_head_dim,
            bias=a.bias,
            scale=a.scale if a.scale is not None else qk_dim**-0.5 * gain,
            dropout=a.dropout,
        )
    return AttentionSpec(
        d_model=cfg.d_model,
        n_heads=a.n_heads,
        kv_heads=cfg.kv_heads,
        head_dim=cfg.head_dim,
        bias=a.bias,
        qkv_bias=a.has_qkv_bias,
        qk_norm=a.qk_norm,
        norm_eps=cfg.norm.eps,
        norm_unit_offset=cfg.norm.unit_offset,
        scale=a.scale,
        dropout=a.dropout,
        window=layer.window,
        alibi=cfg.position.kind == "alibi",
        sinks=a.sinks,
        sdpa_kernel=a.sdpa_kernel,
        output_gate=a.output_gate,
    )


def moe_spec(cfg: ModelConfig) -> MoESpec:
    """The sub-config every MoE layer of ``cfg`` shares."""
    m, mlp = cfg.moe, cfg.mlp
    n_moe = len(moe_layers(cfg, with_mtp=True))
    shared = None
    # The experts' own MLPs: model.mlp's kind and activation at their width, without biases.
    if cfg.shared_width:
        shared = dataclasses.replace(mlp, hidden=cfg.shared_width, bias=False)
    return MoESpec(
        d_model=cfg.d_model,
        num_experts=m.num_experts,
        top_k=m.top_k,
        score=m.score,
        norm_topk_prob=m.norm_topk_prob,
        routed_scaling=m.routed_scaling,
        n_groups=m.n_groups,
        topk_groups=m.topk_groups,
        group_score=m.group_score,
        aux_loss_coef=m.aux_loss_coef / max(n_moe, 1),
        bias_update_rate=m.bias_update_rate,
        capacity_factor=m.capacity_factor,
        expert_width=cfg.expert_width,
        expert_mlp=dataclasses.replace(mlp, hidden=cfg.expert_width, bias=False),
        shared_mlp=shared,
        router_bias=m.router_bias,
        expert_bias=m.expert_bias,
        shared_gate=m.shared_gate,
    )


MIXERS = {"A": "attention", "G": "deltanet", "M": "mamba2", "-": "none"}
MLPS = {"D": "dense", "E": "moe", "-": "none"}


def compact_pattern(pattern: str, fill: str) -> str:
    """The shortest string that repeats to ``pattern`` (``""`` when every letter is ``fill``,
    the default): how converters write a per-layer list as ``mixer_pattern`` / ``mlp_pattern``
    and how two spellings of one plan compare equal."""
    if set(pattern) <= {fill}:
        return ""
    n = len(pattern)
    for p in range(1, n + 1):
        if n % p == 0 and pattern[:p] * (n // p) == pattern:
            return pattern[:p]
    return pattern


def _letter(pattern: str, index: int) -> str | None:
    """Block ``index``'s letter of a pattern repeated to the model's depth (None: no pattern).
    MTP blocks (past n_layers) follow the repetition too."""
    return pattern[index % len(pattern)] if pattern else None


def layer_spec(cfg: ModelConfig, index: int) -> LayerSpec:
    """The resolved choices of block ``index`` (``n_layers + k - 1`` for MTP depth k)."""
    a, moe = cfg.attention, cfg.moe
    local = a.sliding_window is not None and (
        a.global_every <= 0 or (index + 1) % a.global_every != 0
    )
    if cfg.position.kind != "rope" or index in cfg.position.nope_layers:
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
    mlp = "moe" if is_moe else "dense"
    if (letter := _letter(cfg.mlp_pattern, index)) is not None:
        mlp = MLPS[letter]
    mixer = MIXERS[_letter(cfg.mixer_pattern, index) or "A"]
    return LayerSpec(
        index=index,
        window=a.sliding_window if local else None,
        rope=rope,
        mlp=mlp,
        mixer=mixer,
    )


def layer_plan(cfg: ModelConfig, with_mtp: bool = False) -> tuple[LayerSpec, ...]:
    """Every block's spec, in order (``with_mtp``: followed by the MTP blocks')."""
    n = cfg.n_layers + (cfg.mtp.depth if with_mtp else 0)
    return tuple(layer_spec(cfg, i) for i in range(n))


def moe_layers(cfg: ModelConfig, with_mtp: bool = False) -> list[int]:
    """Indices of the MoE blocks (``with_mtp``: MTP blocks included)."""
    return [s.index for s in layer_plan(cfg, with_mtp) if s.mlp == "moe"]
