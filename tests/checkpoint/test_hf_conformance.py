"""Conformance with published ``config.json`` files: one per family, as released (every key
kept: nulls, RoPE scaling, layer patterns, MoE balancing, quantization_config), sizes shrunk
(widths, layers, vocabulary, context lengths, windows, FP8 block size) so the test runs in
seconds. Sources are named in ``configs/README.md``.

Each case: the HF model built from the file with random weights, saved with the published
``config.json`` itself (not HF's re-serialisation), imported, logits compared at a length beyond
every window (<= 1e-5 relative, fp32), exported, reloaded by transformers and compared again;
then the exported config must mean what the published one means (per-layer windows, KV heads,
head width, RoPE, layer pattern) and HF's own transformers-5 re-serialisation
(``rope_parameters``) must import as the same model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")

from safetensors.torch import load_file, save_file  # noqa: E402

from evoformer.checkpoint import load_model  # noqa: E402
from evoformer.checkpoint.hf import FAMILIES, export_hf, import_hf  # noqa: E402
from evoformer.checkpoint.hf.convert import convert_from_hf  # noqa: E402
from evoformer.errors import UserError  # noqa: E402
from evoformer.model.layout import layer_plan  # noqa: E402
from tests.checkpoint.hf_testing import randomise, rel_err  # noqa: E402
from tests.checkpoint.mxfp4_testing import write_mxfp4  # noqa: E402

TOL = 1e-5
SEQ = 40  # beyond every (shrunk) window: 16
CONFIGS = Path(__file__).parent / "configs"
CASES = [p.stem for p in sorted(CONFIGS.glob("*.json"))]


def published(case: str) -> dict[str, Any]:
    return json.loads((CONFIGS / f"{case}.json").read_text())


# model_types transformers has no class for -> the HF class their files run as.
HF_MODEL_TYPE = {"kimi_k2": "deepseek_v3"}  # Moonshot's own advice for engines without kimi_k2


def _hf_config(raw: dict[str, Any]):
    raw = {k: v for k, v in raw.items() if k != "quantization_config"}  # weights written below
    raw["model_type"] = HF_MODEL_TYPE.get(raw["model_type"], raw["model_type"])
    if raw["model_type"] == "mistral3":
        # transformers 5 ties the head on the wrapper (its Mistral3Config default: true); the
        # file, written by 4.50, means its text model's own setting, which import follows.
        raw.setdefault("tie_word_embeddings", raw["text_config"].get("tie_word_embeddings", False))
    return transformers.AutoConfig.for_model(**raw)


def _quantize_fp8(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek's block quantization (amax / 448 per zero-padded block), for the test files."""
    bm, bn = block
    M, N = w.shape
    gm, gn = -(-M // bm), -(-N // bn)
    padded = torch.zeros(gm * bm, gn * bn)
    padded[:M, :N] = w
    scale = padded.view(gm, bm, gn, bn).abs().amax(dim=(1, 3)).clamp(min=1e-12) / 448.0
    q = (padded.view(gm, bm, gn, bn) / scale[:, None, :, None]).view(gm * bm, gn * bn)
    return q[:M, :N].to(torch.float8_e4m3fn), scale


def _reference_dequant(q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]):
    """The published definition, block by block: fp32 values times the block's scale, in the
    reference's output dtype (bf16)."""
    out = torch.empty(q.shape, dtype=torch.bfloat16)
    bm, bn = block
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            rows, cols = slice(i * bm, (i + 1) * bm), slice(j * bn, (j + 1) * bn)
            out[rows, cols] = (q[rows, cols].to(torch.float32) * scale[i, j]).to(torch.bfloat16)
    return out


def _write_fp8(root: Path, block: tuple[int, int]):
    """Quantize the projection weights of the saved file as DeepSeek ships them; the HF
    reference model is reloaded from the reference dequantization of exactly those values."""
    path = root / "hf" / "model.safetensors"
    st = load_file(path)
    ref = dict(st)
    for name in [n for n in st if n.endswith("_proj.weight") and st[n].ndim == 2]:
        q, scale = _quantize_fp8(st[name], block)
        st[name], st[name.removesuffix("weight") + "weight_scale_inv"] = q, scale
        ref[name] = _reference_dequant(q, scale, block).float()
    save_file(st, str(path), metadata={"format": "pt"})
    return _write_reference(root, ref)


