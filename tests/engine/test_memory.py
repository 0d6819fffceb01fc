"""Memory accounting (engine.memory) and the estimator (`evoformer plan`) against each other.

Tiny LLaMA (158,016 parameters, fp32, AdamW), micro-batches of 4 x 32 tokens. On one process
the measured model state is exact: 4 bytes per parameter for weights and for gradients, 8 for
AdamW's moments. At dp = 2 under DDP and FSDP2 stage 3 every rank's measured parameter,
gradient and optimizer bytes equal the estimator's for the busiest rank within 10 % plus 4 KiB
(FSDP2 pads dim-0 shards: rank 0 holds the larger half), stage 3 holds half of stage 0, and the
estimated activations are within a factor 1.25 of the measured ones in every checkpointing mode
and in bf16 (autocast on one process, FSDP2's mixed-precision policy at dp = 2).
FSDP2's gathered parameters between forward and backward: stage 2 the whole model, stage 3 the
last block. Under pp = 2 each pipeline rank's parameters are exactly the estimate's.
"""

from __future__ import annotations

import dataclasses
import json

import pytest

from evoformer.cli import main
from evoformer.config import load_config
from evoformer.distributed.testing import run_distributed
from evoformer.engine import Trainer
from evoformer.model import build_model
from evoformer.model.costs import count_params
from evoformer.planning.memory import estimate, largest_micro_batch, parse_size
from tests.conftest import REPO

N_PARAMS = 158_016
ACT_FACTOR = 1.25  # estimated / measured activations, either way
STATE_RTOL, STATE_SLACK = 0.10, 4096  # measured model state vs estimate: 10 % + 4 KiB
COMMON = [
    "data.source=synthetic",
    "train.seq_len=32",
    "train.global_batch_size=8",
    "train.micro_batch_size=4",
    "train.max_steps=2",
    "train.log_every=1",
    "run.progress=off",
    "checkpoint.save_final=false",
]
KEYS = ("mem_params_bytes", "mem_grads_bytes", "mem_optim_bytes", "mem_activations_bytes")


def _cfg(out_dir, *overrides: str):
    return load_config(
        [str(REPO / "configs/models/tiny/llama.yaml")],
        [*COMMON, f"run.output_dir={out_dir}", *overrides],
    )


def _assert_close(measured: int, estimated: int, what) -> None:
    assert abs(measured - estimated) <= STATE_RTOL * estimated + STATE_SLACK, (
        what,
        measured,
        estimated,
    )


def _assert_activations(measured: int, estimated: int, what) -> None:
    assert measured > 0 and estimated > 0, what
    ratio = estimated / measured
    assert 1 / ACT_FACTOR <= ratio <= ACT_FACTOR, (what, measured, estimated, ratio)


def test_one_process_metrics_are_exact_and_logged_every_line(tmp_path):
    cfg = _cfg(tmp_path)
    assert count_params(cfg.model)["total"] == N_PARAMS
    Trainer(cfg).train()
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in lines if "loss" in r]
    assert [r["step"] for r in train] == [1, 2]
    first = train[0]
    assert first["mem_params_bytes"] == 4 * N_PARAMS
    assert first["mem_grads_bytes"] == 4 * N_PARAMS
    assert first["mem_optim_bytes"] == 8 * N_PARAMS
    assert first["mem_total_bytes"] == sum(first[k] for k in KEYS)  # + 0 gathered
    assert first["mem_gathered_params_bytes"] == 0
    assert all(train[1][k] == first[k] for k in KEYS)  # measured once, logged on every line
    est = estimate(cfg, 1).stages[0]
    assert (est.params, est.grads, est.optim) == (4 * N_PARAMS, 4 * N_PARAMS, 8 * N_PARAMS)
    _assert_activations(first["mem_activations_bytes"], est.activations, "one process")
    # bf16 through autocast: fp32 residual stream, 16-bit matmul outputs and weight copies.
    bf16 = _cfg(tmp_path / "bf16", "precision=bf16")
    trainer = Trainer(bf16)
    trainer.train()
    _assert_activations(
        trainer.memory.stats.activations, estimate(bf16, 1).stages[0].activations, "bf16"
    )


