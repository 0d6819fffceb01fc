"""Gated DeltaNet linear attention (Yang et al. 2024; Qwen3-Next's ``linear_attention`` layers).

Per value head the layer keeps a state matrix S [Dk, Dv] that each token first decays by
``exp(g_t)`` and then corrects towards its value by the delta rule:
``S_t = exp(g_t) S_{t-1} + k_t (beta_t (v_t - S'_t^T k_t))^T`` (``S'_t`` the decayed state), and
reads ``o_t = S_t^T q_t``. q, k, v come through a short causal depthwise convolution (silu);
q and k are L2-normalised, q scaled by ``Dk^-1/2``; ``beta = sigmoid(b)``, the log decay
``g = -exp(A_log) softplus(a + dt_bias)``. The output is RMS-normalised per head and gated by
``silu(z)`` before the output projection. Several value heads share one q/k head (GVA).

Training runs the chunked form: within a chunk of L tokens the delta-rule updates are folded
into one triangular solve (the UT transform), and only the chunk boundaries are sequential;
decoding from a cache runs the recurrence token by token. Both are fp32 inside. On CUDA the
``fla`` kernels (flash-linear-attention) are used when installed.

Tensor parallelism splits the q/k heads and with them their value heads, the convolution
channels and the state; the output projection is row-parallel.

Shapes: B batch, T tokens, H value heads, G q/k heads, K q/k head dim, V value head dim,
N chunks, L chunk length (all on this rank).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from evoformer.config.schema import DeltaNetConfig
from evoformer.model.mixers import CausalConv, RecurrentState, sharded_heads
from evoformer.parallel.context import ParallelContext
from evoformer.parallel.sharding import mark_partial_grad, mark_sharded


def l2_normalise(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x / sqrt(sum(x^2) + eps) over the last dim (as flash-linear-attention defines it)."""
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + eps)


