"""Pipeline parallelism through the real Trainer trains like one process (gloo, fp32).

Tiny LLaMA (untied head), GPT-2 (tied embedding: first and last stage hold it, gradients summed)
and DeepSeek-V3 (MLA, MoE aux losses from both stages, aux-loss-free biases, MTP on the last
stage), each with 4 layers: 10 steps under pp=2 with every schedule (GPipe, 1F1B, interleaved
1F1B and interleaved zero bubble with 2 stages per rank; ZBV for GPT-2, whose V placement puts
the tied embedding's two users on one rank) give the per-step losses of one process within 1e-5
relative, the loss terms and MoE statistics of every stage, and the same final weights under
full-model parameter names; selective activation checkpointing inside the stages changes no
number, and fp16 loss scaling pipelines like one process. World 4: pp=2 x tp=2 (sequence
parallel), pp=2 x dp=2 with FSDP2 and with DDP (1F1B, zero bubble), pp=4. Checkpoints: stop
at step 5 under pp=2 and resume bit-exact; the pp=2 checkpoint also resumes on one process.

Micro-batches of 2 sequences, global batch 8: 4 micro-batches per step at dp=1, 2 at dp=2.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch.distributed.tensor import DTensor

from evoformer.config import load_config
from evoformer.distributed.testing import run_distributed
from evoformer.engine import Trainer
from evoformer.parallel.layers import gather_full_params
from tests.conftest import REPO
from tests.engine.parity import max_rel, parity_run, router_biases

STEPS = 10
LOSS_RTOL = 1e-5
# Final weights: the stages sum the same partial products as one process, but the gradient
# norm (hence the clip coefficient) adds the stages' squares in another order; AdamW turns that
# rounding into single-element differences for near-zero gradients. See test_tp_training.
WEIGHT_TOL = {"rtol": 1e-4, "atol": 2e-4}

COMMON = [
    *parity_run(STEPS),
    "model.n_layers=4",
]
SCHEDULES = {
    "llama": ["gpipe", "1f1b", "interleaved", "zero_bubble"],
    "gpt2": ["gpipe", "1f1b", "interleaved", "zero_bubble", "zbv"],
    "deepseek-v3": ["gpipe", "1f1b", "interleaved", "zero_bubble"],
}
PP2 = "parallel.pp=2"
LAYOUTS_4 = {
    # Zero bubble under DDP: weight gradients come after the last input backward, so the engine
    # averages over dp itself.
    "llama": {
        "pp2xtp2-sp": [PP2, "parallel.tp=2", "parallel.sequence_parallel=true"],
        "pp2xdp2-zero_bubble": [PP2, "parallel.pp_schedule=zero_bubble"],
    },
    # pp=4: the tied embedding's first/last-stage pair is its own group, not the pp group.
    "gpt2": {
        "pp2xdp2-fsdp2": [PP2, "zero.backend=fsdp2", "zero.stage=3"],
        "pp4": ["parallel.pp=4"],
    },
    "deepseek-v3": {"pp2xdp2-ddp": [PP2], "pp2xtp2": [PP2, "parallel.tp=2"]},
}
# DeepSeek-V3-tiny at 4 layers under tp=2 alone already routes one token differently from one
# process by step 10 (summation order of the sharded router input, ~8e-5 relative in the
# loss): its pp=2 x tp=2 run is held to the tp=2 run (same world of 2 x 2 ranks' numbers).
TP_REFERENCE = {"pp2xtp2": "tp2"}
# Loss terms and MoE statistics every stage must report (DeepSeek: layer 0 is dense, 1-2 sit
# on the first stage, 3 and the MTP block on the last).
STAGE_METRICS = [
    "aux_loss",
    "mtp_loss",
    "moe/L1/max_over_mean",
    "moe/L3/max_over_mean",
    "moe/L4/max_over_mean",
]


def _cfg(family: str, out_dir, *overrides: str):
    return load_config(
        [str(REPO / f"configs/models/tiny/{family}.yaml")],
        [*COMMON, f"run.output_dir={out_dir}", *overrides],
    )


def _metrics(out_dir) -> dict[int, dict]:
    lines = [json.loads(x) for x in open(f"{out_dir}/metrics.jsonl") if x.strip()]
    return {x["step"]: x for x in lines if "loss" in x}


def _full_weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    """This rank's parameters as full tensors under their model names."""
    if trainer.dims.tp > 1:
        return gather_full_params(trainer.model, trainer.groups.tp_group)
    return {
        n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
        for n, p in trainer.model.named_parameters()
    }


