"""Analytic accounting of a ModelConfig: parameters, FLOPs per token and KV-cache bytes.

Nothing is built or allocated: every number is a closed formula over the config, mirroring the
modules that :class:`~evoformer.model.transformer.Transformer` would build (tests check the
parameter count against a meta-device build of every preset). Conventions:

- **Parameters.** ``total`` is the main model; multi-token-prediction modules are reported
  separately as ``mtp`` (DeepSeek-V3 reports "671B + 14B MTP"; our MTP shares the embedding and
  the head with the main model, so ``mtp`` holds only its own weights). ``active`` is what one
  token uses: routed experts count top_k of num_experts, shared experts and the router count in
  full (the Mixtral / Qwen convention; DeepSeek quotes ``active - embedding``).
  ``non_embedding`` leaves out every vocabulary-sized matrix (input table, learned positions,
  untied head), as Kaplan et al. and the Qwen model cards do.
- **FLOPs** (model FLOPs, not hardware FLOPs). Forward = 2 x active matmul weights (the LM head
  included, the embedding lookup not) + attention scores and values: per query, QK^T and AV cost
  2 * n_heads * (qk_dim + v_dim) per key attended to; a causal sequence of T tokens attends to
  (T + 1) / 2 keys on average, a sliding-window layer to min(t, window) for the query at
  position t. Training = 3 x forward (backward is twice the forward), MTP modules included.
  Norms, activations, softmax and the optimizer are not counted.
- **KV cache.** Per token and layer: MHA/GQA/MQA keep K and V, 2 * n_kv_heads * head_dim
  values; MLA keeps the compressed latent and the shared RoPE key, kv_lora_rank +
  qk_rope_head_dim values (the absorbed-weights decoding form). A sliding-window layer costs the
  same per token but never holds more than ``window`` tokens.
- **Hybrid layers** (``model.mixer_pattern``). A Gated DeltaNet or Mamba-2 layer caches no
  keys: its decoding state -- the convolution windows (``kernel - 1`` inputs per channel, in
  the cache dtype) and the fp32 recurrent state (H x Dk x Dv for DeltaNet, H x P x N for
  Mamba-2) -- is the same at any length (``state`` bytes). Its token-mixing FLOPs are the
  recurrence's, per token 6 H Dk Dv (DeltaNet: read, correct, output) and 4 H P N (Mamba-2),
  counted with attention's under ``attention``.
"""

from __future__ import annotations

from dataclasses import dataclass

from evoformer.config.schema import ModelConfig, NormConfig
from evoformer.model.layout import LayerSpec, layer_spec


@dataclass(frozen=True)
class Count:
    """Parameters of one module: all of them, those one token uses, and the matmul weights
    among the used ones (what the FLOP count multiplies)."""

    total: int = 0
    active: int = 0
    matmul: int = 0

    def __add__(self, other: Count) -> Count:
        return Count(
            self.total + other.total, self.active + other.active, self.matmul + other.matmul
        )

    def __mul__(self, k: int) -> Count:
        return Count(self.total * k, self.active * k, self.matmul * k)


def _linear(d_in: int, d_out: int, bias: bool = False) -> Count:
    n = d_in * d_out + (d_out if bias else 0)
    return Count(n, n, d_in * d_out)


def _norm(cfg: NormConfig, dim: int) -> Count:
    n = 2 * dim if cfg.kind == "layernorm" and cfg.bias else dim
    return Count(n, n, 0)


def _rmsnorm(dim: int) -> Count:
    # QK-norms and MLA's latent norms are RMSNorm whatever model.norm.kind says.
    return Count(dim, dim, 0)


# -- modules ---------------------------------------------------------------------------------


def attention_dims(cfg: ModelConfig) -> tuple[int, int]:
    """(qk_dim, v_dim) per head: what one query-key dot product and one value row cost."""
    a = cfg.attention
    if a.kind == "mla":
        return a.qk_nope_head_dim + a.qk_rope_head_dim, a.v_head_dim
    return cfg.head_dim, cfg.head_dim


