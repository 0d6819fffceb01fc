"""The typed configuration schema: the single source of truth for every setting.

Each component owns one dataclass and receives only that object. Field help texts live in the
``help`` metadata so `evoformer train --help` and the config reference are generated from here.
Field types stay plain (str, int, float, bool, lists, nested dataclasses) so OmegaConf can hold
them; choices are checked by :mod:`evoformer.config.validate`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional


def opt(default: Any, help: str) -> Any:
    """A dataclass field with a help text (mutable defaults are copied per instance)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help})
    if hasattr(default, "__dataclass_fields__"):
        return field(default_factory=type(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


# ---------------------------------------------------------------------------------------------
# model
# ---------------------------------------------------------------------------------------------


@dataclass
class NormConfig:
    kind: str = opt("rmsnorm", "Normalisation layer: layernorm | rmsnorm.")
    eps: float = opt(1e-5, "Epsilon added to the variance.")
    placement: str = opt(
        "pre",
        "Where the block norms sit: pre (GPT-2 onward: x + f(norm(x))) | post (original "
        "Transformer: norm(x + f(x))) | reordered (OLMo 2: x + norm(f(x))) | sandwich (Gemma 2/3: "
        "x + norm(f(norm(x)))).",
    )
    bias: bool = opt(True, "LayerNorm only: learn an additive bias.")
    unit_offset: bool = opt(False, "RMSNorm scales by (1 + weight), weight starts at 0 (Gemma).")


@dataclass
class RopeScalingConfig:
    kind: str = opt(
        "none",
        "RoPE frequency scaling: none | linear (positions / factor) | llama3 (Llama-3.1 "
        "wavelength bands) | yarn (NTK-by-parts + attention temperature; DeepSeek, Qwen).",
    )
    factor: float = opt(8.0, "Context extension factor.")
    low_freq_factor: float = opt(1.0, "llama3: wavelengths above original/low_freq_factor scale.")
    high_freq_factor: float = opt(4.0, "llama3: wavelengths below original/high_freq_factor stay.")
    original_max_seq_len: int = opt(8192, "Context length the base model was trained at.")
    beta_fast: float = opt(32.0, "yarn: rotations above which dimensions are extrapolated.")
    beta_slow: float = opt(1.0, "yarn: rotations below which dimensions are interpolated.")
    mscale: float = opt(0.0, "yarn: attention temperature numerator scale (0 = unset).")
    mscale_all_dim: float = opt(
        0.0,
        "yarn: attention temperature denominator scale; DeepSeek also scales the softmax "
        "by mscale(factor, mscale_all_dim)^2 (0 = unset).",
    )
    attention_factor: Optional[float] = opt(
        None, "yarn: cos/sin multiplier (null = derived from factor, mscale, mscale_all_dim)."
    )
    truncate: bool = opt(True, "yarn: round the correction range to whole dimensions.")


@dataclass
class PositionConfig:
    kind: str = opt("rope", "Position encoding: rope | learned (absolute) | alibi | none.")
    rope_theta: float = opt(10000.0, "RoPE base frequency.")
    rope_scaling: RopeScalingConfig = opt(RopeScalingConfig(), "RoPE frequency scaling.")
    local_rope_theta: Optional[float] = opt(
        None, "RoPE base of local (sliding-window) layers when it differs (Gemma 3: 10000)."
    )
    nope_layers: list[int] = opt(
        [], "Layers (0-based) whose attention uses no RoPE (SmolLM3's NoPE layers: every 4th)."
    )
    partial_rotary: float = opt(
        1.0,
        "Share of each head's q/k dims RoPE rotates, the leading ones; the rest carry no "
        "position (GLM-4.5: 0.5).",
    )


@dataclass
class AttentionConfig:
    kind: str = opt("mha", "mha (multi-head, covering GQA/MQA via n_kv_heads) | mla (DeepSeek).")
    n_heads: int = opt(4, "Number of query heads.")
    n_kv_heads: Optional[int] = opt(
        None, "Key/value heads: = n_heads for MHA, 1 for MQA, between for GQA (null = n_heads)."
    )
    head_dim: Optional[int] = opt(None, "Per-head dimension (null = d_model / n_heads).")
    bias: bool = opt(False, "Bias on the q/k/v and output projections.")
    qkv_bias: Optional[bool] = opt(None, "Bias on q/k/v only (null = bias; Qwen2: true).")
    dropout: float = opt(0.0, "Dropout on attention probabilities.")
    qk_norm: str = opt(
        "none",
        "Normalise q and k: none | head (per head, Qwen3/Gemma 3) | full (over the whole "
        "projection, OLMo 2).",
    )
    sliding_window: Optional[int] = opt(
        None, "Attend to at most this many previous tokens (Mistral; Gemma 3 local layers)."
    )
    global_every: int = opt(
        0, "With sliding_window: every N-th layer attends globally, the rest locally (Gemma 3: 6)."
    )
    scale: Optional[float] = opt(None, "Softmax scale (null = 1/sqrt(head_dim)).")
    sinks: bool = opt(
        False,
        "Attention sinks (gpt-oss): a learned logit per head joins the softmax denominator, so "
        "a query may attend to nothing.",
    )
    sdpa_kernel: str = opt(
        "auto",
        "SDPA kernel of standard attention: auto (CUDA: cudnn, then flash, efficient, math, "
        "the first that takes the inputs; CPU: torch's choice) | cudnn | flash | efficient | "
        "math (pinned; for comparing kernels).",
    )
    output_gate: bool = opt(
        False,
        "Gate the attention output by sigmoid(x W_g) per head and channel before o_proj; W_g "
        "is q_proj's second half per head (Qwen3-Next gated attention).",
    )
    q_lora_rank: int = opt(0, "MLA: rank of the low-rank query projection (0 = full-rank q).")
    kv_lora_rank: int = opt(512, "MLA: rank of the compressed KV latent (what the cache stores).")
    qk_nope_head_dim: int = opt(128, "MLA: per-head q/k dims without position information.")
    qk_rope_head_dim: int = opt(64, "MLA: per-head q/k dims carrying the decoupled RoPE.")
    v_head_dim: int = opt(128, "MLA: per-head value dim.")

    @property
    def has_qkv_bias(self) -> bool:
        """Whether q/k/v carry biases (``qkv_bias``; null follows ``bias``)."""
        return self.bias if self.qkv_bias is None else self.qkv_bias


@dataclass
class MLPConfig:
    kind: str = opt(
        "swiglu",
        "Feed-forward kind: gelu (2-matrix) | swiglu (gated, silu) | geglu (gated, gelu) | "
        "clamped_swiglu (gpt-oss: (clamp(up) + 1) * g * sigmoid(alpha * g), g = gate clamped "
        "above).",
    )
    hidden: int = opt(688, "Hidden (intermediate) width.")
    bias: bool = opt(False, "Bias on the MLP projections.")
    swiglu_limit: float = opt(
        7.0, "clamped_swiglu: the gate is clamped to <= limit, the up projection to +-limit."
    )
    swiglu_alpha: float = opt(1.702, "clamped_swiglu: the sigmoid's gain on the gate.")
    activation: str = opt(
        "default",
        "Activation: default (gelu_tanh for gelu, silu for swiglu) | gelu | gelu_tanh | silu | "
        "relu2 (squared ReLU, Nemotron-H; with kind=gelu, the 2-matrix MLP).",
    )

    @property
    def gated(self) -> bool:
        """Three matrices, ``down(glu(gate(x), up(x)))`` (swiglu, geglu, clamped_swiglu),
        rather than two."""
        return self.kind in ("swiglu", "geglu", "clamped_swiglu")

    @property
    def resolved_activation(self) -> str:
        """The activation ``default`` stands for: silu for swiglu, gelu_tanh otherwise."""
        if self.activation != "default":
            return self.activation
        return "silu" if self.kind in ("swiglu", "clamped_swiglu") else "gelu_tanh"


@dataclass
class InitConfig:
    std: float = opt(0.02, "Standard deviation of the normal init of linear and embedding weights.")
    scaled_residual: bool = opt(
        True, "GPT-2 scaled init: residual output projections use std / sqrt(2 * n_layers)."
    )


@dataclass
class MoEConfig:
    num_experts: int = opt(0, "Routed experts per MoE layer (0 = dense model).")
    top_k: int = opt(2, "Experts each token is sent to.")
    expert_hidden: int = opt(0, "Hidden width of one routed expert (0 = mlp.hidden).")
    num_shared_experts: int = opt(0, "Always-on shared experts (DeepSeekMoE).")
    shared_hidden: int = opt(0, "Hidden width of the shared expert block (0 = n_shared * expert).")
    score: str = opt("softmax", "Router scores: softmax (Mixtral, Qwen) | sigmoid (DeepSeek-V3).")
    norm_topk_prob: bool = opt(True, "Renormalise the chosen experts' weights to sum to 1.")
    routed_scaling: float = opt(1.0, "Multiply the routed output (DeepSeek-V3: 2.5).")
    n_groups: int = opt(1, "Group-limited routing: expert groups (DeepSeek-V3: 8).")
    topk_groups: int = opt(1, "Group-limited routing: groups a token may use (DeepSeek-V3: 4).")
    group_score: str = opt(
        "top2",
        "Group-limited routing: a group's score: top2 (sum of its two best experts, DeepSeek-V3)"
        " | max (its best expert, DeepSeek-V2's group_limited_greedy).",
    )
    first_k_dense: int = opt(0, "The first k layers keep a dense MLP (DeepSeek: 1-3).")
    layer_freq: int = opt(1, "Every N-th layer (after first_k_dense) is MoE.")
    aux_loss_coef: float = opt(0.0, "Load-balancing auxiliary loss weight (Mixtral 0.02).")
    bias_update_rate: float = opt(
        0.0, "Aux-loss-free balancing: per-step bias update speed (DeepSeek-V3: 0.001; 0 = off)."
    )
    capacity_factor: float = opt(0.0, "Expert capacity as a multiple of the even share (0 = none).")
    router_bias: bool = opt(False, "A learned bias on the router logits (gpt-oss).")
    expert_bias: bool = opt(False, "Biases on the routed experts' projections (gpt-oss).")
    shared_gate: bool = opt(
        False, "Scale the shared experts' output per token by sigmoid(x w) (Qwen3-Next)."
    )


@dataclass
class DeltaNetConfig:
    """Gated DeltaNet linear attention (Qwen3-Next), for the blocks ``mixer_pattern`` marks G."""

    n_heads: int = opt(4, "Value heads (Qwen3-Next: linear_num_value_heads).")
    n_key_heads: int = opt(
        2, "Query/key heads; each serves n_heads / n_key_heads value heads (linear_num_key_heads)."
    )
    key_head_dim: int = opt(32, "Per-head query/key width (linear_key_head_dim).")
    value_head_dim: int = opt(32, "Per-head value width (linear_value_head_dim).")
    conv_kernel: int = opt(4, "Width of the short causal depthwise convolution over q, k, v.")
    chunk_size: int = opt(64, "Tokens per chunk of the chunked (parallel-in-time) training form.")


@dataclass
class MambaConfig:
    """Mamba-2 state-space mixer (Nemotron-H), for the blocks ``mixer_pattern`` marks M."""

    n_heads: int = opt(8, "SSM heads (mamba_num_heads).")
    head_dim: int = opt(16, "Channels per head (mamba_head_dim); inner width = n_heads x head_dim.")
    state_dim: int = opt(16, "SSM state size per head (ssm_state_size).")
    n_groups: int = opt(1, "Groups sharing one B/C projection and one gated-norm group (n_groups).")
    conv_kernel: int = opt(4, "Width of the causal depthwise convolution over x, B, C.")
    conv_bias: bool = opt(True, "Bias on the convolution (use_conv_bias).")
    bias: bool = opt(False, "Bias on the in/out projections (use_bias).")
    chunk_size: int = opt(64, "Tokens per chunk of the chunked SSD training form.")


@dataclass
class MTPConfig:
    depth: int = opt(0, "Multi-token prediction modules (DeepSeek-V3: 1; 0 = off).")
    loss_weight: float = opt(0.3, "Weight of the mean MTP loss in the training loss.")


@dataclass
class ModelConfig:
    vocab_size: int = opt(8192, "Vocabulary size (the embedding rows; >= the tokenizer's).")
    d_model: int = opt(256, "Residual stream width.")
    n_layers: int = opt(4, "Number of transformer blocks.")
    max_seq_len: int = opt(2048, "Longest sequence (size of learned position table, RoPE cache).")
    tie_embeddings: bool = opt(False, "Share the token embedding with the output head.")
    dropout: float = opt(0.0, "Residual and embedding dropout.")
    norm: NormConfig = opt(NormConfig(), "Normalisation.")
    position: PositionConfig = opt(PositionConfig(), "Position encoding.")
    attention: AttentionConfig = opt(AttentionConfig(), "Attention.")
    mlp: MLPConfig = opt(MLPConfig(), "Feed-forward block.")
    init: InitConfig = opt(InitConfig(), "Weight initialisation.")
    moe: MoEConfig = opt(MoEConfig(), "Mixture of experts.")
    mtp: MTPConfig = opt(MTPConfig(), "Multi-token prediction heads.")
    mixer_pattern: str = opt(
        "",
        "Token mixer of each block, one letter per block, the string repeated to n_layers: "
        "A attention (model.attention) | G Gated DeltaNet (model.deltanet) | M Mamba-2 "
        "(model.mamba) | - none; empty = attention everywhere. Qwen3-Next: GGGA.",
    )
    mlp_pattern: str = opt(
        "",
        "Feed-forward of each block, one letter per block, repeated to n_layers: D dense | "
        "E MoE | - none; empty = dense, MoE where model.moe.first_k_dense/layer_freq say.",
    )
    deltanet: DeltaNetConfig = opt(DeltaNetConfig(), "Gated DeltaNet mixer (mixer_pattern G).")
    mamba: MambaConfig = opt(MambaConfig(), "Mamba-2 mixer (mixer_pattern M).")
    parallel_block: bool = opt(
        False, "PaLM/GPT-J block: attention and MLP read the same normed input, summed once."
    )
    embed_scale: bool = opt(False, "Multiply token embeddings by sqrt(d_model) (Gemma).")
    loss_chunk: int = opt(
        0,
        "Tokens per chunk of the fused LM head + cross-entropy in training: the [tokens, "
        "vocab] logits exist one chunk at a time, forward and backward (0 = plain path: the "
        "full logits and their softmax are kept until the backward).",
    )
    backend: str = opt(
        "torch", "Layer implementation: torch | te (Transformer Engine; CUDA only, install .[gpu])"
    )

    # Derived widths, resolved here once: every module, estimator and converter reads these
    # rather than repeating the "0 / null means ..." defaults of the fields above.
    @property
    def head_dim(self) -> int:
        """Per-head q/k/v width of standard attention (``attention.head_dim`` or d_model/heads)."""
        return self.attention.head_dim or self.d_model // self.attention.n_heads

    @property
    def rotary_dim(self) -> int:
        """Per-head dims RoPE rotates: ``head_dim * position.partial_rotary`` (MLA: its
        decoupled ``qk_rope_head_dim``)."""
        if self.attention.kind == "mla":
            return self.attention.qk_rope_head_dim
        return int(self.head_dim * self.position.partial_rotary)

    @property
    def kv_heads(self) -> int:
        """Key/value heads (``attention.n_kv_heads``, null = one per query head)."""
        return self.attention.n_kv_heads or self.attention.n_heads

    @property
    def expert_width(self) -> int:
        """Hidden width of one routed expert (``moe.expert_hidden``, 0 = ``mlp.hidden``)."""
        return self.moe.expert_hidden or self.mlp.hidden

    @property
    def shared_width(self) -> int:
        """Hidden width of the shared-expert block (``moe.shared_hidden``, 0 = one expert
        width per shared expert; 0 when there are none)."""
        return self.moe.shared_hidden or self.moe.num_shared_experts * self.expert_width


# ---------------------------------------------------------------------------------------------
# data, training, parallelism
# ---------------------------------------------------------------------------------------------


@dataclass
class DataConfig:
    source: str = opt(
        "default",
        "default (embedded corpus: the Python standard library's source) | files | synthetic.",
    )
    paths: list[str] = opt(
        [],
        "With source=files: .txt / .jsonl files, token stores (a folder written by `evoformer "
        "preprocess`, or a .tok file) or Megatron .bin/.idx corpora (these need data.tokenizer).",
    )
    prefetch: int = opt(
        2, "Steps of batches read ahead on a background thread (0 = read inside the step)."
    )
    weights: list[float] = opt(
        [],
        "With source=files: each path's share of every global batch (normalised; empty = the "
        "paths concatenated, each weighing its size). A source that runs out starts a new epoch.",
    )
    val_paths: list[str] = opt(
        [], "With source=files: validation files (empty = hold out val_fraction of documents)."
    )
    tokenizer: Optional[str] = opt(
        None,
        "sentencepiece .model, HuggingFace tokenizer.json, or HF tokenizer folder (tokenizer.json"
        " + tokenizer_config.json). null: source=default trains a sentencepiece one on the corpus "
        "and caches it; source=files uses the copy a preprocessed store keeps (text files then "
        "need one). A store made by another tokenizer is refused.",
    )
    eod_id: Optional[int] = opt(
        None,
        "End-of-document token id between packed documents (null = the tokenizer's eos: "
        "tokenizer_config.json's eos_token, else a known one such as <|endoftext|>).",
    )
    tokenizer_vocab_size: int = opt(8192, "Vocabulary of a tokenizer trained on the corpus.")
    val_fraction: float = opt(0.02, "Share of documents held out for validation.")
    document_masking: bool = opt(
        False,
        "Inside a packed window a token attends only to earlier tokens of its own document, "
        "and positions restart at each document (documents start at the end-of-document token).",
    )
    cache_dir: Optional[str] = opt(
        None, "Where tokenised corpora are cached (null = $EVOFORMER_CACHE or ~/.cache/evoformer)."
    )


@dataclass
class OptimConfig:
    name: str = opt(
        "adamw",
        "adamw | muon (orthogonalised momentum for the hidden matrices; AdamW with beta1/beta2/"
        "eps for embeddings, LM head, norms and biases; one lr for both, see muon_lr_scale).",
    )
    lr: float = opt(3e-4, "Peak learning rate.")
    min_lr_ratio: float = opt(0.1, "Final learning rate as a fraction of lr (cosine, wsd).")
    schedule: str = opt("cosine", "Schedule after warmup: cosine | wsd | constant.")
    warmup_steps: int = opt(100, "Linear warmup steps.")
    decay_fraction: float = opt(0.2, "wsd: share of the steps spent in the final decay.")
    weight_decay: float = opt(0.1, "AdamW weight decay (not applied to norms, biases, embeddings).")
    beta1: float = opt(0.9, "AdamW beta1.")
    beta2: float = opt(0.95, "AdamW beta2.")
    eps: float = opt(1e-8, "AdamW epsilon.")
    grad_clip: float = opt(1.0, "Clip the global gradient norm to this (0 = off).")
    z_loss: float = opt(
        0.0,
        "Weight of the z-loss, mean(logsumexp(logits)^2), added to the training loss to keep "
        "the softmax normaliser near 1 (PaLM, OLMo 2: 1e-4; 0 = off; logged as z_loss).",
    )
    qk_clip: float = opt(
        0.0,
        "QK-clip (MuonClip, Kimi K2: 100): after each step, scale back the query/key "
        "projections of every head whose largest attention logit exceeded this (0 = off).",
    )
    muon_momentum: float = opt(0.95, "Muon momentum.")
    muon_nesterov: bool = opt(True, "Muon: Nesterov momentum (orthogonalise g + m * momentum).")
    muon_ns_steps: int = opt(5, "Muon: Newton-Schulz iterations.")
    muon_ns_coefficients: list[float] = opt(
        [3.4445, -4.775, 2.0315],
        "Muon: Newton-Schulz polynomial (a, b, c) of x -> a x + b (x x^T) x + c (x x^T)^2 x "
        "(the default is Keller Jordan's quintic; [1.5, -0.5, 0] is the classic cubic).",
    )
    muon_lr_scale: str = opt(
        "rms",
        "Muon update scale per [out, in] matrix: rms (0.2 sqrt(max(out, in)): the update RMS of "
        "AdamW, so optim.lr serves both halves; Moonlight) | spectral (sqrt(max(1, out/in))).",
    )


@dataclass
class TrainConfig:
    max_steps: int = opt(1000, "Optimizer steps to train for.")
    global_batch_size: int = opt(
        8, "Sequences per optimizer step, summed over data-parallel ranks."
    )
    micro_batch_size: int = opt(8, "Sequences per forward/backward on one rank.")
    seq_len: int = opt(256, "Tokens per training sequence.")
    eval_every: int = opt(0, "Evaluate on the validation split every N steps (0 = never).")
    eval_batches: int = opt(8, "Micro-batches per evaluation.")
    log_every: int = opt(10, "Write a metrics line every N steps.")
    batch_ramp: list[int] = opt(
        [],
        "[start, increment, tokens]: the global batch starts at `start` sequences and grows by "
        "`increment` at equal steps of consumed tokens until global_batch_size, reached after "
        "`tokens` (Megatron's --rampup-batch-size, in tokens; [] = off).",
    )
    seq_len_schedule: list[list[int]] = opt(
        [],
        "[[step, seq_len], ...]: from each step on, train on sequences of that length, each a "
        "divisor of train.seq_len; a window of train.seq_len tokens is cut into shorter ones, "
        "so the tokens per step stay the same (sequence-length warmup; [] = off).",
    )
    nonfinite_patience: int = opt(
        3,
        "Steps in a row whose loss or gradients are not finite (each skipped on every rank, "
        "weights unchanged) before the run stops (0 = stop at the first).",
    )
    spike_sigma: float = opt(
        0.0,
        "Skip a step whose loss exceeds the mean of the last spike_window steps by this many "
        "standard deviations (0 = off; OLMo-core uses 6).",
    )
    spike_window: int = opt(100, "Steps of loss history for spike_sigma.")
    compile: bool = opt(
        False,
        "Compile each transformer block with torch.compile (names and checkpoints unchanged; "
        "fuses elementwise work and torchao's FP8 casts; the first steps pay the compile time).",
    )
    compile_mode: str = opt(
        "default",
        "With train.compile: torch.compile's mode: default | reduce-overhead (CUDA graphs of "
        "the compiled regions; static shapes, zero.backend=ddp) | max-autotune (GEMM autotuning "
        "+ CUDA graphs) | max-autotune-no-cudagraphs. CPU has no CUDA graphs: same as default.",
    )
    compile_scope: str = opt(
        "block",
        "With train.compile: block (each transformer block on its own; composes with every "
        "layout) | model (the whole forward as one graph: embedding, blocks, final norm, head "
        "and loss fused across block boundaries; pp = 1 and zero.backend=ddp).",
    )


# Pipeline schedules and their default stages per pp rank (engine.pipeline maps each name to
# its torch.distributed.pipelining class).
PP_SCHEDULE_VIRTUAL_STAGES = {"gpipe": 1, "1f1b": 1, "interleaved": 2, "zero_bubble": 2, "zbv": 2}


@dataclass
class ParallelConfig:
    tp: int = opt(1, "Tensor-parallel size.")
    pp: int = opt(1, "Pipeline-parallel size.")
    ep: int = opt(1, "Expert-parallel size.")
    cp: int = opt(
        1,
        "Context-parallel size: each sequence is split over cp ranks (2*cp load-balanced chunks, "
        "rank i holding chunks i and 2*cp-1-i); they share parameters and reduce gradients with "
        "the data-parallel replicas.",
    )
    cp_kind: str = opt(
        "ring",
        "Context-parallel attention: ring (K/V travel around the cp group, partial results "
        "merged by log-sum-exp) | alltoall (Ulysses: sequence <-> heads re-sharding, needs the "
        "heads of a tp rank divisible by cp).",
    )
    sequence_parallel: bool = opt(False, "Shard norm/dropout regions along the sequence (tp > 1).")
    pp_schedule: str = opt(
        "1f1b",
        "Pipeline schedule: gpipe | 1f1b | interleaved (interleaved 1F1B) | zero_bubble "
        "(interleaved zero bubble, ZB1P) | zbv (zero bubble, V-shaped stage placement).",
    )
    pp_virtual_stages: int = opt(
        0,
        "Pipeline stages per pp rank (0 = from the schedule: 1 for gpipe/1f1b, 2 for "
        "interleaved/zero_bubble/zbv).",
    )
    pp_layers: Optional[list[int]] = opt(
        None,
        "Layers of each pipeline stage, in stage order, summing to model.n_layers (null = "
        "balanced by cost, counting embedding and head).",
    )

    @property
    def stages_per_rank(self) -> int:
        """Pipeline stages each pp rank holds: ``pp_virtual_stages``, or the schedule's."""
        return self.pp_virtual_stages or PP_SCHEDULE_VIRTUAL_STAGES[self.pp_schedule]

    @property
    def stage_placement(self) -> str:
        """How stages go round the pp ranks: ``v`` (zbv: rank r holds r and 2pp-1-r) or
        ``loop`` (stage s on rank s % pp)."""
        return "v" if self.pp_schedule == "zbv" else "loop"


@dataclass
class ZeroConfig:
    backend: str = opt("ddp", "Data-parallel strategy: ddp | fsdp2 | deepspeed.")
    stage: int = opt(0, "ZeRO stage 0-3.")
    replicate: int = opt(
        1,
        "fsdp2: HSDP replicas (1 = shard over all of dp). dp splits into replicate x shard: "
        "parameters are sharded within each group of dp / replicate ranks and gradients "
        "all-reduced between the replicas.",
    )
    offload_optimizer: str = opt(
        "none", "deepspeed: keep the optimizer state (and its step) on none | cpu | nvme."
    )
    offload_param: str = opt(
        "none", "deepspeed, stage 3: keep the parameters between uses on none | cpu | nvme."
    )
    nvme_path: str = opt("", "deepspeed: folder on an NVMe drive (needed by nvme offload).")
    deepspeed_config: dict[str, Any] = opt(
        {},
        "deepspeed: raw DeepSpeed config keys deep-merged over the generated config (keys "
        "evoformer derives from its own settings, e.g. batch sizes, clipping, stage, precision, "
        "may not be changed here).",
    )


@dataclass
class FP8Config:
    enabled: bool = opt(False, "Train the linear layers in FP8.")
    backend: str = opt("te", "FP8 implementation: te (Transformer Engine) | torchao.")
    recipe: str = opt(
        "tensorwise",
        "Scaling recipe: tensorwise (one dynamic scale per tensor; te: Float8CurrentScaling) | "
        "rowwise (torchao: one scale per row) | delayed (te: DelayedScaling, amax history) | "
        "mxfp8 (te: MXFP8BlockScaling, Blackwell) | blockwise (te: Float8BlockScaling).",
    )
    keep_first_last: bool = opt(
        True,
        "Keep the first and last transformer blocks in higher precision (the LM head, "
        "embeddings, MoE routers and MTP modules always are).",
    )
    fsdp_float8_all_gather: bool = opt(
        False,
        "torchao tensorwise with zero.backend=fsdp2: all-gather weights in FP8 (half the bf16 "
        "traffic).",
    )


@dataclass
class LossScaleConfig:
    initial_scale: float = opt(65536.0, "fp16: loss scale at the start (2^16).")
    growth_interval: int = opt(
        1000, "fp16: multiply the scale by growth_factor after this many clean steps in a row."
    )
    growth_factor: float = opt(2.0, "fp16: scale multiplier after growth_interval clean steps.")
    backoff_factor: float = opt(
        0.5, "fp16: scale multiplier on overflow (inf/NaN gradients; the step is skipped)."
    )
    min_scale: float = opt(1.0, "fp16: the scale never backs off below this.")


@dataclass
class CheckpointConfig:
    save_every: int = opt(
        0, "Save a checkpoint every N steps (0 = never; the end is always saved)."
    )
    load: Optional[str] = opt(None, "Resume from: null | auto (latest in run.output_dir) | PATH.")
    init_from: Optional[str] = opt(
        None,
        "Start a new run from this checkpoint's weights only (any layout and backend): fresh "
        "optimizer, step 0, a new data order. Unlike checkpoint.load, which continues a run "
        "(optimizer, step, data order); once this run has checkpoints, load=auto resumes them.",
    )
    keep_last: int = opt(3, "Keep only the newest K checkpoints (0 = keep all).")
    save_final: bool = opt(True, "Save a checkpoint when training ends or is interrupted.")
    async_save: bool = opt(
        False,
        "Write checkpoints in the background (DCP async_save): the step stalls only while the "
        "shards are copied to host memory; `latest` moves when every rank's write has completed; "
        "one save in flight at a time. Not with zero.backend=deepspeed.",
    )


@dataclass
class DistConfig:
    timeout_s: float = opt(
        600.0,
        "Collective timeout in seconds (init_process_group), and the watchdog's limit: a rank "
        "making no progress (step, eval, save) for this long ends the job with one line.",
    )
    watchdog: bool = opt(
        True,
        "A thread that ends the job (exit status 3, status.json state hung) with one line naming "
        "the step, the collective or phase, and the last complete checkpoint when a rank makes "
        "no progress for dist.timeout_s (plus a few seconds).",
    )
    flight_recorder: int = opt(
        2000,
        "NCCL: collectives kept in the flight recorder ring buffer (TORCH_FR_BUFFER_SIZE), "
        "dumped on a timeout into run.output_dir/flight_recorder/ (0 = off).",
    )
    async_error_handling: int = opt(
        3,
        "NCCL: TORCH_NCCL_ASYNC_ERROR_HANDLING (3 = tear the process down on a timeout or NCCL "
        "error; 1 = abort the communicator first; 0 = off). Environment variables already set win.",
    )


@dataclass
class RunConfig:
    output_dir: str = opt("runs/quickstart", "Run directory: config, metrics and checkpoints.")
    seed: int = opt(1234, "Seed for weights, data order and dropout.")
    device: str = opt("auto", "auto (cuda if available) | cpu | cuda.")
    wandb: bool = opt(False, "Log to Weights & Biases (honours WANDB_MODE, e.g. offline).")
    wandb_project: str = opt("evoformer", "wandb project name.")
    tensorboard: bool = opt(False, "Write TensorBoard event files to run.output_dir/tensorboard.")
    progress: str = opt("auto", "Console progress bar: auto (when a terminal) | on | off.")
    threads: int = opt(0, "CPU threads for torch (0 = leave torch's default).")
    tune_malloc: bool = opt(
        True, "On CPU, keep freed memory in-process (glibc mallopt): ~10 % faster steps."
    )
    measure_memory: bool = opt(
        True,
        "Measure per-rank parameter, gradient, optimizer and activation bytes on the first step "
        "and log them (mem_*_bytes) with every metrics line.",
    )
    profile: list[int] = opt(
        [],
        "[first, last] steps to trace with torch.profiler (1-based, inclusive; [] = off): a "
        "Chrome trace per rank in run.output_dir/profile (open in ui.perfetto.dev), and on GPU "
        "a CUDA memory snapshot (open in pytorch.org/memory_viz).",
    )
    peak_tflops: Optional[float] = opt(
        None,
        "Peak TFLOP/s per device for the logged mfu (null = a table of common GPUs by name "
        "and precision; on CPU the measured fp32 matmul rate).",
    )


@dataclass
class Config:
    run: RunConfig = opt(RunConfig(), "Run.")
    model: ModelConfig = opt(ModelConfig(), "Model architecture.")
    data: DataConfig = opt(DataConfig(), "Data.")
    train: TrainConfig = opt(TrainConfig(), "Training loop.")
    optim: OptimConfig = opt(OptimConfig(), "Optimizer and schedule.")
    parallel: ParallelConfig = opt(ParallelConfig(), "Model parallelism.")
    zero: ZeroConfig = opt(ZeroConfig(), "Data parallelism and ZeRO sharding.")
    precision: str = opt(
        "fp32",
        "Compute precision: fp32 | bf16 (autocast; FSDP2: bf16 params, fp32 reduce and master "
        "weights) | fp16 (the same with fp16, plus dynamic loss scaling: see loss_scale).",
    )
    loss_scale: LossScaleConfig = opt(LossScaleConfig(), "Dynamic loss scaling (precision=fp16).")
    fp8: FP8Config = opt(FP8Config(), "FP8 training.")
    activation_checkpointing: str = opt(
        "none",
        "Recompute activations in backward: none | full (keep only block inputs) | selective "
        "(keep matmul and attention outputs, recompute norms, activations, RoPE, dropout).",
    )
    activation_checkpointing_every: int = opt(
        1, "Checkpoint every N-th transformer block (blocks 0, N, 2N, ...); 1 = all."
    )
    checkpoint: CheckpointConfig = opt(CheckpointConfig(), "Checkpointing and resume.")
    dist: DistConfig = opt(DistConfig(), "Process groups: timeouts, hang watchdog, NCCL debugging.")