def chunked_delta_rule(
    q_BHTK: torch.Tensor,
    k_BHTK: torch.Tensor,
    v_BHTV: torch.Tensor,
    g_BHT: torch.Tensor,
    beta_BHT: torch.Tensor,
    chunk: int,
    state_BHKV: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The gated delta rule over a whole sequence, chunk by chunk (fp32 in, fp32 out): the
    outputs [B, H, T, V] and the final state [B, H, K, V]. ``q`` is already normalised and
    scaled, ``k`` normalised."""
    B, H, T, K = k_BHTK.shape
    V = v_BHTV.shape[-1]
    pad = (-T) % chunk
    if pad:  # zero keys, values and log decays leave the state as it is
        q_BHTK, k_BHTK, v_BHTV = (F.pad(t, (0, 0, 0, pad)) for t in (q_BHTK, k_BHTK, v_BHTV))
        g_BHT, beta_BHT = F.pad(g_BHT, (0, pad)), F.pad(beta_BHT, (0, pad))
    N, L = (T + pad) // chunk, chunk
    q, k, v = (t.reshape(B, H, N, L, -1) for t in (q_BHTK, k_BHTK, v_BHTV))
    beta = beta_BHT.reshape(B, H, N, L, 1)
    G = g_BHT.reshape(B, H, N, L).cumsum(-1)  # log decay from the chunk start to each token
    # decay_LL[i, j] = exp(G_i - G_j) for j <= i (token j's contribution as seen at i), 0 above.
    causal = torch.ones(L, L, dtype=torch.bool, device=q.device).tril()
    diff = (G[..., :, None] - G[..., None, :]).masked_fill(~causal, float("-inf"))
    decay_LL = diff.exp()
    # UT transform: the chunk's L delta-rule updates as one unit-lower-triangular system.
    kb = k * beta
    system = (kb @ k.transpose(-1, -2)) * decay_LL  # diagonal ignored: unitriangular
    u = torch.linalg.solve_triangular(system, v * beta, upper=False, unitriangular=True)
    w = torch.linalg.solve_triangular(
        system, kb * G[..., None].exp(), upper=False, unitriangular=True
    )
    scores = (q @ k.transpose(-1, -2)) * decay_LL
    q_in = q * G[..., None].exp()  # reads the state left by the previous chunk
    k_out = k * (G[..., -1:] - G).exp()[..., None]  # decays each token to the chunk's end
    end_decay = G[..., -1].exp()[..., None, None]
    S = q.new_zeros(B, H, K, V) if state_BHKV is None else state_BHKV.float()
    # Per-chunk views come from one unbind and the outputs are stacked once: indexing chunk n
    # (or writing into a preallocated output) would make autograd build a full-size gradient
    # per chunk, O(T^2 / L) work in the backward.
    outs = []
    for u_n, w_n, q_n, sc_n, k_n, d_n in zip(
        *(t.unbind(2) for t in (u, w, q_in, scores, k_out, end_decay)), strict=True
    ):
        fresh = u_n - w_n @ S  # what the state does not predict yet
        outs.append(q_n @ S + sc_n @ fresh)
        S = S * d_n + k_n.transpose(-1, -2) @ fresh
    return torch.stack(outs, dim=2).reshape(B, H, N * L, V)[:, :, :T], S


def recurrent_delta_rule(
    q_BHTK: torch.Tensor,
    k_BHTK: torch.Tensor,
    v_BHTV: torch.Tensor,
    g_BHT: torch.Tensor,
    beta_BHT: torch.Tensor,
    state_BHKV: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same function token by token (decoding): outputs [B, H, T, V], final state."""
    B, H, T, K = k_BHTK.shape
    V = v_BHTV.shape[-1]
    S = q_BHTK.new_zeros(B, H, K, V) if state_BHKV is None else state_BHKV.float()
    out = q_BHTK.new_empty(B, H, T, V)
    for t in range(T):
        S = S * g_BHT[:, :, t].exp()[..., None, None]
        k_t = k_BHTK[:, :, t]
        predicted = (S * k_t[..., None]).sum(-2)  # S^T k
        delta = (v_BHTV[:, :, t] - predicted) * beta_BHT[:, :, t, None]
        S = S + k_t[..., None] * delta[..., None, :]
        out[:, :, t] = (S * q_BHTK[:, :, t, :, None]).sum(-2)
    return out, S


def _fla_chunk():
    """flash-linear-attention's chunked kernel, or None (not installed / not CUDA)."""
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule  # pyright: ignore
    except ImportError:
        return None
    return chunk_gated_delta_rule


class GatedDeltaNet(nn.Module):
    """Gated DeltaNet token mixer; ``forward(x, rope, cache, docs)`` like attention (``rope``
    unused: positions come from the convolution and the recurrence)."""

    def __init__(
        self,
        d: DeltaNetConfig,
        d_model: int,
        norm_eps: float,
        ctx: ParallelContext | None = None,
    ) -> None:
        super().__init__()
        self.ctx = ctx = ctx or ParallelContext()
        self.n_key_heads = G = sharded_heads(d.n_key_heads, ctx, "model.deltanet.n_key_heads")
        self.n_heads = H = G * (d.n_heads // d.n_key_heads)
        self.key_dim, self.value_dim = K, V = d.key_head_dim, d.value_head_dim
        self.chunk = d.chunk_size
        self.norm_eps = norm_eps
        head_start = ctx.tp_rank * H
        C = d_model
        col = lambda n: ctx.column(C, n, False, explicit_comm=True)  # noqa: E731
        self.query_proj, self.key_proj = col(d.n_key_heads * K), col(d.n_key_heads * K)
        self.value_proj, self.gate_proj = col(d.n_heads * V), col(d.n_heads * V)
        self.beta_proj, self.decay_proj = col(d.n_heads), col(d.n_heads)
        kernel = d.conv_kernel
        self.q_conv = CausalConv(G * K, kernel, False, d.n_key_heads * K)
        self.k_conv = CausalConv(G * K, kernel, False, d.n_key_heads * K)
        self.v_conv = CausalConv(H * V, kernel, False, d.n_heads * V)
        self.A_log = nn.Parameter(torch.empty(H))
        self.dt_bias = nn.Parameter(torch.empty(H))
        self.norm_weight = nn.Parameter(torch.empty(V))  # one gain over each head's V dims
        self.out_proj = ctx.row(d.n_heads * V, C, False)
        self.out_proj.is_residual_out = True  # pyright: ignore[reportArgumentType]
        self._heads = (head_start, d.n_heads)
        if ctx.tp > 1:
            for name in ("A_log", "dt_bias"):
                mark_sharded(self, name, 0, d.n_heads)
            mark_partial_grad(self, "norm_weight")  # used for this rank's heads only

    def reset_parameters(self) -> None:
        # Decay rates spread over [1, 16] across the global heads (HF draws them uniformly from
        # [0.01, 16]); deterministic, so every layout starts alike.
        start, total = self._heads
        A = torch.linspace(1.0, 16.0, total)[start : start + self.n_heads]
        with torch.no_grad():
            self.A_log.copy_(A.log())
            self.dt_bias.fill_(1.0)
            self.norm_weight.fill_(1.0)

    def new_cache(self, batch: int, max_len: int, device, dtype) -> RecurrentState:
        return RecurrentState()

    def forward(
        self,
        x_BTC: torch.Tensor,
        rope=None,
        cache: RecurrentState | None = None,
        docs=None,
    ) -> torch.Tensor:
        if docs is not None:
            raise ValueError("Gated DeltaNet layers do not support document masking")
        if self.ctx.tp > 1:
            x_BTC = self.ctx.enter(x_BTC)  # once for every projection (SP: gathers)
        B, T, _ = x_BTC.shape
        G, H, K, V = self.n_key_heads, self.n_heads, self.key_dim, self.value_dim
        q = self.q_conv(self.query_proj(x_BTC), cache, "q").view(B, T, G, K)
        k = self.k_conv(self.key_proj(x_BTC), cache, "k").view(B, T, G, K)
        v = self.v_conv(self.value_proj(x_BTC), cache, "v").view(B, T, H, V)
        z = self.gate_proj(x_BTC).view(B, T, H, V)
        beta = torch.sigmoid(self.beta_proj(x_BTC).float())
        g = -self.A_log.float().exp() * F.softplus(self.decay_proj(x_BTC).float() + self.dt_bias)
        out = self._delta_rule(q, k, v, g, beta, cache)  # [B, T, H, V] fp32
        # Gated RMSNorm per head: normalise, scale, then gate by silu(z).
        y = out * torch.rsqrt(out.pow(2).mean(-1, keepdim=True) + self.norm_eps)
        y = (self.norm_weight * y.to(x_BTC.dtype)) * F.silu(z.float())
        return self.out_proj(y.to(x_BTC.dtype).reshape(B, T, H * V))

    def _delta_rule(self, q, k, v, g_BTH, beta_BTH, cache) -> torch.Tensor:
        rep = self.n_heads // self.n_key_heads
        q_f, k_f = l2_normalise(q.float()), l2_normalise(k.float())
        q_f = q_f * self.key_dim**-0.5
        if rep > 1:  # value head h reads q/k head h // rep
            q_f, k_f = q_f.repeat_interleave(rep, dim=2), k_f.repeat_interleave(rep, dim=2)
        q_f, k_f, v_f = (t.transpose(1, 2) for t in (q_f, k_f, v.float()))
        g, beta = g_BTH.transpose(1, 2), beta_BTH.transpose(1, 2)
        state = cache.state if cache is not None else None
        T = q.shape[1]
        if cache is not None and state is not None and T == 1:
            out, state = recurrent_delta_rule(q_f, k_f, v_f, g, beta, state)
        else:
            out, state = self._chunked(q_f, k_f, v_f, g, beta, state)
        if cache is not None:
            cache.state = state.detach()
            cache.length += T
        return out.transpose(1, 2)

    def _chunked(self, q, k, v, g, beta, state):
        fla = _fla_chunk() if q.is_cuda else None
        if fla is None:
            return chunked_delta_rule(q, k, v, g, beta, self.chunk, state)
        # fla takes [B, T, H, D] and applies the q scale itself (scale=1: ours is applied).
        o, S = fla(
            *(t.transpose(1, 2) for t in (q, k, v)),
            g=g.transpose(1, 2),
            beta=beta.transpose(1, 2),
            scale=1.0,
            initial_state=state,
            output_final_state=True,
        )
        return o.transpose(1, 2).float(), S.float()


__all__ = ["GatedDeltaNet", "chunked_delta_rule", "recurrent_delta_rule"]