def attention_params(cfg: ModelConfig) -> Count:
    a, d = cfg.attention, cfg.d_model
    if a.kind == "mla":
        return _mla_params(cfg)
    hd, n_kv = cfg.head_dim, cfg.kv_heads
    qkv_bias = a.has_qkv_bias
    q_rows = a.n_heads * hd * (2 if a.output_gate else 1)  # the gate rides on q_proj
    c = _linear(d, q_rows, qkv_bias) + _linear(d, n_kv * hd, qkv_bias) * 2
    c = c + _linear(a.n_heads * hd, d, a.bias)
    if a.qk_norm == "head":  # one norm over head_dim, shared by all heads (Qwen3, Gemma 3)
        c = c + _rmsnorm(hd) * 2
    elif a.qk_norm == "full":  # over the whole q and k projections (OLMo 2)
        c = c + _rmsnorm(a.n_heads * hd) + _rmsnorm(n_kv * hd)
    if a.sinks:  # one logit per head (gpt-oss)
        c = c + Count(a.n_heads, a.n_heads, 0)
    return c


def _fixed(n: int) -> Count:
    # Parameters no matmul multiplies (convolution taps, per-head SSM scalars, norm gains).
    return Count(n, n, 0)


def deltanet_params(cfg: ModelConfig) -> Count:
    """Gated DeltaNet: q/k/v/z/b/a projections, the q/k/v convolutions, A_log and dt_bias per
    head, the gated norm's gain (head width) and the output projection."""
    g, C = cfg.deltanet, cfg.d_model
    key, val = g.n_key_heads * g.key_head_dim, g.n_heads * g.value_head_dim
    c = _linear(C, key) * 2 + _linear(C, val) * 2 + _linear(C, g.n_heads) * 2
    c = c + _fixed((2 * key + val) * g.conv_kernel + 2 * g.n_heads + g.value_head_dim)
    return c + _linear(val, C)


def mamba_params(cfg: ModelConfig) -> Count:
    """Mamba-2: z/x/B/C/dt projections, the x/B/C convolutions, A_log, D and dt_bias per head,
    the grouped norm's gain and the output projection."""
    m, C = cfg.mamba, cfg.d_model
    inner, bc = m.n_heads * m.head_dim, m.n_groups * m.state_dim
    c = _linear(C, inner, m.bias) * 2 + _linear(C, bc, m.bias) * 2 + _linear(C, m.n_heads, m.bias)
    conv = (inner + 2 * bc) * (m.conv_kernel + (1 if m.conv_bias else 0))
    c = c + _fixed(conv + 3 * m.n_heads + inner)
    return c + _linear(inner, C, m.bias)


def mixer_params(cfg: ModelConfig, spec: LayerSpec) -> Count:
    """The token mixer of block ``spec``: attention, Gated DeltaNet, Mamba-2 or none."""
    if spec.mixer == "deltanet":
        return deltanet_params(cfg)
    if spec.mixer == "mamba2":
        return mamba_params(cfg)
    if spec.mixer == "none":
        return Count()
    return attention_params(cfg)


def _mla_params(cfg: ModelConfig) -> Count:
    # DeepSeek-V2/V3 layout: q through an optional low-rank bottleneck; k/v through the shared
    # latent (kv_a -> norm -> kv_b) plus one RoPE key shared by all heads.
    a, d, h = cfg.attention, cfg.d_model, cfg.attention.n_heads
    qk = a.qk_nope_head_dim + a.qk_rope_head_dim
    if a.q_lora_rank > 0:
        q = _linear(d, a.q_lora_rank, a.bias) + _rmsnorm(a.q_lora_rank)
        q = q + _linear(a.q_lora_rank, h * qk)
    else:
        q = _linear(d, h * qk)
    kv = _linear(d, a.kv_lora_rank + a.qk_rope_head_dim, a.bias) + _rmsnorm(a.kv_lora_rank)
    kv = kv + _linear(a.kv_lora_rank, h * (a.qk_nope_head_dim + a.v_head_dim))
    return q + kv + _linear(h * a.v_head_dim, d, a.bias)


def mlp_params(cfg: ModelConfig, hidden: int, bias: bool | None = None) -> Count:
    """A dense feed-forward block of width ``hidden`` (gated kinds have three matrices)."""
    bias = cfg.mlp.bias if bias is None else bias
    d = cfg.d_model
    c = _linear(d, hidden, bias) + _linear(hidden, d, bias)
    return c + _linear(d, hidden, bias) if cfg.mlp.gated else c


