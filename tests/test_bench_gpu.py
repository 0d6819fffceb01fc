"""``tools/bench_gpu.py --cpu-smoke`` runs every case of the GPU benchmark end to end at tiny
sizes on CPU (evoformer through its trainer, torchtitan's Llama-3 from the vendored wheel), so
the script a GPU session runs once cannot rot: its FLOP count equals the trainer's exactly, the
trainer's logged rate is within a factor 3 of the script's clock (tiny steps on a shared CPU;
the GPU criterion is 5 %), both models start near the loss of a uniform guess (ln V; within
15 %: torchtitan's head init, std d^-1/2, gives logits of std ~1), and the summary holds the
ratios the issue asks for."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

from tests.conftest import REPO


def test_cpu_smoke_runs_every_case(tmp_path):
    out = tmp_path / "bench.json"
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    subprocess.run(
        [sys.executable, str(REPO / "tools/bench_gpu.py"), "--cpu-smoke", "--out", str(out)],
        env=env,
        check=True,
        capture_output=True,
        cwd=tmp_path,
    )
    report = json.loads(out.read_text())
    names = [c["name"] for c in report["cases"]]
    assert names == [
        "evoformer_bf16_T32",
        "torchtitan_bf16_T32",
        "evoformer_fp8_tensorwise_T32",
        "evoformer_moe_bf16_T16",
        "evoformer_bf16_T16",
        "torchtitan_bf16_T16",
        "evoformer_fp8_rowwise_T32",
        "torchtitan_fp8_tensorwise_T32",
        "evoformer_bf16_T32_compile_model",
        "evoformer_bf16_T32_cudagraphs",
    ]  # in priority order; no Transformer Engine on CPU
    for case in report["cases"]:
        assert "error" not in case and "skipped" not in case, case
        assert case["tokens_per_s"] > 0 and 0 < case["mfu"] < 1
        assert abs(case["first_loss"] / math.log(512) - 1) < 0.15, case
        if case["impl"] == "evoformer":
            t = case["trainer"]
            assert t["flops_agree"], (t["flops_per_token"], case["flops_per_token"])
            assert t["rate_agree"], (t["tokens_per_s"], case["tokens_per_s"])
            assert 1 / 3 <= t["mfu"] / t["script_mfu_at_trainer_peak"] <= 3  # as the rate
        else:  # torchtitan counts attention as if it were not causal
            assert case["torchtitan_own_flops_per_token"] > case["flops_per_token"]
    moe = next(c for c in report["cases"] if c["name"].startswith("evoformer_moe"))
    dense = report["cases"][0]
    assert moe["flops_per_token"] < dense["flops_per_token"]  # active experts only
    assert set(report["ratios"]) >= {
        "evoformer_vs_torchtitan_bf16_T32",
        "evoformer_vs_torchtitan_bf16_T16",
        "evoformer_fp8_tensorwise_T32_vs_bf16",
        "evoformer_fp8_rowwise_T32_vs_bf16",
        "evoformer_bf16_T32_compile_model_vs_blocks",
        "evoformer_bf16_T32_cudagraphs_vs_blocks",
    }
    assert set(report["goals"]) >= {"mfu_50pct_bf16_T32", "ahead_1.1x_torchtitan_T16"}
    assert report["goals"]["trainer_mfu_agrees"] is True
    assert report["environment"]["device"] == "cpu" and report["smoke"] is True
