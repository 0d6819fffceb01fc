"""FLOPs per token and KV-cache bytes on tiny configs, against numbers worked out by hand.

Each expected value is written as the arithmetic that produces it, from the YAML's shapes, so a
reader can check it without running the code under test.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from evoformer.cli import main
from evoformer.config import load_config
from evoformer.model.costs import (
    count_params,
    flops_per_token,
    kv_cache_bytes_per_token,
    mean_context,
    train_flops_per_token,
)
from tests.conftest import REPO


def tiny(name: str):
    return load_config([str(REPO / f"configs/models/tiny/{name}.yaml")]).model


def test_mean_context_over_the_causal_triangle():
    # Query t (1-based) sees t keys: 1 + 2 + 3 + 4 = 10 over 4 queries.
    assert mean_context(4) == 10 / 4
    # Window 2: the queries see 1, 2, 2, 2 keys.
    assert mean_context(4, window=2) == 7 / 4
    # A window as long as the sequence changes nothing; window 1 sees only itself.
    assert mean_context(4, window=4) == mean_context(4) and mean_context(9, window=1) == 1


# tiny/mistral: V 512, d 64, 2 layers, 4 heads / 2 KV heads of 16, SwiGLU 176, untied, window 16.
MISTRAL_LAYER_MATMUL = 64 * 64 + 64 * 32 + 64 * 32 + 64 * 64 + 3 * 64 * 176  # q k v o + mlp
MISTRAL_HEAD = 512 * 64


def test_dense_sliding_window_flops():
    f = flops_per_token(tiny("mistral"), seq_len=256)
    assert f["matmul"] == 2 * (2 * MISTRAL_LAYER_MATMUL + MISTRAL_HEAD) == 249_856
    # Keys per query at T=256, window 16: queries 1..16 see 1..16 (136), 240 more see 16 each.
    ctx = (136 + 240 * 16) / 256
    # QK^T + AV: 2 FLOPs per multiply-add, 4 heads x (16 + 16) dims per key, 2 layers.
    assert f["attention"] == 2 * 2 * 4 * (16 + 16) * ctx == 7_952
    assert f["inference"] == 249_856 + 7_952
    assert f["training"] == 3 * (249_856 + 7_952) == 773_424
    assert f["mtp"] == 0
    assert train_flops_per_token(tiny("mistral"), 256) == f["training"]
    # Without the window (tiny/llama has the same shapes) every query sees (T + 1) / 2 keys.
    assert flops_per_token(tiny("llama"), 256)["attention"] == 2 * 2 * 4 * 32 * 128.5 == 65_792


def test_dense_sliding_window_kv_cache():
    kv = kv_cache_bytes_per_token(tiny("mistral"), dtype_bytes=2)
    per_layer = 2 * 2 * 16 * 2  # K and V, 2 KV heads of 16, bf16
    assert kv["per_token"] == 2 * per_layer == 256
    # At max_seq_len 256 each layer holds only its 16-token window.
    assert (kv["context_len"], kv["at_context"]) == (256, 2 * per_layer * 16) == (256, 4_096)
    assert kv["window_layers"] == 2 and kv["window"] == 16
    # Below the window nothing is capped; fp32 doubles everything.
    kv8 = kv_cache_bytes_per_token(tiny("mistral"), dtype_bytes=4, context_len=8)
    assert kv8["at_context"] == 2 * (2 * 2 * 16 * 4) * 8 == 4_096


def test_local_global_pattern_flops_and_kv_cache():
    # tiny/gemma3: 6 layers, layers 0-4 local (window 8), layer 5 global; 4 heads / 2 KV heads
    # of 32; GeGLU 128; tied head.
    cfg = tiny("gemma3")
    per_key = 2 * 4 * (32 + 32)  # FLOPs per key attended to, one layer
    local_ctx = (8 * 9 / 2 + (256 - 8) * 8) / 256  # = 2020 / 256
    f = flops_per_token(cfg, 256)
    assert f["attention"] == 5 * per_key * local_ctx + per_key * 128.5 == 20_200 + 65_792
    layer = 64 * 128 + 64 * 64 + 64 * 64 + 128 * 64 + 3 * 64 * 128  # q k v o + GeGLU
    assert f["matmul"] == 2 * (6 * layer + 512 * 64) == 2 * (6 * 49_152 + 32_768)
    kv = kv_cache_bytes_per_token(cfg)
    per_layer = 2 * 2 * 32 * 2
    assert kv["per_token"] == 6 * per_layer == 1_536
    assert kv["at_context"] == 5 * per_layer * 8 + per_layer * 256 == 75_776
    assert kv["window_layers"] == 5


# tiny/deepseek-v3: V 512, d 64, 3 layers (0 dense, 1-2 MoE), MLA with 4 heads, q rank 32,
# kv rank 16, qk 16 + 8, v 16; experts 8 x SwiGLU 32, top-2, 1 shared; dense SwiGLU 176; MTP 1.
MLA = 64 * 32 + 32 * 4 * 24 + 64 * (16 + 8) + 16 * 4 * (16 + 16) + 4 * 16 * 64  # matmuls
EXPERT = 3 * 64 * 32
ROUTER = 64 * 8


def test_mla_moe_mtp_parameter_counts():
    p = count_params(tiny("deepseek-v3"))
    norms = 2 * 64  # per block
    dense = MLA + 32 + 16 + 3 * 64 * 176 + norms  # + q and kv latent norms
    moe = MLA + 32 + 16 + ROUTER + 8 * EXPERT + EXPERT + norms
    moe_active = MLA + 32 + 16 + ROUTER + 2 * EXPERT + EXPERT + norms
    assert p["total"] == 2 * 512 * 64 + dense + 2 * moe + 64 == 249_936
    assert p["active"] == 2 * 512 * 64 + dense + 2 * moe_active + 64 == 176_208
    assert p["non_embedding"] == p["total"] - 2 * 512 * 64
    # MTP: 3 norms + the 2d -> d projection + one MoE block; embedding and head are shared.
    assert p["mtp"] == 3 * 64 + 128 * 64 + moe == 77_168


def test_mla_moe_mtp_flops_and_kv_cache():
    cfg = tiny("deepseek-v3")
    f = flops_per_token(cfg, 256)
    per_layer_attn = 2 * 4 * (24 + 16) * 128.5  # qk 16 + 8 dims, v 16 dims
    assert f["attention"] == 3 * per_layer_attn == 123_360
    dense, moe = MLA + 3 * 64 * 176, MLA + ROUTER + 3 * EXPERT  # top-2 + shared
    assert f["matmul"] == 2 * (dense + 2 * moe + 512 * 64) == 285_696
    # MTP forward: projection + one MoE block + the shared head again + its attention.
    assert f["mtp"] == 2 * (128 * 64 + moe) + 2 * 512 * 64 + per_layer_attn == 186_528
    assert f["training"] == 3 * (285_696 + 123_360 + 186_528) == 1_786_752
    kv = kv_cache_bytes_per_token(cfg)
    assert kv["per_token"] == 3 * (16 + 8) * 2 == 144  # latent + shared RoPE key per layer
    assert kv["at_context"] == 144 * 256


def test_kv_cache_of_real_shapes():
    # Llama 3 8B: 32 layers x K,V x 8 heads x 128 x bf16 = 128 KiB per token.
    llama = load_config([str(REPO / "configs/models/llama3-8b.yaml")]).model
    assert kv_cache_bytes_per_token(llama)["per_token"] == 32 * 2 * 8 * 128 * 2 == 131_072
    # DeepSeek-V3: 61 layers x (512 + 64) x bf16 = 70,272 bytes per token.
    ds = load_config([str(REPO / "configs/models/deepseek-v3-671b.yaml")]).model
    assert kv_cache_bytes_per_token(ds)["per_token"] == 61 * 576 * 2 == 70_272
    # Mistral 7B at 32k: every layer capped at its 4,096-token window.
    mistral = load_config([str(REPO / "configs/models/mistral-7b.yaml")]).model
    kv = kv_cache_bytes_per_token(mistral, context_len=32_768)
    assert kv["at_context"] == 32 * 2 * 8 * 128 * 2 * 4_096 == 512 * 2**20


def test_inspect_cli_prints_the_numbers(capsys):
    assert main(["inspect", str(REPO / "configs/models/tiny/deepseek-v3.yaml")]) == 0
    out = capsys.readouterr().out
    for text in [
        "249,936 total",  # parameters
        "176,208",  # active
        "77,168",  # MTP
        "1,786,752",  # training FLOPs per token at seq 256
        "409,056",  # inference FLOPs per token
        "144 B",  # KV cache per token
        "36,864 B",  # KV cache at max_seq_len 256
    ]:
        assert text in out, text
    assert main(["inspect", str(REPO / "configs/models/tiny/gemma3.yaml"), "train.seq_len=64"]) == 0
    out = capsys.readouterr().out
    assert "(seq 64)" in out and "75,776 B" in out and "5 layers capped at window 8" in out


@pytest.mark.parametrize("name", ["llama", "gpt2", "qwen2", "olmo2"])
def test_dense_models_are_fully_active(name):
    p = count_params(tiny(name))
    assert p["active"] == p["total"] and p["mtp"] == 0


def test_architecture_tables_in_docs_are_current():
    # docs/architectures.md embeds tools/arch_table.py's output; a stale copy fails here.
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools/arch_table.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr


def test_hybrid_decoding_state_at_32k():
    """A hybrid's decoding memory is mostly a constant state: Qwen3-Next-80B keeps K/V in its
    12 attention layers only (12 x 2 x 2 heads x 256 x bf16 per token) plus, per DeltaNet
    layer, 3 conv taps of 8,192 channels (bf16) and 32 fp32 states of 128 x 128."""
    q = load_config([str(REPO / "configs/models/qwen3-next-80b-a3b.yaml")]).model
    kv = kv_cache_bytes_per_token(q, context_len=32_768)
    state = 36 * (3 * 8_192 * 2 + 32 * 128 * 128 * 4)
    assert kv["state"] == state == 77_266_944 and kv["recurrent_layers"] == 36
    assert kv["per_token"] == 12 * 2 * 2 * 256 * 2 == 24_576
    assert kv["at_context"] == 24_576 * 32_768 + state
    # Nemotron-H-8B: 4 attention layers; 24 Mamba-2 layers of 3 conv taps over 10,240 channels
    # and 128 fp32 states of 64 x 128.
    n = load_config([str(REPO / "configs/models/nemotron-h-8b.yaml")]).model
    kv = kv_cache_bytes_per_token(n, context_len=32_768)
    assert kv["state"] == 24 * (3 * 10_240 * 2 + 128 * 64 * 128 * 4) == 102_137_856
    assert kv["per_token"] == 4 * 2 * 8 * 128 * 2 == 16_384
    f = flops_per_token(n, 4096)
    attn = 4 * 2 * 32 * 256 * (4096 + 1) / 2
    assert f["attention"] == attn + 24 * 4 * 128 * 64 * 128  # + the SSM recurrence


def test_inspect_cli_shows_the_hybrid_state(capsys):
    assert main(["inspect", str(REPO / "configs/models/tiny/qwen3-next.yaml")]) == 0
    out = capsys.readouterr().out
    assert "3 DeltaNet + 1 attention" in out and "recurrent state (3 layers)" in out
