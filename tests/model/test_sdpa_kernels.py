"""``model.attention.sdpa_kernel``: every SDPA kernel this machine runs equals a hand-written
attention, with grouped KV heads passed natively (``enable_gqa``, the CUDA path) or expanded
(the CPU path), with and without a mask, forward and backward; a model pinned to a kernel gives
the same logits as ``auto``; the CUDA-only kernels are checked where a GPU exists."""

from __future__ import annotations

import pytest
import torch

from evoformer.config import load_config
from evoformer.errors import UserError
from evoformer.model import build_model
from evoformer.model.sdpa import attend, expand_kv
from tests.conftest import REPO

B, H, K, T, D = 2, 4, 2, 9, 16


def _reference(q, k, v, mask, causal, scale):
    k, v = expand_kv(k, H), expand_kv(v, H)
    s = (q.double() @ k.double().transpose(-1, -2)) * scale
    if causal:
        s = s.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return (s.softmax(-1) @ v.double()).float()


def _cases() -> list[tuple[str, str, bool]]:
    """(device, kernel, masked): CPU's kernels, and CUDA's where a GPU exists (flash-attention
    takes no explicit mask, so masked flash is not a case; ``auto`` falls through past it)."""
    kernels = [("cpu", k) for k in ("auto", "math", "flash")]  # CPU's fused kernel is "flash"
    if torch.cuda.is_available():
        kernels += [("cuda", k) for k in ("auto", "cudnn", "flash", "efficient", "math")]
    return [
        (dev, k, masked)
        for dev, k in kernels
        for masked in (False, True)
        if not (dev == "cuda" and k == "flash" and masked)
    ]


@pytest.mark.parametrize("device, kernel, masked", _cases())
@pytest.mark.parametrize("native_gqa", [False, True])
def test_kernel_equals_reference_attention(device, kernel, native_gqa, masked):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, n, T, D, generator=g) for n in (H, K, K))
    window = torch.ones(T, T, dtype=torch.bool).tril() & ~torch.ones(T, T, dtype=torch.bool).tril(
        -3
    )
    mask = window if masked else None
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    args = [x.detach().to(device, dtype).clone().requires_grad_() for x in (q, k, v)]
    out = attend(
        *args,
        mask=None if mask is None else mask.to(device),
        causal=not masked,
        dropout=0.0,
        scale=D**-0.5,
        kernel=kernel,
        native_gqa=native_gqa,
    )
    w = torch.randn(out.shape, generator=g)
    (out.float() * w.to(device)).sum().backward()
    ref_args = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    ref = _reference(ref_args[0], ref_args[1], ref_args[2], mask, not masked, D**-0.5)
    (ref * w).sum().backward()
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    assert ((out.float().cpu() - ref).norm() / ref.norm()) <= tol
    for a, r in zip(args, ref_args):
        assert a.grad is not None and r.grad is not None
        assert ((a.grad.float().cpu() - r.grad).norm() / r.grad.norm()) <= tol


def test_pinned_kernel_model_equals_auto():
    def logits(kernel: str) -> torch.Tensor:
        cfg = load_config(
            [str(REPO / "configs/models/tiny/llama.yaml")],
            [f"model.attention.sdpa_kernel={kernel}"],
        ).model
        model = build_model(cfg, seed=0).eval()
        ids = torch.randint(0, cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            return model(ids)

    auto = logits("auto")
    assert ((logits("math") - auto).norm() / auto.norm()) <= 1e-5


def test_unknown_kernel_is_one_line():
    with pytest.raises(UserError, match="model.attention.sdpa_kernel='fast'"):
        load_config([], ["model.attention.sdpa_kernel=fast"])
