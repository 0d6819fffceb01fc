"""Context parallelism through the real Trainer trains like one process (gloo, fp32, seq 512).

Layouts against one process, 10 steps, per-step losses within 1e-5 relative: cp=2 ring, cp=4
ring and cp=2 all-to-all for a dense GQA model (LLaMA-tiny); cp=2 x tp=2 with sequence
parallelism, cp=2 x dp=2 under FSDP2 stage 3 and cp=2 x pp=2 for the dense model; cp=2 ring for
a sliding-window model (Mistral-tiny, window 100 < a 128-token chunk) and for MLA + MoE + MTP
(DeepSeek-V3-tiny: the MTP module's shifted targets cross the chunk borders). Each world size
is one spawn running its layouts in a row.
"""

from __future__ import annotations

import pytest

from evoformer.config import load_config
from evoformer.distributed.testing import run_distributed
from evoformer.engine import Trainer
from tests.conftest import REPO
from tests.engine.parity import max_rel

STEPS = 10
LOSS_RTOL = 1e-5
SEQ = 512

FAMILIES = {
    "llama": ("llama", []),
    "window": ("mistral", ["model.attention.sliding_window=100"]),
    "deepseek-v3": ("deepseek-v3", []),
}
COMMON = [
    "data.source=synthetic",
    f"train.seq_len={SEQ}",
    f"model.max_seq_len={SEQ}",
    "train.global_batch_size=4",
    "train.micro_batch_size=2",
    f"train.max_steps={STEPS}",
    "train.log_every=1",
    "run.progress=off",
    "optim.warmup_steps=2",
    "optim.lr=3e-3",
    "checkpoint.save_final=false",
]
LAYOUTS_2 = {
    ("llama", "cp2-ring"): ["parallel.cp=2"],
    ("llama", "cp2-alltoall"): ["parallel.cp=2", "parallel.cp_kind=alltoall"],
    ("window", "cp2-ring"): ["parallel.cp=2"],
    ("deepseek-v3", "cp2-ring"): ["parallel.cp=2"],
}
LAYOUTS_4 = {
    ("llama", "cp4-ring"): ["parallel.cp=4"],
    ("llama", "cp2xtp2-sp"): [
        "parallel.cp=2",
        "parallel.tp=2",
        "parallel.sequence_parallel=true",
    ],
    ("llama", "cp2xdp2-fsdp3"): ["parallel.cp=2", "zero.backend=fsdp2", "zero.stage=3"],
    ("llama", "cp2xpp2"): ["parallel.cp=2", "parallel.pp=2", "parallel.pp_schedule=gpipe"],
}


def _cfg(family: str, out_dir, *overrides: str):
    name, extra = FAMILIES[family]
    return load_config(
        [str(REPO / f"configs/models/tiny/{name}.yaml")],
        [*COMMON, *extra, f"run.output_dir={out_dir}", *overrides],
    )


def _train(rank: int, world: int, layouts: dict, root: str) -> dict:
    out = {}
    for (family, name), overrides in layouts.items():
        out[(family, name)] = Trainer(_cfg(family, f"{root}/{family}-{name}", *overrides))
        out[(family, name)] = out[(family, name)].train().losses
    return out


@pytest.fixture(scope="module")
def single_runs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("cp-one")
    return {f: Trainer(_cfg(f, root / f)).train().losses for f in FAMILIES}


@pytest.mark.parametrize("world,layouts", [(2, LAYOUTS_2), (4, LAYOUTS_4)], ids=["w2", "w4"])
def test_cp_layouts_train_like_one_process(world, layouts, single_runs, tmp_path):
    got = run_distributed(_train, world, layouts, str(tmp_path), timeout=300)
    report = {}
    for key in layouts:
        report[key] = max_rel(got[0][key], single_runs[key[0]])
        for rank_out in got[1:]:  # every rank logs the same (global) losses
            assert rank_out[key] == got[0][key], key
    print("\nmax relative loss difference vs one process:", report)
    assert max(report.values()) <= LOSS_RTOL, report
