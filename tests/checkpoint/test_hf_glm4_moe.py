"""GLM-4.5's MTP module: stored as decoder layer ``n_layers`` in DeepSeek-V3's layout, imported
into our MTP module and compared with transformers' own ``MtpModel`` draft logits; export writes
the same tensors back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from safetensors.torch import load_file  # noqa: E402

from evoformer.checkpoint import load_model  # noqa: E402
from evoformer.checkpoint.hf import export_hf, import_hf  # noqa: E402
from tests.checkpoint.hf_testing import randomise, rel_err  # noqa: E402
from tests.checkpoint.test_hf_moe import _write_mtp_layer  # noqa: E402

TOL, SEQ = 1e-5, 24
CONFIG = Path(__file__).parent / "configs" / "glm4_moe.json"


def test_glm4_moe_mtp_matches_hf_mtp_model(tmp_path: Path) -> None:
    from transformers.modeling_layers import MtpModel

    raw = json.loads(CONFIG.read_text())
    torch.manual_seed(0)
    hf = transformers.Glm4MoeForCausalLM(transformers.AutoConfig.for_model(**raw)).eval()
    randomise(hf, seed=1)
    mtp = MtpModel(hf, 1).eval()
    randomise(mtp.layers, seed=5)
    hf.save_pretrained(tmp_path / "hf")
    _write_mtp_layer(hf, mtp, tmp_path / "hf" / "model.safetensors")
    ids = torch.randint(0, raw["vocab_size"], (2, SEQ), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        h = hf(input_ids=ids, output_hidden_states=True).hidden_states[-1]
        positions = torch.arange(SEQ - 1)[None]
        drafted = mtp.forward_layer(0, h[:, :-1], positions, None, input_ids=ids[:, 1:])
        ref = mtp._project_to_logits(drafted)

    out = import_hf(tmp_path / "hf", tmp_path / "ours")
    ours = load_model(out)
    assert ours.cfg.mtp.depth == 1
    assert ours.mtp is not None
    with torch.no_grad():
        assert rel_err(ours(ids), hf(input_ids=ids).logits) <= TOL
        got = ours.mtp.logits(ours.hidden_states(ids), ids, ours)[0]
    err = rel_err(got, ref)
    assert err <= TOL, f"MTP: relative logit error {err:.2e}"

    export_hf(out, tmp_path / "hf2")
    written = load_file(tmp_path / "hf" / "model.safetensors")
    exported = load_file(tmp_path / "hf2" / "model.safetensors")
    assert set(exported) == set(written)
    for name, t in written.items():
        assert torch.equal(exported[name], t), name
