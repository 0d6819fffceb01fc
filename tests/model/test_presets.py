"""Every preset has its published size, and the analytic count is the built model's count.

Three independent checks on configs/models/:
- the analytic :func:`count_params` is within tolerance of the figure the model's authors (or
  the HF page of the released checkpoint) publish;
- it equals exactly the parameter count of HF transformers' own model class built on the meta
  device from the same config.json values (so the YAML transcribes config.json correctly);
- it equals exactly the parameter count of our Transformer built on the meta device, for every
  preset and every tiny config (so the formulas mirror the modules).
"""

from __future__ import annotations

import math

import pytest
import torch

from evoformer.config import load_config
from evoformer.config.schema import ModelConfig
from evoformer.model.costs import count_params
from evoformer.model.transformer import Transformer
from tests.conftest import REPO

PRESETS = sorted(p.stem for p in (REPO / "configs/models").glob("*.yaml"))
TINY = sorted(p.stem for p in (REPO / "configs/models/tiny").glob("*.yaml"))


def preset(name: str) -> ModelConfig:
    return load_config([str(REPO / f"configs/models/{name}.yaml")]).model


# (preset, quantity, published value, relative tolerance, source). Quantities: total, active
# (every parameter one token uses: Mixtral / Qwen convention), active_no_embed (DeepSeek's
# "activated": without the input embedding table), non_embedding (no vocab-sized matrices).
# Figures published to two significant digits get the tolerance their rounding allows.
PUBLISHED = [
    ("gpt2-124m", "total", 124_439_808, 0.005, "HF openai-community/gpt2 (124M)"),
    (
        "gpt2-1.5b",
        "total",
        1_557_611_200,
        0.005,
        "HF openai-community/gpt2-xl GPT2LMHeadModel.num_parameters(); paper Table 2 says 1542M",
    ),
    ("llama2-7b", "total", 6.74e9, 0.005, "HF meta-llama/Llama-2-7b-hf: 6.74B params"),
    ("llama3-8b", "total", 8.03e9, 0.005, "HF meta-llama/Meta-Llama-3-8B: 8.03B params"),
    ("llama3.1-405b", "total", 406e9, 0.005, "HF meta-llama/Llama-3.1-405B: 406B params"),
    ("mistral-7b", "total", 7.24e9, 0.005, "HF mistralai/Mistral-7B-v0.1: 7.24B params"),
    ("mixtral-8x7b", "total", 46.7e9, 0.005, "Mistral AI, Mixtral of experts (2023): 46.7B"),
    ("mixtral-8x7b", "active", 12.9e9, 0.005, "Mistral AI, Mixtral of experts: 12.9B per token"),
    ("qwen3-8b", "total", 8.2e9, 0.005, "HF Qwen/Qwen3-8B-Base model card: 8.2B"),
    ("qwen3-8b", "non_embedding", 6.95e9, 0.005, "HF Qwen/Qwen3-8B-Base: 6.95B non-embedding"),
    ("qwen3-235b-a22b", "total", 235e9, 0.005, "HF Qwen/Qwen3-235B-A22B model card: 235B"),
    ("qwen3-235b-a22b", "non_embedding", 234e9, 0.005, "HF Qwen/Qwen3-235B-A22B: 234B"),
    ("qwen3-235b-a22b", "active", 22e9, 0.023, "HF Qwen/Qwen3-235B-A22B: 22B (+-0.5B)"),
    ("olmo2-7b", "total", 7.3e9, 0.005, "HF allenai/OLMo-2-1124-7B: 7.3B params"),
    ("olmo3-7b", "total", 7.3e9, 0.005, "HF allenai/Olmo-3-1025-7B: 7.3B params"),
    ("phi4-14b", "total", 14.7e9, 0.005, "HF microsoft/phi-4: 14.7B params"),
    ("smollm3-3b", "total", 3.08e9, 0.005, "HF HuggingFaceTB/SmolLM3-3B: 3.08B params"),
    (
        "gemma3-27b",
        "total",
        25_600e6 + 1_416e6,
        0.005,
        "Gemma 3 technical report, Table 1: 25,600M non-embedding + 1,416M embedding",
    ),
    ("gemma3-27b", "non_embedding", 25_600e6, 0.005, "Gemma 3 technical report, Table 1"),
    ("deepseek-v2-lite", "total", 15.7e9, 0.005, "HF deepseek-ai/DeepSeek-V2-Lite: 15.7B"),
    (
        "deepseek-v2-lite",
        "active_no_embed",
        2.4e9,
        0.025,
        "HF deepseek-ai/DeepSeek-V2-Lite: 2.4B activated (we get 2.45B: the card truncates)",
    ),
    ("deepseek-v2-236b", "total", 236e9, 0.005, "DeepSeek-V2 paper: 236B total"),
    (
        "deepseek-v2-236b",
        "active_no_embed",
        21e9,
        0.025,
        "DeepSeek-V2 paper: 21B activated (two significant digits; we get 20.85B)",
    ),
    ("deepseek-v3-671b", "total", 671e9, 0.005, "DeepSeek-V3 technical report: 671B"),
    (
        "deepseek-v3-671b",
        "active_no_embed",
        37e9,
        0.014,
        "DeepSeek-V3 technical report: 37B activated (+-0.5B)",
    ),
    ("qwen3-next-80b-a3b", "total", 80e9, 0.005, "HF Qwen/Qwen3-Next-80B-A3B-Instruct: 80B"),
    (
        "qwen3-next-80b-a3b",
        "active_no_vocab",
        3e9,
        0.09,
        "HF Qwen/Qwen3-Next-80B-A3B-Instruct: 3B activated (we get 3.25B without the embedding "
        "and head: the card rounds to one digit)",
    ),
    (
        "nemotron-h-8b",
        "total",
        8e9,
        0.02,
        "HF nvidia/Nemotron-H-8B-Base-8K: an 8B model (we get 8.10B, as HF's class counts: the "
        "name rounds)",
    ),
    (
        "kimi-k2-1t",
        "total",
        1e12,
        0.03,
        "HF moonshotai/Kimi-K2-Base model card: 1T total (one significant digit; we get 1.026T)",
    ),
    (
        "kimi-k2-1t",
        "active_no_embed",
        32e9,
        0.015,
        "HF moonshotai/Kimi-K2-Base model card: 32B activated (we get 31.7B)",
    ),
    (
        "glm4.5-355b",
        "total",
        355e9,
        0.01,
        "GLM-4.5 report / HF zai-org/GLM-4.5: 355B (ours: 352.8B main model, 356.8B with MTP)",
    ),
    (
        "glm4.5-355b",
        "active_no_vocab",
        32e9,
        0.016,
        "GLM-4.5 report: 32B activated (+-0.5B; embedding and head not counted)",
    ),
    ("glm4.5-air-106b", "total", 106e9, 0.01, "HF zai-org/GLM-4.5-Air: 106B (ours 106.85B)"),
    (
        "glm4.5-air-106b",
        "active_no_vocab",
        12e9,
        0.042,
        "HF zai-org/GLM-4.5-Air: 12B activated (+-0.5B; embedding and head not counted)",
    ),
    ("minimax-m2-230b", "total", 230e9, 0.01, "HF MiniMaxAI/MiniMax-M2: 230B (ours 228.7B)"),
    (
        "minimax-m2-230b",
        "active_no_vocab",
        10e9,
        0.05,
        "HF MiniMaxAI/MiniMax-M2: 10B activated (+-0.5B; embedding and head not counted)",
    ),
    ("gpt-oss-20b", "total", 20.91e9, 0.005, "OpenAI gpt-oss model card, Table 1: 20.91B"),
    (
        "gpt-oss-20b",
        "active_no_embed",
        3.61e9,
        0.005,
        "OpenAI gpt-oss model card, Table 1: 3.61B active (the unembedding counted)",
    ),
    ("gpt-oss-120b", "total", 116.83e9, 0.005, "OpenAI gpt-oss model card, Table 1: 116.83B"),
    ("gpt-oss-120b", "active_no_embed", 5.13e9, 0.005, "OpenAI gpt-oss model card: 5.13B"),
    (
        "deepseek-v3-671b",
        "hf_checkpoint",
        685e9,
        0.005,
        "HF deepseek-ai/DeepSeek-V3: 685B = 671B main + 14B MTP, whose checkpoint repeats the "
        "embedding and head",
    ),
]


