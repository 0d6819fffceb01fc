"""HuggingFace parity of the MoE families: import HF Mixtral / Qwen3-MoE / DeepSeek-V3, compare
logits, export back, compare again; DeepSeek-V3's MTP module against HF's ``MtpModel``.

Metric: ``max |ours - ref| / max |ref|`` over the logits of a random [2, 40] batch in fp32, which
must stay <= 1e-5. Every weight is randomised (norm gains, the router's selection bias
included) so a mis-mapped tensor cannot hide behind an init of ones or zeros.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from safetensors.torch import load_file, save_file  # noqa: E402

from evoformer.checkpoint import load_model, save_checkpoint  # noqa: E402
from evoformer.checkpoint.hf import FAMILIES, export_hf, import_hf  # noqa: E402
from evoformer.config import Config, to_yaml  # noqa: E402
from evoformer.config.schema import (  # noqa: E402
    AttentionConfig,
    MLPConfig,
    ModelConfig,
    MoEConfig,
    MTPConfig,
)
from evoformer.errors import UserError  # noqa: E402
from evoformer.model import build_model  # noqa: E402
from tests.checkpoint.hf_testing import randomise, rel_err  # noqa: E402

TOL = 1e-5
SEQ = 40


def _ids(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, SEQ), generator=torch.Generator().manual_seed(2))


def _mixtral():
    cfg = transformers.MixtralConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=6,
        num_experts_per_tok=3,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
    )
    return transformers.MixtralForCausalLM(cfg)


def _qwen3_moe():
    # Layer 0 dense (mlp_only_layers), unnormalised top-k probabilities, explicit head_dim.
    cfg = transformers.Qwen3MoeConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=96,
        moe_intermediate_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=24,
        num_experts=6,
        num_experts_per_tok=2,
        mlp_only_layers=[0],
        norm_topk_prob=False,
        max_position_embeddings=64,
    )
    return transformers.Qwen3MoeForCausalLM(cfg)


def _deepseek_config(q_lora_rank: int | None, **extra) -> transformers.DeepseekV3Config:
    # 8 experts in 2 groups (1 kept per token), 3 per token, first layer dense, interleaved RoPE.
    return transformers.DeepseekV3Config(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=96,
        moe_intermediate_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=4,
        n_routed_experts=8,
        num_experts_per_tok=3,
        n_group=2,
        topk_group=1,
        first_k_dense_replace=1,
        q_lora_rank=q_lora_rank,
        kv_lora_rank=16,
        qk_rope_head_dim=8,
        qk_nope_head_dim=16,
        v_head_dim=12,
        routed_scaling_factor=2.5,
        max_position_embeddings=64,
        rope_interleave=True,
        **extra,
    )


def _deepseek_q_lora():
    return transformers.DeepseekV3ForCausalLM(_deepseek_config(32, n_shared_experts=2))


def _deepseek_full_q():
    return transformers.DeepseekV3ForCausalLM(_deepseek_config(None, attention_bias=True))


def _deepseek_yarn():
    # YaRN beyond the original context (16 < 40 tokens): rotary attention factor and DeepSeek's
    # extra softmax gain mscale(factor, mscale_all_dim)^2 both differ from 1.
    rope = {
        "rope_type": "yarn",
        "factor": 4.0,
        "rope_theta": 10000.0,
        "mscale": 1.0,
        "mscale_all_dim": 0.707,
        "original_max_position_embeddings": 16,
        "beta_fast": 32,
        "beta_slow": 1,
    }
    return transformers.DeepseekV3ForCausalLM(_deepseek_config(32, rope_parameters=rope))


CASES = {
    "mixtral": _mixtral,
    "qwen3_moe": _qwen3_moe,
    "deepseek_v3_q_lora": _deepseek_q_lora,
    "deepseek_v3_full_q": _deepseek_full_q,
    "deepseek_v3_yarn": _deepseek_yarn,
}


@pytest.mark.parametrize("case", list(CASES))
def test_import_export_round_trip(case: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    hf = CASES[case]().eval()
    randomise(hf, seed=1)
    hf.save_pretrained(tmp_path / "hf")
    ids = _ids(hf.config.vocab_size)
    with torch.no_grad():
        ref = hf(input_ids=ids).logits

    out = import_hf(tmp_path / "hf", tmp_path / "ours")
    ours = load_model(out)
    with torch.no_grad():
        err = rel_err(ours(ids), ref)
    assert err <= TOL, f"import: relative logit error {err:.2e}"
    assert ours.cfg.mtp.depth == 0  # DeepSeek's config counts an MTP layer the files lack

    export_hf(out, tmp_path / "hf2")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf2").eval()
    assert type(back) is type(hf)
    with torch.no_grad():
        err = rel_err(back(input_ids=ids).logits, ref)
    assert err <= TOL, f"export: relative logit error {err:.2e}"
    # Conversion only renames, slices, stacks and permutes: the weights come back bit-identical.
    want = hf.state_dict()
    for name, t in back.state_dict().items():
        assert torch.equal(t, want[name]), name


def _write_mtp_layer(hf, mtp, path: Path) -> None:
    """Add HF ``MtpModel`` weights to a saved DeepSeek-V3 folder in DeepSeek's layout: module k
    as decoder layer n_layers + k, experts per matrix, copies of the embedding and head."""
    st = load_file(path)
    n, H = hf.config.num_hidden_layers, hf.config.moe_intermediate_size
    for name, t in mtp.layers.state_dict().items():
        k, rest = name.split(".", 1)
        pre = f"model.layers.{n + int(k)}."
        rest = rest.removeprefix("mtp_block.").replace("post_norm.", "shared_head.norm.")
        if rest.endswith("experts.gate_up_proj"):
            base = pre + rest.removesuffix("gate_up_proj")
            for e in range(t.shape[0]):
                st[f"{base}{e}.gate_proj.weight"] = t[e, :H].clone()
                st[f"{base}{e}.up_proj.weight"] = t[e, H:].clone()
        elif rest.endswith("experts.down_proj"):
            base = pre + rest.removesuffix("down_proj")
            for e in range(t.shape[0]):
                st[f"{base}{e}.down_proj.weight"] = t[e].clone()
        else:
            st[pre + rest] = t.clone()
    st[f"model.layers.{n}.embed_tokens.weight"] = hf.model.embed_tokens.weight.detach().clone()
    st[f"model.layers.{n}.shared_head.head.weight"] = hf.lm_head.weight.detach().clone()
    save_file(st, str(path), metadata={"format": "pt"})


def test_deepseek_mtp_matches_hf_mtp_model(tmp_path: Path) -> None:
    """HF's ``MtpModel`` (what ``generate(use_mtp=True)`` drafts with) against our MTP module:
    it reads the main model's normalised last hidden state and the next token's embedding."""
    from transformers.modeling_layers import MtpModel

    torch.manual_seed(0)
    hf = transformers.DeepseekV3ForCausalLM(_deepseek_config(32, num_nextn_predict_layers=1)).eval()
    randomise(hf, seed=1)
    mtp = MtpModel(hf, 1).eval()
    randomise(mtp.layers, seed=5)
    hf.save_pretrained(tmp_path / "hf")
    _write_mtp_layer(hf, mtp, tmp_path / "hf" / "model.safetensors")

    ids = _ids(hf.config.vocab_size)
    with torch.no_grad():
        h = hf(input_ids=ids, output_hidden_states=True).hidden_states[-1]
        positions = torch.arange(SEQ - 1)[None]
        drafted = mtp.forward_layer(0, h[:, :-1], positions, None, input_ids=ids[:, 1:])
        ref = mtp._project_to_logits(drafted)

    out = import_hf(tmp_path / "hf", tmp_path / "ours")
    ours = load_model(out)
    assert ours.cfg.mtp.depth == 1
    with torch.no_grad():
        assert rel_err(ours(ids), hf(input_ids=ids).logits) <= TOL
        got = ours.mtp.logits(ours.hidden_states(ids), ids, ours)[0]
    err = rel_err(got, ref)
    assert err <= TOL, f"MTP: relative logit error {err:.2e}"

    # Export carries the MTP layer back bit-identically; HF's causal LM loads the folder.
    export_hf(out, tmp_path / "hf2")
    written = load_file(tmp_path / "hf" / "model.safetensors")
    exported = load_file(tmp_path / "hf2" / "model.safetensors")
    assert set(exported) == set(written)
    for name, t in written.items():
        assert torch.equal(exported[name], t), name
    assert (
        json.loads((tmp_path / "hf2" / "config.json").read_text())["num_nextn_predict_layers"] == 1
    )
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf2").eval()
    with torch.no_grad():
        assert rel_err(back(input_ids=ids).logits, hf(input_ids=ids).logits) <= TOL


def test_mtp_copies_must_agree(tmp_path: Path) -> None:
    hf = transformers.DeepseekV3ForCausalLM(_deepseek_config(32)).eval()
    randomise(hf, seed=1)
    mtp = transformers.modeling_layers.MtpModel(hf, 1)
    hf.save_pretrained(tmp_path / "hf")
    path = tmp_path / "hf" / "model.safetensors"
    _write_mtp_layer(hf, mtp, path)
    st = load_file(path)
    st["model.layers.3.embed_tokens.weight"] += 1.0
    save_file(st, str(path), metadata={"format": "pt"})
    with pytest.raises(UserError, match="should hold the same weights"):
        import_hf(tmp_path / "hf", tmp_path / "ours")


def _deepseek_style_evoformer() -> ModelConfig:
    return ModelConfig(
        vocab_size=128,
        d_model=64,
        n_layers=2,
        max_seq_len=SEQ,
        tie_embeddings=False,
        attention=AttentionConfig(
            kind="mla",
            n_heads=4,
            q_lora_rank=16,
            kv_lora_rank=16,
            qk_nope_head_dim=8,
            qk_rope_head_dim=8,
            v_head_dim=8,
        ),
        mlp=MLPConfig(kind="swiglu", hidden=80),
        moe=MoEConfig(
            num_experts=4,
            top_k=2,
            expert_hidden=16,
            shared_hidden=32,
            score="sigmoid",
            n_groups=2,
            topk_groups=2,
            first_k_dense=1,
            routed_scaling=1.5,
            bias_update_rate=0.001,
            aux_loss_coef=0.01,
        ),
        mtp=MTPConfig(depth=1, loss_weight=0.5),
    )


def _mixtral_style_evoformer() -> ModelConfig:
    # expert_hidden left 0: the experts take mlp.hidden, which no dense layer uses.
    return ModelConfig(
        vocab_size=128,
        d_model=64,
        n_layers=2,
        max_seq_len=SEQ,
        attention=AttentionConfig(n_heads=4, n_kv_heads=2),
        mlp=MLPConfig(kind="swiglu", hidden=32),
        moe=MoEConfig(num_experts=4, top_k=2),
    )


@pytest.mark.parametrize("kind", ["deepseek_v3", "mixtral"])
def test_export_evoformer_model(kind: str, tmp_path: Path) -> None:
    """A model configured (and trained: non-zero router biases) in evoformer exports; its
    training-only settings (aux weight, bias rate, MTP weight) do not block the export."""
    cfg = _deepseek_style_evoformer() if kind == "deepseek_v3" else _mixtral_style_evoformer()
    model = build_model(cfg, seed=7).eval()
    randomise(model, seed=3)
    full = Config(model=cfg)
    full.train.seq_len = SEQ
    save_checkpoint(tmp_path / "run" / "checkpoints", 1, model, None, {}, to_yaml(full))
    export_hf(tmp_path / "run", tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(hf).__name__ == FAMILIES[kind].architectures[0]
    ids = _ids(cfg.vocab_size)
    with torch.no_grad():
        ref = model(ids)
        assert rel_err(hf(input_ids=ids).logits, ref) <= TOL
        again = load_model(import_hf(tmp_path / "hf", tmp_path / "again"))
        assert rel_err(again(ids), ref) <= TOL
    assert again.cfg.mtp.depth == cfg.mtp.depth


def test_unsupported_choices_are_named(tmp_path: Path) -> None:
    hf = transformers.DeepseekV3ForCausalLM(_deepseek_config(32))
    hf.save_pretrained(tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "longrope", "rope_theta": 10000.0, "factor": 4.0}
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="rope_type='longrope'"):
        import_hf(tmp_path / "hf", tmp_path / "out")

    qwen = json.loads(_qwen3_moe().config.to_json_string())
    qwen["mlp_only_layers"] = [1]  # MoE on layers 0 and 2 only: not every N-th from some k
    with pytest.raises(UserError, match="MoE layers"):
        FAMILIES["qwen3_moe"].to_model_config(qwen)

    # Mixtral has no router bias to hold what aux-loss-free balancing learned.
    evo = _mixtral_style_evoformer()
    evo.moe.bias_update_rate = 0.001
    with pytest.raises(UserError, match="bias_update_rate"):
        FAMILIES["mixtral"].to_hf_config(evo)
