"""torch.compile's fusions of the memory-bound pieces equal the plain (eager) path, and
``train.compile_scope=model`` trains like eager.

Inductor on CPU, fp32, tiny shapes (compiling is the slow part on two cores). Each piece --
RMSNorm of the residual sum, RoPE, the SwiGLU gate -- is compiled on its own with
``fullgraph=True`` and must match eager in value and gradients to 1e-6 relative, and inductor
must have emitted at most a third as many kernels as eager dispatches ops (fused, not just
traced). The whole-model
compile (embedding, block, final norm, head and the chunked loss in one graph) trains 2 steps
on the same losses as eager blocks within 1e-5 relative (inductor reorders fp32 sums).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch._inductor import metrics
from torch.utils._python_dispatch import TorchDispatchMode

from evoformer.config import load_config
from evoformer.engine import Trainer
from evoformer.errors import UserError
from evoformer.model.norms import RMSNorm
from evoformer.model.positions import apply_rope
from tests.conftest import REPO
from tests.engine.parity import max_rel
from tests.engine.test_compile import COMMON

B, T, H, D, C = 2, 8, 2, 16, 32


def _residual_rmsnorm(norm: RMSNorm):
    def fn(x, r):
        h = x + r  # the residual add the next norm reads: one pass over memory when fused
        return norm(h), h

    return fn


def _rope(x, cos, sin):
    return apply_rope(x, cos, sin)


def _swiglu(gate, up):
    return F.silu(gate) * up


def _inputs(name: str):
    g = torch.Generator().manual_seed(0)
    if name == "rmsnorm_residual":
        return [torch.randn(B, T, C, generator=g), torch.randn(B, T, C, generator=g)]
    if name == "rope":
        ang = torch.randn(T, D, generator=g)
        return [torch.randn(B, H, T, D, generator=g), ang.cos(), ang.sin()]
    return [torch.randn(B, T, 4 * C, generator=g), torch.randn(B, T, 4 * C, generator=g)]


@pytest.mark.parametrize("name", ["rmsnorm_residual", "rope", "swiglu"])
def test_fused_piece_equals_eager(name):
    norm = RMSNorm(C, 1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 1.5, C))
    fn = {"rmsnorm_residual": _residual_rmsnorm(norm), "rope": _rope, "swiglu": _swiglu}[name]
    n_grad = 1 if name == "rope" else 2  # RoPE's tables are constants

    def run(f):
        xs = [x.clone().requires_grad_(i < n_grad) for i, x in enumerate(_inputs(name))]
        outs = f(*xs)
        outs = outs if isinstance(outs, tuple) else (outs,)
        loss = torch.stack([(o * torch.linspace(-1, 1, o.shape[-1])).sum() for o in outs]).sum()
        loss.backward()
        return [o.detach() for o in outs] + [x.grad for x in xs[:n_grad]]

    with _CountOps() as ops:
        eager = run(fn)
    grads_before = [p.grad.clone() for p in norm.parameters() if p.grad is not None]
    norm.zero_grad()
    torch._dynamo.reset()
    metrics.reset()
    compiled = run(torch.compile(fn, backend="inductor", fullgraph=True))
    for got, want in zip(compiled, eager):
        assert ((got - want).norm() / want.norm()).item() <= 1e-6
    if name == "rmsnorm_residual":
        g = norm.weight.grad
        assert g is not None and ((g - grads_before[0]).norm() / grads_before[0].norm()) <= 1e-6
    # fused: at most a third as many kernels as eager dispatched ops (forward and backward)
    kernels = metrics.generated_kernel_count
    assert 0 < kernels and 3 * kernels <= ops.n, (kernels, ops.n)


class _CountOps(TorchDispatchMode):
    """Counts the aten ops eager mode dispatches (each is at least one kernel launch)."""

    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


def test_whole_model_compile_trains_like_eager(tmp_path):
    def train(out, *overrides):
        cfg = load_config(
            [str(REPO / "configs/models/tiny/llama.yaml")],
            [
                *COMMON,
                "train.max_steps=2",
                "model.n_layers=1",
                f"run.output_dir={tmp_path / out}",
                *overrides,
            ],
        )
        trainer = Trainer(cfg)
        return trainer.train().losses, trainer

    torch._dynamo.reset()
    eager, _ = train("eager")
    compiled, trainer = train(
        "model",
        "train.compile=true",
        "train.compile_scope=model",
        "train.compile_mode=reduce-overhead",  # CUDA graphs on a GPU; on CPU the default
        "model.loss_chunk=16",
    )
    model = trainer.model
    assert model._compiled_call_impl is not None  # the Transformer itself, in place
    assert all(block._compiled_call_impl is None for block in model.layers)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0
    assert max_rel(compiled, eager) <= 1e-5


def test_model_scope_is_refused_where_it_is_not_tested():
    base = [str(REPO / "configs/models/tiny/llama.yaml")]
    for extra, why in [
        (["parallel.pp=2"], "pp > 1"),
        (["zero.backend=fsdp2"], "zero.backend=ddp only"),
        (["zero.backend=fsdp2", "train.compile_mode=reduce-overhead"], "CUDA graphs need"),
    ]:
        with pytest.raises(UserError, match=why):
            load_config(base, ["train.compile=true", "train.compile_scope=model", *extra])