def quantity(name: str, what: str) -> int:
    p = count_params(preset(name))
    derived = {
        "active_no_embed": p["active"] - p["embedding"],
        "active_no_vocab": p["active"] - p["embedding"] - p["head"],
        "hf_checkpoint": p["total"] + p["mtp"] + p["embedding"] + p["head"],
    }
    return derived[what] if what in derived else p[what]


@pytest.mark.parametrize("name, what, published, rel, source", PUBLISHED)
def test_preset_matches_published_size(name, what, published, rel, source):
    got = quantity(name, what)
    assert got == pytest.approx(published, rel=rel), f"{name} {what}: {got:,} vs {source}"


def test_every_preset_has_a_published_total():
    assert {name for name, what, *_ in PUBLISHED if what == "total"} == set(PRESETS)
    moe = {n for n in PRESETS if preset(n).moe.num_experts}
    assert moe <= {name for name, what, *_ in PUBLISHED if what.startswith("active")}


# -- the YAML transcribes config.json: HF's own classes give the same count -------------------

# The architecture fields of each released config.json (values that change no parameter
# shape, such as eps or rope_theta, are left at HF defaults).
HF_CONFIGS = {
    "gpt2-1.5b": ("GPT2LMHeadModel", "GPT2Config", dict(n_embd=1600, n_layer=48, n_head=25)),
    "llama2-7b": (
        "LlamaForCausalLM",
        "LlamaConfig",
        dict(
            vocab_size=32000,
            hidden_size=4096,
            intermediate_size=11008,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=32,
        ),
    ),
    "llama3.1-405b": (
        "LlamaForCausalLM",
        "LlamaConfig",
        dict(
            vocab_size=128256,
            hidden_size=16384,
            intermediate_size=53248,
            num_hidden_layers=126,
            num_attention_heads=128,
            num_key_value_heads=8,
        ),
    ),
    "mistral-7b": (
        "MistralForCausalLM",
        "MistralConfig",
        dict(
            vocab_size=32000,
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            sliding_window=4096,
        ),
    ),
    "mixtral-8x7b": (
        "MixtralForCausalLM",
        "MixtralConfig",
        dict(
            vocab_size=32000,
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            num_local_experts=8,
            num_experts_per_tok=2,
        ),
    ),
    "qwen3-8b": (
        "Qwen3ForCausalLM",
        "Qwen3Config",
        dict(
            vocab_size=151936,
            hidden_size=4096,
            intermediate_size=12288,
            num_hidden_layers=36,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=128,
            tie_word_embeddings=False,
        ),
    ),
    "qwen3-235b-a22b": (
        "Qwen3MoeForCausalLM",
        "Qwen3MoeConfig",
        dict(
            vocab_size=151936,
            hidden_size=4096,
            intermediate_size=12288,
            moe_intermediate_size=1536,
            num_hidden_layers=94,
            num_attention_heads=64,
            num_key_value_heads=4,
            head_dim=128,
            num_experts=128,
            num_experts_per_tok=8,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            tie_word_embeddings=False,
        ),
    ),
    "olmo2-7b": (
        "Olmo2ForCausalLM",
        "Olmo2Config",
        dict(
            vocab_size=100352,
            hidden_size=4096,
            intermediate_size=11008,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=32,
        ),
    ),
    "olmo3-7b": (
        "Olmo3ForCausalLM",
        "Olmo3Config",
        dict(
            vocab_size=100278,
            hidden_size=4096,
            intermediate_size=11008,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=32,
        ),
    ),
    "phi4-14b": (
        "Phi3ForCausalLM",
        "Phi3Config",
        dict(
            vocab_size=100352,
            hidden_size=5120,
            intermediate_size=17920,
            num_hidden_layers=40,
            num_attention_heads=40,
            num_key_value_heads=10,
        ),
    ),
    "smollm3-3b": (
        "SmolLM3ForCausalLM",
        "SmolLM3Config",
        dict(
            vocab_size=128256,
            hidden_size=2048,
            intermediate_size=11008,
            num_hidden_layers=36,
            num_attention_heads=16,
            num_key_value_heads=4,
            tie_word_embeddings=True,
        ),
    ),
    "gemma3-27b": (
        "Gemma3ForCausalLM",
        "Gemma3TextConfig",
        dict(
            vocab_size=262208,
            hidden_size=5376,
            intermediate_size=21504,
            num_hidden_layers=62,
            num_attention_heads=32,
            num_key_value_heads=16,
            head_dim=128,
            query_pre_attn_scalar=168,
            sliding_window=1024,
        ),
    ),
    "deepseek-v2-lite": (
        "DeepseekV2ForCausalLM",
        "DeepseekV2Config",
        dict(
            vocab_size=102400,
            hidden_size=2048,
            intermediate_size=10944,
            moe_intermediate_size=1408,
            num_hidden_layers=27,
            num_attention_heads=16,
            num_key_value_heads=16,
            n_routed_experts=64,
            num_experts_per_tok=6,
            n_shared_experts=2,
            first_k_dense_replace=1,
            q_lora_rank=None,
            kv_lora_rank=512,
            qk_nope_head_dim=128,
            qk_rope_head_dim=64,
            v_head_dim=128,
            n_group=1,
            topk_group=1,
        ),
    ),
    "deepseek-v2-236b": (
        "DeepseekV2ForCausalLM",
        "DeepseekV2Config",
        dict(
            vocab_size=102400,
            hidden_size=5120,
            intermediate_size=12288,
            moe_intermediate_size=1536,
            num_hidden_layers=60,
            num_attention_heads=128,
            num_key_value_heads=128,
            n_routed_experts=160,
            num_experts_per_tok=6,
            n_shared_experts=2,
            first_k_dense_replace=1,
            q_lora_rank=1536,
            kv_lora_rank=512,
            qk_nope_head_dim=128,
            qk_rope_head_dim=64,
            v_head_dim=128,
            n_group=8,
            topk_group=3,
            topk_method="group_limited_greedy",
        ),
    ),
    "qwen3-next-80b-a3b": (
        "Qwen3NextForCausalLM",
        "Qwen3NextConfig",
        dict(
            vocab_size=151936,
            hidden_size=2048,
            intermediate_size=5120,
            num_hidden_layers=48,
            num_attention_heads=16,
            num_key_value_heads=2,
            head_dim=256,
            linear_conv_kernel_dim=4,
            linear_key_head_dim=128,
            linear_value_head_dim=128,
            linear_num_key_heads=16,
            linear_num_value_heads=32,
            moe_intermediate_size=512,
            shared_expert_intermediate_size=512,
            num_experts=512,
            num_experts_per_tok=10,
            full_attention_interval=4,
        ),
    ),
    "nemotron-h-8b": (
        "NemotronHForCausalLM",
        "NemotronHConfig",
        dict(
            vocab_size=131072,
            hidden_size=4096,
            hybrid_override_pattern="M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M-",
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=128,
            intermediate_size=21504,
            ssm_state_size=128,
            mamba_num_heads=128,
            mamba_head_dim=64,
            n_groups=8,
            conv_kernel=4,
        ),
    ),
    "deepseek-v3-671b": (
        "DeepseekV3ForCausalLM",
        "DeepseekV3Config",
        dict(
            vocab_size=129280,
            hidden_size=7168,
            intermediate_size=18432,
            moe_intermediate_size=2048,
            num_hidden_layers=61,
            num_attention_heads=128,
            num_key_value_heads=128,
            n_routed_experts=256,
            num_experts_per_tok=8,
            n_shared_experts=1,
            first_k_dense_replace=3,
            q_lora_rank=1536,
            kv_lora_rank=512,
            qk_nope_head_dim=128,
            qk_rope_head_dim=64,
            v_head_dim=128,
            n_group=8,
            topk_group=4,
        ),
    ),
    # Kimi K2 runs as HF's DeepSeek-V3 class (transformers has no kimi_k2 module).
    "kimi-k2-1t": (
        "DeepseekV3ForCausalLM",
        "DeepseekV3Config",
        dict(
            vocab_size=163840,
            hidden_size=7168,
            intermediate_size=18432,
            moe_intermediate_size=2048,
            num_hidden_layers=61,
            num_attention_heads=64,
            num_key_value_heads=64,
            n_routed_experts=384,
            num_experts_per_tok=8,
            n_shared_experts=1,
            first_k_dense_replace=1,
            q_lora_rank=1536,
            kv_lora_rank=512,
            qk_nope_head_dim=128,
            qk_rope_head_dim=64,
            v_head_dim=128,
            n_group=1,
            topk_group=1,
        ),
    ),
    **{
        name: (
            "Glm4MoeForCausalLM",
            "Glm4MoeConfig",
            dict(
                vocab_size=151552,
                hidden_size=d,
                intermediate_size=ffn,
                moe_intermediate_size=expert,
                num_hidden_layers=layers,
                num_attention_heads=96,
                num_key_value_heads=8,
                head_dim=128,
                n_routed_experts=experts,
                n_shared_experts=1,
                num_experts_per_tok=8,
                first_k_dense_replace=dense,
                attention_bias=True,
                use_qk_norm=qk_norm,
            ),
        )
        for name, d, ffn, expert, layers, experts, dense, qk_norm in (
            ("glm4.5-355b", 5120, 12288, 1536, 92, 160, 3, True),
            ("glm4.5-air-106b", 4096, 10944, 1408, 46, 128, 1, False),
        )
    },
    "minimax-m2-230b": (
        "MiniMaxM2ForCausalLM",
        "MiniMaxM2Config",
        dict(
            vocab_size=200064,
            hidden_size=3072,
            intermediate_size=1536,
            num_hidden_layers=62,
            num_attention_heads=48,
            num_key_value_heads=8,
            head_dim=128,
            num_local_experts=256,
            num_experts_per_tok=8,
        ),
    ),
    **{
        name: (
            "GptOssForCausalLM",
            "GptOssConfig",
            dict(num_hidden_layers=layers, num_local_experts=experts, num_experts_per_tok=4),
        )  # the other GptOssConfig defaults are the released values
        for name, layers, experts in (("gpt-oss-20b", 24, 32), ("gpt-oss-120b", 36, 128))
    },
}


