"""The Mamba-2 mixer (Dao & Gu 2024, state-space duality; Nemotron-H's ``M`` layers).

Per head h the layer keeps a state [P, N] (P channels, N state size) driven by a selective,
scalar-decay SSM: with ``dt_t = softplus(dt_raw + dt_bias)`` and ``A = -exp(A_log)``,
``h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T`` and ``y_t = h_t C_t + D x_t``. x, B and C come
through a causal depthwise convolution (silu); heads of one group share B and C. The output is
gated by ``silu(z)`` and RMS-normalised per group (Nemotron-H: gate before norm) before the
output projection.

Training runs SSD's chunked form: within a chunk the SSM is a masked, decayed attention
``(C_i . B_j) exp(sum a_{j+1..i})`` over ``dt_j x_j``, and chunk states pass from one chunk to
the next; decoding from a cache runs the recurrence. fp32 inside. On CUDA the ``mamba_ssm``
chunked-scan kernel is used when installed.

Tensor parallelism splits the heads and the groups (``n_groups % tp == 0``): x, z, dt, B, C
projections are column-parallel, the conv channels and per-head parameters split with them,
the norm is per group (local), the output projection row-parallel.

Shapes: B batch, T tokens, H heads, P head dim, G groups, N state size, L chunk length.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from evoformer.config.schema import MambaConfig
from evoformer.model.mixers import CausalConv, RecurrentState, sharded_heads
from evoformer.parallel.context import ParallelContext
from evoformer.parallel.sharding import mark_sharded


def chunked_ssd(
    x_BTHP: torch.Tensor,
    dt_BTH: torch.Tensor,
    A_H: torch.Tensor,
    B_BTHN: torch.Tensor,
    C_BTHN: torch.Tensor,
    chunk: int,
    state_BHPN: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The SSM over a whole sequence by chunks (fp32): outputs [B, T, H, P] without the D skip,
    and the final state [B, H, P, N]."""
    Bsz, T, H, P = x_BTHP.shape
    N = B_BTHN.shape[-1]
    pad = (-T) % chunk
    if pad:  # dt = 0 on padding: no decay, no input
        x_BTHP, B_BTHN, C_BTHN = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (x_BTHP, B_BTHN, C_BTHN))
        dt_BTH = F.pad(dt_BTH, (0, 0, 0, pad))
    n, L = (T + pad) // chunk, chunk
    # [B, H, n, L, ...]
    x = (x_BTHP * dt_BTH[..., None]).transpose(1, 2).reshape(Bsz, H, n, L, P)
    Bm = B_BTHN.transpose(1, 2).reshape(Bsz, H, n, L, N)
    Cm = C_BTHN.transpose(1, 2).reshape(Bsz, H, n, L, N)
    a = (dt_BTH * A_H).transpose(1, 2).reshape(Bsz, H, n, L)
    G = a.cumsum(-1)  # log decay from the chunk start to each token
    causal = torch.ones(L, L, dtype=torch.bool, device=x.device).tril()
    decay_LL = (G[..., :, None] - G[..., None, :]).masked_fill(~causal, float("-inf")).exp()
    scores = (Cm @ Bm.transpose(-1, -2)) * decay_LL  # [B, H, n, L, L]
    y_intra = scores @ x
    read = Cm * G[..., None].exp()  # C_i exp(G_i): reads the state at the chunk start
    write = x * (G[..., -1:] - G).exp()[..., None]  # dt_j x_j decayed to the chunk end
    end_decay = G[..., -1].exp()[..., None, None]
    S = x.new_zeros(Bsz, H, P, N) if state_BHPN is None else state_BHPN.float()
    ys = []  # one unbind, one stack: see chunked_delta_rule (no per-chunk full-size grads)
    for y_c, r_c, d_c, w_c, b_c in zip(
        *(t.unbind(2) for t in (y_intra, read, end_decay, write, Bm)), strict=True
    ):
        ys.append(y_c + r_c @ S.transpose(-1, -2))
        S = S * d_c + w_c.transpose(-1, -2) @ b_c
    y = torch.stack(ys, dim=2)
    return y.reshape(Bsz, H, n * L, P)[:, :, :T].transpose(1, 2), S


