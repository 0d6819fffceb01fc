"""``model.backend: te``: Transformer Engine layers with the torch layers' names and shapes.

On a machine without TE/CUDA the choice fails with one clear line. The wiring (state-dict keys
and shapes, sharding tags, loading a torch checkpoint, identical logits) is checked on CPU with
a fake ``transformer_engine.pytorch`` whose ``Linear`` does what TE's does in plain torch; the
real-TE comparison runs only on a GPU machine with TE installed.
"""

from __future__ import annotations

import importlib.util
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from evoformer.config import load_config
from evoformer.errors import UserError
from evoformer.model import build_model
from evoformer.parallel import te_backend
from evoformer.parallel.collectives import copy_to_parallel_region, reduce_from_parallel_region
from evoformer.parallel.layers import ColumnParallelLinear, RowParallelLinear, TensorParallelModule
from evoformer.parallel.sharding import Split, has_partial_grad, shard_specs, tp_split
from tests.test_cli import TINY, assert_clean_error, run_cli

B, T = 2, 16


def _cfg(backend: str, *overrides: str):
    return load_config([TINY], [f"model.backend={backend}", *overrides]).model


# -- without Transformer Engine ----------------------------------------------------------------


@pytest.mark.skipif(
    importlib.util.find_spec("transformer_engine") is not None and torch.cuda.is_available(),
    reason="Transformer Engine and CUDA are available here",
)
def test_te_backend_without_te_is_one_clear_error(tmp_path):
    with pytest.raises(UserError, match=r"model.backend=te needs Transformer Engine"):
        build_model(_cfg("te"))
    proc = run_cli(
        "train",
        TINY,
        "model.backend=te",
        "data.source=synthetic",
        "train.max_steps=1",
        f"run.output_dir={tmp_path / 'run'}",
    )
    assert_clean_error(proc, te_backend.MISSING)


def test_backend_choice_is_validated():
    with pytest.raises(UserError, match="model.backend='tee': must be one of torch, te"):
        load_config([TINY], ["model.backend=tee"])


# -- a fake TE on CPU --------------------------------------------------------------------------


class FakeTELinear(nn.Module):
    """What ``te.Linear`` does, in plain torch: local weight shapes from ``parallel_mode`` and
    ``tp_size``, column: all-reduce dX backward, row: all-reduce Y then add the bias."""

    def __init__(
        self,
        in_features,
        out_features,
        bias=True,
        *,
        tp_group=None,
        tp_size=1,
        parallel_mode=None,
        sequence_parallel=False,
        return_bias=False,
        device="cuda",
        params_dtype=None,
    ):
        super().__init__()
        assert not sequence_parallel, "evoformer runs sequence parallelism itself"
        if parallel_mode == "column":
            out_features //= tp_size
        elif parallel_mode == "row":
            in_features //= tp_size
        self.in_features, self.out_features = in_features, out_features
        self.tp_group, self.tp_size, self.parallel_mode = tp_group, tp_size, parallel_mode
        self.return_bias = return_bias
        kw = {"device": "meta" if device == "meta" else "cpu", "dtype": params_dtype}
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **kw))
        self.bias = nn.Parameter(torch.empty(out_features, **kw)) if bias else None

    def get_extra_state(self):  # TE's FP8 metadata; the adapter must leave it out
        return {"fp8": None}

    def set_extra_state(self, state):
        pass

    def forward(self, x):
        row_tp = self.parallel_mode == "row" and self.tp_size > 1
        if self.parallel_mode == "column" and self.tp_size > 1:
            x = copy_to_parallel_region(x, self.tp_group)
        late_bias = row_tp or self.return_bias
        y = F.linear(x, self.weight, None if late_bias else self.bias)
        if row_tp:
            y = reduce_from_parallel_region(y, self.tp_group)
        if self.return_bias:
            return y, self.bias
        return y if not row_tp or self.bias is None else y + self.bias


