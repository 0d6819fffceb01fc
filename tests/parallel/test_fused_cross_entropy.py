"""The chunked fused LM head + cross-entropy equals the plain path (full logits, then the loss):
loss, z-loss and the gradients of hidden states and head, at tp = 1 and over a tp = 2 vocabulary
split with sequence parallelism; whole models (MTP + z-loss; a tied head) give the same loss
terms and gradients at tp = 1 and at tp = 2 with SP; FSDP2 training with it follows one
process's plain-loss training; and the peak memory of the loss at a 128K vocabulary drops."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F

from evoformer.config import load_config
from evoformer.distributed.dims import ParallelDims
from evoformer.distributed.testing import run_distributed
from evoformer.model import build_model, lm_loss
from evoformer.parallel import VocabParallelLMHead, vocab_parallel_cross_entropy
from evoformer.parallel.cross_entropy import vocab_parallel_z_loss
from evoformer.parallel.fused_cross_entropy import (
    fused_linear_cross_entropy,
    fused_vocab_parallel_loss,
)
from evoformer.parallel.layers import vocab_parallel_logits
from tests.conftest import REPO

B, T, C, V = 2, 10, 16, 37


def _data(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, C, generator=g)
    w = torch.randn(V, C, generator=g) * 2  # large logits: the max subtraction matters
    targets = torch.randint(0, V, (B, T), generator=g)
    targets[0, :3] = -1
    targets[1, 4] = -1
    return h, w, targets


def _plain(h, w, targets, z_weight: float):
    h = h.clone().requires_grad_()
    w = w.clone().requires_grad_()
    logits = F.linear(h, w)
    ce = F.cross_entropy(logits.reshape(-1, V), targets.reshape(-1), ignore_index=-1)
    z = vocab_parallel_z_loss(logits, targets, None, V)
    (ce + z_weight * z).backward()
    return ce.detach(), z.detach(), _grad(h), _grad(w)


def _rel(a: Any, b: Any) -> float:
    return ((a - b).norm() / b.norm()).item()


def _grad(t: torch.Tensor) -> torch.Tensor:
    assert t.grad is not None
    return t.grad


@pytest.mark.parametrize("chunk", [1, 4, 7, 1000])
@pytest.mark.parametrize("z_weight", [0.0, 1e-2])
def test_tp1_equals_plain_loss_and_grads(chunk, z_weight):
    h, w, targets = _data()
    ce_ref, z_ref, dh_ref, dw_ref = _plain(h, w, targets, z_weight)
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    loss, ce, z = fused_linear_cross_entropy(
        hh.reshape(-1, C), ww, targets.reshape(-1), chunk=chunk, z_weight=z_weight
    )
    loss.backward()
    assert _rel(ce, ce_ref) <= 1e-6
    if z_weight:
        assert _rel(z, z_ref) <= 1e-6
        assert _rel(loss, ce_ref + z_weight * z_ref) <= 1e-6
    assert _rel(hh.grad, dh_ref) <= 1e-6
    assert _rel(ww.grad, dw_ref) <= 1e-6
    assert torch.all(_grad(hh)[0, :3] == 0)  # ignored rows get no gradient


def test_scaled_backward_and_no_grad_eval():
    h, w, targets = _data(1)
    _, _, dh_ref, dw_ref = _plain(h, w, targets, 0.0)
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    loss, _, _ = fused_linear_cross_entropy(hh.reshape(-1, C), ww, targets.reshape(-1), chunk=5)
    (3.0 * loss).backward()
    assert _rel(hh.grad, 3 * dh_ref) <= 1e-6 and _rel(ww.grad, 3 * dw_ref) <= 1e-6
    with torch.no_grad():
        loss2, _, _ = fused_linear_cross_entropy(h.reshape(-1, C), w, targets.reshape(-1), chunk=5)
    assert torch.equal(loss2, loss.detach())


def test_bf16_autocast_close_to_plain():
    h, w, targets = _data(2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hp, wp = h.clone().requires_grad_(), w.clone().requires_grad_()
        ref = lm_loss(F.linear(hp, wp), targets)
        hf, wf = h.clone().requires_grad_(), w.clone().requires_grad_()
        ours, _, _ = fused_linear_cross_entropy(hf.reshape(-1, C), wf, targets.reshape(-1), chunk=4)
    ref.backward()
    ours.backward()
    assert _grad(wf).dtype == torch.float32 and _grad(hf).dtype == torch.float32
    assert abs(ours.item() - ref.item()) <= 1e-3 * ref.item()
    assert _rel(hf.grad, hp.grad) <= 2e-2 and _rel(wf.grad, wp.grad) <= 2e-2


def _tp_worker(rank: int, world: int) -> list:
    group = ParallelDims(world, rank, rank, tp=world).build("cpu").tp_group
    h, w, targets = _data(3)
    head = VocabParallelLMHead(C, V, group, pad_to_multiple_of=8)  # 37 -> 48: rank 1 padded
    n_real = head.vocab_end - head.vocab_start
    w_local = torch.zeros(head.weight.shape)
    w_local[:n_real] = w[head.vocab_start : head.vocab_end]
    out = []
    for sp in (False, True):
        h_in = h.chunk(world, 1)[rank] if sp else h
        res = []
        for fused in (False, True):
            hh, ww = h_in.clone().requires_grad_(), w_local.clone().requires_grad_()
            if fused:
                loss, ce, z = fused_vocab_parallel_loss(
                    hh, ww, targets, group, head.vocab_start, head.vocab_end,
                    chunk=5, sequence_parallel=sp, z_weight=0.1,
                )  # fmt: skip
            else:
                local = vocab_parallel_logits(hh, ww, group, sp)
                ce = vocab_parallel_cross_entropy(
                    local, targets, group, head.vocab_start, head.vocab_end
                )
                z = vocab_parallel_z_loss(local, targets, group, n_real)
                loss = ce + 0.1 * z
            loss.backward()
            res.append((ce.detach(), z.detach(), hh.grad, ww.grad))
        out.append(res)
    return out


def test_tp2_with_and_without_sequence_parallel_equals_plain():
    results = run_distributed(_tp_worker, 2)
    for rank_out in results:
        for (ce0, z0, dh0, dw0), (ce1, z1, dh1, dw1) in rank_out:
            assert _rel(ce1, ce0) <= 1e-6 and _rel(z1, z0) <= 1e-6
            assert _rel(dh1, dh0) <= 1e-6
            assert _rel(dw1, dw0) <= 1e-6


def test_model_with_mtp_and_z_loss_equals_plain():
    def run(chunk: int):
        cfg = load_config(
            [str(REPO / "configs/models/tiny/llama.yaml")],
            ["model.mtp.depth=1", f"model.loss_chunk={chunk}"],
        ).model
        model = build_model(cfg, seed=0)
        model.z_loss_weight = 1e-3
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, cfg.vocab_size, (2, 16), generator=g)
        targets = torch.roll(ids, -1, 1)
        targets[:, -1] = -1
        out = model(ids, targets=targets)
        out.loss.backward()
        return out, {n: p.grad for n, p in model.named_parameters()}

    plain, g_plain = run(0)
    fused, g_fused = run(6)
    for key in ("ce_loss", "z_loss", "mtp_loss"):
        assert _rel(fused.metrics[key], plain.metrics[key]) <= 1e-6, key
    assert _rel(fused.loss, plain.loss) <= 1e-6
    for name, g in g_plain.items():
        assert _rel(g_fused[name], g) <= 1e-5, name


def _tp_model_worker(rank: int, world: int) -> list:
    """tp = 2 (with SP) models of tiny LLaMA (MTP, z-loss) and tiny GPT-2 (tied head): the
    chunked loss against the plain one on the same layout, loss terms and local grads."""
    groups = ParallelDims(world, rank, rank, tp=world).build("cpu")
    out = []
    for family, extra in (("llama", ["model.mtp.depth=1"]), ("gpt2", [])):
        res = []
        for chunk in (0, 6):
            cfg = load_config(
                [str(REPO / f"configs/models/tiny/{family}.yaml")],
                [*extra, f"model.loss_chunk={chunk}"],
            ).model
            model = build_model(cfg, seed=0, groups=groups, sequence_parallel=True)
            model.z_loss_weight = 1e-3
            ids = torch.randint(
                0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0)
            )
            targets = torch.roll(ids, -1, 1)
            targets[:, -1] = -1
            o = model(ids, targets=targets)
            o.loss.backward()
            grads = {n: _grad(p).clone() for n, p in model.named_parameters()}
            res.append(({k: v.item() for k, v in o.metrics.items()}, o.loss.item(), grads))
        out.append(res)
    return out


def test_tp2_models_with_sequence_parallel_equal_plain():
    for rank_out in run_distributed(_tp_model_worker, 2):
        for (m0, l0, g0), (m1, l1, g1) in rank_out:
            assert m0.keys() == m1.keys()
            for key in m0:
                assert abs(m1[key] - m0[key]) <= 1e-6 * abs(m0[key]), key
            assert abs(l1 - l0) <= 1e-6 * abs(l0)
            # Relative to each gradient's size, floored at 1e-4 of the largest one: GPT-2's key
            # bias has a zero gradient in exact arithmetic (the softmax ignores it), pure rounding.
            scale = max(g.abs().max().item() for g in g0.values())
            for name, g in g0.items():
                err = (g1[name] - g).abs().max() / (g.abs().max() + 1e-4 * scale)
                assert err <= 1e-5, (name, err)


_PEAK = """
import resource, sys, torch, torch.nn.functional as F
from evoformer.model import lm_loss
from evoformer.parallel.fused_cross_entropy import fused_linear_cross_entropy
torch.set_num_threads(1)
N, C, V = 512, 64, 128256
g = torch.Generator().manual_seed(0)
h = torch.randn(N, C, generator=g, requires_grad=True)
w = (torch.randn(V, C, generator=g) * 0.02).requires_grad_()
t = torch.randint(0, V, (N,), generator=g)
w.grad = torch.zeros_like(w); h.grad = torch.zeros_like(h)  # gradients exist either way
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize()
def hwm():
    line = [x for x in open("/proc/self/status") if x.startswith("VmHWM")][0]
    return int(line.split()[1]) * 1024