def test_chunked_loss_activations_match_the_estimate(tmp_path):
    """model.loss_chunk: the forward keeps dH and an fp32 dW instead of the [tokens, V]
    softmax; measured and estimated agree, and both are below the plain loss's."""
    plain, chunked = _cfg(tmp_path / "plain"), _cfg(tmp_path / "chunked", "model.loss_chunk=32")
    measured = {}
    for name, cfg in (("plain", plain), ("chunked", chunked)):
        trainer = Trainer(cfg)
        trainer.train()
        measured[name] = trainer.memory.stats.activations
    est = estimate(chunked, 1).stages[0].activations
    _assert_activations(measured["chunked"], est, "chunked loss")
    assert measured["chunked"] < measured["plain"]
    assert est < estimate(plain, 1).stages[0].activations


LAYOUTS = {
    "ddp": [],
    "ddp-selective": ["activation_checkpointing=selective"],
    "ddp-full": ["activation_checkpointing=full"],
    "fsdp2-2": ["zero.backend=fsdp2", "zero.stage=2"],
    "fsdp2-3": ["zero.backend=fsdp2", "zero.stage=3"],
    "fsdp2-3-bf16": ["zero.backend=fsdp2", "zero.stage=3", "precision=bf16"],
}


def _measure(rank: int, world: int, root: str) -> dict:
    out = {}
    for name, overrides in LAYOUTS.items():
        trainer = Trainer(_cfg(f"{root}/{name}", *overrides))
        trainer.train()
        s = trainer.memory.stats
        out[name] = {
            "params": s.params,
            "grads": s.grads,
            "optim": s.optim,
            "activations": s.activations,
            "gathered": s.gathered_params,
        }
    return out


def test_estimator_matches_measured_at_dp2(tmp_path):
    ranks = run_distributed(_measure, 2, str(tmp_path), timeout=150)
    for name, overrides in LAYOUTS.items():
        est = estimate(_cfg(tmp_path, *overrides), 2).stages[0]
        measured = [r[name] for r in ranks]
        print(
            f"\n{name}: estimate params {est.params} grads {est.grads} optim {est.optim} "
            f"activations {est.activations}; measured per rank {measured}"
        )
        for rank, got in enumerate(measured):
            for kind in ("params", "grads", "optim"):
                _assert_close(got[kind], getattr(est, kind), (name, rank, kind))
            _assert_activations(got["activations"], est.activations, (name, rank))
    # Rank 0 holds the larger (padded) FSDP2 shard: the estimate is its exact size.
    fsdp0 = ranks[0]["fsdp2-3"]
    est = estimate(_cfg(tmp_path, *LAYOUTS["fsdp2-3"]), 2).stages[0]
    assert (fsdp0["params"], fsdp0["grads"], fsdp0["optim"]) == (est.params, est.grads, est.optim)
    # Stage 3 holds 1/dp of stage 0's model state (the shards of both ranks add up to it).
    for kind in ("params", "grads", "optim"):
        full = ranks[0]["ddp"][kind]
        assert sum(r["fsdp2-3"][kind] for r in ranks) == full, kind
        assert abs(ranks[0]["fsdp2-3"][kind] / full - 0.5) <= 0.05, kind
    # Between forward and backward FSDP2 keeps gathered: stage 2 every unit (the whole model),
    # stage 3 only the last block (never resharded: backward needs it at once); DDP nothing.
    block = 4 * sum(p.numel() for p in build_model(_cfg(tmp_path).model).layers[-1].parameters())
    for got in ranks:
        assert got["ddp"]["gathered"] == 0
        assert got["fsdp2-2"]["gathered"] == 4 * N_PARAMS
        assert got["fsdp2-3"]["gathered"] == block
    # Checkpointing lowers measured activations, state unchanged.
    acts = [ranks[0][n]["activations"] for n in ("ddp", "ddp-selective", "ddp-full")]
    assert acts[0] > acts[1] > acts[2], acts


def _pipeline_rank(rank: int, world: int, root: str) -> dict:
    trainer = Trainer(_cfg(root, "parallel.pp=2", "train.micro_batch_size=1"))
    trainer.train()
    return trainer.memory.stats.metrics()