@pytest.fixture
def fake_te(monkeypatch):
    pkg = types.ModuleType("transformer_engine")
    mod = types.ModuleType("transformer_engine.pytorch")
    mod.Linear = FakeTELinear
    pkg.pytorch = mod
    monkeypatch.setitem(sys.modules, "transformer_engine", pkg)
    monkeypatch.setitem(sys.modules, "transformer_engine.pytorch", mod)
    monkeypatch.setattr(te_backend, "_cuda_available", lambda: True)
    return mod


def test_fake_te_llama_matches_torch_backend(fake_te):
    ref = build_model(_cfg("torch"), seed=0).eval()
    model = build_model(_cfg("te"), seed=None).eval()
    te_layers = [m for m in model.modules() if isinstance(m, fake_te.Linear)]
    assert te_layers and all(isinstance(m, TensorParallelModule) for m in te_layers)
    ref_sd, sd = ref.state_dict(), model.state_dict()
    assert list(sd) == list(ref_sd)  # no TE "_extra_state"
    assert {k: v.shape for k, v in sd.items()} == {k: v.shape for k, v in ref_sd.items()}
    model.load_state_dict(ref_sd)
    ids = torch.randint(0, model.cfg.vocab_size, (B, T), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(model(ids), ref(ids), rtol=0, atol=0)
    # The per-name init gives both backends the same weights.
    init = build_model(_cfg("te"), seed=0).state_dict()
    for k, v in ref_sd.items():
        torch.testing.assert_close(init[k], v, rtol=0, atol=0, msg=k)


def test_fake_te_layers_carry_the_torch_layers_metadata(fake_te):
    col = te_backend.TEColumnParallelLinear(8, 12, True, explicit_comm=True)
    row = te_backend.TERowParallelLinear(12, 8, True)
    ref_col, ref_row = ColumnParallelLinear(8, 12, True), RowParallelLinear(12, 8, True)
    for m, ref in ((col, ref_col), (row, ref_row)):
        assert shard_specs(m) == shard_specs(ref)
        for name in ("weight", "bias"):
            p, q = getattr(m, name), getattr(ref, name)
            assert p.shape == q.shape and m.full_shape(name) == ref.full_shape(name)
            assert (tp_split(p), has_partial_grad(p)) == (tp_split(q), has_partial_grad(q))
        full = {"weight": torch.randn(m.full_shape("weight")), "bias": torch.randn(m.bias.shape)}
        m.shard_from_full_(**full)
        ref.shard_from_full_(**full)
        torch.testing.assert_close(m.gather_full("weight"), full["weight"])
        x = torch.randn(B, T, m.weight.shape[1])
        torch.testing.assert_close(m(x), ref(x))
    # Tags survive materialisation from the meta device.
    with torch.device("meta"):
        meta = te_backend.TEColumnParallelLinear(8, 12, False)
    meta.to_empty(device="cpu")
    assert tp_split(meta.weight) == Split(0, 12)


# -- real Transformer Engine (GPU) ---------------------------------------------------------------


@pytest.mark.skipif(
    not torch.cuda.is_available() or importlib.util.find_spec("transformer_engine") is None,
    reason="needs CUDA and Transformer Engine",
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_real_te_llama_matches_torch_backend(dtype):
    ref = build_model(_cfg("torch"), device="cuda", seed=0)
    model = build_model(_cfg("te"), device="cuda", seed=0)
    assert {k: v.shape for k, v in model.state_dict().items()} == {
        k: v.shape for k, v in ref.state_dict().items()
    }
    model.load_state_dict(ref.state_dict())
    ids = torch.randint(0, model.cfg.vocab_size, (B, T), device="cuda")
    tol = (
        {"rtol": 2e-2, "atol": 2e-2} if dtype == torch.bfloat16 else {"rtol": 1e-3, "atol": 1e-3}
    )  # TF32
    out = {}
    for name, m in (("torch", ref), ("te", model)):
        with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
            loss = m(ids, targets=ids).loss
        loss.backward()
        out[name] = loss.detach().float(), {k: p.grad.float() for k, p in m.named_parameters()}
    torch.testing.assert_close(out["te"][0], out["torch"][0], **tol)
    for k, g in out["torch"][1].items():
        torch.testing.assert_close(out["te"][1][k], g, **tol, msg=k)