def recurrent_ssd(
    x_BTHP: torch.Tensor,
    dt_BTH: torch.Tensor,
    A_H: torch.Tensor,
    B_BTHN: torch.Tensor,
    C_BTHN: torch.Tensor,
    state_BHPN: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same SSM token by token (decoding)."""
    Bsz, T, H, P = x_BTHP.shape
    N = B_BTHN.shape[-1]
    S = x_BTHP.new_zeros(Bsz, H, P, N) if state_BHPN is None else state_BHPN.float()
    y = x_BTHP.new_empty(Bsz, T, H, P)
    for t in range(T):
        dt = dt_BTH[:, t]  # [B, H]
        S = S * (dt * A_H).exp()[..., None, None]
        S = S + (dt[..., None] * x_BTHP[:, t])[..., None] * B_BTHN[:, t, :, None, :]
        y[:, t] = (S * C_BTHN[:, t, :, None, :]).sum(-1)
    return y, S


def _mamba_chunk_scan():
    """mamba_ssm's chunked-scan kernel, or None (not installed)."""
    try:
        from mamba_ssm.ops.triton.ssd_combined import (  # pyright: ignore
            mamba_chunk_scan_combined,
        )
    except ImportError:
        return None
    return mamba_chunk_scan_combined


class Mamba2(nn.Module):
    """Mamba-2 token mixer; ``forward(x, rope, cache, docs)`` like attention (``rope`` unused)."""

    def __init__(
        self, m: MambaConfig, d_model: int, norm_eps: float, ctx: ParallelContext | None = None
    ) -> None:
        super().__init__()
        self.ctx = ctx = ctx or ParallelContext()
        self.n_groups = G = sharded_heads(m.n_groups, ctx, "model.mamba.n_groups")
        self.n_heads = H = G * (m.n_heads // m.n_groups)
        self.head_dim, self.state_dim = P, N = m.head_dim, m.state_dim
        self.chunk = m.chunk_size
        self.norm_eps = norm_eps
        self._heads = (ctx.tp_rank * H, m.n_heads)
        C, inner, full_inner = d_model, H * P, m.n_heads * P
        col = lambda n: ctx.column(C, n, m.bias, explicit_comm=True)  # noqa: E731
        self.z_proj, self.x_proj = col(full_inner), col(full_inner)
        self.b_proj, self.c_proj = col(m.n_groups * N), col(m.n_groups * N)
        self.dt_proj = col(m.n_heads)
        k = m.conv_kernel
        self.x_conv = CausalConv(inner, k, m.conv_bias, full_inner)
        self.b_conv = CausalConv(G * N, k, m.conv_bias, m.n_groups * N)
        self.c_conv = CausalConv(G * N, k, m.conv_bias, m.n_groups * N)
        self.A_log = nn.Parameter(torch.empty(H))
        self.D = nn.Parameter(torch.empty(H))
        self.dt_bias = nn.Parameter(torch.empty(H))
        self.norm_weight = nn.Parameter(torch.empty(inner))
        self.out_proj = ctx.row(full_inner, C, m.bias)
        self.out_proj.is_residual_out = True  # pyright: ignore[reportArgumentType]
        if ctx.tp > 1:
            for name in ("A_log", "D", "dt_bias"):
                mark_sharded(self, name, 0, m.n_heads)
            mark_sharded(self, "norm_weight", 0, full_inner)

    def reset_parameters(self) -> None:
        # Mamba-2's S4D-real init A_h = h + 1 over the global heads; D = 1, dt_bias = 1.
        start, _ = self._heads
        with torch.no_grad():
            self.A_log.copy_(torch.arange(start + 1, start + self.n_heads + 1).float().log())
            self.D.fill_(1.0)
            self.dt_bias.fill_(1.0)
            self.norm_weight.fill_(1.0)

    def new_cache(self, batch: int, max_len: int, device, dtype) -> RecurrentState:
        return RecurrentState()

    def forward(
        self, x_BTC: torch.Tensor, rope=None, cache: RecurrentState | None = None, docs=None
    ) -> torch.Tensor:
        if docs is not None:
            raise ValueError("Mamba-2 layers do not support document masking")
        if self.ctx.tp > 1:
            x_BTC = self.ctx.enter(x_BTC)
        Bsz, T, _ = x_BTC.shape
        G, H, P, N = self.n_groups, self.n_heads, self.head_dim, self.state_dim
        z = self.z_proj(x_BTC)
        x = self.x_conv(self.x_proj(x_BTC), cache, "x").view(Bsz, T, H, P).float()
        rep = H // G  # heads of a group share its B and C
        Bm = self.b_conv(self.b_proj(x_BTC), cache, "b").view(Bsz, T, G, N).float()
        Cm = self.c_conv(self.c_proj(x_BTC), cache, "c").view(Bsz, T, G, N).float()
        Bm, Cm = Bm.repeat_interleave(rep, dim=2), Cm.repeat_interleave(rep, dim=2)
        dt = F.softplus(self.dt_proj(x_BTC).float() + self.dt_bias.float())
        A = -self.A_log.float().exp()
        state = cache.state if cache is not None else None
        if cache is not None and state is not None and T == 1:
            y, state = recurrent_ssd(x, dt, A, Bm, Cm, state)
        else:
            y, state = self._chunked(x, dt, A, Bm, Cm, state)
        if cache is not None:
            cache.state = state.detach()
            cache.length += T
        y = y + self.D.float()[:, None] * x
        # Gate, then RMS-normalise each group's channels (norm after gate, as Nemotron-H).
        y = y.reshape(Bsz, T, H * P) * F.silu(z.float())
        y_g = y.view(Bsz, T, G, -1)
        y_g = y_g * torch.rsqrt(y_g.pow(2).mean(-1, keepdim=True) + self.norm_eps)
        y = self.norm_weight * y_g.view(Bsz, T, H * P).to(x_BTC.dtype)
        return self.out_proj(y.to(x_BTC.dtype))

    def _chunked(self, x, dt, A, Bm, Cm, state):
        kernel = _mamba_chunk_scan() if x.is_cuda else None
        if kernel is None:
            return chunked_ssd(x, dt, A, Bm, Cm, self.chunk, state)
        y, S = kernel(x, dt, A, Bm, Cm, self.chunk, initial_states=state, return_final_states=True)
        return y.float(), S.float()
