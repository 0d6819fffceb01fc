"""Tensor + data parallelism through the real Trainer train like one process (gloo, fp32).

For a dense GQA model (and its MQA variant, KV heads replicated), OLMo 2 (QK-norm over the full
projection), GPT-2 (biases, learned positions, tied head), DeepSeek-V3-tiny (MLA, MoE with
aux-loss-free bias, MTP), SmolLM3-tiny (a NoPE layer, one KV head replicated under tp=2) and OLMo
3-tiny (windows, YaRN on the full layers): 10 steps under tp=2 (sequence parallelism off and on),
dp=2 and tp=2 x dp=2 (SP on) give the per-step losses of one process within 1e-5 relative and the
same final weights. Checkpoints: stop at step 5 under tp=2 x dp=2 and resume, bit-exact; resume
the same tp=2 checkpoint on one process, and a one-process checkpoint on tp=2 + SP with dropout,
within the layout tolerance.

Each family costs one 2-rank run (three layouts in a row) and one 4-rank run; micro-batches of
2 sequences, so one process accumulates 4 micro-batches per step and dp=2 ranks 2 each.
"""

from __future__ import annotations

import pytest
import torch

from evoformer.config import load_config
from evoformer.distributed.testing import run_distributed
from evoformer.engine import Trainer
from evoformer.parallel.layers import gather_full_params
from tests.conftest import REPO
from tests.engine.parity import max_rel, parity_run, router_biases

STEPS = 10
LOSS_RTOL = 1e-5
# Final weights. TP sums partial products in another order, so every gradient carries an
# absolute rounding error of ~1e-7 of its tensor's largest element; AdamW divides each element by
# its own running RMS, which turns that error into a visible step for elements whose gradient is
# tiny (rare tokens' embedding rows): single elements then differ by up to ~7e-5 after 10 steps
# at lr 3e-3 (2 % of one step). A systematic error (a missing reduction, a wrong weight-decay
# group) moves whole tensors instead, so the mean absolute difference per tensor is held to
# 1e-6 (the runs here show <= 2e-7) and every element to 2e-4.
WEIGHT_TOL = {"rtol": 1e-4, "atol": 2e-4}
WEIGHT_MEAN_ATOL = 1e-6

FAMILIES = {
    "llama": ("llama", []),
    "llama-mqa": ("llama", ["model.attention.n_kv_heads=1"]),
    "olmo2": ("olmo2", []),
    "gpt2": ("gpt2", []),
    "deepseek-v3": ("deepseek-v3", []),
    "smollm3": ("smollm3", []),  # a NoPE layer, one KV head under tp=2
    # 16-token windows past seq 32, YaRN on the full layers only. With eps 1e-8 one embedding
    # element sees a near-zero gradient whose rounding AdamW blows up to a 5e-3 weight change
    # (losses still 6e-7); eps 1e-4 keeps the comparison about the model (weights 7e-7).
    "olmo3": ("olmo3", ["optim.eps=1e-4"]),
}
COMMON = [
    *parity_run(STEPS),
]
LAYOUTS_2 = {
    "tp2": ["parallel.tp=2"],
    "tp2-sp": ["parallel.tp=2", "parallel.sequence_parallel=true"],
    "dp2": [],
}
LAYOUTS_4 = {"tp2xdp2-sp": ["parallel.tp=2", "parallel.sequence_parallel=true"]}


def _cfg(family: str, out_dir, *overrides: str):
    name, extra = FAMILIES[family]
    return load_config(
        [str(REPO / f"configs/models/tiny/{name}.yaml")],
        [*COMMON, *extra, f"run.output_dir={out_dir}", *overrides],
    )


def _train(rank: int, world: int, family: str, layouts: dict, root: str) -> dict:
    """Train each layout in turn on this world; rank 0 returns losses and gathered weights."""
    out = {}
    for name, overrides in layouts.items():
        trainer = Trainer(_cfg(family, f"{root}/{name}", *overrides))
        result = trainer.train()
        weights = gather_full_params(trainer.model, trainer.groups.tp_group)
        out[name] = {
            "losses": result.losses,
            "weights": weights if rank == 0 else None,
            "bias": router_biases(trainer.model),
        }
    return out


@pytest.fixture(scope="module")
def single_runs(tmp_path_factory) -> dict:
    runs = {}
    for family in FAMILIES:
        trainer = Trainer(_cfg(family, tmp_path_factory.mktemp(family) / "one"))
        result = trainer.train()
        runs[family] = {
            "losses": result.losses,
            "model": trainer.model,
            "bias": router_biases(trainer.model),
        }
    return runs