def _train(rank: int, world: int, family: str, layouts: dict, root: str) -> dict:
    out = {}
    for name, overrides in layouts.items():
        trainer = Trainer(_cfg(family, f"{root}/{name}", *overrides))
        result = trainer.train()
        out[name] = {
            "losses": result.losses,
            "weights": _full_weights(trainer),
            "bias": router_biases(trainer.model),
            "metrics": _metrics(f"{root}/{name}") if rank == 0 else None,
        }
    return out


@pytest.fixture(scope="module")
def single_runs(tmp_path_factory) -> dict:
    runs = {}
    for family in SCHEDULES:
        out = tmp_path_factory.mktemp(family) / "one"
        trainer = Trainer(_cfg(family, out))
        result = trainer.train()
        runs[family] = {
            "losses": result.losses,
            "weights": {n: p.detach() for n, p in trainer.model.named_parameters()},
            "bias": router_biases(trainer.model),
            "metrics": _metrics(out),
        }
    return runs


def _check(family: str, ranks: list[dict], ref: dict) -> dict[str, float]:
    report = {}
    for layout in ranks[0]:
        # Every rank reports the loss (broadcast from the last stage) ...
        for rank_out in ranks:
            report[layout] = max(
                report.get(layout, 0), max_rel(rank_out[layout]["losses"], ref["losses"])
            )
        # ... the loss terms and MoE statistics of every stage ...
        got_m, want_m = ranks[0][layout]["metrics"], ref["metrics"]
        for key in STAGE_METRICS if family == "deepseek-v3" else []:
            for s in want_m:
                assert got_m[s][key] == pytest.approx(want_m[s][key], rel=LOSS_RTOL), (layout, key)
        # ... and the union of the stages is the whole model, under its own names.
        names = set()
        for rank_out in ranks:
            for name, bias in rank_out[layout]["bias"].items():
                assert torch.equal(bias, ref["bias"][name]), (layout, name)
            for name, w in rank_out[layout]["weights"].items():
                torch.testing.assert_close(
                    w, ref["weights"][name], **WEIGHT_TOL, msg=f"{layout} {name}"
                )
                names.add(name)
        assert names == set(ref["weights"]), layout
    return report


@pytest.mark.parametrize("family", list(SCHEDULES))
def test_pp2_schedules_and_layouts_train_like_one_process(family, single_runs, tmp_path):
    ref = single_runs[family]
    layouts = {s: [PP2, f"parallel.pp_schedule={s}"] for s in SCHEDULES[family]}
    if family == "llama":  # recomputation inside the stages changes no number
        layouts["1f1b-selective-ac"] = [PP2, "activation_checkpointing=selective"]
    tp_ref = {}
    if family == "deepseek-v3":
        tp_ref = run_distributed(
            _train, 2, family, {"tp2": ["parallel.tp=2"]}, str(tmp_path), timeout=300
        )[0]
    two = run_distributed(_train, 2, family, layouts, str(tmp_path), timeout=300)
    four = run_distributed(_train, 4, family, LAYOUTS_4[family], str(tmp_path), timeout=300)
    held = {k: v for k, v in four[0].items() if k in TP_REFERENCE and tp_ref}
    report = _check(family, two, ref)
    report |= _check(family, [{k: v for k, v in r.items() if k not in held} for r in four], ref)
    for layout, run in held.items():
        want = tp_ref[TP_REFERENCE[layout]]
        report[layout] = max_rel(run["losses"], want["losses"])
        for key in STAGE_METRICS:
            for s, line in want["metrics"].items():
                got = run["metrics"][s][key]
                assert got == pytest.approx(line[key], rel=LOSS_RTOL), (layout, key)
    print(
        f"\n{family}: max relative loss difference vs one process over {STEPS} steps: "
        + ", ".join(f"{k} {v:.1e}" for k, v in report.items())
    )
    assert max(report.values()) <= LOSS_RTOL, report


