"""tflops_per_device and mfu in metrics.jsonl, checked against FLOP counts worked out by hand
for a dense and an MoE config; the peak table and the CPU measurement."""

from __future__ import annotations

import json

import pytest

from evoformer.config import load_config
from evoformer.engine import Trainer
from evoformer.engine.throughput import measured_matmul_peak, table_peak
from tests.conftest import REPO

T = 32  # train.seq_len


def _hand_flops(d: int, layers: int, heads: int, kv: int, vocab: int, mlp_per_layer: int) -> float:
    """Training FLOPs per token: 3 x (2 x matmul weights + causal attention), by hand."""
    hd = d // heads
    attn_weights = d * heads * hd + 2 * d * kv * hd + heads * hd * d  # q, k, v, o
    weights = layers * (attn_weights + mlp_per_layer) + d * vocab  # + the LM head
    # QK^T and AV: 2 FLOPs x heads x (hd + hd) per key, (T + 1) / 2 keys on average (causal)
    attention = layers * 2 * heads * 2 * hd * (T + 1) / 2
    return 3 * (2 * weights + attention)


CASES = {
    # SwiGLU: gate, up, down of hidden 176
    "llama": _hand_flops(64, 2, 4, 2, 512, 3 * 64 * 176),
    # 2 of 4 experts of hidden 128 per token, plus the 64 x 4 router
    "mixtral": _hand_flops(64, 2, 4, 2, 512, 2 * 3 * 64 * 128 + 64 * 4),
}


@pytest.mark.parametrize("family", sorted(CASES))
def test_mfu_from_the_hand_count(family, tmp_path):
    cfg = load_config(
        [str(REPO / f"configs/models/tiny/{family}.yaml")],
        [
            "data.source=synthetic",
            f"train.seq_len={T}",
            "train.global_batch_size=4",
            "train.micro_batch_size=2",
            "train.max_steps=2",
            "train.log_every=1",
            "run.peak_tflops=0.5",
            "run.progress=off",
            f"run.output_dir={tmp_path}",
        ],
    )
    trainer = Trainer(cfg)
    assert trainer.flops_per_token == pytest.approx(CASES[family], rel=1e-12)
    trainer.train()
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    for r in (x for x in rows if "loss" in x):
        want = r["tokens_per_s"] * CASES[family] / 1e12  # one device
        assert r["tflops_per_device"] == pytest.approx(want, rel=1e-9)
        assert r["mfu"] == pytest.approx(want / 0.5, rel=1e-9)
        assert r["step_ms"] >= r["data_wait_ms"] >= 0


def test_peak_table_and_cpu_measurement():
    assert table_peak("NVIDIA H100 80GB HBM3", "bf16") == 989e12
    assert table_peak("NVIDIA H100 PCIe", "bf16") == 756e12
    assert table_peak("NVIDIA A100-SXM4-80GB", "fp8") is None
    assert table_peak("Some Future GPU", "bf16") is None
    assert 1e8 < measured_matmul_peak() < 1e13  # a CPU: GFLOP/s to a few TFLOP/s
