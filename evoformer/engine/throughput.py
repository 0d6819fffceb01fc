"""Model FLOP utilisation: the FLOPs a step's tokens cost and the device's peak rate.

Model FLOPs per token come from the config (``model.costs.train_flops_per_token``: the weight
matmuls of the active parameters -- MoE counts its routed top-k and shared experts, MLA its
low-rank projections, MTP its modules -- plus causal attention over each layer's window, times 3
for forward and backward). Activation-checkpoint recompute is not counted: MFU measures useful
work. Document masking is not subtracted either (the count is the dense causal one, as peers
report it).

The peak is per device and precision: a table of common accelerators by name (dense, no
sparsity), ``run.peak_tflops`` when set, and on a CPU the fp32 rate of a large matmul measured at
start-up (a practical peak, not a datasheet number; the banner says which).
"""

from __future__ import annotations

import functools
import time

import torch

# Dense peak TFLOP/s per device: (name fragment as torch.cuda.get_device_name reports it,
# precision) -> rate. The first matching fragment wins, so more specific names come first.
PEAK_TFLOPS: list[tuple[str, dict[str, float]]] = [
    ("H100 PCIe", {"bf16": 756.0, "fp16": 756.0, "fp8": 1513.0, "fp32": 378.0}),
    ("H100", {"bf16": 989.0, "fp16": 989.0, "fp8": 1979.0, "fp32": 495.0}),
    ("H200", {"bf16": 989.0, "fp16": 989.0, "fp8": 1979.0, "fp32": 495.0}),
    ("H20", {"bf16": 148.0, "fp16": 148.0, "fp8": 296.0, "fp32": 74.0}),
    ("GH200", {"bf16": 989.0, "fp16": 989.0, "fp8": 1979.0, "fp32": 495.0}),
    ("B200", {"bf16": 2250.0, "fp16": 2250.0, "fp8": 4500.0, "fp32": 1125.0}),
    ("A100", {"bf16": 312.0, "fp16": 312.0, "fp32": 156.0}),  # fp32 through TF32
    ("A10G", {"bf16": 70.0, "fp16": 70.0, "fp32": 35.0}),
    ("L40S", {"bf16": 362.0, "fp16": 362.0, "fp8": 733.0, "fp32": 183.0}),
    ("L4", {"bf16": 121.0, "fp16": 121.0, "fp8": 242.0, "fp32": 60.0}),
    ("V100", {"fp16": 125.0, "fp32": 15.7}),
    ("MI300X", {"bf16": 1307.0, "fp16": 1307.0, "fp8": 2615.0, "fp32": 654.0}),
    ("MI250X", {"bf16": 383.0, "fp16": 383.0, "fp32": 95.7}),
]


def table_peak(device_name: str, precision: str) -> float | None:
    """The table's dense peak in FLOP/s for ``device_name`` at ``precision``, or None."""
    for fragment, rates in PEAK_TFLOPS:
        if fragment.lower() in device_name.lower():
            rate = rates.get(precision)
            return rate * 1e12 if rate is not None else None
    return None


@functools.cache  # once per process
def measured_matmul_peak(n: int = 1024, reps: int = 5) -> float:
    """Best fp32 FLOP/s of an ``n x n`` matmul on this process's threads (CPU)."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
    out = torch.empty(n, n)
    torch.mm(a, b, out=out)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(a, b, out=out)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def device_peak(
    device: torch.device, precision: str, fp8: bool, override_tflops: float | None
) -> tuple[float | None, str]:
    """(peak FLOP/s per device, where it comes from) for MFU; None when unknown."""
    if override_tflops:
        return override_tflops * 1e12, "run.peak_tflops"
    key = "fp8" if fp8 else precision
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = table_peak(name, key)
        if peak is None:
            return None, f"{name} {key} is not in the table; set run.peak_tflops"
        return peak, f"{name} {key} dense peak"
    if device.type == "cpu":
        return measured_matmul_peak(), "measured fp32 matmul rate of this CPU"
    return None, f"no peak for device {device.type}; set run.peak_tflops"


def throughput(
    tokens_per_s: float, flops_per_token: float, world_size: int, peak: float | None
) -> dict[str, float]:
    """``tflops_per_device`` and ``mfu`` (when the peak is known) of a measured token rate."""
    per_device = tokens_per_s * flops_per_token / world_size
    out = {"tflops_per_device": per_device / 1e12}
    if peak:
        out["mfu"] = per_device / peak
    return out
