"""Exporting evoformer-built hybrids: the tiny Qwen3-Next and Nemotron-H twins (our init, norms
randomised) export without naming a family -- every other family refuses them -- and
transformers computes the same logits (<= 1e-5 relative, fp32); HF's cached greedy decoding
(its recurrent DeltaNet / Mamba-2 path) continues a prompt with the tokens ours does."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from evoformer.checkpoint import save_checkpoint  # noqa: E402
from evoformer.checkpoint.hf import export_hf  # noqa: E402
from evoformer.config import Config, load_config, to_yaml  # noqa: E402
from evoformer.model import build_model  # noqa: E402
from evoformer.model.generate import generate  # noqa: E402
from tests.checkpoint.hf_testing import randomise, rel_err  # noqa: E402
from tests.conftest import REPO  # noqa: E402

TOL = 1e-5


@pytest.mark.parametrize(
    "name, family", [("qwen3-next", "qwen3_next"), ("nemotron-h", "nemotron_h")]
)
def test_hybrid_exports_and_decodes_like_hf(name: str, family: str, tmp_path: Path) -> None:
    cfg = load_config([str(REPO / f"configs/models/tiny/{name}.yaml")]).model
    model = build_model(cfg, seed=7).eval()
    with torch.no_grad():  # sharpen, so greedy decoding is not a run of near-ties
        for p in model.parameters():
            if p.ndim == 2:
                p.mul_(4)
    for module in model.modules():  # norms (and their zero-centred gains) not all at init
        if type(module).__name__ == "RMSNorm":
            randomise(module, seed=3, norm_centre=0.0 if cfg.norm.unit_offset else 1.0)
    full = Config(model=cfg)
    save_checkpoint(tmp_path / "run" / "checkpoints", 1, model, None, {}, to_yaml(full))
    export_hf(tmp_path / "run", tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == family
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    hf = hf.eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert rel_err(hf(input_ids=ids).logits, model(ids)) <= TOL
        prompt = [5, 17, 99, 3, 250]
        theirs = hf.generate(
            torch.tensor([prompt]), max_new_tokens=16, do_sample=False, use_cache=True
        )[0, len(prompt) :].tolist()
    assert generate(model, prompt, 16, temperature=0) == theirs