def moe_params(cfg: ModelConfig) -> Count:
    """Router, routed experts (top_k of them active) and always-on shared experts."""
    m = cfg.moe
    expert = mlp_params(cfg, cfg.expert_width, bias=m.expert_bias)
    routed = Count(expert.total * m.num_experts, expert.active * m.top_k, expert.matmul * m.top_k)
    c = _linear(cfg.d_model, m.num_experts, m.router_bias) + routed
    if cfg.shared_width:
        c = c + mlp_params(cfg, cfg.shared_width, bias=False)
        if m.shared_gate:
            c = c + _linear(cfg.d_model, 1)
    return c


def block_params(cfg: ModelConfig, layer_idx: int) -> Count:
    """One transformer block: its norms, token mixer and feed-forward sub-layer."""
    spec = layer_spec(cfg, layer_idx)
    n_norms = 1 if cfg.parallel_block else 2
    if cfg.norm.placement == "sandwich":
        n_norms += 2
    if spec.mixer == "none" or spec.mlp == "none":  # hybrid blocks: one norm per sub-layer
        n_norms = (spec.mixer != "none") + (spec.mlp != "none")
    if spec.mlp == "moe":
        ffn = moe_params(cfg)
    elif spec.mlp == "dense":
        ffn = mlp_params(cfg, cfg.mlp.hidden)
    else:
        ffn = Count()
    return _norm(cfg.norm, cfg.d_model) * n_norms + mixer_params(cfg, spec) + ffn


def mtp_module_params(cfg: ModelConfig, depth: int) -> Count:
    """DeepSeek-V3 MTP module ``depth`` (0-based): two input norms, the 2d -> d projection, one
    block and an output norm; the embedding and the LM head are the main model's."""
    norms = _norm(cfg.norm, cfg.d_model) * 3
    proj = _linear(2 * cfg.d_model, cfg.d_model)
    return norms + proj + block_params(cfg, cfg.n_layers + depth)


def _has_final_norm(cfg: ModelConfig) -> bool:
    # Post-norm stacks end normalised already; every other placement ends with a norm.
    return cfg.norm.placement != "post"


def count_params(cfg: ModelConfig) -> dict[str, int]:
    """Parameter counts: ``total``, ``active`` (per token), ``non_embedding``, ``embedding``
    (input tables), ``head`` (untied output head, 0 when tied) and ``mtp`` (extra modules, not in
    ``total``). See the module docstring for the conventions."""
    d, V = cfg.d_model, cfg.vocab_size
    embedding = V * d + (cfg.max_seq_len * d if cfg.position.kind == "learned" else 0)
    head = 0 if cfg.tie_embeddings else V * d
    body = Count()
    for i in range(cfg.n_layers):
        body = body + block_params(cfg, i)
    if _has_final_norm(cfg):
        body = body + _norm(cfg.norm, d)
    return {
        "total": embedding + body.total + head,
        "active": embedding + body.active + head,
        "non_embedding": body.total,
        "embedding": embedding,
        "head": head,
        "mtp": sum(mtp_module_params(cfg, k).total for k in range(cfg.mtp.depth)),
    }


# -- FLOPs -----------------------------------------------------------------------------------


def mean_context(seq_len: int, window: int | None = None) -> float:
    """Keys a query attends to, averaged over the T positions of a causal sequence: the query
    at position t (1-based) sees min(t, window) keys, itself included."""
    T, W = seq_len, window if window is not None else seq_len
    if T <= W:
        return (T + 1) / 2
    return (W * (W + 1) / 2 + (T - W) * W) / T


def attention_flops(cfg: ModelConfig, layer_idx: int, seq_len: int) -> float:
    """Token-mixing FLOPs per token of block ``layer_idx`` beyond its matmul weights: attention
    scores and values, or the recurrence of a DeltaNet / Mamba-2 layer (independent of
    ``seq_len``), or 0 for a block without a mixer."""
    spec = layer_spec(cfg, layer_idx)
    if spec.mixer == "deltanet":
        g = cfg.deltanet
        return 6.0 * g.n_heads * g.key_head_dim * g.value_head_dim
    if spec.mixer == "mamba2":
        m = cfg.mamba
        return 4.0 * m.n_heads * m.head_dim * m.state_dim
    if spec.mixer == "none":
        return 0.0
    qk, v = attention_dims(cfg)
    local = spec.is_local
    ctx = mean_context(seq_len, cfg.attention.sliding_window if local else None)
    return 2 * cfg.attention.n_heads * (qk + v) * ctx


