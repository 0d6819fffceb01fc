"""Muon: orthogonalised momentum for the hidden matrices, AdamW for everything else.

Muon (Jordan et al. 2024; Moonlight, Liu et al. 2025) updates each 2-D weight ``W`` [out, in]
with the orthogonalised momentum: ``M = beta * M + G``, ``U = G + beta * M`` (Nesterov) or ``M``,
``O = NS(U)`` -- a few Newton-Schulz iterations driving the singular values of ``U`` towards 1,
i.e. approximately ``U`` 's polar factor -- then ``W -= lr * scale * O`` after decoupled weight
decay. ``scale`` makes one learning rate serve both halves: ``rms`` (Moonlight) multiplies by
``0.2 * sqrt(max(out, in))`` so the update's RMS matches AdamW's; ``spectral`` (Keller Jordan)
by ``sqrt(max(1, out / in))``. Stacked expert weights [E, out, in] are E matrices. Embeddings,
the LM head, norms and biases take AdamW (``beta1``, ``beta2``, ``eps``), as in every Muon
recipe.

Sharded weights are orthogonalised as the whole matrix they are: the momentum is updated on the
local shard, then gathered -- FSDP2's shards through the DTensor (``full_tensor``), the
tensor-parallel slices over the TP group -- so every rank of the group runs Newton-Schulz on the
full matrix and keeps its own slice of the result. This repeats the iteration on each rank of
a group (torchtitan's DistMuon and Megatron instead assign each matrix to one rank and scatter
the results), which costs compute but no extra communication pattern and gives the one-process
numbers on every layout (``docs/decisions.md``). Expert-parallel and pipeline shards hold whole
matrices already.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, distribute_tensor

from evoformer.parallel.sharding import shard_tensor, tp_split

# Keller Jordan's quintic coefficients: fast, singular values end in about [0.7, 1.2].
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def newton_schulz(
    g: torch.Tensor, steps: int = 5, coefficients: tuple[float, float, float] = NS_COEFFICIENTS
) -> torch.Tensor:
    """Approximate orthogonalisation of each matrix in ``g`` [..., m, n] (fp32)."""
    a, b, c = coefficients
    x = g.float()
    transpose = x.shape[-2] > x.shape[-1]
    if transpose:  # iterate on the wide orientation: X X^T is the smaller Gram matrix
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.mT if transpose else x


def _scale(shape: torch.Size, rule: str) -> float:
    out, inp = shape[-2], shape[-1]
    if rule == "rms":
        return 0.2 * math.sqrt(max(out, inp))
    if rule == "spectral":
        return math.sqrt(max(1.0, out / inp))
    raise ValueError(f"unknown Muon lr scale {rule!r}")


class Muon(torch.optim.Optimizer):
    """Muon for groups with ``muon=True``, AdamW for the others (see the module docstring).

    ``tp_group``: the tensor-parallel group whose slices of a weight are gathered before the
    orthogonalisation (None: one rank holds each weight's TP-local matrix whole)."""

    def __init__(
        self,
        groups: Iterable[dict[str, Any]],
        lr: float,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = 5,
        ns_coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
        lr_scale: str = "rms",
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        tp_group: dist.ProcessGroup | None = None,
    ) -> None:
        defaults = dict(
            lr=lr,
            weight_decay=0.0,
            muon=False,
            momentum=momentum,
            nesterov=nesterov,
            ns_steps=ns_steps,
            ns_coefficients=tuple(ns_coefficients),
            lr_scale=lr_scale,
            betas=betas,
            eps=eps,
        )
        super().__init__(list(groups), defaults)
        self.tp_group = tp_group

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if group["muon"]:
                for p in params:
                    self._muon(p, group)
            else:
                for p in params:
                    self._adamw(p, group)
        return None

    def _muon(self, p: torch.Tensor, group: dict[str, Any]) -> None:
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p)
        m = state["momentum_buffer"]
        g = p.grad
        assert g is not None
        m.mul_(group["momentum"]).add_(g)
        u = g.add(m, alpha=group["momentum"]) if group["nesterov"] else m
        full = self._gather(u, p)
        o = newton_schulz(full, group["ns_steps"], group["ns_coefficients"])
        o = (o * _scale(full.shape, group["lr_scale"])).to(p.dtype)
        lr, wd = group["lr"], group["weight_decay"]
        if wd:
            p.mul_(1 - lr * wd)
        p.add_(self._local(o, p), alpha=-lr)

    def _gather(self, u: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """The whole matrix (stack) whose shard ``u`` is: over FSDP2's mesh, then over TP."""
        full = u.full_tensor() if isinstance(u, DTensor) else u
        split = tp_split(p)
        group = self.tp_group
        if split is None or group is None or dist.get_world_size(group) == 1:
            return full
        pieces = [torch.empty_like(full) for _ in range(dist.get_world_size(group))]
        dist.all_gather(pieces, full.contiguous(), group=group)
        return torch.cat(pieces, dim=split.dim).narrow(split.dim, 0, split.length)

    def _local(self, o: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """This rank's piece of the orthogonalised ``o``, shaped and placed like ``p``."""
        split = tp_split(p)
        if split is not None and self.tp_group is not None:
            size = dist.get_world_size(self.tp_group)
            if size > 1:  # p.shape: the TP-local shape (a DTensor's is global over its mesh)
                o = shard_tensor(o, split.dim, p.shape[split.dim], dist.get_rank(self.tp_group))
        if isinstance(p, DTensor):
            return distribute_tensor(o, p.device_mesh, p.placements, src_data_rank=None)
        return o

    def _adamw(self, p: torch.Tensor, group: dict[str, Any]) -> None:
        state = self.state[p]
        if "step" not in state:
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
        g = p.grad
        assert g is not None
        beta1, beta2 = group["betas"]
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        state["step"] += 1
        t = float(state["step"])
        m, v = state["exp_avg"], state["exp_avg_sq"]
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        if wd:
            p.mul_(1 - lr * wd)
        denom = (v / (1 - beta2**t)).sqrt_().add_(eps)
        p.addcdiv_(m, denom, value=-lr / (1 - beta1**t))