base = rss()
if sys.argv[1] == "plain":
    lm_loss(F.linear(h, w), t).backward()
else:
    fused_linear_cross_entropy(h, w, t, chunk=int(sys.argv[1]))[0].backward()
print(hwm() - base)
"""


def _peak_bytes(mode: str) -> int:
    import os
    import subprocess
    import sys

    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    out = subprocess.run(
        [sys.executable, "-c", _PEAK, mode], env=env, capture_output=True, text=True, check=True
    )
    return int(out.stdout.split()[-1])


def test_peak_memory_at_128k_vocabulary_drops():
    """512 tokens x 128256 vocabulary, fp32, one process each: the plain path's forward +
    backward peaks above the [N, V] logits + softmax (2 x 263 MB); the chunked path (256 rows)
    holds one [256, V] chunk and its exponentials at a time, plus dW [V, C]."""
    logits_bytes = 512 * 128256 * 4
    plain, fused = _peak_bytes("plain"), _peak_bytes("256")
    assert plain >= 1.5 * logits_bytes, plain
    assert fused <= 0.8 * logits_bytes, fused
    assert fused * 2 <= plain, (fused, plain)


def test_bad_chunk_is_refused():
    h, w, t = _data()
    with pytest.raises(ValueError, match="chunk must be > 0"):
        fused_linear_cross_entropy(h.reshape(-1, C), w, t.reshape(-1), chunk=0)


_TRAIN = [
    "data.source=synthetic",
    "train.seq_len=32",
    "train.global_batch_size=4",
    "train.micro_batch_size=2",
    "train.max_steps=3",
    "train.log_every=1",
    "run.progress=off",
    "optim.warmup_steps=1",
    "optim.lr=3e-3",
    "optim.z_loss=1e-3",
    "checkpoint.save_final=false",
]


def _train_losses(out_dir: str, *overrides: str) -> dict[int, float]:
    from evoformer.engine import Trainer

    cfg = load_config(
        [str(REPO / "configs/models/tiny/llama.yaml")],
        [*_TRAIN, f"run.output_dir={out_dir}", *overrides],
    )
    return Trainer(cfg).train().losses


def _fsdp_worker(rank: int, world: int, root: str) -> dict[int, float]:
    return _train_losses(f"{root}/fsdp", "zero.backend=fsdp2", "zero.stage=3", "model.loss_chunk=8")


def _pp_worker(rank: int, world: int, root: str) -> dict[int, float]:
    return _train_losses(f"{root}/pp", "parallel.pp=2", "model.loss_chunk=8")


@pytest.mark.parametrize("layout", ["fsdp2", "pp2"])
def test_distributed_training_with_chunked_loss_equals_one_process_plain(tmp_path, layout):
    """FSDP2 (stage 3, 2 ranks) reads the head weight unsharded in the root's forward and
    reduce-scatters the chunked loss's dW like any gradient; under pp = 2 the last stage
    computes it: the per-step losses are one process's with the plain loss (z-loss on)."""
    one = _train_losses(str(tmp_path / "one"))
    worker = _fsdp_worker if layout == "fsdp2" else _pp_worker
    ranks = run_distributed(worker, 2, str(tmp_path))
    if layout == "pp2":
        ranks = ranks[-1:]  # the last stage reports the loss
    for losses in ranks:
        assert losses.keys() == one.keys()
        for step, loss in one.items():
            assert abs(losses[step] - loss) <= 1e-5 * abs(loss), (step, losses[step], loss)
