"""Mixed precision: bf16 / fp16 track fp32, fp16's dynamic loss scaler, bf16 under FSDP2.

Tolerances (max relative per-step loss difference; tiny LLaMA on the small real corpus, lr 3e-3):

- 50 steps, one process, vs fp32: bf16 (autocast) measured 1.6e-3 (H100: 1.0e-3) -> allowed
  6e-3; fp16 (autocast + loss scale 2^16) measured 7.4e-5 (H100: 3.6e-4) -> allowed 1e-3.
- 10 steps, bf16 under FSDP2 (dp 2: bf16 parameters and activations, fp32 reduce and master
  weights) vs one process's bf16 autocast (fp32 residual stream), measured 7.0e-5 ->
  allowed 1e-3.

The scaler is driven by forced overflows: an inf written into one gradient at chosen steps,
on rank 0 only; every rank must skip those steps (parameters unchanged), back off, and grow
again after ``growth_interval`` clean steps.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch.distributed.tensor import DTensor

from evoformer.config import load_config
from evoformer.config.validate import validate
from evoformer.distributed.testing import run_distributed
from evoformer.engine import Trainer
from evoformer.engine.precision import LossScaler, found_overflow, fsdp_mp_policy
from evoformer.errors import UserError
from tests.conftest import REPO

TINY = str(REPO / "configs/models/tiny/llama.yaml")
BF16_RTOL, FP16_RTOL, FSDP_BF16_RTOL = 6e-3, 1e-3, 1e-3


def _cfg(corpus: dict, out_dir, steps: int, *overrides: str):
    return load_config(
        [TINY],
        [
            "data.source=files",
            f"data.paths=[{corpus['path']}]",
            f"data.tokenizer={corpus['tokenizer']}",
            "data.val_fraction=0.1",
            "train.seq_len=32",
            "train.global_batch_size=8",
            "train.micro_batch_size=4",
            f"train.max_steps={steps}",
            "train.log_every=1",
            "run.progress=off",
            "optim.warmup_steps=5",
            "optim.lr=3e-3",
            "checkpoint.save_final=false",
            f"run.output_dir={out_dir}",
            *overrides,
        ],
    )


def _max_rel(got: dict[int, float], want: dict[int, float]) -> float:
    assert sorted(got) == sorted(want)
    return max(abs(got[s] - want[s]) / abs(want[s]) for s in want)


def _metrics(run_dir) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "loss" in r]


# -- the scaler's arithmetic -------------------------------------------------------------------


def test_loss_scaler_backs_off_grows_and_floors():
    s = LossScaler(
        initial_scale=1024.0,
        growth_interval=3,
        growth_factor=2.0,
        backoff_factor=0.25,
        min_scale=16.0,
    )
    history = []
    for overflow in [False, False, True, False, False, False, False, True, True, True, False]:
        s.update(overflow)
        history.append((s.scale, s.clean_steps, s.skipped_steps))
    assert history == [
        (1024.0, 1, 0),
        (1024.0, 2, 0),
        (256.0, 0, 1),  # overflow: x0.25, the clean count restarts
        (256.0, 1, 1),
        (256.0, 2, 1),
        (512.0, 0, 1),  # 3 clean steps: x2
        (512.0, 1, 1),
        (128.0, 0, 2),
        (32.0, 0, 3),
        (16.0, 0, 4),  # 32 * 0.25 = 8 floors at min_scale
        (16.0, 1, 4),
    ]
    restored = LossScaler()
    restored.load_state_dict(json.loads(json.dumps(s.state_dict())))
    assert (
        restored.state_dict()
        == s.state_dict()
        == {
            "scale": 16.0,
            "clean_steps": 1,
            "skipped_steps": 4,
        }
    )


def test_loss_scaler_scales_and_unscales():
    s = LossScaler(initial_scale=512.0)
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    s.scale_loss((w * torch.tensor([3.0, 0.5])).sum()).backward()
    assert w.grad.tolist() == [1536.0, 256.0]
    s.unscale_([w, torch.nn.Parameter(torch.zeros(1))])  # parameters without grads are skipped
    assert w.grad.tolist() == [3.0, 0.5]
    assert not found_overflow(torch.tensor(3.2), None)
    assert found_overflow(torch.tensor(float("inf")), None)
    assert found_overflow(torch.tensor(float("nan")), None)


def test_loss_scale_config_is_validated(tmp_path):
    for key, value, message in [
        ("loss_scale.backoff_factor", 1.5, "must be in \\(0, 1\\)"),
        ("loss_scale.growth_factor", 0.5, "must be >= 1"),
        ("loss_scale.growth_interval", 0, "must be >= 1"),
    ]:
        with pytest.raises(UserError, match=f"{key}={value}: {message}"):
            load_config([TINY], ["precision=fp16", f"{key}={value}"])
    # fp16 and fsdp2 + bf16/fp16 are available now.
    validate(load_config([TINY], ["precision=fp16", "zero.backend=fsdp2", "zero.stage=3"]))
    assert fsdp_mp_policy("fp32") is None
    policy = fsdp_mp_policy("bf16")
    assert (policy.param_dtype, policy.reduce_dtype) == (torch.bfloat16, torch.float32)


# -- one process: bf16 and fp16 track fp32 ------------------------------------------------------


def test_bf16_and_fp16_track_fp32_over_50_steps(text_corpus, tmp_path):
    runs = {}
    for precision in ("fp32", "bf16", "fp16"):
        out = tmp_path / precision
        runs[precision] = (
            Trainer(_cfg(text_corpus, out, 50, f"precision={precision}")).train().losses
        )
    fp32 = runs["fp32"]
    assert fp32[50] < fp32[1] - 1.0  # it learns: the comparison is of real curves
    bf16, fp16 = _max_rel(runs["bf16"], fp32), _max_rel(runs["fp16"], fp32)
    print(f"\nmax relative loss difference vs fp32 over 50 steps: bf16 {bf16:.1e}, fp16 {fp16:.1e}")
    assert bf16 <= BF16_RTOL
    assert fp16 <= FP16_RTOL
    assert bf16 > 0 and fp16 > 0  # they did compute in lower precision
    rows = _metrics(tmp_path / "fp16")
    assert all(r["loss_scale"] == 65536.0 and r["skipped_steps"] == 0 for r in rows)
    assert "loss_scale" not in _metrics(tmp_path / "bf16")[0]


# -- forced overflows --------------------------------------------------------------------------

OVERFLOW_STEPS = (3, 4)  # 1-based steps whose gradients get an inf on rank 0
SCALER = ["precision=fp16", "loss_scale.initial_scale=1024", "loss_scale.growth_interval=3"]
# Scale used by steps 1..10: backs off at 3 and 4, grows after 3 clean steps (5, 6, 7) and
# again after 8, 9, 10.
EXPECTED_SCALES = [1024, 1024, 1024, 512, 256, 256, 256, 512, 512, 512]
EXPECTED_AFTER = 1024.0


def _inject_before_reduction(trainer: Trainer) -> None:
    """DDP: an inf in one activation gradient of rank 0's backward, before DDP's all-reduce."""

    def forward_hook(module, args, out):
        if trainer.step + 1 in OVERFLOW_STEPS:
            out.register_hook(
                lambda g: g.index_fill(0, torch.tensor([0], device=g.device), torch.inf)
            )

    trainer.model.layers[0].mlp.down_proj.register_forward_hook(forward_hook)


def _inject_into_local_shard(trainer: Trainer, name: str) -> None:
    """An inf in one element of rank 0's gradient of parameter ``name`` after the gradients
    are synchronised: FSDP2, rank 0's *shard* after the reduce-scatter; tp = 2, rank 0's copy
    of a TP-replicated parameter. Only rank 0 holds it; every rank must still skip."""
    step = trainer.strategy.step

    def step_with_inf(lr, max_norm, **kwargs):
        if trainer.step + 1 in OVERFLOW_STEPS:
            grad = trainer.model.get_parameter(name).grad
            local = grad.to_local() if isinstance(grad, DTensor) else grad
            local.view(-1)[0] = torch.inf
        return step(lr, max_norm, **kwargs)

    trainer.strategy.step = step_with_inf


def _local_flat(model) -> torch.Tensor:
    parts = [p.to_local() if isinstance(p, DTensor) else p for p in model.parameters()]
    return torch.cat([t.detach().reshape(-1).float() for t in parts]).clone()


def _run_recorded(trainer: Trainer) -> dict:
    snapshots = [_local_flat(trainer.model)]
    scales = []

    def hook(step: int, t: Trainer) -> None:
        snapshots.append(_local_flat(t.model))
        scales.append((t.strategy.scaler.scale, t.strategy.scaler.skipped_steps))

    trainer.step_hook = hook
    losses = trainer.train().losses
    unchanged = [bool(torch.equal(a, b)) for a, b in zip(snapshots, snapshots[1:])]
    return {"losses": losses, "unchanged": unchanged, "scales": scales}


def _world2(rank: int, world: int, corpus: dict, root: str) -> dict:
    out = {}
    ddp = Trainer(_cfg(corpus, f"{root}/ddp", 10, *SCALER))
    if rank == 0:
        _inject_before_reduction(ddp)
    out["ddp"] = _run_recorded(ddp)
    fsdp = Trainer(_cfg(corpus, f"{root}/fsdp2", 10, *SCALER, "zero.backend=fsdp2", "zero.stage=3"))
    if rank == 0:
        _inject_into_local_shard(fsdp, "layers.1.mlp.down_proj.weight")
    out["fsdp2"] = _run_recorded(fsdp)
    tp = Trainer(_cfg(corpus, f"{root}/tp2", 10, *SCALER, "parallel.tp=2"))
    if rank == 0:
        # The final norm's weight is replicated over TP: its gradient is not all-reduced.
        _inject_into_local_shard(tp, "norm.weight")
    out["tp2"] = _run_recorded(tp)
    bf16 = ["precision=bf16", "zero.backend=fsdp2", "zero.stage=3"]
    trainer = Trainer(_cfg(corpus, f"{root}/fsdp2_bf16", 10, *bf16))
    dtypes = set()  # what the linears compute in: the policy's cast, not autocast
    trainer.model.layers[1].mlp.down_proj.register_forward_hook(
        lambda m, args, out: dtypes.update({args[0].dtype, m.weight.dtype, out.dtype})
    )
    out["fsdp2_bf16"] = trainer.train().losses
    out["fsdp2_bf16_dtypes"] = sorted(map(str, dtypes))
    master = [p.dtype for p in trainer.model.parameters()]
    out["fsdp2_bf16_master"] = sorted(set(map(str, master)))
    return out


@pytest.fixture(scope="module")
def world2(text_corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("precision_world2")
    return root, run_distributed(_world2, 2, text_corpus, str(root), timeout=240)


@pytest.mark.parametrize("layout", ["ddp", "fsdp2", "tp2"])
def test_fp16_overflow_is_skipped_on_every_rank(world2, layout):
    root, ranks = world2
    for rank, got in enumerate(ranks):
        run = got[layout]
        skipped = [s for s in range(1, 11) if run["unchanged"][s - 1]]
        assert skipped == list(OVERFLOW_STEPS), (rank, run["unchanged"])
        assert [s for s, _ in run["scales"]][-1] == EXPECTED_AFTER
        assert run["scales"][-1][1] == len(OVERFLOW_STEPS)
        assert all(torch.isfinite(torch.tensor(list(run["losses"].values()))))
    assert ranks[0][layout]["losses"] == ranks[1][layout]["losses"]
    rows = _metrics(root / layout)
    assert [r["loss_scale"] for r in rows] == EXPECTED_SCALES
    assert [r["skipped_steps"] for r in rows] == [0, 0, 1, 2, 2, 2, 2, 2, 2, 2]
    for r in rows:  # the logged norm is the unscaled one; inf exactly on the skipped steps
        assert (r["step"] in OVERFLOW_STEPS) == (not torch.isfinite(torch.tensor(r["grad_norm"])))
        if r["step"] not in OVERFLOW_STEPS:
            assert 0.05 < r["grad_norm"] < 5.0


def test_bf16_under_fsdp2_tracks_one_process_bf16(world2, text_corpus, tmp_path):
    _, ranks = world2
    one = Trainer(_cfg(text_corpus, tmp_path / "one", 10, "precision=bf16")).train().losses
    fp32 = Trainer(_cfg(text_corpus, tmp_path / "fp32", 10)).train().losses
    got, ref = _max_rel(ranks[0]["fsdp2_bf16"], one), _max_rel(ranks[0]["fsdp2_bf16"], fp32)
    print(
        f"\nbf16 fsdp2 (dp 2), 10 steps, max relative: vs one process bf16 {got:.1e}, "
        f"vs fp32 {ref:.1e}, one process bf16 vs fp32 {_max_rel(one, fp32):.1e}"
    )
    assert got <= FSDP_BF16_RTOL
    assert ranks[1]["fsdp2_bf16"] == ranks[0]["fsdp2_bf16"]
    for rank in ranks:  # bf16 compute, fp32 master weights
        assert rank["fsdp2_bf16_dtypes"] == ["torch.bfloat16"]
        assert rank["fsdp2_bf16_master"] == ["torch.float32"]


# -- resume ------------------------------------------------------------------------------------


def test_fp16_scaler_state_resumes_exactly(text_corpus, tmp_path):
    """Stop at step 6 (scale backed off at 3 and 4, two clean steps counted towards growth),
    resume: the same losses bit for bit, and the scale grows at the same step."""
    full = Trainer(_cfg(text_corpus, tmp_path / "full", 10, *SCALER, "checkpoint.save_every=6"))
    _inject_before_reduction(full)
    full_losses = full.train().losses
    state = json.loads((tmp_path / "full/checkpoints/step_6/trainer.json").read_text())
    assert state["strategy"]["loss_scaler"] == {
        "scale": 256.0,
        "clean_steps": 2,
        "skipped_steps": 2,
    }
    ckpt = tmp_path / "full/checkpoints/step_6"
    resumed = (
        Trainer(_cfg(text_corpus, tmp_path / "resumed", 10, *SCALER, f"checkpoint.load={ckpt}"))
        .train()
        .losses
    )
    assert sorted(resumed) == list(range(7, 11))
    assert all(resumed[s] == full_losses[s] for s in resumed), (full_losses, resumed)
    assert [r["loss_scale"] for r in _metrics(tmp_path / "resumed")] == EXPECTED_SCALES[6:]