def flops_per_token(cfg: ModelConfig, seq_len: int) -> dict[str, float]:
    """Model FLOPs per token at training sequence length ``seq_len``.

    ``inference``: one forward pass of the main model (prefill of a ``seq_len`` sequence);
    ``training``: 3 x (main + MTP forward); ``matmul`` and ``attention``: the two parts of the
    main forward; ``mtp``: the MTP modules' forward (training only)."""
    d, V = cfg.d_model, cfg.vocab_size
    matmul = 2 * sum(block_params(cfg, i).matmul for i in range(cfg.n_layers)) + 2 * d * V
    attention = sum(attention_flops(cfg, i, seq_len) for i in range(cfg.n_layers))
    # Each MTP module runs its projection and block, then the shared head once more.
    mtp = sum(
        2 * mtp_module_params(cfg, k).matmul
        + 2 * d * V
        + attention_flops(cfg, cfg.n_layers + k, seq_len)
        for k in range(cfg.mtp.depth)
    )
    forward = matmul + attention
    return {
        "training": 3 * (forward + mtp),
        "inference": forward,
        "matmul": matmul,
        "attention": attention,
        "mtp": mtp,
    }


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward), see :func:`flops_per_token`."""
    return flops_per_token(cfg, seq_len)["training"]


# -- KV cache --------------------------------------------------------------------------------


def kv_values_per_token_layer(cfg: ModelConfig) -> int:
    """Cached values per token in one layer."""
    a = cfg.attention
    if a.kind == "mla":
        return a.kv_lora_rank + a.qk_rope_head_dim
    return 2 * cfg.kv_heads * cfg.head_dim


def kv_cache_bytes_per_token(
    cfg: ModelConfig, dtype_bytes: int = 2, context_len: int | None = None
) -> dict[str, int]:
    """KV-cache size: ``per_token`` over all layers (the cost of one more token while every
    layer still caches it), and ``at_context``: the whole cache for ``context_len`` tokens
    (default max_seq_len), sliding-window layers holding at most ``window`` tokens.
    ``window_layers`` says how many layers are capped."""
    N = cfg.max_seq_len if context_len is None else context_len
    per_layer = kv_values_per_token_layer(cfg) * dtype_bytes
    W = cfg.attention.sliding_window
    specs = [layer_spec(cfg, i) for i in range(cfg.n_layers)]
    windows = [s.window for s in specs if s.mixer == "attention"]
    state = sum(recurrent_state_bytes(cfg, s, dtype_bytes) for s in specs)
    at_context = sum(per_layer * (N if w is None else min(N, w)) for w in windows)
    return {
        "per_token": per_layer * len(windows),
        "per_token_layer": per_layer,
        "context_len": N,
        "at_context": at_context + state,
        "window_layers": sum(w is not None for w in windows),
        "window": W or 0,
        "state": state,
        "recurrent_layers": sum(s.mixer in ("deltanet", "mamba2") for s in specs),
    }


def recurrent_state_bytes(cfg: ModelConfig, spec: LayerSpec, dtype_bytes: int = 2) -> int:
    """Decoding state of one DeltaNet / Mamba-2 layer per sequence, whatever its length: the
    convolution windows in the cache dtype and the fp32 recurrent state (0 for other layers)."""
    if spec.mixer == "deltanet":
        g = cfg.deltanet
        channels = 2 * g.n_key_heads * g.key_head_dim + g.n_heads * g.value_head_dim
        state = g.n_heads * g.key_head_dim * g.value_head_dim
        return channels * (g.conv_kernel - 1) * dtype_bytes + state * 4
    if spec.mixer == "mamba2":
        m = cfg.mamba
        channels = m.n_heads * m.head_dim + 2 * m.n_groups * m.state_dim
        state = m.n_heads * m.head_dim * m.state_dim
        return channels * (m.conv_kernel - 1) * dtype_bytes + state * 4
    return 0
