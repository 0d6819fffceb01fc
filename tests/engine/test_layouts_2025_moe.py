"""The 2024-25 MoE families train under tp=2, tp=2 + SP, ep=2, pp=2 and FSDP2 (ZeRO-3) like one
process: 8 steps of per-step losses within 1e-5 relative, and the same final weights of what is
new in them (checked on the tensor-parallel layouts).

- gpt-oss-tiny: attention sinks (split with the heads), q/k/v/o biases, biased router and
  experts (gate/up biases split with the hidden dim, the down bias added once), clamped SwiGLU;
- glm4-moe-tiny: partial RoPE, q/k/v biases, per-head QK-norm, a dense first layer, sigmoid
  MoE with a selection bias (identical on every rank), routed scaling, a shared expert, MTP;
- deepseek-v2-tiny: MLA with low-rank q, softmax routing limited to the groups of the best
  experts, unnormalised top-k scaled x2, two shared experts, a dense first layer;
- minimax-m2-tiny: QK-norm over the full projection (its statistics reduced over the TP ranks),
  partial RoPE, sigmoid top-2 routing with a selection bias in every layer."""

from __future__ import annotations

import pytest
import torch

from evoformer.config import load_config
from evoformer.distributed.testing import run_distributed
from evoformer.engine import Trainer
from evoformer.parallel.layers import gather_full_params
from tests.conftest import REPO
from tests.engine.parity import max_rel, parity_run, router_biases

STEPS = 8
COMMON = [
    *parity_run(STEPS, global_batch=4),  # seq 32: past the window of 16
]
LAYOUTS = {
    "tp2": ["parallel.tp=2"],
    "tp2-sp": ["parallel.tp=2", "parallel.sequence_parallel=true"],
    "ep2": ["parallel.ep=2"],
    "pp2": ["parallel.pp=2"],
    "fsdp2": ["zero.backend=fsdp2", "zero.stage=3"],
}
# What each family adds, checked weight by weight (and the count of checks in both TP runs).
WATCHED = {
    "gpt-oss": (("sinks", "gate_proj_bias", "up_proj_bias", "down_proj_bias", "router.bias"), 20),
    "glm4-moe": (("q_proj.bias", "k_norm.weight", "shared_experts.up_proj.weight"), 12),
    "deepseek-v2": (("q_a_norm.weight", "kv_b_proj.weight", "router.weight"), 16),
    "minimax-m2": (("q_norm.weight", "k_norm.weight", "router.weight"), 12),
}


def _cfg(family: str, out_dir, *overrides: str):
    return load_config(
        [str(REPO / f"configs/models/tiny/{family}.yaml")],
        [*COMMON, f"run.output_dir={out_dir}", *overrides],
    )


def _train(rank: int, world: int, family: str, root: str) -> dict:
    out = {}
    for name, overrides in LAYOUTS.items():
        trainer = Trainer(_cfg(family, f"{root}/{name}", *overrides))
        losses = trainer.train().losses
        weights = {}
        if name.startswith("tp"):  # full weights: gather the TP shards
            weights = gather_full_params(trainer.model, trainer.groups.tp_group)
        out[name] = {
            "losses": losses,
            "weights": weights if rank == 0 else None,
            "bias": router_biases(trainer.model),
        }
    return out


@pytest.mark.parametrize("family", sorted(WATCHED))
def test_layouts_train_like_one_process(family: str, tmp_path) -> None:
    one = Trainer(_cfg(family, tmp_path / "one"))
    ref = one.train().losses
    runs = run_distributed(_train, 2, family, str(tmp_path), timeout=240)[0]
    report = {name: max_rel(run["losses"], ref) for name, run in runs.items()}
    print(f"\n{family}-tiny max relative loss difference over {STEPS} steps: {report}")
    assert max(report.values()) <= 1e-5, report
    ref_bias = router_biases(one.model)
    for name, run in runs.items():  # the selection bias moves the same on every layout
        for bname, bias in run["bias"].items():  # (pp: the layers of rank 0's stage)
            assert torch.equal(bias, ref_bias[bname]), (name, bname)
    watched, want = WATCHED[family]
    checked = 0
    for name, run in runs.items():
        for pname, p in one.model.named_parameters():
            if pname.endswith(watched) and pname in run["weights"]:
                torch.testing.assert_close(
                    run["weights"][pname], p.detach(), rtol=1e-4, atol=2e-4, msg=f"{name} {pname}"
                )
                checked += 1
    assert checked >= want, checked


def test_stacked_expert_biases_are_neither_decayed_nor_muon_matrices() -> None:
    from evoformer.engine.optim import muon_param_groups, param_groups
    from evoformer.model import build_model

    model = build_model(_cfg("gpt-oss", "unused").model, device="meta", seed=None)
    names = {id(p): n for n, p in model.named_parameters()}
    decay, no_decay = param_groups(model, 0.1)
    biases = [names[id(p)] for p in no_decay["params"] if "experts" in names[id(p)]]
    assert sorted(biases)[:3] == [
        f"layers.0.mlp.experts.{b}_proj_bias" for b in ("down", "gate", "up")
    ]
    muon = next(g for g in muon_param_groups(model, 0.1) if g.get("muon"))
    assert not [names[id(p)] for p in muon["params"] if names[id(p)].endswith("bias")]
    assert any(names[id(p)].endswith("experts.gate_proj") for p in decay["params"])
