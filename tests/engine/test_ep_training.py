"""Expert parallelism through the real Trainer trains like one process (gloo, fp32, 10 steps).

Mixtral-tiny (4 experts top-2, softmax, aux loss) and DeepSeek-V3-tiny (8 experts top-2 + 1
shared, sigmoid, group-limited routing, aux-loss-free bias, an MoE layer inside MTP) under
ep=2 (dp=2, DDP), and on 4 ranks ep=2 x tp=2, ep=4 and ep=2 x edp=2 (two replicas of each
expert shard: DeepSeek under DDP, Mixtral under FSDP2 stage 3) and, for Mixtral, ep=2 x pp=2
(one MoE layer per pipeline stage): per-step losses
within 1e-5 relative of one process, every rank's experts as one process's slice of them, and
the aux-loss-free router bias bit-identical on every rank (and to one process). A capacity
limit drops the same copies as one process. Checkpoints: an ep=2 run stopped at step 5 resumes
bit-exactly (DDP and FSDP2), and the ep=2 checkpoint resumes on one process (ep=1) within the
layout tolerance. The expert-load plot tool draws one panel per MoE layer from metrics.jsonl.

Micro-batches of 2 sequences: one process accumulates 4 per step, each of 2 dp ranks 2, each
of 4 dp ranks 1.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from evoformer.config import load_config
from evoformer.config.validate import validate
from evoformer.distributed.testing import run_distributed
from evoformer.engine import Trainer
from evoformer.errors import UserError
from evoformer.parallel.sharding import ShardSpec, shard_spec
from tests.conftest import REPO
from tests.engine.parity import grad_norms, max_rel, parity_run, router_biases

STEPS = 10
LOSS_RTOL = 1e-5
# Final expert weights: the all-to-all changes only the order in which each expert's gradient
# sums its tokens, and AdamW turns that rounding into ~1e-7 steps (see test_tp_training).
WEIGHT_TOL = {"rtol": 1e-4, "atol": 2e-4}
WEIGHT_MEAN_ATOL = 1e-6

COMMON = [
    *parity_run(STEPS),
    "optim.grad_clip=0.5",  # below the norms of the first steps: clipping acts
]
FAMILIES = {
    "mixtral": ("mixtral", []),
    "deepseek-v3": ("deepseek-v3", []),
    "deepseek-v2": ("deepseek-v2", []),  # softmax, groups limited by their best expert
    "mixtral-capacity": ("mixtral", ["model.moe.capacity_factor=1.0"]),
}
LAYOUTS_2 = {"ep2": ["parallel.ep=2"]}
LAYOUTS_4 = {
    "ep2xtp2": ["parallel.ep=2", "parallel.tp=2"],
    "ep4": ["parallel.ep=4"],
}
# ep=2 on 4 ranks: two replicas of each expert shard (edp=2), reduced by DDP's expert path for
# one family and by FSDP2 (experts sharded over edp) for the other.
EDP_4 = {
    "mixtral": {
        "ep2xedp2-fsdp2": ["parallel.ep=2", "zero.backend=fsdp2", "zero.stage=3"],
        # Two pipeline stages of one MoE layer each, experts over ep within each stage.
        "ep2xpp2": ["parallel.ep=2", "parallel.pp=2"],
    },
    "deepseek-v3": {"ep2xedp2": ["parallel.ep=2"]},
}


def _cfg(family: str, out_dir, *overrides: str):
    name, extra = FAMILIES[family]
    return load_config(
        [str(REPO / f"configs/models/tiny/{name}.yaml")],
        [*COMMON, *extra, f"run.output_dir={out_dir}", *overrides],
    )


def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def _experts(model) -> dict[str, tuple[int, int | None, torch.Tensor]]:
    """Each stacked expert tensor: (index of this rank's first expert, the dim split over TP
    (tp rank 0 holds its first slice), this rank's tensor)."""
    out = {}
    for name, p in model.named_parameters():
        if ".experts." in name:
            t = _local(p.detach()).clone()
            spec = shard_spec(p) or ShardSpec()
            tp_dim = spec.tp.dim if spec.tp is not None else None
            out[name] = (spec.ep_rank * t.shape[0], tp_dim, t)
    return out


def _train(rank: int, world: int, family: str, layouts: dict, root: str) -> dict:
    out = {}
    for name, overrides in layouts.items():
        trainer = Trainer(_cfg(family, f"{root}/{name}", *overrides))
        result = trainer.train()
        tp_rank = trainer.dims.tp_rank
        out[name] = {
            "losses": result.losses,
            # Under tp=2 the experts' hidden dim is split too: compare tp rank 0's experts only.
            "experts": _experts(trainer.model) if tp_rank == 0 else {},
            "bias": router_biases(trainer.model),
        }
    return out


@pytest.fixture(scope="module")
def single_runs(tmp_path_factory) -> dict:
    runs = {}
    for family in FAMILIES:
        out = tmp_path_factory.mktemp(family) / "one"
        trainer = Trainer(_cfg(family, out))
        result = trainer.train()
        runs[family] = {
            "losses": result.losses,
            "experts": _experts(trainer.model),
            "bias": router_biases(trainer.model),
            "metrics": out / "metrics.jsonl",
        }
    return runs


def _compare(ref: dict, ranks: list[dict]) -> dict[str, float]:
    report = {}
    for layout in ranks[0]:
        for rank_out in ranks:
            run = rank_out[layout]
            report[layout] = max(report.get(layout, 0.0), max_rel(run["losses"], ref["losses"]))
            # Aux-loss-free bias: moved by globally reduced loads, so bit-identical everywhere.
            assert run["bias"].keys() == ref["bias"].keys()
            for name, bias in ref["bias"].items():
                assert torch.equal(run["bias"][name], bias), (layout, name)
            for name, (first, tp_dim, got) in run["experts"].items():
                want = ref["experts"][name][2][first : first + got.shape[0]]
                if tp_dim is not None:
                    want = want.narrow(tp_dim, 0, got.shape[tp_dim])
                torch.testing.assert_close(got, want, **WEIGHT_TOL, msg=f"{layout} {name}")
                assert (got - want).abs().mean() < WEIGHT_MEAN_ATOL, (layout, name)
    return report


@pytest.mark.parametrize(
    "family, world",
    [("mixtral", 2), ("mixtral", 4), ("deepseek-v3", 2), ("deepseek-v3", 4), ("deepseek-v2", 2)],
)
def test_ep_layouts_train_like_one_process(family, world, single_runs, tmp_path):
    ref = single_runs[family]
    layouts = LAYOUTS_2 if world == 2 else LAYOUTS_4 | EDP_4[family]
    ranks = run_distributed(_train, world, family, layouts, str(tmp_path), timeout=240)
    report = _compare(ref, ranks)
    assert set(report) == set(layouts)
    print(
        f"\n{family}: max relative loss difference vs one process over {STEPS} steps: "
        + ", ".join(f"{k} {v:.1e}" for k, v in report.items())
    )
    assert max(report.values()) <= LOSS_RTOL, report
    # The clipped-to norm counts every expert once (summed over ep, tp, the FSDP2 mesh): the
    # logged gradient norms are one process's. optim.grad_clip=0.5 clips every step here.
    want = grad_norms(ref["metrics"].parent)
    assert min(want) > 0.5
    for layout in layouts:
        got = grad_norms(tmp_path / layout)
        assert got == pytest.approx(want, rel=LOSS_RTOL), layout
    # Every rank's experts were compared (tp rank 0 of each ep rank): all experts are covered.
    for layout in layouts:
        firsts = {f for r in ranks for f, _, _ in r[layout]["experts"].values()}
        ep = next(int(o.split("=")[1]) for o in layouts[layout] if o.startswith("parallel.ep"))
        assert len(firsts) == ep, (layout, firsts)


def test_capacity_drops_the_copies_one_process_drops(single_runs, tmp_path):
    ref = single_runs["mixtral-capacity"]
    two = run_distributed(_train, 2, "mixtral-capacity", LAYOUTS_2, str(tmp_path), timeout=180)
    assert max(_compare(ref, two).values()) <= LOSS_RTOL

    def dropped(path) -> list[int]:
        lines = [json.loads(line) for line in path.read_text().splitlines()]
        return [line["moe/L0/dropped_tokens"] for line in lines if "loss" in line]

    one, ep = dropped(ref["metrics"]), dropped(tmp_path / "ep2/metrics.jsonl")
    assert len(one) == STEPS and sum(one) > 0  # the limit bites
    assert ep == one


# -- checkpoints ----------------------------------------------------------------------------


def _stop_and_resume(rank: int, world: int, root: str, extra: list[str]) -> dict:
    ov = ["parallel.ep=2", *extra]
    full = Trainer(_cfg("deepseek-v3", f"{root}/full", *ov, "checkpoint.save_every=5")).train()
    resumed = Trainer(
        _cfg(
            "deepseek-v3", f"{root}/resumed", *ov, f"checkpoint.load={root}/full/checkpoints/step_5"
        )
    ).train()
    return {"full": full.losses, "resumed": resumed.losses}


@pytest.mark.parametrize("backend", ["ddp", "fsdp2"])
def test_ep_checkpoint_resumes_exactly_and_on_one_process(backend, single_runs, tmp_path):
    extra = [] if backend == "ddp" else ["zero.backend=fsdp2", "zero.stage=2"]
    got = run_distributed(_stop_and_resume, 2, str(tmp_path), extra, timeout=180)[0]
    full, resumed = got["full"], got["resumed"]
    assert sorted(resumed) == list(range(6, STEPS + 1))
    assert all(resumed[s] == full[s] for s in resumed), (full, resumed)  # bit-exact
    assert max_rel(full, single_runs["deepseek-v3"]["losses"]) <= LOSS_RTOL

    # The ep=2 checkpoint holds all 8 experts of each layer: it resumes at ep=1.
    ckpt = tmp_path / "full/checkpoints/step_5"
    one = Trainer(_cfg("deepseek-v3", tmp_path / "one", f"checkpoint.load={ckpt}")).train()
    assert sorted(one.losses) == list(range(6, STEPS + 1))
    for s in one.losses:
        assert one.losses[s] == pytest.approx(full[s], rel=LOSS_RTOL), s


# -- validation and the load plot ---------------------------------------------------------------


def test_ep_must_divide_the_routed_experts(tmp_path):
    with pytest.raises(UserError, match=r"parallel.ep=3.*must divide model.moe.num_experts=4"):
        validate(_cfg("mixtral", tmp_path, "parallel.ep=3"))
    with pytest.raises(UserError, match="needs an MoE model"):
        validate(load_config([str(REPO / "configs/models/tiny/llama.yaml")], ["parallel.ep=2"]))


def test_expert_load_plot_has_a_panel_per_moe_layer(single_runs, tmp_path):
    out = tmp_path / "load.svg"
    metrics = single_runs["deepseek-v3"]["metrics"]
    subprocess.run(
        [sys.executable, str(REPO / "tools/plot_expert_load.py"), str(metrics), "-o", str(out)],
        check=True,
        capture_output=True,
        text=True,
    )
    svg = out.read_text()
    # DeepSeek-V3-tiny: MoE layers 1 and 2 and the MTP block's (layer 3), 8 experts each.
    assert svg.count('class="panel"') == 3
    for layer in (1, 2, 3):
        assert f"layer {layer}" in svg
    assert svg.count('class="series"') == 3 * 8
    # Each series has one point per logged step.
    first = svg.split('class="series"')[1]
    points = first.split('points="')[1].split('"')[0].split()
    assert len(points) == STEPS