@pytest.mark.parametrize("name", sorted(HF_CONFIGS))
def test_count_equals_hf_reference_model(name):
    transformers = pytest.importorskip("transformers")
    model_cls, config_cls, kwargs = HF_CONFIGS[name]
    hf_cfg = getattr(transformers, config_cls)(**kwargs)
    with torch.device("meta"):
        hf_model = getattr(transformers, model_cls)(hf_cfg)
    # HF builds no MTP layer; DeepSeek-V3's routing bias is a buffer there, as it is here.
    hf_total = sum(p.numel() for p in hf_model.parameters())
    assert count_params(preset(name))["total"] == hf_total


# -- the formulas mirror the modules: meta-device build ---------------------------------------


def meta_counts(cfg: ModelConfig) -> tuple[int, int]:
    """(main model, MTP modules) parameter counts of the built model, nothing allocated."""
    with torch.device("meta"):
        model = Transformer(cfg)
    mtp = sum(p.numel() for p in model.mtp.parameters()) if model.mtp is not None else 0
    return sum(p.numel() for p in model.parameters()) - mtp, mtp


@pytest.mark.parametrize(
    "path", [f"{n}" for n in PRESETS] + [f"tiny/{n}" for n in TINY], ids=lambda p: p
)
def test_analytic_count_equals_meta_device_count(path):
    cfg = preset(path)
    counts = count_params(cfg)
    assert meta_counts(cfg) == (counts["total"], counts["mtp"])