@pytest.mark.parametrize("family", list(FAMILIES))
def test_tp_and_dp_layouts_train_like_one_process(family, single_runs, tmp_path):
    ref = single_runs[family]
    two = run_distributed(_train, 2, family, LAYOUTS_2, str(tmp_path), timeout=120)
    four = run_distributed(_train, 4, family, LAYOUTS_4, str(tmp_path), timeout=120)
    # The router biases move by sign(mean load - load): identical on every rank and as on one
    # process, because every TP rank routes all tokens and the loads are summed over dp.
    for ranks in (two, four):
        for layout in ranks[0]:
            for rank_out in ranks:
                for name, bias in ref["bias"].items():
                    assert torch.equal(rank_out[layout]["bias"][name], bias), (layout, name)
    runs = two[0] | four[0]
    report = {}
    for layout, run in runs.items():
        report[layout] = max_rel(run["losses"], ref["losses"])
        for name, p in ref["model"].named_parameters():
            got, want = run["weights"][name], p.detach()
            torch.testing.assert_close(got, want, **WEIGHT_TOL, msg=f"{layout} {name}")
            # The key bias gets a zero gradient in exact arithmetic (the softmax ignores a shift
            # shared by all keys): in every run it is AdamW-amplified rounding noise (~1e-6).
            if not name.endswith("k_proj.bias"):
                assert (got - want).abs().mean() < WEIGHT_MEAN_ATOL, (layout, name)
    print(
        f"\n{family}: max relative loss difference vs one process over {STEPS} steps: "
        + ", ".join(f"{k} {v:.1e}" for k, v in report.items())
    )
    assert max(report.values()) <= LOSS_RTOL, report
    # Sequence parallelism on and off agree with each other as closely as with one process.
    assert max_rel(runs["tp2-sp"]["losses"], runs["tp2"]["losses"]) <= LOSS_RTOL


# -- checkpoints ----------------------------------------------------------------------------


def _stop_and_resume(rank: int, world: int, root: str) -> dict:
    """tp=2 x dp=2: a full run saving at step 5, and a second run resuming from that save."""
    full = Trainer(
        _cfg("deepseek-v3", f"{root}/full", *LAYOUTS_4["tp2xdp2-sp"], "checkpoint.save_every=5")
    ).train()
    resumed = Trainer(
        _cfg(
            "deepseek-v3",
            f"{root}/resumed",
            *LAYOUTS_4["tp2xdp2-sp"],
            f"checkpoint.load={root}/full/checkpoints/step_5",
        )
    ).train()
    return {"full": full.losses, "resumed": resumed.losses}


def test_tp_dp_checkpoint_resumes_exactly_and_on_one_process(single_runs, tmp_path):
    got = run_distributed(_stop_and_resume, 4, str(tmp_path), timeout=120)[0]
    full, resumed = got["full"], got["resumed"]
    assert sorted(resumed) == list(range(6, STEPS + 1))
    assert all(resumed[s] == full[s] for s in resumed), (full, resumed)  # bit-exact

    # The tp=2 x dp=2 checkpoint on one process: DCP reshards the TP shards to full tensors.
    ckpt = tmp_path / "full/checkpoints/step_5"
    one = Trainer(_cfg("deepseek-v3", tmp_path / "one", f"checkpoint.load={ckpt}")).train()
    assert sorted(one.losses) == list(range(6, STEPS + 1))
    ref = single_runs["deepseek-v3"]["losses"]
    for s in one.losses:
        assert one.losses[s] == pytest.approx(full[s], rel=LOSS_RTOL), s
        assert one.losses[s] == pytest.approx(ref[s], rel=LOSS_RTOL), s


def _resume_on_tp2(rank: int, world: int, root: str, ckpt: str) -> dict:
    overrides = ["parallel.tp=2", "parallel.sequence_parallel=true", "model.dropout=0.1"]
    fresh = Trainer(_cfg("llama", f"{root}/tp2", *overrides)).train()
    resumed = Trainer(_cfg("llama", f"{root}/tp2-resumed", *overrides, f"checkpoint.load={ckpt}"))
    return {"fresh": fresh.losses, "resumed": resumed.train().losses}


def test_dropout_and_a_one_process_checkpoint_under_tp2_sp(tmp_path):
    """Residual dropout under tp=2 + SP draws the masks one process draws (the RNG is seeded per
    DP rank, SP keeps its slice of the global mask), and a one-process checkpoint resumes on
    tp=2 with every rank of the TP group restoring the same RNG state."""
    one = Trainer(_cfg("llama", tmp_path / "one", "model.dropout=0.1", "checkpoint.save_every=5"))
    ref = one.train().losses
    ckpt = str(tmp_path / "one/checkpoints/step_5")
    got = run_distributed(_resume_on_tp2, 2, str(tmp_path), ckpt, timeout=120)[0]
    assert max_rel(got["fresh"], ref) <= LOSS_RTOL
    assert sorted(got["resumed"]) == list(range(6, STEPS + 1))
    for s, loss in got["resumed"].items():
        assert loss == pytest.approx(ref[s], rel=LOSS_RTOL), s