def test_estimator_matches_each_pipeline_rank(tmp_path):
    """pp = 2: each rank holds its stage's blocks plus the embedding (rank 0) or the final norm
    and head (rank 1), exactly as the estimate places them."""
    ranks = run_distributed(_pipeline_rank, 2, str(tmp_path), timeout=120)
    est = estimate(_cfg(tmp_path, "parallel.pp=2", "train.micro_batch_size=1"), 2).stages
    assert [r["mem_params_bytes"] for r in ranks] == [e.params for e in est]
    assert [r["mem_optim_bytes"] for r in ranks] == [e.optim for e in est]
    assert sum(r["mem_params_bytes"] for r in ranks) == 4 * N_PARAMS
    # The schedule runs the forwards: no single forward to measure, so no activation field.
    assert all("mem_activations_bytes" not in r for r in ranks)


def _plan(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["plan", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_plan_command_prints_a_table_per_stage(capsys):
    code, stdout, stderr = _plan(
        capsys,
        "configs/models/tiny/llama.yaml",
        "train.seq_len=32",
        "train.micro_batch_size=4",
        "zero.backend=fsdp2",
        "zero.stage=3",
        "--gpus",
        "4",
    )
    assert code == 0, stderr
    assert "world 4 = tp 1 x pp 1 x dp 4" in stdout
    assert "fsdp2 stage 3" in stdout
    lines = stdout.splitlines()
    header = next(line for line in lines if "model state" in line)
    assert header.split() == [
        "pp",
        "rank",
        "blocks",
        "params",
        "grads",
        "optim",
        "model",
        "state",
        "activations",
        "total",
    ]
    # dp = 4: every dim 0 divides by 4, so a quarter of 632,064 B of fp32 weights: 154.31 KiB.
    row = lines[lines.index(header) + 2].split()
    assert row[:2] == ["0", "0-1"]
    assert row[2:4] == ["154.31", "KiB"], row


@pytest.mark.parametrize(
    "args, message",
    [
        (["--gpus", "3", "parallel.tp=2"], "--gpus 3 must be a positive multiple"),
        (["--gpus", "zero"], "--gpus must be a positive integer"),
        (["--gpu-mem", "lots"], "--gpu-mem 'lots': expected a size"),
    ],
)
def test_plan_command_refuses_impossible_layouts(capsys, args, message):
    code, _, stderr = _plan(capsys, "configs/models/tiny/llama.yaml", *args)
    assert code == 2
    assert message in stderr and len(stderr.strip().splitlines()) == 1, stderr


def test_parse_size_uses_binary_units():
    assert parse_size("80GB") == parse_size("80GiB") == parse_size("80G") == 80 * 2**30
    assert parse_size("1.5T") == int(1.5 * 2**40) and parse_size("512MB") == 512 * 2**20


def test_plan_gpu_mem_says_whether_it_fits_and_the_largest_micro_batch(capsys):
    args = [
        "configs/models/tiny/llama.yaml",
        "train.seq_len=32",
        "train.micro_batch_size=4",
        "precision=fp32",
    ]
    cfg = load_config([str(REPO / args[0])], args[1:])

    def total(mb: int) -> int:
        train = dataclasses.replace(cfg.train, micro_batch_size=mb)
        return estimate(dataclasses.replace(cfg, train=train), 1).worst.total

    at = {mb: total(mb) for mb in (4, 6, 7)}
    limit = (at[6] + at[7]) // 2  # 6 sequences fit, 7 do not
    assert largest_micro_batch(cfg, 1, limit) == 6
    code, stdout, stderr = _plan(capsys, *args, "--gpu-mem", str(limit))
    assert code == 0, stderr
    assert "gpu memory" in stdout and ": fits (busiest rank: pp rank 0" in stdout
    assert "largest micro-batch that fits: train.micro_batch_size=6" in stdout
    code, stdout, _ = _plan(capsys, *args, "--gpu-mem", str(at[4] // 100))
    assert "does not fit" in stdout and "the model state alone is" in stdout