def test_tiny_configs_keep_their_family_choices():
    g = preset("tiny/gemma3")
    local = [(i + 1) % g.attention.global_every != 0 for i in range(g.n_layers)]
    assert local == [True] * 5 + [False]
    assert g.attention.scale == pytest.approx(1 / math.sqrt(g.d_model / g.attention.n_heads))
    assert (g.norm.placement, g.norm.unit_offset, g.embed_scale, g.mlp.kind) == (
        "sandwich",
        True,
        True,
        "geglu",
    )
    big = preset("gemma3-27b")
    assert big.attention.scale == pytest.approx(168**-0.5, rel=1e-15)
    d = preset("tiny/deepseek-v3")
    assert (d.attention.kind, d.mtp.depth, d.moe.first_k_dense, d.moe.score) == (
        "mla",
        1,
        1,
        "sigmoid",
    )
    v2 = preset("tiny/deepseek-v2").moe
    assert (v2.score, v2.norm_topk_prob, v2.group_score) == ("softmax", False, "max")
    assert preset("tiny/smollm3").position.nope_layers == [3]
    assert preset("smollm3-3b").position.nope_layers == list(range(3, 36, 4))
    assert preset("tiny/olmo2").norm.placement == "reordered"
    assert preset("tiny/qwen2").attention.qkv_bias is True
    assert preset("tiny/mistral").attention.sliding_window == 16
    for name in TINY:
        cfg = preset(f"tiny/{name}")
        assert (cfg.vocab_size, cfg.d_model, cfg.max_seq_len) == (512, 64, 256), name
        assert 2 <= cfg.n_layers <= 6, name


@pytest.mark.parametrize(
    "path, overrides",
    [
        # Choices no preset combines: the formulas must follow the modules there too.
        ("tiny/gpt2", ["model.attention.qk_norm=full", "model.attention.n_kv_heads=2"]),
        ("tiny/gpt2", ["model.parallel_block=true"]),
        ("tiny/gpt2", ["model.norm.placement=post", "model.position.kind=none"]),
        ("tiny/qwen3", ["model.norm.kind=layernorm", "model.norm.placement=sandwich"]),
        ("tiny/deepseek-v3", ["model.attention.bias=true", "model.attention.q_lora_rank=0"]),
        ("tiny/deepseek-v3", ["model.mtp.depth=2", "model.moe.layer_freq=2", "model.n_layers=4"]),
        ("tiny/qwen3-moe", ["model.moe.shared_hidden=48", "model.moe.first_k_dense=1"]),
        ("tiny/llama", ["model.position.kind=alibi", "model.attention.qkv_bias=true"]),
    ],
)
def test_analytic_count_equals_meta_count_off_preset(path, overrides):
    cfg = load_config([str(REPO / f"configs/models/{path}.yaml")], overrides).model
    counts = count_params(cfg)
    assert meta_counts(cfg) == (counts["total"], counts["mtp"])
