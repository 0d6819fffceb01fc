"""Mixture of experts: a top-k router, gated experts stored as stacked 3-D weights and run with
grouped GEMMs, optional always-on shared experts, and load balancing.

One router covers the three published designs: softmax scores (Mixtral, Qwen3-MoE) and sigmoid
scores with group-limited selection and an aux-loss-free selection bias (DeepSeek-V3). Token
dispatch (permute by expert -> expert GEMMs -> unpermute and combine) goes through a dispatcher
object (``parallel/expert.py``): :class:`LocalDispatcher` on one rank, or under expert
parallelism (``parallel.ep``) an all-to-all to the ranks holding the experts; the router and the
experts are the same either way (each ep rank holds ``num_experts / ep`` of the stacked experts).

Tensor parallelism: the router is replicated (every rank routes every token of the micro-batch,
so routing, token counts and the aux loss are those of one process), each expert's hidden dim is
split (gate/up column-parallel, down row-parallel: stacked weights ``[E, H/tp, C]`` /
``[E, C, H/tp]``), and so are the shared experts. The input enters the TP region once and the
partial outputs of the routed and shared experts are summed and reduced once per MoE layer.

Shapes: N tokens (batch x sequence), C d_model, E experts, K experts per token, H expert hidden
width (this rank's share under TP), M routed token copies (N x K, fewer when the capacity limit
drops some), G expert groups.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from evoformer.model.layout import MoESpec
from evoformer.model.mlp import GatedMLP, glu_fn
from evoformer.parallel.collectives import group_size, reduce_from_parallel_region
from evoformer.parallel.context import ParallelContext
from evoformer.parallel.expert import LocalDispatcher, build_dispatcher
from evoformer.parallel.sharding import (
    KeepShardSpecs,
    mark_expert_sharded,
    mark_partial_grad,
    mark_sharded,
)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    # Grouped GEMMs are not autocast ops: cast to the autocast dtype by hand.
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


class GroupedExperts(KeepShardSpecs):
    """E gated experts ``down(glu(gate(x), up(x)))`` as stacked weights: ``gate_proj`` and
    ``up_proj`` [E, H, C], ``down_proj`` [E, C, H] (each expert's matrix in nn.Linear's
    [out, in] layout, as HF stores them). Takes token copies sorted by expert with the per-expert
    counts and returns their outputs in the same order.

    ``bias`` (gpt-oss): ``gate_proj_bias`` / ``up_proj_bias`` [E, H] and ``down_proj_bias``
    [E, C]. Under TP the gate/up biases are split with the hidden dim; the down bias belongs to
    the reduced output, so only TP rank 0 adds it (its gradient is summed over TP)."""

    # Drawn like linears by Transformer.init_weights, seeded by parameter name (True: the
    # residual output projection, scaled when init.scaled_residual is on).
    normal_init = {"gate_proj": False, "up_proj": False, "down_proj": True}

    def __init__(
        self,
        num_experts: int,
        d_model: int,
        hidden: int,
        glu,
        ctx: ParallelContext | None = None,
        bias: bool = False,
    ) -> None:
        super().__init__()
        ctx = ctx or ParallelContext()
        tp, ep = ctx.tp, ctx.ep
        if hidden % tp:
            raise ValueError(f"tensor parallelism: tp={tp} must divide the expert hidden {hidden}")
        if num_experts % ep:
            raise ValueError(
                f"expert parallelism: parallel.ep={ep} must divide model.moe.num_experts="
                f"{num_experts}"
            )
        self.glu = glu
        local = hidden // tp  # this rank's slice of every expert's hidden dim
        n = num_experts // ep  # this rank's experts (all of them without expert parallelism)
        self.gate_proj = nn.Parameter(torch.empty(n, local, d_model))
        self.up_proj = nn.Parameter(torch.empty(n, local, d_model))
        self.down_proj = nn.Parameter(torch.empty(n, d_model, local))
        names = ["gate_proj", "up_proj", "down_proj"]
        self.bias = bias
        # The down bias joins the TP-reduced sum once: rank 0 adds it, the others add it times
        # 0, so every rank has a gradient to sum (zeros but rank 0's).
        self.down_bias_share = 1.0 if ctx.tp_rank == 0 else 0.0
        if bias:
            self.gate_proj_bias = nn.Parameter(torch.empty(n, local))
            self.up_proj_bias = nn.Parameter(torch.empty(n, local))
            self.down_proj_bias = nn.Parameter(torch.empty(n, d_model))
            names += ["gate_proj_bias", "up_proj_bias", "down_proj_bias"]
        if tp > 1:
            mark_sharded(self, "gate_proj", 1, hidden)
            mark_sharded(self, "up_proj", 1, hidden)
            mark_sharded(self, "down_proj", 2, hidden)
            if bias:
                mark_sharded(self, "gate_proj_bias", 1, hidden)
                mark_sharded(self, "up_proj_bias", 1, hidden)
                mark_partial_grad(self, "down_proj_bias")
        if ep > 1:
            for name in names:
                mark_expert_sharded(self, name, 0, num_experts, ctx.ep_rank)
        # None: torch._grouped_mm where the kernel takes the shapes, else a loop over experts.
        self.use_grouped_mm: bool | None = None

    def reset_parameters(self) -> None:
        if self.bias:
            for b in (self.gate_proj_bias, self.up_proj_bias, self.down_proj_bias):
                b.zero_()

    def forward(self, x_MC: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        dtype = _compute_dtype(x_MC)
        x_MC = x_MC.to(dtype)
        weights = [w.to(dtype) for w in (self.gate_proj, self.up_proj, self.down_proj)]
        biases = None
        if self.bias:
            down = self.down_proj_bias.to(dtype) * self.down_bias_share
            biases = (self.gate_proj_bias.to(dtype), self.up_proj_bias.to(dtype), down)
        forward = self._grouped_forward if self._grouped(x_MC) else self._loop_forward
        return forward(x_MC, counts_E, weights[0], weights[1], weights[2], biases)

    def _grouped(self, x_MC: torch.Tensor) -> bool:
        if self.use_grouped_mm is not None:
            return self.use_grouped_mm
        if not hasattr(torch, "_grouped_mm"):
            return False
        if x_MC.is_cuda:
            # The CUDA kernel wants bf16 on Hopper or newer (not tested here: no GPU in CI).
            cc = torch.cuda.get_device_capability(x_MC.device)
            if x_MC.dtype != torch.bfloat16 or cc < (9, 0):
                return False
        elif x_MC.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            return False
        # The kernel wants every row stride a multiple of 16 bytes.
        E, H, C = self.gate_proj.shape
        return (H * x_MC.element_size()) % 16 == 0 and (C * x_MC.element_size()) % 16 == 0

    def _grouped_forward(self, x_MC, counts_E, w_gate, w_up, w_down, biases) -> torch.Tensor:
        offs = counts_E.cumsum(0).to(torch.int32)
        gate_MH, up_MH = _grouped_mm(x_MC, w_gate, offs), _grouped_mm(x_MC, w_up, offs)
        if biases is None:
            return _grouped_mm(self.glu(gate_MH, up_MH), w_down, offs)
        # Each row's expert, to pick its bias rows (counts are per expert, rows sorted by it).
        expert_M = torch.repeat_interleave(
            torch.arange(len(counts_E), device=x_MC.device), counts_E, output_size=len(x_MC)
        )
        b_gate, b_up, b_down = biases
        h_MH = self.glu(gate_MH + b_gate[expert_M], up_MH + b_up[expert_M])
        out_MC = _grouped_mm(h_MH, w_down, offs)
        return out_MC if b_down is None else out_MC + b_down[expert_M]

    def _loop_forward(self, x_MC, counts_E, w_gate, w_up, w_down, biases) -> torch.Tensor:
        outs, start = [], 0
        b_gate = b_up = b_down = None
        if biases is not None:
            b_gate, b_up, b_down = biases
        for e, n in enumerate(counts_E.tolist()):
            if n:
                x = x_MC[start : start + n]
                gate = F.linear(x, w_gate[e], None if b_gate is None else b_gate[e])
                up = F.linear(x, w_up[e], None if b_up is None else b_up[e])
                outs.append(F.linear(self.glu(gate, up), w_down[e], _row(b_down, e)))
            start += n
        return torch.cat(outs) if outs else x_MC.new_zeros(0, w_down.shape[1])


def _row(b: torch.Tensor | None, e: int) -> torch.Tensor | None:
    return None if b is None else b[e]


def _grouped_mm(x_MI: torch.Tensor, w_EOI: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Rows ``offs[e-1]:offs[e]`` of ``x`` times expert e's [out, in] matrix, transposed (the
    column-major operand layout the CUDA kernel wants; on CPU it is as fast as a copy)."""
    y = torch._grouped_mm(x_MI, w_EOI.transpose(1, 2), offs=offs)
    if y.requires_grad:
        # Its backward rejects broadcast gradients (e.g. from y.sum()): make them dense.
        y.register_hook(torch.Tensor.contiguous)
    return y