def _write_reference(root: Path, ref: dict[str, torch.Tensor]):
    """The HF reference model, reloaded from the dequantized weights ``ref``."""
    (root / "ref").mkdir()
    (root / "ref" / "config.json").write_text((root / "hf5.json").read_text())
    save_file(ref, str(root / "ref" / "model.safetensors"), metadata={"format": "pt"})
    return transformers.AutoModelForCausalLM.from_pretrained(
        root / "ref", dtype=torch.float32
    ).eval()


@pytest.fixture(scope="module", params=CASES)
def imported(request, tmp_path_factory):
    """(case, HF model, ids, reference logits, import folder, conversion)."""
    case = request.param
    raw = published(case)
    torch.manual_seed(0)
    arch = getattr(transformers, raw["architectures"][0])
    hf = arch(_hf_config(raw)).eval()
    text_type = (raw.get("text_config") or raw)["model_type"]
    randomise(hf, seed=1, norm_centre=0.0 if text_type == "gemma3_text" else 1.0)
    root = tmp_path_factory.mktemp(case)
    hf.save_pretrained(root / "hf")
    (root / "hf5.json").write_text((root / "hf" / "config.json").read_text())
    (root / "hf" / "config.json").write_text(json.dumps(raw))  # the file as published
    if raw.get("quantization_config", {}).get("quant_method") == "mxfp4":
        hf = _write_reference(root, write_mxfp4(root / "hf" / "model.safetensors"))
    elif "quantization_config" in raw:
        hf = _write_fp8(root, tuple(raw["quantization_config"]["weight_block_size"]))
    vocab = (raw.get("text_config") or raw)["vocab_size"]
    ids = torch.randint(0, vocab, (2, SEQ), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = hf(input_ids=ids).logits.float()
    conversion = convert_from_hf(root / "hf", root / "ours")
    return case, hf, ids, ref, root, conversion


def test_import_export_logits(imported) -> None:
    case, hf, ids, ref, root, _ = imported
    ours = load_model(root / "ours")
    with torch.no_grad():
        err = rel_err(ours(ids), ref)
    assert err <= TOL, f"{case} import: relative logit error {err:.2e}"
    export_hf(root / "ours", root / "back")
    back = transformers.AutoModelForCausalLM.from_pretrained(
        root / "back", dtype=torch.float32
    ).eval()
    with torch.no_grad():
        err = rel_err(back(input_ids=ids).logits.float(), ref)
    assert err <= TOL, f"{case} export: relative logit error {err:.2e}"


def _windows(c) -> list[int | None]:
    n = getattr(c, "num_hidden_layers", None) or c.n_layer
    window = getattr(c, "sliding_window", None)
    if getattr(c, "use_sliding_window", True) is False:
        window = None
    types = getattr(c, "layer_types", None)
    if types is None:
        return [window] * n
    return [window if t == "sliding_attention" else None for t in types]


def _rope(c) -> Any:
    params = getattr(c, "rope_parameters", None)
    if not params:
        return None
    nested = all(isinstance(v, dict) for v in params.values())
    entries = params if nested else {"all": params}
    out = {}
    for key, p in entries.items():
        p = {k: float(v) if isinstance(v, (int, float)) else v for k, v in p.items()}
        p.pop("type", None)
        if p.get("partial_rotary_factor") == 1.0:  # the whole head rotates, spelled out or not
            p.pop("partial_rotary_factor")
        if p.get("rope_type") == "yarn":  # HF's defaults, spelled out or not
            p = {"beta_fast": 32.0, "beta_slow": 1.0, "truncate": True, **p}
        out[key] = p
    return out


def _meaning(c) -> dict[str, Any]:
    c = c.get_text_config() if hasattr(c, "get_text_config") else c
    heads = getattr(c, "num_attention_heads", None) or c.n_head
    return {
        "windows": _windows(c),
        "kv_heads": getattr(c, "num_key_value_heads", None) or heads,
        "head_dim": getattr(c, "head_dim", None) or (getattr(c, "hidden_size", 0) // heads),
        "rope": _rope(c),
        "experts": getattr(c, "num_experts", getattr(c, "n_routed_experts", None)),
        "no_rope_layers": getattr(c, "no_rope_layers", None),
    }


def test_exported_config_means_the_same(imported) -> None:
    case, hf, *_, root, _ = imported
    if not (root / "back" / "config.json").exists():
        export_hf(root / "ours", root / "back")
    theirs = _hf_config(published(case))
    back = transformers.AutoConfig.from_pretrained(root / "back")
    assert _meaning(back) == _meaning(theirs)


def test_hf5_serialisation_imports_the_same(imported, tmp_path: Path) -> None:
    """transformers 5's own config.json (rope_parameters, spelled-out defaults) is the same
    model as the published file."""
    case, *_, root, conversion = imported
    raw5 = json.loads((root / "hf5.json").read_text())
    raw = published(case)
    text5 = raw5.get("text_config", raw5)  # a multimodal wrapper: its text model
    text = raw.get("text_config", raw)
    if raw["model_type"] == "gemma3":
        text = {**text, "tie_word_embeddings": True}
    family = FAMILIES[conversion.family.name]
    assert family.to_model_config(text5) == family.to_model_config(text)


EXPECTED = {
    # case: (window, global_every, kv heads, rope kind, aux loss, bias update rate)
    "llama": (None, 0, 2, "llama3", 0.0, 0.0),
    "mistral": (None, 0, 2, "none", 0.0, 0.0),
    "mistral3": (None, 0, 2, "none", 0.0, 0.0),
    "qwen2": (None, 0, 1, "yarn", 0.0, 0.0),
    "qwen3": (None, 0, 2, "none", 0.0, 0.0),
    "qwen3_moe": (None, 0, 1, "none", 0.001, 0.0),
    "mixtral": (None, 0, 2, "none", 0.02, 0.0),
    "olmo2": (None, 0, 4, "none", 0.0, 0.0),
    "olmo3": (16, 4, 4, "yarn", 0.0, 0.0),
    "phi3": (None, 0, 2, "none", 0.0, 0.0),
    "phi3_mini": (15, 0, 4, "none", 0.0, 0.0),
    "smollm3": (None, 0, 1, "none", 0.0, 0.0),
    "gemma3_text": (16, 6, 1, "none", 0.0, 0.0),
    "gemma3": (16, 6, 4, "linear", 0.0, 0.0),
    "gpt2": (None, 0, 4, None, 0.0, 0.0),
    "deepseek_v3": (None, 0, 4, "yarn", 0.001, 0.001),
    "deepseek_v2": (None, 0, 4, "yarn", 0.001, 0.0),
    "deepseek_v2_lite": (None, 0, 4, "yarn", 0.001, 0.0),
    "kimi_k2": (None, 0, 4, "yarn", 0.001, 0.001),
    "gpt_oss": (16, 2, 2, "yarn", 0.9, 0.0),
    "glm4_moe": (None, 0, 2, "none", 0.0, 0.001),
    "minimax_m2": (None, 0, 2, "none", 0.001, 0.001),
    "qwen3_next": (None, 0, 2, "none", 0.001, 0.0),
    "nemotron_h": (None, 0, 2, None, 0.0, 0.0),
}


def test_imported_settings(imported) -> None:
    """What each published file says, as the import carries it (a null window is no window,
    the balancing weights and DeepSeek's bias update are on)."""
    case, *_, root, conversion = imported
    m = load_model(root / "ours").cfg
    window, every, kv, rope, aux, rate = EXPECTED[case]
    assert (m.attention.sliding_window, m.attention.global_every) == (window, every)
    if m.attention.kind == "mha":
        assert m.kv_heads == kv
    if rope is not None:
        assert m.position.rope_scaling.kind == rope
    assert (m.moe.aux_loss_coef, m.moe.bias_update_rate) == (aux, rate)
    notes = " ".join(conversion.notes)
    if case == "gemma3":
        assert "text model of gemma3" in notes and "vision" in notes
    if case == "mistral3":  # Mistral Small 3.1: the Pixtral tower and projector are dropped
        assert "text model of mistral3" in notes and "pixtral" in notes
        assert m.head_dim == 16 != m.d_model // m.attention.n_heads
    if case == "smollm3":  # every 4th layer rotates nothing
        assert m.position.nope_layers == [3, 7]
        assert [s.rope for s in layer_plan(m)] == ["global"] * 3 + ["none"] + ["global"] * 3 + [
            "none"
        ]
    if case == "olmo3":  # YaRN on the full layers only, as transformers applies it
        assert m.position.local_rope_theta == m.position.rope_theta == 500000
    if case in ("deepseek_v3", "kimi_k2"):
        assert "bias_update_rate=0.001" in notes and "dequantized" in notes
    if case.startswith("deepseek_v2"):  # softmax routing; V2.5 limits groups by their best
        grouped = case == "deepseek_v2"
        assert (m.moe.score, m.moe.norm_topk_prob) == ("softmax", False)
        assert (m.moe.n_groups, m.moe.topk_groups) == ((8, 3) if grouped else (1, 1))
        assert m.moe.group_score == "max" and m.attention.q_lora_rank == (48 if grouped else 0)
        assert "aux_loss_coef=0.001 (aux_loss_alpha" in notes
    if case == "gpt_oss":
        assert "dequantized 8 MXFP4 expert tensors" in notes


def test_wrapper_saved_by_transformers5_ties_as_it_says(tmp_path: Path) -> None:
    """A ``mistral3`` folder written by transformers 5 says ``tie_word_embeddings: true`` on the
    wrapper (its default) and ``false`` in ``text_config``, and holds no head: import ties the
    head, as transformers does, and gives its logits."""
    raw = {k: v for k, v in published("mistral3").items() if k != "quantization_config"}
    torch.manual_seed(0)
    hf = transformers.Mistral3ForConditionalGeneration(
        transformers.AutoConfig.for_model(**raw)
    ).eval()
    randomise(hf, seed=1)
    hf.save_pretrained(tmp_path / "hf")
    saved = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert saved["tie_word_embeddings"] is True
    assert saved["text_config"].get("tie_word_embeddings") is False
    conversion = convert_from_hf(tmp_path / "hf", tmp_path / "ours")
    model = load_model(conversion.out_dir)
    assert model.cfg.tie_embeddings
    ids = torch.randint(0, 320, (2, SEQ), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert rel_err(model(ids), hf(input_ids=ids).logits.float()) <= TOL


@pytest.mark.parametrize("imported", ["kimi_k2"], indirect=True)
def test_kimi_k2_exports_its_model_type(imported, tmp_path: Path) -> None:
    """``--family kimi_k2`` writes kimi_k2 back; run as deepseek_v3 (as Moonshot advises for
    engines without the type), transformers gives the reference logits."""
    case, _, ids, ref, root, _ = imported
    export_hf(root / "ours", tmp_path / "k2", family="kimi_k2")
    cfg = json.loads((tmp_path / "k2" / "config.json").read_text())
    assert cfg["model_type"] == "kimi_k2" and cfg["architectures"] == ["DeepseekV3ForCausalLM"]
    (tmp_path / "k2" / "config.json").write_text(json.dumps({**cfg, "model_type": "deepseek_v3"}))
    back = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "k2", dtype=torch.float32
    ).eval()
    with torch.no_grad():
        assert rel_err(back(input_ids=ids).logits.float(), ref) <= TOL


def test_fp8_dequantization_matches_references() -> None:
    """Ours against the published definition (a block loop) and transformers' own
    dequantisation, on a weight with partial edge blocks in both dimensions."""
    from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight

    from evoformer.checkpoint.hf.fp8 import dequantize

    block = (128, 128)
    w = torch.randn(300, 200, generator=torch.Generator().manual_seed(3))
    q, scale = _quantize_fp8(w, block)
    ours = dequantize(q, scale, block)
    assert ours.dtype == torch.bfloat16 and ours.shape == (300, 200)
    assert torch.equal(ours, _reference_dequant(q, scale, block))
    theirs = _dequantize_fp8_weight(q, scale, list(block), torch.float32).to(torch.bfloat16)
    assert torch.equal(ours, theirs)
    assert rel_err(ours.float(), w) < 0.07  # e4m3 keeps ~2 significant digits


@pytest.mark.parametrize(
    "change, message",
    [
        ({"quantization_config": {"quant_method": "gptq", "bits": 4}}, "quant_method='gptq'"),
        (
            {"quantization_config": {"quant_method": "fp8", "weight_block_size": None}},
            "weight_block_size=None",
        ),
        ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope_type='dynamic'"),
        ({"hidden_size": None}, "config.json cannot be read"),
    ],
)
def test_refusals_name_the_key(change: dict, message: str, tmp_path: Path) -> None:
    raw = {**published("llama"), **change}
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps(raw))
    save_file({"x": torch.zeros(1)}, str(tmp_path / "hf" / "model.safetensors"))
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        import_hf(tmp_path / "hf", tmp_path / "out")


@pytest.mark.parametrize(
    "case, change, message",
    [
        ("phi3", {"partial_rotary_factor": 0.75}, "partial_rotary_factor=0.75"),  # Phi-4-mini
        (
            "phi3",
            {"rope_scaling": {"type": "longrope", "short_factor": [1.0], "long_factor": [1.0]}},
            "rope_type='longrope'",
        ),
        ("phi3", {"resid_pdrop": 0.1}, "resid_pdrop=0.1"),
        ("deepseek_v2", {"topk_method": "noaux_tc"}, "topk_method='noaux_tc'"),
        ("deepseek_v2", {"norm_topk_prob": True}, "norm_topk_prob=true"),
    ],
)
def test_family_refusals_name_the_key(case: str, change: dict, message: str) -> None:
    family = FAMILIES[published(case)["model_type"]]
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        family.to_model_config({**published(case), **change})


# dense, MoE, fused projections
@pytest.mark.parametrize("imported", ["llama", "mixtral", "phi3_mini"], indirect=True)
def test_sharded_export_and_reimport(imported, tmp_path: Path) -> None:
    """Export in shards of at most 40 kB (the index names every tensor once, no file exceeds
    the limit unless one tensor does), transformers loads them, and the shards import back to
    the same checkpoint tensors. Written as the family it came from (Phi-4: fused qkv_proj and
    gate_up_proj again, although LLaMA, first in the registry, could express it too)."""
    case, _, ids, ref, root, conversion = imported
    from evoformer.checkpoint.hf.stream import INDEX, StoredTensors

    limit = 40_000
    family = conversion.family.name
    export_hf(root / "ours", tmp_path / "hf", family=family, max_shard_size=limit)
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == family
    index = json.loads((tmp_path / "hf" / INDEX).read_text())
    if case.startswith("phi3"):
        fused = {n.split(".")[-2] for n in index["weight_map"] if n.startswith("model.layers.0.")}
        assert {"qkv_proj", "gate_up_proj"} <= fused and "q_proj" not in fused
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 3 and not (tmp_path / "hf" / "model.safetensors").exists()
    for f in files:
        tensors = load_file(tmp_path / "hf" / f)
        assert set(tensors) == {n for n, v in index["weight_map"].items() if v == f}
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        assert size <= limit or len(tensors) == 1
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        assert rel_err(back(input_ids=ids).logits, ref) <= TOL
    import_hf(tmp_path / "hf", tmp_path / "again")
    first = StoredTensors(root / "ours" / "checkpoints" / "step_0")
    again = StoredTensors(tmp_path / "again" / "checkpoints" / "step_0")
    assert first.infos == again.infos
    a, b = first.load(first.infos), again.load(first.infos)
    assert all(torch.equal(a[n], b[n]) for n in a)
