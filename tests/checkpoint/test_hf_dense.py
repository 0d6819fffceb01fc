"""HuggingFace parity for Mistral, Qwen2, Qwen3, OLMo 2 and Gemma 3 (text).

Each family: an HF model from a small random config with non-default settings (RoPE bases,
epsilons, windows shorter than the sequence), saved as safetensors, imported, compared on logits
(``max |ours - ref| / max |ref| <= 1e-5`` in fp32), exported, reloaded by
``AutoModelForCausalLM`` and compared again. Then decoding with our KV cache must reproduce the
uncached logits step by step (the windows must hold under the cache) and the same greedy tokens.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from evoformer.checkpoint import load_model, save_checkpoint  # noqa: E402
from evoformer.checkpoint.hf import (  # noqa: E402
    FAMILIES,
    export_hf,
    family_for_model_config,
    import_hf,
    window_layout,
)
from evoformer.config import Config, load_config, to_yaml  # noqa: E402
from evoformer.config.schema import (  # noqa: E402
    AttentionConfig,
    MLPConfig,
    ModelConfig,
    NormConfig,
    PositionConfig,
    RopeScalingConfig,
)
from evoformer.errors import UserError  # noqa: E402
from evoformer.model import build_model  # noqa: E402
from evoformer.model.generate import generate  # noqa: E402
from tests.checkpoint.hf_testing import randomise, rel_err  # noqa: E402

TOL = 1e-5
SEQ = 48
VOCAB = 300
SMALL = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, max_position_embeddings=SEQ)


def _mistral():
    cfg = transformers.MistralConfig(
        **SMALL,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=3e-5,
        rope_theta=5000.0,
        sliding_window=10,
        tie_word_embeddings=False,
    )
    return transformers.MistralForCausalLM(cfg)


def _qwen2():
    # Window on the first of every two layers: layer_types maps onto global_every=2.
    cfg = transformers.Qwen2Config(
        **SMALL,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=2e-5,
        rope_theta=20000.0,
        use_sliding_window=True,
        sliding_window=12,
        max_window_layers=0,
        layer_types=["sliding_attention", "full_attention"] * 2,
        tie_word_embeddings=True,
    )
    return transformers.Qwen2ForCausalLM(cfg)


def _qwen3():
    # head_dim * heads != hidden_size, MQA, biases on all projections, linear RoPE scaling.
    cfg = transformers.Qwen3Config(
        **SMALL,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=24,
        rms_norm_eps=4e-6,
        attention_bias=True,
        rope_parameters={"rope_type": "linear", "factor": 3.0, "rope_theta": 30000.0},
    )
    return transformers.Qwen3ForCausalLM(cfg)


def _olmo2():
    cfg = transformers.Olmo2Config(
        **SMALL,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-5,
        rope_theta=40000.0,
        attention_bias=False,
        pad_token_id=0,
        eos_token_id=1,
    )
    return transformers.Olmo2ForCausalLM(cfg)


def _gemma3():
    # 6 layers = 5 local (window 8, RoPE base 5000) + 1 global (base 50000, linear scaling x2);
    # query_pre_attn_scalar differs from head_dim; heads * head_dim != hidden_size.
    cfg = transformers.Gemma3TextConfig(
        **SMALL,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=24,
        rms_norm_eps=1e-5,
        rope_theta=50000.0,
        rope_local_base_freq=5000.0,
        rope_scaling={"rope_type": "linear", "factor": 2.0},
        sliding_window=8,
        query_pre_attn_scalar=20,
    )
    return transformers.Gemma3ForCausalLM(cfg)


CASES = {
    "mistral": _mistral,
    "qwen2": _qwen2,
    "qwen3": _qwen3,
    "olmo2": _olmo2,
    "gemma3": _gemma3,
}


def _ids(seed: int, shape=(2, SEQ)) -> torch.Tensor:
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def _hf_model(case: str):
    torch.manual_seed(0)
    hf = CASES[case]().eval()
    randomise(hf, seed=1, norm_centre=0.0 if case == "gemma3" else 1.0)
    return hf


@pytest.mark.parametrize("case", list(CASES))
def test_import_export_round_trip(case: str, tmp_path: Path) -> None:
    hf = _hf_model(case)
    hf.save_pretrained(tmp_path / "hf", safe_serialization=True)
    window = getattr(hf.config, "sliding_window", None)
    assert window is None or window < SEQ  # the window really cuts the context
    ids = _ids(2)
    with torch.no_grad():
        ref = hf(input_ids=ids).logits

    out = import_hf(tmp_path / "hf", tmp_path / "ours")
    ours = load_model(out)
    with torch.no_grad():
        err = rel_err(ours(ids), ref)
    assert err <= TOL, f"{case} import: relative logit error {err:.2e}"
    assert load_config([str(out / "config.yaml")]).model == ours.cfg

    export_hf(out, tmp_path / "hf2")
    assert json.loads((tmp_path / "hf2" / "config.json").read_text())["model_type"] == (
        FAMILIES[case].model_type
    )
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf2").eval()
    assert type(back) is type(hf)
    with torch.no_grad():
        err = rel_err(back(input_ids=ids).logits, ref)
    assert err <= TOL, f"{case} export: relative logit error {err:.2e}"
    want = hf.state_dict()
    for name, t in back.state_dict().items():
        assert torch.equal(t, want[name]), name


def test_imported_configs_carry_each_family_choice(tmp_path: Path) -> None:
    got = {}
    for case in CASES:
        hf_cfg = json.loads(CASES[case]().config.to_json_string())
        got[case] = FAMILIES[case].to_model_config(hf_cfg)
    m, q2, q3, o2, g3 = (got[c] for c in CASES)
    assert (m.attention.sliding_window, m.attention.global_every) == (10, 0)
    assert (q2.attention.bias, q2.attention.qkv_bias) == (False, True)
    assert (q2.attention.sliding_window, q2.attention.global_every) == (12, 2)
    assert (q3.attention.qk_norm, q3.attention.head_dim, q3.attention.bias) == ("head", 24, True)
    assert q3.position.rope_scaling == RopeScalingConfig(kind="linear", factor=3.0)
    assert (o2.norm.placement, o2.attention.qk_norm) == ("reordered", "full")
    assert (g3.norm.placement, g3.norm.unit_offset, g3.embed_scale) == ("sandwich", True, True)
    assert (g3.attention.sliding_window, g3.attention.global_every) == (8, 6)
    assert g3.attention.scale == pytest.approx(20**-0.5)
    assert (g3.position.rope_theta, g3.position.local_rope_theta) == (50000.0, 5000.0)
    assert (g3.mlp.kind, g3.mlp.activation, g3.tie_embeddings) == ("geglu", "gelu_tanh", True)


def test_gemma3_layer_pattern_matches_hf() -> None:
    # HF's own layer_types for 14 layers and sliding_window_pattern=6 (the Gemma 3 default).
    cfg = transformers.Gemma3TextConfig(**SMALL, num_hidden_layers=14, head_dim=8)
    ours = FAMILIES["gemma3"].to_model_config(json.loads(cfg.to_json_string()))
    model = build_model(ours, seed=0)
    local = ["sliding_attention" if b.is_local else "full_attention" for b in model.layers]
    assert local == cfg.layer_types
    assert [b.attn.window for b in model.layers] == [
        cfg.sliding_window if t == "sliding_attention" else None for t in cfg.layer_types
    ]


# -- decoding with the KV cache ---------------------------------------------------------------


def _sharpen(model) -> None:
    """Scale the final norm so logits are far from ties: argmax cannot flip on rounding."""
    with torch.no_grad():
        w = model.norm.weight
        if model.norm.unit_offset:
            w.copy_(20 * (1 + w) - 1)
        else:
            w.mul_(20)


@pytest.mark.parametrize("case", list(CASES))
def test_kv_cache_decoding_matches_full_forward(case: str) -> None:
    hf_cfg = json.loads(CASES[case]().config.to_json_string())
    cfg = FAMILIES[case].to_model_config(hf_cfg)
    model = build_model(cfg, seed=3).eval()
    randomise(model, seed=4, norm_centre=0.0 if cfg.norm.unit_offset else 1.0)
    _sharpen(model)
    ids = _ids(5, (2, 40))
    with torch.no_grad():
        full = model(ids)
        # A 20-token prefill, a 5-token chunk, then one token at a time past every window.
        caches = model.new_caches(2, 40)
        steps = [model(ids[:, :20], caches), model(ids[:, 20:25], caches)]
        steps += [model(ids[:, t : t + 1], caches) for t in range(25, 40)]
    err = rel_err(torch.cat(steps, dim=1), full)
    assert err <= TOL, f"{case}: cached logits differ by {err:.2e}"

    prompt = ids[0, :16].tolist()
    cached = generate(model, prompt, 28, temperature=0.0, use_cache=True)
    uncached = generate(model, prompt, 28, temperature=0.0, use_cache=False)
    assert len(cached) == 28 and cached == uncached


# -- layouts and refusals ---------------------------------------------------------------------


def test_window_layouts() -> None:
    S, F = "sliding_attention", "full_attention"
    assert window_layout("x", [S] * 4, 16) == (16, 0)
    assert window_layout("x", [F] * 4, 16) == (None, 0)
    assert window_layout("x", [S] * 4, None) == (None, 0)
    assert window_layout("x", [S, S, F, S, S, F, S], 8) == (8, 3)
    with pytest.raises(UserError, match="layer_types=FFSS"):
        window_layout("qwen2", [F, F, S, S], 8)  # Qwen's max_window_layers=2 layout


def test_qwen_first_layers_full_is_refused() -> None:
    cfg = transformers.Qwen2Config(
        **SMALL,
        num_hidden_layers=4,
        num_attention_heads=4,
        use_sliding_window=True,
        sliding_window=8,
        max_window_layers=2,
    )
    hf_cfg = json.loads(cfg.to_json_string())
    with pytest.raises(UserError, match=r"qwen2: layer_types=FFSS.*cannot be expressed"):
        FAMILIES["qwen2"].to_model_config(hf_cfg)
    # use_sliding_window=false (the default) means no window, whatever the other keys say.
    plain = FAMILIES["qwen2"].to_model_config({**hf_cfg, "use_sliding_window": False})
    assert plain.attention.sliding_window is None


@pytest.mark.parametrize(
    "key, value",
    [
        ("final_logit_softcapping", 30.0),
        ("attn_logit_softcapping", 50.0),
        ("use_bidirectional_attention", True),
    ],
)
def test_gemma3_refuses_what_it_cannot_compute(key: str, value, tmp_path: Path) -> None:
    hf = _gemma3()
    hf.save_pretrained(tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    cfg[key] = value
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match=f"gemma3: {key}"):
        import_hf(tmp_path / "hf", tmp_path / "out")


def test_gemma3_legacy_config_keys() -> None:
    # transformers 4 files: rope_theta / rope_local_base_freq / sliding_window_pattern.
    legacy = {
        "model_type": "gemma3_text",
        "vocab_size": VOCAB,
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 8,
        "num_attention_heads": 4,
        "num_key_value_heads": 1,
        "head_dim": 16,
        "max_position_embeddings": SEQ,
        "rope_theta": 80000.0,
        "rope_local_base_freq": 8000.0,
        "sliding_window_pattern": 4,
        "sliding_window": 12,
        "query_pre_attn_scalar": 16,
    }
    m = FAMILIES["gemma3"].to_model_config(legacy)
    assert (m.attention.sliding_window, m.attention.global_every) == (12, 4)
    assert (m.position.rope_theta, m.position.local_rope_theta) == (80000.0, 8000.0)
    assert m.attention.scale is None  # query_pre_attn_scalar == head_dim


def _save_evo(cfg: ModelConfig, run: Path):
    model = build_model(cfg, seed=1).eval()
    randomise(model, seed=2, norm_centre=0.0 if cfg.norm.unit_offset else 1.0)
    full = Config(model=cfg)
    full.train.seq_len = SEQ
    save_checkpoint(run / "checkpoints", 1, model, None, {}, to_yaml(full))
    return model


def _gemma_like(**attention) -> ModelConfig:
    return ModelConfig(
        vocab_size=VOCAB,
        d_model=64,
        n_layers=3,
        max_seq_len=SEQ,
        tie_embeddings=True,
        norm=NormConfig(kind="rmsnorm", eps=1e-6, placement="sandwich", unit_offset=True),
        position=PositionConfig(
            kind="rope", rope_theta=10000.0, rope_scaling=RopeScalingConfig("linear", 4.0)
        ),
        attention=AttentionConfig(n_heads=4, n_kv_heads=2, qk_norm="head", **attention),
        mlp=MLPConfig(kind="geglu", hidden=128),
        embed_scale=True,
    )


@pytest.mark.parametrize(
    "attention",
    [
        # local layers without their own base: they share the global (scaled) RoPE.
        dict(sliding_window=6, global_every=3),
        # no window at all: HF still needs one in its config, every layer full.
        dict(),
    ],
)
def test_export_evoformer_gemma_variants(attention: dict, tmp_path: Path) -> None:
    cfg = _gemma_like(**attention)
    model = _save_evo(cfg, tmp_path / "run")
    assert family_for_model_config(cfg).name == "gemma3"
    export_hf(tmp_path / "run", tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = _ids(7)
    with torch.no_grad():
        err = rel_err(hf(input_ids=ids).logits, model(ids))
    assert err <= TOL, f"relative logit error {err:.2e}"


def test_export_refusals(tmp_path: Path) -> None:
    cfg = _gemma_like(sliding_window=6, global_every=3, scale=0.3)  # 1/0.3^2 is no integer
    _save_evo(cfg, tmp_path / "a")
    with pytest.raises(UserError, match="query_pre_attn_scalar must be an integer"):
        export_hf(tmp_path / "a", tmp_path / "hf_a", family="gemma3")
    # Mistral has one window for every layer: a local/global pattern is refused by name.
    mistral = FAMILIES["mistral"].to_model_config(json.loads(_mistral().config.to_json_string()))
    mistral.attention.global_every = 2
    _save_evo(mistral, tmp_path / "b")
    with pytest.raises(UserError, match=r"mistral: model\.attention\.global_every=2"):
        export_hf(tmp_path / "b", tmp_path / "hf_b", family="mistral")
    # ...but Qwen2's layer_types can hold it, once the biases match.
    mistral.attention.qkv_bias = True
    assert family_for_model_config(mistral).name == "qwen2"


def test_family_auto_selection() -> None:
    for case in CASES:
        cfg = FAMILIES[case].to_model_config(json.loads(CASES[case]().config.to_json_string()))
        assert family_for_model_config(cfg).name == case
