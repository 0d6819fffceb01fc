"""ZeRO through DeepSpeed (``zero.backend=deepspeed``) trains like DDP and one process (gloo, fp32).

Tiny LLaMA, 10 steps, global batch 8 of micro-batches of 2 (each of the 2 dp ranks accumulates
2 micro-batches per step), gradient clipping at 0.5 acting on every step. DeepSpeed stages 0-3,
stage 2 with the optimizer offloaded to the CPU and stage 3 with parameters offloaded give the
per-step losses of one process and of DDP within 1e-5 relative, and the gradient norm DeepSpeed
clips with is one process's (stage 0, DeepSpeed's plain data parallelism, clips with ours).
Per-rank model-state bytes: stage 1 holds half of DDP's AdamW moments, stage 3 half of its
parameters. tp=2 x dp=2 with stage 1, and with stage 3 + sequence parallelism (our TP as
DeepSpeed's mpu), matches one process.
Stopping at step 5 and resuming is bit-exact under stages 1, 2 and 3, and ``load_model`` reads the
weights of a DeepSpeed checkpoint.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from evoformer.config import load_config
from evoformer.config.validate import validate
from evoformer.distributed.testing import run_distributed
from evoformer.engine import Trainer
from evoformer.engine.deepspeed import deepspeed_config
from evoformer.errors import UserError
from tests.conftest import REPO
from tests.engine.parity import grad_norms, max_rel, parity_run

STEPS = 10
LOSS_RTOL = 1e-5
TINY = str(REPO / "configs/models/tiny/llama.yaml")
COMMON = [
    *parity_run(STEPS),
    "optim.grad_clip=0.5",  # below the ~0.85 norms: clipping acts on every step
]
DS = ["zero.backend=deepspeed"]
LAYOUTS = {
    "ddp": [],
    "ds0": [*DS, "zero.stage=0"],
    "ds1": [*DS, "zero.stage=1"],
    "ds2": [*DS, "zero.stage=2"],
    "ds3": [*DS, "zero.stage=3"],
    "ds2-offload-optimizer": [*DS, "zero.stage=2", "zero.offload_optimizer=cpu"],
    "ds3-offload-param": [*DS, "zero.stage=3", "zero.offload_param=cpu"],
}


# bf16 (DeepSpeed casts the model to bf16, fp32 master weights and reduction) tracks fp32.
BF16 = {"ds2-bf16": [*DS, "zero.stage=2", "precision=bf16"]}
BF16_RTOL = 2e-3


def _cfg(out_dir, *overrides: str):
    return load_config([TINY], [*COMMON, f"run.output_dir={out_dir}", *overrides])


def _bytes(trainer: Trainer) -> dict[str, int]:
    """Bytes per kind of what this rank holds after the last step (storages counted once)."""
    from evoformer.engine.memory import local_bytes

    return local_bytes(trainer.strategy.local_tensors())


def _train(rank: int, world: int, root: str, layouts: dict[str, list[str]]) -> dict:
    out = {}
    for name, overrides in layouts.items():
        trainer = Trainer(_cfg(f"{root}/{name}", *overrides))
        result = trainer.train()
        out[name] = {"losses": result.losses, "bytes": _bytes(trainer)}
    return out


def test_deepspeed_stages_train_like_ddp_and_one_process(tmp_path):
    ref = Trainer(_cfg(tmp_path / "one")).train().losses
    ranks = run_distributed(_train, 2, str(tmp_path), LAYOUTS | BF16, timeout=300)
    bf16 = max_rel(ranks[0].pop("ds2-bf16")["losses"], ref)
    print(f"\ndeepspeed stage 2 bf16 vs fp32 one process: {bf16:.1e}")
    assert bf16 <= BF16_RTOL
    report = {name: max_rel(run["losses"], ref) for name, run in ranks[0].items()}
    report |= {
        f"{name} vs ddp": max_rel(run["losses"], ranks[0]["ddp"]["losses"])
        for name, run in ranks[0].items()
        if name != "ddp"
    }
    print(
        "\nmax relative loss difference vs one process over 10 steps: "
        + ", ".join(f"{k} {v:.1e}" for k, v in report.items())
    )
    assert max(report.values()) <= LOSS_RTOL, report
    # The norm DeepSpeed reports (and clips with) is one process's norm.
    want = grad_norms(tmp_path / "one")
    assert len(want) == STEPS
    for name in LAYOUTS:
        assert grad_norms(tmp_path / name) == pytest.approx(want, rel=1e-5), name
    for name in LAYOUTS:  # the dp ranks report the same (all-reduced) losses
        assert ranks[1][name]["losses"] == ranks[0][name]["losses"], name
    for rank_out in ranks:
        rank_out.pop("ds2-bf16", None)
        ddp, s1, s3 = (rank_out[k]["bytes"] for k in ("ddp", "ds1", "ds3"))
        print(f"per-rank bytes ddp {ddp}, deepspeed stage 1 {s1}, stage 3 {s3}")
        assert ddp["param"] > 0 and ddp["optim"] == 2 * ddp["param"]  # AdamW: m and v
        # Stage 1: AdamW moments (and the fp32 master copy) of this rank's half only; the
        # model's weights stay whole. DeepSpeed pads each partition to an alignment: 1 %.
        assert s1["optim"] / ddp["optim"] == pytest.approx(0.5, abs=0.01), (ddp, s1)
        assert s1["master"] / ddp["param"] == pytest.approx(0.5, abs=0.01), (ddp, s1)
        assert s1["param"] == ddp["param"]
        # Stage 3: the parameters are partitioned too.
        assert s3["param"] / ddp["param"] == pytest.approx(0.5, abs=0.01), (ddp, s3)
        assert s3["optim"] / ddp["optim"] == pytest.approx(0.5, abs=0.01), (ddp, s3)
    total = sum(r["ds3"]["bytes"]["param"] for r in ranks)
    assert total == pytest.approx(ranks[0]["ddp"]["bytes"]["param"], rel=0.01)


def test_deepspeed_tensor_parallel_mpu_matches_one_process(tmp_path):
    """tp=2 x dp=2: DeepSpeed reduces over our dp group and sums only the TP-sharded
    parameters' squared norms over the tp group (replicated ones once); with sequence
    parallelism too."""
    ref = Trainer(_cfg(tmp_path / "one")).train().losses
    want = grad_norms(tmp_path / "one")
    layouts = {
        "tp2-ds1": [*DS, "zero.stage=1", "parallel.tp=2"],
        # SP: the norm weights' partial gradients are summed over TP before DeepSpeed sees them
        # (without that sum: 3.5e-5 loss and 2e-3 grad-norm differences).
        "tp2-sp-ds3": [*DS, "zero.stage=3", "parallel.tp=2", "parallel.sequence_parallel=true"],
    }
    ranks = run_distributed(_train, 4, str(tmp_path), layouts, timeout=300)
    for name in layouts:
        rel = max_rel(ranks[0][name]["losses"], ref)
        print(f"\n{name} (tp 2 x dp 2): max relative loss difference {rel:.1e}")
        assert rel <= LOSS_RTOL, name
        assert grad_norms(tmp_path / name) == pytest.approx(want, rel=1e-5), name
        assert all(r[name]["losses"] == ranks[0][name]["losses"] for r in ranks), name


def _stop_and_resume(rank: int, world: int, root: str) -> dict:
    out = {}
    for stage in (1, 2, 3):
        layout = [*DS, f"zero.stage={stage}"]
        trainer = Trainer(_cfg(f"{root}/full{stage}", *layout, "checkpoint.save_every=5"))
        full = trainer.train()
        weights = {k: v.clone() for k, v in trainer.strategy._consolidated_weights().items()}
        resumed = Trainer(
            _cfg(
                f"{root}/resumed{stage}",
                *layout,
                f"checkpoint.load={root}/full{stage}/checkpoints/step_5",
            )
        ).train()
        out[stage] = {"full": full.losses, "resumed": resumed.losses, "weights": weights}
    return out


def test_deepspeed_checkpoint_resumes_exactly_and_loads_for_inference(tmp_path):
    from evoformer.checkpoint import load_model

    got = run_distributed(_stop_and_resume, 2, str(tmp_path), timeout=300)[0]
    for stage, run in got.items():
        full, resumed = run["full"], run["resumed"]
        assert sorted(resumed) == list(range(6, STEPS + 1)), stage
        assert all(resumed[s] == full[s] for s in resumed), (stage, full, resumed)  # bit-exact
        ckpt = tmp_path / f"full{stage}/checkpoints/step_10"
        assert (ckpt / "deepspeed").is_dir()
        # The DCP weights are the trained model (ZeRO-3: consolidated from the partitions).
        model = load_model(ckpt)
        state = model.state_dict()
        for name, want in run["weights"].items():
            assert torch.equal(state[name], want), (stage, name)
        logits = model(torch.zeros(1, 4, dtype=torch.long))
        assert logits.shape == (1, 4, model.cfg.vocab_size)


def test_deepspeed_config_is_generated_from_ours(tmp_path):
    cfg = _cfg(
        tmp_path,
        *DS,
        "zero.stage=3",
        "zero.offload_optimizer=cpu",
        "zero.offload_param=nvme",
        "zero.nvme_path=/nvme",
        "precision=bf16",
        "zero.deepspeed_config={zero_optimization: {reduce_bucket_size: 1000}, "
        "activation_checkpointing: {partition_activations: true}}",
    )
    validate(cfg)
    ds = deepspeed_config(cfg, dp=2)
    assert ds["train_batch_size"] == 8 and ds["train_micro_batch_size_per_gpu"] == 2
    assert ds["gradient_accumulation_steps"] == 2 and ds["gradient_clipping"] == 0.5
    zero = ds["zero_optimization"]
    assert zero["stage"] == 3 and zero["reduce_bucket_size"] == 1000  # raw key merged in
    assert zero["offload_optimizer"]["device"] == "cpu"
    assert zero["offload_param"] == {"device": "nvme", "pin_memory": False, "nvme_path": "/nvme"}
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert ds["activation_checkpointing"] == {"partition_activations": True}
    assert ds["zero_force_ds_cpu_optimizer"] is False  # our torch AdamW, no compiled ops
    fp16 = deepspeed_config(_cfg(tmp_path, *DS, "zero.stage=1", "precision=fp16"), dp=4)["fp16"]
    assert fp16 == {
        "enabled": True,
        "loss_scale": 0,
        "initial_scale_power": 16,
        "loss_scale_window": 1000,
        "min_loss_scale": 1.0,
        "hysteresis": 1,
    }


def test_deepspeed_recipe_validates(tmp_path):
    recipe = REPO / "configs/parallel/deepspeed-zero3-offload.yaml"
    cfg = load_config([TINY, str(recipe)], [f"run.output_dir={tmp_path}"])
    validate(cfg)
    zero = deepspeed_config(cfg, dp=8)["zero_optimization"]
    assert zero["stage"] == 3 and zero["overlap_comm"] is True
    assert zero["offload_param"]["device"] == zero["offload_optimizer"]["device"] == "cpu"


def _refuse_foreign_checkpoints(rank: int, world: int, root: str) -> list[str]:
    from evoformer.engine.deepspeed import DeepSpeedStrategy

    trainer = Trainer(_cfg(f"{root}/ddp", "train.max_steps=1", "checkpoint.save_final=true"))
    ckpt = trainer.train().output_dir / "checkpoints/step_1"
    ds = DeepSpeedStrategy(_cfg(root, *DS), trainer.dims, trainer.groups, trainer.device)
    errors = []
    for make_deepspeed_like in (False, True):
        if make_deepspeed_like and rank == 0:  # a DeepSpeed folder, but saved at another dp
            (ckpt / "deepspeed").mkdir()
            state = json.loads((ckpt / "trainer.json").read_text())
            state["strategy"] = {"backend": "deepspeed", "stage": 1, "dp": 4}
            (ckpt / "trainer.json").write_text(json.dumps(state))
        torch.distributed.barrier()
        try:
            ds.load_checkpoint(ckpt)  # both refusals come before DeepSpeed is touched
        except UserError as err:
            errors.append(str(err))
    try:  # and the other way round: DDP does not take a DeepSpeed checkpoint for its own
        trainer.strategy.load_checkpoint(ckpt)
    except UserError as err:
        errors.append(str(err))
    return errors


def test_deepspeed_refuses_foreign_checkpoints_in_one_line(tmp_path):
    errors = run_distributed(_refuse_foreign_checkpoints, 2, str(tmp_path), timeout=120)[0]
    assert len(errors) == 3, errors
    assert "not saved with zero.backend=deepspeed" in errors[0]
    assert "saved at dp=4 cannot resume at dp=2" in errors[1]
    assert "resume it with zero.backend=deepspeed" in errors[2]


@pytest.mark.parametrize(
    "overrides, message",
    [
        ([*DS, "zero.stage=1", "parallel.pp=2"], "does not run with pipeline parallelism"),
        ([*DS, "zero.stage=2", "zero.offload_param=cpu"], "needs zero.stage=3"),
        ([*DS, "zero.stage=0", "zero.offload_optimizer=cpu"], "needs zero.stage 1, 2 or 3"),
        ([*DS, "zero.stage=3", "zero.offload_param=disk"], "must be one of none, cpu, nvme"),
        ([*DS, "zero.stage=3", "zero.offload_param=nvme"], "needs a folder on an NVMe"),
        (["zero.offload_optimizer=cpu"], "offload needs zero.backend=deepspeed"),
        ([*DS, "zero.stage=4"], "needs zero.stage 0, 1, 2 or 3"),
        (
            [*DS, "zero.stage=1", "zero.deepspeed_config={gradient_clipping: 2.0}"],
            "is set by evoformer from optim.grad_clip",
        ),
        (
            [*DS, "zero.stage=1", "zero.deepspeed_config={zero_optimization: {stage: 2}}"],
            "is set by evoformer from zero.stage",
        ),
    ],
)
def test_bad_deepspeed_settings_are_one_line_errors(overrides, message, tmp_path):
    with pytest.raises(UserError, match=message):
        validate(_cfg(tmp_path, *overrides))


def test_cli_refuses_deepspeed_with_pipeline_in_one_line(tmp_path):
    # One subprocess (a Python + torch start-up); the other refusals share the validation path
    # tested above.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "evoformer",
            "train",
            TINY,
            *DS,
            "zero.stage=1",
            "parallel.pp=2",
            f"run.output_dir={tmp_path}",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert "parallel.pp=2" in lines[0] and "pipeline parallelism" in lines[0], lines


class _PlantsAMarker:
    """Unpickling this runs a shell command that creates a file: what a malicious checkpoint
    would do with something worse."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("stage", [1, 3])
