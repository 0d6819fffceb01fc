"""Muon (``optim.name=muon``): Newton-Schulz against the polar factor, which parameters it
takes, and layout parity: dp=2 (DDP), FSDP2 stage 3, tp=2, pp=2, ep=2 and tp=2 x dp=2 train to
one process's losses (fp32, 10 steps); stop/resume is bit-exact and a tp=2 checkpoint resumes
on one process."""

from __future__ import annotations

import pytest
import torch

from evoformer.config import load_config
from evoformer.distributed.testing import run_distributed
from evoformer.engine import Trainer
from evoformer.engine.muon import Muon, newton_schulz
from evoformer.errors import UserError
from tests.conftest import REPO
from tests.engine.parity import max_rel

STEPS = 10
LOSS_RTOL = 1e-5


def test_newton_schulz_orthogonalises() -> None:
    g = torch.randn(3, 24, 40, generator=torch.Generator().manual_seed(0))
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    polar = u @ vh
    # the classic cubic iteration converges to the polar factor itself
    exact = newton_schulz(g, steps=40, coefficients=(1.5, -0.5, 0.0))
    torch.testing.assert_close(exact, polar, rtol=0, atol=1e-4)
    torch.testing.assert_close(
        newton_schulz(g.mT, 40, (1.5, -0.5, 0.0)), polar.mT, atol=1e-4, rtol=0
    )
    # the default quintic: singular values pushed into ~[0.7, 1.2], same singular vectors
    fast = newton_schulz(g)
    s = torch.linalg.svdvals(fast)
    assert s.min() > 0.6 and s.max() < 1.25, s
    cos = (fast * polar).sum((-2, -1)) / (fast.norm(dim=(-2, -1)) * polar.norm(dim=(-2, -1)))
    assert cos.min() > 0.98


def _cfg(family: str, out_dir, *overrides: str):
    return load_config(
        [str(REPO / f"configs/models/tiny/{family}.yaml")],
        [
            "data.source=synthetic",
            "optim.name=muon",
            "optim.lr=0.02",
            "optim.warmup_steps=2",
            "train.seq_len=32",
            "train.global_batch_size=8",
            "train.micro_batch_size=2",
            f"train.max_steps={STEPS}",
            "train.log_every=1",
            "checkpoint.save_final=false",
            "run.progress=off",
            f"run.output_dir={out_dir}",
            *overrides,
        ],
    )


def test_which_parameters_take_muon(tmp_path) -> None:
    trainer = Trainer(_cfg("llama", tmp_path))
    opt = trainer.optimizer
    assert isinstance(opt, Muon)
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    muon = sorted(names[id(p)] for g in opt.param_groups if g["muon"] for p in g["params"])
    other = sorted(names[id(p)] for g in opt.param_groups if not g["muon"] for p in g["params"])
    assert all(".attn." in n or ".mlp." in n for n in muon) and len(muon) == 2 * 7
    assert "embed.weight" in other and "head.weight" in other
    assert all(n.endswith("norm.weight") for n in other if n not in ("embed.weight", "head.weight"))
    with pytest.raises(UserError, match="optim.muon_lr_scale"):
        _cfg("llama", tmp_path, "optim.muon_lr_scale=huge")
    with pytest.raises(UserError, match="not deepspeed"):
        _cfg("llama", tmp_path, "zero.backend=deepspeed")


LAYOUTS_2 = {
    "llama": {
        "dp2": [],
        "fsdp2": ["zero.backend=fsdp2", "zero.stage=3"],
        "tp2": ["parallel.tp=2", "parallel.sequence_parallel=true"],
        "pp2": ["parallel.pp=2"],
    },
    "mixtral": {"ep2": ["parallel.ep=2"], "tp2": ["parallel.tp=2"]},
}


def _train(rank: int, world: int, family: str, layouts: dict, root: str) -> dict:
    return {
        name: Trainer(_cfg(family, f"{root}/{family}-{name}", *o)).train().losses
        for name, o in layouts.items()
    }


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> dict:
    return {
        f: Trainer(_cfg(f, tmp_path_factory.mktemp(f) / "one")).train().losses
        for f in ("llama", "mixtral")
    }


@pytest.mark.parametrize("family", sorted(LAYOUTS_2))
def test_layouts_train_like_one_process(family, single, tmp_path):
    got = run_distributed(_train, 2, family, LAYOUTS_2[family], str(tmp_path), timeout=180)[0]
    report = {name: max_rel(losses, single[family]) for name, losses in got.items()}
    print(f"\nMuon {family}: max relative loss difference vs one process: {report}")
    assert max(report.values()) <= LOSS_RTOL, report


def test_tp2_dp2(single, tmp_path):
    layouts = {"tp2xdp2": ["parallel.tp=2", "parallel.sequence_parallel=true"]}
    got = run_distributed(_train, 4, "llama", layouts, str(tmp_path), timeout=180)[0]
    assert max_rel(got["tp2xdp2"], single["llama"]) <= LOSS_RTOL


def _tp2_saving(rank: int, world: int, root: str) -> dict:
    return (
        Trainer(_cfg("llama", f"{root}/tp2", "parallel.tp=2", "checkpoint.save_every=5"))
        .train()
        .losses
    )


def test_resume_is_exact_and_crosses_layouts(single, tmp_path):
    full = Trainer(_cfg("llama", tmp_path / "full", "checkpoint.save_every=5")).train().losses
    assert full == single["llama"]
    ckpt = tmp_path / "full/checkpoints/step_5"
    resumed = Trainer(_cfg("llama", tmp_path / "res", f"checkpoint.load={ckpt}")).train().losses
    assert sorted(resumed) == list(range(6, STEPS + 1))
    assert all(resumed[s] == full[s] for s in resumed)  # bit-exact
    # a tp=2 checkpoint (momentum buffers resharded to full tensors) on one process
    run_distributed(_tp2_saving, 2, str(tmp_path), timeout=120)
    tp_ckpt = tmp_path / "tp2/checkpoints/step_5"
    one = Trainer(_cfg("llama", tmp_path / "one", f"checkpoint.load={tp_ckpt}")).train().losses
    for s in one:
        assert one[s] == pytest.approx(full[s], rel=LOSS_RTOL), s


CLIP = [
    "optim.qk_clip=0.1",
    "optim.z_loss=1e-2",
]  # low: this tiny model's logits reach ~0.2, so heads get clipped


def test_muonclip_layouts_and_metrics(tmp_path):
    """MuonClip (Muon + QK-clip) with a z-loss under tp=2 (heads split, the z-loss from the
    vocabulary shards) and dp=2 (maxima over replicas) trains like one process, and the
    per-layer maximum logit is logged."""
    ref = Trainer(_cfg("llama", tmp_path / "one", *CLIP)).train().losses
    layouts = {"tp2": ["parallel.tp=2", *CLIP], "dp2": CLIP}
    got = run_distributed(_train, 2, "llama", layouts, str(tmp_path), timeout=180)[0]
    report = {name: max_rel(losses, ref) for name, losses in got.items()}
    assert max(report.values()) <= LOSS_RTOL, report
    plain = Trainer(_cfg("llama", tmp_path / "noclip")).train().losses
    assert max_rel(plain, ref) > 1e-4  # the clip changed the run
    rows = (tmp_path / "one/metrics.jsonl").read_text().splitlines()
    last = __import__("json").loads(rows[-1])
    assert {"qk/L0/max_logit", "qk/L1/max_logit", "z_loss"} <= set(last)