# -- checkpoints ----------------------------------------------------------------------------


def _stop_and_resume(rank: int, world: int, root: str) -> dict:
    """pp=2 (tied embedding): a full run saving at step 5, and a second run resuming there."""
    full = Trainer(_cfg("gpt2", f"{root}/full", "parallel.pp=2", "checkpoint.save_every=5"))
    full_losses = full.train().losses
    resumed = Trainer(
        _cfg(
            "gpt2",
            f"{root}/resumed",
            "parallel.pp=2",
            f"checkpoint.load={root}/full/checkpoints/step_5",
        )
    )
    return {"full": full_losses, "resumed": resumed.train().losses}


def test_pp2_checkpoint_resumes_exactly_and_on_one_process(single_runs, tmp_path):
    got = run_distributed(_stop_and_resume, 2, str(tmp_path), timeout=300)
    full, resumed = got[0]["full"], got[0]["resumed"]
    assert got[1]["resumed"] == resumed
    assert sorted(resumed) == list(range(6, STEPS + 1))
    assert all(resumed[s] == full[s] for s in resumed), (full, resumed)  # bit-exact

    # Full-model names in the checkpoint: the pp=2 save loads into the one-process model.
    ckpt = tmp_path / "full/checkpoints/step_5"
    one = Trainer(_cfg("gpt2", tmp_path / "one", f"checkpoint.load={ckpt}")).train()
    assert sorted(one.losses) == list(range(6, STEPS + 1))
    for s in one.losses:
        assert one.losses[s] == pytest.approx(full[s], rel=LOSS_RTOL), s
        assert one.losses[s] == pytest.approx(single_runs["gpt2"]["losses"][s], rel=LOSS_RTOL)


def _evaluate(rank: int, world: int, root: str) -> float:
    trainer = Trainer(
        _cfg(
            "llama", root, "parallel.pp=2", "train.max_steps=1", "parallel.pp_schedule=interleaved"
        )
    )
    return trainer.evaluate()


def test_pp2_evaluation_matches_one_process(tmp_path):
    one = Trainer(_cfg("llama", tmp_path / "one", "train.max_steps=1")).evaluate()
    got = run_distributed(_evaluate, 2, str(tmp_path / "pp"), timeout=120)
    assert got[0] == got[1]
    assert got[0] == pytest.approx(one, rel=1e-6)


def _fp16(rank: int, world: int, root: str) -> dict:
    Trainer(_cfg("llama", root, "parallel.pp=2", "precision=fp16")).train()
    return _metrics(root)


def test_pp2_fp16_loss_scaling_matches_one_process(tmp_path):
    """The pipelined backward runs on the scaled loss; the strategy unscales before clipping.
    The norms agree to 1e-7 at step 1; afterwards fp16 activations round the layouts' 1e-7
    weight differences into ~1e-4 differences of single gradients (the losses stay ~2e-6)."""
    Trainer(_cfg("llama", tmp_path / "one", "precision=fp16")).train()
    want = _metrics(tmp_path / "one")
    got = run_distributed(_fp16, 2, str(tmp_path / "pp"), timeout=120)[0]
    for s, line in want.items():
        assert got[s]["loss"] == pytest.approx(line["loss"], rel=LOSS_RTOL), s
        assert got[s]["loss_scale"] == line["loss_scale"]
        assert got[s]["grad_norm"] == pytest.approx(line["grad_norm"], rel=1e-6 if s == 1 else 1e-3)