def test_a_malicious_deepspeed_checkpoint_is_refused_without_running_code(tmp_path, stage):
    """DeepSpeed's own files load with weights_only=True and an allow-list of its record types:
    a pickle that would run code is refused in one line and never runs; a normal resume works
    (the bit-exact resumes above go through the same safe load)."""
    layout = [*DS, f"zero.stage={stage}", "train.micro_batch_size=4", "checkpoint.save_final=true"]
    Trainer(_cfg(tmp_path / "run", *layout, "train.max_steps=2")).train()
    ckpt = tmp_path / "run/checkpoints/step_2"
    ok = Trainer(_cfg(tmp_path / "ok", *layout, f"checkpoint.load={ckpt}", "train.max_steps=3"))
    assert ok.train().step == 3  # the allow-list covers what DeepSpeed itself writes
    marker = tmp_path / "pwned"
    for victim in sorted((ckpt / "deepspeed").glob("*.pt")):
        state = torch.load(victim, weights_only=False)  # our own file, known to be safe
        state["payload"] = _PlantsAMarker(marker)
        torch.save(state, victim)
    trainer = Trainer(
        _cfg(tmp_path / "resumed", *layout, f"checkpoint.load={ckpt}", "train.max_steps=3")
    )
    with pytest.raises(UserError) as err:
        trainer.train()
    line = str(err.value)
    assert "\n" not in line
    assert line.startswith(f"DeepSpeed checkpoint file {ckpt / 'deepspeed'}")
    assert "outside the allow-list (it names posix.system)" in line
    assert "refusing to load it" in line
    assert not marker.exists()