class MoE(nn.Module):
    """Routed experts (plus shared experts) in place of a dense MLP.

    Router: ``router`` (d_model -> E; a bias with ``router_bias``, gpt-oss) in fp32; scores
    are softmax or sigmoid (gpt-oss's softmax over the top-k logits is the softmax over all,
    renormalised over the chosen: ``norm_topk_prob``). The
    selection score adds ``e_score_correction_bias`` (aux-loss-free balancing, DeepSeek-V3)
    and, with ``n_groups > 1``, is limited to the ``topk_groups`` groups whose two best experts
    (``group_score`` top2) or best expert (max) score highest. Gate weights are the *unbiased*
    scores of the chosen experts, renormalised
    (``norm_topk_prob``) and scaled by ``routed_scaling``.

    Balancing: ``aux_loss`` (training, ``aux_loss_coef > 0``) is the Switch/Mixtral loss
    ``E * sum_e f_e * P_e`` (f_e: copies routed to e per token, P_e: mean router probability,
    for sigmoid scores the scores normalised per token), times ``aux_loss_coef`` divided by the
    number of MoE layers, so the summed term is the mean over layers (HF Mixtral pools all
    layers' statistics before the product; the two agree for one MoE layer). ``end_of_step()``
    moves the bias by ``bias_update_rate * sign(mean load - load)`` from the step's token
    counts (summed over micro-batches and data-parallel ranks, so the bias is bit-identical on
    every rank, expert-parallel or not) and reports load statistics per layer
    (``moe/L<i>/share``: each expert's share of the routed copies; ``max_over_mean``; with a
    capacity ``dropped`` and ``dropped_tokens``; ``aux_loss``; ``bias_min`` / ``bias_max``).

    Expert parallelism (``ctx.ep_group``): this rank holds ``E / ep`` of the stacked experts and
    the dispatcher all-to-alls the routed copies to their ranks; the router, the shared experts
    and everything above are unchanged (see ``parallel/expert.py``).

    Experts carry biases only with ``expert_bias`` (``mlp.bias`` applies to dense layers only).
    """

    e_score_correction_bias: torch.Tensor | None  # a buffer (None without a bias)
    aux_loss: torch.Tensor | None

    def __init__(
        self, m: MoESpec, layer_idx: int | None = None, ctx: ParallelContext | None = None
    ) -> None:
        super().__init__()
        self.ctx = ctx = ctx or ParallelContext()
        E = m.num_experts
        # Routing settings (gated experts, groups, top-k) are checked by config validation.
        self.layer_idx = layer_idx  # names the metrics
        self.num_experts, self.top_k = E, m.top_k
        self.score = m.score
        self.norm_topk_prob = m.norm_topk_prob
        self.routed_scaling = m.routed_scaling
        self.n_groups, self.topk_groups = m.n_groups, m.topk_groups
        self.group_score = m.group_score
        self.aux_loss_coef = m.aux_loss_coef
        self.bias_update_rate = m.bias_update_rate
        self.capacity_factor = m.capacity_factor
        self.router = nn.Linear(m.d_model, E, bias=m.router_bias)
        if ctx.tp > 1:
            # Replicated, but the gate weights multiply partial expert outputs: each rank's
            # router gradient is its share (the aux loss's is scaled by 1/tp in _observe).
            mark_partial_grad(self.router, "weight", "bias")
        uses_bias = m.score == "sigmoid" or m.bias_update_rate > 0
        # Persistent, so checkpoints carry the balance reached; fp32 like HF keeps it.
        self.register_buffer(
            "e_score_correction_bias", torch.empty(E, dtype=torch.float32) if uses_bias else None
        )
        self.experts = GroupedExperts(
            E, m.d_model, m.expert_width, glu_fn(m.expert_mlp), ctx, bias=m.expert_bias
        )
        # All-to-all over the ep group under expert parallelism (parallel/expert.py).
        self.dispatcher: LocalDispatcher = build_dispatcher(E, ctx.ep_group)
        self.shared_experts = None
        if m.shared_mlp is not None:
            self.shared_experts = GatedMLP(m.shared_mlp, m.d_model, ctx, partial_output=True)
        # Qwen3-Next: a per-token sigmoid gate on the shared experts. Replicated; it scales a
        # partial sum under TP, so its gradient is partial too.
        self.shared_gate = nn.Linear(m.d_model, 1, bias=False) if m.shared_gate else None
        if self.shared_gate is not None and ctx.tp > 1:
            mark_partial_grad(self.shared_gate, "weight")
        # The reduction group of the load statistics: the data-parallel ranks, which see
        # different tokens (None: one data-parallel rank, nothing to reduce). TP ranks route
        # the same tokens and hold the same statistics already.
        self.process_group = ctx.dp_group
        self.aux_loss: torch.Tensor | None = None
        # Context parallelism, MTP: [N] bool, the tokens one process would have (the MTP block
        # pads the sequence's last positions); None: all. Only the statistics read it.
        self.counted_N: torch.Tensor | None = None
        self._stats: torch.Tensor | None = None  # [load per expert..., balance sum, calls, drops]

    def reset_parameters(self) -> None:
        if self.e_score_correction_bias is not None:
            self.e_score_correction_bias.zero_()

    # -- routing ---------------------------------------------------------------------------

    def route(self, x_NC: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(gate weights [N, K] fp32, chosen experts [N, K], scores [N, E] fp32)."""
        bias = self.router.bias
        with torch.autocast(x_NC.device.type, enabled=False):
            logits_NE = F.linear(
                x_NC.float(), self.router.weight.float(), None if bias is None else bias.float()
            )
        if self.score == "softmax":
            scores_NE = logits_NE.softmax(dim=-1)
        else:
            scores_NE = logits_NE.sigmoid()
        choice_NE = scores_NE
        if self.e_score_correction_bias is not None:
            choice_NE = scores_NE + self.e_score_correction_bias  # steers selection only
        if self.n_groups > 1:
            choice_NE = self._limit_to_groups(choice_NE)
        experts_NK = choice_NE.topk(self.top_k, dim=-1).indices
        weights_NK = scores_NE.gather(1, experts_NK)
        if self.norm_topk_prob:
            weights_NK = weights_NK / (weights_NK.sum(dim=-1, keepdim=True) + 1e-20)
        return weights_NK * self.routed_scaling, experts_NK, scores_NE

    def _limit_to_groups(self, choice_NE: torch.Tensor) -> torch.Tensor:
        # A group scores the sum of its two best experts (DeepSeek-V3) or its best one
        # (DeepSeek-V2's group_limited_greedy); keep the topk_groups best groups.
        N, E, G = choice_NE.shape[0], self.num_experts, self.n_groups
        choice_NGX = choice_NE.view(N, G, E // G)
        best = 1 if self.group_score == "max" else min(2, E // G)
        group_NG = choice_NGX.topk(best, dim=-1).values.sum(dim=-1)
        keep_NG = torch.zeros_like(group_NG, dtype=torch.bool)
        keep_NG.scatter_(1, group_NG.topk(self.topk_groups, dim=-1).indices, True)
        return choice_NGX.masked_fill(~keep_NG.unsqueeze(-1), float("-inf")).view(N, E)

    # -- forward ---------------------------------------------------------------------------

    def forward(self, x_BTC: torch.Tensor) -> torch.Tensor:
        tp = self.ctx.tp
        if tp > 1:
            x_BTC = self.ctx.enter(x_BTC)  # once for router and experts (SP: all tokens)
        shape = x_BTC.shape
        x_NC = x_BTC.reshape(-1, shape[-1])
        N = x_NC.shape[0]
        weights_NK, experts_NK, scores_NE = self.route(x_NC)
        capacity = None
        if self.training and self.capacity_factor > 0:
            # Switch/GShard expert capacity, applied in training only.
            capacity = math.ceil(self.capacity_factor * N * self.top_k / self.num_experts)
        xs_MC, counts_L, d = self.dispatcher.dispatch(x_NC, experts_NK, capacity)
        out_NC = self.dispatcher.combine(self.experts(xs_MC, counts_L), d, weights_NK)
        if self.shared_experts is not None:
            shared_NC = self.shared_experts(x_NC)
            if self.shared_gate is not None:
                shared_NC = torch.sigmoid(self.shared_gate(x_NC)) * shared_NC
            out_NC = out_NC + shared_NC
        self.aux_loss = None
        if self.training and N > 0:
            selected_E, kept_E = d.selected_E, d.kept_E
            if self.counted_N is not None:  # (no capacity under cp: nothing is dropped)
                keep_N = self.counted_N
                scores_NE = scores_NE[keep_N]
                selected_E = kept_E = torch.bincount(
                    experts_NK[keep_N].reshape(-1), minlength=self.num_experts
                ).to(d.selected_E.dtype)
            self._observe(scores_NE, selected_E, kept_E, scores_NE.shape[0])
        if tp > 1:
            return self.ctx.exit(out_NC.view(shape))  # one reduction for all experts
        return out_NC.view(shape)

    def _observe(self, scores_NE, selected_E, kept_E, N: int) -> None:
        want_grad = self.aux_loss_coef > 0 and torch.is_grad_enabled()
        with torch.set_grad_enabled(want_grad):
            probs_NE = scores_NE
            if self.score == "sigmoid":
                probs_NE = scores_NE / scores_NE.sum(dim=-1, keepdim=True)
            f_E, P_E = selected_E.float() / N, probs_NE.mean(dim=0)
            cp = self.ctx.cp
            if cp > 1:
                # Context parallelism: the balance of the whole sequences (the product of two
                # means is not the mean of the chunks' products), the same on every cp rank.
                counts = torch.cat([selected_E.float(), selected_E.new_full((1,), N).float()])
                dist.all_reduce(counts, group=self.ctx.cp_group)
                n_all = counts[-1]
                f_E = counts[:-1] / n_all
                P_E = reduce_from_parallel_region(probs_NE.sum(dim=0), self.ctx.cp_group) / n_all
            balance = self.num_experts * (f_E * P_E).sum()
        if want_grad:
            aux = self.aux_loss_coef * balance
            if self.ctx.tp > 1:
                # Every TP rank computes the same aux loss and its router gradient is summed
                # over TP with the partial ones: each rank contributes 1/tp of it.
                aux = _scale_grad(aux, 1.0 / self.ctx.tp)
            if cp > 1:  # each cp rank's gradient reaches only its tokens; the ranks average
                aux = _scale_grad(aux, float(cp))
            self.aux_loss = aux
        with torch.no_grad():
            if self._stats is None:
                self._stats = torch.zeros(self.num_experts + 3, device=selected_E.device)
            self._stats[: self.num_experts] += selected_E
            dropped = (selected_E - kept_E).sum()
            self._stats[self.num_experts :] += torch.stack(
                [balance.detach(), balance.new_ones(()), dropped.float()]
            )

    # -- per optimizer step ----------------------------------------------------------------

    @torch.no_grad()
    def end_of_step(self) -> dict[str, float | list[float]]:
        """Update the selection bias from this step's loads and report them (``{}`` when no
        training forward ran since the last call). Collective over the process group."""
        stats, self._stats = self._stats, None
        if stats is None:
            return {}
        if group_size(self.process_group) > 1:
            dist.all_reduce(stats, group=self.process_group)
        E = self.num_experts
        load_E = stats[:E]
        balance_sum, calls, dropped = stats[E:].tolist()
        mean = load_E.mean()
        bias = self.e_score_correction_bias
        if bias is not None and self.bias_update_rate > 0:
            bias += self.bias_update_rate * torch.sign(mean - load_E)
        p = "moe" if self.layer_idx is None else f"moe/L{self.layer_idx}"
        total = load_E.sum().clamp(min=1)
        out: dict[str, float | list[float]] = {
            f"{p}/max_over_mean": (load_E.max() / mean.clamp(min=1e-9)).item(),
            f"{p}/share": [round(s, 4) for s in (load_E / total).tolist()],
        }
        if self.aux_loss_coef > 0:
            out[f"{p}/aux_loss"] = self.aux_loss_coef * balance_sum / calls
        if bias is not None:
            out[f"{p}/bias_min"], out[f"{p}/bias_max"] = bias.min().item(), bias.max().item()
        if self.capacity_factor > 0:
            # Copies dropped by the capacity limit this step (all micro-batches and dp ranks),
            # and their fraction of the routed copies.
            out[f"{p}/dropped"] = dropped / total.item()
            out[f"{p}/dropped_tokens"] = int(dropped)
        return out


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale: float):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


def _scale_grad(x: torch.Tensor, scale: float) -> torch.Tensor:
    """``x`` forward; its gradient times ``scale`` backward."""
    return _ScaleGrad.apply(x, scale)
